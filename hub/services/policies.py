"""Member site policies: versioned settings the hub manages for each site (agent.policy).

Every change is checked with the agent's own rules (:func:`agent.policy.validate`: one copy of
the rules) and stored as a new version with who, when and a note; nothing is ever updated in
place, so the history is complete and a rollback is a new version equal to an old one. The
newest version goes to the site in its signed directory; the agent applies it and reports the
version it applied and the keys it pins (hub.services.health).

Webhook secrets are generated here, shown once to the admin, and kept encrypted with the hub's
vault (``secret_enc``); they leave the hub only inside the site's own signed directory.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import typing as t

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession

from agent import policy as agent_policy

from ..errors import BadRequest
from ..errors import Conflict
from ..errors import NotFound
from ..models import Site
from ..models import SitePolicy
from ..models import WebhookRedelivery
from . import events

if t.TYPE_CHECKING:
    from ..state import HubState

REDACTED = "whsec_…"
REDELIVER_KEEP = dt.timedelta(hours=24)
MAX_NOTE = 200


class PolicyRefused(BadRequest):
    """A change fails the agent's checks: ``fields`` holds a message per setting."""

    code = "invalid_policy"
    message = "Some settings have values a site would refuse; nothing was saved."


def current(db: DBSession, site: Site) -> SitePolicy | None:
    """The newest version of ``site``'s policy (None: the hub has set nothing yet)."""
    return db.scalar(select(SitePolicy).where(SitePolicy.site_id == site.id)
                     .order_by(SitePolicy.version.desc()).limit(1))


def history(db: DBSession, site: Site) -> list[SitePolicy]:
    return list(db.scalars(select(SitePolicy).where(SitePolicy.site_id == site.id)
                           .order_by(SitePolicy.version.desc())))


def version(db: DBSession, site: Site, number: int) -> SitePolicy:
    row = db.scalar(select(SitePolicy).where(SitePolicy.site_id == site.id,
                                             SitePolicy.version == number))
    if row is None:
        raise NotFound("No such version of this site's settings.")
    return row


def plain(state: HubState, stored: dict[str, t.Any]) -> dict[str, t.Any]:
    """Stored settings with webhook secrets decrypted (for the directory and for checks)."""
    out = dict(stored)
    if "WEBHOOKS" in out:
        out["WEBHOOKS"] = [
            {k: v for k, v in hook.items() if k != "secret_enc"}
            | {"secret": state.vault.decrypt(hook["secret_enc"].encode()).decode()}
            for hook in out["WEBHOOKS"]
        ]
    return out


def _sealed(state: HubState, settings: dict[str, t.Any]) -> dict[str, t.Any]:
    out = dict(settings)
    if "WEBHOOKS" in out:
        out["WEBHOOKS"] = [
            {k: v for k, v in hook.items() if k != "secret"}
            | {"secret_enc": state.vault.encrypt(hook["secret"].encode()).decode()}
            for hook in out["WEBHOOKS"]
        ]
    return out


def redacted(stored: dict[str, t.Any]) -> dict[str, t.Any]:
    """Settings as pages and the event log show them: webhook secrets left out."""
    out = dict(stored)
    if "WEBHOOKS" in out:
        out["WEBHOOKS"] = [{k: v for k, v in hook.items() if k not in ("secret", "secret_enc")}
                           for hook in out["WEBHOOKS"]]
    return out


def settings_of(state: HubState, row: SitePolicy | None) -> dict[str, t.Any]:
    return plain(state, row.settings) if row is not None else {}


def diff(before: dict[str, t.Any], after: dict[str, t.Any]) -> dict[str, dict[str, t.Any]]:
    """``{key: {"from": old, "to": new}}`` for every key that differs (secrets left out)."""
    b, a = redacted(before), redacted(after)
    return {key: {"from": b.get(key), "to": a.get(key)}
            for key in sorted(set(b) | set(a)) if b.get(key) != a.get(key)}


def save(db: DBSession, state: HubState, site: Site, changes: dict[str, t.Any], *, actor: str,
         note: str = "", replace: bool = False) -> SitePolicy | None:
    """A new version with ``changes`` applied (a value of None removes that key, so the site's
    own value applies again); ``replace`` takes ``changes`` as the whole policy.

    Checked with the agent's rules first: a bad value raises :class:`PolicyRefused` and nothing
    is written. Returns None when nothing would change. The caller commits.
    """
    row = current(db, site)
    before = settings_of(state, row)
    wanted = {} if replace else dict(before)
    for key, value in changes.items():
        if value is None:
            wanted.pop(key, None)
        else:
            wanted[key] = value
    try:
        checked = agent_policy.validate(wanted)
    except agent_policy.PolicyError as exc:
        raise PolicyRefused(fields={k: [v] for k, v in exc.fields.items()}) from None
    if checked == before:
        return None
    if not isinstance(note, str) or len(note) > MAX_NOTE or not note.isprintable():
        raise PolicyRefused(fields={"note": [f"Up to {MAX_NOTE} printable characters."]})
    new = SitePolicy(site_id=site.id, version=(row.version if row else 0) + 1,
                     settings=_sealed(state, checked), created_at=state.clock(),
                     created_by=actor[:120], note=note.strip())
    db.add(new)
    try:
        db.flush()
    except IntegrityError:  # another admin saved a version of this site meanwhile
        db.rollback()
        raise Conflict("This site's settings were changed meanwhile; reload and try again."
                       ) from None
    events.log(db, state, "policy.updated", actor=actor, site_key=site.site_key,
               details={"version": new.version, "note": new.note,
                        "changed": diff(before, checked)})
    return new


def rollback(db: DBSession, state: HubState, site: Site, number: int, *,
             actor: str) -> SitePolicy | None:
    """A new version equal to version ``number`` (None if that is already in force)."""
    old = version(db, site, number)
    return save(db, state, site, settings_of(state, old), actor=actor,
                note=f"rollback to version {number}", replace=True)


def for_directory(db: DBSession, state: HubState, site: Site) -> dict[str, t.Any]:
    """``{"version", "settings"}`` for the site's directory (version 0: nothing set)."""
    row = current(db, site)
    if row is None:
        return {"version": 0, "settings": {}}
    return {"version": row.version, "settings": plain(state, row.settings)}


# --- webhooks ----------------------------------------------------------------------------------


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def add_webhook(db: DBSession, state: HubState, site: Site, url: str, events_: list[str], *,
                actor: str) -> tuple[SitePolicy, str]:
    """Add a webhook endpoint with a fresh secret; returns the version and the secret (shown
    once)."""
    hooks = list(settings_of(state, current(db, site)).get("WEBHOOKS", []))
    secret = new_webhook_secret()
    endpoint_id = "wh_" + secrets.token_hex(6)
    hooks.append({"id": endpoint_id, "url": url, "secret": secret, "events": events_})
    try:
        row = save(db, state, site, {"WEBHOOKS": hooks}, actor=actor,
                   note=f"webhook {endpoint_id} added")
    except PolicyRefused as exc:
        raise PolicyRefused(exc.message, fields=_webhook_fields(exc.fields or {}, len(hooks) - 1)
                            ) from None
    assert row is not None
    return row, secret


def _webhook_fields(fields: dict[str, list[str]], index: int) -> dict[str, list[str]]:
    """Messages of the new endpoint, by form field (``url``, ``events``)."""
    out: dict[str, list[str]] = {}
    for messages in fields.values():
        for message in messages:
            name = "events" if ".events" in message else "url"
            text = message.split(": ", 1)[-1]
            out.setdefault(name, []).append(text)
    return out or {"url": ["Not accepted."]}


def remove_webhook(db: DBSession, state: HubState, site: Site, endpoint_id: str, *,
                   actor: str) -> SitePolicy | None:
    hooks = list(settings_of(state, current(db, site)).get("WEBHOOKS", []))
    kept = [h for h in hooks if h.get("id") != endpoint_id]
    if len(kept) == len(hooks):
        raise NotFound("No such webhook endpoint.")
    return save(db, state, site, {"WEBHOOKS": kept}, actor=actor,
                note=f"webhook {endpoint_id} removed")


def request_redelivery(db: DBSession, state: HubState, site: Site, message_id: str, *,
                       actor: str) -> WebhookRedelivery:
    """Ask the site to deliver a message again (it does at its next directory refresh)."""
    if not message_id or len(message_id) > 64 or not message_id.isprintable():
        raise BadRequest("Not a webhook message id.")
    now = state.clock()
    row = WebhookRedelivery(site_id=site.id, message_id=message_id, requested_at=now,
                            requested_by=actor[:120], expires_at=now + REDELIVER_KEEP)
    db.add(row)
    events.log(db, state, "webhook.redeliver_requested", actor=actor, site_key=site.site_key,
               details={"message_id": message_id})
    db.flush()
    return row


def redeliveries(db: DBSession, state: HubState, site: Site) -> list[dict[str, t.Any]]:
    """The site's redelivery requests of the last 24 h, for its directory."""
    rows = db.scalars(select(WebhookRedelivery).where(
        WebhookRedelivery.site_id == site.id, WebhookRedelivery.expires_at > state.clock())
        .order_by(WebhookRedelivery.id))
    return [{"id": r.id, "message_id": r.message_id} for r in rows]
