"""Brute-force protection: failure counters per account and per client IP, in the database.

An attempt is reserved *before* the password is checked (:func:`acquire`), in its own short
transaction: failures plus attempts still being checked may never exceed the limit, so 50
concurrent guesses against one account get at most ``max_failures`` password checks, whatever
worker or instance they reach; the rest wait for those checks and then find the account
locked. A success releases the reservation and clears the account's count
(:func:`succeeded`); a failure is counted, and one that fills the counter starts a lock
(:func:`failed`), which doubles on each repeat (at most 24 h). Unknown logins are counted under the login as typed, so a locked answer never
tells whether an account exists.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import time
import typing as t
from dataclasses import dataclass

from sqlalchemy import Table
from sqlalchemy import case
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session as DBSession

from ..errors import AgentError
from ..models import Throttle

if t.TYPE_CHECKING:
    from ..extension import State

MAX_LOCK = 86400
MAX_WAIT = 3.0  # seconds an attempt waits for in-flight checks of the same counter
STALE_PENDING = dt.timedelta(seconds=60)
_THROTTLE = t.cast(Table, Throttle.__table__)  # the hot paths use plain statements


class TooManyAttempts(AgentError):
    code = "too_many_attempts"
    status = 429
    message = "Too many failed attempts. Try again later."

    def __init__(self, retry_after: int) -> None:
        super().__init__(headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = retry_after


@dataclass(frozen=True)
class Keys:
    """The counters one attempt touches, with the threshold of each, in key order: every
    transaction locks counters in that one order, so two of them never wait for each other."""

    items: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(sorted(self.items)))

    def __bool__(self) -> bool:
        return bool(self.items)


def keys_for(state: State, *, user_id: int | None, login: str, ip: str) -> Keys:
    """Counters for an attempt on ``user_id`` (or the unknown ``login``) from ``ip``.

    An unknown login is keyed exactly as logins are looked up (NFKC, case-folded, trimmed), so
    every spelling that would reach one account also shares one counter when there is none.
    """
    from .accounts import key_of

    s = state.settings
    if ip and _allowlisted(ip, s.lockout_allowlist):
        return Keys(())
    account = f"u:{user_id}" if user_id is not None else f"l:{key_of(login)[:250]}"
    items = [(account, s.lockout_max_failures)]
    if ip:
        items.append((f"ip:{ip}", s.lockout_ip_max_failures))
    return Keys(tuple(items))


def keys_for_ip(state: State, ip: str) -> Keys:
    """The client IP's counter alone (for attempts that name no account)."""
    s = state.settings
    if not ip or _allowlisted(ip, s.lockout_allowlist):
        return Keys(())
    return Keys(((f"ip:{ip}", s.lockout_ip_max_failures),))


def _allowlisted(ip: str, networks: t.Sequence[t.Any]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in networks)


def _locked_row(db: DBSession, key: str, now: dt.datetime) -> Throttle:
    """The counter row for ``key``, created if missing, locked for this transaction."""
    values = {"key": key, "failures": 0, "window_start": now, "lock_count": 0, "pending": 0}
    dialect = db.get_bind().dialect.name
    if dialect == "postgresql":
        db.execute(pg_insert(Throttle).values(values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        db.execute(sqlite_insert(Throttle).values(values).on_conflict_do_nothing())
    elif db.get(Throttle, key) is None:
        db.add(Throttle(**values))
        db.flush()
    row = db.scalar(
        select(Throttle).where(Throttle.key == key).with_for_update().execution_options(
            populate_existing=True
        )
    )
    assert row is not None
    if row.pending and row.pending_since and now - row.pending_since > STALE_PENDING:
        row.pending = 0  # reservations of a process that died mid-check
    return row


def acquire(factory: t.Callable[[], DBSession], state: State, keys: Keys) -> None:
    """Reserve one attempt on every counter, or raise :class:`TooManyAttempts`.

    Runs in its own committed transaction, before and apart from the password check. A counter
    full only because of attempts still being checked makes this one wait for them (briefly),
    so concurrent right passwords all get through while concurrent guesses never exceed the
    limit. Every login runs it: plain statements, the counters read and locked in one.
    """
    if not keys:
        return
    s = state.settings
    window = dt.timedelta(seconds=s.lockout_window)
    deadline = time.monotonic() + MAX_WAIT
    while True:
        now = state.clock()
        with factory() as db:
            blocked_for = 0
            busy = False
            pending: dict[str, int] = {}
            changes: dict[str, dict[str, t.Any]] = {}
            rows = _lock_rows(db, keys, now)
            for key, limit in keys.items:
                row = rows[key]
                change = changes[key] = {}
                pending[key] = row.pending
                if row.pending and row.pending_since and now - row.pending_since > STALE_PENDING:
                    pending[key] = change["pending"] = 0  # reservations of a process that died
                if row.locked_until is not None and now < row.locked_until:
                    blocked_for = max(blocked_for, _seconds(row.locked_until - now))
                    continue
                failures = row.failures
                if now - row.window_start >= window:
                    failures = change["failures"] = 0
                    change["window_start"] = now
                if failures >= limit:
                    blocked_for = max(blocked_for, s.lockout_duration)
                elif failures + pending[key] >= limit:
                    busy = True
            reserve = not blocked_for and not busy
            if reserve:
                for key, change in changes.items():
                    change.update(pending=pending[key] + 1, pending_since=now)
            _write(db, changes)
            db.commit()
            if blocked_for:
                raise TooManyAttempts(blocked_for)
            if reserve:
                return
        if time.monotonic() >= deadline:
            raise TooManyAttempts(1)
        time.sleep(0.05)


def _lock_rows(db: DBSession, keys: Keys, now: dt.datetime) -> dict[str, t.Any]:
    """The counter rows of ``keys`` (created if missing), locked for this transaction."""
    table = _THROTTLE
    names = [key for key, _limit in keys.items]
    values = [{"key": key, "failures": 0, "window_start": now, "lock_count": 0, "pending": 0}
              for key in names]
    insert = pg_insert if db.get_bind().dialect.name == "postgresql" else sqlite_insert
    db.execute(insert(table).values(values).on_conflict_do_nothing())
    found = db.execute(
        select(table).where(table.c.key.in_(names)).order_by(table.c.key).with_for_update()
    ).all()  # locked in key order, as Keys lists them
    return {row.key: row for row in found}


def _write(db: DBSession, changes: dict[str, dict[str, t.Any]]) -> None:
    table = _THROTTLE
    for key, change in changes.items():
        if change:
            db.execute(update(table).where(table.c.key == key).values(**change))


def succeeded(db: DBSession, state: State, keys: Keys) -> None:
    """The attempt was right: release it; the account's counter and escalation start over."""
    table = _THROTTLE
    release = case((table.c.pending > 0, table.c.pending - 1), else_=0)
    for key, _limit in keys.items:
        if key.startswith("ip:"):
            values: dict[str, t.Any] = {"pending": release}
        else:
            values = {"pending": release, "failures": 0, "lock_count": 0, "locked_until": None}
        db.execute(update(table).where(table.c.key == key).values(**values))


def failed(db: DBSession, state: State, keys: Keys) -> list[tuple[str, int]]:
    """The attempt was wrong: count it, and lock every counter now full.

    Returns the (key, seconds) of each lock started.
    """
    s = state.settings
    now = state.clock()
    started = []
    for key, limit in keys.items:
        row = _locked_row(db, key, now)
        row.pending = max(0, row.pending - 1)
        row.failures += 1
        if row.failures >= limit and (row.locked_until is None or row.locked_until <= now):
            seconds = min(MAX_LOCK, s.lockout_duration * 2 ** min(row.lock_count, 16))
            row.locked_until = now + dt.timedelta(seconds=seconds)
            row.lock_count += 1
            row.failures = 0
            row.window_start = now
            started.append((key, seconds))
    return started


# --- failed token validations ----------------------------------------------------------------
#
# The same counters, for callers of /token/validate: a client IP with too many invalid tokens
# within a minute is answered 429 for a minute, whatever it sends, so the endpoint cannot be
# used to test tokens at speed. Valid tokens are never counted, and cost one read.

VALIDATE_WINDOW = 60  # seconds


def validation_key(state: State, ip: str) -> str | None:
    """The counter of failed validations from ``ip``; None when not limited."""
    s = state.settings
    if not s.validate_max_failures or not ip or _allowlisted(ip, s.lockout_allowlist):
        return None
    return f"validate:{ip}"


def check_validations(db: DBSession, state: State, key: str | None) -> None:
    """Raise :class:`TooManyAttempts` while ``key`` is locked (a read; nothing is written)."""
    if key is None:
        return
    row = db.get(Throttle, key)
    now = state.clock()
    if row is not None and row.locked_until is not None and now < row.locked_until:
        raise TooManyAttempts(_seconds(row.locked_until - now))


def failed_validation(db: DBSession, state: State, key: str | None) -> int:
    """Count one invalid token under ``key``; returns the seconds of a lock it started, or 0.

    The caller commits.
    """
    if key is None:
        return 0
    now = state.clock()
    window = dt.timedelta(seconds=VALIDATE_WINDOW)
    row = _locked_row(db, key, now)
    if now - row.window_start >= window:
        row.failures = 0
        row.window_start = now
    row.failures += 1
    if row.failures < state.settings.validate_max_failures:
        return 0
    row.locked_until = now + window
    row.lock_count += 1
    row.failures = 0
    row.window_start = now
    return VALIDATE_WINDOW


def unlock_user(db: DBSession, user_id: int, login_keys: t.Iterable[str] = ()) -> int:
    """Clear the counters of an account (admin unlock); returns how many were cleared."""
    from .accounts import key_of

    keys = [f"u:{user_id}", *(f"l:{key_of(k)}" for k in login_keys)]
    rows = db.scalars(select(Throttle).where(Throttle.key.in_(keys))).all()
    for row in rows:
        db.delete(row)
    return len(rows)


def _seconds(delta: dt.timedelta) -> int:
    return max(1, math.ceil(delta.total_seconds()))
