"""Shared fixtures: key pairs, a real SMTP server, the agent served over real HTTP.

Every agent test talks HTTP to a werkzeug server on a free loopback port (so requests, headers
and status codes are the real thing) while the test can still read the database and move the
agent's clock.

Environment:
- ``HEADLESSKEY_TEST_DATABASE_URL``: run the agent tests on that PostgreSQL database instead
  of a fresh SQLite file per site; each site of a test gets a fresh schema, migrated anew.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import random
import socket
import threading
import time
import typing as t
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest
import requests
from aiosmtpd.controller import Controller
from flask import Flask
from sqlalchemy import make_url
from sqlalchemy import text
from werkzeug.serving import make_server

from agent import HeadlessKey
from agent.extension import State
from agent.services.keys import generate_private_key_pem

ALGORITHMS = ("HS256", "RS256", "ES256")
PASSWORD = "correct horse battery staple"
# How often a test's in-process server checks whether it is asked to stop: each test stops its
# own, and shutdown() waits for the next check.
SERVER_POLL = 0.01

# argon2id at its cheapest: tests check behaviour, not cost.
FAST_HASH = {
    "HEADLESSKEY_ARGON2_TIME_COST": 1,
    "HEADLESSKEY_ARGON2_MEMORY_COST": 8,
    "HEADLESSKEY_ARGON2_PARALLELISM": 1,
}


# The longest files first, so pytest-xdist's workers (``./dev test`` hands out whole files in
# this order: --dist loadfile --no-loadscope-reorder) end on the short in-process files of
# tests/agent and tests/hub and finish together, not one waiting on a long file handed out last.
# The longest start real processes (federations, clusters, CLI commands): about a minute each,
# the rotation under traffic first; then the rest of the folders that start processes, and
# mypy's run.
LONG_FIRST = (
    "tests/integration/test_rotation.py",
    "tests/integration/test_sso.py",
    "tests/scale/",
    "tests/agent/test_cli.py",
    "tests/hub/test_cli.py",
    "tests/security/test_keys.py",
    "tests/integration/",
    "tests/security/",
    "tests/test_typing.py",
)


def _rank(item: pytest.Item) -> int:
    for rank, prefix in enumerate(LONG_FIRST):
        if item.nodeid.startswith(prefix):
            return rank
    return len(LONG_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: a file's tests stay together, in their order


def process_env(**extra: str) -> dict[str, str]:
    """The environment for our commands run as processes: none of this run's HEADLESSKEY_*
    or DATABASE_URL / REDIS_URL, cheap argon2, unbuffered output, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HEADLESSKEY_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(HEADLESSKEY_ARGON2_TIME_COST="1", HEADLESSKEY_ARGON2_MEMORY_COST="8",
               HEADLESSKEY_ARGON2_PARALLELISM="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


_PORTS_LOCK = threading.Lock()
_next_port: int | None = None


def _port_slice() -> tuple[int, int]:
    """This test process's ports: 10000-29999, a fifth each for up to four pytest-xdist workers
    (and the first for a plain run). All below the kernel's ephemeral range (32768 and up), so an
    outgoing connection never takes a port between our choosing it and a server binding it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % 4 if worker.isdigit() else 0
    low = 10000 + index * 5000
    return low, low + 5000


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(count: int = 1) -> int:
    """A loopback port nothing listens on, and the ``count - 1`` after it; never one handed out
    before by this process."""
    global _next_port
    low, high = _port_slice()
    with _PORTS_LOCK:
        if _next_port is None:
            _next_port = low + random.randrange(0, high - low - 100)  # noqa: S311 - a port number
        for _ in range(high - low):
            base = _next_port
            if base + count > high:
                base = low
            _next_port = base + count
            if all(_bindable(port) for port in range(base, base + count)):
                return base
    raise RuntimeError(f"no {count} free ports in {low}-{high}")


@pytest.fixture(scope="session")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM private keys made once per run (never committed)."""
    folder = tmp_path_factory.mktemp("keys")
    files = {}
    for alg in ("RS256", "ES256"):
        path = folder / f"{alg}.pem"
        path.write_bytes(generate_private_key_pem(alg))
        files[alg] = path
    return files


def lifetime(seconds: int) -> range:
    """The ``expires_in`` a token of ``seconds`` may show when just issued: the answer counts
    from when it is sent, a second or more later on a loaded machine."""
    return range(seconds - 5, seconds + 1)


class Clock:
    """The agent's clock, movable by tests (real time plus an offset)."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=seconds)


class Mailbox:
    """Messages received by the loopback SMTP server."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()

    async def handle_DATA(self, server: t.Any, session: t.Any, envelope: t.Any) -> str:  # noqa: N802
        with self._cond:
            self.messages.append(message_from_bytes(envelope.content))
            self._cond.notify_all()
        return "250 OK"

    def wait_for(self, to: str, count: int = 1, timeout: float = 10) -> list[Message]:
        """Wait until ``count`` messages to ``to`` have arrived; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if m["To"] == to]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} mail(s) to {to}, got {len(found)}")
                self._cond.wait(remaining)

    def to(self, address: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m["To"] == address]


@contextlib.contextmanager
def smtp_server() -> t.Iterator[Mailbox]:
    """A real SMTP server (aiosmtpd) on a free loopback port; ``.port`` is where."""
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    box.port = controller.port  # type: ignore[attr-defined]
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture
def smtp() -> t.Iterator[Mailbox]:
    with smtp_server() as box:
        yield box


class Api:
    """HTTP client for one served agent: ``api.post("/token", json=...)`` under the prefix."""

    def __init__(self, base: str, prefix: str) -> None:
        self.base = base
        self.prefix = prefix
        self.http = requests.Session()

    def url(self, path: str) -> str:
        return self.base + (path if path.startswith("/.well-known") else self.prefix + path)

    def request(self, method: str, path: str, *, token: str | None = None,
                **kw: t.Any) -> requests.Response:
        headers = dict(kw.pop("headers", None) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kw.setdefault("timeout", 30)
        return self.http.request(method, self.url(path), headers=headers, **kw)

    def get(self, path: str, **kw: t.Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: t.Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: t.Any) -> requests.Response:
        return self.request("DELETE", path, **kw)

    def login(self, login: str = "alice", password: str = PASSWORD,
              **kw: t.Any) -> dict[str, t.Any]:
        response = self.post("/token", json={"username": login, "password": password}, **kw)
        assert response.status_code == 200, response.text
        return t.cast(dict[str, t.Any], response.json())


class Site:
    """One agent under test: its Flask app, state, clock, HTTP client and mailbox."""

    def __init__(self, app: Flask, api: Api, clock: Clock, mailbox: Mailbox | None) -> None:
        self.app = app
        self.api = api
        self.clock = clock
        self.mailbox = mailbox

    @property
    def state(self) -> State:
        return t.cast(State, self.app.extensions["headlesskey"])

    def db(self) -> t.Any:
        return self.state.session_factory()

    def scalar(self, sql: str, **params: t.Any) -> t.Any:
        with self.state.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def create_user(
        self,
        username: str = "alice",
        email: str | None = None,
        password: str = PASSWORD,
        roles: list[str] | None = None,
    ) -> int:
        from agent.services import accounts

        with self.db() as db:
            user = accounts.create_user(
                db,
                self.state,
                username=username,
                email=email or f"{username}@example.com",
                password=password,
                roles=roles,
            )
            db.commit()
            return user.id


_SCHEMAS: set[str] = set()  # made by this test process; dropped when it ends
# Schemas whose app has migrated them (:func:`schema_migrated`), each with its catalog's
# fingerprint then. When a later test asks for the same schema and its catalog is unchanged,
# :func:`fresh_schema` empties its tables instead of dropping it: the app then finds its schema
# at head, as a migration would leave it, without running the migrations again (about 0.2 s a
# site on PostgreSQL, most of the setup of an in-process test).
_MIGRATED: dict[str, str] = {}
_MADE: dict[str, tuple[str, str]] = {}  # URL fresh_schema returned -> (database URL, schema)

# (Names are rendered without the schema, which a connection whose search_path holds it omits.)
_FINGERPRINT = """
SELECT md5(string_agg(part, ' ' ORDER BY part)) FROM (SELECT replace(part, %(schema)s || '.', '')
FROM (
  SELECT c.relname || '.' || a.attname || ' ' || c.relkind::text || ' '
         || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull::text || ' '
         || coalesce(pg_get_expr(d.adbin, d.adrelid), '') AS part
    FROM pg_class c
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
   WHERE c.relnamespace = to_regnamespace(%(schema)s)
  UNION ALL
  SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
   WHERE c.relnamespace = to_regnamespace(%(schema)s)
  UNION ALL
  SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace = to_regnamespace(%(schema)s)
) AS parts) AS parts (part)"""


@functools.cache
def _keeper(url: str) -> t.Any:
    """The engine of this process's schema bookkeeping on the database of ``url`` (kept)."""
    from agent.db import make_engine

    return make_engine(url)


def _fingerprint(conn: t.Any, schema: str) -> str | None:
    """Tables, columns, defaults, indexes and constraints of ``schema``, hashed (None if the
    schema does not exist or is empty)."""
    return t.cast(str | None, conn.exec_driver_sql(_FINGERPRINT, {"schema": schema}).scalar())


def fresh_schema(url: str, index: int) -> str:
    """A PostgreSQL schema for site ``index`` holding no row; returns a URL whose search_path is
    it. Empty (no table), unless the same schema served an earlier test of this process whose
    app migrated it and left its tables as the migrations made them: then those tables, emptied
    (their sequences restarted), and the migrations' version, as a fresh migration leaves them.

    Named after this process, so test runs sharing the database never touch each other's.
    """
    schema = f"hk_test_{os.getpid()}_site{index}"
    _SCHEMAS.add(schema)
    with _keeper(url).begin() as conn:
        known = _MIGRATED.pop(schema, None)
        if known is not None and _fingerprint(conn, schema) == known:
            tables = [row[0] for row in conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = %(schema)s",
                {"schema": schema}) if not row[0].endswith("alembic_version")]
            if tables:
                names = ", ".join(f'{schema}."{table}"' for table in tables)
                conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY")
            _MIGRATED[schema] = known
        else:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in url else "?"
    made = f"{url}{separator}options=-csearch_path%3D{schema}"
    _MADE[made] = (url, schema)
    return made


def schema_migrated(url: str) -> None:
    """Note that the app of ``url`` has just started (and migrated its schema): if ``url`` is a
    :func:`fresh_schema` one, the next test asking for that schema may reuse it."""
    made = _MADE.get(url)
    if made is None or made[1] in _MIGRATED:
        return
    base, schema = made
    with _keeper(base).connect() as conn:
        fingerprint = _fingerprint(conn, schema)
    if fingerprint is not None:
        _MIGRATED[schema] = fingerprint


@pytest.fixture(scope="session", autouse=True)
def _drop_test_schemas() -> t.Iterator[None]:
    yield
    url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
    if not url or not _SCHEMAS:
        return
    with _keeper(url).begin() as conn:
        for schema in sorted(_SCHEMAS):
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    _keeper(url).dispose()


class TcpProxy:
    """A loopback TCP relay in front of the database: ``cut()`` drops every open connection
    (as a server restart or a firewall does), ``stop()`` refuses new ones, ``start()`` serves
    again on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.live: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.live += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            live, self.live = self.live, []
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            self.listener.close()
            self.listener = None
        self.cut()


@contextlib.contextmanager
def answering(
    reply: bytes | t.Callable[[socket.socket, threading.Event], None],
) -> t.Iterator[str]:
    """A TCP server on loopback that answers each connection, one at a time: with ``reply``
    after reading what it sent (anything: no HTTP, a bad status line, a cut-short body), or by
    calling ``reply(conn, stop)``, ``stop`` being set once the server is closing. Yields its
    ``http://`` base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(SERVER_POLL)  # how soon it sees that it is asked to stop
    stop = threading.Event()

    def answer(conn: socket.socket, _stop: threading.Event) -> None:
        conn.recv(65536)
        conn.sendall(t.cast(bytes, reply))

    handle = reply if callable(reply) else answer

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                handle(conn, stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture
def pg_proxy() -> t.Iterator[tuple[TcpProxy, str]]:
    """The test PostgreSQL behind a :class:`TcpProxy`, and its URL through the proxy."""
    url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
    if not url:
        pytest.skip("HEADLESSKEY_TEST_DATABASE_URL is not set (a PostgreSQL to cut off)")
    from agent.db import make_engine

    engine = make_engine(url)
    parts = make_url(engine.url)
    engine.dispose()
    proxy = TcpProxy((parts.host or "127.0.0.1", parts.port or 5432))
    proxy.start()
    proxied = parts.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    yield proxy, proxied
    proxy.stop()


@pytest.fixture
def make_site(
    tmp_path: Path, key_files: dict[str, Path]
) -> t.Iterator[t.Callable[..., Site]]:
    """Factory: ``make_site("RS256", HEADLESSKEY_REGISTRATION="closed", mailbox=smtp)``."""
    servers: list[t.Any] = []

    def factory(
        algorithm: str = "HS256", mailbox: Mailbox | None = None, **settings: t.Any
    ) -> Site:
        index = len(servers)
        db_url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
        if db_url:
            db_url = fresh_schema(db_url, index)
        else:
            db_url = f"sqlite:///{tmp_path / f'site{index}.db'}"
        port = free_port()
        app = Flask(f"site{index}", instance_path=str(tmp_path / f"instance{index}"))
        app.config.update(FAST_HASH)
        app.config.update(
            {
                "HEADLESSKEY_SECRET_KEY": f"test-secret-{index}-" + "x" * 40,
                "HEADLESSKEY_ALGORITHM": algorithm,
                "HEADLESSKEY_SITE_URL": f"http://127.0.0.1:{port}",
                "HEADLESSKEY_DATABASE_URL": db_url,
                "HEADLESSKEY_MAIL_BACKEND": "null",
            }
        )
        if algorithm != "HS256":
            app.config["HEADLESSKEY_PRIVATE_KEY_FILE"] = str(key_files[algorithm])
        if mailbox is not None:
            app.config.update(
                {
                    "HEADLESSKEY_MAIL_BACKEND": "smtp",
                    "HEADLESSKEY_MAIL_HOST": "127.0.0.1",
                    "HEADLESSKEY_MAIL_PORT": mailbox.port,  # type: ignore[attr-defined]
                    "HEADLESSKEY_MAIL_FROM": "auth@site.example",
                    "HEADLESSKEY_RESET_URL": "https://app.example/reset",
                }
            )
        app.config.update(settings)
        clock = Clock()
        HeadlessKey(app, clock=clock)
        schema_migrated(app.config["HEADLESSKEY_DATABASE_URL"])
        server = make_server("127.0.0.1", port, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever,
                                  kwargs={"poll_interval": SERVER_POLL}, daemon=True)
        thread.start()
        servers.append((server, thread, app))
        prefix = app.extensions["headlesskey"].settings.prefix
        return Site(app, Api(f"http://127.0.0.1:{port}", prefix), clock, mailbox)

    yield factory
    for server, thread, app in servers:
        server.shutdown()
        thread.join(5)
        state = app.extensions["headlesskey"]
        state.background.shutdown()  # its tasks may still queue mail
        state.mailer.shutdown()
        state.engine.dispose()


@pytest.fixture(params=ALGORITHMS)
def algorithm(request: pytest.FixtureRequest) -> str:
    return t.cast(str, request.param)


@pytest.fixture
def site(make_site: t.Callable[..., Site], algorithm: str) -> Site:
    """An agent with the user ``alice``, once per algorithm."""
    s = make_site(algorithm)
    s.create_user("alice")
    return s
