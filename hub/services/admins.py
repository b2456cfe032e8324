"""Console administrators: argon2id passwords, lockout after repeated failures."""

from __future__ import annotations

import datetime as dt
import re
import typing as t

from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession

from agent.services.passwords import Hasher
from agent.services.passwords import policy_problems
from agent.text import holds_controls

from ..errors import BadRequest
from ..errors import Conflict
from ..errors import NotFound
from ..models import Admin
from ..models import Event
from . import events

if t.TYPE_CHECKING:
    from ..state import HubState

_USERNAME = re.compile(r"[A-Za-z0-9_.@-]{3,60}")
HASHER_KEY = "hub_hasher"
ADDRESS_LOCK = 0x686B6970  # PostgreSQL advisory lock space of console logins by address
NAME_LOCK = 0x686B6961  # PostgreSQL advisory lock space of admin creations by name


class LoginFailed(Exception):
    """Wrong username or password, or a locked account: one answer for all."""


class AddressBlocked(LoginFailed):
    """Too many failed logins from the client's address lately: no password is checked."""


def hasher(state: HubState) -> Hasher:
    cached = getattr(state, "_hasher", None)
    if cached is None:
        cached = Hasher(2, 19456, 1) if not state.config.get("TESTING") else Hasher(1, 8, 1)
        state._hasher = cached  # type: ignore[attr-defined]
    return t.cast(Hasher, cached)


def create(db: DBSession, state: HubState, username: str, password: str) -> Admin:
    if not _USERNAME.fullmatch(username):
        raise BadRequest(fields={"username": ["3 to 60 characters: letters, digits and _ . @ -"]})
    _check_password(username, password)
    # A name differing from an admin's in case only is taken: "Admin" beside "admin" reads as
    # one person in the activity log. Creations of one name take turns (on PostgreSQL a lock
    # to the end of the transaction; SQLite's BEGIN IMMEDIATE serialises writers already).
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:name))"),
                   {"space": NAME_LOCK, "name": username.lower()})
    taken = db.scalar(select(Admin.username).where(
        func.lower(Admin.username) == username.lower()).limit(1))
    if taken is not None:
        raise Conflict("That admin exists.", fields={"username": [
            "Already taken." if taken == username else f"Already taken (as {taken})."]})
    admin = Admin(username=username, password_hash=hasher(state).hash(password), active=True,
                  failures=0, created_at=state.clock())
    db.add(admin)
    try:
        db.flush()
    except IntegrityError:
        db.rollback()
        raise Conflict("That admin exists.", fields={"username": ["Already taken."]}) from None
    events.log(db, state, "admin.created", actor="cli", details={"username": username})
    return admin


def _check_password(username: str, password: str) -> None:
    """The password policy of a new or changed password: :class:`BadRequest` saying why."""
    if holds_controls(password):  # a NUL makes the console refuse the login form; a byte that
        # is no UTF-8 (read from stdin as a lone surrogate) cannot be hashed at all
        raise BadRequest("The password is not usable.", fields={"password": [
            "No control characters, and UTF-8 text only."]})
    problems = policy_problems(password, min_length=12, max_length=256, context=(username,))
    if problems:
        raise BadRequest("The password is too weak.", fields={"password": problems})


def get(db: DBSession, username: str, *, lock: bool = False) -> Admin:
    """The admin named ``username`` exactly (as sign-in finds it); with ``lock`` the row stays
    locked until the transaction ends, so a change takes turns with sign-ins of that admin."""
    if len(username) > 60 or holds_controls(username):  # no admin's name is like that
        raise NotFound(f"No admin {username!r}.", code="admin_not_found")
    stmt = select(Admin).where(Admin.username == username)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    admin = db.scalar(stmt)
    if admin is None:
        raise NotFound(f"No admin {username!r}.", code="admin_not_found")
    return admin


def list_admins(db: DBSession) -> list[Admin]:
    return list(db.scalars(select(Admin).order_by(Admin.username)))


def set_password(db: DBSession, state: HubState, admin: Admin, password: str, *,
                 actor: str) -> None:
    """A new password for ``admin`` (the policy of :func:`create`): every console session of
    theirs ends, and their failure count and lock are cleared."""
    _check_password(admin.username, password)
    admin.password_hash = hasher(state).hash(password)
    admin.failures = 0
    admin.locked_until = None
    admin.session_epoch += 1  # every cookie of this admin's sessions stops working
    events.log(db, state, "admin.password_set", actor=actor,
               details={"username": admin.username})


def unlock(db: DBSession, state: HubState, admin: Admin, *, actor: str) -> bool:
    """Clear ``admin``'s failure count and lock; whether they were locked."""
    was_locked = is_locked(state, admin, state.clock())
    admin.failures = 0
    admin.locked_until = None
    events.log(db, state, "admin.unlocked", actor=actor,
               details={"username": admin.username, "was_locked": was_locked})
    return was_locked


def set_active(db: DBSession, state: HubState, admin: Admin, active: bool, *,
               actor: str) -> bool:
    """Enable or disable ``admin``; whether that changed anything. A disabled admin's console
    sessions end at once, and their sign-ins are refused like a wrong password."""
    if admin.active == active:
        return False
    admin.active = active
    if not active:
        admin.session_epoch += 1  # every cookie of this admin's sessions stops working
    events.log(db, state, "admin.enabled" if active else "admin.disabled", actor=actor,
               details={"username": admin.username})
    return True


def authenticate(db: DBSession, state: HubState, username: str, password: str, ip: str) -> Admin:
    """The admin for a right password on an unlocked account; else :class:`LoginFailed`.

    A locked account answers like a wrong password (no "locked" oracle), and unknown names cost
    a dummy argon2 check. An address with too many recent failures gets :class:`AddressBlocked`
    (a :class:`LoginFailed`) before any of that.
    """
    now = state.clock()
    _take_turns_by_address(db, state, ip)
    if _address_blocked(db, state, ip, now):
        events.log(db, state, "admin.login_blocked", outcome="blocked", actor=username[:60], ip=ip)
        db.commit()
        raise AddressBlocked()
    # The row is locked (and read afresh) until the transaction ends: concurrent attempts on
    # one admin take turns, so each failure is counted and none outruns the lock.
    admin = (db.scalar(select(Admin).where(Admin.username == username).with_for_update()
                       .execution_options(populate_existing=True))
             if len(username) <= 60 else None)
    locked = admin is not None and is_locked(state, admin, now)
    ok = hasher(state).verify(admin.password_hash if admin else None, password)
    if admin is None or not ok or locked or not admin.active:
        if admin is not None and not locked:
            _count_failure(db, state, admin, now, ip)
        events.log(db, state, "admin.login_failed", outcome="failure", actor=username[:60], ip=ip)
        db.commit()
        raise LoginFailed()
    admin.failures = 0
    admin.locked_until = None
    admin.last_login_at = now
    if hasher(state).needs_rehash(admin.password_hash):
        admin.password_hash = hasher(state).hash(password)
    events.log(db, state, "admin.login", actor=username, ip=ip)
    return admin


def is_locked(state: HubState, admin: Admin, now: dt.datetime) -> bool:
    """Whether ``admin`` is locked at ``now``. A lock ending further ahead than
    ADMIN_LOCK_SECONDS was stamped by a clock that ran ahead and has been set back since: it is
    over, or the admin would be locked out for as long as the clock had run ahead."""
    until = admin.locked_until
    return until is not None and now < until <= now + dt.timedelta(
        seconds=state.setting("ADMIN_LOCK_SECONDS"))


def _count_failure(db: DBSession, state: HubState, admin: Admin, now: dt.datetime,
                   ip: str) -> None:
    """One more failed password (login or re-authentication); at ADMIN_MAX_FAILURES the admin
    is locked for ADMIN_LOCK_SECONDS and the count starts over."""
    admin.failures += 1
    if admin.failures >= state.setting("ADMIN_MAX_FAILURES"):
        admin.locked_until = now + dt.timedelta(seconds=state.setting("ADMIN_LOCK_SECONDS"))
        admin.failures = 0
        events.log(db, state, "admin.locked", outcome="info", actor=admin.username, ip=ip)


def _take_turns_by_address(db: DBSession, state: HubState, ip: str) -> None:
    """Logins from one address take turns until each has committed its outcome, so guesses
    sent at once cannot all pass :func:`_address_blocked` before any failure is counted. On
    PostgreSQL a lock held to the end of the transaction (SQLite's ``BEGIN IMMEDIATE``
    serialises writers already)."""
    if state.setting("ADMIN_IP_MAX_FAILURES") and ip and (
            db.get_bind().dialect.name == "postgresql"):
        db.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:ip))"),
                   {"space": ADDRESS_LOCK, "ip": ip[:64]})


def _address_blocked(db: DBSession, state: HubState, ip: str, now: dt.datetime) -> bool:
    """Whether ``ip`` failed ``ADMIN_IP_MAX_FAILURES`` logins within ``ADMIN_LOCK_SECONDS``
    (whatever the names tried), so names cannot be sprayed from one address, nor dummy hashes
    run at will. Refused attempts are not failures: a block ends one window after the last."""
    limit = state.setting("ADMIN_IP_MAX_FAILURES")
    if not limit or not ip:
        return False
    since = now - dt.timedelta(seconds=state.setting("ADMIN_LOCK_SECONDS"))
    failed = db.scalar(select(func.count()).select_from(Event).where(
        Event.event == "admin.login_failed", Event.source == "hub", Event.ip == ip[:64],
        Event.created_at > since))
    return bool(failed and failed >= limit)


def confirm(db: DBSession, state: HubState, admin: Admin, password: str, ip: str) -> bool:
    """Re-authentication of the signed-in ``admin`` before a sensitive change.

    A wrong password counts toward the admin's lock as a failed login does, so a stolen
    session cannot be used to guess it; a locked admin is refused whatever the password.
    """
    db.refresh(admin, with_for_update=True)  # as in authenticate: attempts take turns
    now = state.clock()
    locked = is_locked(state, admin, now)
    ok = hasher(state).verify(admin.password_hash, password[:1024])
    if ok and not locked and admin.active:
        admin.failures = 0
        events.log(db, state, "admin.reauthenticated", actor=admin.username, ip=ip)
        return True
    if not locked:
        _count_failure(db, state, admin, now, ip)
    events.log(db, state, "admin.reauth_failed", outcome="failure", actor=admin.username, ip=ip)
    return False
