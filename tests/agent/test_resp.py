"""The agent's small Redis client (agent.resp): the commands the agent and hub send, the URLs it
takes, and what it does when Redis goes away, stalls or answers nonsense.

Tests against a real Redis need ``HEADLESSKEY_TEST_REDIS_URL`` (e.g. redis://127.0.0.1:6379/9);
the rest talk to a scripted TCP server on 127.0.0.1 that plays a broken Redis.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import typing as t

import pytest

from agent import resp
from agent.errors import ConfigError
from agent.store import connect
from agent.store import use_once


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("HEADLESSKEY_TEST_REDIS_URL")
    if not url:
        pytest.skip("HEADLESSKEY_TEST_REDIS_URL is not set: these tests need a Redis")
    return url


@pytest.fixture
def peer(redis_url: str) -> t.Any:
    """redis-py (a test dependency) on the same Redis, to look at what the client did."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def name(tag: str) -> str:
    return f"hk:test:{tag}:{time.monotonic_ns()}"


# --- against a real Redis -----------------------------------------------------------------


def test_set_nx_ex_is_true_once_and_expires(redis_url: str, peer: t.Any) -> None:
    client = resp.Redis(redis_url, timeout=2)
    key = name("once")
    assert use_once(client, key, 30) is True
    assert use_once(client, key, 30) is False
    assert 0 < peer.ttl(key) <= 30
    assert peer.get(key) == b"1"


def test_hget_delete_and_values_round_trip(redis_url: str, peer: t.Any) -> None:
    client = resp.Redis(redis_url, timeout=2)
    key = name("hash")
    peer.hset(key, mapping={"text": "é\r\n$3\r\n", "number": 12})
    assert client.hget(key, "text") == "é\r\n$3\r\n".encode()
    assert client.hget(key, "number") == b"12"
    assert client.hget(key, "missing") is None
    assert client.delete(key, name("absent")) == 1
    assert peer.exists(key) == 0


def test_a_script_unknown_to_the_server_is_sent_whole_once(redis_url: str, peer: t.Any) -> None:
    client = resp.Redis(redis_url, timeout=2)
    source = "return {KEYS[1], tonumber(ARGV[1]) + 1, ARGV[2], false}"
    script = client.register_script(source)
    peer.script_flush()
    key = name("script")
    assert script(keys=[key], args=[41, 1.5]) == [key.encode(), 42, b"1.5", None]
    assert peer.script_exists(script.sha) == [True]
    assert script(keys=[key], args=[1, "x"]) == [key.encode(), 2, b"x", None]


def test_an_error_reply_raises_and_leaves_the_connection_usable(redis_url: str) -> None:
    client = resp.Redis(redis_url, timeout=2)
    failing = client.register_script("return redis.error_reply('BAD nope')")
    with pytest.raises(resp.ReplyError, match="BAD nope"):
        failing(keys=[], args=[])
    assert len(client.idle) == 1
    assert client.ping() is True


def test_a_connection_the_server_closed_is_replaced_once(redis_url: str, peer: t.Any) -> None:
    """As after a Redis restart: the kept connection is gone, the call still succeeds."""
    client = resp.Redis(redis_url, timeout=2)
    assert client.ping()
    (kept,) = client.idle
    peer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert client.set(name("after-kill"), "v", nx=True, ex=5) is True
    assert client.idle and client.idle[0] is not kept


def test_the_database_number_and_a_refused_auth(redis_url: str, peer: t.Any) -> None:
    base = redis_url.rsplit("/", 1)[0]
    key = name("db")
    assert resp.Redis(base + "/3", timeout=2).set(key, "3") is True
    assert peer.exists(key) == 0  # another database
    resp.Redis(base + "/3", timeout=2).delete(key)
    host = base.split("//", 1)[1]
    with pytest.raises(resp.RedisError, match="AUTH was refused"):
        resp.Redis(f"redis://:not-the-password@{host}/0", timeout=2).ping()


def test_a_forked_child_uses_its_own_connection(redis_url: str) -> None:
    client = resp.Redis(redis_url, timeout=2)
    assert client.ping()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new connection, the parent's left alone
        ok = client.ping() and client.inherited and client.idle[0] not in client.inherited
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert client.ping()  # the parent's connection still works


def test_a_client_dropped_in_a_reference_cycle_closes_its_sockets(redis_url: str) -> None:
    """An app torn down leaves its client in a cycle: the garbage collector must still find
    every kept socket closed (no ResourceWarning), whatever order it takes things apart in."""
    import gc
    import types
    import warnings
    import weakref

    sockets = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(5):
            app = types.SimpleNamespace()
            client = resp.Redis(redis_url, timeout=2)
            app.client, client.app = client, app  # type: ignore[attr-defined]
            assert client.ping()
            sockets.append(weakref.ref(client.idle[0].sock))
            del app, client
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    assert [ref() for ref in sockets] == [None] * 5  # collected, and closed before that


# --- against a scripted server ------------------------------------------------------------


class Scripted:
    """A TCP server on 127.0.0.1 that answers each connection with ``reply(data)``."""

    def __init__(self, reply: t.Callable[[bytes], bytes | None]) -> None:
        self.reply = reply
        self.received: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(65536)
                self.received.append(data)
                answer = self.reply(data)
                if answer is None:
                    time.sleep(3)  # says nothing
                else:
                    conn.sendall(answer)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted() -> t.Iterator[t.Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def make(reply: t.Callable[[bytes], bytes | None]) -> Scripted:
        servers.append(Scripted(reply))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_a_server_that_does_not_answer_costs_the_timeout_and_is_not_asked_again(
        scripted: t.Callable[..., Scripted]) -> None:
    server = scripted(lambda data: None)
    client = resp.Redis(server.url, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(resp.RedisError, match="no answer in time"):
        client.set("k", "v", nx=True, ex=5)
    assert time.monotonic() - start < 1.5
    assert server.received == [b"*6\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nNX\r\n$2\r\nEX\r\n"
                               b"$1\r\n5\r\n"]
    assert client.idle == []


@pytest.mark.parametrize("answer", [
    b"?what\r\n", b":12x\r\n", b"$5\r\nab\r\n", b"$99999999\r\n", b"*99999\r\n", b"+OK",
    b"*2\r\n:1\r\n",
])
def test_a_reply_that_is_not_resp_is_an_error_not_a_value(
        scripted: t.Callable[..., Scripted], answer: bytes) -> None:
    server = scripted(lambda data: answer)
    client = resp.Redis(server.url, timeout=0.5)
    with pytest.raises(resp.RedisError):
        client.hget("k", "f")
    assert client.idle == []


def test_a_new_connection_closed_without_a_reply_is_not_retried(
        scripted: t.Callable[..., Scripted]) -> None:
    server = scripted(lambda data: b"")
    with pytest.raises(resp.RedisError, match="closed"):
        resp.Redis(server.url, timeout=0.5).ping()
    assert len(server.received) == 1


def test_a_connection_long_idle_and_silently_dropped_is_pinged_then_replaced() -> None:
    """As behind a firewall that forgets idle connections without a word: the kept connection's
    PING gets no answer, so the call goes to a new connection instead of failing."""
    listener = socket.create_server(("127.0.0.1", 0))
    heard: list[list[bytes]] = []

    def serve() -> None:
        for number in (1, 2):
            conn, _ = listener.accept()
            heard.append([])
            threading.Thread(target=answer, args=(conn, number, heard[-1]), daemon=True).start()

    def answer(conn: socket.socket, number: int, log: list[bytes]) -> None:
        with conn:
            while data := conn.recv(65536):
                log.append(data)
                if number == 1 and len(log) > 2:
                    continue  # the dropped connection: silence from now on
                conn.sendall(b"+PONG\r\n" if b"PING" in data else b"$-1\r\n")

    threading.Thread(target=serve, daemon=True).start()
    client = resp.Redis(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", timeout=0.3)
    try:
        assert client.ping()
        assert client.hget("k", "f") is None  # used a moment ago: no PING first
        client.idle[0].idle_since -= resp.IDLE_CHECK + 1
        assert client.hget("k", "f") is None
        assert [b"PING" in d for d in heard[0]] == [True, False, True]  # no HGET sent there
        assert len(heard) == 2 and b"HGET" in heard[1][0]
    finally:
        client.close()
        listener.close()


def test_nobody_listening_is_an_error_quickly() -> None:
    from tests.conftest import free_port

    start = time.monotonic()
    with pytest.raises(resp.RedisError, match="cannot connect"):
        resp.Redis(f"redis://127.0.0.1:{free_port()}/0", timeout=2).ping()
    assert time.monotonic() - start < 1


# --- URLs -----------------------------------------------------------------------------------


def test_urls() -> None:
    c = resp.Redis("redis://user:p%40ss@cache.internal:6380/4", timeout=1)
    assert (c.host, c.port, c.db, c.username, c.password, c.tls) == (
        "cache.internal", 6380, 4, "user", "p@ss", None)
    c = resp.Redis("rediss://:secret@cache.internal", timeout=1)
    assert (c.port, c.db, c.username, c.password) == (6379, 0, None, "secret")
    assert c.tls is not None and c.tls.check_hostname
    c = resp.Redis("unix:///run/redis/redis.sock?db=2&password=pw", timeout=1)
    assert (c.path, c.db, c.password) == ("/run/redis/redis.sock", 2, "pw")


@pytest.mark.parametrize("url", ["redis://host:port/0", "redis://host/zero", "unix://",
                                 "http://host:6379"])
def test_an_unusable_url_stops_the_start_naming_the_setting(url: str) -> None:
    with pytest.raises(ConfigError, match="HEADLESSKEY_REDIS_URL: not a usable Redis URL"):
        connect("HEADLESSKEY_REDIS_URL", url)


def test_arguments_are_bytes_str_or_numbers() -> None:
    assert resp.encode(["SET", b"k", 1, 2.5]) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n$3\r\n2.5\r\n")
    for bad in (None, True, object()):
        with pytest.raises(TypeError):
            resp.encode(["SET", bad])
