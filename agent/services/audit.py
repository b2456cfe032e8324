"""Reading and pruning the activity log (``hk_audit``).

Pages go newest first; the cursor is the opaque id of the last row of the previous page, so a
page is one index range scan however deep the caller pages, and rows arriving meanwhile never
shift a page.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import typing as t
from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from ..db import MAX_ID
from ..db import rowcount
from ..errors import ValidationFailed
from ..models import AuditEvent

MAX_PAGE = 500


@dataclass(frozen=True)
class Filters:
    user_id: int | None = None
    event: str | None = None
    outcome: str | None = None
    ip: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None


def parse_filters(args: t.Mapping[str, str]) -> tuple[Filters, int, int | None]:
    """Filters, page size and cursor from query parameters; 400 naming every bad one."""
    errors: dict[str, list[str]] = {}

    def timestamp(name: str) -> dt.datetime | None:
        value = args.get(name)
        if not value:
            return None
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            errors[name] = ["An ISO 8601 time, e.g. 2026-01-31T12:00:00Z."]
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)

    user_id = None
    if args.get("user"):
        user_id = _whole_number(args["user"])
        if user_id is None:
            errors["user"] = ["A user ID (integer)."]
    limit = 50
    if args.get("limit"):
        asked = _whole_number(args["limit"])
        if asked is not None and 1 <= asked <= MAX_PAGE:
            limit = asked
        else:
            errors["limit"] = [f"An integer from 1 to {MAX_PAGE}."]
    cursor = None
    if args.get("cursor"):
        cursor = decode_cursor(args["cursor"])
        if cursor is None:
            errors["cursor"] = ["Not a cursor returned by this API."]
    for name in ("event", "outcome", "ip"):
        if len(args.get(name, "")) > 64:
            errors[name] = ["At most 64 characters."]
    filters = Filters(
        user_id=user_id,
        event=args.get("event") or None,
        outcome=args.get("outcome") or None,
        ip=args.get("ip") or None,
        since=timestamp("since"),
        until=timestamp("until"),
    )
    if errors:
        raise ValidationFailed(fields=errors)
    return filters, limit, cursor


def _whole_number(value: str) -> int | None:
    """``value`` as an id: ASCII digits only, at most ``MAX_ID``; else None."""
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        return None
    number = int(value)
    return number if number <= MAX_ID else None


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"a{last_id}".encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return _whole_number(raw[1:]) if raw.startswith("a") else None


def query(
    db: DBSession, filters: Filters, limit: int = 50, cursor: int | None = None
) -> tuple[list[AuditEvent], str | None]:
    """One page of events matching ``filters``, newest first, and the next page's cursor."""
    stmt = select(AuditEvent)
    if filters.user_id is not None:
        stmt = stmt.where(AuditEvent.user_id == filters.user_id)
    if filters.event:
        stmt = stmt.where(AuditEvent.event == filters.event)
    if filters.outcome:
        stmt = stmt.where(AuditEvent.outcome == filters.outcome)
    if filters.ip:
        stmt = stmt.where(AuditEvent.ip == filters.ip)
    if filters.since:
        stmt = stmt.where(AuditEvent.created_at >= filters.since)
    if filters.until:
        stmt = stmt.where(AuditEvent.created_at < filters.until)
    if cursor is not None:
        stmt = stmt.where(AuditEvent.id < cursor)
    rows = list(db.scalars(stmt.order_by(AuditEvent.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].id) if more and rows else None


def as_dict(row: AuditEvent) -> dict[str, t.Any]:
    return {
        "id": row.id,
        "time": row.created_at.isoformat().replace("+00:00", "Z"),
        "event": row.event,
        "outcome": row.outcome,
        "user_id": row.user_id,
        "login": row.login,
        "session_id": row.session_id,
        "ip": row.ip,
        "user_agent": row.user_agent,
        "device": row.device,
        "details": row.details,
    }


def prune(db: DBSession, older_than: dt.datetime) -> int:
    """Delete events older than ``older_than``; returns how many (idempotent across workers)."""
    return rowcount(db.execute(delete(AuditEvent).where(AuditEvent.created_at < older_than)))
