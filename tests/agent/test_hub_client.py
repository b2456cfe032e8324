"""The agent's transport to its hub: http(s) only, and a redirect is an answer, never followed
(with the request's signature) to wherever it points; an answer that is not a directory is the
hub unavailable."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import typing as t
from pathlib import Path

import pytest

from agent.hub_client import HubClient
from agent.hub_client import HubUnavailable
from agent.hub_client import Reply
from agent.hub_client import urllib_transport
from tests.conftest import SERVER_POLL
from tests.conftest import answering


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def server() -> t.Iterator[tuple[str, list[str]]]:
    """A local HTTP server: ``/moved`` redirects to ``/target``; the paths it was asked for."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/target")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *args: t.Any) -> None:
            pass

    httpd = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": SERVER_POLL},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://hub.example.com/",
                                 "data:,hello", "hub.example.com", "https://"])
def test_a_hub_url_that_is_not_http_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="not a hub URL"):
        HubClient(url, "site-key", b"s" * 32)


def test_the_transport_opens_no_file_url(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the hub")
    with pytest.raises(ValueError, match="not an http"):
        urllib_transport("GET", secret.as_uri(), {}, b"", 5)


def test_a_redirect_is_returned_not_followed(server: tuple[str, list[str]]) -> None:
    base, seen = server
    reply = urllib_transport("GET", base + "/moved", {}, b"", 5)
    assert reply.status == 302 and reply.headers["Location"] == "/target"
    assert seen == ["/moved"]
    reply = urllib_transport("GET", base + "/target", {}, b"", 5)
    assert reply.status == 200 and reply.json() == {"ok": True}


def canned(status: int, body: bytes) -> t.Callable[..., Reply]:
    def transport(method: str, url: str, headers: dict[str, str], data: bytes,
                  timeout: float) -> Reply:
        return Reply(status, {"Content-Type": "application/json"}, body)
    return transport


def rewrite(path: str, edit: t.Callable[[bytes], bytes]) -> t.Callable[..., Reply]:
    """Passes requests to the hub over HTTP; its 2xx answers to ``path`` get ``edit(body)``."""
    def transport(method: str, url: str, headers: dict[str, str], data: bytes,
                  timeout: float) -> Reply:
        reply = urllib_transport(method, url, headers, data, timeout)
        if url.endswith(path) and 200 <= reply.status < 300:
            return Reply(reply.status, reply.headers, edit(reply.body))
        return reply
    return transport


PEER = {"site_key": "docs", "issuer": "https://docs.example", "keys": [], "exchange_keys": []}
NESTED = b"[" * 100_000 + b"]" * 100_000

NOT_A_DIRECTORY = {
    "an HTML page": b"<html>502 Bad Gateway</html>",
    "no UTF-8": b"\xff\xfe",
    "JSON nested beyond the stack": NESTED,
    "a list": b"[]",
    "another object": b'{"sites": "x"}',
    "a peer without an issuer": {"site": {}, "peers": [dict(PEER, issuer=None)]},
    "a peer whose keys are no list": {"site": {}, "peers": [dict(PEER, keys={})]},
    "exchange keys that are no list": {"site": {}, "peers": [dict(PEER, exchange_keys="ab")]},
    "a site key that is no string": {"site": {}, "peers": [dict(PEER, site_key=7)]},
    "logouts that are no list": {"site": {}, "peers": [], "logouts": 5},
    "redeliveries that are no list": {"site": {}, "peers": [], "webhook_redeliveries": "x"},
}


@pytest.mark.parametrize("body", NOT_A_DIRECTORY.values(), ids=list(NOT_A_DIRECTORY))
def test_an_answer_that_is_no_directory_is_the_hub_unavailable(body: t.Any) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    hub = HubClient("https://hub.example", "site-key", b"s" * 32, transport=canned(200, raw))
    with pytest.raises(HubUnavailable):
        hub.directory()


def test_a_directory_is_returned() -> None:
    body = {"site": {}, "peers": [PEER], "logouts": [], "webhook_redeliveries": []}
    hub = HubClient("https://hub.example", "site-key", b"s" * 32,
                    transport=canned(200, json.dumps(body).encode()))
    assert hub.directory() == body


def test_an_error_answer_nested_beyond_the_stack_is_the_hub_unavailable() -> None:
    hub = HubClient("https://hub.example", "site-key", b"s" * 32, transport=canned(502, NESTED))
    with pytest.raises(HubUnavailable) as raised:
        hub.call("GET", "/api/v1/directory")
    assert raised.value.status == 502


def drip(conn: socket.socket, stop: threading.Event) -> None:
    """Send a byte of the answer's headers (or, asked for ``/body``, of a 100-byte body) every
    0.1 s for 8 s: no single read ever times out."""
    path = conn.recv(65536).split(b" ")[1]
    head = b"HTTP/1.1 200 OK\r\n"
    head += b"Content-Length: 100\r\n\r\n{" if path == b"/body" else b"X-Slow: "
    conn.sendall(head)
    for _ in range(80):
        if stop.wait(0.1):
            return
        conn.sendall(b" ")


@pytest.mark.parametrize("path", ["/headers", "/body"])
def test_a_hub_that_drips_its_answer_is_cut_off_at_the_timeout(path: str) -> None:
    """The client's timeout bounds the whole call, not each read: a hub (or whatever answers at
    its address) sending a byte every 0.1 s held a directory fetch, and the requests waiting on
    it, for as long as it kept sending."""
    with answering(drip) as base:
        client = HubClient(base + path, "site-key", b"s" * 32, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(HubUnavailable, match="unreachable") as raised:
            client.directory()
        took = time.monotonic() - started
    assert raised.value.status == 0
    assert 0.9 <= took < 2.5, took
