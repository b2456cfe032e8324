"""The federation's activity log: the hub's own events and batches uploaded by sites."""

from __future__ import annotations

import datetime as dt
import typing as t

from flask import has_request_context
from sqlalchemy import delete
from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from agent.db import insert_for
from agent.db import rowcount
from agent.text import holds_controls

from ..errors import BadRequest
from ..models import Event
from ..state import client_ip

if t.TYPE_CHECKING:
    from ..state import HubState

MAX_BATCH = 500


def log(
    db: DBSession,
    state: HubState,
    event: str,
    *,
    outcome: str = "success",
    actor: str = "",
    site_key: str | None = None,
    ip: str = "",
    details: dict[str, t.Any] | None = None,
) -> None:
    """Add one hub event to the caller's transaction. Never pass a secret in ``details``.

    Without ``ip``, an event logged while answering a request gets the client's address.
    """
    if not ip and has_request_context():
        ip = client_ip()
    db.add(
        Event(
            created_at=state.clock(),
            source="hub",
            site_key=site_key,
            event=event,
            outcome=outcome,
            actor=actor[:120],
            ip=ip[:64],
            details=dict(details or {}),
        )
    )


def utc_time(value: str) -> dt.datetime:
    """A site's ISO 8601 time as aware UTC (a time without an offset is UTC).

    :class:`ValueError` for anything else, also for a time whose UTC instant falls outside
    years 1 to 9999 (``0001-01-01T00:00:00+14:00``): no column can store that.
    """
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("outside the UTC calendar") from None


def _clean(value: str, limit: int) -> str:
    """A site's text as stored: without control characters (PostgreSQL cannot store NUL, and
    the console shows these values), at most ``limit`` characters."""
    if holds_controls(value):
        value = "".join(c for c in value if not holds_controls(c))
    return value[:limit]


def _text(item: dict[str, t.Any], key: str, limit: int) -> str:
    value = item.get(key, "")
    return _clean(value, limit) if isinstance(value, str) else ""


def upload(db: DBSession, state: HubState, site_key: str, items: t.Any) -> int:
    """Store a site's batch of audit events; re-sent events (same ``id``) are skipped.

    Returns how many were new. Raises :class:`BadRequest` for a malformed batch (nothing stored).
    """
    if not isinstance(items, list) or len(items) > MAX_BATCH:
        raise BadRequest(fields={"events": [f"A list of at most {MAX_BATCH} events."]})
    rows = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), (str, int)):
            raise BadRequest(fields={f"events[{index}]": ["An object with an id."]})
        event = _text(item, "event", 48)
        if not event:
            raise BadRequest(fields={f"events[{index}].event": ["Required."]})
        try:
            at = utc_time(str(item.get("time", "")))
        except ValueError:
            raise BadRequest(fields={f"events[{index}].time": ["ISO 8601 time."]}) from None
        details = dict(item["details"]) if isinstance(item.get("details"), dict) else {}
        raw_user = item.get("user_id")
        user_id = _clean(str(raw_user), 64) if isinstance(raw_user, (int, str)) and not isinstance(
            raw_user, bool) else ""
        login = _text(item, "login", 120)
        if user_id and login:
            details.setdefault("user_id", user_id)  # the actor column shows the login
        device = _text(item, "device", 128)
        if device:
            details["device"] = device
        rows.append(
            {
                "created_at": at,
                "source": "site",
                "site_key": site_key,
                "remote_id": _clean(str(item["id"]), 64),
                "event": event,
                "outcome": _text(item, "outcome", 16),
                # A site's user ids mean nothing at the hub: its login names do.
                "actor": login or user_id,
                "ip": _text(item, "ip", 64),
                "details": details,
            }
        )
    if not rows:
        return 0
    stmt = insert_for(db.get_bind().dialect.name)(Event).values(rows).on_conflict_do_nothing(
        index_elements=["site_key", "remote_id"]
    )
    # RETURNING, not rowcount: PostgreSQL (psycopg 3) reports -1 for this multi-row INSERT.
    return len(db.execute(stmt.returning(Event.id)).all())


def query(
    db: DBSession,
    *,
    site_key: str | None = None,
    event: str | None = None,
    outcome: str | None = None,
    before: int | None = None,
    limit: int = 50,
) -> tuple[list[Event], int | None]:
    """A page of events, newest first, and the id to pass as ``before`` for the next page."""
    stmt = select(Event)
    if site_key:
        stmt = stmt.where(Event.site_key == site_key)
    if event:
        stmt = stmt.where(Event.event == event)
    if outcome:
        stmt = stmt.where(Event.outcome == outcome)
    if before:
        stmt = stmt.where(Event.id < before)
    rows = list(db.scalars(stmt.order_by(Event.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, rows[-1].id if more and rows else None


def prune(db: DBSession, state: HubState, days: int | None = None) -> int:
    """Delete events older than ``days`` (default ``EVENT_RETENTION_DAYS``); returns how many."""
    days = state.setting("EVENT_RETENTION_DAYS") if days is None else days
    cutoff = state.clock() - dt.timedelta(days=days)
    return rowcount(db.execute(delete(Event).where(Event.created_at < cutoff)))
