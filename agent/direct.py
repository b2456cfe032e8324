"""Connections kept per process for the hot paths, and statements run on them through libpq.

Every protected request reads its session, and every login runs three statements (the account
read, the attempt's reservation, the session write). Through a pooled SQLAlchemy connection
each costs the worker more CPU than the statement costs the server: the checkout, the ping,
the ORM or Core execution and psycopg's cursor. On a login that is about 2 ms of a worker's
CPU, and more with the caches cold after the password hash. So these run here instead:

- :class:`Connections`: a small stack of idle DBAPI connections per engine and process, taken
  and put back per statement, each in autocommit (every statement sees every commit before
  it, by any worker or instance). A broken connection (a server restart) is found by the
  statement that fails on it, and the statement runs again once on a fresh connection, so a
  restart costs no failed request and no ping is paid on the way.
- :class:`Statement` (PostgreSQL): a SQLAlchemy statement compiled once with libpq's numbered
  placeholders, prepared once per connection under a name derived from its text, run with its
  parameters as text and its rows in binary.
- :class:`DbapiStatement` (SQLite): a SQLAlchemy statement compiled once, run by the driver
  itself (its own statement cache), without SQLAlchemy's execution context.

Only statements that commit on their own run here, and on SQLite the few that commit together
(:meth:`Connections.transaction`, :func:`insert_if`): nothing of a request's transaction does.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import threading
import typing as t
import weakref

from sqlalchemy import Engine
from sqlalchemy import bindparam
from sqlalchemy import event
from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError

from .db import Writes
from .db import file_identity
from .db import insert_if_statement
from .db import unavailable
from .db import with_defaults

R = t.TypeVar("R")

# Binary column formats by type OID. A timestamp is microseconds since 2000-01-01 (naive UTC:
# the columns are UTCDateTime, returned aware as SQLAlchemy returns them).
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
PG_BINARY: dict[int, t.Callable[[bytes], t.Any]] = {
    16: lambda v: v != b"\x00",
    20: lambda v: int.from_bytes(v, "big", signed=True),
    23: lambda v: int.from_bytes(v, "big", signed=True),
    1043: bytes.decode,
    25: bytes.decode,
    114: bytes.decode,
    1114: lambda v: _PG_EPOCH + dt.timedelta(microseconds=int.from_bytes(v, "big", signed=True)),
}


class Connections:
    """Idle DBAPI connections of one engine, kept for the process's threads.

    The engine's pool makes each connection (so its connect-time setup runs, SQLite's pragmas)
    and the connection is kept here, never handed back; on PostgreSQL the kept ones count
    against the pool (one per sync worker).
    """

    MAX_IDLE = 4
    MAX_STATEMENTS = 64

    def __init__(self, engine: Engine, *, synchronous_commit: bool = True) -> None:
        dialect = engine.dialect
        self.engine = engine
        self.synchronous_commit = synchronous_commit
        self.errors: tuple[type[BaseException], ...] = (dialect.loaded_dbapi.Error,)
        self.sqlite = dialect.name == "sqlite"
        self.path = engine.url.database or ""
        self.pid = os.getpid()
        self.idle: list[t.Any] = []
        self.inherited: list[t.Any] = []
        self.statements: dict[t.Hashable, Statement | DbapiStatement] = {}
        self.operational: type[BaseException] = dialect.loaded_dbapi.OperationalError
        if not self.sqlite:
            from psycopg import pq  # the driver's libpq binding, loaded with the dialect

            self.pq = pq
        event.listen(engine, "engine_disposed", self.close)

    def close(self, _engine: Engine | None = None) -> None:
        """Close the idle connections (when the engine is disposed)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.invalidate()

    def _connect(self) -> t.Any:
        fairy = self.engine.raw_connection()
        if not self.sqlite:  # SQLite connections already run without implicit transactions
            dbapi: t.Any = fairy.dbapi_connection
            dbapi.autocommit = True
            if not self.synchronous_commit:
                # Kept connections never go back to the pool: the setting stays with them.
                dbapi.execute("SET synchronous_commit TO off")
        return fairy

    def _take(self) -> t.Any:
        if os.getpid() != self.pid:
            # A forked child never uses its parent's connections (nor closes them).
            self.inherited, self.idle, self.pid = self.inherited + self.idle, [], os.getpid()
        try:
            conn = self.idle.pop()
        except IndexError:
            return self._connect()
        if self.sqlite and conn.info.get("file") != file_identity(self.path):
            conn.invalidate()  # the database file was replaced (agent.db): use the new one
            return self._connect()
        return conn

    def run(self, work: t.Callable[[t.Any], R], *, write: bool = False) -> R:
        """``work(connection)`` on a kept connection; a database error is a 503.

        A connection that fails (the server restarted) is dropped with the idle ones, likely
        broken too, and ``work`` runs once more on a fresh connection. A ``write`` runs again
        only when its connection is broken: one the server refused raises its error as it is
        (a 500), and is not sent twice.
        """
        for attempt in (1, 2):
            try:
                conn = self._take() if attempt == 1 else self._connect()
            except (DBAPIError, self.errors[0]) as exc:  # the pool raises the driver's own
                raise unavailable(exc) from exc
            try:
                result = work(conn)
            except self.errors as exc:
                broken = self._broken(conn)
                if write and not broken:
                    self._put(conn)
                    if self.sqlite and isinstance(exc, self.operational):
                        # The file stayed locked past the busy timeout, or could not be
                        # written: a 503, as on the pool's connections (agent.db).
                        raise unavailable(exc) from exc
                    # The server refused the statement (no outage): an error as any other.
                    raise
                conn.invalidate()
                self.close()
                if attempt == 2:
                    raise unavailable(exc) from exc
                continue
            self._put(conn)
            return result
        raise AssertionError("unreachable")

    def _put(self, conn: t.Any) -> None:
        if len(self.idle) < self.MAX_IDLE:
            self.idle.append(conn)
        else:
            conn.invalidate()

    def _broken(self, conn: t.Any) -> bool:
        if self.sqlite:
            return False
        return bool(conn.dbapi_connection.pgconn.status != self.pq.ConnStatus.OK)

    def statement(self, stmt: t.Any) -> Statement | DbapiStatement:
        """``stmt`` compiled for this engine's kept connections (on its first use: build each
        statement once and reuse it)."""
        statement = self.statements.get(stmt)
        if statement is None:
            if len(self.statements) >= self.MAX_STATEMENTS:
                self.statements.clear()
            kind = DbapiStatement if self.sqlite else Statement
            statement = self.statements[stmt] = kind(stmt, self.engine)
        return statement

    def execute(self, stmt: t.Any, params: t.Mapping[str, t.Any], *,
                write: bool = False) -> list[tuple[t.Any, ...]]:
        """The rows of the SQLAlchemy statement ``stmt`` run with ``params``, committed (each
        statement in autocommit)."""
        statement = self.statement(stmt)
        values = statement.encode(params)
        return self.run(lambda conn: statement.run(self, conn, values), write=write)

    def transaction(self, work: t.Callable[[Execute], R]) -> R:
        """``work(execute)`` in one write transaction of its own on a kept SQLite connection:
        ``execute(stmt, params)`` runs a statement in it and returns its rows. It takes the
        write lock first (``BEGIN IMMEDIATE``, as the pool's connections do) and commits when
        ``work`` returns; anything ``work`` raises rolls it back."""
        if not self.sqlite:
            raise TypeError("on PostgreSQL a write here is one statement in autocommit")

        def run(conn: t.Any) -> R:
            def execute(stmt: t.Any, params: t.Mapping[str, t.Any]) -> list[tuple[t.Any, ...]]:
                statement = self.statement(stmt)
                return statement.run(self, conn, statement.encode(params))

            raw = conn.dbapi_connection
            raw.execute("BEGIN IMMEDIATE")
            try:
                result = work(execute)
                raw.execute("COMMIT")
            except BaseException:
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
                raise
            return result

        return self.run(run, write=True)

    def pg_error(self, res: t.Any, message: str = "") -> BaseException:
        text = message or (res.error_message or b"").decode(errors="replace").strip()
        return self.errors[0](text or "the statement failed")


def per_engine(make: t.Callable[[Engine], R]) -> t.Callable[[Engine], R]:
    """``make(engine)`` made once per engine, kept while the engine lives, safe across threads."""
    made: weakref.WeakKeyDictionary[Engine, R] = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def get(engine: Engine) -> R:
        found = made.get(engine)
        if found is None:
            with lock:
                found = made.get(engine)
                if found is None:
                    found = made[engine] = make(engine)
        return found

    return get


connections = per_engine(Connections)  # the kept connections of an engine in this process

# Kept connections whose commits return before they reach the disk (PostgreSQL's asynchronous
# commit: a crash of the server may lose the last ones, never half of one, and every other
# connection sees them at once), for writes a crash may lose: the attempts' reservations.
# Each saves its commit's wait for the disk, about 0.15-0.2 ms, on every login.
async_commit_connections = per_engine(
    lambda engine: Connections(engine, synchronous_commit=False))


Execute = t.Callable[[t.Any, t.Mapping[str, t.Any]], list[tuple[t.Any, ...]]]


def insert_if(conns: Connections, guard: t.Any, params: dict[str, t.Any], writes: Writes,
              also: t.Any = None) -> bool:
    """INSERT the rows of ``writes`` if ``guard`` (a SELECT that locks the row it finds) finds
    one, and run ``also`` (an UPDATE or None) whatever it finds, all committed together on a
    kept connection; returns whether the guard found its row. ``params`` are the guard's and
    ``also``'s; each column's Python-side default applies to the rows as to any INSERT.

    On PostgreSQL one statement in autocommit (:func:`agent.db.insert_if_statement`): one round
    trip, its commit included. On SQLite the statements one by one in one write transaction.
    """
    if not conns.sqlite:
        stmt, values = insert_if_statement(guard, params, writes, also)
        return bool(conns.execute(stmt, values, write=True)[0][0])

    def work(execute: Execute) -> bool:
        found = bool(execute(guard, params))
        if found:
            for model, rows in writes:
                table = model.__table__
                for row in rows:
                    row = with_defaults(table, row)
                    execute(_insert(table, tuple(row)), row)
        if also is not None:
            execute(also, params)
        return found

    return conns.transaction(work)


@functools.lru_cache(maxsize=32)
def _insert(table: t.Any, names: tuple[str, ...]) -> t.Any:
    """A plain INSERT of ``names`` into ``table``, each value a parameter of its column's type."""
    return insert(table).values({name: bindparam(name, type_=table.c[name].type)
                                 for name in names})


class _Compiled:
    """A compiled statement's positional parameters, processed as SQLAlchemy binds them."""

    def __init__(self, compiled: t.Any, dialect: t.Any) -> None:
        if "POSTCOMPILE" in str(compiled):
            raise TypeError("parameters expanded at run time (IN lists) are not supported")
        self.names: list[str] = list(compiled.positiontup or ())
        self.processors = [compiled.binds[name].type._cached_bind_processor(dialect)
                           for name in self.names]
        # The statement's own values (a literal compared with, a constant set).
        self.fixed = {name: bind.effective_value for name, bind in compiled.binds.items()
                      if not bind.required}

    def bound(self, params: t.Mapping[str, t.Any]) -> list[t.Any]:
        values = []
        for name, process in zip(self.names, self.processors, strict=True):
            value = params[name] if name in params else self.fixed[name]
            values.append(process(value) if process is not None else value)
        return values


class DbapiStatement(_Compiled):
    """A SQLAlchemy statement for :meth:`Connections.execute` on SQLite: compiled once, its
    parameters processed as SQLAlchemy would bind them, run by the driver itself (which keeps
    it prepared), its rows processed by each column's type as SQLAlchemy would return them."""

    def __init__(self, stmt: t.Any, engine: Engine) -> None:
        dialect = engine.dialect
        compiled = stmt.compile(dialect=dialect)
        if not compiled.positional:
            raise TypeError("the driver's paramstyle is expected to be positional")
        super().__init__(compiled, dialect)
        self.sql = str(compiled)
        results = [entry[3]._cached_result_processor(dialect, None)
                   for entry in compiled._result_columns]
        self.results = results if any(results) else None  # None: rows as the driver reads them

    def encode(self, params: t.Mapping[str, t.Any]) -> list[t.Any]:
        return self.bound(params)

    def run(self, conns: Connections, conn: t.Any, values: list[t.Any],
            ) -> list[tuple[t.Any, ...]]:
        rows: list[tuple[t.Any, ...]] = conn.dbapi_connection.execute(self.sql, values).fetchall()
        if self.results is None:
            return rows
        return [tuple(v if p is None or v is None else p(v)
                      for p, v in zip(self.results, row, strict=True)) for row in rows]


class Statement(_Compiled):
    """A SQLAlchemy statement for :meth:`Connections.execute` on PostgreSQL: compiled once with
    ``$n`` placeholders (SQLAlchemy's casts included, so each parameter's type is known), its
    parameters processed as SQLAlchemy would bind them, then sent as text; its rows decoded from
    binary by each column's type."""

    def __init__(self, stmt: t.Any, engine: Engine) -> None:
        dialect_class: t.Any = type(engine.dialect)
        numbered = dialect_class(paramstyle="numeric_dollar")
        compiled = stmt.compile(dialect=numbered)
        super().__init__(compiled, engine.dialect)
        self.sql = str(compiled).encode()
        # Named by its text: processes of two releases may share a server connection.
        self.name = b"hk_" + hashlib.sha256(self.sql).hexdigest()[:24].encode()
        untyped = [name for name in self.names if compiled.binds[name].type._isnull]
        if untyped:  # sent as text, PostgreSQL would guess their types from the context
            raise TypeError(f"parameters without a type: {untyped}")
        self.decoders: list[t.Callable[[bytes], t.Any]] | None = None

    def encode(self, params: t.Mapping[str, t.Any]) -> list[bytes | None]:
        return [_text(value) for value in self.bound(params)]

    def run(self, conns: Connections, conn: t.Any, values: list[bytes | None],
            ) -> list[tuple[t.Any, ...]]:
        """The rows of the statement run on ``conn`` with ``values`` (from :meth:`encode`).

        Only libpq calls that let other threads run while they wait for the server (its
        describe call does not: the column types come from the first result instead)."""
        pq = conns.pq
        pgconn = conn.dbapi_connection.pgconn
        done = pq.ExecStatus.TUPLES_OK
        res = pgconn.exec_prepared(self.name, values, result_format=pq.Format.BINARY)
        if res.status != done:
            # 26000: not prepared yet on this connection (a new one, or the server forgot).
            if res.error_field(pq.DiagnosticField.SQLSTATE) != b"26000":
                raise conns.pg_error(res)
            prepared = pgconn.prepare(self.name, self.sql)
            if prepared.status != pq.ExecStatus.COMMAND_OK:
                raise conns.pg_error(prepared)
            res = pgconn.exec_prepared(self.name, values, result_format=pq.Format.BINARY)
            if res.status != done:
                raise conns.pg_error(res)
        decoders = self.decoders
        if decoders is None:
            types = [res.ftype(i) for i in range(res.nfields)]
            unknown = [oid for oid in types if oid not in PG_BINARY]
            if unknown:
                raise conns.pg_error(res, f"no decoder for type OIDs {unknown}")
            decoders = self.decoders = [PG_BINARY[oid] for oid in types]
        return [tuple(None if (v := res.get_value(row, i)) is None else decode(v)
                      for i, decode in enumerate(decoders))
                for row in range(res.ntuples)]


def _text(value: t.Any) -> bytes | None:
    """A parameter in PostgreSQL's text format. libpq passes C strings: a NUL would cut the
    value short, so a text holding one is refused as PostgreSQL refuses it."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("PostgreSQL text cannot hold NUL characters")
        return value.encode()
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            raise ValueError("a naive UTC datetime is expected")
        return value.isoformat().encode()
    if isinstance(value, list):  # an array of texts
        return _text("{" + ",".join(_array_item(item) for item in value) + "}")
    obj = getattr(value, "obj", _MISSING)  # psycopg's Json wrapper, as SQLAlchemy binds JSON
    if obj is not _MISSING:
        return _text(json.dumps(obj, separators=(",", ":")))
    raise TypeError(f"no text format for {type(value).__name__}")


_MISSING = object()


def _array_item(item: t.Any) -> str:
    if not isinstance(item, str):
        raise TypeError("only arrays of texts are sent")
    # Quoted, with its quotes and backslashes escaped: read back exactly as given.
    return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
