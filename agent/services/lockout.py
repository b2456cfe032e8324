"""Brute-force protection: failure counters per account and per client IP.

An attempt is reserved *before* the password is checked (:func:`acquire`), in its own short
transaction: failures plus attempts still being checked may never exceed the limit, so 50
concurrent guesses against one account get at most ``max_failures`` password checks, whatever
worker or instance they reach; the rest wait for those checks and then find the account
locked. A success releases the reservation and clears the account's count
(:func:`succeeded`); a failure is counted, and one that fills the counter starts a lock
(:func:`failed`), which doubles on each repeat (at most 24 h). Unknown logins are counted
under the login as typed, so a locked answer never tells whether an account exists.

Where the counters live: rows of ``hk_throttle`` in the database by default; with
``REDIS_URL`` set, hashes in that Redis (:class:`RedisCounters`), the same rules run as one Lua
script per step, so each step is atomic across every worker and instance. A Redis that does
not answer refuses the attempt (503 ``store_unavailable``), never lets it through unchecked.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import time
import typing as t
from dataclasses import dataclass

from sqlalchemy import ARRAY
from sqlalchemy import JSON
from sqlalchemy import Connection
from sqlalchemy import Integer
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import any_
from sqlalchemy import bindparam
from sqlalchemy import case
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import literal_column
from sqlalchemy import null
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.orm import Session as DBSession

from ..db import insert_for
from ..db import one_statement
from ..db import rowcount
from ..direct import async_commit_connections
from ..direct import connections
from ..errors import AgentError
from ..models import Throttle
from ..models import UTCDateTime
from ..resp import RedisError
from ..store import StoreUnavailable
from .keys import derive_key

if t.TYPE_CHECKING:
    from ..extension import State

log = logging.getLogger(__name__)

MAX_LOCK = 86400
MAX_WAIT = 3.0  # seconds an attempt waits for in-flight checks of the same counter
STALE_PENDING = dt.timedelta(seconds=60)
KEEP = 86400  # seconds a counter outlives its window and lock (the escalation's memory)
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
        items.append((f"ip:{client_of(ip)}", s.lockout_ip_max_failures))
    return Keys(tuple(items))


@functools.lru_cache(maxsize=4096)
def client_of(ip: str) -> str:
    """The client an address counts as: an IPv6 address as its /64 (one subscriber's or host's
    network: a client picks any address in it at will), an IPv4-mapped one as its IPv4
    address, an IPv4 address as itself; anything that is no address as written."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def keys_for_ip(state: State, ip: str) -> Keys:
    """The client IP's counter alone (for attempts that name no account)."""
    s = state.settings
    if not ip or _allowlisted(ip, s.lockout_allowlist):
        return Keys(())
    return Keys(((f"ip:{client_of(ip)}", s.lockout_ip_max_failures),))


def _allowlisted(ip: str, networks: t.Sequence[t.Any]) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in networks)


@dataclass(frozen=True)
class _Statements:
    """The counters' statements, built and compiled once per dialect: every attempt runs them."""

    lock: t.Any  # the row of "k", created as an empty counter if missing, locked; executemany
    write: t.Any  # every field of one row ("k"), executemany


@functools.cache
def _statements(dialect: str) -> _Statements:
    table = _THROTTLE
    c = table.c
    insert = insert_for(dialect)
    return _Statements(
        # An upsert that changes nothing, so a row found is locked like one inserted: one
        # statement (one multi-row INSERT for all keys) creates, locks and reads the counters.
        lock=insert(table).values(key=bindparam("k"), failures=0, window_start=bindparam("now"),
                                  lock_count=0, pending=0)
        .on_conflict_do_update(index_elements=[c.key], set_={"pending": c.pending})
        .returning(*c),
        write=update(table).where(c.key == bindparam("k")).values(
            failures=bindparam("v_failures"), window_start=bindparam("v_window_start"),
            locked_until=bindparam("v_locked_until"), lock_count=bindparam("v_lock_count"),
            pending=bindparam("v_pending"), pending_since=bindparam("v_pending_since")),
    )


def _sql(db: DBSession | Connection) -> _Statements:
    bind = db if isinstance(db, Connection) else db.get_bind()
    return _statements(bind.dialect.name)


def _lock_rows(
    db: DBSession | Connection, names: list[str], now: dt.datetime,
) -> dict[str, dict[str, t.Any]]:
    """The counter rows of ``names`` (created if missing), locked for this transaction, as
    dicts of their fields; reservations of a process that died mid-check are dropped."""
    if not names:
        return {}
    sql = _sql(db)
    rows = {}
    # Locked in the order of "names" (key order, as Keys lists them): one INSERT's rows are
    # written in the order of its VALUES.
    for row in db.execute(sql.lock, [{"k": key, "now": now} for key in names]):
        fields = row._asdict()
        if fields["pending"] and fields["pending_since"] \
                and now - fields["pending_since"] > STALE_PENDING:
            fields["pending"] = 0
        rows[row.key] = fields
    return rows


def _write(db: DBSession | Connection, rows: dict[str, dict[str, t.Any]]) -> None:
    """Store every field of ``rows`` (read by :func:`_lock_rows`, then changed)."""
    if not rows:
        return
    sql = _sql(db)
    db.execute(sql.write, [{"k": key, **{f"v_{name}": value for name, value in fields.items()
                                          if name != "key"}}
                           for key, fields in rows.items()])


def acquire(state: State, keys: Keys, taken: set[str] | None = None) -> None:
    """Reserve one attempt on every counter, or raise :class:`TooManyAttempts`. ``taken``:
    the first try already ran (:func:`find_and_reserve`), these are the keys it reserved.

    Runs in its own committed transaction, before and apart from the password check. A counter
    full only because of attempts still being checked makes this one wait for them (briefly),
    so concurrent right passwords all get through while concurrent guesses never exceed the
    limit. Every login runs it: plain statements, the counters read and locked in one.
    """
    if not keys:
        return
    deadline = time.monotonic() + MAX_WAIT
    while True:
        if state.redis is not None:
            blocked_for, reserved = RedisCounters(state).acquire(keys)
        else:
            blocked_for, reserved = _reserve(state, keys, taken)
            taken = None
        if blocked_for:
            raise TooManyAttempts(blocked_for)
        if reserved:
            return
        if time.monotonic() >= deadline:
            raise TooManyAttempts(1)
        time.sleep(0.05)


def _reserve(state: State, keys: Keys, taken: set[str] | None = None) -> tuple[int, bool]:
    """One try of :func:`acquire` in the database: (seconds locked, 0 if not), and whether
    the attempt was reserved (neither: the counter is full of checks in flight).

    One statement reserves the attempt on every counter with room for it (creating those
    missing) and leaves alone each counter that is locked or full; on PostgreSQL it runs in
    autocommit, one round trip for the whole step. When a counter had no room, the
    reservations just taken on the others are given back, and the counters without room are
    read to tell a lock from checks still in flight. ``taken``: that statement already ran
    (:func:`find_and_reserve`), these are the keys it reserved.
    """
    names = [key for key, _limit in keys.items]
    if taken is not None and len(taken) == len(names):
        return 0, True  # every login's path: nothing more to build or run
    s = state.settings
    now = state.clock()
    window_start = now - dt.timedelta(seconds=s.lockout_window)
    engine = state.engine
    dialect = engine.dialect.name
    take = _take(len(names))
    params = _take_params(state, now)
    for i, (key, limit) in enumerate(keys.items):
        params.update({f"k{i}": key, f"limit{i}": limit})
    reserved = taken
    if reserved is None:
        # On a kept connection (agent.direct), in autocommit; on PostgreSQL committed without
        # waiting for the disk: every login runs it, and a reservation a crash loses is an
        # attempt the crash ended.
        kept = (async_commit_connections if dialect == "postgresql" else connections)(engine)
        reserved = {key for (key,) in kept.execute(take, params, write=True)}
        if len(reserved) == len(names):
            return 0, True
    with engine.connect() as conn:
        conn = conn.execution_options(**one_statement(engine))
        with conn.begin():
            if reserved:
                conn.execute(_release(dialect),
                             {"release_keys": [key for key in names if key in reserved],
                              "clear_keys": []})
            rows = {row.key: row for row in conn.execute(
                select(_THROTTLE).where(_THROTTLE.c.key.in_(
                    [key for key in names if key not in reserved])))}
    blocked_for = 0
    for key, limit in keys.items:
        row = rows.get(key)
        if key in reserved or row is None:
            continue
        if row.locked_until is not None and now < row.locked_until:
            blocked_for = max(blocked_for, _seconds(row.locked_until - now))
        elif row.window_start > window_start and row.failures >= limit:
            blocked_for = max(blocked_for, s.lockout_duration)
    return blocked_for, False


def _take_params(state: State, now: dt.datetime) -> dict[str, t.Any]:
    window_start = now - dt.timedelta(seconds=state.settings.lockout_window)
    return {"now": now, "window_start": window_start, "stale": now - STALE_PENDING}


# The reservation's upsert after its rows (``:now``, ``:window_start``, ``:stale``; ``{limit}``:
# the counter's limit, by its key): an attempt is reserved on a counter (``pending`` + 1) unless
# it is locked, or its failures in the window plus the checks in flight (those of processes
# dead for STALE_PENDING do not count) reach its limit. Returns the keys reserved.
_FAILURES = ("CASE WHEN hk_throttle.window_start <= :window_start THEN 0 "
             "ELSE hk_throttle.failures END")
_PENDING = "CASE WHEN hk_throttle.pending_since < :stale THEN 0 ELSE hk_throttle.pending END"
_TAKE_COLUMNS = '("key", failures, window_start, lock_count, pending, pending_since)'
_TAKE_UPSERT = (
    'ON CONFLICT ("key") DO UPDATE SET '
    f"failures = {_FAILURES}, "
    "window_start = CASE WHEN hk_throttle.window_start <= :window_start THEN :now "
    "ELSE hk_throttle.window_start END, "
    f"pending = {_PENDING} + 1, pending_since = :now "
    "WHERE (hk_throttle.locked_until IS NULL OR hk_throttle.locked_until <= :now) "
    f"AND {_FAILURES} + {_PENDING} < {{limit}} "
    'RETURNING hk_throttle."key"'
)


def _typed(sql: str, *names: tuple[str, t.Any]) -> t.Any:
    typed: list[t.Any] = [bindparam(name, type_=UTCDateTime())
                          for name in ("now", "window_start", "stale")]
    typed += [bindparam(name, type_=type_) for name, type_ in names]
    return text(sql).bindparams(*typed)


@functools.cache
def _take(count: int) -> t.Any:
    """The statement of :func:`_reserve` for ``count`` counters (``k0``, ``limit0``, ...).
    The rows are taken in the order of VALUES (key order, as every transaction takes the
    counters). PostgreSQL and SQLite both read it as written."""
    rows = ", ".join(f"(:k{i}, 0, :now, 0, 1, :now)" for i in range(count))
    limits = " ".join(f"WHEN :k{i} THEN :limit{i}" for i in range(count))
    # Built of constants and numbered placeholders only.
    sql = (f"INSERT INTO hk_throttle {_TAKE_COLUMNS} VALUES {rows} "  # noqa: S608
           + _TAKE_UPSERT.format(limit=f'CASE hk_throttle."key" {limits} END'))
    names: list[tuple[str, t.Any]] = [(f"k{i}", String()) for i in range(count)]
    names += [(f"limit{i}", Integer()) for i in range(count)]
    return _typed(sql, *names).columns(key=String())


def find_and_reserve(
    state: State, columns: str, login_key: str, keys: Keys
) -> tuple[tuple[t.Any, ...] | None, set[str]] | None:
    """A login's account read and its attempt's reservation in one statement (PostgreSQL,
    counters in the database): one round trip before the password check, where the two took
    two. The account counter's key is ``u:<id>`` of the account found, else ``keys``' own
    (``l:<login>``), as :func:`keys_for` names them.

    ``columns``: the SQL of the account's columns to read, of the row of ``hk_users`` whose
    ``login_key`` or ``email_key`` is ``login_key``. Returns that row (None: no account) and
    the keys reserved (for :func:`acquire`); None when there is nothing to run here (the
    counters are in Redis, or the client is allowlisted): the caller then reads alone. Like
    :func:`_reserve`'s statement it commits without waiting for the disk.
    """
    if state.redis is not None or not keys or state.engine.dialect.name != "postgresql":
        return None
    ip = [item for item in keys.items if item[0].startswith("ip:")]
    ((account, account_limit),) = [item for item in keys.items if item not in ip]
    params = _take_params(state, state.clock())
    params.update(login_key=login_key, k0=account, limit0=account_limit,
                  k1=ip[0][0] if ip else None, limit1=ip[0][1] if ip else 0)
    rows = async_commit_connections(state.engine).execute(
        _take_at_login(columns), params, write=True)
    *row, key, account_taken, ip_taken = rows[0]
    taken = {key} if account_taken else set()
    if ip_taken:
        taken.add(ip[0][0])
    return (tuple(row) if row[0] is not None else None), taken


@functools.cache
def _take_at_login(columns: str) -> t.Any:
    """The statement of :func:`find_and_reserve`. The account's row is read once (a CTE read
    twice is computed once); the counters are taken in key order (``ip:`` before ``l:`` and
    ``u:`` in any collation), as every transaction takes them."""
    # Built of constants, the caller's column list and numbered placeholders only.
    sql = (
        f"WITH u AS (SELECT {columns} FROM hk_users "  # noqa: S608
        "WHERE login_key = :login_key OR email_key = :login_key LIMIT 1), "
        """k AS (SELECT coalesce('u:' || (SELECT id FROM u), :k0) AS "key", 0 AS ord """
        """UNION ALL SELECT :k1, 1 WHERE :k1 IS NOT NULL), """
        f"taken AS (INSERT INTO hk_throttle {_TAKE_COLUMNS} "
        """SELECT "key", 0, :now, 0, 1, :now FROM k ORDER BY "key" """
        + _TAKE_UPSERT.format(
            limit='CASE WHEN hk_throttle."key" = :k1 THEN :limit1 ELSE :limit0 END') + ") "
        """SELECT u.*, (SELECT "key" FROM k WHERE ord = 0), """
        """EXISTS (SELECT FROM taken WHERE "key" = (SELECT "key" FROM k WHERE ord = 0)), """
        """EXISTS (SELECT FROM taken WHERE "key" = :k1) """
        "FROM (SELECT) AS one LEFT JOIN u ON true"
    )
    return _typed(sql, ("login_key", String()), ("k0", String()), ("k1", String()),
                  ("limit0", Integer()), ("limit1", Integer()))


def succeeded(db: DBSession, state: State, keys: Keys) -> None:
    """The attempt was right: release it; the account's counter and escalation start over.

    Part of ``db``'s transaction: undone by its rollback, done by its commit (in Redis, run
    right after the commit; a rollback drops it).
    """
    release = release_statement(db, state, keys)
    if release is not None:
        db.execute(*release)


def release_statement(
    db: DBSession, state: State, keys: Keys
) -> tuple[t.Any, dict[str, t.Any]] | None:
    """:func:`succeeded` for a caller that runs the release as part of a statement of its own:
    the UPDATE and its parameters (``release_keys``, ``clear_keys``), or None when there is
    nothing to run in the database (no counters; or counters in Redis, released once ``db``
    commits, as :func:`succeeded` does)."""
    if state.redis is not None:
        if keys:
            db.info.setdefault(_RELEASE, []).append((state, keys))
        return None
    if not keys:
        return None
    names = [key for key, _limit in keys.items]
    clear = [key for key in names if not key.startswith("ip:")]
    return _release(db.get_bind().dialect.name), {"release_keys": names, "clear_keys": clear}


@functools.cache
def _release(dialect: str) -> t.Any:
    """One reservation back on each counter of ``release_keys``; those of ``clear_keys`` (an
    account's) also start over, failures and escalation. One statement that takes the rows in
    key order, as every transaction takes the counters. The key lists are arrays (on SQLite
    JSON arrays), so the statement's text is the same for any number of keys (it is prepared
    once)."""
    c = _THROTTLE.c

    def among(name: str) -> t.Any:
        if dialect == "postgresql":
            return c.key == any_(bindparam(name, type_=ARRAY(String)))
        # SQLite: the list as a JSON array, read back by json_each.
        return c.key.in_(select(literal_column("value"))
                         .select_from(func.json_each(bindparam(name, type_=JSON))))

    taken = select(c.key).where(among("release_keys")).order_by(c.key).with_for_update()
    clear = among("clear_keys")
    return update(_THROTTLE).where(c.key.in_(taken)).values(
        pending=case((c.pending > 0, c.pending - 1), else_=0),
        failures=case((clear, 0), else_=c.failures),
        lock_count=case((clear, 0), else_=c.lock_count),
        locked_until=case((clear, null()), else_=c.locked_until))


def failed(db: DBSession, state: State, keys: Keys) -> list[tuple[str, int]]:
    """The attempt was wrong: count it, and lock every counter now full.

    Returns the (key, seconds) of each lock started.
    """
    if state.redis is not None:
        return RedisCounters(state).failed(keys)
    s = state.settings
    now = state.clock()
    started = []
    rows = _lock_rows(db, [key for key, _limit in keys.items], now)
    for key, limit in keys.items:
        row = rows[key]
        row.update(pending=max(0, row["pending"] - 1), failures=row["failures"] + 1)
        locked_until = row["locked_until"]
        if row["failures"] >= limit and (locked_until is None or locked_until <= now):
            seconds = min(MAX_LOCK, s.lockout_duration * 2 ** min(row["lock_count"], 16))
            row.update(locked_until=now + dt.timedelta(seconds=seconds),
                       lock_count=row["lock_count"] + 1, failures=0, window_start=now)
            started.append((key, seconds))
    _write(db, rows)
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
    return f"validate:{client_of(ip)}"


def check_validations(db: DBSession, state: State, key: str | None) -> None:
    """Raise :class:`TooManyAttempts` while ``key`` is locked (a read; nothing is written)."""
    if key is None:
        return
    if state.redis is not None:
        seconds = RedisCounters(state).locked_for(key)
        if seconds:
            raise TooManyAttempts(seconds)
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
    if state.redis is not None:
        return RedisCounters(state).failed_validation(key)
    now = state.clock()
    window = dt.timedelta(seconds=VALIDATE_WINDOW)
    rows = _lock_rows(db, [key], now)
    row = rows[key]
    if now - row["window_start"] >= window:
        row.update(failures=0, window_start=now)
    row["failures"] += 1
    locked = 0
    if row["failures"] >= state.settings.validate_max_failures:
        row.update(locked_until=now + window, lock_count=row["lock_count"] + 1, failures=0,
                   window_start=now)
        locked = VALIDATE_WINDOW
    _write(db, rows)
    return locked


def unlock_user(
    db: DBSession, state: State, user_id: int, login_keys: t.Iterable[str] = ()
) -> int:
    """Clear the counters of an account (admin unlock); returns how many were cleared."""
    from .accounts import key_of

    keys = [f"u:{user_id}", *(f"l:{key_of(k)[:250]}" for k in login_keys)]
    if state.redis is not None:
        return RedisCounters(state).clear(keys)
    # One statement: of two unlocks at once, the second waits for the first's row locks and
    # then clears (and reports) nothing, rather than deleting rows already gone.
    return rowcount(db.execute(delete(Throttle).where(Throttle.key.in_(keys))))


def _seconds(delta: dt.timedelta) -> int:
    return max(1, math.ceil(delta.total_seconds()))


# --- the counters in Redis --------------------------------------------------------------------
#
# One hash per counter (failures, window_start, locked_until, lock_count, pending,
# pending_since; times in epoch seconds of the agent's clock), under a key that is an HMAC of
# the site and the counter's name: no login or address is readable in Redis, and sites sharing
# one Redis never share a counter. Each step below is one script, so its reads and writes are
# atomic with respect to every other process. Every key expires KEEP after its window and its
# lock are over, as the database's rows are pruned. The keys share one hash tag, so a Redis
# Cluster keeps them in one slot (a script may touch only one slot).

_RELEASE = "hk_lockout_release"

# Locals, then one loop per key: the same rules as acquire() above.
_ACQUIRE = """
local now, window, duration = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local stale, keep = tonumber(ARGV[4]), tonumber(ARGV[5])
local blocked, busy, rows = 0, false, {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[5 + i])
  local v = redis.call('HMGET', key, 'failures', 'window_start', 'locked_until', 'pending',
                       'pending_since')
  local r = {failures = tonumber(v[1]) or 0, window_start = tonumber(v[2]) or now,
             locked_until = tonumber(v[3]), pending = tonumber(v[4]) or 0,
             pending_since = tonumber(v[5]) or now}
  if r.pending > 0 and now - r.pending_since > stale then r.pending = 0 end
  if r.locked_until and now < r.locked_until then
    blocked = math.max(blocked, math.ceil(r.locked_until - now))
  else
    if now - r.window_start >= window then r.failures = 0; r.window_start = now end
    if r.failures >= limit then blocked = math.max(blocked, duration)
    elseif r.failures + r.pending >= limit then busy = true end
  end
  rows[i] = r
end
local reserve = blocked == 0 and not busy
for i, key in ipairs(KEYS) do
  local r = rows[i]
  if reserve then r.pending = r.pending + 1; r.pending_since = now end
  redis.call('HSET', key, 'failures', r.failures, 'window_start', r.window_start,
             'pending', r.pending, 'pending_since', r.pending_since)
  local last = math.max(r.window_start + window, r.locked_until or 0, now + stale)
  redis.call('EXPIRE', key, math.ceil(last - now + keep))
end
if blocked > 0 then return {blocked, 0} end
if reserve then return {0, 1} end
return {0, 0}
"""

# failed() above: count, and lock every counter now full (the lock doubling on each repeat).
_FAILED = """
local now, window, duration = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_lock, stale, keep = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local started = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[6 + i])
  local v = redis.call('HMGET', key, 'failures', 'window_start', 'locked_until', 'pending',
                       'pending_since', 'lock_count')
  local failures, window_start = (tonumber(v[1]) or 0) + 1, tonumber(v[2]) or now
  local locked_until, pending = tonumber(v[3]), tonumber(v[4]) or 0
  local lock_count = tonumber(v[6]) or 0
  if pending > 0 and now - (tonumber(v[5]) or now) > stale then pending = 0 end
  pending = math.max(0, pending - 1)
  if failures >= limit and (locked_until == nil or locked_until <= now) then
    local seconds = math.min(max_lock, duration * 2 ^ math.min(lock_count, 16))
    locked_until = now + seconds
    lock_count, failures, window_start = lock_count + 1, 0, now
    table.insert(started, i)
    table.insert(started, seconds)
  end
  redis.call('HSET', key, 'failures', failures, 'window_start', window_start,
             'pending', pending, 'lock_count', lock_count)
  if locked_until then redis.call('HSET', key, 'locked_until', locked_until) end
  local last = math.max(window_start + window, locked_until or 0)
  redis.call('EXPIRE', key, math.ceil(last - now + keep))
end
return started
"""

# succeeded() above: release the reservation; an account's counter and escalation start over.
_SUCCEEDED = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local pending = tonumber(redis.call('HGET', key, 'pending')) or 0
    redis.call('HSET', key, 'pending', math.max(0, pending - 1))
    if ARGV[i] == '1' then
      redis.call('HSET', key, 'failures', 0, 'lock_count', 0)
      redis.call('HDEL', key, 'locked_until')
    end
  end
end
return 0
"""

# failed_validation() above: a minute's window; full, a lock of a minute.
_FAILED_VALIDATION = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
local key = KEYS[1]
local v = redis.call('HMGET', key, 'failures', 'window_start', 'lock_count')
local failures, window_start = tonumber(v[1]) or 0, tonumber(v[2]) or now
local lock_count, locked = tonumber(v[3]) or 0, 0
if now - window_start >= window then failures = 0; window_start = now end
failures = failures + 1
if failures >= limit then
  redis.call('HSET', key, 'locked_until', now + window)
  lock_count, failures, window_start, locked = lock_count + 1, 0, now, window
end
redis.call('HSET', key, 'failures', failures, 'window_start', window_start,
           'lock_count', lock_count)
redis.call('EXPIRE', key, math.ceil(window_start + 2 * window - now + keep))
return locked
"""


@functools.lru_cache(maxsize=16)
def _name_key(secret: bytes) -> bytes:
    return derive_key(secret, "lockout-counters")


def redis_name(secret: bytes, issuer: str, key: str) -> str:
    """The Redis key of the counter ``key`` of the site ``issuer``: a MAC under the site's secret,
    so no login or address is readable in Redis and sites sharing a Redis never meet."""
    mac = hmac.new(_name_key(secret), f"{issuer}\x00{key}".encode(), hashlib.sha256)
    return "hk:{lockout}:" + mac.hexdigest()[:40]


class RedisCounters:
    """The counters of one site in its Redis (``state.redis``)."""

    def __init__(self, state: State) -> None:
        assert state.redis is not None
        self.state = state
        self.client = state.redis
        self.settings = state.settings

    def _name(self, key: str) -> str:
        return redis_name(self.settings.secret_key, self.settings.issuer, key)

    def _run(self, source: str, keys: list[str], args: list[t.Any]) -> t.Any:
        try:
            script = self.client.register_script(source)
            return script(keys=[self._name(k) for k in keys], args=args)
        except RedisError as exc:
            log.error("redis did not answer (%s: %s)", type(exc).__name__, exc)
            raise StoreUnavailable() from None

    def _now(self) -> float:
        return self.state.clock().timestamp()

    def acquire(self, keys: Keys) -> tuple[int, bool]:
        """(seconds locked, 0 if not) and whether the attempt was reserved."""
        s = self.settings
        names = [key for key, _limit in keys.items]
        args = [self._now(), s.lockout_window, s.lockout_duration,
                STALE_PENDING.total_seconds(), KEEP, *(limit for _key, limit in keys.items)]
        blocked, reserved = self._run(_ACQUIRE, names, args)
        return int(blocked), bool(reserved)

    def failed(self, keys: Keys) -> list[tuple[str, int]]:
        s = self.settings
        names = [key for key, _limit in keys.items]
        args = [self._now(), s.lockout_window, s.lockout_duration, MAX_LOCK,
                STALE_PENDING.total_seconds(), KEEP, *(limit for _key, limit in keys.items)]
        flat = self._run(_FAILED, names, args)
        return [(names[int(flat[i]) - 1], int(flat[i + 1])) for i in range(0, len(flat), 2)]

    def succeeded(self, keys: Keys) -> None:
        names = [key for key, _limit in keys.items]
        self._run(_SUCCEEDED, names, ["0" if k.startswith("ip:") else "1" for k in names])

    def locked_for(self, key: str) -> int:
        try:
            until = self.client.hget(self._name(key), "locked_until")
        except RedisError as exc:
            log.error("redis did not answer (%s: %s)", type(exc).__name__, exc)
            raise StoreUnavailable() from None
        left = float(until) - self._now() if until is not None else 0.0
        return math.ceil(left) if left > 0 else 0

    def failed_validation(self, key: str) -> int:
        args = [self._now(), VALIDATE_WINDOW, self.settings.validate_max_failures, KEEP]
        return int(self._run(_FAILED_VALIDATION, [key], args))

    def clear(self, keys: list[str]) -> int:
        try:
            return int(self.client.delete(*[self._name(k) for k in keys]))
        except RedisError as exc:
            log.error("redis did not answer (%s: %s)", type(exc).__name__, exc)
            raise StoreUnavailable() from None


def install(factory: t.Any) -> None:
    """Run the Redis releases of :func:`succeeded` when their transaction commits."""
    from sqlalchemy import event as sa_event

    @sa_event.listens_for(factory, "after_commit")
    def _after_commit(db: DBSession) -> None:
        for state, keys in db.info.pop(_RELEASE, []):
            try:
                RedisCounters(state).succeeded(keys)
            except StoreUnavailable:
                # The request's work is committed; its reservation is left to go stale
                # (STALE_PENDING), which only ever holds back attempts, never lets one through.
                pass

    @sa_event.listens_for(factory, "after_soft_rollback")
    def _after_rollback(db: DBSession, _previous: t.Any) -> None:
        db.info.pop(_RELEASE, None)
