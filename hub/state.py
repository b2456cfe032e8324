"""Per-app state of the hub, built once by ``create_app``."""

from __future__ import annotations

import datetime as dt
import threading
import typing as t
from dataclasses import dataclass
from dataclasses import field

from flask import Flask
from flask import current_app
from flask import g
from flask import request
from sqlalchemy import Engine
from sqlalchemy.orm import Session as DBSession
from sqlalchemy.orm import sessionmaker

from agent.resp import Redis

from .crypto import Vault


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class HubState:
    config: t.Mapping[str, t.Any]
    engine: Engine
    session_factory: sessionmaker[DBSession]
    vault: Vault
    clock: t.Callable[[], dt.datetime] = utcnow
    redis: Redis | None = None  # request nonces, if HEADLESSKEY_HUB_REDIS_URL is set
    refusals: RefusalLog = field(default_factory=lambda: RefusalLog())

    def setting(self, key: str) -> t.Any:
        """A config value by its short name (``SECRET_GRACE`` for
        ``HEADLESSKEY_HUB_SECRET_GRACE``)."""
        return self.config["HEADLESSKEY_HUB_" + key]


class RefusalLog:
    """How many refused API requests of one address this process writes to the event log.

    The first :attr:`BURST` of a minute are each an event; the rest are counted, and the
    address's first event of a later minute says how many were left out (``suppressed``). A
    flood of unsigned requests then costs the database a few rows a minute, not one a request.
    """

    BURST = 30
    _KEEP = 10_000  # addresses remembered; past that the counts start again

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._minute = 0
        self._seen: dict[str, int] = {}
        self._left_out: dict[str, int] = {}

    def admit(self, ip: str, now: dt.datetime) -> int | None:
        """None to leave this refusal out of the log, else how many of ``ip`` were left out
        since its last event (0 for none)."""
        minute = int(now.timestamp()) // 60
        with self._lock:
            if minute != self._minute or len(self._seen) > self._KEEP:
                self._minute, self._seen = minute, {}
                if len(self._left_out) > self._KEEP:
                    self._left_out = {}
            count = self._seen[ip] = self._seen.get(ip, 0) + 1
            if count > self.BURST:
                self._left_out[ip] = self._left_out.get(ip, 0) + 1
                return None
            return self._left_out.pop(ip, 0)


def get_state(app: Flask | None = None) -> HubState:
    return t.cast(HubState, (app or current_app).extensions["headlesskey_hub"])


def get_db() -> DBSession:
    db = g.get("_hub_db")
    if db is None:
        db = g._hub_db = get_state().session_factory()
    return t.cast(DBSession, db)


def close_db(_exc: BaseException | None) -> None:
    db = g.pop("_hub_db", None)
    if db is not None:
        db.close()


def _forwarded(header: str) -> str | None:
    """The entry of ``header`` added by the outermost trusted proxy, or None (no trusted proxy,
    or fewer entries than proxies)."""
    hops = int(get_state().setting("TRUSTED_PROXIES"))
    if not hops:
        return None
    values = [v.strip() for v in request.headers.get(header, "").split(",")]
    values = [v for v in values if v]
    return values[-hops] if len(values) >= hops else None


def client_ip() -> str:
    """The client address: the socket's, or X-Forwarded-For as seen by the trusted proxies."""
    return (_forwarded("X-Forwarded-For") or request.remote_addr or "")[:64]


def request_is_https() -> bool:
    """Whether the client reached the hub over TLS: directly, or as the trusted proxies say."""
    return request.is_secure or (_forwarded("X-Forwarded-Proto") or "").lower() == "https"
