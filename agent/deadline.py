"""An outgoing HTTP request bounded as a whole, not read by read (webhooks, the hub client).

A socket's timeout bounds each read, not the whole answer: a server sending a byte a second
would hold the caller for as long as it liked. :class:`Deadline` shuts the request's connection
down when its time is up; the read under way then ends at once. A connection made after the
deadline (a slow name lookup, which no socket timeout covers) is refused as soon as it is made.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import urllib.request


class Deadline:
    """``with deadline: deadline.opener(...).open(request, timeout=...)``; ``fired`` tells
    whether the time ran out (an answer cut short there may look complete: check it)."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._connection: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def opener(self, *handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
        """An opener whose HTTP(S) connections this deadline ends, with ``handlers`` added."""
        deadline = self

        class _Connection(http.client.HTTPConnection):
            def connect(self) -> None:
                deadline._connection = self
                super().connect()
                deadline._made(self.sock)

        class _TLSConnection(http.client.HTTPSConnection):
            def connect(self) -> None:
                deadline._connection = self
                super().connect()
                deadline._made(self.sock)

        class _HTTP(urllib.request.HTTPHandler):
            def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(_Connection, req)

        class _HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(_TLSConnection, req)

        return urllib.request.build_opener(*handlers, _HTTP, _HTTPS)

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def _made(self, sock: socket.socket) -> None:
        self._sock = sock  # urllib lets go of conn.sock once answered
        if self.fired:
            raise TimeoutError("the deadline passed while connecting")

    def _fire(self) -> None:
        self.fired = True
        sock = self._sock or (self._connection.sock if self._connection is not None else None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
