"""Public keys of member sites and of the hub, and the federation JWKS (RFC 7517).

Members register public keys only (a JWK with a private member is refused): RSA of 2048 to
4096 bits for RS256, P-256 for ES256 (RFC 7518 §3.3, §3.4), at most ten not retired per site.
A ``kid`` is unique across the whole federation, the hub's own keys included, so a verifier
that picks a key by ``kid`` can never get another site's key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import typing as t

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession

from ..crypto import new_hub_key
from ..errors import BadRequest
from ..errors import Conflict
from ..errors import NotFound
from ..models import HubKey
from ..models import Site
from ..models import SiteKey
from . import events

if t.TYPE_CHECKING:
    from ..state import HubState

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
# What the JWKS and the directories carry of a member's key: its type and public parameters,
# then kid, alg and use (RFC 7517 §4, RFC 7518 §6.2.1, §6.3.1).
PUBLIC_PARAMETERS = {"RSA": ("kty", "n", "e"), "EC": ("kty", "crv", "x", "y")}
STATUSES = ("next", "active", "retiring", "retired")
# Every peer verifies with these keys: an RSA modulus past 4096 bits makes each check of a
# site's assertions several times dearer for all of them, and the JWKS and every directory
# carry each published key, so a site has at most MAX_KEYS_PER_SITE that are not retired
# (an active one, the previous ones still retiring, the next).
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 4096
MAX_KEYS_PER_SITE = 10


def check_public_jwk(jwk: t.Any) -> tuple[str, str]:
    """(kid, alg) of an acceptable public signing key, or :class:`BadRequest`."""
    if not isinstance(jwk, dict):
        raise BadRequest(fields={"jwk": ["A JWK object."]})
    if PRIVATE_MEMBERS & set(jwk):
        raise BadRequest("Only public keys may be registered.",
                         fields={"jwk": ["Private key material."]})
    kid, alg = jwk.get("kid"), jwk.get("alg")
    if not isinstance(kid, str) or not 8 <= len(kid) <= 128 or not kid.isprintable():
        raise BadRequest(fields={"kid": ["8 to 128 printable characters."]})
    if alg not in ("RS256", "ES256"):
        raise BadRequest(fields={"alg": ["RS256 or ES256."]})
    if jwk.get("use", "sig") != "sig":
        raise BadRequest(fields={"use": ["sig"]})
    if jwk.get("key_ops", ["verify"]) != ["verify"]:
        raise BadRequest(fields={"key_ops": ["[\"verify\"] or none."]})
    try:
        key = jwt.PyJWK(jwk).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        raise BadRequest(fields={"jwk": ["Not a valid public JWK."]}) from None
    if alg == "RS256" and not (isinstance(key, rsa.RSAPublicKey)
                               and MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS):
        raise BadRequest(fields={"jwk": [
            f"RS256 needs an RSA key of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits."]})
    if alg == "ES256" and not (
        isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        raise BadRequest(fields={"jwk": ["ES256 needs a P-256 key."]})
    return kid, alg


def published(jwk: dict[str, t.Any]) -> dict[str, t.Any]:
    """A member's key as it is published: the members a verifier needs, with ``use: sig``.

    Whatever else a member sent (``x5c``, ``x5u``, ``key_ops``, members of its own, of any
    size) is left out: a verifier that prefers a certificate chain to ``n`` and ``e`` must not
    find one the hub never checked, and the JWKS stays the size of its keys.
    """
    out = {name: jwk[name] for name in PUBLIC_PARAMETERS.get(jwk.get("kty", ""), ())
           if name in jwk}
    out.update(kid=jwk.get("kid"), alg=jwk.get("alg"), use="sig")
    return out


def register(db: DBSession, state: HubState, site: Site, jwk: t.Any,
             status: str = "next") -> SiteKey:
    """Publish a member's public key (idempotent for the same key).

    The site's row is locked first, so changes of one site's keys take turns on every worker:
    a retry sent while the first request still runs answers the key that one registered, and
    of two activations at once the later one wins (the earlier key is retiring). A kid another
    site registered meanwhile is :class:`Conflict`, as after it; a site removed meanwhile is
    :class:`NotFound`.
    """
    kid, alg = check_public_jwk(jwk)
    if status not in ("next", "active"):
        raise BadRequest(fields={"status": ["next or active"]})
    public = published(jwk)
    _lock_site(db, site)
    if _is_hub_kid(db, kid):
        raise Conflict("That kid is already registered.", code="kid_taken")
    for attempt in (1, 2):
        existing = db.scalar(select(SiteKey).where(SiteKey.kid == kid))
        if existing is not None:
            if existing.site_id != site.id or published(existing.jwk) != public:
                raise Conflict("That kid is already registered.", code="kid_taken")
            if existing.status == "retired":
                raise Conflict("That key was retired and cannot come back.",
                               code="kid_retired")
            if status == "active" and existing.status == "next":
                _activate(db, state, site, existing)
            return existing
        held = db.scalar(select(func.count()).select_from(SiteKey).where(
            SiteKey.site_id == site.id, SiteKey.status != "retired"))
        if (held or 0) >= MAX_KEYS_PER_SITE:
            raise Conflict(f"A site has at most {MAX_KEYS_PER_SITE} keys that are not retired; "
                           "retire one first.", code="too_many_keys")
        key = SiteKey(site_id=site.id, kid=kid, alg=alg, jwk=public, status="next",
                      created_at=state.clock())
        try:
            with db.begin_nested():
                db.add(key)
        except IntegrityError:  # another site registered this kid meanwhile: look again
            if attempt == 2:
                raise
            continue
        if status == "active":
            _activate(db, state, site, key)
        events.log(db, state, "key.registered", actor=site.site_key, site_key=site.site_key,
                   details={"kid": kid, "alg": alg, "status": key.status})
        return key
    raise AssertionError("unreachable")


def _lock_site(db: DBSession, site: Site) -> None:
    """Lock the site's row until the transaction ends (on PostgreSQL; SQLite's ``BEGIN
    IMMEDIATE`` serialises writers already), before any of its keys is read or written, in
    the order the console's forms and secret rotations take it. :class:`NotFound` when the
    site was removed meanwhile."""
    if db.scalar(select(Site.id).where(Site.id == site.id).with_for_update()) is None:
        raise NotFound(f"No site {site.site_key!r}.", code="site_not_found")


def _is_hub_kid(db: DBSession, kid: str) -> bool:
    """Whether ``kid`` is or was one of the hub's own keys, which share the JWKS with the
    members' (a verifier's cached copy may still hold a retired one)."""
    return db.scalar(select(HubKey.id).where(HubKey.kid == kid)) is not None


def _activate(db: DBSession, state: HubState, site: Site, key: SiteKey) -> None:
    for other in db.scalars(select(SiteKey).where(SiteKey.site_id == site.id,
                                                   SiteKey.status == "active")):
        if other.id != key.id:
            other.status = "retiring"  # still verifies the tokens it signed
    key.status = "active"


def retire(db: DBSession, state: HubState, site: Site, kid: str) -> None:
    """Take a key of the site out of the JWKS for good (the site's row locked first, as in
    :func:`register`, so an activation of the key at the same time cannot bring it back)."""
    _lock_site(db, site)
    key = db.scalar(select(SiteKey).where(SiteKey.kid == kid, SiteKey.site_id == site.id))
    if key is None:
        raise NotFound("No such key.", code="key_not_found")
    if key.status != "retired":
        key.status = "retired"
        key.retired_at = state.clock()
        events.log(db, state, "key.retired", actor=site.site_key, site_key=site.site_key,
                   details={"kid": kid})


def site_keys(db: DBSession, site: Site, include_retired: bool = False) -> list[SiteKey]:
    return site_keys_of(db, [site.id], include_retired).get(site.id, [])


def site_keys_of(db: DBSession, site_ids: t.Collection[int],
                 include_retired: bool = False) -> dict[int, list[SiteKey]]:
    """:func:`site_keys` of several sites in one query, by site id."""
    stmt = select(SiteKey).where(SiteKey.site_id.in_(site_ids))
    if not include_retired:
        stmt = stmt.where(SiteKey.status != "retired")
    found: dict[int, list[SiteKey]] = {}
    for key in db.scalars(stmt.order_by(SiteKey.site_id, SiteKey.created_at, SiteKey.id)):
        found.setdefault(key.site_id, []).append(key)
    return found


def ensure_hub_key(db: DBSession, state: HubState) -> HubKey:
    """The hub's active signing key, created on first use."""
    key = db.scalar(select(HubKey).where(HubKey.status == "active"))
    if key is None:
        key = _new_hub_key(db, state)
    return key


def _new_hub_key(db: DBSession, state: HubState) -> HubKey:
    kid, pem, jwk = new_hub_key()
    key = HubKey(kid=kid, alg="ES256", private_ciphertext=state.vault.encrypt(pem), jwk=jwk,
                 status="active", created_at=state.clock())
    db.add(key)
    db.flush()
    return key


def rotate_hub_key(db: DBSession, state: HubState) -> HubKey:
    """Make a new active hub key; the old one stays published for twice the cache lifetime."""
    now = state.clock()
    keep = dt.timedelta(seconds=2 * state.setting("JWKS_MAX_AGE"))
    for old in db.scalars(select(HubKey).where(HubKey.status == "active")):
        old.status = "retiring"
        old.retire_after = now + keep
    key = _new_hub_key(db, state)
    events.log(db, state, "hub_key.rotated", actor="hub", details={"kid": key.kid})
    return key


def retire_hub_keys(db: DBSession, state: HubState) -> int:
    now = state.clock()
    count = 0
    for key in db.scalars(select(HubKey).where(HubKey.status == "retiring",
                                                HubKey.retire_after <= now)):
        key.status = "retired"
        count += 1
    return count


def jwks(db: DBSession) -> tuple[str, str]:
    """The federation JWKS (every non-retired key of an active member, plus the hub's) as JSON
    text, and its ETag. A suspended site's keys leave it until the site is resumed."""
    member = db.execute(
        select(SiteKey.jwk, Site.site_key)
        .join(Site, Site.id == SiteKey.site_id)
        .where(SiteKey.status != "retired", Site.status == "active")
        .order_by(SiteKey.id)
    ).all()
    hub = db.scalars(select(HubKey.jwk).where(HubKey.status != "retired").order_by(HubKey.id))
    keys = [{**published(jwk), "hk_site": site_key} for jwk, site_key in member]
    keys += [{**jwk, "hk_site": "hub"} for jwk in hub]
    body = json.dumps({"keys": keys}, sort_keys=True, separators=(",", ":"))
    return body, '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'
