"""Scheduled rotation (DESIGN §6): the access-token key, the SSO key and the hub secret.

The access-token key is local (:mod:`agent.services.keystore`). The other two go through the
hub, one step per run of the job, each step idempotent so a run that fails (the hub down, the
process killed) is simply taken up by the next:

SSO key
    1. due: claim the current key and store a successor, not yet published;
    2. publish it to the hub as ``next``; it signs once every peer's directory has it
       (:func:`sso_publish_delay`), and the current key verifies until its last assertion expires;
    3. once it signs, tell the hub it is ``active`` (the hub marks the old one ``retiring``);
    4. once the old key's last assertion has expired, retire it at the hub; pruning deletes it.

Hub secret
    due: claim the newest secret, ask the hub for a new one (signed with the current one), store
    it. Calls to the hub use it at once (the hub accepts old and new during its grace period);
    SSO signatures, which peers check with pairwise keys from their cached directory, switch to
    it only after :func:`sso_publish_delay`.
"""

from __future__ import annotations

import datetime as dt
import logging
import typing as t

from sqlalchemy import update

from . import events
from .config import parse_hub_secret
from .db import rowcount
from .federation import client
from .hub_client import HubUnavailable
from .models import StoredKey
from .services import keystore
from .services.keystore import FEDERATION
from .services.keystore import HUB_SECRET
from .services.keystore import RELOAD

MAX_GRACE = 30 * 86400
"""The longest grace a hub grants (its console's limit); a longer one in a reply is cut to it."""

if t.TYPE_CHECKING:
    from flask import Flask

    from .config import Settings
    from .extension import State

log = logging.getLogger(__name__)

JOB_ID = "headlesskey.rotate_keys"


def sso_publish_delay(settings: Settings) -> dt.timedelta:
    """How long peers need to learn a new SSO key or secret: two directory refreshes."""
    return dt.timedelta(seconds=2 * settings.directory_refresh + 2 * RELOAD)


def sso_retire_after(settings: Settings) -> dt.timedelta:
    """How long a superseded SSO key still verifies: the life of its last assertion."""
    return dt.timedelta(seconds=settings.sso_assertion_ttl + settings.leeway + 2 * RELOAD)


def job_interval(settings: Settings) -> float:
    """How often the rotation job looks: often enough for the shortest period, at most 60 s."""
    periods = [settings.key_rotation]
    if settings.federated:
        periods += [settings.federation_key_rotation, settings.hub_secret_rotation,
                    settings.directory_refresh]
    enabled = [p for p in periods if p > 0]
    return max(1.0, min([60.0, *(p / 4 for p in enabled)]))


def rotate_federation_key(state: State, *, force: bool = False) -> list[str]:
    """One pass of the SSO key's rotation; returns what it did (for logs and the CLI)."""
    store, s = state.keys, state.settings
    done: list[str] = []
    now = state.clock()
    store.reload()
    entries = store.entries(FEDERATION)
    current = store.newest(FEDERATION)
    pending = [e for e in entries if e.active_from is None]
    if not pending and current is not None and (
            force or keystore.rotation_due(current, s.federation_key_rotation,
                                           sso_publish_delay(s), now)):
        key, material = keystore.new_material(current.key.alg if current.key else "ES256")
        with store.session() as db:
            if keystore.claim(db, current, now):
                db.add(StoredKey(purpose=FEDERATION, kid=key.kid, alg=key.alg,
                                 material=store.encrypt(material), created_at=now,
                                 active_from=None, hub_status=""))
                db.commit()
                done.append(f"new SSO key {key.kid}")
                record_rotation(state, "federation", key.kid)
        store.reload()
        entries = store.entries(FEDERATION)
    hub = client(state)
    for entry in entries:
        assert entry.key is not None and entry.key.public_jwk is not None
        if entry.active_from is None:  # 2. publish, then schedule the switch
            hub.register_key(entry.key.public_jwk, "next")
            starts = state.clock() + sso_publish_delay(s)
            with store.session() as db:
                scheduled = rowcount(db.execute(
                    update(StoredKey).where(StoredKey.id == entry.id,
                                            StoredKey.active_from.is_(None))
                    .values(active_from=starts, hub_status="next")))
                if scheduled:  # (another process may have done it meanwhile)
                    db.execute(update(StoredKey).where(StoredKey.purpose == FEDERATION,
                                                       StoredKey.retire_at.is_(None),
                                                       StoredKey.id != entry.id,
                                                       StoredKey.active_from.is_not(None))
                               .values(retire_at=starts + sso_retire_after(s)))
                db.commit()
            if scheduled:
                done.append(f"SSO key {entry.kid} published; signs from {starts:%H:%M:%S}")
    store.reload()
    signer = store.signing(FEDERATION)
    now = state.clock()
    for entry in store.entries(FEDERATION):
        assert entry.key is not None and entry.key.public_jwk is not None
        if signer is not None and entry.id == signer.id and entry.hub_status == "next":
            hub.register_key(entry.key.public_jwk, "active")  # 3.
            _set_hub_status(state, entry.id, "active")
            done.append(f"SSO key {entry.kid} active")
    with store.session() as db:  # 4. rows past retire_at are no longer in the store's copy
        leaving = db.query(StoredKey).filter(
            StoredKey.purpose == FEDERATION, StoredKey.retire_at <= now,
            StoredKey.hub_status != "retired").all()
        kids = [(row.id, row.kid) for row in leaving]
    for row_id, kid in kids:
        try:
            hub.retire_key(kid)
        except HubUnavailable as exc:
            if exc.status != 404:  # a key the hub no longer has is retired already
                raise
        _set_hub_status(state, row_id, "retired")
        done.append(f"SSO key {kid} retired")
    store.reload()
    return done


def _set_hub_status(state: State, row_id: int, status: str) -> None:
    with state.keys.session() as db:
        db.execute(update(StoredKey).where(StoredKey.id == row_id).values(hub_status=status))
        db.commit()


def rotate_hub_secret(state: State, *, force: bool = False) -> list[str]:
    """Rotate the hub secret when due (or ``force``); returns what it did."""
    store, s = state.keys, state.settings
    now = state.clock()
    store.reload()
    newest = max(store.entries(HUB_SECRET), key=lambda e: e.id, default=None)
    if newest is None:
        return []
    due = s.hub_secret_rotation > 0 and now - newest.created_at >= dt.timedelta(
        seconds=s.hub_secret_rotation)
    if not (force or due):
        return []
    with store.session() as db:
        if not keystore.claim(db, newest, now):
            return []
        db.commit()
    try:
        reply = client(state).rotate_secret()
        secret = parse_hub_secret("the hub's new secret", str(reply.get("secret", "")))
    except (HubUnavailable, ValueError, TypeError) as exc:
        with store.session() as db:  # let the next run try again
            db.execute(update(StoredKey).where(StoredKey.id == newest.id).values(rotated_at=None))
            db.commit()
        log.warning("hub secret not rotated: %s", exc)
        return []
    grace = _grace(reply.get("grace_seconds"))
    now = state.clock()
    # SSO keeps the old secret until peers have the new pairwise keys, if the grace allows.
    starts = now + min(sso_publish_delay(s), grace / 2)
    with store.session() as db:
        db.execute(update(StoredKey).where(StoredKey.purpose == HUB_SECRET,
                                           StoredKey.retire_at.is_(None))
                   .values(retire_at=now + grace))
        db.add(StoredKey(purpose=HUB_SECRET, kid=keystore.hub_secret_kid(secret), alg="",
                         material=store.encrypt(secret), created_at=now, active_from=starts,
                         hub_status=""))
        db.commit()
    store.reload()
    record_rotation(state, "hub_secret", None)
    return ["hub secret rotated"]


def _grace(value: object) -> dt.timedelta:
    """How long the hub keeps the old secret, from its reply: at most :data:`MAX_GRACE`, and none
    for a negative value or anything but a number. The hub has rotated already, so a bad grace
    must not cost the new secret."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return dt.timedelta(0)  # NaN is not > 0
    return dt.timedelta(seconds=min(value, MAX_GRACE))


def record_rotation(state: State, key: str, kid: str | None) -> None:
    """The activity-log row (and webhook messages) of one rotation: ``key.rotated``."""
    details: dict[str, t.Any] = {"key": key}
    if kid:
        details["kid"] = kid
    with state.session_factory() as db:
        events.record(db, state, "key.rotated", outcome="info", details=details)
        db.commit()


def rotate(state: State, *, force: t.Iterable[str] = ()) -> list[str]:
    """Every rotation that is due (or forced: "access", "federation", "hub-secret")."""
    forced = set(force)
    done: list[str] = []
    if "access" in forced:
        key = keystore.rotate_local(state.keys)
        done.append(f"new access-token key {key.kid}" if key else "access-token key: rotating")
    else:
        key = keystore.rotate_local_if_due(state.keys)
        if key:
            done.append(f"new access-token key {key.kid}")
    if key:
        record_rotation(state, "access", key.kid)
    if state.settings.federated:
        try:
            done += rotate_hub_secret(state, force="hub-secret" in forced)
            done += rotate_federation_key(state, force="federation" in forced)
        except HubUnavailable as exc:
            log.warning("rotation: the hub is unavailable (%s); will retry", exc)
            done.append(f"hub unavailable: {exc}")
    for line in done:
        log.info("rotation: %s", line)
    return done


def rotate_job(app: Flask) -> list[str]:
    """The scheduled job: :func:`rotate` inside the app's context."""
    from .extension import get_state

    with app.app_context():
        return rotate(get_state(app))
