"""The REST API, compatible with the HeadlessKey WordPress plugin: thin views over services."""

from __future__ import annotations

import datetime as dt
import hmac
import typing as t

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import jsonify
from flask import request
from sqlalchemy import bindparam
from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession
from sqlalchemy.orm.attributes import set_committed_value
from werkzeug.routing import IntegerConverter

from . import events
from . import federation
from .config import Settings
from .db import DATABASE_ERRORS
from .db import MAX_ID
from .db import unavailable
from .direct import connections
from .direct import insert_if
from .errors import AgentError
from .errors import Forbidden
from .errors import IncorrectPassword
from .errors import InvalidCredentials
from .errors import InvalidResetToken
from .errors import InvalidToken
from .errors import NotFound
from .errors import RegistrationClosed
from .errors import ValidationFailed
from .errors import WeakPassword
from .extension import State
from .extension import authenticate_request
from .extension import bearer_token
from .extension import client_ip
from .extension import enforce_access
from .extension import error_response
from .extension import get_db
from .extension import get_state
from .extension import read_json
from .extension import url_holds_nul
from .hub_client import HubUnavailable
from .models import Session
from .models import User
from .services import accounts
from .services import audit
from .services import lockout
from .services import recovery
from .services import sessions
from .services.sessions import ClientInfo
from .services.sessions import Issued
from .services.tokens import verify_access_token
from .text import holds_controls

MAX_PASSWORD_INPUT = 4096


class Form:
    """Reads typed fields from a JSON body, collecting every problem before failing."""

    def __init__(self, data: dict[str, t.Any]) -> None:
        self.data = data
        self.errors: dict[str, list[str]] = {}

    def text(self, name: str, *, required: bool = True, max_length: int = 254) -> str | None:
        value = self.data.get(name)
        if value is None or value == "":
            if required:
                self.errors.setdefault(name, []).append("This field is required.")
            return None
        if not isinstance(value, str):
            self.errors.setdefault(name, []).append("Must be a string.")
            return None
        if len(value) > max_length:
            self.errors.setdefault(name, []).append(f"At most {max_length} characters.")
            return None
        if holds_controls(value):
            self.errors.setdefault(name, []).append("Control characters are not allowed.")
            return None
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.data.get(name, default)
        if value not in choices:
            self.errors.setdefault(name, []).append(f"One of: {', '.join(choices)}.")
            return default
        return t.cast(str, value)

    def done(self) -> None:
        if self.errors:
            raise ValidationFailed(fields=self.errors)


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(int(timestamp), dt.UTC).isoformat().replace("+00:00", "Z")


def _user_json(user: User, *, full_profile: bool = False) -> dict[str, t.Any]:
    payload = accounts.profile_payload(user) if full_profile else accounts.user_payload(user)
    return t.cast(dict[str, t.Any], get_state().apply_filter("user_payload", payload, user))


def _token_response(issued: Issued, *, full_profile: bool = False) -> Response:
    state = get_state()
    now = state.clock().timestamp()
    user = issued.user
    body = {
        "token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": max(0, int(issued.access_exp - now)),
        "expiration": _iso(issued.access_exp),
        "refreshable": True,
        "jti": issued.session.access_jti,
        "sid": issued.session.id,
        "refresh_token": issued.refresh_token,
        "refresh_token_expires_in": max(0, int(issued.refresh_expires_at.timestamp() - now)),
        "refresh_expiration": _iso(issued.refresh_expires_at.timestamp()),
        "user": _user_json(user, full_profile=full_profile),
    }
    return jsonify(state.apply_filter("login_response", body, user))


def _client() -> ClientInfo:
    # The User-Agent is kept (sessions, activity log) without control characters: PostgreSQL
    # text holds no NUL, and some WSGI servers pass one on.
    agent = request.headers.get("User-Agent", "")[:512]
    if holds_controls(agent):
        agent = "".join(c for c in agent if not holds_controls(c))
    return ClientInfo(ip=client_ip(), user_agent=agent)


def _guarded_password_check(
    db: DBSession,
    state: State,
    *,
    user: User | None,
    login: str,
    check: t.Callable[[], t.Any],
    event: str,
    client: ClientInfo,
    release: bool = True,
    taken: set[str] | None = None,
) -> lockout.Keys:
    """Run ``check`` (a password or code check) under the brute-force counters; returns the
    counters it used (their reservation released in ``db``'s transaction; with ``release``
    False, by the caller, after it locked the account's row: every transaction takes an
    account's row before its counters, so none waits on another holding them the other way).

    The attempt is reserved first (429 when the account or the IP is locked); a failure is
    recorded as ``event`` with outcome ``failure`` and may start a lock. The request's
    transaction is ended first so no write lock is held during the slow hash; ``user`` is
    detached with the values read, so the check reading its hash begins no new transaction
    (callers ``merge`` it back to write). ``taken``: the counters on which the account's read
    already reserved the attempt (:func:`accounts.find_for_login`).
    """
    user_id = user.id if user is not None else None
    keys = lockout.keys_for(state, user_id=user_id, login=login, ip=client.ip)
    if user is not None and user in db:
        db.expunge(user)
    db.rollback()
    try:
        lockout.acquire(state, keys, taken)
    except lockout.TooManyAttempts:
        events.record(db, state, event, outcome="blocked", client=client, user_id=user_id,
                      login=login, details={"reason": "locked"})
        db.commit()
        raise
    try:
        check()
    except (InvalidCredentials, IncorrectPassword, InvalidResetToken) as exc:
        db.rollback()
        for key, seconds in lockout.failed(db, state, keys):
            events.record(db, state, "lockout.started", outcome="info", client=client,
                          user_id=user_id, login=login,
                          details={"scope": "ip" if key.startswith("ip:") else "account",
                                   "seconds": seconds})
        events.record(db, state, event, outcome="failure", client=client, user_id=user_id,
                      login=login, details={"reason": exc.code})
        db.commit()
        raise
    except AgentError:
        # The secret was right; the request failed for another reason (a weak new password).
        # That is no guess: give the reservation back.
        db.rollback()
        lockout.succeeded(db, state, keys)
        db.commit()
        raise
    if release:
        lockout.succeeded(db, state, keys)
    return keys


def _login(full_profile: bool) -> Response:
    form = Form(read_json())
    login = form.text("username", required=False, max_length=254) or form.text(
        "email", required=False, max_length=254
    )
    password = form.text("password", max_length=MAX_PASSWORD_INPUT)
    if login is None and "username" not in form.errors and "email" not in form.errors:
        form.errors["username"] = ["Give a username or an email."]
    form.done()
    assert login is not None and password is not None
    db = get_db()
    state = get_state()
    client = _client()
    # A read outside any transaction, on a kept connection (on SQLite it takes no write lock,
    # which concurrent logins' writes need).
    found, taken = accounts.find_for_login(state, login, client.ip)
    keys = _guarded_password_check(
        db, state, user=found, login=login, client=client, event="login.failed",
        check=lambda: accounts.check_credentials(state, found, password), release=False,
        taken=taken,
    )
    assert found is not None
    if not state.settings.max_sessions and not state.hasher.needs_rehash(found.password_hash):
        issued = _open_session_at_once(db, state, found, client, login=login, keys=keys)
        if issued is not None:
            return _token_response(issued, full_profile=full_profile)
        keys = lockout.Keys(())  # released; the account changed while the hash ran, see below
    user = _as_checked(db, state, found, password)
    lockout.succeeded(db, state, keys)
    if user is None:
        # A reset, a password change or a disable committed while the hash ran: it ended the
        # account's sessions then, so a session opened now would outlive it.
        events.record(db, state, "login.failed", outcome="failure", client=client,
                      user_id=found.id, login=login, details={"reason": "account_changed"})
        db.commit()  # with the reservation's release
        raise InvalidCredentials()
    if state.hasher.needs_rehash(user.password_hash):
        user.password_hash = state.hasher.hash(password)
    issued = _open_session(db, state, user, client, login=login, release=keys)
    events.record(db, state, "login.succeeded", client=client, user_id=user.id, login=login,
                  session_id=issued.session.id)
    db.commit()
    return _token_response(issued, full_profile=full_profile)


# Built once: every login runs it.
_RECHECK = (select(User.password_hash, User.status)
            .where(User.id == bindparam("id")).with_for_update())


def _as_checked(db: DBSession, state: State, checked: User, password: str) -> User | None:
    """``checked`` (read before the hash) back in ``db``, if the account is still active with
    the password it was checked against; else None.

    The row is read again and locked for this transaction: a reset, change or disable that
    committed first is seen here, and one that comes later also ends the session made now.
    A hash that changed meanwhile is checked again: another login of the same account may
    have stored the same password at new argon2 parameters (a rehash), which changes nothing.
    Only the two columns are read; the rest of ``checked`` is written only where changed.
    """
    row = db.execute(_RECHECK, {"id": checked.id}).one_or_none()
    if row is None or row.status != "active":
        return None
    if row.password_hash is None or checked.password_hash is None:
        return None
    if not hmac.compare_digest(row.password_hash, checked.password_hash):
        if not state.hasher.verify(row.password_hash, password):
            return None
    user = db.merge(checked, load=False)
    set_committed_value(user, "password_hash", row.password_hash)
    return user


# The account as a login checked it (read before the hash): active, with the same hash. FOR
# SHARE: a reset, change or disable (an UPDATE of the row) waits for the session written with it
# and then ends it too; concurrent logins of the account do not wait for each other.
_UNCHANGED = (select(User.id)
              .where(User.id == bindparam("id"), User.status == "active",
                     User.password_hash == bindparam("password_hash"))
              .with_for_update(read=True))


def _open_session_at_once(
    db: DBSession, state: State, user: User, client: ClientInfo, *, login: str,
    keys: lockout.Keys,
) -> Issued | None:
    """The session of a checked login: its row, its refresh token and the ``login.succeeded``
    event written if ``user`` is still as checked, and in any case the attempt's reservation
    released, committed together on a kept connection; on PostgreSQL all of it one statement
    in autocommit (one round trip, where a transaction of its own took eight). None if the
    account changed while the hash ran (nothing written but the release): the caller then
    checks again as :func:`_as_checked` does, which tells a change from a rehash by another
    login.

    For logins without a session limit or a rehash due; the others run :func:`_as_checked`.
    """
    writes, issued = sessions.new_session(state, user, client)
    ev = events.make(state, "login.succeeded", client=client, user_id=user.id, login=login,
                     session_id=issued.session.id)
    writes += events.writes_of(state, ev)
    params = {"id": user.id, "password_hash": user.password_hash}
    release = lockout.release_statement(db, state, keys)  # in Redis: after the commit
    if release is not None:
        params.update(release[1])
    also = release[0] if release is not None else None
    # On a kept connection (agent.direct), without a pooled connection's checkout and ping.
    opened = insert_if(connections(state.engine), _UNCHANGED, params, writes, also=also)
    if opened:
        events.pend(db, ev)
    events.committed(db)
    return issued if opened else None


def _open_session(
    db: DBSession, state: State, user: User, client: ClientInfo, *, login: str,
    release: lockout.Keys | None = None,
) -> Issued:
    """A new session under the device limit (evicting or refusing per policy); not committed."""
    try:
        evicted = sessions.enforce_session_limit(db, state, user)
    except sessions.SessionLimitReached:
        db.rollback()
        if release is not None:
            # The password was right: release the reservation the rollback just undid.
            lockout.succeeded(db, state, release)
        events.record(db, state, "session.limit_reached", outcome="blocked", client=client,
                      user_id=user.id, login=login)
        db.commit()
        raise
    issued = sessions.start_session(db, state, user, client)
    for sid in evicted:
        events.record(db, state, "session.evicted", outcome="info", client=client,
                      user_id=user.id, session_id=sid, details={"by_session": issued.session.id})
    return issued


def token() -> Response:
    """POST /token: log in with a username or email and a password."""
    return _login(full_profile=False)


def login() -> Response:
    """POST /login: log in and receive the full profile."""
    return _login(full_profile=True)


def token_validate() -> Response:
    """POST /token/validate: is this access token valid right now?

    Invalid tokens count toward the client IP's limit (``HEADLESSKEY_VALIDATE_MAX_FAILURES`` a
    minute); past it the IP is answered 429 for a minute, valid token or not.
    """
    data = read_json()
    token_value = data.get("token") if "token" in data else bearer_token()
    state = get_state()
    s = state.settings
    db = get_db()
    client = _client()
    key = lockout.validation_key(state, client.ip)
    lockout.check_validations(db, state, key)
    try:
        if token_value is None:
            raise InvalidToken()
        claims = verify_access_token(
            token_value, state.ring, issuer=s.issuer, audience=s.audience, leeway=s.leeway
        )
        sessions.check_session(state, claims)
    except InvalidToken:
        if key is not None:
            db.rollback()
            seconds = lockout.failed_validation(db, state, key)
            if seconds:
                events.record(db, state, "lockout.started", outcome="info", client=client,
                              details={"scope": "validate", "seconds": seconds})
            db.commit()
        raise
    return jsonify({"valid": True, "code": "jwt_auth_valid_token", "data": claims})


def token_refresh() -> Response:
    """POST /token/refresh: rotate a refresh token (``refresh_token`` or the plugin's ``token``)."""
    data = read_json()
    presented = data.get("refresh_token", data.get("token"))
    db = get_db()
    state = get_state()
    client = _client()
    try:
        issued = sessions.refresh(db, state, presented)
    except sessions.RefreshReused as exc:
        events.record(db, state, "token.reuse_detected", outcome="blocked", client=client,
                      user_id=exc.session.user_id, session_id=exc.session.id)
        db.commit()
        raise
    events.record(db, state, "token.refreshed", client=client, user_id=issued.user.id,
                  session_id=issued.session.id)
    db.commit()
    return _token_response(issued)


REVOKE_SCOPES = ("local", "others", "global")


def token_revoke() -> Response:
    """POST /token/revoke: end sessions (RFC 7009: 200 whether or not the token was valid).

    ``scope`` (body, or query string), as Supabase Auth's logout scopes: ``local`` (default)
    ends the session of the token, access or refresh; ``others`` ends every other session of
    the user at this site and keeps this one; ``global`` ends every session of the user here
    and, through the hub, at every member site where the identity is linked (within their
    directory refresh interval). ``others`` and ``global`` need the access token.
    """
    data = read_json()
    scope = data.get("scope", request.args.get("scope", "local"))
    if scope not in REVOKE_SCOPES:
        raise ValidationFailed(fields={"scope": ["One of local, others, global."]})
    presented = data.get("refresh_token", data.get("token"))
    if presented is None:
        presented = bearer_token()
    db = get_db()
    state = get_state()
    body: dict[str, t.Any] = {"success": True, "code": "jwt_auth_token_revoked",
                              "message": "Token revoked.", "scope": scope}
    if scope != "local":
        if isinstance(presented, str) and presented.startswith(sessions.REFRESH_PREFIX):
            raise ValidationFailed(
                fields={"token": [f"Scope {scope} needs the access token, not a refresh token."]})
        sess = _live_session(db, state, presented)
        published = False
        if sess is not None:
            now = state.clock()
            keep = sess.id if scope == "others" else None
            reason = "revoked_others" if scope == "others" else "global_logout"
            count = sessions.revoke_user_sessions(db, sess.user_id, now, reason, keep=keep)
            db.commit()  # ended here whatever the hub says
            details: dict[str, t.Any] = {"scope": scope, "sessions": count}
            if scope == "global":
                published = _publish_logout(state, sess.user_id)
                details["federation"] = "sent" if published else "not_sent"
            events.record(db, state, "token.revoked", client=_client(), user_id=sess.user_id,
                          session_id=sess.id, details=details)
            db.commit()
        if scope == "global":
            body["global"] = published
        return jsonify(body)
    ended: Session | None = None
    if isinstance(presented, str) and len(presented) <= 8192:
        if presented.startswith(sessions.REFRESH_PREFIX):
            ended = sessions.revoke_by_refresh_token(db, state, presented)
        else:
            sess = _live_session(db, state, presented, current=False, lock=True)
            if sess is not None:
                sessions.revoke_session(db, sess, state.clock(), "revoked")
                ended = sess
    if ended is not None:
        events.record(db, state, "token.revoked", client=_client(), user_id=ended.user_id,
                      session_id=ended.id)
    db.commit()
    return jsonify(body)


def _live_session(db: DBSession, state: State, presented: t.Any, *,
                  current: bool = True, lock: bool = False) -> Session | None:
    """The live session of a valid access token, else None; ``current``: the token must also
    pass the per-request revocation check (the session's current access token); ``lock``: its
    row is locked, so a request ending it meanwhile goes first or after, and one of the two
    finds it ended (only for a request that ends no other session: two that each locked their
    own row first, then ended the other's, would wait for each other)."""
    if not isinstance(presented, str) or len(presented) > 8192:
        return None
    s = state.settings
    try:
        claims = verify_access_token(
            presented, state.ring, issuer=s.issuer, audience=s.audience, leeway=s.leeway
        )
        if current:
            sessions.check_session(state, claims)
    except InvalidToken:
        return None
    sess = db.get(Session, claims["sid"], with_for_update=lock)
    if sess is None or str(sess.user_id) != claims["sub"] or sess.revoked_at is not None:
        return None
    return sess


def _publish_logout(state: State, user_id: int) -> bool:
    """Ask the hub to log this user out on every linked site; False if not federated or the
    hub could not be reached (this site's sessions are already ended either way)."""
    if not state.settings.federated:
        return False
    try:
        federation.client(state).call("POST", "/api/v1/logouts", {"subject": str(user_id)})
    except (HubUnavailable, federation.NotFederated):
        return False
    return True


def register() -> Response:
    """POST /register: create an account (when registration is open).

    The answer is the same whether or not the email is already registered; the owner of an
    existing address gets a notice by mail instead.
    """
    state = get_state()
    if state.settings.registration != "open":
        raise RegistrationClosed()
    form = Form(read_json())
    username = form.text("username", max_length=60)
    email = form.text("email", max_length=254)
    password = form.text("password", max_length=MAX_PASSWORD_INPUT)
    display_name = form.text("display_name", required=False, max_length=250)
    form.done()
    assert username is not None and email is not None and password is not None
    submitted = {"username": username, "email": email, "display_name": display_name}
    if not state.apply_filter("allow_registration", True, submitted):
        raise Forbidden("Registration was refused.", code="registration_refused")
    db = get_db()
    client = _client()
    try:
        # Only these fields are read: roles, status or verification flags in the body are
        # ignored, so nobody can register themselves as an administrator.
        user = accounts.create_user(
            db, state, username=username, email=email, password=password, display_name=display_name
        )
        events.record(db, state, "user.registered", client=client, user_id=user.id, login=username)
        db.commit()
    except ValidationFailed as exc:
        if exc.code != "email_taken":
            raise
        db.rollback()
        existing = accounts.find_user(db, email)
        # The owner is told, at most RESET_MAX_PER_HOUR times an hour: a notice nobody has to
        # ask for must not flood a mailbox ("blocked": taken, and no mail).
        notify = existing is not None and accounts.may_send_taken_notice(db, state, existing)
        events.record(db, state, "user.registered",
                      outcome="failure" if notify or existing is None else "blocked",
                      client=client, user_id=existing.id if existing else None, login=username,
                      details={"reason": "email_taken"})
        db.commit()
        if existing is not None and notify:
            state.mailer.send_later(
                existing.email,
                f"Someone tried to register at {state.settings.site_name} with your email",
                f"Hello {existing.display_name},\n\nSomeone tried to create an account at "
                f"{state.settings.site_name} with this email address, which already belongs to "
                f"your account {existing.user_login}. If it was you, log in or reset your "
                "password instead. Otherwise you can ignore this mail.\n",
            )
    response = jsonify(
        {
            "success": True,
            "code": "registration_received",
            "message": "Registration received. You can now log in; check your inbox if you "
            "already have an account.",
        }
    )
    response.status_code = 201
    return response


def forgot_password() -> Response:
    """POST /forgot-password: mail a reset link or a one-time code (same answer for anyone)."""
    form = Form(read_json())
    login_value = form.text("login", required=False) or form.text("email", required=False)
    if login_value is None and "login" not in form.errors:
        form.errors["login"] = ["Give a username or an email."]
    delivery = form.choice("delivery", ("link", "otp"), "link")
    form.done()
    assert login_value is not None
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    recovery.request_reset_later(app, get_state(), login_value, delivery, _client())
    return jsonify(
        {
            "success": True,
            "code": "password_reset_requested",
            "message": "If an account matches, we have sent password reset instructions.",
        }
    )


def reset_password() -> Response:
    """POST /reset-password: ``{login, password, token|otp}``; ends every session of the user."""
    form = Form(read_json())
    # A code pasted with spaces, tabs or dashes is the code without them.
    if isinstance(form.data.get("otp"), str):
        form.data["otp"] = recovery.normalise_code(form.data["otp"])
    login_value = form.text("login")
    password = form.text("password", max_length=MAX_PASSWORD_INPUT)
    token_value = form.text("token", required=False, max_length=128)
    otp = form.text("otp", required=False, max_length=16)
    if token_value is None and otp is None and "token" not in form.errors:
        form.errors["token"] = ["Give the token from the link or the one-time code (otp)."]
    form.done()
    assert login_value is not None and password is not None
    db = get_db()
    state = get_state()
    client = _client()
    found = accounts.find_user(db, login_value)
    result: list[User] = []

    def check() -> None:
        result.append(recovery.reset_password(
            db, state, login=login_value, new_password=password, token=token_value, otp=otp
        ))

    # Codes are few digits: their failures count toward the account's lockout.
    _guarded_password_check(db, state, user=found, login=login_value, client=client,
                            event="password.reset", check=check)
    (user,) = result
    events.record(db, state, "password.reset", client=client, user_id=user.id, login=login_value,
                  details={"method": "otp" if otp is not None else "link"})
    db.commit()
    accounts.notify_password_changed(state, user, state.clock())
    return jsonify(
        {"success": True, "code": "password_reset", "message": "Your password has been reset."}
    )


def change_password() -> Response:
    """POST /change-password: needs the current password; ends every other session."""
    identity = authenticate_request()
    form = Form(read_json())
    current = form.text("current_password", max_length=MAX_PASSWORD_INPUT)
    new = form.text("new_password", max_length=MAX_PASSWORD_INPUT)
    form.done()
    assert current is not None and new is not None
    db = get_db()
    state = get_state()
    client = _client()
    found = db.get(User, identity.user_id)
    if found is None:
        raise InvalidToken()
    account: User = found
    try:
        # Before the attempt is reserved: a weak new password says nothing of the current one,
        # and must not use up an attempt (the reservation would not be released).
        accounts.check_password_policy(state, new, username=account.user_login,
                                       email=account.email)
    except WeakPassword as exc:
        raise WeakPassword(
            fields={"new_password": (exc.fields or {}).get("password", [])}) from None
    new_hash: list[str] = []

    def check() -> None:
        accounts.check_current_password(state, account, current)
        new_hash.append(state.hasher.hash(new))  # also outside the write transaction

    keys = _guarded_password_check(db, state, user=account, login=account.user_login,
                                   client=client, event="password.changed", check=check,
                                   release=False)
    user = _as_checked(db, state, account, current)
    lockout.succeeded(db, state, keys)
    live = db.get(Session, identity.session_id, populate_existing=True)
    if user is None or live is None or live.revoked_at is not None:
        # The password was reset or changed, the account disabled or this session ended while
        # the hash ran: the change must not undo that.
        db.commit()  # the reservation's release
        raise InvalidToken()
    ended = accounts.change_password(db, state, user, new_hash[0], identity.session_id)
    events.record(db, state, "password.changed", client=client, user_id=user.id,
                  session_id=identity.session_id, details={"sessions_ended": ended})
    db.commit()
    accounts.notify_password_changed(state, user, state.clock())
    return jsonify(
        {
            "success": True,
            "code": "password_changed",
            "message": "Your password has been changed.",
            "sessions_ended": ended,
        }
    )


def me() -> Response:
    """GET /me: the caller's profile."""
    identity = authenticate_request()
    user = get_db().get(User, identity.user_id)
    if user is None:
        raise InvalidToken()
    return jsonify(_user_json(user, full_profile=True))


def _session_payload(sess: Session, current: str) -> dict[str, t.Any]:
    return {
        "id": sess.id,
        "current": sess.id == current,
        "device": sess.device,
        "user_agent": sess.user_agent,
        "ip": sess.ip,
        "created": sess.created_at.isoformat().replace("+00:00", "Z"),
        "last_seen": sess.last_seen_at.isoformat().replace("+00:00", "Z"),
        "expires": sess.expires_at.isoformat().replace("+00:00", "Z"),
    }


def list_sessions() -> Response:
    """GET /sessions: the caller's active sessions (devices), newest first, a page at a time."""
    identity = authenticate_request()
    rows, next_cursor = sessions.live_sessions(get_db(), get_state(), identity.user_id,
                                               request.args)
    return jsonify({"sessions": [_session_payload(s, identity.session_id) for s in rows],
                    "next_cursor": next_cursor})


def end_session(session_id: str) -> Response:
    """DELETE /sessions/<id>: end one of the caller's sessions."""
    identity = authenticate_request()
    return _end_session(session_id, owner=identity.user_id, reason="ended_by_user")


def _end_session(session_id: str, *, owner: int | None, reason: str,
                 by: int | None = None) -> Response:
    """End a live session (of ``owner``, or anyone's); ``by``: the administrator, logged."""
    db = get_db()
    state = get_state()
    # Locked: a second request ending it meanwhile (a double click, the owner and an admin)
    # waits, then sees it ended (404), rather than ending and logging it once more.
    sess = db.get(Session, session_id[:64], with_for_update=True)
    now = state.clock()
    if (
        sess is None
        or sess.revoked_at is not None
        or sess.expires_at <= now  # over by itself, and no longer listed
        or (owner is not None and sess.user_id != owner)
    ):
        raise NotFound("No such session.", code="session_not_found")
    sessions.revoke_session(db, sess, now, reason)
    details: dict[str, t.Any] = {"reason": reason}
    if by is not None:
        details["by"] = by
    events.record(db, state, "session.ended", client=_client(), user_id=sess.user_id,
                  session_id=sess.id, details=details)
    db.commit()
    return jsonify({"success": True, "code": "session_ended", "message": "Session ended."})


def sso_issue() -> Response:
    """POST /sso/issue: ``{target}`` -> a one-minute assertion of the caller for peer ``target``."""
    identity = authenticate_request()
    form = Form(read_json())
    target = form.text("target", max_length=64)
    form.done()
    db = get_db()
    state = get_state()
    user = db.get(User, identity.user_id)
    if user is None:
        raise InvalidToken()
    body = federation.issue(db, state, user, target)
    events.record(db, state, "sso.issued", client=_client(), user_id=user.id,
                  session_id=identity.session_id, details={"target": target})
    db.commit()
    return jsonify(body)


_STATUS = select(User.status).where(User.id == bindparam("id")).with_for_update()


def sso_exchange() -> Response:
    """POST /sso/exchange: ``{site_key, token, signature}`` from a peer -> a local login."""
    data = read_json()
    db = get_db()
    state = get_state()
    client = _client()
    site_key = data.get("site_key")
    peer = site_key[:64] if isinstance(site_key, str) else ""
    # Failed exchanges count toward the client IP's brute-force counter, shared with logins.
    # Not per peer: junk naming a peer must not block sign-on from that peer for everyone.
    keys = lockout.keys_for_ip(state, client.ip)
    try:
        lockout.acquire(state, keys)
    except lockout.TooManyAttempts:
        events.record(db, state, "sso.rejected", outcome="blocked", client=client,
                      details={"peer": peer, "reason": "locked"})
        db.commit()
        raise
    try:
        claims = federation.verify(db, state, site_key, data.get("token"), data.get("signature"))
        user, how = federation.link_identity(db, state, claims)
        # The account's row, locked and read again, as a login does: a disable that committed
        # since it was read is seen here, and one that comes later also ends this session.
        status = db.execute(_STATUS, {"id": user.id}).scalar()
        if status != "active":
            raise federation.InvalidAssertion("account_disabled")
    except federation.InvalidAssertion as exc:
        db.rollback()
        lockout.failed(db, state, keys)
        events.record(db, state, "sso.rejected", outcome="failure", client=client,
                      details={"peer": peer, "reason": exc.reason})
        db.commit()
        raise
    except AgentError:
        db.rollback()
        lockout.succeeded(db, state, keys)  # not a guess: the hub is down, or similar
        db.commit()
        raise
    issued = _open_session(db, state, user, client, login=user.user_login, release=keys)
    lockout.succeeded(db, state, keys)  # after the account's row, as every transaction
    events.record(db, state, "sso.exchanged", client=client, user_id=user.id,
                  session_id=issued.session.id,
                  details={"peer": peer, "subject": claims["sub"], "linked_by": how})
    db.commit()
    return _token_response(issued, full_profile=True)


def admin_logs() -> Response:
    """GET /admin/logs: the activity log, filtered, newest first, with cursor paging."""
    filters, limit, cursor = audit.parse_filters(request.args)
    rows, next_cursor = audit.query(get_db(), filters, limit, cursor)
    return jsonify({"events": [audit.as_dict(r) for r in rows], "next_cursor": next_cursor})


def _admin_user(user_id: int) -> User:
    user = get_db().get(User, user_id)
    if user is None:
        raise NotFound("No such user.", code="user_not_found")
    return user


def admin_unlock(user_id: int) -> Response:
    """POST /admin/users/<id>/unlock: clear the user's brute-force lock."""
    identity = authenticate_request()
    db = get_db()
    state = get_state()
    user = _admin_user(user_id)
    cleared = lockout.unlock_user(db, state, user.id, (user.user_login, user.email))
    events.record(db, state, "user.unlocked", outcome="info", client=_client(), user_id=user.id,
                  details={"by": identity.user_id})
    db.commit()
    return jsonify({"success": True, "code": "user_unlocked", "message": "User unlocked.",
                    "counters_cleared": cleared})


def admin_disable(user_id: int) -> Response:
    """POST /admin/users/<id>/disable: the account can no longer log in or use any token; every
    session ends at once."""
    identity = authenticate_request()
    db = get_db()
    state = get_state()
    user = _admin_user(user_id)
    user.status = "disabled"
    ended = sessions.revoke_user_sessions(db, user.id, state.clock(), "user_disabled")
    events.record(db, state, "user.disabled", outcome="info", client=_client(), user_id=user.id,
                  details={"by": identity.user_id, "sessions_ended": ended})
    db.commit()
    return jsonify({"success": True, "code": "user_disabled", "message": "User disabled.",
                    "sessions_ended": ended})


def admin_enable(user_id: int) -> Response:
    """POST /admin/users/<id>/enable: a disabled account may log in again (its old sessions
    stay ended)."""
    identity = authenticate_request()
    db = get_db()
    state = get_state()
    user = _admin_user(user_id)
    user.status = "active"
    events.record(db, state, "user.enabled", outcome="info", client=_client(), user_id=user.id,
                  details={"by": identity.user_id})
    db.commit()
    return jsonify({"success": True, "code": "user_enabled", "message": "User enabled."})


def admin_users() -> Response:
    """GET /admin/users: accounts by ID, filtered by login or status, with cursor paging."""
    rows, next_cursor = accounts.list_users(get_db(), request.args)
    return jsonify({"users": [_user_json(u, full_profile=True) for u in rows],
                    "next_cursor": next_cursor})


def admin_user(user_id: int) -> Response:
    """GET /admin/users/<id>: one account's profile, with its status and roles."""
    return jsonify(_user_json(_admin_user(user_id), full_profile=True))


def admin_set_roles(user_id: int) -> Response:
    """PUT /admin/users/<id>/roles: the account's roles, replaced; they hold from its next
    request on (its tokens' ``roles`` claim says what they were when issued)."""
    identity = authenticate_request()
    roles = accounts.role_list(read_json().get("roles"))
    db = get_db()
    state = get_state()
    # Locked: two administrators changing one account's roles at once each log what they saw.
    user = db.get(User, user_id, with_for_update=True)
    if user is None:
        raise NotFound("No such user.", code="user_not_found")
    before = accounts.set_roles(db, user, roles)
    if before != roles:
        events.record(db, state, "user.roles_changed", outcome="info", client=_client(),
                      user_id=user.id,
                      details={"by": identity.user_id, "before": before, "after": roles})
    db.commit()
    return jsonify({"success": True, "code": "roles_updated", "message": "Roles updated.",
                    "roles": roles})


def admin_user_sessions(user_id: int) -> Response:
    """GET /admin/users/<id>/sessions: a user's active sessions, newest first, a page at a time."""
    user = _admin_user(user_id)
    rows, next_cursor = sessions.live_sessions(get_db(), get_state(), user.id, request.args)
    return jsonify({"sessions": [_session_payload(s, "") for s in rows],
                    "next_cursor": next_cursor})


def admin_end_session(session_id: str) -> Response:
    """DELETE /admin/sessions/<id>: end anyone's session."""
    identity = authenticate_request()
    return _end_session(session_id, owner=None, reason="ended_by_admin", by=identity.user_id)


def openapi() -> Response:
    """GET /openapi.json: the OpenAPI 3.1 description of this API."""
    from .openapi import document

    return jsonify(document(get_state().settings))


def jwks() -> Response:
    """GET /.well-known/jwks.json: the public keys of this site's access tokens (RFC 7517).

    A new key is listed ``JWKS_MAX_AGE`` before it signs, so a cached copy always has it.
    """
    state = get_state()
    response = jsonify(state.ring.jwks())
    response.headers["Cache-Control"] = f"public, max-age={state.settings.jwks_max_age}"
    response.add_etag()  # a cache revalidates with If-None-Match and gets a 304
    response.make_conditional(request)
    return response


class UserIdConverter(IntegerConverter):
    """A user id in a path: digits 0-9 alone. Werkzeug's ``int`` matches ``\\d``, any
    script's digits, which ``int()`` then reads ("１" was user 1)."""

    regex = r"[0-9]+"


# The app's converter name (HeadlessKey.init_app registers it).
USER_ID_CONVERTER = "hk_user_id"
# A user id longer than any database integer (MAX_ID) in a path is a 404.
USER_ID = f"<{USER_ID_CONVERTER}(max={MAX_ID}):user_id>"

# (rule, view, methods, access-rule name in HEADLESSKEY_ACCESS)
ROUTES: list[tuple[str, t.Callable[..., Response], list[str], str]] = [
    ("/token", token, ["POST"], "token"),
    ("/token/validate", token_validate, ["POST"], "token_validate"),
    ("/token/refresh", token_refresh, ["POST"], "token_refresh"),
    ("/token/revoke", token_revoke, ["POST"], "token_revoke"),
    ("/register", register, ["POST"], "register"),
    ("/login", login, ["POST"], "login"),
    ("/forgot-password", forgot_password, ["POST"], "forgot_password"),
    ("/reset-password", reset_password, ["POST"], "reset_password"),
    ("/change-password", change_password, ["POST"], "change_password"),
    ("/me", me, ["GET"], "me"),
    ("/sessions", list_sessions, ["GET"], "sessions"),
    ("/sessions/<session_id>", end_session, ["DELETE"], "sessions"),
    ("/admin/logs", admin_logs, ["GET"], "admin"),
    ("/admin/users", admin_users, ["GET"], "admin"),
    (f"/admin/users/{USER_ID}", admin_user, ["GET"], "admin"),
    (f"/admin/users/{USER_ID}/unlock", admin_unlock, ["POST"], "admin"),
    (f"/admin/users/{USER_ID}/disable", admin_disable, ["POST"], "admin"),
    (f"/admin/users/{USER_ID}/enable", admin_enable, ["POST"], "admin"),
    (f"/admin/users/{USER_ID}/roles", admin_set_roles, ["PUT"], "admin"),
    (f"/admin/users/{USER_ID}/sessions", admin_user_sessions, ["GET"], "admin"),
    ("/admin/sessions/<session_id>", admin_end_session, ["DELETE"], "admin"),
    ("/sso/issue", sso_issue, ["POST"], "sso_issue"),
    ("/sso/exchange", sso_exchange, ["POST"], "sso_exchange"),
    ("/openapi.json", openapi, ["GET"], "openapi"),
]
ACCESS_OF = {view.__name__: access for _rule, view, _methods, access in ROUTES}


def make_blueprint(settings: Settings) -> Blueprint:
    """A fresh blueprint with every route under the configured prefix."""
    bp = Blueprint("headlesskey", __name__, url_prefix=settings.prefix)
    for rule, view, methods, _access in ROUTES:
        bp.add_url_rule(rule, view_func=view, methods=methods)
    bp.before_request(_before_request)
    for error in DATABASE_ERRORS:
        bp.register_error_handler(error, _database_error)
    return bp


def _database_error(exc: Exception) -> Response:
    """503, and nothing half written: the request's transaction never committed (the session
    is rolled back at teardown)."""
    return error_response(unavailable(exc))


def _before_request() -> Response | None:
    """Answer CORS preflights before any auth, then apply the endpoint's access rule."""
    if request.method == "OPTIONS":
        return Response(status=204)
    if url_holds_nul():
        raise ValidationFailed("The URL may not contain NUL (%00).")
    endpoint = (request.endpoint or "").rpartition(".")[2]
    access = ACCESS_OF.get(endpoint)
    if access is not None:
        enforce_access(get_state().settings.access[access])
    return None
