"""The agent's transport to its hub: http(s) only, and a redirect is an answer, never followed
(with the request's signature) to wherever it points."""

from __future__ import annotations

import http.server
import threading
import typing as t
from pathlib import Path

import pytest

from agent.hub_client import HubClient
from agent.hub_client import urllib_transport


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
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
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
