"""Password recovery by a mailed link or a one-time code.

- Link tokens carry 256 bits from a CSPRNG; codes are ``RESET_OTP_LENGTH`` random digits.
- Both are stored as ``HMAC-SHA256(k_reset, user id | kind | secret)``: a copy of the database
  alone cannot test a guess of a 6-digit code offline, and a code is bound to its user.
- Single use, an expiry (link 1 h, code 10 min by default), the newest request voids older
  ones, and a code is burned after ``RESET_OTP_MAX_ATTEMPTS`` wrong tries.
- At most ``RESET_MAX_PER_HOUR`` reset mails per account per hour (no mail bombing); further
  requests are recorded and dropped without a mail, with the same answer.
- The answer to ``/forgot-password`` never depends on whether the account exists, nor does its
  time: the lookup and what follows run after it, on a background thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
import time
import typing as t
from urllib.parse import urlencode

from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session as DBSession

from .. import events
from ..db import rowcount
from ..errors import InvalidResetToken
from ..errors import ServiceUnavailable
from ..models import PasswordReset
from ..models import User
from . import accounts
from . import sessions

log = logging.getLogger("headlesskey.recovery")
if t.TYPE_CHECKING:
    from flask import Flask

    from ..extension import State
    from .sessions import ClientInfo


CODE_ALPHABET = "0123456789"


CODE_SEPARATORS = frozenset(" \t\u00a0-")  # space, tab, no-break space (mail clients), dash


def normalise_code(code: str) -> str:
    """A code as typed or pasted, without the spaces, tabs and dashes people put around or
    inside it (``123 456``, ``123-456``). Codes are digits alone, so no two codes become one;
    anything else stays and makes the code wrong (a line break or another control character
    is refused by the form, as in every field)."""
    return "".join(c for c in code if c not in CODE_SEPARATORS)


def _digest(state: State, user_id: int, kind: str, secret: str) -> str:
    message = f"{user_id}|{kind}|{secret}".encode()
    return hmac.new(state.reset_key, message, hashlib.sha256).hexdigest()


def request_reset_later(app: Flask, state: State, login: str, delivery: str,
                        client: ClientInfo) -> None:
    """Hand a ``/forgot-password`` request to the background thread (agent.background).

    The answer then costs the same for every login: an existing account's rows and mail, a
    disabled or unknown one's single audit row, are written after it, so its time tells
    nothing about which accounts exist. A database that is down is tried again for a while.
    """
    state.background.submit(_request_reset_job, app, state, login, delivery, client)


RETRY_DELAYS = (1.0, 3.0, 10.0)


def _request_reset_job(app: Flask, state: State, login: str, delivery: str,
                       client: ClientInfo) -> None:
    for delay in (0.0, *RETRY_DELAYS):
        time.sleep(delay)
        try:
            with app.app_context(), state.session_factory() as db:
                request_reset(db, state, login, delivery, client)
            return
        except (ServiceUnavailable, DBAPIError) as exc:
            error = type(exc).__name__
    # The login is not logged: it may be an email address, and it may be anyone's.
    log.error("a password reset request was dropped: the database stayed unavailable (%s)",
              error)


def request_reset(
    db: DBSession, state: State, login: str, delivery: str, client: ClientInfo
) -> User | None:
    """Record a reset for the account named ``login`` (if any), commit, and queue its mail.

    The audit event is written either way, so both answers cost the same work.
    """
    user = accounts.find_user(db, login)
    if user is None or user.status != "active":
        events.record(db, state, "password.reset_requested", outcome="ignored", client=client,
                      login=login, details={"delivery": delivery})
        db.commit()
        return None
    s = state.settings
    now = state.clock()
    # Requests for one account take turns (a row lock; SQLite's write transaction already is
    # one): concurrent ones could each count the same mails and each leave a live code.
    db.execute(select(User.id).where(User.id == user.id).with_for_update())
    sent = db.scalar(
        select(func.count())
        .select_from(PasswordReset)
        .where(PasswordReset.user_id == user.id,
               PasswordReset.created_at > now - dt.timedelta(hours=1))
    )
    if (sent or 0) >= s.reset_max_per_hour:
        # Mail bombing: no further mail this hour, and the answer stays the same.
        events.record(db, state, "password.reset_requested", outcome="blocked", client=client,
                      user_id=user.id, login=login,
                      details={"delivery": delivery, "reason": "too_many_requests"})
        db.commit()
        return None
    # The newest request wins: every older, unused link or code of this user stops working.
    db.execute(
        update(PasswordReset)
        .where(PasswordReset.user_id == user.id, PasswordReset.used_at.is_(None))
        .values(used_at=now)
    )
    if delivery == "otp":
        secret = "".join(secrets.choice(CODE_ALPHABET) for _ in range(s.reset_otp_length))
        ttl = s.reset_otp_ttl
    else:
        secret = secrets.token_urlsafe(32)
        ttl = s.reset_link_ttl
    db.add(
        PasswordReset(
            user_id=user.id,
            kind=delivery,
            secret_hash=_digest(state, user.id, delivery, secret),
            created_at=now,
            expires_at=now + dt.timedelta(seconds=ttl),
            attempts=0,
        )
    )
    events.record(db, state, "password.reset_requested", client=client, user_id=user.id,
                  login=login, details={"delivery": delivery})
    db.commit()
    minutes = ttl // 60
    if delivery == "otp":
        body = (
            f"Hello {user.display_name},\n\nYour password reset code for {s.site_name} is:\n\n"
            f"    {secret}\n\nIt expires in {minutes} minutes and works once. If you did not ask "
            "for it, ignore this mail: your password is unchanged.\n"
        )
    else:
        # The reset page may carry a query of its own: login and token are added to it.
        joint = "&" if "?" in s.reset_url else "?"
        link = f"{s.reset_url}{joint}{urlencode({'login': user.user_login, 'token': secret})}"
        body = (
            f"Hello {user.display_name},\n\nTo choose a new password for {s.site_name}, open:\n\n"
            f"{link}\n\nThe link expires in {minutes} minutes and works once. If you did not "
            "ask for it, ignore this mail: your password is unchanged.\n"
        )
    state.mailer.send_later(user.email, f"Reset your {s.site_name} password", body)
    return user


def reset_password(
    db: DBSession,
    state: State,
    *,
    login: str,
    new_password: str,
    token: str | None,
    otp: str | None,
) -> User:
    """Check the link token or code and set the new password; ends every session of the user.

    A code is compared without spaces and dashes (:func:`normalise_code`). A wrong code counts
    an attempt (committed even though the call fails); every failure (a disabled account's
    too) raises the same :class:`InvalidResetToken`.
    """
    kind, secret = ("otp", normalise_code(otp)) if otp is not None else ("link", token)
    if not secret or len(secret) > 128:
        raise InvalidResetToken()
    user = accounts.find_user(db, login)
    now = state.clock()
    record = None
    if user is not None:
        # The account's row first, as /forgot-password takes it before the codes' rows: taken
        # the other way round, a reset and a new request waited on each other (a deadlock on
        # PostgreSQL, one of them answered 503). SQLite's write transaction already is one.
        status = db.scalar(select(User.status).where(User.id == user.id).with_for_update())
        # A disabled account's codes and links stop working (none are mailed to it either).
        record = None if status != "active" else db.scalar(
            select(PasswordReset)
            .where(
                PasswordReset.user_id == user.id,
                PasswordReset.kind == kind,
                PasswordReset.used_at.is_(None),
            )
            .order_by(PasswordReset.id.desc())
            .limit(1)
            # Locked until the commit: concurrent tries of one code take turns, so each wrong
            # one is counted (none lost to another's write of ``attempts``).
            .with_for_update()
        )
    if user is None or record is None or now >= record.expires_at:
        raise InvalidResetToken()
    if not hmac.compare_digest(record.secret_hash, _digest(state, user.id, kind, secret)):
        if kind == "otp":
            # A code has few digits, so guesses are counted; a link token has 256 bits and is
            # not, so nobody can void a user's link by posting wrong ones.
            record.attempts += 1
            if record.attempts >= state.settings.reset_otp_max_attempts:
                record.used_at = now  # burned: a new code must be requested
            db.commit()
        raise InvalidResetToken()
    # Check the policy before spending the token, so a weak choice can be corrected.
    accounts.set_password(db, state, user, new_password)
    claimed = rowcount(db.execute(
        update(PasswordReset)
        .where(PasswordReset.id == record.id, PasswordReset.used_at.is_(None))
        .values(used_at=now)
    ))
    if claimed != 1:  # a concurrent request used it first
        db.rollback()
        raise InvalidResetToken()
    sessions.revoke_user_sessions(db, user.id, now, "password_reset")
    return user
