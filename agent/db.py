"""Engine creation and schema migrations (Alembic) for the agent's own tables."""

from __future__ import annotations

import functools
import logging
import os
import time
import typing as t
from pathlib import Path

from sqlalchemy import CursorResult
from sqlalchemy import Engine
from sqlalchemy import bindparam
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import make_url
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.exc import ArgumentError
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.exc import InterfaceError
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .errors import ConfigError
from .errors import DatabaseUnavailable

if t.TYPE_CHECKING:
    # Alembic (about 11 MB with Mako) is imported only by the commands that migrate, never by
    # the workers serving requests.
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"
# A version table of our own, so a host app's Alembic history is never touched.
VERSION_TABLE = "hk_alembic_version"
# The newest revision in MIGRATIONS (tests/agent/test_db.py holds it to Alembic's history): a
# worker of a mounted extension that finds the schema there migrates nothing and so never
# imports Alembic.
HEAD = "0007"
_PINGED = "hk_pinged"
PING_REUSE = 1.0  # seconds a ping vouches for a connection within one request
CONNECT_TIMEOUT = 5  # seconds to reach PostgreSQL (unless the URL says connect_timeout)
# No connection, a connection that broke, or none free in the pool in time: 503, not 500.
DATABASE_ERRORS = (OperationalError, InterfaceError, PoolTimeout)

log = logging.getLogger(__name__)


def _cause(exc: BaseException) -> str:
    """A database error's driver class and first line (parameters are hidden anyway)."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause)
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"


def unavailable(exc: BaseException) -> DatabaseUnavailable:
    """The 503 for a database error of :data:`DATABASE_ERRORS` (logged in one line)."""
    log.warning("database unavailable: %s", _cause(exc))
    return DatabaseUnavailable()


def one_statement(engine: Engine) -> dict[str, t.Any]:
    """Execution options for a write of one statement: on PostgreSQL it runs in autocommit,
    so it commits on its own (no BEGIN and COMMIT round trips); SQLite runs it in its usual
    write transaction."""
    if engine.dialect.name == "postgresql":
        return {"isolation_level": "AUTOCOMMIT"}
    return {}


R = t.TypeVar("R")


def skip_while_unavailable(
    name: str, job: t.Callable[..., R]
) -> t.Callable[..., R | None]:
    """``job`` as a scheduled job: while the database is unreachable a run logs one warning
    line and does nothing, and the next run tries again (no traceback per run)."""

    @functools.wraps(job)
    def run(*args: t.Any, **kwargs: t.Any) -> R | None:
        try:
            return job(*args, **kwargs)
        except DATABASE_ERRORS as exc:
            log.warning("job %r skipped, the database is unavailable (%s); its next run "
                        "tries again", name, _cause(exc))
            return None

    return run


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """Create the engine; SQLite gets WAL, foreign keys and a busy timeout. On PostgreSQL the
    pool keeps ``pool_size`` connections open while idle, and opens up to ten more when busy.

    Statement parameters are never shown in errors or logs (``hide_parameters``): they hold
    password hashes, token digests and addresses.
    """
    for alias in ("postgresql://", "postgres://"):
        if url.startswith(alias):
            url = "postgresql+psycopg://" + url.removeprefix(alias)
    if url.startswith("sqlite"):
        if url in {"sqlite://", "sqlite:///:memory:"}:
            raise ConfigError(
                "HEADLESSKEY_DATABASE_URL: in-memory SQLite cannot be shared between threads "
                "and workers; use a file (sqlite:///path/to/db)"
            )
        path = url.removeprefix("sqlite:///")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Pooled: opening a connection runs the pragmas below, and closing the last one
        # checkpoints the WAL, both on every transaction otherwise. A connection is used by one
        # thread at a time (the pool hands it over); beyond the five kept, connections are
        # opened and closed as needed, so a burst of threads never waits for the pool.
        engine = create_engine(url, pool_size=5, max_overflow=-1, hide_parameters=True,
                               connect_args={"timeout": 15, "check_same_thread": False})
        _fork_safe(engine)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: t.Any, record: t.Any) -> None:
            record.info["file"] = file_identity(path)
            # Let SQLAlchemy, not pysqlite, begin transactions, so BEGIN IMMEDIATE works.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=15000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: t.Any) -> None:
            # Take the write lock up front: read-then-write transactions (refresh rotation,
            # reset-code attempts) then serialise instead of failing with "database is locked".
            # Read-only work (the token check on every request) opts out and never waits.
            if conn.get_execution_options().get("hk_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        @event.listens_for(engine, "checkout")
        def _same_file(_dbapi_conn: t.Any, record: t.Any, _proxy: t.Any) -> None:
            # A file put in place of the database (a restored backup) is used from then on:
            # a pooled connection would go on reading and writing the file it replaced.
            if record.info.get("file") != file_identity(path):
                raise DisconnectionError("the database file was replaced")

        return engine
    try:
        # A server that does not answer costs a request CONNECT_TIMEOUT seconds, then a 503,
        # never a hung worker; a connection it dropped is found by the ping and replaced.
        parsed = make_url(url)
        connect_args = ({} if "connect_timeout" in parsed.query
                        else {"connect_timeout": CONNECT_TIMEOUT})
        engine = create_engine(parsed, pool_size=pool_size, max_overflow=10, pool_timeout=10,
                               hide_parameters=True, connect_args=connect_args)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise ConfigError(f"HEADLESSKEY_DATABASE_URL: not a usable database URL ({exc})") from None
    _fork_safe(engine)
    _ping_once_per_request(engine)
    return engine


def file_identity(path: str) -> tuple[int, int] | None:
    """The device and inode of a file (None when missing): which file a path names now."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _fork_safe(engine: Engine) -> None:
    """A pooled connection made before a fork is never used by the child (SQLAlchemy's recipe):
    the child makes its own, and leaves the parent's socket or file handle alone."""

    @event.listens_for(engine, "connect")
    def _record_pid(_dbapi_conn: t.Any, record: t.Any) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def _check_pid(_dbapi_conn: t.Any, record: t.Any, proxy: t.Any) -> None:
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise DisconnectionError("connection made in another process")


def _context() -> object | None:
    """A token of the app context (the request) running now; None outside one."""
    from flask import g
    from flask import has_app_context

    if not has_app_context():
        return None
    token: object | None = g.get("_hk_db_context")
    if token is None:
        token = g._hk_db_context = object()
    return token


def _ping_once_per_request(engine: Engine) -> None:
    """SQLAlchemy's ``pool_pre_ping``, but once per connection and request: a connection
    this request opened or pinged under a second ago is not pinged again (a request may check
    a connection out several times). A connection the network or the server dropped is still
    found before a request's first statement on it: the ping fails, and the error raised here
    makes the pool replace it (and those pooled before it) and check out again."""
    dialect = engine.dialect

    @event.listens_for(engine, "connect")
    def _fresh(_dbapi_conn: t.Any, record: t.Any) -> None:
        record.info[_PINGED] = (_context(), time.monotonic())

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: t.Any, record: t.Any, _proxy: t.Any) -> None:
        context = _context()
        by, at = record.info.get(_PINGED, (None, 0.0))
        now = time.monotonic()
        if context is not None and by is context and now - at < PING_REUSE:
            return
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_conn, None):
                # As pool_pre_ping does: the pooled connections made before are likely
                # dropped too (a server restart), so the pool replaces them all.
                raise InvalidatePoolError(_cause(exc)) from exc
            raise
        record.info[_PINGED] = (context, now)


# The largest id an id column holds: every id column is INTEGER, 32 bits on PostgreSQL. A larger
# number from a request is refused before it reaches the database driver, which would fail.
MAX_ID = 2**31 - 1


def rowcount(result: t.Any) -> int:
    """Rows matched by an UPDATE or DELETE (typed: ``Session.execute`` returns a plain Result)."""
    return int(t.cast(CursorResult[t.Any], result).rowcount)


def insert_for(dialect_name: str) -> t.Any:
    """The ``insert`` with ``ON CONFLICT`` of PostgreSQL or SQLite, imported when first asked
    for: a worker loads only its own database's dialect (PostgreSQL's is about 2.4 MB)."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


@functools.cache
def _insert(table: t.Any) -> t.Any:
    return insert(table)


def insert_rows(db: t.Any, model: t.Any, rows: list[dict[str, t.Any]]) -> None:
    """INSERT ``rows`` of ``model``'s table in ``db``'s transaction, now: a plain statement
    (column defaults and types apply), for the rows a login or an event writes, where the
    ORM's unit of work would cost more than the statement."""
    db.connection().execute(_insert(model.__table__), rows[0] if len(rows) == 1 else rows)


Writes = list[tuple[type[t.Any], list[dict[str, t.Any]]]]  # (model, rows), in write order


def insert_if_statement(guard: t.Any, params: dict[str, t.Any], writes: Writes,
                        also: t.Any = None) -> tuple[t.Any, dict[str, t.Any]]:
    """One statement on PostgreSQL, with its parameters, that INSERTs the rows of ``writes`` if
    ``guard`` (a SELECT that locks the row it finds) finds one, runs ``also`` (an UPDATE or
    None) whatever it finds, and returns the count of rows the guard found: for a caller that
    runs it in autocommit (:func:`agent.direct.insert_if`). Column defaults apply to the rows
    as to any INSERT.

    The guard, each INSERT and ``also`` are parts of one ``WITH``, every row selected from the
    guard's, so nothing is inserted unless the guard found its row, and a row may reference
    one inserted before it (foreign keys are checked at the statement's end). The guard runs
    first (the statement's own query reads it; the other parts run after it), so its lock is
    taken before any ``also`` takes. Run in autocommit, the whole is one round trip, its
    commit included."""
    writes = [(model, [with_defaults(model.__table__, row) for row in rows])
              for model, rows in writes]
    shape = tuple((model, tuple(tuple(row) for row in rows)) for model, rows in writes)
    values = dict(params)
    for i, (_model, rows) in enumerate(writes):
        for j, row in enumerate(rows):
            values.update((f"w{i}_{j}_{name}", value) for name, value in row.items())
    return _insert_if(guard, shape, also), values


def with_defaults(table: t.Any, row: dict[str, t.Any]) -> dict[str, t.Any]:
    """``row`` with the Python-side default of each column it leaves out, as an INSERT of
    SQLAlchemy's would add (one made of a SELECT, as :func:`insert_if_statement`'s are, adds
    none; nor does a statement the driver runs on its own, as :mod:`agent.direct` does)."""
    missing = [c for c in table.columns if c.key not in row and c.default is not None]
    if not missing:
        return row
    row = dict(row)
    for column in missing:
        default = column.default
        row[column.key] = default.arg(None) if default.is_callable else default.arg
    return row


@functools.lru_cache(maxsize=64)
def _insert_if(guard: t.Any, shape: tuple[tuple[t.Any, tuple[tuple[str, ...], ...]], ...],
               also: t.Any) -> t.Any:
    """The statement of :func:`insert_if_statement` for one guard, shape of rows and ``also``,
    built once."""
    found = guard.cte("guard")
    parts = []
    for i, (model, rows) in enumerate(shape):
        table = model.__table__
        for j, names in enumerate(rows):
            values = select(*[bindparam(f"w{i}_{j}_{name}", type_=table.c[name].type)
                              for name in names]).select_from(found)
            parts.append(insert(table).from_select(names, values, include_defaults=False)
                         .cte(f"w{i}_{j}"))
    if also is not None:
        parts.append(also.cte("also"))
    return select(func.count()).select_from(found).add_cte(*parts)


def upsert(db: t.Any, table: t.Any, key: str, **values: t.Any) -> None:
    """Insert a row or, if its key exists, update it: one statement, so processes writing the
    same row at once never fail on the key (an ORM ``merge`` reads, then inserts or updates)."""
    stmt: t.Any = insert_for(db.get_bind().dialect.name)(table).values(**values)
    db.execute(stmt.on_conflict_do_update(
        index_elements=[key], set_={k: stmt.excluded[k] for k in values if k != key}))


def alembic_config(engine: Engine, migrations: Path = MIGRATIONS) -> AlembicConfig:
    """Alembic run on ``engine`` with the revisions in ``migrations`` (the agent's by default)."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations))
    cfg.attributes["engine"] = engine
    return cfg


def stored_revision(engine: Engine, version_table: str = VERSION_TABLE) -> str | None:
    """The schema revision the database records (None: no version table, or no row, yet)."""
    with engine.connect() as conn:
        try:
            # The table's name is one of two constants, never input.
            query = text(f"SELECT version_num FROM {version_table}")  # noqa: S608
            return conn.execute(query).scalar()
        except (OperationalError, ProgrammingError):
            return None


def upgrade(engine: Engine, revision: str = "head", migrations: Path = MIGRATIONS, *,
            head: str = HEAD, version_table: str = VERSION_TABLE) -> None:
    """Bring the schema of ``migrations`` (the agent's by default) to ``revision`` (idempotent).

    A schema already at ``head`` is left as it is without loading Alembic (about 11 MB a
    process); anything else, older or unknown, goes through Alembic.
    """
    if revision == "head" and stored_revision(engine, version_table) == head:
        return
    from alembic import command

    command.upgrade(alembic_config(engine, migrations), revision)
