"""Accounts: creation, authentication, password changes, and the plugin's user payloads."""

from __future__ import annotations

import datetime as dt
import re
import typing as t
import unicodedata

from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession

from ..errors import IncorrectPassword
from ..errors import InvalidCredentials
from ..errors import UsernameTaken
from ..errors import ValidationFailed
from ..models import User
from . import sessions
from .passwords import check_policy

if t.TYPE_CHECKING:
    from ..extension import State

_LOGIN = re.compile(r"[A-Za-z0-9_.@+-]{3,60}")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s.]{2,63}")


def key_of(text: str) -> str:
    """The case-insensitive key of a login or email (NFKC + casefold)."""
    return unicodedata.normalize("NFKC", text).casefold().strip()


def valid_login(text: str) -> bool:
    return bool(_LOGIN.fullmatch(text))


def valid_email(text: str) -> bool:
    return len(text) <= 254 and bool(_EMAIL.fullmatch(text))


def find_user(db: DBSession, login: str) -> User | None:
    """The user whose login or email is ``login`` (case-insensitive)."""
    key = key_of(login)
    return db.scalar(select(User).where(or_(User.login_key == key, User.email_key == key)))


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
    if not valid_login(username):
        fields["username"] = ["3 to 60 characters: letters, digits and _ . @ + -"]
    if not valid_email(email):
        fields["email"] = ["A valid email address is required."]
    if display_name is not None and not (0 < len(display_name.strip()) <= 250):
        fields["display_name"] = ["1 to 250 characters."]
    if fields:
        raise ValidationFailed(fields=fields)
    s = state.settings
    check_policy(
        password,
        min_length=s.password_min_length,
        max_length=s.password_max_length,
        context=(username, email.partition("@")[0], s.site_name),
    )
    # Hash before looking for a clash: a taken email then costs the same time as a new one.
    password_hash = state.hasher.hash(password)
    login_key, email_key = key_of(username), key_of(email)
    clash = db.scalars(
        select(User).where(or_(User.login_key == login_key, User.email_key == email_key))
    ).all()
    if any(u.login_key == login_key for u in clash):
        raise UsernameTaken()
    if clash:
        raise ValidationFailed("That email is already registered.", code="email_taken")
    now = state.clock()
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
        # A concurrent registration took the name between our check and the insert.
        db.rollback()
        raise UsernameTaken() from None
    return user


def authenticate(db: DBSession, state: State, login: str, password: str) -> User:
    """Return the user for a correct login and password, or raise :class:`InvalidCredentials`.

    Unknown users cost one dummy argon2 verification, so timing does not tell them apart, and
    every failure (unknown, wrong password, disabled) gives the same error.
    """
    user = find_user(db, login)
    ok = state.hasher.verify(user.password_hash if user else None, password)
    if not ok or user is None or user.status != "active":
        raise InvalidCredentials()
    if state.hasher.needs_rehash(user.password_hash):
        user.password_hash = state.hasher.hash(password)
    return user


def set_password(db: DBSession, state: State, user: User, new_password: str) -> None:
    s = state.settings
    check_policy(
        new_password,
        min_length=s.password_min_length,
        max_length=s.password_max_length,
        context=(user.user_login, user.email.partition("@")[0], s.site_name),
    )
    user.password_hash = state.hasher.hash(new_password)
    user.password_changed_at = state.clock()


def change_password(
    db: DBSession, state: State, user: User, current: str, new: str, keep_session: str
) -> int:
    """Change the password and end every other session; returns how many were ended."""
    if not state.hasher.verify(user.password_hash, current):
        raise IncorrectPassword()
    set_password(db, state, user, new)
    return sessions.revoke_user_sessions(db, user.id, state.clock(), "password_changed", keep_session)


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
