"""A site served by two instances on one PostgreSQL database, each with two gunicorn workers.

Runs when ``HEADLESSKEY_TEST_DATABASE_URL`` names a PostgreSQL database (skipped otherwise);
with ``HEADLESSKEY_TEST_REDIS_URL`` too, every test runs a second time with the site's replay
caches in that Redis.

The cluster, made with the real commands on free loopback ports (one per backend, for the
module): a hub (``headlesskey-hub init`` / ``serve``), site A (``headlesskey-agent init`` /
``join`` / ``serve``), each on a PostgreSQL schema of its own as in tests/integration, and site B
on a fresh PostgreSQL schema: ``init`` and ``join``
once, then its instance folder copied, as to a second host. Instance B1 is
``headlesskey-agent serve --workers 2``; instance B2 is plain
``gunicorn -w 2 'agent.standalone:create_app()'`` with ``HEADLESSKEY_INSTANCE`` set. No jobs
process runs unless a test starts one. Tests read B's database over SQL.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import typing as t
import uuid
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy import text

from agent.db import make_engine
from tests.conftest import free_port
from tests.integration.test_sso import PREFIX
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Hub
from tests.integration.test_sso import Service
from tests.integration.test_sso import schema_url

MAX_FAILURES = 5
MAX_SESSIONS = 3
B_SETTINGS = {
    "HEADLESSKEY_LOCKOUT_MAX_FAILURES": str(MAX_FAILURES),
    # Every request comes from 127.0.0.1: only the per-account counter may lock.
    "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "10000",
    "HEADLESSKEY_MAX_SESSIONS": str(MAX_SESSIONS),
    "HEADLESSKEY_SESSION_LIMIT_POLICY": "evict_oldest",
    "HEADLESSKEY_DIRECTORY_REFRESH": "60",
}


def database_url() -> str:
    url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
    if not url:
        pytest.skip("HEADLESSKEY_TEST_DATABASE_URL is not set: the multi-instance tests need "
                    "PostgreSQL (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    return url


@dataclass
class Instance:
    """One instance of site B: its gunicorn (two workers) on its own port."""

    name: str
    base: str
    service: Service
    http: requests.Session = field(default_factory=requests.Session)

    def request(self, method: str, path: str, *, token: str | None = None,
                **kw: t.Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http.request(method, self.base + PREFIX + path, headers=headers,
                                 timeout=60, **kw)

    def post(self, path: str, **kw: t.Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def get(self, path: str, **kw: t.Any) -> requests.Response:
        return self.request("GET", path, **kw)


@dataclass
class Cluster:
    root: Path
    hub: Hub
    a: Agent
    b: Agent  # site B's settings and first instance folder (B1)
    b2_instance: Path
    b1: Instance
    b2: Instance
    engine: Engine  # site B's database
    env: dict[str, str]  # site B's environment (database, Redis, settings)
    redis_url: str | None

    @property
    def instances(self) -> tuple[Instance, Instance]:
        return self.b1, self.b2

    def scalar(self, sql: str, **params: t.Any) -> t.Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: t.Any) -> list[t.Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))


@pytest.fixture(scope="module", params=["postgresql", "postgresql+redis"])
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Cluster]:
    base_url = database_url()
    redis_url = None
    if request.param.endswith("+redis"):
        redis_url = os.environ.get("HEADLESSKEY_TEST_REDIS_URL")
        if not redis_url:
            pytest.skip("HEADLESSKEY_TEST_REDIS_URL is not set: the Redis variant needs a Redis")
    # A schema of this run's own: other runs may share the database.
    schema = f"hk_scale_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    db_url = schema_url(base_url, schema)
    settings = dict(B_SETTINGS, HEADLESSKEY_DATABASE_URL=db_url)
    if redis_url:
        settings["HEADLESSKEY_REDIS_URL"] = redis_url
    root = tmp_path_factory.mktemp("cluster")
    hub = Hub(root)
    a = Agent("a", root, {"HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "10000"})
    b = Agent("b", root, settings)
    services: list[Service] = []
    engine = make_engine(db_url)
    try:
        hub.init()
        for agent in (a, b):
            added = hub.cli("sites", "add", "--name", f"Site {agent.name.upper()}", "--url",
                            agent.base, "--key", agent.site_key, "--json").stdout
            agent.secret = json.loads(added)["secret"]
        hub.start()
        assert hub.service is not None
        services.append(hub.service)
        a.init()
        b.init()  # migrates B's PostgreSQL schema
        hub.service.wait_ready()
        a.join(hub)
        b.join(hub)
        b2_instance = root / "b2"
        shutil.copytree(b.instance, b2_instance)  # the same site on a second host
        a.start()
        b.start()  # B1: headlesskey-agent serve --workers 2 --no-jobs
        assert a.service is not None and b.service is not None
        services += [a.service, b.service]
        port2 = free_port()
        b2_service = Service(
            [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port2}",
             "--access-logfile", "-", "agent.standalone:create_app()"],
            dict(b.env, HEADLESSKEY_INSTANCE=str(b2_instance)), root / "b2.log",
            f"http://127.0.0.1:{port2}/",
        )
        services.append(b2_service)
        for service in services:
            service.wait_ready()
        yield Cluster(root, hub, a, b, b2_instance,
                      Instance("B1", b.base, b.service), Instance("B2", f"http://127.0.0.1:{port2}",
                                                                  b2_service),
                      engine, b.env, redis_url)
    finally:
        for service in services:
            service.terminate()
        for service in services:
            service.stop()
        a.http.close()
        b.http.close()
        hub.store.drop()
        a.store.drop()
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.dispose()

