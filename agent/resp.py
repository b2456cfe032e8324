"""A small Redis client: the handful of commands the agent and hub send, over RESP2.

The agent needs ``SET NX EX``, ``HGET``, ``DEL`` and Lua scripts (``EVALSHA``, then ``EVAL``
once when the server does not know the script); the hub needs ``SET NX EX``. This client sends
exactly those over one socket per call, with the redis-py calling conventions the callers use
(``set``, ``hget``, ``delete``, ``register_script``, ``ping``). It exists because importing
redis-py 8 costs every worker about 7 MB (its package pulls in its asyncio, cluster, sentinel
and observability modules), which put a worker with Redis over its 100 MB budget
(``bench/RESULTS.md``).

What it does, and what it does not:

- URLs ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS with the system's CA
  store and hostname check; ``?ssl_cert_reqs=none`` is not supported on purpose), and
  ``unix:///path?db=N&password=…``. ``AUTH`` and ``SELECT`` run once per connection.
- Each connection waits at most ``timeout`` seconds to connect and for an answer; then the call
  raises :class:`RedisError` (the callers answer 503). A call is never retried after a timeout:
  the command may have run.
- A kept connection that the server closed meanwhile (a Redis restart, its idle timeout) is
  found when the call fails to send or reads end-of-file, and the call is sent once more on a
  new connection: the first send never reached a live server, or the server went away without
  answering, as redis-py's single retry also assumes. A connection idle for more than
  ``IDLE_CHECK`` seconds is first pinged (as redis-py's ``health_check_interval``), so one that
  a firewall dropped silently costs a ``PING``'s timeout, then a new connection, not a 503.
- Idle connections are kept per process (at most ``MAX_IDLE``), shared by its threads, taken
  and put back per call; a forked child never uses its parent's.
- No pipelines, pub/sub, cluster or sentinel: the agent has no use for them.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
import typing as t
import weakref
from urllib.parse import parse_qs
from urllib.parse import unquote
from urllib.parse import urlsplit

MAX_IDLE = 4
IDLE_CHECK = 30.0  # seconds: a connection kept longer than this is pinged before it is used
MAX_BULK = 1 << 20  # the largest string reply accepted: the callers' replies are a few bytes
MAX_ITEMS = 1 << 12  # the largest array reply accepted (a Lua script's list)
MAX_LINE = 1 << 12  # the longest status, error or length line

Reply = t.Union[bytes, int, None, list["Reply"], "ReplyError"]


class RedisError(Exception):
    """Redis could not be reached, did not answer in time, or answered with an error."""


class ReplyError(RedisError):
    """An error reply (``-ERR …``, ``-NOSCRIPT …``); the connection stays usable."""


class ProtocolError(RedisError):
    """A reply that is not RESP2, or larger than this client accepts."""


class _Gone(Exception):
    """The server closed the connection before a reply began."""


def _close(*closables: t.Any) -> None:
    for closable in closables:
        try:
            closable.close()
        except OSError:
            pass


class Connection:
    """One socket to Redis, with a buffered reader for replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.idle_since = time.monotonic()
        # A client dropped with idle connections (an app torn down) closes their sockets, even
        # when the garbage collector takes the client apart in a cycle, where a __del__ could
        # run after the socket's own; in a forked child this closes only the child's descriptor
        # (no shutdown, no TLS alert).
        self.close = weakref.finalize(self, _close, self.reader, sock)

    def send(self, args: t.Sequence[t.Any]) -> None:
        self.sock.sendall(encode(args))

    def read(self, *, top: bool = True) -> Reply:
        line = self.reader.readline(MAX_LINE)
        if not line:
            if top:
                raise _Gone()
            raise ProtocolError("the connection closed in the middle of a reply")
        if not line.endswith(b"\r\n"):
            raise ProtocolError("a reply line without CRLF, or too long")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body
        if kind == b"-":
            return ReplyError(body.decode("utf-8", "replace"))
        if kind == b":":
            return _number(body)
        if kind == b"$":
            size = _number(body)
            if size == -1:
                return None
            if not 0 <= size <= MAX_BULK:
                raise ProtocolError(f"a string reply of {size} bytes")
            data = self.reader.read(size + 2)
            if len(data) != size + 2 or not data.endswith(b"\r\n"):
                raise ProtocolError("a string reply cut short")
            return data[:-2]
        if kind == b"*":
            count = _number(body)
            if count == -1:
                return None
            if not 0 <= count <= MAX_ITEMS:
                raise ProtocolError(f"an array reply of {count} items")
            return [self.read(top=False) for _ in range(count)]
        raise ProtocolError(f"an unknown reply type {kind!r}")


def _number(body: bytes) -> int:
    try:
        return int(body)
    except ValueError:
        raise ProtocolError(f"not a number: {body[:20]!r}") from None


def encode(args: t.Sequence[t.Any]) -> bytes:
    """A command as a RESP array of bulk strings (str as UTF-8, numbers as their repr)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise TypeError(f"a Redis argument must be bytes, str, int or float, not {type(arg)}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Redis:
    """A client for one Redis URL; nothing is sent until the first call."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.timeout = timeout
        self.tls: ssl.SSLContext | None = None
        self.path: str | None = None
        self.host, self.port = "", 0
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("a unix:// URL needs the socket's path")
            self.path = unquote(parts.path)
            db = query.get("db", "0")
        elif parts.scheme in ("redis", "rediss"):
            self.host = parts.hostname or "localhost"
            self.port = parts.port or 6379  # ValueError for a port that is not a number
            db = parts.path.strip("/") or query.get("db", "0")
            if parts.scheme == "rediss":
                self.tls = ssl.create_default_context()
        else:
            raise ValueError(f"unknown scheme {parts.scheme!r}")
        if not db.isdigit():
            raise ValueError(f"the database must be a number, not {db!r}")
        self.db = int(db)
        self.username = unquote(parts.username) if parts.username else None
        password = parts.password if parts.password is not None else query.get("password")
        self.password = unquote(password) if password else None
        self.pid = os.getpid()
        self.idle: list[Connection] = []
        self.inherited: list[Connection] = []
        self.shas: dict[str, str] = {}  # script source -> its SHA-1

    # -- the commands the callers use (redis-py's names and results) --

    def ping(self) -> bool:
        return self.execute("PING") == b"PONG"

    def set(self, name: str, value: bytes | str, *, nx: bool = False, ex: int | None = None
            ) -> bool:
        args: list[t.Any] = ["SET", name, value]
        if nx:
            args.append("NX")
        if ex is not None:
            args += ["EX", int(ex)]
        return self.execute(*args) is not None

    def hget(self, name: str, key: str) -> bytes | None:
        return t.cast("bytes | None", self.execute("HGET", name, key))

    def delete(self, *names: str) -> int:
        return t.cast(int, self.execute("DEL", *names))

    def register_script(self, source: str) -> Script:
        """The Lua script ``source``, to call with ``keys`` and ``args``."""
        sha = self.shas.get(source)
        if sha is None:
            digest = hashlib.sha1(source.encode(), usedforsecurity=False)
            sha = self.shas[source] = digest.hexdigest()
        return Script(self, source, sha)

    # -- the connection pool --

    def execute(self, *args: t.Any) -> Reply:
        """Send one command and return its reply; an error reply raises :class:`ReplyError`."""
        conn, kept = self._take()
        try:
            reply = self._call(conn, args)
        except (_Gone, ConnectionError) as exc:
            # EOF before any reply, or a reset/broken pipe: a server that dropped the connection.
            conn.close()
            if not kept:
                raise RedisError(f"the connection closed ({type(exc).__name__})") from None
            conn = self._connect()
            try:
                reply = self._call(conn, args)
            except (_Gone, OSError, RedisError) as again:
                conn.close()
                raise _failure(again) from None
        except (OSError, RedisError) as exc:
            # A timeout (the command may have run), a protocol error: the connection is done.
            conn.close()
            raise _failure(exc) from None
        self._give(conn)
        if isinstance(reply, ReplyError):
            try:
                raise reply
            finally:
                del reply  # no cycle between the error, its traceback and this frame
        return reply

    @staticmethod
    def _call(conn: Connection, args: t.Sequence[t.Any]) -> Reply:
        conn.send(args)
        return conn.read()

    def _take(self) -> tuple[Connection, bool]:
        if os.getpid() != self.pid:
            # A forked child never uses its parent's connections (nor closes them).
            self.inherited, self.idle, self.pid = self.inherited + self.idle, [], os.getpid()
        while self.idle:
            conn = self.idle.pop()
            if time.monotonic() - conn.idle_since < IDLE_CHECK or self._alive(conn):
                return conn, True
            conn.close()
        return self._connect(), False

    def _alive(self, conn: Connection) -> bool:
        # Long idle, the connection may have been dropped without a word (a firewall's or NAT's
        # timeout): a PING, which nothing can be harmed by sending twice, tells before the call.
        try:
            return self._call(conn, ("PING",)) == b"PONG"
        except (_Gone, OSError, RedisError):
            return False

    def _give(self, conn: Connection) -> None:
        if len(self.idle) < MAX_IDLE and os.getpid() == self.pid:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.close()

    def _connect(self) -> Connection:
        try:
            if self.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self.path)
                except OSError:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except OSError as exc:
            raise RedisError(f"cannot connect ({type(exc).__name__}: {exc})") from None
        conn = Connection(sock)
        try:
            if self.password is not None:
                auth = [self.username, self.password] if self.username else [self.password]
                self._setup(conn, "AUTH", *auth)
            if self.db:
                self._setup(conn, "SELECT", self.db)
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self, conn: Connection, *args: t.Any) -> None:
        try:
            reply = self._call(conn, args)
        except (_Gone, OSError) as exc:
            raise _failure(exc) from None
        if isinstance(reply, ReplyError):
            # The reply names the problem (WRONGPASS, invalid DB index); it holds no secret.
            raise RedisError(f"{args[0]} was refused: {reply}")

    def close(self) -> None:
        """Close the idle connections."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


def _failure(exc: BaseException) -> RedisError:
    if isinstance(exc, RedisError):
        return exc
    if isinstance(exc, _Gone):
        return RedisError("the connection closed before a reply")
    if isinstance(exc, TimeoutError):
        return RedisError("no answer in time")
    return RedisError(f"{type(exc).__name__}: {exc}")


class Script:
    """A Lua script run by its SHA-1 (``EVALSHA``), sent whole once if the server lacks it."""

    def __init__(self, client: Redis, source: str, sha: str) -> None:
        self.client = client
        self.source = source
        self.sha = sha

    def __call__(self, *, keys: t.Sequence[str], args: t.Sequence[t.Any]) -> Reply:
        try:
            return self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return self.client.execute("EVAL", self.source, len(keys), *keys, *args)
