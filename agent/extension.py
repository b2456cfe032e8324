"""The Flask extension: ``HeadlessKey(app)`` or ``hk = HeadlessKey(); hk.init_app(app)``.

Per-app state lives in ``app.extensions["headlesskey"]`` (a :class:`State`); the extension
object keeps no reference to any app, so one instance can serve several apps.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import secrets
import typing as t
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from flask import Flask
from flask import Response
from flask import current_app
from flask import g
from flask import jsonify
from flask import request
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session as DBSession
from sqlalchemy.orm import sessionmaker
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.local import LocalProxy

from . import config as config_module
from . import events
from . import policy
from . import store
from .background import Background
from .db import make_engine
from .db import upgrade
from .errors import AgentError
from .errors import Forbidden
from .errors import InvalidJSON
from .errors import PayloadTooLarge
from .errors import Unauthorized
from .errors import UnsupportedMediaType
from .resp import Redis
from .services import lockout
from .services import sessions
from .services.keys import KeyRing
from .services.keys import derive_key
from .services.keys import ensure_key_file
from .services.keys import generate_private_key_pem
from .services.keystore import KeyStore
from .services.mail import Mailer
from .services.passwords import Hasher
from .services.sessions import check_session
from .services.tokens import verify_access_token
from .text import ip_address_text

EXTENSION_KEY = "headlesskey"
PREFIX = config_module.PREFIX
FILTERS = (
    "token_claims", "login_response", "user_payload", "allow_registration", "password_policy"
)
F = t.TypeVar("F", bound=t.Callable[..., t.Any])
FALLBACK_HEADER = "X-HeadlessKey-Authorization"
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = f"Authorization, Content-Type, {FALLBACK_HEADER}"
CORS_EXPOSED = "Retry-After, WWW-Authenticate"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class State:
    """Everything the agent needs for one app, built once in :meth:`HeadlessKey.init_app`."""

    base_settings: config_module.Settings  # from the site's own configuration alone
    engine: Engine
    session_factory: sessionmaker[DBSession]
    ring: KeyRing  # the access-token keys (``keys.ring``)
    keys: KeyStore  # every stored key: access tokens, SSO, the hub secret
    hasher: Hasher
    mailer: Mailer
    # Work answers neither wait for nor are timed by (agent.background): /forgot-password's.
    background: Background = field(default_factory=Background)
    clock: t.Callable[[], dt.datetime] = utcnow
    refresh_key: bytes = field(default=b"", repr=False)
    reset_key: bytes = field(default=b"", repr=False)
    filters: dict[str, list[t.Callable[..., t.Any]]] = field(default_factory=dict)
    # How hub calls are sent; None is urllib (tests and sites may hand in their own).
    hub_transport: t.Any = None
    # Redis client for replay caches when HEADLESSKEY_REDIS_URL is set (agent.store).
    redis: Redis | None = None  # HEADLESSKEY_REDIS_URL: replay caches and counters
    # The HEADLESSKEY_* values the site set itself (file, environment, app.config): pinned.
    configured: dict[str, t.Any] = field(default_factory=dict, repr=False)
    instance_path: str = ""

    @property
    def settings(self) -> config_module.Settings:
        """The settings in force: the site's own, overlaid on its hub policy (agent.policy)."""
        return policy.effective(self)

    def apply_filter(self, name: str, value: t.Any, *args: t.Any) -> t.Any:
        """Pass ``value`` through every filter registered under ``name``, in order."""
        for fn in self.filters.get(name, ()):
            value = fn(value, *args)
        return value


@dataclass(frozen=True)
class Identity:
    """The caller of the current request, from a valid access token of this site.

    ``roles`` are the account's roles as stored now, checked with the session on every request
    (services.sessions.check_session; the token's ``roles`` claim, in ``claims``, is what they
    were when it was issued).
    """

    user_id: int
    user_login: str
    session_id: str
    roles: tuple[str, ...]
    claims: dict[str, t.Any]


def get_state(app: Flask | None = None) -> State:
    return t.cast(State, (app or current_app).extensions[EXTENSION_KEY])


def get_db() -> DBSession:
    """The agent's database session for this request (closed at teardown)."""
    db = g.get("_headlesskey_db")
    if db is None:
        db = g._headlesskey_db = get_state().session_factory()
    return t.cast(DBSession, db)


def _close_db(_exc: BaseException | None) -> None:
    db = g.pop("_headlesskey_db", None)
    if db is not None:
        db.close()


def bearer_token() -> str | None:
    """The bearer token of the request: ``Authorization``, else the fallback header."""
    for name in ("Authorization", FALLBACK_HEADER):
        value = request.headers.get(name)
        if not value:
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        if name == FALLBACK_HEADER and not token:
            return scheme  # the fallback header may carry the bare token
    return None


def client_ip() -> str:
    """The client address: the socket's, or X-Forwarded-For as seen by the trusted proxies."""
    hops = get_state().settings.trusted_proxies
    if hops:
        forwarded = [p.strip() for p in request.headers.get("X-Forwarded-For", "").split(",")]
        forwarded = [p for p in forwarded if p]
        if len(forwarded) >= hops:
            return forwarded_address(forwarded[-hops])
    return (request.remote_addr or "")[:64]


def forwarded_address(entry: str) -> str:
    """An ``X-Forwarded-For`` entry as the client's address: without the port some proxies add
    (``203.0.113.7:51234``, ``[2001:db8::1]:443``) and without brackets (``[2001:db8::1]``),
    in one written form (IPv6 in lower case, zeros compressed). An entry that is still no IP
    address (``unknown``, a name) is kept as written, cut to 64 characters, and counted as it
    is."""
    host = entry
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        if bracket and (not rest or (rest[:1] == ":" and rest[1:].isdecimal())):
            host = inside
    elif entry.count(":") == 1:
        address, _, port = entry.partition(":")
        if port.isdecimal():
            host = address
    try:
        return ip_address_text(host)[:64]
    except ValueError:
        return entry[:64]


def request_is_https() -> bool:
    """Whether the client reached the site over TLS: directly, or, behind the trusted proxies,
    as the ``X-Forwarded-Proto`` entry of the outermost trusted one says (ignored without any)."""
    if request.is_secure:
        return True
    hops = get_state().settings.trusted_proxies
    if not hops:
        return False
    forwarded = [p.strip().lower() for p in request.headers.get("X-Forwarded-Proto", "").split(",")]
    forwarded = [p for p in forwarded if p]
    return len(forwarded) >= hops and forwarded[-hops] == "https"


def url_holds_nul() -> bool:
    """Whether the request's path or query string holds a NUL (``%00``): no path, name or filter
    has one, and PostgreSQL text cannot hold one (SQLite would store it)."""
    return "\x00" in request.path or any(
        "\x00" in key or "\x00" in value for key, value in request.args.items(multi=True))


def security_headers(response: Response) -> Response:
    """Headers every response of the site carries: nosniff, no referrer, HSTS over TLS."""
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    if request_is_https():
        headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
    return response


def authenticate_request() -> Identity:
    """Verify the request's bearer token and its session, or raise 401."""
    identity = g.get("_headlesskey_identity")
    if identity is not None:
        return t.cast(Identity, identity)
    token = bearer_token()
    if token is None:
        raise Unauthorized()
    state = get_state()
    s = state.settings
    claims = verify_access_token(
        token, state.ring, issuer=s.issuer, audience=s.audience, leeway=s.leeway
    )
    roles = check_session(state, claims)
    data = claims.get("data")
    if not isinstance(data, dict):
        data = {}
    identity = Identity(
        user_id=int(claims["sub"]),
        user_login=str(data.get("user_login", "")),
        session_id=claims["sid"],
        roles=roles,
        claims=claims,
    )
    g._headlesskey_identity = identity
    return identity


def enforce_access(rule: str | tuple[str, ...]) -> Identity | None:
    """Apply an access rule: ``public``, ``authenticated``, or a tuple of roles (any of them)."""
    if rule == "public":
        return None
    identity = authenticate_request()
    if isinstance(rule, tuple) and set(rule).isdisjoint(identity.roles):
        raise Forbidden()
    return identity


def _current_identity() -> Identity | None:
    return t.cast("Identity | None", g.get("_headlesskey_identity"))


current_identity: Identity | None = t.cast("Identity | None", LocalProxy(_current_identity))


def read_json() -> dict[str, t.Any]:
    """The request body as a JSON object; ``{}`` for an empty body."""
    state = get_state()
    if request.content_length is not None and request.content_length > state.settings.max_body:
        raise PayloadTooLarge()
    # Bodies sent without Content-Length (chunked) are read at most one byte past the limit,
    # so an oversized one is seen as such rather than silently cut.
    request.max_content_length = state.settings.max_body + 1
    try:
        raw = request.get_data(cache=True)
    except RequestEntityTooLarge:
        raise PayloadTooLarge() from None
    if len(raw) > state.settings.max_body:
        raise PayloadTooLarge()
    return parse_json_object(raw, request.mimetype)


def parse_json_object(raw: bytes, mimetype: str) -> dict[str, t.Any]:
    """A request body as a JSON object (``{}`` when empty), or 415/400 (agent and hub alike)."""
    if not raw.strip():
        return {}
    if mimetype != "application/json":
        raise UnsupportedMediaType()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidJSON() from None
    if not isinstance(data, dict):
        raise InvalidJSON()
    try:
        # JSON can spell lone surrogates ("\ud800") that no UTF-8 text may hold.
        json.dumps(data, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError, ValueError):
        raise InvalidJSON() from None
    return t.cast(dict[str, t.Any], data)


def error_response(error: AgentError) -> Response:
    response = jsonify(error.to_dict())
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


class HeadlessKey:
    """Mounts the HeadlessKey auth API on a Flask app."""

    def __init__(
        self,
        app: Flask | None = None,
        *,
        clock: t.Callable[[], dt.datetime] | None = None,
    ) -> None:
        self._clock = clock
        # Shared by every app this instance is registered on.
        self._filters: dict[str, list[t.Callable[..., t.Any]]] = {name: [] for name in FILTERS}
        if app is not None:
            self.init_app(app)

    def filter(self, name: str) -> t.Callable[[F], F]:
        """Register a filter: ``@hk.filter("token_claims")``. See docs/extending.md.

        - ``token_claims(claims: dict, user) -> dict``: extra claims for access tokens (the
          registered claims iss, sub, exp, iat, nbf, jti, sid, aud, roles, data always win);
        - ``login_response(body: dict, user) -> dict``: the JSON of /token, /login, /token/refresh;
        - ``user_payload(payload: dict, user) -> dict``: the user object in responses and /me;
        - ``allow_registration(allowed: bool, fields: dict) -> bool``: veto a registration;
        - ``password_policy(problems: list[str], password: str, context: dict) -> list[str]``:
          add (or drop) reasons to refuse a new password.
        """
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r}; known: {', '.join(FILTERS)}")

        def register(fn: F) -> F:
            self._filters[name].append(fn)
            return fn

        return register

    def init_app(self, app: Flask) -> None:
        """Check the settings, open the database, and register the API on ``app``.

        Settings come from ``app.config``, then ``HEADLESSKEY_*`` environment variables for keys
        the app leaves unset. With no secret configured, one is generated on first start in the
        instance folder (mode 0600), and likewise the PEM key of RS256/ES256.
        """
        values = _configured_values(app)
        settings = config_module.build_settings(values, app.instance_path)
        engine = make_engine(settings.database_url, pool_size=settings.database_pool_size)
        session_factory = sessionmaker(engine, expire_on_commit=False)
        clock = self._clock or utcnow
        if config_module.parse_bool(PREFIX + "AUTO_MIGRATE",
                                    values.get(PREFIX + "AUTO_MIGRATE", True)):
            upgrade(engine)
        # The instance's key files seed the shared key table now, or, when the schema is not
        # there yet (`headlesskey-agent db upgrade` comes next), once it is.
        keys = KeyStore(session_factory, settings, clock)
        state = State(
            base_settings=settings,
            engine=engine,
            session_factory=session_factory,
            ring=keys.ring,
            keys=keys,
            hasher=Hasher(
                settings.argon2_time_cost, settings.argon2_memory_cost, settings.argon2_parallelism
            ),
            mailer=Mailer(settings),
            clock=clock,
            refresh_key=derive_key(settings.secret_key, "refresh-token"),
            reset_key=derive_key(settings.secret_key, "password-reset"),
            filters=self._filters,
            redis=store.connect(PREFIX + "REDIS_URL", settings.redis_url)
            if settings.redis_url else None,
            configured=values,
            instance_path=app.instance_path,
        )
        # Rotations follow the settings in force: a hub policy may choose the algorithm and the
        # token lifetime (which decides how long a superseded key keeps verifying).
        keys.follow(lambda: state.settings)
        try:
            keys.seed()
        except (OperationalError, ProgrammingError):
            engine.dispose()
        events.install(state.session_factory)
        lockout.install(state.session_factory)
        sessions.install(state)
        app.extensions[EXTENSION_KEY] = state

        from . import views

        app.url_map.converters[views.USER_ID_CONVERTER] = views.UserIdConverter
        app.register_blueprint(views.make_blueprint(settings))
        # The JWKS sits at the host's well-known path, outside the API prefix (RFC 8615).
        app.add_url_rule("/.well-known/jwks.json", "headlesskey_jwks", views.jwks)
        app.teardown_appcontext(_close_db)
        app.register_error_handler(AgentError, error_response)
        app.register_error_handler(HTTPException, _http_error)
        app.after_request(_decorate_response)

    def require(
        self, roles: t.Iterable[str] | None = None
    ) -> t.Callable[[t.Callable[..., t.Any]], t.Callable[..., t.Any]]:
        """Protect a route: a valid access token of this site, and one of ``roles`` if given.

        401 for a missing or bad token, 403 for a missing role. Inside the route,
        :data:`current_identity` is the caller.
        """
        wanted = frozenset(roles or ())

        def decorator(view: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
            @functools.wraps(view)
            def wrapped(*args: t.Any, **kwargs: t.Any) -> t.Any:
                enforce_access(tuple(wanted) if wanted else "authenticated")
                return view(*args, **kwargs)

            return wrapped

        return decorator


def _configured_values(app: Flask) -> dict[str, t.Any]:
    values = config_module.from_environ(os.environ)
    values.update({k: v for k, v in app.config.items() if k.startswith(PREFIX)})
    instance = Path(app.instance_path)
    if not values.get(PREFIX + "SECRET_KEY") and not values.get(PREFIX + "SECRET_KEY_FILE"):
        path = ensure_key_file(instance / "headlesskey-secret.key",
                               lambda: secrets.token_urlsafe(48).encode())
        values[PREFIX + "SECRET_KEY_FILE"] = str(path)
    algorithm = values.get(PREFIX + "ALGORITHM", "HS256")
    if algorithm in ("RS256", "ES256") and not values.get(PREFIX + "PRIVATE_KEY_FILE"):
        path = ensure_key_file(instance / f"headlesskey-{algorithm.lower()}.pem",
                               lambda: generate_private_key_pem(algorithm))
        values[PREFIX + "PRIVATE_KEY_FILE"] = str(path)
    return values


def _in_api(path: str) -> bool:
    settings = get_state().settings
    return (
        path == settings.prefix
        or path.startswith(settings.prefix + "/")
        or path == "/.well-known/jwks.json"
    )


def _http_error(exc: HTTPException) -> Response | HTTPException:
    """Routing errors under the API prefix (404, 405, 413) become JSON; the host's stay theirs."""
    if not _in_api(request.path):
        return exc
    status = exc.code or 500
    code = {404: "rest_no_route", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        status, "internal_error" if status >= 500 else "http_error"
    )
    # Never echo internals: a 5xx says only that something failed (the log has the trace).
    message = "An internal error occurred." if status >= 500 else (exc.description or exc.name)
    error = AgentError(message, code=code)
    error.status = status
    response = error_response(error)
    if exc.code == 405 and exc.response is None:
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
    return response


def _decorate_response(response: Response) -> Response:
    """CORS and security headers on every API response, errors included."""
    if not _in_api(request.path):
        return response
    settings = get_state().settings
    headers = security_headers(response).headers
    # Token responses must not be cached (RFC 6749 §5.1); no API response needs caching.
    if request.path != "/.well-known/jwks.json":
        headers["Cache-Control"] = "no-store"
        headers["Pragma"] = "no-cache"
    origin = request.headers.get("Origin")
    if settings.cors is True:
        # Any origin, never with credentials: tokens travel in headers, not cookies.
        headers["Access-Control-Allow-Origin"] = "*"
    elif settings.cors:
        # Also without an Origin: a shared cache (the JWKS may be cached) must not hand the
        # answer to a request without Origin to one with it, nor the reverse.
        headers.add("Vary", "Origin")
        if origin and origin in settings.cors:  # exact match: scheme, host and port
            headers["Access-Control-Allow-Origin"] = origin
    if "Access-Control-Allow-Origin" in headers:
        if request.method == "OPTIONS":
            headers["Access-Control-Allow-Methods"] = CORS_METHODS
            headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            headers["Access-Control-Max-Age"] = "600"
        else:
            # A script sees only the safelisted headers unless told: the time a 429 or 503
            # says to wait, and why a token was refused, are for the frontend to read.
            headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
    return response
