"""Sessions, refresh-token rotation and revocation.

A session is one login on one device. Its refresh tokens form a family: each refresh marks the
presented token used (an atomic conditional update, so two workers can never both rotate it) and
issues the next generation. Presenting a used token again is reuse: the session is revoked,
which ends every refresh and access token of the family (RFC 9700 §4.14.2). Within the grace
window after a rotation the same used token returns the same new pair instead, so several tabs
refreshing at once are not logged out.

The next refresh token is derived, not stored: ``HMAC(k_refresh, previous token)``. Only SHA-256
digests of refresh tokens are in the database, yet a retry within the grace window can be given
the very same token again.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import time
import typing as t
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy import Text
from sqlalchemy import bindparam
from sqlalchemy import event
from sqlalchemy import select
from sqlalchemy import tuple_
from sqlalchemy import type_coerce
from sqlalchemy import update
from sqlalchemy.orm import Session as DBSession

from ..db import Writes
from ..db import insert_rows
from ..db import rowcount
from ..direct import connections
from ..direct import per_engine
from ..errors import Forbidden
from ..errors import InvalidGrant
from ..errors import InvalidToken
from ..errors import ValidationFailed
from ..models import RefreshToken
from ..models import Session
from ..models import User
from . import devices
from .audit import page_args
from .keys import b64url
from .tokens import mint_access_token
from .tokens import new_jti

if t.TYPE_CHECKING:
    from ..extension import State

REFRESH_PREFIX = "hkr_"
MAX_REFRESH_LENGTH = 128


@dataclass(frozen=True, slots=True)
class Opened:
    """A session a login opens, as its tokens name it (the row is written from its values)."""

    id: str
    access_jti: str
    access_iat: int
    access_exp: int


@dataclass(frozen=True)
class Issued:
    """What a login or refresh hands to the client."""

    session: Session | Opened
    user: User
    access_token: str
    access_exp: int
    refresh_token: str
    refresh_expires_at: dt.datetime


@dataclass(frozen=True)
class ClientInfo:
    ip: str
    user_agent: str


def digest(refresh_token: str) -> str:
    return hashlib.sha256(refresh_token.encode()).hexdigest()


def _next_refresh_token(state: State, previous: str) -> str:
    mac = hmac.new(state.refresh_key, previous.encode(), hashlib.sha256).digest()
    return REFRESH_PREFIX + b64url(mac)


class SessionLimitReached(Forbidden):
    code = "session_limit_reached"
    message = (
        "This account has reached its maximum number of active sessions; "
        "log out on another device first."
    )


def _access_token(state: State, user: User, sess: Session | Opened) -> str:
    s = state.settings
    extra = state.apply_filter("token_claims", {}, user)
    return mint_access_token(
        state.ring,
        issuer=s.issuer,
        audience=s.audience,
        user_id=user.id,
        user_login=user.user_login,
        roles=user.roles,
        sid=sess.id,
        jti=sess.access_jti,
        iat=sess.access_iat,
        exp=sess.access_exp,
        extra=extra,
    )


def _access_window(state: State, now: dt.datetime, sess_expires: dt.datetime) -> tuple[int, int]:
    iat = int(now.timestamp())
    exp = min(iat + state.settings.access_token_ttl, int(sess_expires.timestamp()))
    return iat, exp


def enforce_session_limit(db: DBSession, state: State, user: User) -> list[str]:
    """Make room for one more session under ``MAX_SESSIONS``; returns the evicted session ids.

    Logins of one user are serialised here (a row lock on the user; SQLite's write transaction
    already is one), so concurrent logins can never leave more than the limit.
    """
    s = state.settings
    if not s.max_sessions:
        return []
    now = state.clock()
    db.execute(select(User.id).where(User.id == user.id).with_for_update())
    active = db.scalars(
        select(Session)
        .where(Session.user_id == user.id, Session.revoked_at.is_(None), Session.expires_at > now)
        .order_by(Session.created_at, Session.id)
    ).all()
    excess = len(active) - s.max_sessions + 1
    if excess <= 0:
        return []
    if s.session_limit_policy == "reject":
        raise SessionLimitReached()
    for sess in active[:excess]:
        revoke_session(db, sess, now, "evicted")
    return [sess.id for sess in active[:excess]]


def start_session(db: DBSession, state: State, user: User, client: ClientInfo) -> Issued:
    """Open a new session for ``user`` (a login) and issue its first token pair.

    The caller runs :func:`enforce_session_limit` first, in the same transaction.
    """
    writes, issued = new_session(state, user, client)
    # Plain INSERTs, the session row first (the refresh token references it): a login runs
    # them, and the ORM's unit of work would cost more than the statements themselves.
    for model, rows in writes:
        insert_rows(db, model, rows)
    return issued


def new_session(
    state: State, user: User, client: ClientInfo
) -> tuple[Writes, Issued]:
    """A new session of ``user`` and its first token pair: the rows to write (the session,
    then its refresh token), and what the client is handed once they are written."""
    now = state.clock()
    s = state.settings
    expires = now + dt.timedelta(seconds=s.session_max_age)
    iat, exp = _access_window(state, now, expires)
    sess = Opened(secrets.token_urlsafe(16), new_jti(), iat, exp)  # no ORM object: cheaper
    values = {
        "id": sess.id,
        "user_id": user.id,
        "created_at": now,
        "last_seen_at": now,
        "expires_at": expires,
        "ip": client.ip[:64],
        "user_agent": client.user_agent[:512],
        "device": devices.describe(client.user_agent),
        "access_jti": sess.access_jti,
        "access_iat": iat,
        "access_exp": exp,
    }
    refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
    refresh_expires = min(now + dt.timedelta(seconds=s.refresh_token_ttl), expires)
    writes: Writes = [
        (Session, [values]),
        (RefreshToken, [{
            "session_id": values["id"],
            "token_hash": digest(refresh),
            "generation": 0,
            "created_at": now,
            "expires_at": refresh_expires,
        }]),
    ]
    return writes, Issued(sess, user, _access_token(state, user, sess), exp, refresh,
                          refresh_expires)


def refresh(db: DBSession, state: State, presented: t.Any) -> Issued:
    """Rotate ``presented`` into a new pair, or raise :class:`InvalidGrant`.

    The caller commits, also on :class:`RefreshReused` (the session was revoked).
    """
    if (
        not isinstance(presented, str)
        or not presented.startswith(REFRESH_PREFIX)
        or len(presented) > MAX_REFRESH_LENGTH
    ):
        raise InvalidGrant()
    now = state.clock()
    row = db.scalar(select(RefreshToken).where(RefreshToken.token_hash == digest(presented)))
    if row is None:
        raise InvalidGrant()
    sess = db.get(Session, row.session_id)
    user = db.get(User, sess.user_id) if sess is not None else None
    if sess is None or user is None or sess.revoked_at is not None or user.status != "active":
        raise InvalidGrant()
    if now >= sess.expires_at or now >= row.expires_at:
        raise InvalidGrant("The session has expired; log in again.", code="session_expired")

    claimed = rowcount(db.execute(
        update(RefreshToken)
        .where(RefreshToken.id == row.id, RefreshToken.used_at.is_(None))
        .values(used_at=now)
    ))
    if claimed != 1:
        # Another request rotated this token first (or it is an old one): grace or reuse.
        db.refresh(row)
        db.refresh(sess)
        return _reuse(db, state, sess, user, row, presented, now)

    child = _next_refresh_token(state, presented)
    child_expires = min(now + dt.timedelta(seconds=state.settings.refresh_token_ttl),
                        sess.expires_at)
    db.add(
        RefreshToken(
            session_id=sess.id,
            token_hash=digest(child),
            generation=row.generation + 1,
            created_at=now,
            expires_at=child_expires,
        )
    )
    iat, exp = _access_window(state, now, sess.expires_at)
    sess.prev_access_jti = sess.access_jti
    sess.access_jti = new_jti()
    sess.access_iat, sess.access_exp = iat, exp
    sess.rotated_at = now
    sess.last_seen_at = now
    # The previous access token now holds only for the grace window: waited for if that is
    # shorter than a lease.
    ends_access(db, wait=state.settings.refresh_grace < state.base_settings.session_lease)
    db.flush()
    return Issued(sess, user, _access_token(state, user, sess), exp, child, child_expires)


def _reuse(
    db: DBSession,
    state: State,
    sess: Session,
    user: User,
    row: RefreshToken,
    presented: str,
    now: dt.datetime,
) -> Issued:
    if sess.revoked_at is not None:
        # Ended (a logout, a reuse caught by another request) since this request first read
        # it: as for any refresh of an ended session, no reuse of a token of a live one.
        raise InvalidGrant()
    child = _next_refresh_token(state, presented)
    child_row = db.scalar(select(RefreshToken).where(RefreshToken.token_hash == digest(child)))
    in_grace = (
        row.used_at is not None
        and now - row.used_at <= dt.timedelta(seconds=state.settings.refresh_grace)
        and child_row is not None
        and child_row.used_at is None  # the pair handed out is still the session's newest
    )
    if in_grace:
        assert child_row is not None
        # The same pair again: the same refresh token, and the access token of this generation.
        return Issued(
            sess, user, _access_token(state, user, sess), sess.access_exp, child,
            child_row.expires_at,
        )
    revoke_session(db, sess, now, "refresh_reuse")
    raise RefreshReused(sess)


class RefreshReused(InvalidGrant):
    """A rotated-away refresh token came back: the session is revoked (the caller commits)."""

    code = "refresh_token_reused"
    message = "The refresh token was already used; the session has been ended."

    def __init__(self, sess: Session) -> None:
        super().__init__()
        self.session = sess


def revoke_session(db: DBSession, sess: Session, now: dt.datetime, reason: str) -> None:
    if sess.revoked_at is None:
        sess.revoked_at = now
        sess.revoke_reason = reason
        ends_access(db)


def revoke_user_sessions(
    db: DBSession, user_id: int, now: dt.datetime, reason: str, keep: str | None = None,
    *, started_before: dt.datetime | None = None,
) -> int:
    """End every live session of a user, except ``keep`` (and, given ``started_before``, except
    the sessions begun at or after that moment); returns how many."""
    stmt = (
        update(Session)
        .where(Session.user_id == user_id, Session.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason)
    )
    if keep is not None:
        stmt = stmt.where(Session.id != keep)
    if started_before is not None:
        stmt = stmt.where(Session.created_at < started_before)
    return _end(db, stmt)


def revoke_all_sessions(db: DBSession, now: dt.datetime, reason: str) -> int:
    """End every live session of the site; returns how many."""
    return _end(db, update(Session).where(Session.revoked_at.is_(None))
                .values(revoked_at=now, revoke_reason=reason))


def _end(db: DBSession, stmt: t.Any) -> int:
    ended = rowcount(db.execute(stmt))
    if ended:
        ends_access(db)
    return ended


def revoke_by_refresh_token(db: DBSession, state: State, presented: str) -> Session | None:
    """End the session of a refresh token; returns it (None if unknown or already ended)."""
    row = db.scalar(select(RefreshToken).where(RefreshToken.token_hash == digest(presented)))
    # Locked: a request ending the session meanwhile goes first or after, never both.
    sess = db.get(Session, row.session_id, with_for_update=True) if row is not None else None
    if sess is None or sess.revoked_at is not None:
        return None
    revoke_session(db, sess, state.clock(), "revoked")
    return sess


SESSIONS_PAGE = 100  # sessions listed per page unless ``limit`` says otherwise
MAX_SESSIONS_PAGE = 500
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICRO = dt.timedelta(microseconds=1)


def live_sessions(db: DBSession, state: State, user_id: int,
                  args: t.Mapping[str, str]) -> tuple[list[Session], str | None]:
    """A page of the user's live sessions (neither ended nor past their absolute lifetime),
    newest first: ``limit`` (1 to 500, 100) and ``cursor`` (the ``next_cursor`` of the page
    before). Returns the page and the next cursor (None on the last page); 400 naming every bad
    parameter. An account with no session limit may gather any number of sessions, so the list
    is never read whole; a page is one range of the user's rows, and sessions started
    meanwhile never shift it."""
    errors: dict[str, list[str]] = {}
    limit, after = page_args(args, errors, default=SESSIONS_PAGE, maximum=MAX_SESSIONS_PAGE,
                             decode=_decode_position)
    if errors:
        raise ValidationFailed(fields=errors)
    stmt = (select(Session)
            .where(Session.user_id == user_id, Session.revoked_at.is_(None),
                   Session.expires_at > state.clock())
            .order_by(Session.created_at.desc(), Session.id.desc())
            .limit(limit + 1))
    if after is not None:
        stmt = stmt.where(tuple_(Session.created_at, Session.id) < after)
    rows = list(db.scalars(stmt))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    position = f"{(last.created_at - _EPOCH) // _MICRO}.{last.id}".encode()
    return rows[:limit], base64.urlsafe_b64encode(position).rstrip(b"=").decode()


def _decode_position(cursor: str) -> tuple[dt.datetime, str] | None:
    """The (start time, id) of the session a page ended on; None unless ``cursor`` is one
    :func:`live_sessions` returned."""
    if len(cursor) > 128:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        return None
    micros, dot, sid = raw.partition(".")
    if not (dot and micros.isascii() and micros.isdigit() and len(micros) <= 17
            and _SESSION_ID.fullmatch(sid)):
        return None
    return _EPOCH + int(micros) * _MICRO, sid


# An account's roles as read on every request, by their JSON text: a site has few distinct sets.
_ROLE_SETS: dict[str, tuple[str, ...]] = {}
_MAX_ROLE_SETS = 1024


def role_set(text: str) -> tuple[str, ...]:
    """The roles of an account from the JSON text of its ``roles`` column (strings only)."""
    roles = _ROLE_SETS.get(text)
    if roles is None:
        try:
            value = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            value = None
        roles = tuple(r for r in value if isinstance(r, str)) if isinstance(value, list) else ()
        if len(_ROLE_SETS) >= _MAX_ROLE_SETS:
            _ROLE_SETS.clear()
        _ROLE_SETS[text] = roles
    return roles


class SessionReader:
    """The read of :func:`check_session`, made cheap enough to run on every request.

    One statement (a primary-key read of the session joined to its user: the session's state,
    the account's status and its roles as they are now), compiled once per
    engine, run on the process's kept connections (:mod:`agent.direct`) outside any
    transaction, so it sees every revocation committed before it, by any worker or instance.
    On PostgreSQL the read is a statement
    prepared once per connection, run through libpq with its row in binary format: a psycopg
    cursor's own bookkeeping cost about 50 µs of CPU more, a sixth of a protected request's
    work in one process. On SQLite the driver runs it, kept prepared in its statement cache.

    A row read is leased for ``SESSION_LEASE_MS`` (20 ms), counted from before the read was
    sent: until then a request with the same session may be answered from it, if the row
    accepts its token (otherwise the row is read again). Every change that takes access away
    (:func:`ends_access`) forgets this process's leases when it commits, and answers only after
    one lease has passed, so no worker or instance answers from a row read before the change
    to a request sent after the change's answer.
    """

    MAX_LEASES = 1024  # sessions a worker checks within one lease: a few dozen

    def __init__(self, engine: Engine) -> None:
        sessions, users = Session.__table__, User.__table__
        columns = [sessions.c.user_id, sessions.c.revoked_at, sessions.c.expires_at,
                   sessions.c.access_jti, sessions.c.prev_access_jti, sessions.c.rotated_at,
                   users.c.status, type_coerce(users.c.roles, Text)]
        stmt = (select(*columns).join(users, users.c.id == sessions.c.user_id)
                .where(sessions.c.id == bindparam("sid")))
        self.conns = connections(engine)
        self.statement = self.conns.statement(stmt)
        self.leases: dict[str, tuple[float, tuple[t.Any, ...]]] = {}

    def fetch(self, sid: str, lease: float = 0.0) -> tuple[t.Any, ...] | None:
        """The session's row as it is now, leased for ``lease`` seconds if there is one."""
        sent = time.monotonic()
        statement, values = self.statement, self.statement.encode({"sid": sid})
        rows = self.conns.run(lambda conn: statement.run(self.conns, conn, values))
        if not rows:
            return None
        if lease:
            if len(self.leases) >= self.MAX_LEASES:
                self.leases.clear()
            self.leases[sid] = (sent + lease, rows[0])
        return rows[0]

    def leased(self, sid: str) -> tuple[t.Any, ...] | None:
        """The session's row as read within its lease, or None."""
        held = self.leases.get(sid)
        if held is None:
            return None
        if time.monotonic() >= held[0]:
            self.leases.pop(sid, None)
            return None
        return held[1]

    def forget(self) -> None:
        self.leases.clear()


session_reader = per_engine(SessionReader)


def check_session(state: State, claims: dict[str, t.Any]) -> tuple[str, ...]:
    """The revocation check on every authenticated request: one primary-key read, or its lease.

    The token must name a live session of its own user, and be that session's current access
    token (or the previous one, within the grace window after a refresh). Returns the
    account's roles as they are now: a role taken away holds from the next request on, not
    from the token's expiry.
    """
    reader = session_reader(state.engine)
    lease = state.base_settings.session_lease  # the site's own: a hub does not set it
    if lease and (held := reader.leased(claims["sid"])) is not None:
        roles = _accepted(state, claims, held)
        if roles is not None:
            return roles
    found = reader.fetch(claims["sid"], lease)
    roles = None if found is None else _accepted(state, claims, found)
    if roles is None:
        raise InvalidToken()
    return roles


def _accepted(state: State, claims: dict[str, t.Any], row: tuple[t.Any, ...],
              ) -> tuple[str, ...] | None:
    """The account's roles if its session's ``row`` accepts the token of ``claims``."""
    (user_id, revoked_at, expires_at, access_jti, prev_access_jti, rotated_at, status,
     roles) = row
    if revoked_at is not None or status != "active":
        return None
    if str(user_id) != claims["sub"]:
        return None
    now = state.clock()
    if now >= expires_at:
        return None
    jti = claims["jti"]
    if hmac.compare_digest(jti, access_jti):
        return role_set(roles)
    if (
        prev_access_jti is not None
        and rotated_at is not None
        and hmac.compare_digest(jti, prev_access_jti)
        and now - rotated_at <= dt.timedelta(seconds=state.settings.refresh_grace)
    ):
        return role_set(roles)
    return None


_ENDS_ACCESS = "headlesskey_ends_access"


def ends_access(db: DBSession, *, wait: bool = True) -> None:
    """Mark the transaction of ``db`` as one that takes access away (a session ended, an
    account's roles changed). When it commits, this process forgets its leased session rows
    and, with ``wait``, the commit returns only after one lease (``SESSION_LEASE_MS``): by then
    no worker or instance still holds a row read before the change (:class:`SessionReader`)."""
    if db.info.get(_ENDS_ACCESS) is not True:
        db.info[_ENDS_ACCESS] = wait


def install(state: State) -> None:
    """Make the commits marked by :func:`ends_access` keep the leases' promise; a rollback drops
    the mark."""

    @event.listens_for(state.session_factory, "after_commit")
    def _after_commit(db: DBSession) -> None:
        wait = db.info.pop(_ENDS_ACCESS, None)
        if wait is None:
            return
        session_reader(state.engine).forget()
        lease = state.base_settings.session_lease
        if wait and lease:
            time.sleep(lease)

    @event.listens_for(state.session_factory, "after_soft_rollback")
    def _after_rollback(db: DBSession, _previous: t.Any) -> None:
        db.info.pop(_ENDS_ACCESS, None)
