"""Settings of the agent: every ``HEADLESSKEY_*`` key, its default, coercion and meaning.

Load order for the standalone server (``headlesskey-agent serve``):

1. the defaults below;
2. ``site.toml`` in the instance folder (keys without the prefix, lower case; a table
   ``[mail]`` with ``host = ...`` sets ``HEADLESSKEY_MAIL_HOST``);
3. environment variables ``HEADLESSKEY_*`` (and ``DATABASE_URL``, ``REDIS_URL``);
4. for a site mounting the extension, whatever the host put in ``app.config``.

Every value is checked once at start-up; a bad one raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import tomllib
import typing as t
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from urllib.parse import SplitResult
from urllib.parse import urlsplit

from .errors import ConfigError
from .store import check_url as check_redis_url

PREFIX = "HEADLESSKEY_"
ALGORITHMS = ("HS256", "RS256", "ES256")


def _bool(key: str, value: t.Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def parse_bool(key: str, value: t.Any) -> bool:
    """A boolean setting: true/false, 1/0, yes/no, on/off."""
    return _bool(key, value)


def _int(key: str, value: t.Any, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{key}: must be {bound}, got {number}")
    return number


def _str(key: str, value: t.Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _choice(key: str, value: t.Any, choices: t.Sequence[str]) -> str:
    text = _str(key, value)
    if text not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {text!r}")
    return text


def _split(key: str, text: str) -> SplitResult:
    """``urlsplit`` with its refusals as :class:`ConfigError`: an unclosed ``[`` in the host, a
    host that Unicode normalisation turns into another URL, a port that is no number 0-65535."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - reading it is the check
    except ValueError:
        raise ConfigError(f"{key}: not a URL: {text!r}") from None
    return parts


def _url(key: str, value: t.Any) -> str:
    """An http(s) URL without a user name or password (they would show in logs and errors)."""
    text = _str(key, value).rstrip("/")
    parts = _split(key, text)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{key}: expected an http(s) URL, got {text!r}")
    if "@" in parts.netloc:
        raise ConfigError(f"{key}: no user name or password in the URL")
    return text


def _private_host(host: str) -> bool:
    """Loopback, a private or link-local address, or a one-label name (``hub``, as in a
    container network): hosts that plain http reaches without crossing the internet."""
    if host == "localhost" or "." not in host and ":" not in host:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def hub_url(key: str, value: t.Any) -> str:
    """The hub's URL (where peers' keys come from): https, or http to a private host."""
    text = _url(key, value)
    parts = urlsplit(text)
    if parts.scheme != "https" and not _private_host(parts.hostname or ""):
        raise ConfigError(
            f"{key}: expected an https URL (http only for localhost, a private address or a "
            f"one-label host name), got {text!r}")
    return text


def _path_segment(key: str, value: t.Any, allow_empty: bool = False) -> str:
    text = _str(key, value).strip("/")
    if not text and allow_empty:
        return ""
    if not text or any(not (c.isalnum() or c in "-_./") for c in text) or ".." in text:
        raise ConfigError(f"{key}: expected a URL path segment like 'headlesskey', got {value!r}")
    return text


def _cors(key: str, value: t.Any) -> bool | tuple[str, ...]:
    """``true`` (any origin, no credentials), ``false``, or a list of exact origins."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError:
                raise ConfigError(f"{key}: not a valid JSON list: {value!r}") from None
        elif stripped.lower() in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
            return _bool(key, stripped)
        else:
            value = [o for o in stripped.replace(",", " ").split() if o]
    if isinstance(value, bool):
        return value
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected true, false or a list of origins, got {value!r}")
    origins = []
    for origin in value:
        text = _str(key, origin)
        parts = _split(key, text)
        if (
            parts.scheme not in {"http", "https"}
            or not parts.hostname
            or "@" in parts.netloc
            or parts.path
            or parts.query
            or parts.fragment
        ):
            raise ConfigError(f"{key}: {text!r} is not an origin like https://app.example.com")
        origins.append(_origin(key, text, parts))
    return tuple(origins)


def _origin(key: str, text: str, parts: SplitResult) -> str:
    """An origin as a browser sends it in ``Origin``: a lowercase host, an international one in
    its ASCII (punycode) form, and no port where it is the scheme's default (443, 80)."""
    host = parts.hostname or ""
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ConfigError(f"{key}: {text!r} is not an origin like "
                              "https://app.example.com") from None
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and port != {"https": 443, "http": 80}[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


# Endpoint names for access rules, and who may call each by default.
ENDPOINT_ACCESS: dict[str, str | tuple[str, ...]] = {
    "token": "public",
    "login": "public",
    "token_validate": "public",
    "token_refresh": "public",
    "token_revoke": "public",
    "register": "public",
    "forgot_password": "public",
    "reset_password": "public",
    "change_password": "authenticated",
    "me": "authenticated",
    "sessions": "authenticated",
    "openapi": "public",
    "sso_issue": "authenticated",
    "sso_exchange": "public",
    "admin": ("administrator",),
}

WEBHOOK_EVENTS = (
    "login.succeeded",
    "login.failed",
    "lockout.started",
    "user.registered",
    "user.unlocked",
    "user.disabled",
    "user.enabled",
    "user.roles_changed",
    "token.refreshed",
    "token.reuse_detected",
    "token.revoked",
    "password.reset_requested",
    "password.reset",
    "password.changed",
    "session.evicted",
    "session.ended",
    "session.limit_reached",
    "sso.issued",
    "sso.exchanged",
    "sso.rejected",
    "webhook.disabled",
    "key.rotated",
)


@dataclass(frozen=True)
class WebhookEndpoint:
    """A receiver of security events, signed the Standard Webhooks way."""

    id: str
    url: str
    secret: str = field(repr=False)  # whsec_<base64 of >= 24 random bytes>
    events: frozenset[str] = frozenset()  # empty: every event
    # During a rotation: the secret being replaced, and when it stops signing (None: while it
    # is configured). Deliveries carry a signature by each secret in use.
    previous_secret: str | None = field(default=None, repr=False)
    previous_secret_expires: dt.datetime | None = None

    def wants(self, event: str) -> bool:
        return not self.events or event in self.events

    def signing_secrets(self, now: dt.datetime) -> tuple[str, ...]:
        """The secrets that sign a delivery at ``now``: the current one first."""
        if self.previous_secret is None or (
            self.previous_secret_expires is not None and now >= self.previous_secret_expires
        ):
            return (self.secret,)
        return (self.secret, self.previous_secret)


def json_value(key: str, value: t.Any) -> t.Any:
    """Values from the environment are strings; lists and tables come as JSON."""
    if isinstance(value, str) and value.strip()[:1] in {"[", "{"}:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"{key}: not valid JSON: {value!r}") from None
    return value


def _access(key: str, value: t.Any) -> dict[str, str | tuple[str, ...]]:
    value = json_value(key, value)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table of endpoint = rule, got {value!r}")
    rules = dict(ENDPOINT_ACCESS)
    for endpoint, rule in value.items():
        if endpoint not in ENDPOINT_ACCESS:
            raise ConfigError(f"{key}: unknown endpoint {endpoint!r}")
        if rule in ("public", "authenticated") and endpoint == "admin":
            raise ConfigError(f"{key}: admin must be a list of roles (the admin API reads the "
                              "activity log and disables accounts: never for anyone)")
        if rule in ("public", "authenticated"):
            rules[endpoint] = rule
        elif isinstance(rule, list) and rule:
            rules[endpoint] = tuple(check_role(f"{key}: {endpoint}", r) for r in rule)
        else:
            raise ConfigError(
                f"{key}: {endpoint} must be \"public\", \"authenticated\" or a list of roles"
            )
    return rules


def check_role(key: str, role: t.Any) -> str:
    """A role name as written: 1 to 64 printable characters, no space at either end (a role
    that only looks like another, or holds a control character, is refused, not stored)."""
    if (not isinstance(role, str) or not 1 <= len(role) <= 64 or not role.isprintable()
            or role != role.strip()):
        raise ConfigError(f"{key}: a role is 1 to 64 printable characters with no space at "
                          f"either end, got {role!r}")
    return role


def check_default_role(role: str, admin_roles: t.Collection[str]) -> None:
    """New accounts never get a role of the admin API: open registration would hand it out."""
    if role in admin_roles:
        raise ConfigError(f"{PREFIX}DEFAULT_ROLE: {role!r} may use the admin API "
                          "(ACCESS admin); new accounts must not")


def _rotation(key: str, value: t.Any) -> int:
    """A rotation period in seconds: 0 (never) or at least 5 s, at most 10 years."""
    seconds = _int(key, value, 0, 3650 * 86400)
    if 0 < seconds < 5:
        raise ConfigError(f"{key}: 0 (never) or at least 5 seconds")
    return seconds


def _networks(key: str, value: t.Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    value = json_value(key, value)
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of IP addresses or networks")
    try:
        return tuple(ipaddress.ip_network(str(v), strict=False) for v in value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _federation(get: t.Callable[[str], t.Any], instance_path: str) -> dict[str, t.Any]:
    """Hub membership settings; all three of URL, site key and secret, or none."""
    url, site_key, secret_file = get("HUB_URL"), get("HUB_SITE_KEY"), get("HUB_SECRET_FILE")
    values: dict[str, t.Any] = {
        "federation_stale_window": _int(
            PREFIX + "FEDERATION_STALE_WINDOW", get("FEDERATION_STALE_WINDOW"), 60, 30 * 86400
        ),
        "directory_refresh": _int(PREFIX + "DIRECTORY_REFRESH", get("DIRECTORY_REFRESH"), 1, 86400),
        "sso_assertion_ttl": _int(PREFIX + "SSO_ASSERTION_TTL", get("SSO_ASSERTION_TTL"), 5, 60),
        "sso_link_by_email": CHECKS["SSO_LINK_BY_EMAIL"](
            PREFIX + "SSO_LINK_BY_EMAIL", get("SSO_LINK_BY_EMAIL")),
        "federation_key_rotation": _rotation(
            PREFIX + "FEDERATION_KEY_ROTATION", get("FEDERATION_KEY_ROTATION")),
        "hub_secret_rotation": _rotation(
            PREFIX + "HUB_SECRET_ROTATION", get("HUB_SECRET_ROTATION")),
    }
    role_map = json_value(PREFIX + "SSO_ROLE_MAP", get("SSO_ROLE_MAP"))
    if not isinstance(role_map, dict):
        raise ConfigError(f"{PREFIX}SSO_ROLE_MAP: expected a table of peer role = local role")
    values["sso_role_map"] = {check_role(PREFIX + "SSO_ROLE_MAP", k):
                              check_role(PREFIX + "SSO_ROLE_MAP", v) for k, v in role_map.items()}
    given = [v for v in (url, site_key, secret_file) if v]
    if not given:
        return values
    if len(given) != 3:
        raise ConfigError(
            f"{PREFIX}HUB_URL, HUB_SITE_KEY and HUB_SECRET_FILE go together "
            "(run `headlesskey-agent join`)"
        )
    values["hub_url"] = hub_url(PREFIX + "HUB_URL", url)
    values["hub_site_key"] = _str(PREFIX + "HUB_SITE_KEY", site_key)
    text = _read_file(PREFIX + "HUB_SECRET_FILE", _str(PREFIX + "HUB_SECRET_FILE", secret_file))
    values["hub_secret"] = parse_hub_secret(PREFIX + "HUB_SECRET_FILE", text.decode().strip())
    key_file = get("FEDERATION_KEY_FILE") or str(Path(instance_path) / "federation-key.pem")
    values["federation_key_pem"] = _read_file(PREFIX + "FEDERATION_KEY_FILE", key_file)
    return values


def parse_hub_secret(key: str, text: str) -> bytes:
    """The raw bytes of a hub secret in its text form ``hks_<base64url>``."""
    import base64
    import binascii

    body = text.removeprefix("hks_")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if not text.startswith("hks_") or len(raw) < 32:
        raise ConfigError(f"{key}: not a hub secret (hks_ and at least 32 bytes)")
    return raw


def _webhooks(key: str, value: t.Any) -> tuple[WebhookEndpoint, ...]:
    value = json_value(key, value)
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of endpoints")
    endpoints = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table with url and secret")
        unknown = set(item) - {"id", "url", "secret", "events", "previous_secret",
                               "previous_secret_expires"}
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        url = _url(f"{where}.url", item.get("url"))
        secret = whsec(f"{where}.secret", item.get("secret"))
        previous = item.get("previous_secret")
        if previous is not None:
            previous = whsec(f"{where}.previous_secret", previous)
            if hmac.compare_digest(previous, secret):
                raise ConfigError(f"{where}.previous_secret: the same as the secret")
        expires = item.get("previous_secret_expires")
        if expires is not None:
            if previous is None:
                raise ConfigError(f"{where}.previous_secret_expires: without a previous_secret")
            expires = _utc_time(f"{where}.previous_secret_expires", expires)
        events = item.get("events", [])
        if not isinstance(events, list) or any(e not in WEBHOOK_EVENTS for e in events):
            raise ConfigError(f"{where}.events: a list of events from: {', '.join(WEBHOOK_EVENTS)}")
        endpoint_id = item.get("id") or hashlib.sha256(url.encode()).hexdigest()[:12]
        endpoints.append(
            WebhookEndpoint(id=_str(f"{where}.id", endpoint_id)[:64], url=url, secret=secret,
                            events=frozenset(events), previous_secret=previous,
                            previous_secret_expires=expires)
        )
    if len({e.id for e in endpoints}) != len(endpoints):
        raise ConfigError(f"{key}: two endpoints share an id")
    in_use = [s for e in endpoints for s in (e.secret, e.previous_secret) if s is not None]
    if len(set(in_use)) != len(in_use):
        raise ConfigError(f"{key}: two endpoints share a secret (give each its own)")
    return tuple(endpoints)


def whsec(key: str, value: t.Any) -> str:
    """A Standard Webhooks secret: ``whsec_`` and the base64 of at least 24 bytes."""
    import base64
    import binascii

    secret = _str(key, value)
    body = secret.removeprefix("whsec_")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not secret.startswith("whsec_") or len(raw) < 24:
        raise ConfigError(f"{key}: expected whsec_ and at least 24 base64 bytes")
    return secret


def _utc_time(key: str, value: t.Any) -> dt.datetime:
    """An ISO 8601 time with its UTC offset (``2026-12-01T12:00:00Z``), or a TOML date-time."""
    when: dt.datetime | None = value if isinstance(value, dt.datetime) else None
    if when is None:
        try:
            when = dt.datetime.fromisoformat(_str(key, value).replace("Z", "+00:00"))
        except ValueError:
            when = None
    try:
        if when is None or when.tzinfo is None:
            raise ValueError
        return when.astimezone(dt.UTC)  # OverflowError past year 1 or 9999 in UTC
    except (ValueError, OverflowError):
        raise ConfigError(f"{key}: expected an ISO 8601 time with its offset, e.g. "
                          "2026-12-01T12:00:00Z") from None


# The checks of the settings a federation hub may manage (see agent.policy), one per key: the
# same function checks a value from site.toml, the environment, or the hub's console.
CHECKS: dict[str, t.Callable[[str, t.Any], t.Any]] = {
    "ALGORITHM": lambda k, v: _choice(k, v, ALGORITHMS),
    "ACCESS_TOKEN_TTL": lambda k, v: _int(k, v, 30, 86400),
    "REFRESH_TOKEN_TTL": lambda k, v: _int(k, v, 60, 365 * 86400),
    "SESSION_MAX_AGE": lambda k, v: _int(k, v, 60, 365 * 86400),
    "REGISTRATION": lambda k, v: _choice(k, v, ("open", "closed")),
    "DEFAULT_ROLE": lambda k, v: check_role(k, _str(k, v).strip()),
    "PASSWORD_MIN_LENGTH": lambda k, v: _int(k, v, 6, 128),
    "PASSWORD_MAX_LENGTH": lambda k, v: _int(k, v, 64, 4096),
    "CORS": lambda k, v: _cors(k, v),
    "TRUSTED_PROXIES": lambda k, v: _int(k, v, 0, 10),
    "ACCESS": lambda k, v: _access(k, v),
    "LOCKOUT_MAX_FAILURES": lambda k, v: _int(k, v, 1, 100),
    "LOCKOUT_IP_MAX_FAILURES": lambda k, v: _int(k, v, 1, 10000),
    "LOCKOUT_WINDOW": lambda k, v: _int(k, v, 1, 86400),
    "LOCKOUT_DURATION": lambda k, v: _int(k, v, 1, 86400),
    "VALIDATE_MAX_FAILURES": lambda k, v: _int(k, v, 0, 100000),
    "MAX_SESSIONS": lambda k, v: _int(k, v, 0, 10000),
    "SESSION_LIMIT_POLICY": lambda k, v: _choice(k, v, ("evict_oldest", "reject")),
    "WEBHOOKS": lambda k, v: _webhooks(k, v),
    "SSO_LINK_BY_EMAIL": lambda k, v: _bool(k, v),
}


@dataclass(frozen=True)
class Settings:
    """Checked settings, read on every request (attribute access, no dict lookups)."""

    site_url: str  # public base URL of the site; the default issuer
    site_name: str  # name used in mails
    issuer: str  # `iss` of every token this site mints; matched exactly
    audience: str | None  # `aud` of access tokens; when set, tokens without it are refused
    algorithm: str  # HS256, RS256 or ES256 for access tokens
    # Secrets, and URLs that may hold a password, are left out of the repr (logs, tracebacks).
    secret_key: bytes = field(repr=False)  # master secret; every purpose derives its own key
    private_key_pem: bytes | None = field(repr=False)  # PEM key for RS256/ES256
    database_url: str = field(repr=False)
    database_pool_size: int  # PostgreSQL connections a process keeps open while idle
    redis_url: str | None = field(repr=False)  # replay caches, counters; None: the database
    api_root: str  # "wp-json"
    namespace: str  # "headlesskey"
    version: str  # "v1"
    access_token_ttl: int
    refresh_token_ttl: int  # a refresh token unused this long expires (inactivity)
    session_max_age: int  # absolute lifetime of a session, whatever the refreshes
    refresh_grace: int  # parallel refreshes within this window get the same pair
    session_lease: float  # seconds a worker may answer a session check from its last read
    leeway: int  # clock skew allowed on exp/nbf/iat
    cors: bool | tuple[str, ...]
    registration: str  # "open" or "closed"
    default_role: str
    password_min_length: int
    password_max_length: int
    argon2_time_cost: int
    argon2_memory_cost: int  # KiB
    argon2_parallelism: int
    reset_link_ttl: int
    reset_otp_ttl: int
    reset_otp_length: int
    reset_otp_max_attempts: int
    reset_max_per_hour: int  # reset mails per account per hour; more are dropped silently
    reset_url: str  # the frontend page that receives ?login=...&token=...
    mail_backend: str  # console, smtp or null
    mail_host: str
    mail_port: int
    mail_security: str  # none, starttls or ssl
    mail_username: str
    mail_password: str = field(repr=False)
    mail_from: str = ""
    mail_timeout: int = 10
    max_body: int = 65536
    trusted_proxies: int = 0  # number of proxies in front whose X-Forwarded-For is trusted
    access: t.Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    lockout_max_failures: int = 5  # per account within the window
    lockout_ip_max_failures: int = 20  # per client IP within the window
    lockout_window: int = 900
    lockout_duration: int = 900  # first lock; doubles on each repeat, at most 24 h
    lockout_allowlist: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    validate_max_failures: int = 60  # failed /token/validate per client IP a minute; 0 = off
    max_sessions: int = 0  # active sessions per user; 0 = no limit
    session_limit_policy: str = "evict_oldest"  # or "reject"
    webhooks: tuple[WebhookEndpoint, ...] = ()
    webhook_timeout: int = 15
    audit_retention_days: int = 90
    key_rotation: int = 30 * 86400  # seconds; 0 = never
    jwks_max_age: int = 300
    hub_url: str | None = None
    hub_site_key: str | None = None
    hub_secret: bytes | None = field(default=None, repr=False)
    federation_key_pem: bytes | None = field(default=None, repr=False)
    federation_stale_window: int = 86400
    directory_refresh: int = 60
    sso_assertion_ttl: int = 60
    sso_link_by_email: bool = True
    sso_role_map: t.Mapping[str, str] = field(default_factory=dict)
    federation_key_rotation: int = 30 * 86400
    hub_secret_rotation: int = 90 * 86400

    @property
    def federated(self) -> bool:
        return bool(self.hub_url and self.hub_site_key and self.hub_secret)

    @property
    def prefix(self) -> str:
        """The URL prefix of the REST API, e.g. ``/wp-json/headlesskey/v1``."""
        root = f"/{self.api_root}" if self.api_root else ""
        return f"{root}/{self.namespace}/{self.version}"


# key (without prefix) -> (default, documentation). The documentation is rendered into
# docs/config.md by hand; keep both in step.
DEFAULTS: dict[str, tuple[t.Any, str]] = {
    "SITE_URL": ("http://127.0.0.1:8000", "Public base URL of the site; default issuer."),
    "SITE_NAME": ("HeadlessKey site", "Name shown in mails."),
    "ISSUER": (None, "`iss` of tokens; defaults to SITE_URL."),
    "AUDIENCE": (None, "`aud` of access tokens; unset means no audience."),
    "ALGORITHM": ("HS256", "HS256, RS256 or ES256."),
    "SECRET_KEY": (None, "Master secret, at least 32 bytes."),
    "SECRET_KEY_FILE": (None, "File holding the master secret."),
    "PRIVATE_KEY_FILE": (None, "PEM private key for RS256/ES256."),
    "DATABASE_URL": (None, "SQLAlchemy URL; default SQLite in the instance folder."),
    "DATABASE_POOL_SIZE": (5, "PostgreSQL connections each process keeps open while idle; "
                              "more open as needed and close after."),
    "REDIS_URL": (None, "Redis for replay caches and brute-force counters; unset: the database."),
    "API_ROOT": ("wp-json", "First path segment of the API."),
    "REST_NAMESPACE": ("headlesskey", "Namespace segment, as the plugin's constant."),
    "REST_VERSION": ("v1", "Version segment, as the plugin's constant."),
    "ACCESS_TOKEN_TTL": (900, "Access token lifetime, seconds."),
    "REFRESH_TOKEN_TTL": (14 * 86400, "Refresh token inactivity lifetime, seconds."),
    "SESSION_MAX_AGE": (30 * 86400, "Absolute session lifetime, seconds."),
    "REFRESH_GRACE": (10, "Seconds in which a reused refresh token returns the same pair."),
    "SESSION_LEASE_MS": (20, "Milliseconds a worker may answer a session check from its last "
                             "read of that session; a change that takes access away answers "
                             "only after this long. 0: read on every request."),
    "LEEWAY": (30, "Clock skew allowed on exp/nbf/iat, seconds (at most 60)."),
    "CORS": (True, "true, false, or a list of allowed origins."),
    "REGISTRATION": ("open", "open or closed."),
    "DEFAULT_ROLE": ("subscriber", "Role given to new accounts."),
    "PASSWORD_MIN_LENGTH": (8, "Minimum password length (characters)."),
    "PASSWORD_MAX_LENGTH": (256, "Maximum password length (characters)."),
    "ARGON2_TIME_COST": (2, "argon2id iterations."),
    "ARGON2_MEMORY_COST": (19456, "argon2id memory, KiB (OWASP minimum 19 MiB)."),
    "ARGON2_PARALLELISM": (1, "argon2id lanes."),
    "RESET_LINK_TTL": (3600, "Reset link lifetime, seconds."),
    "RESET_OTP_TTL": (600, "Reset code lifetime, seconds."),
    "RESET_OTP_LENGTH": (6, "Digits in a reset code."),
    "RESET_OTP_MAX_ATTEMPTS": (5, "Wrong codes before a code is burned."),
    "RESET_MAX_PER_HOUR": (5, "Reset mails per account per hour; further requests send none."),
    "RESET_URL": (None, "Frontend reset page; default SITE_URL + /reset-password."),
    "MAIL_BACKEND": ("console", "console (development), smtp or null."),
    "MAIL_HOST": ("127.0.0.1", "SMTP host."),
    "MAIL_PORT": (25, "SMTP port."),
    "MAIL_SECURITY": ("none", "none, starttls or ssl."),
    "MAIL_USERNAME": ("", "SMTP user (empty: no login)."),
    "MAIL_PASSWORD": ("", "SMTP password."),
    "MAIL_FROM": ("", "From address; default no-reply@<site host>."),
    "MAIL_TIMEOUT": (10, "SMTP timeout, seconds."),
    "MAX_BODY": (65536, "Largest request body accepted, bytes."),
    "TRUSTED_PROXIES": (0, "Proxies in front of the site whose X-Forwarded-For is trusted."),
    "AUTO_MIGRATE": (True, "Mounted extension: upgrade the schema in init_app."),
    "ACCESS": ({}, "Per-endpoint rule: public, authenticated, or a list of roles."),
    "LOCKOUT_MAX_FAILURES": (5, "Failed attempts per account before a lock."),
    "LOCKOUT_IP_MAX_FAILURES": (20, "Failed attempts per client IP before a lock."),
    "LOCKOUT_WINDOW": (900, "Seconds in which failures are counted."),
    "LOCKOUT_DURATION": (900, "First lock, seconds; doubles on each repeat (max 24 h)."),
    "LOCKOUT_ALLOWLIST": ([], "IPs or networks never locked out."),
    "VALIDATE_MAX_FAILURES": (60, "Failed /token/validate per client IP a minute; 0 = off."),
    "MAX_SESSIONS": (0, "Active sessions (devices) per user; 0 = unlimited."),
    "SESSION_LIMIT_POLICY": ("evict_oldest", "evict_oldest or reject."),
    "WEBHOOKS": ([], "Webhook endpoints: [{id, url, secret, events}]."),
    "WEBHOOK_TIMEOUT": (15, "Seconds per delivery attempt."),
    "AUDIT_RETENTION_DAYS": (90, "Activity log rows older than this are pruned."),
    "KEY_ROTATION": (30 * 86400, "Seconds between rotations of the access-token key; 0 = never."),
    "JWKS_MAX_AGE": (300, "Cache lifetime of the JWKS; a new key is published this long first."),
    "HUB_URL": (None, "The federation hub this site joined (set by `join`)."),
    "HUB_SITE_KEY": (None, "This site's key at the hub."),
    "HUB_SECRET_FILE": (None, "File holding this site's hub secret (hks_...), mode 0600."),
    "FEDERATION_KEY_FILE": (None, "PEM key signing SSO assertions; default federation-key.pem."),
    "FEDERATION_STALE_WINDOW": (86400, "Seconds exchanges keep working from cached hub data."),
    "DIRECTORY_REFRESH": (60, "Seconds between directory refreshes from the hub."),
    "SSO_ASSERTION_TTL": (60, "Lifetime of an SSO assertion, seconds (at most 60)."),
    "SSO_LINK_BY_EMAIL": (True, "Link a peer identity to a local account by verified email."),
    "SSO_ROLE_MAP": ({}, "Peer role -> local role; unmapped remote roles grant nothing."),
    "FEDERATION_KEY_ROTATION": (30 * 86400, "Seconds between rotations of the SSO key; 0 = never."),
    "HUB_SECRET_ROTATION": (90 * 86400, "Seconds between rotations of the hub secret; 0 = never."),
}

# Tables of site.toml kept whole instead of flattened into prefixed keys.
NESTED_TABLES = {"ACCESS", "SSO_ROLE_MAP"}

# Environment variables read without the prefix (conventional names).
ENV_ALIASES = {"DATABASE_URL": "DATABASE_URL", "REDIS_URL": "REDIS_URL"}


def load_toml(path: Path) -> dict[str, t.Any]:
    """Read a ``site.toml`` and flatten it into ``HEADLESSKEY_*`` keys."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    flat: dict[str, t.Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key.upper() not in NESTED_TABLES:
            for sub, subvalue in value.items():
                flat[f"{key}_{sub}".upper()] = subvalue
        else:
            flat[key.upper()] = value
    unknown = sorted(k for k in flat if k not in DEFAULTS)
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0].lower()!r}")
    base = path.parent
    for key in ("SECRET_KEY_FILE", "PRIVATE_KEY_FILE", "HUB_SECRET_FILE", "FEDERATION_KEY_FILE"):
        if isinstance(flat.get(key), str):
            flat[key] = str((base / flat[key]).resolve())
    return {PREFIX + k: v for k, v in flat.items()}


def from_environ(environ: t.Mapping[str, str]) -> dict[str, t.Any]:
    """Collect ``HEADLESSKEY_*`` variables (and ``DATABASE_URL``, ``REDIS_URL``) from the
    environment."""
    found: dict[str, t.Any] = {}
    for key in DEFAULTS:
        if PREFIX + key in environ:
            found[PREFIX + key] = environ[PREFIX + key]
    for key, env in ENV_ALIASES.items():
        if env in environ and PREFIX + key not in environ:
            found[PREFIX + key] = environ[env]
    return found


def _read_file(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror})") from None


def build_settings(config: t.Mapping[str, t.Any], instance_path: str) -> Settings:
    """Check every ``HEADLESSKEY_*`` value in ``config`` and return :class:`Settings`."""

    def get(key: str) -> t.Any:
        value = config.get(PREFIX + key)
        return DEFAULTS[key][0] if value is None else value

    def check(key: str) -> t.Any:
        return CHECKS[key](PREFIX + key, get(key))

    algorithm = check("ALGORITHM")
    secret: bytes | None = None
    if get("SECRET_KEY") is not None:
        secret = _str(PREFIX + "SECRET_KEY", get("SECRET_KEY")).encode()
    elif get("SECRET_KEY_FILE") is not None:
        secret = _read_file(
            PREFIX + "SECRET_KEY_FILE", _str(PREFIX + "SECRET_KEY_FILE", get("SECRET_KEY_FILE"))
        ).strip()
    if secret is None:
        raise ConfigError(
            f"{PREFIX}SECRET_KEY: not set (run `headlesskey-agent init` or set the variable)"
        )
    if len(secret) < 32:
        raise ConfigError(f"{PREFIX}SECRET_KEY: must be at least 32 bytes (RFC 7518 §3.2)")

    private_key_pem = None
    if algorithm != "HS256":
        path = get("PRIVATE_KEY_FILE")
        if path is None:
            raise ConfigError(f"{PREFIX}PRIVATE_KEY_FILE: required for {algorithm}")
        private_key_pem = _read_file(PREFIX + "PRIVATE_KEY_FILE",
                                     _str(PREFIX + "PRIVATE_KEY_FILE", path))

    site_url = _url(PREFIX + "SITE_URL", get("SITE_URL"))
    issuer = _str(PREFIX + "ISSUER", get("ISSUER") or site_url)
    audience = get("AUDIENCE")
    if audience is not None:
        audience = _str(PREFIX + "AUDIENCE", audience) or None
    database_url = get("DATABASE_URL") or f"sqlite:///{Path(instance_path) / 'headlesskey.db'}"
    mail_from = _str(PREFIX + "MAIL_FROM", get("MAIL_FROM")) or (
        f"no-reply@{urlsplit(site_url).hostname}"
    )
    leeway = _int(PREFIX + "LEEWAY", get("LEEWAY"), 0, 60)
    access_ttl = check("ACCESS_TOKEN_TTL")
    min_len = check("PASSWORD_MIN_LENGTH")
    max_len = check("PASSWORD_MAX_LENGTH")
    default_role, access = check("DEFAULT_ROLE"), check("ACCESS")
    check_default_role(default_role, access["admin"])
    return Settings(
        site_url=site_url,
        site_name=_str(PREFIX + "SITE_NAME", get("SITE_NAME")),
        issuer=issuer,
        audience=audience,
        algorithm=algorithm,
        secret_key=secret,
        private_key_pem=private_key_pem,
        database_url=_str(PREFIX + "DATABASE_URL", database_url),
        database_pool_size=_int(PREFIX + "DATABASE_POOL_SIZE", get("DATABASE_POOL_SIZE"),
                                minimum=1, maximum=100),
        redis_url=check_redis_url(PREFIX + "REDIS_URL", get("REDIS_URL")),
        api_root=_path_segment(PREFIX + "API_ROOT", get("API_ROOT"), allow_empty=True),
        namespace=_path_segment(PREFIX + "REST_NAMESPACE", get("REST_NAMESPACE")),
        version=_path_segment(PREFIX + "REST_VERSION", get("REST_VERSION")),
        access_token_ttl=access_ttl,
        refresh_token_ttl=check("REFRESH_TOKEN_TTL"),
        session_max_age=check("SESSION_MAX_AGE"),
        refresh_grace=_int(PREFIX + "REFRESH_GRACE", get("REFRESH_GRACE"), 0, 120),
        session_lease=_int(PREFIX + "SESSION_LEASE_MS", get("SESSION_LEASE_MS"), 0, 1000) / 1000,
        leeway=leeway,
        cors=check("CORS"),
        registration=check("REGISTRATION"),
        default_role=default_role,
        password_min_length=min_len,
        password_max_length=max(max_len, min_len),
        argon2_time_cost=_int(PREFIX + "ARGON2_TIME_COST", get("ARGON2_TIME_COST"), 1, 64),
        argon2_memory_cost=_int(PREFIX + "ARGON2_MEMORY_COST", get("ARGON2_MEMORY_COST"), 8,
                                0x400000),  # 4 GiB
        argon2_parallelism=_int(PREFIX + "ARGON2_PARALLELISM", get("ARGON2_PARALLELISM"), 1, 16),
        reset_link_ttl=_int(PREFIX + "RESET_LINK_TTL", get("RESET_LINK_TTL"), 60, 7 * 86400),
        reset_otp_ttl=_int(PREFIX + "RESET_OTP_TTL", get("RESET_OTP_TTL"), 60, 86400),
        reset_otp_length=_int(PREFIX + "RESET_OTP_LENGTH", get("RESET_OTP_LENGTH"), 6, 10),
        reset_otp_max_attempts=_int(
            PREFIX + "RESET_OTP_MAX_ATTEMPTS", get("RESET_OTP_MAX_ATTEMPTS"), 1, 20
        ),
        reset_max_per_hour=_int(
            PREFIX + "RESET_MAX_PER_HOUR", get("RESET_MAX_PER_HOUR"), 1, 100
        ),
        reset_url=_url(PREFIX + "RESET_URL", get("RESET_URL") or f"{site_url}/reset-password"),
        mail_backend=_choice(
            PREFIX + "MAIL_BACKEND", get("MAIL_BACKEND"), ("console", "smtp", "null")
        ),
        mail_host=_str(PREFIX + "MAIL_HOST", get("MAIL_HOST")),
        mail_port=_int(PREFIX + "MAIL_PORT", get("MAIL_PORT"), 1, 65535),
        mail_security=_choice(
            PREFIX + "MAIL_SECURITY", get("MAIL_SECURITY"), ("none", "starttls", "ssl")
        ),
        mail_username=_str(PREFIX + "MAIL_USERNAME", get("MAIL_USERNAME")),
        mail_password=_str(PREFIX + "MAIL_PASSWORD", get("MAIL_PASSWORD")),
        mail_from=mail_from,
        mail_timeout=_int(PREFIX + "MAIL_TIMEOUT", get("MAIL_TIMEOUT"), 1, 300),
        max_body=_int(PREFIX + "MAX_BODY", get("MAX_BODY"), 1024, 10 * 1024 * 1024),
        trusted_proxies=check("TRUSTED_PROXIES"),
        access=access,
        lockout_max_failures=check("LOCKOUT_MAX_FAILURES"),
        lockout_ip_max_failures=check("LOCKOUT_IP_MAX_FAILURES"),
        lockout_window=check("LOCKOUT_WINDOW"),
        lockout_duration=check("LOCKOUT_DURATION"),
        lockout_allowlist=_networks(PREFIX + "LOCKOUT_ALLOWLIST", get("LOCKOUT_ALLOWLIST")),
        validate_max_failures=check("VALIDATE_MAX_FAILURES"),
        max_sessions=check("MAX_SESSIONS"),
        session_limit_policy=check("SESSION_LIMIT_POLICY"),
        webhooks=check("WEBHOOKS"),
        webhook_timeout=_int(PREFIX + "WEBHOOK_TIMEOUT", get("WEBHOOK_TIMEOUT"), 1, 60),
        audit_retention_days=_int(
            PREFIX + "AUDIT_RETENTION_DAYS", get("AUDIT_RETENTION_DAYS"), 1, 36500
        ),
        key_rotation=_rotation(PREFIX + "KEY_ROTATION", get("KEY_ROTATION")),
        jwks_max_age=_int(PREFIX + "JWKS_MAX_AGE", get("JWKS_MAX_AGE"), 0, 86400),
        **_federation(get, instance_path),
    )


def environ_instance() -> str | None:
    """The instance folder named by ``HEADLESSKEY_INSTANCE``, if any."""
    return os.environ.get(PREFIX + "INSTANCE")
