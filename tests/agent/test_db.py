"""The agent's database engine: pooled connections that never cross a fork or outlive their file."""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
from sqlalchemy import text

from agent.db import make_engine
from tests.conftest import PASSWORD
from tests.conftest import Site
from tests.conftest import TcpProxy
from tests.conftest import fresh_schema


def _value(engine: object) -> str:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return str(conn.execute(text("SELECT v FROM t")).scalar_one())


def _make_db(path: Path, value: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.execute("INSERT INTO t VALUES (?)", (value,))
    conn.close()


def test_sqlite_connections_are_pooled_and_follow_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    _make_db(path, "old")
    engine = make_engine(f"sqlite:///{path}")
    assert _value(engine) == "old"
    assert engine.pool.checkedin() == 1  # kept for the next transaction

    # A backup restored by putting a file in its place: the next transaction reads it, and
    # writes land in it, not in the file it replaced.
    _make_db(tmp_path / "restored.db", "restored")
    os.replace(tmp_path / "restored.db", path)
    assert _value(engine) == "restored"
    with engine.begin() as conn:
        conn.execute(text("UPDATE t SET v = 'written'"))
    engine.dispose()
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT v FROM t").fetchone() == ("written",)
    check.close()


def test_the_logins_read_leaves_pooled_connections_transactional(
    make_site: t.Callable[..., Site],
) -> None:
    """A login reads the account outside a transaction (autocommit on PostgreSQL); the pooled
    connection it used runs real transactions again afterwards: a rolled-back write is gone."""
    site = make_site("HS256")
    site.create_user("alice")
    for _ in range(3):
        site.api.login()
    engine = site.state.engine
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            assert conn.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
        conn.execute(text("UPDATE hk_users SET display_name = 'changed'"))
        conn.rollback()
    assert site.scalar("SELECT count(*) FROM hk_users WHERE display_name = 'changed'") == 0
    assert site.scalar("SELECT count(*) FROM hk_sessions") == 3


def _child_connection_is_its_own(engine: object, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    with engine.connect() as conn:  # type: ignore[attr-defined]
        conn.execute(text("SELECT 1"))
        out.put(conn.connection.info.get("pid") == os.getpid())


def test_a_forked_child_never_uses_its_parents_pooled_connection(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    _make_db(path, "x")
    engine = make_engine(f"sqlite:///{path}")
    assert _value(engine) == "x"
    assert engine.pool.checkedin() == 1  # the parent's connection, pooled across the fork
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_child_connection_is_its_own, args=(engine, out))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert out.get(timeout=5) is True
    assert _value(engine) == "x"  # the parent's connection still works
    engine.dispose()


def _schema_drift(engine: object, metadata: object, version_table: str) -> list[t.Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:  # type: ignore[attr-defined]
        context = MigrationContext.configure(conn, opts={"version_table": version_table})
        return [d for d in compare_metadata(context, metadata)  # type: ignore[arg-type]
                if not (d[0] == "remove_table" and d[1].name != version_table
                        and not d[1].name.startswith(("hk_", "hub_")))]


@pytest.mark.parametrize("app", ["agent", "hub"])
def test_migrations_build_exactly_the_models_schema(tmp_path: Path, app: str) -> None:
    """``db upgrade`` to head yields the tables, columns and indexes the models declare, so
    a change to a model without its migration (or the reverse) fails here."""
    if app == "agent":
        from agent import db as app_db
        from agent.models import Base
    else:
        from hub import db as app_db  # type: ignore[no-redef]
        from hub.models import Base  # type: ignore[no-redef,assignment]
    engine = make_engine(f"sqlite:///{tmp_path / 'schema.db'}")
    app_db.upgrade(engine)
    version_table = "hk_alembic_version" if app == "agent" else "hub_alembic_version"
    assert _schema_drift(engine, Base.metadata, version_table) == []
    engine.dispose()


@pytest.mark.parametrize("app", ["agent", "hub"])
def test_head_is_the_newest_migration(tmp_path: Path, app: str) -> None:
    """The HEAD that lets a current schema skip Alembic is Alembic's own head."""
    from alembic.script import ScriptDirectory

    from agent import db as agent_db
    from hub import db as hub_db

    app_db = agent_db if app == "agent" else hub_db
    config = agent_db.alembic_config(make_engine(f"sqlite:///{tmp_path / 'x.db'}"),
                                     app_db.MIGRATIONS)
    assert ScriptDirectory.from_config(config).get_current_head() == app_db.HEAD


def test_a_worker_on_a_current_schema_never_loads_alembic(tmp_path: Path) -> None:
    """The mounted extension migrates on start (HEADLESSKEY_AUTO_MIGRATE): a schema behind is
    upgraded, and a worker that finds it current does not import Alembic (about 11 MB)."""
    from agent import db as agent_db

    url = f"sqlite:///{tmp_path / 'site.db'}"
    engine = make_engine(url)
    agent_db.upgrade(engine, "0006")
    assert agent_db.stored_revision(engine) == "0006"
    program = (
        "import sys, flask\n"
        "from agent import HeadlessKey\n"
        f"app = flask.Flask('site', instance_path={str(tmp_path)!r})\n"
        f"app.config.update(HEADLESSKEY_DATABASE_URL={url!r})\n"
        "HeadlessKey(app)\n"
        "print('alembic' in sys.modules)\n"
    )

    def start_a_worker() -> str:
        done = subprocess.run(  # noqa: S603 - our own interpreter
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
            cwd=Path(__file__).parents[2])
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert start_a_worker() == "True"  # behind: migrated
    assert agent_db.stored_revision(engine) == agent_db.HEAD
    assert start_a_worker() == "False"  # current: Alembic never imported
    engine.dispose()


def _outage_answers(site: Site, access: str) -> None:
    """While the database cannot be reached: a clear 503 on every path, with nothing written."""
    for r in (site.api.post("/token", json={"username": "alice", "password": PASSWORD}),
              site.api.post("/token/validate", token=access),
              site.api.post("/register", json={"username": "bob", "email": "bob@example.com",
                                               "password": "another long passphrase"})):
        assert r.status_code == 503, r.text
        assert r.json() == {"code": "database_unavailable",
                            "message": "The database is unavailable. Try again shortly.",
                            "data": {"status": 503}}
        assert r.headers["Retry-After"] == "5"


def test_a_process_keeps_pool_size_connections_while_idle(
    make_site: t.Callable[..., Site],
) -> None:
    """HEADLESSKEY_DATABASE_POOL_SIZE bounds the connections a process keeps open once a burst
    is over (the jobs process keeps one); the burst itself is never refused."""
    url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
    if not url:
        pytest.skip("HEADLESSKEY_TEST_DATABASE_URL is not set (SQLite opens files, not a pool)")
    site = make_site("HS256", HEADLESSKEY_DATABASE_URL=fresh_schema(url, 91),
                     HEADLESSKEY_DATABASE_POOL_SIZE=2)
    engine = site.state.engine
    burst = [engine.connect() for _ in range(4)]
    for conn in burst:
        assert conn.execute(text("SELECT 1")).scalar() == 1
        conn.close()
    assert engine.pool.checkedin() == 2  # type: ignore[attr-defined]


def test_postgresql_connections_dropped_or_refused(
    make_site: t.Callable[..., Site], pg_proxy: tuple[TcpProxy, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connections the network drops are replaced without a failed request; while the server
    cannot be reached, requests get 503 ``database_unavailable`` and write nothing; once it is
    back, everything works again."""
    caplog.set_level(logging.DEBUG)
    proxy, url = pg_proxy
    site = make_site("HS256", HEADLESSKEY_DATABASE_URL=fresh_schema(url, 90))
    site.create_user("alice")
    access = site.api.login()["token"]
    assert site.api.post("/token/validate", token=access).status_code == 200

    proxy.cut()  # every pooled connection, and the token check's, is now dead
    assert site.api.post("/token/validate", token=access).status_code == 200
    access = site.api.login()["token"]

    proxy.stop()
    _outage_answers(site, access)

    proxy.start()
    assert site.api.post("/token/validate", token=access).status_code == 200
    site.api.login()
    assert site.scalar("SELECT count(*) FROM hk_audit WHERE event = 'login.succeeded'") == 3
    assert site.scalar("SELECT count(*) FROM hk_users") == 1  # bob's registration never landed
    assert site.scalar("SELECT count(*) FROM hk_throttle WHERE pending > 0") == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "database unavailable" in logged
    assert PASSWORD not in logged and access not in logged


def test_postgresql_a_request_pings_each_pooled_connection_once(
    make_site: t.Callable[..., Site], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request that checks a pooled connection out three times pings it on the first
    checkout only (the ping finds a dropped connection before the request's first statement).
    A login checks out none: its statements run on the kept connections, which need no ping
    (a statement that fails on a dropped one runs again on a fresh one). Outside a request
    (jobs, commands) every checkout pings."""
    url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
    if not url:
        pytest.skip("HEADLESSKEY_TEST_DATABASE_URL is not set (SQLite connections are files)")
    site = make_site("HS256", HEADLESSKEY_DATABASE_URL=fresh_schema(url, 92))
    engine = site.state.engine

    @site.app.get("/three-checkouts")
    def three_checkouts() -> dict[str, int]:
        for _ in range(3):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        return {"checkouts": 3}

    def checkouts() -> None:
        answer = site.api.http.get(site.api.base + "/three-checkouts", timeout=10)
        assert answer.json() == {"checkouts": 3}

    site.create_user("alice")
    site.api.login()
    checkouts()  # the pool now holds a connection made before the next requests
    dialect = engine.dialect
    pings: list[object] = []
    ping = dialect.do_ping

    def counted(dbapi_conn: object) -> bool:
        pings.append(dbapi_conn)
        return bool(ping(dbapi_conn))

    monkeypatch.setattr(dialect, "do_ping", counted)
    site.api.login()
    assert pings == []
    checkouts()
    assert len(pings) == 1
    checkouts()
    assert len(pings) == 2
    for _ in range(2):
        with site.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert len(pings) == 4


def test_sqlite_database_file_unusable(
    make_site: t.Callable[..., Site], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A database file that cannot be opened (here a folder in its place) is a 503, and the
    site recovers by itself once the file is back."""
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "outage.db"
    site = make_site("HS256", HEADLESSKEY_DATABASE_URL=f"sqlite:///{path}")
    site.create_user("alice")
    access = site.api.login()["token"]

    path.rename(tmp_path / "aside.db")
    path.mkdir()
    _outage_answers(site, access)

    path.rmdir()
    (tmp_path / "aside.db").rename(path)
    assert site.api.post("/token/validate", token=access).status_code == 200
    site.api.login()
    assert site.scalar("SELECT count(*) FROM hk_audit WHERE event = 'login.succeeded'") == 2
    assert site.scalar("SELECT count(*) FROM hk_users") == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert PASSWORD not in logged and access not in logged


def test_postgresql_session_check_after_the_server_forgot_its_statement(
    make_site: t.Callable[..., Site],
) -> None:
    """The token check's and the login's statements are prepared once per connection; a
    server that forgot them (``DEALLOCATE ALL``, as a connection pooler's reset does) costs no
    failed request, and revocation still holds."""
    url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
    if not url:
        pytest.skip("HEADLESSKEY_TEST_DATABASE_URL is not set (SQLite prepares nothing)")
    from agent.direct import async_commit_connections
    from agent.direct import connections

    site = make_site("HS256", HEADLESSKEY_DATABASE_URL=fresh_schema(url, 92))
    site.create_user("alice")
    access = site.api.login()["token"]
    assert site.api.post("/token/validate", token=access).status_code == 200
    engine = site.state.engine
    kept = [*connections(engine).idle, *async_commit_connections(engine).idle]
    assert len(kept) >= 2
    for conn in kept:
        conn.dbapi_connection.execute("DEALLOCATE ALL")
    assert site.api.post("/token/validate", token=access).status_code == 200
    assert site.api.post("/token/revoke", token=access).status_code == 200
    refused = site.api.post("/token/validate", token=access)
    assert refused.status_code == 401, refused.text
    for conn in [*connections(engine).idle, *async_commit_connections(engine).idle]:
        conn.dbapi_connection.execute("DEALLOCATE ALL")
    again = site.api.login()
    assert site.api.post("/token/validate", token=again["token"]).status_code == 200
    assert site.scalar("SELECT count(*) FROM hk_sessions WHERE revoked_at IS NULL") == 1
    assert site.scalar("SELECT count(*) FROM hk_throttle WHERE pending > 0") == 0


def test_postgresql_kept_connections_send_parameters_as_given(
    make_site: t.Callable[..., Site],
) -> None:
    """The kept connections send parameters as text: an array of texts arrives item for item
    (quotes, backslashes, commas, braces, NULL spelled out, the empty string), a timestamp to
    the microsecond, and a text holding NUL, which libpq would cut short, is refused before
    anything is sent."""
    url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
    if not url:
        pytest.skip("HEADLESSKEY_TEST_DATABASE_URL is not set (SQLite runs no statement here)")
    from sqlalchemy import ARRAY
    from sqlalchemy import Integer
    from sqlalchemy import String
    from sqlalchemy import bindparam
    from sqlalchemy import func
    from sqlalchemy import select

    from agent.direct import connections
    from agent.models import UTCDateTime

    site = make_site("HS256", HEADLESSKEY_DATABASE_URL=fresh_schema(url, 93))
    kept = connections(site.state.engine)
    items = ['a"b', "c\\d", "e,f", "{g}", "NULL", "", " h ", "ü✓", "\\"]
    stmt = select(func.array_to_json(bindparam("items", type_=ARRAY(String))).cast(String),
                  func.cardinality(bindparam("items", type_=ARRAY(String))).cast(Integer),
                  bindparam("at", type_=UTCDateTime()))
    at = dt.datetime(2026, 12, 6, 10, 20, 30, 123456, tzinfo=dt.UTC)
    [(as_json, count, back)] = kept.execute(stmt, {"items": items, "at": at})
    assert json.loads(as_json) == items and count == len(items)
    assert back == at
    with pytest.raises(ValueError, match="NUL"):
        kept.execute(stmt, {"items": ["a\x00b"], "at": at})
    [(as_json, _count, _at)] = kept.execute(stmt, {"items": ["ok"], "at": at})
    assert json.loads(as_json) == ["ok"]


def test_postgresql_only_the_reservations_commit_without_waiting_for_the_disk(
    make_site: t.Callable[..., Site],
) -> None:
    """A login's reservation (a write a server crash may lose: the attempt it counts ended
    with the crash) commits asynchronously; the session it writes, and everything else, waits
    until it is on disk, so an answered login outlives a crash of the server."""
    url = os.environ.get("HEADLESSKEY_TEST_DATABASE_URL")
    if not url:
        pytest.skip("HEADLESSKEY_TEST_DATABASE_URL is not set (SQLite commits in-process)")
    from agent.direct import async_commit_connections
    from agent.direct import connections

    site = make_site("HS256", HEADLESSKEY_DATABASE_URL=fresh_schema(url, 94))
    site.create_user("alice")
    site.api.login()
    engine = site.state.engine

    def setting(conn: t.Any) -> str:
        return str(conn.dbapi_connection.execute("SHOW synchronous_commit").fetchone()[0])

    assert connections(engine).run(setting) == "on"
    assert async_commit_connections(engine).run(setting) == "off"
    with engine.connect() as conn:  # the pool's, which every request's transaction takes
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    assert site.scalar("SELECT count(*) FROM hk_sessions") == 1
    assert site.scalar("SELECT count(*) FROM hk_throttle WHERE pending > 0") == 0


def test_kept_connections_write_all_or_nothing(make_site: t.Callable[..., Site]) -> None:
    """The kept connections' guarded write (a login's session, its refresh token, its audit
    row and the reservation's release) commits whole or not at all, on both backends: a row
    the database refuses undoes the rows before it, the connection is left outside any
    transaction, and the next write commits. Values come back as the ORM returns them."""
    from sqlalchemy import bindparam
    from sqlalchemy import select

    from agent.direct import connections
    from agent.direct import insert_if
    from agent.models import Throttle
    from agent.models import User

    site = make_site("HS256")
    user_id = site.create_user("alice")
    engine = site.state.engine
    kept = connections(engine)
    guard = select(User.id).where(User.id == bindparam("id"))
    at = dt.datetime(2026, 12, 6, 10, 20, 30, 123456, tzinfo=dt.UTC)

    def row(key: str) -> dict[str, t.Any]:
        return {"key": key, "window_start": at, "pending": 1}  # failures: the column default

    with pytest.raises(kept.errors):  # the same key twice: the second row is refused
        insert_if(kept, guard, {"id": user_id}, [(Throttle, [row("u:a"), row("u:a")])])
    assert site.scalar("SELECT count(*) FROM hk_throttle") == 0
    if kept.sqlite:
        assert not kept.run(lambda conn: conn.dbapi_connection.in_transaction)

    assert not insert_if(kept, guard, {"id": user_id + 1}, [(Throttle, [row("u:b")])])
    assert site.scalar("SELECT count(*) FROM hk_throttle") == 0  # no account, no row

    assert insert_if(kept, guard, {"id": user_id}, [(Throttle, [row("u:a"), row("ip:b")])])
    table = Throttle.__table__
    rows = kept.execute(select(table.c.key, table.c.failures, table.c.window_start,
                               table.c.locked_until).order_by(table.c.key), {})
    assert rows == [("ip:b", 0, at, None), ("u:a", 0, at, None)]


def test_sqlite_a_login_whose_write_finds_the_file_locked_answers_503(
    make_site: t.Callable[..., Site],
) -> None:
    """Another process holds SQLite's write lock past the busy timeout while a login's
    password is checked: the login answers 503 ``database_unavailable`` and writes no session
    and no audit row; the kept connection is left outside any transaction, and once the lock
    is gone the next login succeeds."""
    if os.environ.get("HEADLESSKEY_TEST_DATABASE_URL"):
        pytest.skip("SQLite's file lock: PostgreSQL locks rows, and waits for them")
    from agent.direct import connections

    site = make_site("HS256")
    site.create_user("alice")
    site.api.login()
    engine = site.state.engine
    kept = connections(engine)
    for conn in kept.idle:  # wait a third of a second for the lock, not fifteen
        conn.dbapi_connection.execute("PRAGMA busy_timeout=300")
    blocker = sqlite3.connect(engine.url.database, isolation_level=None,
                              check_same_thread=False)
    hasher = site.state.hasher
    verify = hasher.verify

    def verify_then_lock(stored: str | None, password: str) -> bool:
        ok = verify(stored, password)
        blocker.execute("BEGIN IMMEDIATE")  # held from the check to the answer
        return ok

    hasher.verify = verify_then_lock  # type: ignore[method-assign]
    try:
        refused = site.api.post("/token", json={"username": "alice", "password": PASSWORD})
    finally:
        hasher.verify = verify  # type: ignore[method-assign]
        blocker.execute("ROLLBACK")
        blocker.close()
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "database_unavailable"
    assert site.scalar("SELECT count(*) FROM hk_sessions") == 1
    assert site.scalar(
        "SELECT count(*) FROM hk_audit WHERE event = 'login.succeeded'") == 1
    assert not any(conn.dbapi_connection.in_transaction for conn in kept.idle)
    site.api.login()
    assert site.scalar("SELECT count(*) FROM hk_sessions") == 2
