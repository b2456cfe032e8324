"""Federation single sign-on end to end, across real processes (DESIGN §4-§5).

A module-scoped federation: ``headlesskey-hub serve`` and three ``headlesskey-agent serve``
(sites A, B and C, two gunicorn workers each), made with the real commands (``hub init``,
``sites add --json``, ``agent init``, ``join``) on free loopback ports. Every test logs a user in
at A over HTTP, asks A for an assertion and posts it (or a forgery of it) to B's or C's
``/sso/exchange``; refusals are checked by status, JSON code and the ``sso.rejected`` row the
receiving site wrote to its activity log (read from its database: a SQLite file, or with
``HEADLESSKEY_TEST_DATABASE_URL`` a PostgreSQL schema; see :class:`Store`).

Every test uses usernames of its own. The agents of the shared federation get generous lockout
limits, since every request comes from 127.0.0.1; the lockout tests, the hub-down test and the
peer lockout test each build a small federation of their own.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import math
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import typing as t
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jwt
import psycopg
import pytest
import redis
import requests
from requests.adapters import HTTPAdapter

from agent.config import DEFAULTS
from agent.config import parse_hub_secret
from agent.federation import REFETCH_COOLDOWN
from agent.services.lockout import redis_name
from agent.signing import pairwise_key
from tests.conftest import PASSWORD
from tests.conftest import free_port
from tests.conftest import process_env

BIN = str(Path(sys.executable).parent)
AGENT = shutil.which("headlesskey-agent", path=BIN) or shutil.which("headlesskey-agent")
HUB = shutil.which("headlesskey-hub", path=BIN) or shutil.which("headlesskey-hub")
SESSION_LEASE = DEFAULTS["SESSION_LEASE_MS"][0] / 1000  # the agents' own, in seconds
PREFIX = "/wp-json/headlesskey/v1"
SSO_TYP = "hk-sso+jwt"
REFRESH = 2  # HEADLESSKEY_DIRECTORY_REFRESH of the shared federation, seconds
LEEWAY = 30  # the agents' default HEADLESSKEY_LEEWAY
SHARED_SETTINGS = {
    "HEADLESSKEY_DIRECTORY_REFRESH": str(REFRESH),
    # Every test talks from 127.0.0.1: no test may lock the others out.
    "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "1000",
    "HEADLESSKEY_LOCKOUT_MAX_FAILURES": "100",
}


def clean_env(**extra: str) -> dict[str, str]:
    """The processes' environment (see tests.conftest.process_env), with no mail unless set."""
    return process_env(**{"HEADLESSKEY_MAIL_BACKEND": "null", **extra})


def run(command: str | None, *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one command to completion; it must succeed."""
    assert command, "the headlesskey-agent / headlesskey-hub executables are not installed"
    result = subprocess.run(  # noqa: S603 - our own executables
        [command, *args], input=stdin, capture_output=True, text=True,
        env=env or clean_env(), timeout=60,
    )
    assert result.returncode == 0, (
        f"{Path(command).name} {' '.join(args)} exited {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}"
    )
    return result


class Service:
    """A ``serve`` process with its log file; :meth:`stop` terminates, waits, then kills."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, ready_url: str) -> None:
        self.ready_url = ready_url
        self.log = log.open("w+")
        self.proc = subprocess.Popen(  # noqa: S603 - our own executables
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.ready_url}: serve exited with "
                                     f"{self.proc.returncode}:\n{self.logs()}")
            try:
                if requests.get(self.ready_url, timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or its workers still starting
            time.sleep(0.1)
        raise AssertionError(f"{self.ready_url} did not answer within {timeout}s:\n{self.logs()}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # gunicorn's arbiter stops its workers on SIGTERM

    def stop(self) -> None:
        self.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if not self.log.closed:
            self.log.close()


# With HEADLESSKEY_TEST_DATABASE_URL set (a PostgreSQL database), every hub and site of these
# federations keeps its data in a fresh schema of that database instead of a SQLite file in its
# instance folder; with HEADLESSKEY_TEST_REDIS_URL too, the sites' replay caches and counters
# live in that Redis, as in production (docs/deploy.md).
PG_URL = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL") or None
REDIS_URL = os.environ.get("HEADLESSKEY_TEST_REDIS_URL") or None


def schema_url(url: str, schema: str) -> str:
    """``url`` with ``schema`` first on the search path of every connection."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


def _as_sqlite(value: t.Any) -> t.Any:
    """A PostgreSQL value as SQLite gives it back: times as naive UTC text (the columns hold naive
    UTC), booleans as 0/1, JSON as its text."""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value


class Store:
    """A hub's or site's database as a test reads and writes it, with SQLite's ``?`` parameters
    and SQLite's values, whichever the backend: the SQLite file at ``path``, or with
    :data:`PG_URL` a PostgreSQL schema of its own, made by :meth:`create` and dropped by
    :meth:`drop`."""

    def __init__(self, path: Path, postgresql: bool = True) -> None:
        self.path = path
        self.schema = f"hk_t_{uuid.uuid4().hex[:12]}" if PG_URL and postgresql else None
        self.url = schema_url(PG_URL, self.schema) if PG_URL and self.schema else None

    @property
    def sqlite(self) -> bool:
        return self.schema is None

    def create(self) -> None:
        if self.schema is not None:
            with self._admin() as conn:
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")

    def drop(self) -> None:
        if self.schema is not None:
            with self._admin() as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    def _admin(self) -> t.Any:
        return psycopg.connect(PG_URL, autocommit=True)

    def _pg(self) -> t.Any:
        # A connection per statement: the federations' processes need the server's slots.
        return psycopg.connect(PG_URL, autocommit=True,
                               options=f"-c search_path={self.schema} -c timezone=UTC")

    def rows(self, sql: str, *params: t.Any) -> list[tuple[t.Any, ...]]:
        if self.sqlite:
            with contextlib.closing(sqlite3.connect(self.path, timeout=15)) as conn:
                return conn.execute(sql, params).fetchall()
        with self._pg() as conn:
            cursor = conn.execute(sql.replace("%", "%%").replace("?", "%s"), params)
            return [tuple(_as_sqlite(v) for v in row) for row in cursor.fetchall()]

    def write(self, sql: str, *params: t.Any) -> int:
        """Run one statement that changes rows (committed); how many it changed. Returns one
        session lease after the commit, as an agent's own changes do: a change made by hand
        is not seen by a worker that read the row within its lease."""
        if self.sqlite:
            with contextlib.closing(sqlite3.connect(self.path, timeout=15)) as conn:
                changed = conn.execute(sql, params).rowcount
                conn.commit()
        else:
            with self._pg() as conn:
                changed = conn.execute(sql.replace("%", "%%").replace("?", "%s"),
                                       params).rowcount
        time.sleep(SESSION_LEASE)
        return int(changed)

    @contextlib.contextmanager
    def unusable(self) -> t.Iterator[None]:
        """The database unusable while the block runs, then put back as it was: the SQLite file
        (and its WAL) set aside with garbage in its place, or the schema renamed away."""
        if self.schema is not None:
            aside = self.schema + "_aside"
            with self._admin() as conn:
                conn.execute(f"ALTER SCHEMA {self.schema} RENAME TO {aside}")
            try:
                yield
            finally:
                with self._admin() as conn:
                    conn.execute(f"ALTER SCHEMA {aside} RENAME TO {self.schema}")
            return
        # Everything in the main file first, then the database and its WAL files set aside.
        assert self.rows("PRAGMA wal_checkpoint(TRUNCATE)")[0][0] == 0
        files = [self.path.with_name(self.path.name + suffix) for suffix in ("", "-wal", "-shm")]
        saved = {path: path.with_name(path.name + ".saved") for path in files if path.exists()}
        for path, moved in saved.items():
            shutil.move(path, moved)
        try:
            self.path.write_bytes(b"this is not a database " * 64)
            yield
        finally:
            for path in files:
                path.unlink(missing_ok=True)
            for path, moved in saved.items():
                shutil.move(moved, path)

    def dump(self) -> bytes:
        """Everything stored, as bytes to search: the SQLite files, or every row as text."""
        if self.sqlite:
            return b"".join(p.read_bytes() for p in self.path.parent.glob(self.path.name + "*"))
        tables = [name for (name,) in self.rows(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
            self.schema)]
        rows = [row for table in tables  # names from the catalogue, not from input
                for row in self.rows(f'SELECT t::text FROM "{table}" t')]  # noqa: S608
        return "\n".join(str(row) for row in rows).encode()


def db_time(seconds_ago: float) -> str:
    """A UTC time as the hubs and sites store it (naive, microseconds), for :meth:`Store.write`."""
    moment = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=seconds_ago)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


class Hub:
    def __init__(self, root: Path) -> None:
        self.instance = root / "hub"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.service: Service | None = None
        self.store = Store(self.instance / "hub.db")
        self.env = clean_env()
        if self.store.url:
            # Its request nonces stay in the database, where tests count them (signed_calls);
            # tests/agent/test_replay_store.py runs the hub's Redis variant.
            self.env["HEADLESSKEY_HUB_DATABASE_URL"] = self.store.url

    def init(self) -> None:
        self.store.create()
        run(HUB, "init", "--instance", str(self.instance), "--url", self.url, env=self.env)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        command, sub, *rest = args
        return run(HUB, command, sub, "--instance", str(self.instance), *rest, stdin=stdin,
                   env=self.env)

    def start(self) -> None:
        assert HUB
        self.service = Service(
            [HUB, "serve", "--instance", str(self.instance), "--port", str(self.port),
             "--workers", "2", "--no-jobs"],
            self.env, self.root / "hub.log", f"{self.url}/.well-known/headlesskey-federation",
        )

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
        self.store.drop()

    def rows(self, sql: str, *params: t.Any) -> list[tuple[t.Any, ...]]:
        return self.store.rows(sql, *params)

    def signed_calls(self, site_key: str) -> int:
        """How many signed API calls the hub accepted from ``site_key`` (one nonce row each)."""
        return int(self.rows("SELECT count(*) FROM hub_nonces WHERE site_key = ?", site_key)[0][0])


@dataclass
class User:
    username: str
    email: str
    id: int
    token: str
    display_name: str


class Agent:
    def __init__(self, name: str, root: Path, settings: dict[str, str]) -> None:
        self.name = name
        self.site_key = f"site-{name}"
        self.instance = root / name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.issuer = self.base
        self.root = root
        self.env = clean_env(**settings)
        # A database URL in ``settings`` is the test's own (tests/scale); else PG_URL's schema.
        own = "HEADLESSKEY_DATABASE_URL" in settings
        self.store = Store(self.instance / "headlesskey.db", postgresql=not own)
        if self.store.url:
            self.env["HEADLESSKEY_DATABASE_URL"] = self.store.url
            if REDIS_URL:
                self.env.setdefault("HEADLESSKEY_REDIS_URL", REDIS_URL)
        self.secret = ""
        self.service: Service | None = None
        self.http = requests.Session()
        self.algorithm = "ES256"  # of its access tokens (`init`'s default)
        self.jobs = False  # serve with the jobs process (rotation, uplink, ...)

    @property
    def raw_secret(self) -> bytes:
        return parse_hub_secret("secret", self.secret)

    @property
    def federation_pem(self) -> bytes:
        return (self.instance / "federation-key.pem").read_bytes()

    def init(self) -> None:
        self.store.create()
        run(AGENT, "init", "--instance", str(self.instance), "--site-url", self.base,
            "--site-name", f"Site {self.name.upper()}", "--algorithm", self.algorithm,
            env=self.env)

    def join(self, hub: Hub) -> None:
        run(AGENT, "join", "--instance", str(self.instance), "--hub", hub.url,
            "--site-key", self.site_key, "--secret-stdin", stdin=self.secret + "\n", env=self.env)

    def start(self) -> None:
        assert AGENT
        self.service = Service(
            [AGENT, "serve", "--instance", str(self.instance), "--port", str(self.port),
             "--workers", "2", *([] if self.jobs else ["--no-jobs"])],
            self.env, self.root / f"{self.name}.log", f"{self.base}/",
        )

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
        self.http.close()
        self.store.drop()

    def request(self, method: str, path: str, *, token: str | None = None,
                session: requests.Session | None = None, **kw: t.Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return (session or self.http).request(method, self.base + PREFIX + path,
                                              headers=headers, timeout=30, **kw)

    def post(self, path: str, **kw: t.Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def get(self, path: str, **kw: t.Any) -> requests.Response:
        return self.request("GET", path, **kw)

    # --- the site's database ---------------------------------------------------------------

    def rows(self, sql: str, *params: t.Any) -> list[tuple[t.Any, ...]]:
        return self.store.rows(sql, *params)

    def write(self, sql: str, *params: t.Any) -> int:
        return self.store.write(sql, *params)

    def counter(self, key: str) -> tuple[int, bool] | None:
        """The brute-force counter ``key`` (``u:<id>``, ``validate:<address>``, ...) as the site
        keeps it, in its database or its Redis: (failures, locked or not), or None."""
        redis_url = self.env.get("HEADLESSKEY_REDIS_URL")
        if redis_url:
            secret = (self.instance / "secret.key").read_bytes().strip()
            client = redis.Redis.from_url(redis_url)
            try:
                found = client.hgetall(redis_name(secret, self.issuer, key))
            finally:
                client.close()
            return (int(found[b"failures"]), b"locked_until" in found) if found else None
        rows = self.rows("SELECT failures, locked_until IS NOT NULL FROM hk_throttle "
                         "WHERE key = ?", key)
        return (int(rows[0][0]), bool(rows[0][1])) if rows else None

    def last_audit_id(self) -> int:
        return int(self.rows("SELECT coalesce(max(id), 0) FROM hk_audit")[0][0])

    def audit(self, event: str, after: int) -> list[dict[str, t.Any]]:
        return [
            {"id": i, "outcome": outcome, "user_id": user_id,
             "details": json.loads(details or "{}")}
            for i, outcome, user_id, details in self.rows(
                "SELECT id, outcome, user_id, details FROM hk_audit WHERE event = ? AND id > ? "
                "ORDER BY id", event, after)
        ]

    def user_count(self) -> int:
        return int(self.rows("SELECT count(*) FROM hk_users")[0][0])

    def directory_times(self) -> tuple[dt.datetime, dt.datetime]:
        ((fetched, attempted),) = self.rows(
            "SELECT fetched_at, attempted_at FROM hk_federation_cache WHERE name = 'directory'")
        return dt.datetime.fromisoformat(fetched), dt.datetime.fromisoformat(attempted)

    def set_directory_times(self, fetched_ago: float, attempted_ago: float) -> None:
        changed = self.write(
            "UPDATE hk_federation_cache SET fetched_at = ?, attempted_at = ? "
            "WHERE name = 'directory'", db_time(fetched_ago), db_time(attempted_ago))
        assert changed == 1, "no cached directory to age"


class Federation:
    """A hub and agents, each a real process; :meth:`build` stops everything it started on error."""

    def __init__(self, root: Path, names: list[str], settings: dict[str, str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.hub = Hub(root)
        self.agents = {name: Agent(name, root, settings) for name in names}

    def __getitem__(self, name: str) -> Agent:
        return self.agents[name]

    @classmethod
    def build(cls, root: Path, names: list[str], *, jobs: bool = False,
              algorithms: t.Mapping[str, str] | None = None,
              hub_settings: t.Mapping[str, str] | None = None, **settings: str) -> Federation:
        """Start a hub and the agents ``names``, every agent with ``settings`` (the hub with
        ``hub_settings``), each access-token algorithm from ``algorithms`` (default ES256)."""
        fed = cls(root, names, settings)
        fed.hub.env.update(hub_settings or {})
        for name, agent in fed.agents.items():
            agent.jobs = jobs
            agent.algorithm = (algorithms or {}).get(name, agent.algorithm)
        try:
            fed._build()
        except BaseException:
            fed.stop()
            raise
        return fed

    def _build(self) -> None:
        hub, agents = self.hub, list(self.agents.values())

        def add(agent: Agent) -> None:
            added = json.loads(hub.cli(
                "sites", "add", "--name", f"Site {agent.name.upper()}", "--url", agent.base,
                "--key", agent.site_key, "--json").stdout)
            assert added["site_key"] == agent.site_key
            agent.secret = added["secret"]

        # Each step is a process of its own, mostly starting Python: what does not wait on
        # another runs at the same time (an agent's init needs nothing of the hub).
        with ThreadPoolExecutor(2 * len(agents)) as pool:
            inits = [pool.submit(agent.init) for agent in agents]
            hub.init()
            list(pool.map(add, agents))
            hub.start()
            for init in inits:
                init.result()
            assert hub.service is not None
            hub.service.wait_ready()
            list(pool.map(lambda agent: agent.join(hub), agents))
            for agent in agents:
                agent.start()
            list(pool.map(lambda agent: agent.service.wait_ready(), agents))

    def stop(self) -> None:
        services = [a.service for a in self.agents.values()] + [self.hub.service]
        for service in services:
            if service is not None:
                service.terminate()
        for agent in self.agents.values():
            agent.stop()
        self.hub.stop()


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Federation]:
    federation = Federation.build(tmp_path_factory.mktemp("federation"), ["a", "b", "c"],
                                  **SHARED_SETTINGS)
    try:
        yield federation
    finally:
        federation.stop()


# ---------------------------------------------------------------------------------------------
# helpers: users, assertions, forgeries


def new_user(agent: Agent, username: str, *, email: str | None = None,
             display_name: str | None = None) -> User:
    """Register ``username`` at ``agent`` over HTTP and log in."""
    email = email or f"{username}@example.com"
    r = agent.post("/register", json={"username": username, "email": email, "password": PASSWORD,
                                      "display_name": display_name or username})
    assert r.status_code == 201, r.text
    return login(agent, username)


def login(agent: Agent, username: str) -> User:
    r = agent.post("/token", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    return User(username, body["user"]["user_email"], body["user"]["ID"], body["token"],
                body["user"]["display_name"])


def issue(agent: Agent, token: str, target: str) -> dict[str, t.Any]:
    r = agent.post("/sso/issue", json={"target": target}, token=token)
    assert r.status_code == 200, r.text
    return t.cast(dict[str, t.Any], r.json())


def exchange(agent: Agent, assertion: dict[str, t.Any],
             session: requests.Session | None = None) -> requests.Response:
    return agent.post("/sso/exchange", session=session,
                      json={k: assertion[k] for k in ("site_key", "token", "signature")})


def assert_refused(agent: Agent, response: requests.Response, reason: str, mark: int) -> None:
    """A 401 ``invalid_assertion``, and exactly one new ``sso.rejected`` row giving ``reason``."""
    assert response.status_code == 401, f"{response.status_code} {response.text}"
    assert response.json()["code"] == "invalid_assertion", response.text
    reasons = [row["details"].get("reason") for row in agent.audit("sso.rejected", mark)]
    assert reasons == [reason], reasons


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mac(key: bytes, token: str) -> str:
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


def k(fed: Federation, src: str, dst: str) -> bytes:
    """K_src->dst, derived as the hub and the source site derive it."""
    return pairwise_key(fed[src].raw_secret, fed[src].site_key, fed[dst].site_key)


def unverified(token: str) -> tuple[dict[str, t.Any], dict[str, t.Any]]:
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


def fresh(claims: dict[str, t.Any], **changes: t.Any) -> dict[str, t.Any]:
    """``claims`` with a new jti and the current times (60 s of life), then ``changes``."""
    now = int(time.time())
    out = dict(claims, jti=secrets.token_urlsafe(16), iat=now, nbf=now, exp=now + 60)
    out.update(changes)
    return out


def es256(pem: bytes, claims: dict[str, t.Any], kid: str, typ: str = SSO_TYP) -> str:
    return jwt.encode(claims, pem, algorithm="ES256", headers={"kid": kid, "typ": typ})


def hand_made(header: dict[str, t.Any], claims: dict[str, t.Any], key: bytes | None) -> str:
    """A JWS built by hand (PyJWT refuses to HMAC with a PEM key, and to sign ``none``)."""
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(claims, separators=(",", ":")).encode()))
    if key is None:
        return signing_input + "."
    return signing_input + "." + b64url(
        hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def as_from(fed: Federation, src: str, dst: str, token: str) -> dict[str, str]:
    """The three fields of an assertion from ``src``, MACed with K_src->dst."""
    return {"site_key": fed[src].site_key, "token": token,
            "signature": mac(k(fed, src, dst), token)}


class SourceAddress(HTTPAdapter):
    """Connect from another loopback address (127.0.0.x), so the server sees another client IP."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: t.Any, **kwargs: t.Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(address: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", SourceAddress(address))
    return session


# ---------------------------------------------------------------------------------------------
# the handshake


def test_valid_exchange_logs_in_and_links_once(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    user = new_user(a, "valerie", display_name="Valerie Valid")
    a_mark, b_mark, b_users = a.last_audit_id(), b.last_audit_id(), b.user_count()

    assertion = issue(a, user.token, "site-b")
    assert assertion["site_key"] == "site-a"
    assert assertion["signature"] == mac(k(fed, "a", "b"), assertion["token"])
    header, claims = unverified(assertion["token"])
    assert header["typ"] == SSO_TYP and header["alg"] == "ES256"
    assert claims["iss"] == a.issuer and claims["aud"] == "site-b"
    assert claims["sub"] == str(user.id) and 0 < claims["exp"] - claims["iat"] <= 60
    assert user.token not in json.dumps(assertion)  # A's access token never leaves A

    r = exchange(b, assertion)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["refresh_token"]  # noqa: S105
    b_user = body["user"]
    assert b_user["user_email"] == user.email
    assert b_user["display_name"] == "Valerie Valid"
    assert {"email_verified", "status", "user_registered"} <= set(b_user)  # the full profile
    me = b.get("/me", token=body["token"])
    assert me.status_code == 200, me.text
    assert me.json()["ID"] == b_user["ID"]
    assert me.json()["user_email"] == user.email
    assert me.json()["display_name"] == "Valerie Valid"
    # B's token is B's own: A does not accept it.
    assert a.get("/me", token=body["token"]).status_code == 401

    links = b.rows("SELECT user_id FROM hk_identity_links WHERE issuer = ? AND subject = ?",
                   a.issuer, str(user.id))
    assert links == [(b_user["ID"],)]

    # A second assertion for the same user: the same account at B, no new user.
    again = exchange(b, issue(a, user.token, "site-b"))
    assert again.status_code == 200, again.text
    assert again.json()["user"]["ID"] == b_user["ID"]
    assert again.json()["token"] != body["token"]
    assert b.user_count() == b_users + 1
    assert b.rows("SELECT count(*) FROM hk_users WHERE email = ?", user.email) == [(1,)]

    issued = a.audit("sso.issued", a_mark)
    assert [(r["user_id"], r["details"].get("target")) for r in issued] == [(user.id, "site-b")] * 2
    exchanged = b.audit("sso.exchanged", b_mark)
    assert [(r["user_id"], r["details"].get("peer"), r["details"].get("subject"),
             r["details"].get("linked_by")) for r in exchanged] == [
        (b_user["ID"], "site-a", str(user.id), "new"),
        (b_user["ID"], "site-a", str(user.id), "link"),
    ]
    assert b.audit("sso.rejected", b_mark) == []


def test_replayed_assertion_is_refused(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    user = new_user(a, "rupert")
    assertion = issue(a, user.token, "site-b")
    first = exchange(b, assertion)
    assert first.status_code == 200, first.text
    mark = b.last_audit_id()
    assert_refused(b, exchange(b, assertion), "replayed", mark)


def test_concurrent_replays_exactly_one_wins(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    user = new_user(a, "connie")
    assertion = issue(a, user.token, "site-b")
    mark, users = b.last_audit_id(), b.user_count()
    n = 12
    barrier = threading.Barrier(n)

    def attempt(_: int) -> requests.Response:
        with requests.Session() as session:
            barrier.wait(10)
            return exchange(b, assertion, session=session)

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(attempt, range(n)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [401] * (n - 1), [(r.status_code, r.text[:80]) for r in responses]
    assert all(r.json()["code"] == "invalid_assertion" for r in responses if r.status_code == 401)
    reasons = [row["details"].get("reason") for row in b.audit("sso.rejected", mark)]
    assert reasons == ["replayed"] * (n - 1), reasons
    assert len(b.audit("sso.exchanged", mark)) == 1
    assert b.user_count() == users + 1


def test_assertion_for_another_audience_is_refused(fed: Federation) -> None:
    a, b, c = fed["a"], fed["b"], fed["c"]
    user = new_user(a, "audrey")
    for_c = issue(a, user.token, "site-c")

    # As issued: addressed to C (refused before B reads its directory), MACed with K_AC.
    mark = b.last_audit_id()
    assert_refused(b, exchange(b, for_c), "bad_token", mark)
    # MACed for B by someone holding K_AB: the signed `aud` still says C.
    mark = b.last_audit_id()
    assert_refused(b, exchange(b, as_from(fed, "a", "b", for_c["token"])), "bad_token", mark)
    # Control: the assertion is good where it was addressed.
    r = exchange(c, for_c)
    assert r.status_code == 200, r.text


def test_expired_assertion_is_refused(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    user = new_user(a, "edgar")
    header, claims = unverified(issue(a, user.token, "site-b")["token"])
    past = int(time.time()) - LEEWAY - 120  # expired well beyond the leeway
    expired = es256(a.federation_pem, fresh(claims, iat=past - 60, nbf=past - 60, exp=past),
                    header["kid"])
    mark = b.last_audit_id()
    assert_refused(b, exchange(b, as_from(fed, "a", "b", expired)), "bad_token", mark)
    # Control: the same forgery with current times is accepted, so only the times were wrong.
    current = es256(a.federation_pem, fresh(claims), header["kid"])
    r = exchange(b, as_from(fed, "a", "b", current))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("changes", [
    {"exp": "9999999999"}, {"iat": "1"}, {"nbf": "1"}, {"exp": True}, {"iat": 1.5},
    {"nbf": True}, {"exp": [9999999999]}, {"exp": float("inf")}, {"iat": None},
    {"sub": "x" * 256}, {"jti": ""}, {"jti": 1},
])
def test_claims_of_the_wrong_type_or_too_long_are_refused(fed: Federation,
                                                          changes: dict[str, t.Any]) -> None:
    """PyJWT takes a string ``exp`` for a number (the arithmetic after it was a 500), and a
    subject longer than the identity keys was cut to fit: both are refused as bad tokens."""
    a, b = fed["a"], fed["b"]
    user = new_user(a, "typed-" + secrets.token_hex(4))
    header, claims = unverified(issue(a, user.token, "site-b")["token"])
    forged = es256(a.federation_pem, fresh(claims, **changes), header["kid"])
    mark = b.last_audit_id()
    assert_refused(b, exchange(b, as_from(fed, "a", "b", forged)), "bad_token", mark)


def test_tampered_hmac_is_refused(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    user = new_user(a, "hector")
    assertion = issue(a, user.token, "site-b")
    digit = assertion["signature"][-1]
    other = "0" if digit != "0" else "1"
    tampered = dict(assertion, signature=assertion["signature"][:-1] + other)
    mark = b.last_audit_id()
    assert_refused(b, exchange(b, tampered), "bad_signature", mark)
    # Control: the refused attempt did not spend the genuine assertion.
    r = exchange(b, assertion)
    assert r.status_code == 200, r.text


def test_a_peer_cannot_impersonate_another_peer(fed: Federation) -> None:
    """B holds K_AB and K_BC but not K_AC, and its key does not vouch for A's issuer."""
    a, b, c = fed["a"], fed["b"], fed["c"]
    victim = new_user(a, "victor")
    insider = new_user(b, "bianca")
    b_header, b_claims = unverified(issue(b, insider.token, "site-c")["token"])
    assert b_claims["iss"] == b.issuer
    forged = es256(b.federation_pem,
                   fresh(b_claims, iss=a.issuer, aud="site-c", sub=str(victim.id),
                         email=victim.email, name=victim.display_name),
                   b_header["kid"])
    k_bc = k(fed, "b", "c")
    users = c.user_count()

    mark = c.last_audit_id()
    as_a = {"site_key": "site-a", "token": forged, "signature": mac(k_bc, forged)}
    assert_refused(c, exchange(c, as_a), "bad_signature", mark)

    mark = c.last_audit_id()
    as_b = {"site_key": "site-b", "token": forged, "signature": mac(k_bc, forged)}
    assert_refused(c, exchange(c, as_b), "bad_token", mark)  # iss A from peer B
    assert c.user_count() == users
    assert c.rows("SELECT count(*) FROM hk_users WHERE email = ?", victim.email) == [(0,)]

    # Control: B vouching for its own user the same way is accepted.
    own = es256(b.federation_pem, fresh(b_claims, aud="site-c"), b_header["kid"])
    r = exchange(c, {"site_key": "site-b", "token": own, "signature": mac(k_bc, own)})
    assert r.status_code == 200, r.text
    assert r.json()["user"]["user_email"] == insider.email


def test_lifetime_over_60_seconds_is_refused(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    user = new_user(a, "lionel")
    header, claims = unverified(issue(a, user.token, "site-b")["token"])
    now = int(time.time())
    long_lived = es256(a.federation_pem, fresh(claims, exp=now + 120), header["kid"])
    mark = b.last_audit_id()
    assert_refused(b, exchange(b, as_from(fed, "a", "b", long_lived)), "bad_token", mark)
    # Control: 60 s exactly is allowed.
    sixty = es256(a.federation_pem, fresh(claims, exp=int(time.time()) + 60), header["kid"])
    r = exchange(b, as_from(fed, "a", "b", sixty))
    assert r.status_code == 200, r.text


def test_algorithm_other_than_the_keys_is_refused(fed: Federation) -> None:
    from cryptography.hazmat.primitives import serialization

    a, b = fed["a"], fed["b"]
    user = new_user(a, "alfred")
    header, claims = unverified(issue(a, user.token, "site-b")["token"])
    public_pem = serialization.load_pem_private_key(a.federation_pem, None).public_key() \
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    confused = hand_made({"alg": "HS256", "kid": header["kid"], "typ": SSO_TYP}, fresh(claims),
                         public_pem)
    unsigned = hand_made({"alg": "none", "kid": header["kid"], "typ": SSO_TYP}, fresh(claims), None)
    mark = b.last_audit_id()
    assert_refused(b, exchange(b, as_from(fed, "a", "b", confused)), "bad_alg", mark)
    mark = b.last_audit_id()
    assert_refused(b, exchange(b, as_from(fed, "a", "b", unsigned)), "bad_alg", mark)


def test_unknown_kid_is_refused_with_one_bounded_refetch(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    user = new_user(a, "kidman")
    header, claims = unverified(issue(a, user.token, "site-b")["token"])
    # B's copy of the directory is fresh, and the refetch cooldown has passed (in the database
    # for all of B's workers, and in each worker for the refetches earlier tests forced): an
    # unknown kid may make B refetch once, and no more than once, however many arrive.
    b.set_directory_times(fetched_ago=0, attempted_ago=3600)
    time.sleep(REFETCH_COOLDOWN.total_seconds())
    before = fed.hub.signed_calls("site-b")
    mark = b.last_audit_id()
    for i in range(4):
        token = es256(a.federation_pem, fresh(claims), f"no-such-kid-{i:04d}")
        r = exchange(b, as_from(fed, "a", "b", token))
        assert r.status_code == 401 and r.json()["code"] == "invalid_assertion", r.text
    reasons = [row["details"].get("reason") for row in b.audit("sso.rejected", mark)]
    assert reasons == ["unknown_kid"] * 4, reasons
    fetches = fed.hub.signed_calls("site-b") - before
    assert fetches == 1, f"B fetched its directory {fetches} times for 4 unknown kids"


def test_access_token_is_not_an_assertion(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    user = new_user(a, "tyrone")
    assert jwt.get_unverified_header(user.token)["typ"] == "at+jwt"
    mark = b.last_audit_id()
    # Even MACed correctly (as only A could), A's access token is not an SSO assertion.
    assert_refused(b, exchange(b, as_from(fed, "a", "b", user.token)), "bad_header", mark)


def test_linking_by_email_needs_a_verified_email(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    # B already has carol; A's carol has a verified email: the identities are linked.
    local = new_user(b, "carol-b", email="carol@example.com")
    remote = new_user(a, "carol-a", email="carol@example.com")
    assert a.write("UPDATE hk_users SET email_verified = TRUE WHERE id = ?", remote.id) == 1
    users, mark = b.user_count(), b.last_audit_id()
    assertion = issue(a, remote.token, "site-b")
    assert unverified(assertion["token"])[1]["email_verified"] is True
    r = exchange(b, assertion)
    assert r.status_code == 200, r.text
    assert r.json()["user"]["ID"] == local.id
    assert b.user_count() == users
    assert b.rows("SELECT user_id FROM hk_identity_links WHERE issuer = ? AND subject = ?",
                  a.issuer, str(remote.id)) == [(local.id,)]
    assert [row["details"].get("linked_by") for row in b.audit("sso.exchanged", mark)] == ["email"]

    # B has dave; A's dave has not verified the address: no link, no new account.
    new_user(b, "dave-b", email="dave@example.com")
    unverified_remote = new_user(a, "dave-a", email="dave@example.com")
    users, mark = b.user_count(), b.last_audit_id()
    assertion = issue(a, unverified_remote.token, "site-b")
    assert unverified(assertion["token"])[1]["email_verified"] is False
    assert_refused(b, exchange(b, assertion), "identity_conflict", mark)
    assert b.user_count() == users
    assert b.rows("SELECT count(*) FROM hk_identity_links WHERE issuer = ? AND subject = ?",
                  a.issuer, str(unverified_remote.id)) == [(0,)]


def test_suspended_site_is_refused_then_resumed(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, hub = fed["a"], fed["b"], fed.hub
    user = new_user(a, "susan")
    first = exchange(b, issue(a, user.token, "site-b"))
    assert first.status_code == 200, first.text
    # Start B's refresh interval now: age its copy so that its next call refetches it.
    b.set_directory_times(fetched_ago=3600, attempted_ago=3600)
    r = b.post("/sso/issue", json={"target": "site-c"}, token=first.json()["token"])
    assert r.status_code == 200, r.text
    age = dt.datetime.now(dt.UTC).replace(tzinfo=None) - b.directory_times()[0]
    assert age.total_seconds() < 5, age

    refused: requests.Response | None = None
    elapsed = resumed_after = float("nan")
    try:
        hub.cli("sites", "suspend", "site-a")
        suspended = time.monotonic()
        mark = b.last_audit_id()
        while time.monotonic() < suspended + 15:
            response = exchange(b, issue(a, user.token, "site-b"))  # A still issues (its cache)
            if response.status_code != 200:
                refused, elapsed = response, time.monotonic() - suspended
                break
            time.sleep(0.1)
        assert refused is not None, "B still accepted A's assertions 15 s after the suspension"
        assert_refused(b, refused, "unknown_peer", mark)
    finally:
        hub.cli("sites", "resume", "site-a")
        resumed = time.monotonic()
        while time.monotonic() < resumed + 15:
            response = exchange(b, issue(a, user.token, "site-b"))
            if response.status_code == 200:
                resumed_after = time.monotonic() - resumed
                break
            time.sleep(0.2)
        with capsys.disabled():
            print(f"\n[sso] suspension -> first refusal at B: {elapsed:.2f} s; "
                  f"resume -> first success: {resumed_after:.2f} s "
                  f"(HEADLESSKEY_DIRECTORY_REFRESH={REFRESH})")
    assert not math.isnan(resumed_after), "B still refused A's assertions 15 s after resuming A"
    assert elapsed <= REFRESH + 1.0, (
        f"B refused A only {elapsed:.2f} s after the suspension, more than the directory "
        f"refresh interval ({REFRESH} s) plus 1 s"
    )


# ---------------------------------------------------------------------------------------------
# federations of their own


def test_hub_down_serves_from_cache_then_503(tmp_path: Path) -> None:
    fed = Federation.build(tmp_path / "fed", ["a", "b"],
                           HEADLESSKEY_FEDERATION_STALE_WINDOW="60",
                           HEADLESSKEY_DIRECTORY_REFRESH="1",
                           HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES="1000",
                           HEADLESSKEY_LOCKOUT_MAX_FAILURES="100")
    try:
        a, b = fed["a"], fed["b"]
        user = new_user(a, "harriet")
        r = exchange(b, issue(a, user.token, "site-b"))
        assert r.status_code == 200, r.text

        fed.hub.stop()
        # Both copies are stale (older than the 1 s refresh) yet inside the 60 s window, and
        # due for a refetch: each site tries the hub, fails, and serves from its cache.
        a.set_directory_times(fetched_ago=30, attempted_ago=30)
        b.set_directory_times(fetched_ago=30, attempted_ago=30)
        assertion = issue(a, user.token, "site-b")
        r = exchange(b, assertion)
        assert r.status_code == 200, r.text
        assert r.json()["user"]["user_email"] == user.email
        for site in (a, b):
            fetched, attempted = site.directory_times()
            assert attempted - fetched > dt.timedelta(seconds=20), (site.name, fetched, attempted)

        # Past the staleness window: no single sign-on, and a clear 503.
        b.set_directory_times(fetched_ago=70, attempted_ago=70)
        late = issue(a, user.token, "site-b")
        r = exchange(b, late)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "federation_unavailable"

        # No cached directory at all while the hub is down: the same.
        assert b.write("DELETE FROM hk_federation_cache WHERE name = 'directory'") == 1
        r = exchange(b, late)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "federation_unavailable"
    finally:
        fed.stop()


def test_brute_force_on_exchange_locks_the_ip(tmp_path: Path) -> None:
    fed = Federation.build(tmp_path / "fed", ["a", "b"])  # the default lockout settings
    try:
        a, b = fed["a"], fed["b"]
        user = new_user(a, "bruno")
        assertion = issue(a, user.token, "site-b")
        mark = b.last_audit_id()
        for i in range(20):
            r = b.post("/sso/exchange", json={"site_key": f"bogus-{i}", "token": "x.y.z",
                                              "signature": "0" * 64})
            assert r.status_code == 401, (i, r.status_code, r.text)
            assert r.json()["code"] == "invalid_assertion"
        r = exchange(b, assertion)
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "too_many_attempts"
        assert int(r.headers["Retry-After"]) > 0
        rejected = b.audit("sso.rejected", mark)
        reasons = [row["details"].get("reason") for row in rejected]
        assert reasons == ["malformed"] * 20 + ["locked"], reasons  # junk: no directory read
        assert rejected[-1]["outcome"] == "blocked"
        # The lock is the IP's: the unspent assertion works from another address.
        with session_from("127.0.0.2") as other:
            r = exchange(b, assertion, session=other)
        assert r.status_code == 200, r.text
    finally:
        fed.stop()


def test_exchanges_over_the_session_limit_use_up_no_attempt(tmp_path: Path) -> None:
    """A genuine assertion refused by the device limit is no guess: however many, they leave
    the IP's counter free, and the next exchange after a logout gets in at once."""
    fed = Federation.build(tmp_path / "fed", ["a", "b"],
                           HEADLESSKEY_DIRECTORY_REFRESH=str(REFRESH),
                           HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES="3",
                           HEADLESSKEY_MAX_SESSIONS="1", HEADLESSKEY_SESSION_LIMIT_POLICY="reject")
    try:
        a, b = fed["a"], fed["b"]
        user = new_user(a, "sandra")
        first = exchange(b, issue(a, user.token, "site-b"))
        assert first.status_code == 200, first.text
        for _ in range(5):
            r = exchange(b, issue(a, user.token, "site-b"))
            assert r.status_code == 403, r.text
            assert r.json()["code"] == "session_limit_reached"
        assert b.post("/token/revoke", json={"token": first.json()["token"]}).status_code == 200
        started = time.monotonic()
        r = exchange(b, issue(a, user.token, "site-b"))
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 2  # not held back by reservations left pending
    finally:
        fed.stop()


def test_garbage_naming_a_peer_does_not_lock_out_its_users(tmp_path: Path) -> None:
    """Not a listed case: anyone can name a peer in garbage; that must not block its users."""
    fed = Federation.build(tmp_path / "fed", ["a", "b"])  # the default lockout settings
    try:
        a, b = fed["a"], fed["b"]
        user = new_user(a, "petra")
        assertion = issue(a, user.token, "site-b")
        with session_from("127.0.0.2") as attacker:
            for _ in range(6):
                r = b.post("/sso/exchange", session=attacker,
                           json={"site_key": "site-a", "token": "x.y.z", "signature": "0" * 64})
                assert r.status_code in (401, 429), r.text
        with session_from("127.0.0.3") as victim:
            r = exchange(b, assertion, session=victim)
        assert r.status_code == 200, (
            f"{r.status_code} {r.text}: 6 garbage exchanges naming site-a from 127.0.0.2 "
            "blocked a genuine one from 127.0.0.3"
        )
    finally:
        fed.stop()
