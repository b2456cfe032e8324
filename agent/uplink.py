"""Activity to the hub: this site's audit events, uploaded in signed batches (issue 5, item 5).

The activity log (``hk_audit``) is the buffer: nothing is copied aside. A cursor, the id of the
last event the hub acknowledged, lives in ``hk_federation_cache`` under the name ``uplink``
(``body = {"last_id": N}``). :func:`upload_pending` sends the events after the cursor, oldest
first, as one signed ``POST /api/v1/events`` per batch, and moves the cursor only once the hub
answered 2xx. While the hub is down (or refuses: a suspended site, a rotated secret) the cursor
stays where it is, so every event is sent later; a batch re-sent after a lost answer is harmless,
the hub keeps one copy per (site, event id).

Any number of job processes may run this at once. Uploading is claimed with a lease on the
cursor row: ``attempted_at`` is set by a conditional UPDATE (``attempted_at <= now - LEASE``),
renewed with each batch, and handed back when the run ends. A run the hub failed keeps the lease
until it expires, so a down hub is tried again every ``LEASE`` seconds, not on every tick.

Two more cases keep "nothing lost" true:

- On PostgreSQL ids come from a sequence and transactions can commit out of id order: event 11
  may be visible while event 10 is still uncommitted. The upload stops before a gap in the ids
  until the event after it is ``GAP_SETTLE`` old (a rolled-back transaction leaves a gap for
  good). SQLite serialises writers, so its ids have no such gaps.
- SQLite reuses ids once every row was pruned (a site quiet for longer than the retention): if
  the highest id is below the cursor, the cursor starts again from 0.

Events never hold secrets (:mod:`agent.events`); the raw User-Agent stays on the site (its
``device`` summary is sent), as do session ids.
"""

from __future__ import annotations

import datetime as dt
import logging
import typing as t

from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from .db import rowcount
from .federation import client
from .hub_client import HubUnavailable
from .hub_client import Reply
from .models import AuditEvent
from .models import FederationCache

if t.TYPE_CHECKING:
    from sqlalchemy import Row

    from .extension import State

log = logging.getLogger(__name__)

CURSOR = "uplink"
EVENTS_PATH = "/api/v1/events"
LEASE = dt.timedelta(seconds=30)  # longer than one batch (the hub client's timeout is 10 s)
GAP_SETTLE = dt.timedelta(seconds=60)
MAX_BATCHES = 20  # per run: a long backlog is sent over several runs
HUB_MAX_BATCH = 500  # the hub refuses larger batches
_RELEASED = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)  # a lease anyone may take

_COLUMNS = (
    AuditEvent.id,
    AuditEvent.created_at,
    AuditEvent.event,
    AuditEvent.outcome,
    AuditEvent.user_id,
    AuditEvent.login,
    AuditEvent.ip,
    AuditEvent.device,
    AuditEvent.details,
)


def upload_pending(state: State, *, batch: int = 200, max_batches: int = MAX_BATCHES) -> int:
    """Send the events the hub has not acknowledged yet; returns how many it acknowledged.

    Returns 0 without a write when the site is not federated, nothing is pending, or another
    process holds the upload. Stops at the first refusal or when the hub is unreachable
    (nothing is lost: the cursor does not move), and after ``max_batches`` batches.
    """
    if not state.settings.federated:
        return 0
    size = max(1, min(batch, HUB_MAX_BATCH))
    if not _pending(state):
        return 0
    lease = _claim(state)
    if lease is None:
        return 0
    held: dt.datetime | None = lease[0]  # the lease's stamp while it is ours
    cursor = lease[1]
    hub = client(state)
    sent = 0
    try:
        for _ in range(max_batches):
            assert held is not None
            rows = _settled(state, cursor, _read(state, cursor, size))
            if not rows:
                if not (cursor and _ids_restarted(state, cursor)):
                    break
                log.warning("uplink: the activity log's ids restarted below #%d; uploading "
                            "from the start", cursor)
                cursor = 0
                held = _advance(state, held, cursor)
                if held is None:
                    break
                continue
            try:
                reply = hub.call("POST", EVENTS_PATH, {"events": [_item(row) for row in rows]})
            except HubUnavailable as exc:
                if exc.status == 413 and len(rows) > 1:
                    size = max(1, len(rows) // 2)  # the hub takes smaller bodies: halve
                    continue
                log.warning("uplink: %d event(s) after #%d not uploaded (%s); retrying in %ds",
                            len(rows), cursor, exc, LEASE.total_seconds())
                _back_off(state, held)
                held = None
                break
            sent += len(rows)
            cursor = rows[-1].id
            log.debug("uplink: %d event(s) up to #%d sent, %s new at the hub", len(rows), cursor,
                      _accepted(reply))
            held = _advance(state, held, cursor)
            if held is None:
                log.warning("uplink: lease lost after #%d; another process goes on", cursor)
                break
    finally:
        if held is not None:
            _release(state, held)
    return sent


def cursor_of(state: State) -> int:
    """The id of the last event the hub acknowledged (0 before the first upload)."""
    with state.engine.connect().execution_options(hk_readonly=True) as conn:
        body = conn.execute(
            select(FederationCache.body).where(FederationCache.name == CURSOR)
        ).scalar()
    return _last_id(body)


def _last_id(body: t.Any) -> int:
    value = body.get("last_id") if isinstance(body, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _pending(state: State) -> bool:
    """Is there anything to do (events after the cursor, and no lease held)? Read-only."""
    now = state.clock()
    with state.engine.connect().execution_options(hk_readonly=True) as conn:
        row = conn.execute(
            select(FederationCache.body, FederationCache.attempted_at)
            .where(FederationCache.name == CURSOR)
        ).one_or_none()
        newest = conn.execute(select(func.max(AuditEvent.id))).scalar()
    if newest is None:
        return False
    if row is None:
        return True
    if row.attempted_at > now - LEASE:
        return False  # another process is uploading, or the last attempt failed: wait
    return int(newest) != _last_id(row.body)


def _claim(state: State) -> tuple[dt.datetime, int] | None:
    """Take the upload lease; returns its stamp and the cursor, or None if someone holds it."""
    now = state.clock()
    with state.session_factory() as db:
        if db.get(FederationCache, CURSOR) is None:
            db.add(FederationCache(name=CURSOR, body={"last_id": 0}, etag="",
                                   fetched_at=_RELEASED, attempted_at=_RELEASED))
            try:
                db.commit()
            except IntegrityError:
                db.rollback()  # another process made it first
        claimed = rowcount(db.execute(
            update(FederationCache)
            .where(FederationCache.name == CURSOR, FederationCache.attempted_at <= now - LEASE)
            .values(attempted_at=now)
        ))
        body = db.execute(
            select(FederationCache.body).where(FederationCache.name == CURSOR)
        ).scalar()
        db.commit()
    return (now, _last_id(body)) if claimed == 1 else None


def _read(state: State, cursor: int, size: int) -> list[Row[t.Any]]:
    stmt = select(*_COLUMNS).where(AuditEvent.id > cursor).order_by(AuditEvent.id).limit(size)
    with state.engine.connect().execution_options(hk_readonly=True) as conn:
        return list(conn.execute(stmt).all())


def _settled(state: State, cursor: int, rows: list[Row[t.Any]]) -> list[Row[t.Any]]:
    """The rows up to the first young gap in the ids (an event perhaps not yet committed)."""
    horizon = state.clock() - GAP_SETTLE
    previous = cursor
    for index, row in enumerate(rows):
        if row.id != previous + 1 and row.created_at > horizon:
            if index == 0:
                log.info("uplink: waiting for event #%d before #%d", previous + 1, row.id)
            return rows[:index]
        previous = row.id
    return rows


def _ids_restarted(state: State, cursor: int) -> bool:
    with state.engine.connect().execution_options(hk_readonly=True) as conn:
        newest = conn.execute(select(func.max(AuditEvent.id))).scalar()
    return newest is not None and int(newest) < cursor


def _item(row: Row[t.Any]) -> dict[str, t.Any]:
    """One event as the hub's ``POST /api/v1/events`` takes it."""
    return {
        "id": str(row.id),
        "time": row.created_at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
        "event": row.event,
        "outcome": row.outcome,
        "user_id": row.user_id,
        "login": row.login,
        "ip": row.ip,
        "device": row.device,
        "details": row.details if isinstance(row.details, dict) else {},
    }


def _accepted(reply: Reply) -> t.Any:
    return (reply.object() or {}).get("accepted")


def _advance(state: State, stamp: dt.datetime, cursor: int) -> dt.datetime | None:
    """Move the cursor and renew the lease, if it is still ours; returns the new stamp."""
    now = max(state.clock(), stamp)
    with state.session_factory() as db:
        moved = rowcount(db.execute(
            update(FederationCache)
            .where(FederationCache.name == CURSOR, FederationCache.attempted_at == stamp)
            .values(body={"last_id": cursor}, fetched_at=now, attempted_at=now)
        ))
        db.commit()
    return now if moved == 1 else None


def _set_lease(state: State, stamp: dt.datetime, value: dt.datetime) -> None:
    with state.session_factory() as db:
        db.execute(
            update(FederationCache)
            .where(FederationCache.name == CURSOR, FederationCache.attempted_at == stamp)
            .values(attempted_at=value)
        )
        db.commit()


def _release(state: State, stamp: dt.datetime) -> None:
    """Hand the lease back: the next run, here or elsewhere, may start at once."""
    _set_lease(state, stamp, _RELEASED)


def _back_off(state: State, stamp: dt.datetime) -> None:
    """Keep the lease from now on: the next attempt is ``LEASE`` after this failure."""
    _set_lease(state, stamp, max(state.clock(), stamp))
