"""Reading and pruning the activity log (``hk_audit``).

Pages go newest first, by time (``created_at``, then ``id``); the cursor is the opaque position
of the last row of the previous page, so a page is one index range scan however deep the
caller pages and whatever the filters, and rows arriving meanwhile never shift a page.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import typing as t
from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy import select
from sqlalchemy import tuple_
from sqlalchemy.orm import Session as DBSession

from ..db import MAX_ID
from ..db import rowcount
from ..errors import ValidationFailed
from ..models import AuditEvent
from ..text import canonical_address
from ..text import holds_controls

MAX_PAGE = 500


@dataclass(frozen=True)
class Filters:
    user_id: int | None = None
    event: str | None = None
    outcome: str | None = None
    ip: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None


def parse_filters(args: t.Mapping[str, str]) -> tuple[Filters, int, Cursor | None]:
    """Filters, page size and cursor from query parameters; 400 naming every bad one."""
    errors: dict[str, list[str]] = {}

    def timestamp(name: str) -> dt.datetime | None:
        value = args.get(name)
        if not value:
            return None
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            # In UTC, as stored: OverflowError for an instant before year 1 or after 9999.
            return parsed.astimezone(dt.UTC) if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
        except (ValueError, OverflowError):
            errors[name] = ["An ISO 8601 time, e.g. 2026-01-31T12:00:00Z."]
            return None

    user_id = None
    if args.get("user"):
        user_id = whole_number(args["user"])
        if user_id is None:
            errors["user"] = ["A user ID (integer)."]
    limit, cursor = page_args(args, errors, default=50, maximum=MAX_PAGE, decode=decode_cursor)
    for name in ("event", "outcome", "ip"):
        if len(args.get(name, "")) > 64:
            errors[name] = ["At most 64 characters."]
        elif holds_controls(args.get(name, "")):
            errors[name] = ["No control characters."]
    filters = Filters(
        user_id=user_id,
        event=args.get("event") or None,
        outcome=args.get("outcome") or None,
        ip=canonical_address(args["ip"]) if args.get("ip") else None,
        since=timestamp("since"),
        until=timestamp("until"),
    )
    if errors:
        raise ValidationFailed(fields=errors)
    return filters, limit, cursor


C = t.TypeVar("C")


def page_args(args: t.Mapping[str, str], errors: dict[str, list[str]], *, default: int,
              maximum: int, decode: t.Callable[[str], C | None]) -> tuple[int, C | None]:
    """A list's ``limit`` (1 to ``maximum``; ``default`` when absent) and ``cursor`` (read by
    ``decode``, which answers None for anything it did not make) from query parameters; each
    bad one is named in ``errors``."""
    limit = default
    if args.get("limit"):
        asked = whole_number(args["limit"])
        if asked is not None and 1 <= asked <= maximum:
            limit = asked
        else:
            errors["limit"] = [f"An integer from 1 to {maximum}."]
    cursor = None
    if args.get("cursor"):
        cursor = decode(args["cursor"])
        if cursor is None:
            errors["cursor"] = ["Not a cursor returned by this API."]
    return limit, cursor


def whole_number(value: str) -> int | None:
    """``value`` as an id: ASCII digits only, at most ``MAX_ID``; else None."""
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        return None
    number = int(value)
    return number if number <= MAX_ID else None


@dataclass(frozen=True)
class Cursor:
    """Where the previous page ended: its last row's time and id (time None: a cursor of the
    earlier id-only form, whose time is read from that row)."""

    id: int
    time: dt.datetime | None = None


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICRO = dt.timedelta(microseconds=1)


def encode_cursor(row: AuditEvent) -> str:
    micros = (row.created_at - _EPOCH) // _MICRO
    raw = f"b{micros}.{row.id}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> Cursor | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if raw.startswith("a"):
        last_id = whole_number(raw[1:])
        return Cursor(last_id) if last_id is not None else None
    micros, dot, last = raw[1:].partition(".")
    if not (raw.startswith("b") and dot and micros.isascii() and micros.isdigit()):
        return None
    last_id = whole_number(last)
    if last_id is None or len(micros) > 17:  # beyond the year 5000
        return None
    return Cursor(last_id, _EPOCH + int(micros) * _MICRO)


def query(
    db: DBSession, filters: Filters, limit: int = 50, cursor: Cursor | None = None
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
        at = cursor.time
        if at is None:
            at = db.scalar(select(AuditEvent.created_at).where(AuditEvent.id == cursor.id))
        if at is None:  # an id-only cursor whose row was pruned since
            stmt = stmt.where(AuditEvent.id < cursor.id)
        else:
            # The plain bound lets every filter's index start the scan at the cursor.
            stmt = stmt.where(AuditEvent.created_at <= at,
                              tuple_(AuditEvent.created_at, AuditEvent.id) < (at, cursor.id))
    order = (AuditEvent.created_at.desc(), AuditEvent.id.desc())
    rows = list(db.scalars(stmt.order_by(*order).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1]) if more and rows else None


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
