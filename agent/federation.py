"""Single sign-on between member sites: ``/sso/issue`` and ``/sso/exchange`` (DESIGN §5).

No long-lived token of site A ever reaches site B. A mints, for one user and one target B, an
assertion: a JWT with ``typ: hk-sso+jwt`` signed with A's federation key (published through the
hub's JWKS and B's directory), ``aud`` B, at most 60 s of life, a random ``jti``; plus
``signature`` = hex HMAC-SHA256(K_AB, token) with the pairwise key K_AB that only A, B and the
hub can compute. B accepts only if every check below holds, and each refusal is the same
``invalid_assertion`` (the reason goes to the activity log):

1. A is an active peer in B's directory (fresh, or cached within the staleness window);
2. the HMAC matches one of A's current exchange keys for B, compared in constant time;
3. the JWT header: ``typ`` exactly ``hk-sso+jwt``, no ``crit``, a ``kid`` among A's own keys
   (keys are namespaced by peer: a key of C never vouches for A), ``alg`` equal to that key's;
4. signature, then claims: ``iss`` is A's registered issuer, ``aud`` is B, ``exp``/``nbf``/
   ``iat`` within the leeway, a lifetime of at most 60 s, string ``sub``/``jti``;
5. the ``jti`` was never used before, on any worker or instance (a unique row, or a
   ``SET NX`` in Redis when ``REDIS_URL`` is set);

then the identity is linked: an existing (issuer, sub) link, else by policy a local account
with the same email if the assertion says it is verified, else a new account with the default
role. Remote roles grant nothing unless ``SSO_ROLE_MAP`` maps them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import re
import secrets
import threading
import typing as t

import jwt
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession

from . import events
from . import signing
from . import store
from .db import rowcount
from .errors import AgentError
from .errors import NotFound
from .hub_client import HubClient
from .hub_client import HubUnavailable
from .models import FederationCache
from .models import IdentityLink
from .models import UsedAssertion
from .models import User
from .models import save_cache
from .services import accounts
from .services import keystore
from .services import sessions as session_service
from .services.keys import SigningKey
from .text import holds_controls

if t.TYPE_CHECKING:
    from .extension import State

SSO_TYP = "hk-sso+jwt"
MAX_ASSERTION_LENGTH = 8192
ALGORITHMS = ("ES256", "RS256")  # of federation keys
HMAC_HEX = re.compile("[0-9a-f]{64}")
REFETCH_COOLDOWN = dt.timedelta(seconds=5)
LOGOUTS_APPLIED = "logouts-applied"  # FederationCache row: ids of the hub logouts applied here
_FIRST_FETCH = threading.Lock()  # makes each site's lock of :func:`_first_fetch`


class FederationUnavailable(AgentError):
    code = "federation_unavailable"
    status = 503
    message = "Single sign-on is unavailable: this site could not reach the federation hub."


class NotFederated(AgentError):
    code = "not_federated"
    status = 404
    message = "This site has not joined a federation."


class InvalidAssertion(AgentError):
    code = "invalid_assertion"
    status = 401
    message = "The sign-on assertion is invalid or has expired."

    def __init__(self, reason: str, peer: str | None = None) -> None:
        super().__init__()
        self.reason = reason
        self.peer = peer


def client(state: State) -> HubClient:
    s = state.settings
    if not s.federated:
        raise NotFederated()
    secret = state.keys.hub_secret()  # the newest: the hub accepts it at once
    assert s.hub_url and s.hub_site_key and secret
    return HubClient(s.hub_url, s.hub_site_key, secret, transport=state.hub_transport)


def federation_key(state: State) -> SigningKey:
    """The key that signs this site's SSO assertions now (see :mod:`agent.services.keystore`)."""
    if not state.settings.federated:
        raise NotFederated()
    entry = state.keys.signing(keystore.FEDERATION)
    if entry is None or entry.key is None:
        raise NotFederated()
    return entry.key


def directory(db: DBSession, state: State, *, force: bool = False) -> dict[str, t.Any]:
    """This site's directory from the hub, cached in the database for every worker.

    Refetched when older than ``DIRECTORY_REFRESH`` (or ``force``, e.g. on an unknown kid), at
    most once per cooldown across all workers; while the hub is down the cached copy serves for
    ``FEDERATION_STALE_WINDOW``, then :class:`FederationUnavailable`. While none is cached, one
    thread of a process asks the hub and the others wait for its answer. No transaction (on
    SQLite, no write lock) is held while the hub answers.
    """
    row = db.get(FederationCache, "directory")
    if row is None:
        db.commit()  # waiting, or asking the hub, holds no transaction
        with _first_fetch(state):
            row = db.get(FederationCache, "directory")  # the fetch waited for may have stored it
            if row is None:
                return _refreshed(db, state, None, force)
    return _refreshed(db, state, row, force)


def _refreshed(db: DBSession, state: State, row: FederationCache | None,
               force: bool) -> dict[str, t.Any]:
    """``row``'s directory, fetched again first when it is due (or ``force``) and allowed."""
    s = state.settings
    now = state.clock()
    fresh = row is not None and now - row.fetched_at < dt.timedelta(seconds=s.directory_refresh)
    if row is not None and fresh and not force:
        return row.body
    # An unknown kid may force a refetch at most once per cooldown; a due refresh at most once
    # per refresh interval. Either way, one worker fetches.
    cooldown = REFETCH_COOLDOWN if force and fresh else min(
        REFETCH_COOLDOWN, dt.timedelta(seconds=s.directory_refresh))
    if (_lately(state, "_directory_failed_at", now, cooldown)
            or force and _lately(state, "_directory_forced_at", now, cooldown, note=True)):
        pass  # this process asked the hub moments ago, in vain or on a caller's behalf: no
        # request makes it ask (or write a claim) again before the cooldown
    elif _claim_fetch(db, state, row, now, cooldown):
        try:
            body = client(state).directory()
        except HubUnavailable:
            body = None
            state._directory_failed_at = now  # type: ignore[attr-defined]
        if body is not None:
            _store_directory(db, body, now)
            apply_logouts(db, state, body)
            from . import policy
            from . import webhooks

            policy.apply(db, state, body)
            webhooks.apply_redeliveries(db, state, body)
            return body
        row = db.get(FederationCache, "directory")
    if row is None or now - row.fetched_at > dt.timedelta(seconds=s.federation_stale_window):
        raise FederationUnavailable()
    return row.body


def _first_fetch(state: State) -> threading.Lock:
    """The lock of this process's fetches while no directory is cached (one per site)."""
    with _FIRST_FETCH:
        lock: threading.Lock | None = getattr(state, "_directory_lock", None)
        if lock is None:
            lock = threading.Lock()
            state._directory_lock = lock  # type: ignore[attr-defined]
        return lock


def _lately(state: State, name: str, now: dt.datetime, cooldown: dt.timedelta, *,
            note: bool = False) -> bool:
    """Whether the moment kept in ``state.<name>`` is within ``cooldown`` before ``now``; with
    ``note``, keep ``now`` there when it is not. Per process, whatever the database says: this
    bounds the hub requests exchanges can cause (a refetch they force, a fetch while the hub
    has never answered) to one per cooldown and process."""
    last: dt.datetime | None = getattr(state, name, None)
    if last is not None and last <= now < last + cooldown:
        return True
    if note:
        setattr(state, name, now)
    return False


def _store_directory(db: DBSession, body: dict[str, t.Any], now: dt.datetime) -> None:
    """Save the fetched directory (with no cached copy yet, every process may fetch it at once)."""
    save_cache(db, "directory", body, now)
    db.commit()


def _claim_fetch(db: DBSession, state: State, row: FederationCache | None,
                 now: dt.datetime, cooldown: dt.timedelta) -> bool:
    """One fetch per cooldown across workers: a conditional update of ``attempted_at``. With no
    row to claim, every process may fetch (each holds back after a failed fetch)."""
    if row is None:
        db.commit()
        return True
    claimed = rowcount(db.execute(
        update(FederationCache)
        .where(FederationCache.name == "directory",
               FederationCache.attempted_at <= now - cooldown)
        .values(attempted_at=now)
    ))
    db.commit()
    return claimed == 1


def apply_logouts(db: DBSession, state: State, dir_: dict[str, t.Any]) -> int:
    """End the sessions named by the directory's logouts-everywhere; returns how many ended.

    A logout names an identity (issuer, subject) as its own site knows it. This site applies it
    to the local account linked to that identity, or, when the logout is this site's own (an
    admin action in the hub console), to its own user ``subject``. An issuer or subject longer
    than the identity keys names no identity here: such a logout is skipped, never cut to fit
    (cut, it could name another). Only sessions begun before the logout end: logging in again
    afterwards works. Each logout is applied once (its id is kept in the ``logouts-applied``
    cache row for as long as the directory lists it); the directory is fetched by one worker at
    a time, so two workers do not apply it together.

    A logout that reached a linked account here is passed on to the hub for that account
    (naming the logout as its origin), so a site linked to this one, and not to the first,
    follows: a user who went from A to B to C is logged out at C by a global logout at A. Each
    site passes a chain on once; until the hub has it, the logout is not marked applied, and
    the next directory fetch tries again.
    """
    s = state.settings
    listed = [lo for lo in dir_.get("logouts", []) if isinstance(lo, dict)
              and isinstance(lo.get("id"), int) and isinstance(lo.get("origin", 0), int)
              and _key_part(lo.get("issuer")) and _key_part(lo.get("subject"))]
    row = db.get(FederationCache, LOGOUTS_APPLIED)
    done: set[int] = set(row.body.get("ids", [])) if row is not None else set()
    passed_on = {lo.get("origin") for lo in listed if lo.get("site_key") == s.hub_site_key}
    now = state.clock()
    ended = 0
    applied: list[int] = []
    to_pass: list[tuple[int, int]] = []  # (logout id, local user id)
    for lo in listed:
        if lo["id"] in done:
            continue
        try:
            started = dt.datetime.fromisoformat(
                str(lo.get("created_at", "")).replace("Z", "+00:00"))
        except ValueError:
            started = now
        if started.tzinfo is None:
            started = started.replace(tzinfo=dt.UTC)
        user_ids: set[int] = set()
        link = db.get(IdentityLink, (lo["issuer"], lo["subject"]))
        if link is not None and db.get(User, link.user_id) is not None:
            user_ids.add(link.user_id)
            if lo.get("origin", lo["id"]) not in passed_on:
                to_pass.append((lo["id"], link.user_id))
        if lo.get("site_key") == s.hub_site_key and lo["subject"].isascii() \
                and lo["subject"].isdigit() and len(lo["subject"]) <= 18 \
                and db.get(User, int(lo["subject"])) is not None:
            user_ids.add(int(lo["subject"]))  # one of this site's own users
        for user_id in sorted(user_ids):
            count = session_service.revoke_user_sessions(
                db, user_id, now, "global_logout", started_before=min(started, now))
            ended += count
            if count:
                events.record(db, state, "token.revoked", user_id=user_id,
                              details={"scope": "global",
                                       "from": str(lo.get("site_key", ""))[:64],
                                       "sessions": count})
        if not any(lo["id"] == pending for pending, _ in to_pass):
            applied.append(lo["id"])
    still_listed = {lo["id"] for lo in listed}
    _save_applied(db, row, done, still_listed, applied, now)
    db.commit()  # the sessions end here whatever the hub says next
    passed: list[int] = []
    for logout_id, user_id in to_pass:
        try:
            client(state).call("POST", "/api/v1/logouts",
                               {"subject": str(user_id), "origin": logout_id})
        except HubUnavailable:
            continue  # not marked applied: the next directory fetch passes it on
        passed.append(logout_id)
    if passed:
        row = db.get(FederationCache, LOGOUTS_APPLIED)
        done = set(row.body.get("ids", [])) if row is not None else set()
        _save_applied(db, row, done, still_listed, passed, now)
        db.commit()
    return ended


def _save_applied(db: DBSession, row: FederationCache | None, done: set[int],
                  still_listed: set[int], applied: list[int], now: dt.datetime) -> None:
    """Keep the ids of the applied logouts the directory still lists (the others are gone)."""
    if applied or (row is not None and done - still_listed):
        ids = sorted((done & still_listed) | set(applied))
        save_cache(db, LOGOUTS_APPLIED, {"ids": ids}, now)


def refresh_job(app: t.Any) -> None:
    """The scheduler's directory refresh (federated sites): fetch it when due, which applies
    new logouts-everywhere and a new site policy without waiting for SSO traffic."""
    from . import health
    from . import policy
    from .extension import get_db
    from .extension import get_state

    with app.app_context():
        state = get_state(app)
        if not state.settings.federated:
            return
        before = policy.read(state)
        db = get_db()
        try:
            directory(db, state)
        except FederationUnavailable:
            return  # the hub is down: the next run tries again
        finally:
            db.commit()  # end the transaction: on SQLite it holds the write lock
        policy.ensure_algorithm(state)
        if policy.read(state) != before:
            # A new site policy (applied or refused): tell the hub now, not at the next report.
            health.report(state)


def peer_of(dir_: dict[str, t.Any], site_key: str) -> dict[str, t.Any] | None:
    for peer in dir_.get("peers", []):
        if isinstance(peer, dict) and peer.get("site_key") == site_key:
            return peer
    return None


def issue(db: DBSession, state: State, user: User, target: t.Any) -> dict[str, t.Any]:
    """An assertion of ``user`` for the peer ``target``: ``{site_key, token, signature}``."""
    s = state.settings
    if not isinstance(target, str) or not target or len(target) > 64:
        raise InvalidAssertion("bad_target")
    peer = peer_of(directory(db, state), target)
    if peer is None:
        raise NotFound("No such peer site.", code="unknown_peer")
    key = federation_key(state)
    now = int(state.clock().timestamp())
    claims = {
        "iss": s.issuer,
        "aud": target,
        "sub": str(user.id),
        "email": user.email,
        "email_verified": bool(user.email_verified),
        "name": user.display_name,
        "roles": list(user.roles),
        "iat": now,
        "nbf": now,
        "exp": now + s.sso_assertion_ttl,
        "jti": secrets.token_urlsafe(16),
    }
    token = jwt.encode(claims, key.signing_key, algorithm=key.alg,
                       headers={"kid": key.kid, "typ": SSO_TYP})
    # The secret peers have had time to learn from their directory (a rotated one waits).
    secret = state.keys.sso_secret()
    assert secret is not None and s.hub_site_key is not None
    k_ab = signing.pairwise_key(secret, s.hub_site_key, target)
    signature = hmac.new(k_ab, token.encode(), hashlib.sha256).hexdigest()
    return {"site_key": s.hub_site_key, "token": token, "signature": signature,
            "target": target, "target_url": peer.get("base_url"), "expires_in": s.sso_assertion_ttl}


def verify(db: DBSession, state: State, site_key: t.Any, token: t.Any,
           signature: t.Any) -> dict[str, t.Any]:
    """The claims of a valid, unused assertion from peer ``site_key`` to this site.

    What needs no directory is checked first (:func:`_plausible`): junk costs the hub nothing.
    An unknown peer, an HMAC that fails or an unknown kid fetch the directory again before the
    assertion is refused (rationed: see :func:`directory`): the peer may have joined, rotated
    its secret or its key since the last refresh.
    """
    header = _plausible(state, site_key, token, signature)
    assert isinstance(site_key, str) and isinstance(token, str) and isinstance(signature, str)
    peer = peer_of(directory(db, state), site_key)
    if peer is None or not _signed_by(peer, token, signature):
        peer = peer_of(directory(db, state, force=True), site_key)
        if peer is None:
            raise InvalidAssertion("unknown_peer", site_key)
        if not _signed_by(peer, token, signature):
            raise InvalidAssertion("bad_signature", site_key)
    jwk = _peer_key(peer, header["kid"])
    if jwk is None:
        peer = peer_of(directory(db, state, force=True), site_key) or {}
        jwk = _peer_key(peer, header["kid"])
    if jwk is None:
        raise InvalidAssertion("unknown_kid", site_key)
    alg = jwk.get("alg")
    if alg not in ALGORITHMS or header.get("alg") != alg:
        raise InvalidAssertion("bad_alg", site_key)
    issuer = peer.get("issuer")
    if not _key_part(issuer):
        raise InvalidAssertion("bad_token", site_key)  # no iss could be this peer's, whole
    try:
        public = jwt.PyJWK(jwk, algorithm=alg).key
    except (jwt.PyJWTError, ValueError, TypeError):
        raise InvalidAssertion("bad_token", site_key) from None
    claims = _claims(state, site_key, token, (public, alg, issuer))
    _use_once(db, state, claims)
    return claims


def _plausible(state: State, site_key: t.Any, token: t.Any, signature: t.Any) -> dict[str, t.Any]:
    """The header of an assertion that passes every check the directory is not needed for: the
    fields' types and sizes, an HMAC of 64 lower-case hex digits, a JWT header of the SSO type
    naming a key and an algorithm peers use, and its claims read unverified (:func:`_claims`)."""
    if not all(isinstance(v, str) and v for v in (site_key, token, signature)):
        raise InvalidAssertion("malformed")
    assert isinstance(site_key, str) and isinstance(token, str) and isinstance(signature, str)
    if len(token) > MAX_ASSERTION_LENGTH or not HMAC_HEX.fullmatch(signature) or len(
            site_key) > 64:
        raise InvalidAssertion("malformed", site_key[:64])
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidAssertion("malformed", site_key) from None
    if header.get("typ") != SSO_TYP or "crit" in header or not isinstance(header.get("kid"), str):
        raise InvalidAssertion("bad_header", site_key)
    if header.get("alg") not in ALGORITHMS:
        raise InvalidAssertion("bad_alg", site_key)
    if site_key == state.settings.hub_site_key:
        raise InvalidAssertion("unknown_peer", site_key)
    _claims(state, site_key, token)
    return header


def _claims(state: State, site_key: str, token: str,
            verified_by: tuple[t.Any, str, str] | None = None) -> dict[str, t.Any]:
    """The assertion's claims: ``aud`` this site, ``exp``, ``iat`` (and ``nbf``) integers within
    the leeway, at most 60 s apart, ``iss`` and ``sub`` that fit the identity keys whole (never
    cut: two cut alike would be one identity), a ``jti`` of at most 64 characters, none of
    the three holding a control character. With
    ``verified_by`` (the peer's public key, its algorithm and the peer's issuer), the signature
    too, and that ``iss`` is that issuer; without, the claims are read unverified."""
    s = state.settings
    key, alg, issuer = verified_by or ("", "", None)
    try:
        claims: dict[str, t.Any] = jwt.decode(
            token,
            key,
            algorithms=[alg] if alg else None,  # the key's own algorithm, never the token's say-so
            audience=s.hub_site_key,  # addressed to this site, by its site key
            issuer=issuer,  # exactly the peer's registered issuer
            leeway=s.leeway,
            options={"require": ["iss", "aud", "sub", "iat", "exp", "jti"], "strict_aud": True,
                     "verify_signature": verified_by is not None, "verify_exp": True,
                     "verify_nbf": True, "verify_iat": True, "verify_iss": True,
                     "verify_aud": True, "verify_sub": True, "verify_jti": True},
        )
    except (jwt.PyJWTError, ValueError, TypeError):
        raise InvalidAssertion("bad_token", site_key) from None
    times = [claims["exp"], claims["iat"]] + ([claims["nbf"]] if "nbf" in claims else [])
    if not all(type(v) is int for v in times) or not 0 <= claims["exp"] - claims["iat"] <= 60:
        raise InvalidAssertion("bad_token", site_key)  # PyJWT takes "123" for 123; we do not
    jti = claims["jti"]
    if not (_key_part(claims["iss"]) and _key_part(claims["sub"]) and isinstance(jti, str)
            and 0 < len(jti) <= 64 and not holds_controls(jti)):
        raise InvalidAssertion("bad_token", site_key)
    return claims


def _signed_by(peer: dict[str, t.Any], token: str, signature: str) -> bool:
    """Whether ``signature`` is the HMAC of ``token`` under one of the peer's exchange keys."""
    given = signature.encode()
    ok = False
    for key_hex in peer.get("exchange_keys", []):
        try:
            k_ab = bytes.fromhex(key_hex)
        except (TypeError, ValueError):
            continue
        expected = hmac.new(k_ab, token.encode(), hashlib.sha256).hexdigest().encode()
        ok |= hmac.compare_digest(expected, given)
    return ok and signature == signature.lower()


def _key_part(value: t.Any) -> t.TypeGuard[str]:
    """A non-empty string that fits the identity keys' 255 characters whole: an issuer or
    subject is never cut to fit (two cut alike would be one identity); no control character
    nor lone surrogate (PostgreSQL text holds no NUL)."""
    return isinstance(value, str) and 0 < len(value) <= 255 and not holds_controls(value)


def _peer_key(peer: dict[str, t.Any], kid: str) -> dict[str, t.Any] | None:
    for jwk in peer.get("keys", []):
        if isinstance(jwk, dict) and jwk.get("kid") == kid:
            return jwk
    return None


def _use_once(db: DBSession, state: State, claims: dict[str, t.Any]) -> None:
    """Record the assertion's jti; a second use anywhere is refused (a unique key).

    With Redis configured the jti is kept there until the assertion's end (``SET NX EX``;
    Redis down is a 503, never an accepted replay), else as a row of ``hk_sso_used``.
    """
    expires = dt.datetime.fromtimestamp(claims["exp"], dt.UTC) + dt.timedelta(
        seconds=state.settings.leeway)
    if state.redis is not None:
        name = store.key("sso", state.settings.issuer, claims["iss"], claims["jti"])
        ttl = math.ceil((expires - state.clock()).total_seconds()) + 1
        if not store.use_once(state.redis, name, ttl):
            raise InvalidAssertion("replayed")
        return
    db.add(UsedAssertion(issuer=claims["iss"], jti=claims["jti"], expires_at=expires))
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise InvalidAssertion("replayed") from None


def link_identity(db: DBSession, state: State, claims: dict[str, t.Any]) -> tuple[User, str]:
    """The local account for a verified assertion, and how it was found (link/email/new).

    Two first sign-ins of one identity at once (tabs, retries) race to make its account: the
    loser's insert fails, or it reads no link, then the winner's account by email. It looks
    again, once, and finds the winner's link. Nothing is pending in ``db`` when it is called.
    """
    try:
        return _link_identity(db, state, claims)
    except (IntegrityError, InvalidAssertion) as exc:
        if isinstance(exc, InvalidAssertion) and exc.reason != "identity_conflict":
            raise
        db.rollback()
        return _link_identity(db, state, claims)


def _link_identity(db: DBSession, state: State, claims: dict[str, t.Any]) -> tuple[User, str]:
    s = state.settings
    issuer, subject = claims["iss"], claims["sub"]
    link = db.get(IdentityLink, (issuer, subject))
    if link is not None:
        user = db.get(User, link.user_id)
        if user is None or user.status != "active":
            raise InvalidAssertion("account_disabled")
        return user, "link"
    email = claims.get("email")
    if not isinstance(email, str) or not accounts.valid_email(email):
        raise InvalidAssertion("no_email")
    existing = accounts.find_user(db, email)
    if existing is not None:
        if not (s.sso_link_by_email and claims.get("email_verified") is True
                and existing.email_key == accounts.key_of(email)):
            raise InvalidAssertion("identity_conflict")
        if existing.status != "active":
            raise InvalidAssertion("account_disabled")
        user, how = existing, "email"
    else:
        remote = claims.get("roles")
        if not isinstance(remote, list):
            remote = []
        mapped = sorted({s.sso_role_map[r] for r in remote if isinstance(r, str)
                         and r in s.sso_role_map})
        user = _new_account(db, state, claims, email, mapped or [s.default_role])
        how = "new"
    db.add(IdentityLink(issuer=issuer, subject=subject, user_id=user.id,
                        created_at=state.clock()))
    db.flush()
    return user, how


def _new_account(db: DBSession, state: State, claims: dict[str, t.Any], email: str,
                 roles: list[str]) -> User:
    base = accounts.key_of(email.partition("@")[0])
    base = "".join(c for c in base if c.isalnum() or c in "_.-")[:40] or "user"
    name = claims.get("name")
    if not isinstance(name, str) or holds_controls(name):
        name = None  # the account is named after its login instead
    now = state.clock()
    for attempt in range(20):
        login = base if attempt == 0 else f"{base}-{secrets.token_hex(3)}"
        if len(login) < 3:
            login = f"{login}-{secrets.token_hex(3)}"
        if db.scalar(select(User.id).where(User.login_key == accounts.key_of(login))) is None:
            break
    user = User(
        user_login=login,
        login_key=accounts.key_of(login),
        email=email,
        email_key=accounts.key_of(email),
        display_name=(name or login).strip()[:250] or login,
        # No local password: the account signs in through its peer, or after a reset.
        password_hash="!sso-only",  # noqa: S106 - not a hash: no password verifies against it
        roles=roles,
        status="active",
        email_verified=claims.get("email_verified") is True,
        created_at=now,
        password_changed_at=now,
    )
    db.add(user)
    db.flush()
    return user
