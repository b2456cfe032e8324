"""Per-app state of the hub, built once by ``create_app``."""

from __future__ import annotations

import datetime as dt
import typing as t
from dataclasses import dataclass

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

    def setting(self, key: str) -> t.Any:
        """A config value by its short name (``SECRET_GRACE`` for
        ``HEADLESSKEY_HUB_SECRET_GRACE``)."""
        return self.config["HEADLESSKEY_HUB_" + key]


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
