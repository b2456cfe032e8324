"""Accounts: creation, authentication, password changes, and the plugin's user payloads."""

from __future__ import annotations

import datetime as dt
import json
import re
import typing as t
import unicodedata
from email.errors import MessageError
from email.message import EmailMessage

from sqlalchemy import Text
from sqlalchemy import bindparam
from sqlalchemy import func
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import type_coerce
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession
from sqlalchemy.orm import make_transient_to_detached

from ..direct import connections
from ..errors import IncorrectPassword
from ..errors import InvalidCredentials
from ..errors import UsernameTaken
from ..errors import ValidationFailed
from ..errors import WeakPassword
from ..models import AuditEvent
from ..models import User
from . import lockout
from . import sessions
from .passwords import policy_problems

if t.TYPE_CHECKING:
    from ..extension import State

_LOGIN = re.compile(r"[A-Za-z0-9_.@+-]{3,60}")
# An ASCII dot-atom (RFC 5322) at a dotted host name whose last label is a name: no quoted
# strings, comments, IP literals or non-ASCII, which mail headers would rewrite or refuse.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(
    rf"{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])"
)


def key_of(text: str) -> str:
    """The case-insensitive key of a login or email (NFKC + casefold)."""
    return unicodedata.normalize("NFKC", text).casefold().strip()


def valid_login(text: str) -> bool:
    return bool(_LOGIN.fullmatch(text))


def valid_email(text: str) -> bool:
    """Whether mail to ``text`` goes to exactly that one address.

    Beyond the pattern, the address must come back unchanged from a mail header: the header
    parser reads ``=?...?=`` as an encoded word, so an address that holds one would be mailed
    to another address than the one stored.
    """
    local, _at, _domain = text.partition("@")
    if len(text) > 254 or len(local) > 64 or not _EMAIL.fullmatch(text):
        return False
    msg = EmailMessage()
    try:
        msg["To"] = text
        header = msg["To"]
        addresses = header.addresses
    except (MessageError, ValueError):
        return False
    return not header.defects and [a.addr_spec for a in addresses] == [text]


# Built once: every login runs it.
_FIND_USER = select(User).where(or_(User.login_key == bindparam("key"),
                                    User.email_key == bindparam("key")))


def find_user(db: DBSession, login: str) -> User | None:
    """The user whose login or email is ``login`` (case-insensitive)."""
    return db.scalar(_FIND_USER, {"key": key_of(login)})


_USER_COLUMNS = [c if c.key != "roles" else type_coerce(c, Text).label("roles")
                 for c in t.cast(t.Any, User.__table__).c]
_FIND_USER_ROW = select(*_USER_COLUMNS).where(
    or_(User.login_key == bindparam("key"), User.email_key == bindparam("key")))
_USER_COLUMNS_SQL = ", ".join(f'"{c.name}"' for c in t.cast(t.Any, User.__table__).c)


def find_for_login(
    state: State, login: str, ip: str
) -> tuple[User | None, set[str] | None]:
    """:func:`find_user` for a login from ``ip``: the account read outside any transaction,
    detached (the password check that follows holds nothing open; the caller ``merge``s it
    back into its session to write), and the keys of the brute-force counters on which the same
    statement already reserved the attempt, for :func:`lockout.acquire` (None: none reserved).

    One statement on the kept connections (:mod:`agent.direct`), without a pooled
    connection's checkout and ping; on PostgreSQL it also reserves the attempt when the
    counters are in the database (:func:`lockout.find_and_reserve`).
    """
    key = key_of(login)
    keys = lockout.keys_for(state, user_id=None, login=login, ip=ip)
    found = lockout.find_and_reserve(state, _USER_COLUMNS_SQL, key, keys)
    if found is None:
        rows = connections(state.engine).execute(_FIND_USER_ROW, {"key": key})
        row, taken = (rows[0] if rows else None), None
    else:
        row, taken = found
    if row is None:
        return None, taken
    fields = dict(zip([c.key for c in _USER_COLUMNS], row, strict=True))
    fields["roles"] = json.loads(fields["roles"])
    user = User(**fields)
    make_transient_to_detached(user)  # as if loaded, then detached
    return user, taken


def user_payload(user: User) -> dict[str, t.Any]:
    """The plugin's ``user`` object in token responses."""
    return {
        "ID": user.id,
        "user_login": user.user_login,
        "user_email": user.email,
        "display_name": user.display_name,
        "roles": list(user.roles),
    }


def profile_payload(user: User) -> dict[str, t.Any]:
    """The full profile returned by ``/login`` and ``/me``."""
    payload = user_payload(user)
    payload.update(
        {
            "user_registered": user.created_at.isoformat().replace("+00:00", "Z"),
            "email_verified": user.email_verified,
            "status": user.status,
        }
    )
    return payload


def create_user(
    db: DBSession,
    state: State,
    *,
    username: str,
    email: str,
    password: str,
    display_name: str | None = None,
    roles: list[str] | None = None,
) -> User:
    """Create an account after checking the fields and the password policy.

    Raises :class:`ValidationFailed`, :class:`WeakPassword`, or :class:`UsernameTaken`; an
    email that is taken raises ``ValidationFailed`` with ``code="email_taken"`` and callers
    that must not reveal it (``/register``) catch that.
    """
    fields: dict[str, list[str]] = {}
    # A username with @ must be its account's own email: taken, it is a taken email, answered
    # as one, so /register does not tell which emails have accounts.
    email_shaped = "@" in username
    if not valid_login(username):
        fields["username"] = ["3 to 60 characters: letters, digits and _ . @ + -"]
    if not valid_email(email):
        fields["email"] = ["A valid email address is required."]
    elif email_shaped and key_of(username) != key_of(email):
        # Logins are looked up by username or email: a username shaped like someone else's
        # address would capture their email logins and resets.
        fields["username"] = ["A username containing @ must be your own email address."]
    if display_name is not None and not (0 < len(display_name.strip()) <= 250):
        fields["display_name"] = ["1 to 250 characters."]
    if fields:
        raise ValidationFailed(fields=fields)
    check_password_policy(state, password, username=username, email=email)
    # Hash before looking for a clash: a taken email then costs the same time as a new one.
    password_hash = state.hasher.hash(password)
    login_key, email_key = key_of(username), key_of(email)
    clash = db.scalars(
        select(User).where(or_(User.login_key == login_key, User.email_key == email_key))
    ).all()
    if not email_shaped and any(u.login_key == login_key for u in clash):
        raise UsernameTaken()
    if clash:
        raise ValidationFailed("That email is already registered.", code="email_taken")
    now = state.clock()
    s = state.settings
    user = User(
        user_login=username,
        login_key=login_key,
        email=email.strip(),
        email_key=email_key,
        display_name=(display_name or username).strip(),
        password_hash=password_hash,
        roles=list(roles or [s.default_role]),
        status="active",
        email_verified=False,
        created_at=now,
        password_changed_at=now,
    )
    db.add(user)
    try:
        db.flush()
    except IntegrityError:
        # A concurrent registration took the name or the email between our check and the insert.
        db.rollback()
        if not email_shaped and db.scalar(
                select(User.id).where(User.login_key == login_key)) is not None:
            raise UsernameTaken() from None
        raise ValidationFailed("That email is already registered.", code="email_taken") from None
    return user


MAX_ROLES = 32
MAX_USERS_PAGE = 500
USER_STATUSES = ("active", "disabled")


def list_users(db: DBSession, args: t.Mapping[str, str]) -> tuple[list[User], str | None]:
    """A page of accounts by ID, for administrators: ``login`` (a username or email, as a login
    matches it), ``status``, ``limit`` (1 to 500, 50) and ``cursor`` (the ``next_cursor`` of
    the page before). Returns the page and the next cursor (None on the last page); 400 naming
    every bad parameter."""
    from ..db import MAX_ID
    from ..text import holds_controls
    from .audit import whole_number

    def number(name: str, low: int, high: int) -> int | None:
        value = args.get(name, "")
        if not value:
            return None
        parsed = whole_number(value)
        if parsed is not None and low <= parsed <= high:
            return parsed
        errors[name] = [f"An integer from {low} to {high}."]
        return None

    errors: dict[str, list[str]] = {}
    limit = number("limit", 1, MAX_USERS_PAGE) or 50
    after = number("cursor", 0, MAX_ID) or 0
    login = args.get("login", "")
    if len(login) > 254 or holds_controls(login):
        errors["login"] = ["A username or email: at most 254 characters, no control characters."]
    status = args.get("status", "")
    if status and status not in USER_STATUSES:
        errors["status"] = [f"One of: {', '.join(USER_STATUSES)}."]
    if errors:
        raise ValidationFailed(fields=errors)
    stmt = select(User).where(User.id > after).order_by(User.id).limit(limit + 1)
    if login:
        key = key_of(login)
        stmt = stmt.where(or_(User.login_key == key, User.email_key == key))
    if status:
        stmt = stmt.where(User.status == status)
    rows = list(db.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (str(rows[-1].id) if more else None)


def role_list(value: t.Any) -> list[str]:
    """The roles an administrator gives an account: a JSON list of 0 to ``MAX_ROLES`` role
    names (:func:`agent.config.check_role`), a name given twice kept once, in order."""
    from ..config import check_role
    from ..errors import ConfigError

    if not isinstance(value, list):
        raise ValidationFailed(fields={"roles": ["A list of role names."]})
    roles: list[str] = []
    problems: list[str] = []
    for role in value:
        try:
            role = check_role("roles", role)
        except ConfigError:
            problems.append("Each role is 1 to 64 printable characters, no space at either end.")
            continue
        if role not in roles:
            roles.append(role)
    if len(roles) > MAX_ROLES:
        problems.append(f"At most {MAX_ROLES} roles.")
    if problems:
        raise ValidationFailed(fields={"roles": sorted(set(problems))})
    return roles


def set_roles(db: DBSession, user: User, roles: list[str]) -> list[str]:
    """Give ``user`` (locked by the caller) exactly ``roles``; returns the roles it had. The
    change holds from the account's next request on: every request checks the roles stored,
    and the change answers once no worker holds an older read (sessions.ends_access)."""
    before = list(user.roles or [])
    if before != roles:
        user.roles = list(roles)
        sessions.ends_access(db)
    return before


def may_send_taken_notice(db: DBSession, state: State, user: User) -> bool:
    """Whether the owner of ``user`` may be mailed another notice that someone tried to register
    with their email: fewer than ``RESET_MAX_PER_HOUR`` went out within the hour (the audit rows
    ``user.registered`` with outcome ``failure``).

    Attempts for one account take turns (a row lock on it, held until the caller commits its
    audit row; SQLite's write transaction already is one), so concurrent ones never each count
    the same notices.
    """
    now = state.clock()
    db.execute(select(User.id).where(User.id == user.id).with_for_update())
    sent = db.scalar(
        select(func.count())
        .select_from(AuditEvent)
        .where(AuditEvent.user_id == user.id,
               AuditEvent.event == "user.registered",
               AuditEvent.outcome == "failure",
               AuditEvent.created_at > now - dt.timedelta(hours=1))
    )
    return (sent or 0) < state.settings.reset_max_per_hour


def check_password_policy(state: State, password: str, *, username: str, email: str) -> None:
    """The built-in policy plus the ``password_policy`` filters; raises :class:`WeakPassword`."""
    s = state.settings
    context = (username, email.partition("@")[0], s.site_name)
    problems = policy_problems(
        password, min_length=s.password_min_length, max_length=s.password_max_length,
        context=context,
    )
    problems = state.apply_filter(
        "password_policy", problems, password, {"username": username, "email": email}
    )
    if problems:
        raise WeakPassword(fields={"password": list(problems)})


def check_credentials(state: State, user: User | None, password: str) -> User:
    """Return ``user`` if ``password`` is right and the account active, else raise.

    Unknown users cost one dummy argon2 verification, so timing does not tell them apart, and
    every failure (unknown, wrong password, disabled) gives the same :class:`InvalidCredentials`.
    Call it outside any write transaction: the hash takes tens of milliseconds.
    """
    ok = state.hasher.verify(user.password_hash if user else None, password)
    if not ok or user is None or user.status != "active":
        raise InvalidCredentials()
    return user


def set_password(db: DBSession, state: State, user: User, new_password: str) -> None:
    check_password_policy(state, new_password, username=user.user_login, email=user.email)
    _store_hash(state, user, state.hasher.hash(new_password))


def _store_hash(state: State, user: User, password_hash: str) -> None:
    user.password_hash = password_hash
    user.password_changed_at = state.clock()


def change_password(
    db: DBSession, state: State, user: User, new_hash: str, keep_session: str
) -> int:
    """Store ``new_hash`` (of a new password the policy accepted) and end every other session;
    returns how many were ended.

    The caller has checked the current password (see :func:`check_current_password`).
    """
    _store_hash(state, user, new_hash)
    return sessions.revoke_user_sessions(db, user.id, state.clock(), "password_changed",
                                         keep_session)


def check_current_password(state: State, user: User, current: str) -> None:
    if not state.hasher.verify(user.password_hash, current):
        raise IncorrectPassword()


def notify_password_changed(state: State, user: User, when: dt.datetime) -> None:
    """Tell the owner their password changed (ASVS 6.3.7), so a takeover does not go unseen."""
    state.mailer.send_later(
        user.email,
        f"Your {state.settings.site_name} password was changed",
        f"Hello {user.display_name},\n\n"
        f"The password of your account {user.user_login} at {state.settings.site_name} was "
        f"changed on {when:%Y-%m-%d %H:%M} UTC, and your other sessions were ended.\n\n"
        "If this was not you, reset your password now and contact the site's administrator.\n",
    )
