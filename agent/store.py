"""Optional Redis, shared by every worker and instance, for replay caches and counters.

With ``HEADLESSKEY_REDIS_URL`` set, the agent remembers the ``jti`` of each SSO assertion it
accepted in Redis instead of a database row (and the hub does the same with request nonces,
``HEADLESSKEY_HUB_REDIS_URL``): one ``SET key 1 NX EX ttl`` per use, atomic across every
process that shares the Redis. Unset, the database keeps them (a unique row each). The
brute-force counters move there too (:mod:`agent.services.lockout`).

Accounts, sessions, revocations and refresh-token families always stay in the database. When
Redis cannot answer, the request is refused with 503 ``store_unavailable``: a replay cache or a
counter that cannot be read must not let a replay or a guess through.
"""

from __future__ import annotations

import hashlib
import logging
import typing as t
from urllib.parse import urlsplit

from .errors import ConfigError
from .errors import ServiceUnavailable
from .resp import Redis
from .resp import RedisError

log = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix")
TIMEOUT = 2.0  # seconds to connect, and to wait for an answer, before the request gets 503


class StoreUnavailable(ServiceUnavailable):
    code = "store_unavailable"
    status = 503
    message = "A shared store of this service is unavailable. Try again shortly."

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "5"})


def check_url(key: str, value: t.Any) -> str | None:
    """A Redis URL setting: None when unset or empty, else ``redis://``, ``rediss://``, ``unix://``."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a redis:// URL, got {value!r}")
    parts = urlsplit(value.strip())
    if parts.scheme not in SCHEMES or not (parts.netloc or parts.path):
        raise ConfigError(f"{key}: expected a redis://, rediss:// or unix:// URL")
    return value.strip()


def connect(key: str, url: str) -> Redis:
    """A Redis client for ``url`` (nothing is sent until first use; fork-safe).

    Short timeouts and a single retry on a new connection when a kept one was closed (across a
    Redis restart): a stuck Redis costs a request two seconds, then a 503, never a hung worker.
    """
    try:
        return Redis(url, timeout=TIMEOUT)
    except ValueError as exc:
        raise ConfigError(f"{key}: not a usable Redis URL ({exc})") from None


def key(*parts: str) -> str:
    """A Redis key ``hk:<kind>:<digest>``; the digest of every part keeps keys short, fixed in
    shape and free of whatever a client sent (``parts[0]`` is the kind, e.g. ``sso``)."""
    digest = hashlib.sha256("\x00".join(parts[1:]).encode()).hexdigest()[:40]
    return f"hk:{parts[0]}:{digest}"


def use_once(client: Redis, name: str, ttl: int) -> bool:
    """True the first time ``name`` is used within ``ttl`` seconds, False for a replay.

    Raises :class:`StoreUnavailable` if Redis does not answer (fail closed).
    """
    try:
        return bool(client.set(name, b"1", nx=True, ex=max(1, int(ttl))))
    except RedisError as exc:
        log.error("redis did not answer (%s: %s)", type(exc).__name__, exc)
        raise StoreUnavailable() from None
