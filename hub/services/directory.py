"""The directory a member fetches: its active peers, their keys, and pairwise exchange keys.

For a site B, each peer A carries ``exchange_keys``: hex K_AB = HMAC-SHA256(secret_A,
"hk-sso-v1|A|B") for every still-valid version of A's secret (DESIGN §5). With them B checks the
signatures A makes towards B, but B cannot sign as A towards a third site C (that would need
K_AC, which only A and C can know).
"""

from __future__ import annotations

import typing as t

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from agent.signing import pairwise_key

from ..models import Site
from . import keys as key_service
from . import logouts as logout_service
from . import policies as policy_service
from . import sites as site_service

if t.TYPE_CHECKING:
    from ..state import HubState


def directory_for(db: DBSession, state: HubState, me: Site) -> dict[str, t.Any]:
    found = list(db.scalars(select(Site).where(Site.status == "active", Site.id != me.id)
                            .order_by(Site.site_key)))
    ids = [peer.id for peer in found]
    # Three queries whatever the number of peers: the sites, then all their keys and secrets.
    keys = key_service.site_keys_of(db, ids)
    secrets_ = site_service.valid_secrets_of(db, state, ids)
    peers = [
        {
            "site_key": peer.site_key,
            "name": peer.name,
            "base_url": peer.base_url,
            "issuer": peer.issuer,
            "allowed_origins": peer.allowed_origins,
            "keys": [key_service.published(k.jwk) for k in keys.get(peer.id, [])],
            "exchange_keys": [pairwise_key(secret, peer.site_key, me.site_key).hex()
                              for secret in secrets_.get(peer.id, [])],
        }
        for peer in found
    ]
    hub_url = state.setting("URL")
    return {
        "site": {"site_key": me.site_key, "name": me.name, "issuer": me.issuer,
                 "status": me.status},
        "hub": {"issuer": hub_url, "jwks_uri": f"{hub_url}/.well-known/jwks.json"},
        "peers": peers,
        # Logouts everywhere of the last 24 h, of every site: each member applies those that
        # match its identity links (see hub.services.logouts).
        "logouts": logout_service.active(db, state),
        # The settings the hub manages for this site (agent.policy) and the webhook messages an
        # admin asked it to deliver again.
        "policy": policy_service.for_directory(db, state, me),
        "webhook_redeliveries": policy_service.redeliveries(db, state, me),
        "generated_at": state.clock().isoformat().replace("+00:00", "Z"),
    }
