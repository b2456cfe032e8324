"""Hub fixtures: a hub app on a fresh SQLite (or PostgreSQL schema), served over real HTTP.

``hub`` gives a :class:`Hub` with ``.url``, ``.app``, ``.state``, a movable ``.clock``,
``.add_site(name, base_url)`` (returns the site key and its secret, shown once), and
``.signed(method, path, site_key, secret, json=...)`` which sends a correctly signed request.
"""

from __future__ import annotations

import json as json_module
import os
import threading
import typing as t
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet
from werkzeug.serving import make_server

from agent import signing
from hub import create_app
from hub.crypto import parse_site_secret
from hub.state import HubState
from tests.conftest import SERVER_POLL
from tests.conftest import Clock
from tests.conftest import free_port
from tests.conftest import schema_migrated


class Hub:
    def __init__(self, app: t.Any, url: str, clock: Clock) -> None:
        self.app = app
        self.url = url
        self.clock = clock
        self.http = requests.Session()

    @property
    def state(self) -> HubState:
        return t.cast(HubState, self.app.extensions["headlesskey_hub"])

    def add_site(self, name: str, base_url: str, **fields: t.Any) -> tuple[str, str]:
        from hub.services import sites

        with self.app.app_context(), self.state.session_factory() as db:
            onboarded = sites.add_site(db, self.state, "test", name=name, base_url=base_url,
                                       **fields)
            db.commit()
            return onboarded.site.site_key, onboarded.secret

    def signed(
        self,
        method: str,
        path: str,
        site_key: str,
        secret: str,
        *,
        json: t.Any = None,
        body: bytes | None = None,
        query: str = "",
        now: float | None = None,
        nonce: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        if body is None:
            body = json_module.dumps(json).encode() if json is not None else b""
        signed_headers = signing.sign_request(
            parse_site_secret(secret), site_key, method, path, query, body,
            now=self.clock().timestamp() if now is None else now, nonce=nonce,
        )
        if body:
            signed_headers["Content-Type"] = "application/json"
        signed_headers.update(headers or {})
        url = self.url + path + (f"?{query}" if query else "")
        return self.http.request(method, url, data=body, headers=signed_headers, timeout=30)

    def scalar(self, sql: str, **params: t.Any) -> t.Any:
        from sqlalchemy import text

        with self.state.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()


@pytest.fixture
def make_hub(tmp_path: Path) -> t.Iterator[t.Callable[..., Hub]]:
    servers: list[t.Any] = []

    def factory(**config: t.Any) -> Hub:
        index = len(servers)
        instance = tmp_path / f"hub{index}"
        instance.mkdir()
        db_url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
        if db_url:
            from tests.conftest import fresh_schema

            db_url = fresh_schema(db_url, 100 + index)
        else:
            db_url = f"sqlite:///{instance / 'hub.db'}"
        port = free_port()
        app = create_app(
            {
                "TESTING": True,
                "HEADLESSKEY_HUB_URL": f"http://127.0.0.1:{port}",
                "HEADLESSKEY_HUB_MASTER_KEY": Fernet.generate_key().decode(),
                "HEADLESSKEY_HUB_DATABASE_URL": db_url,
                "HEADLESSKEY_HUB_AUTO_MIGRATE": True,
                "HEADLESSKEY_HUB_SECURE_COOKIES": False,
                **config,
            },
            instance_path=str(instance),
        )
        clock = Clock()
        app.extensions["headlesskey_hub"].clock = clock
        schema_migrated(str(app.config.get("HEADLESSKEY_HUB_DATABASE_URL", db_url)))
        server = make_server("127.0.0.1", port, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever,
                                  kwargs={"poll_interval": SERVER_POLL}, daemon=True)
        thread.start()
        servers.append((server, thread, app))
        return Hub(app, f"http://127.0.0.1:{port}", clock)

    yield factory
    for server, thread, app in servers:
        server.shutdown()
        thread.join(5)
        app.extensions["headlesskey_hub"].engine.dispose()


@pytest.fixture
def hub(make_hub: t.Callable[..., Hub]) -> Hub:
    return make_hub()
