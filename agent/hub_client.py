"""A small client for the hub's signed site API (DESIGN §4).

Every call goes through one replaceable ``transport`` (``urllib`` by default), so tests and
sites can hand in canned answers without sockets, the way ``httpx.MockTransport`` works.
"""

from __future__ import annotations

import http.client
import json
import typing as t
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote
from urllib.parse import urlsplit

from . import signing
from .deadline import Deadline

Transport = t.Callable[[str, str, dict[str, str], bytes, float], "Reply"]
MAX_REPLY = 4 * 1024 * 1024


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> t.Any:
        return json.loads(self.body)

    def object(self) -> dict[str, t.Any] | None:
        """The body as a JSON object; None for anything else (not JSON, not UTF-8, another
        type, nested beyond the stack)."""
        try:
            body = self.json()
        except (ValueError, RecursionError):
            return None
        return body if isinstance(body, dict) else None


class HubUnavailable(Exception):
    """The hub did not answer, or answered with an error; ``status`` is 0 when unreachable."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: t.Any, **kwargs: t.Any) -> None:
        return None  # a redirect is an answer, never followed with our signature



def urllib_transport(method: str, url: str, headers: dict[str, str], body: bytes,
                     timeout: float) -> Reply:
    """One HTTP(S) request, ``timeout`` seconds at most in all; redirects are answers, never
    followed. Other URL schemes (file:, ftp:, data:, which urllib would open too) are
    refused."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url, data=body or None, headers=headers, method=method)
    # The timeout bounds the whole call: a hub (or whatever answers at its address) that
    # drips its answer is cut off there, not allowed a timeout per read.
    deadline = Deadline(timeout)
    with deadline:
        try:
            with deadline.opener(_NoRedirect()).open(request, timeout=timeout) as response:
                reply = Reply(response.status, dict(response.headers), response.read(MAX_REPLY))
        except urllib.error.HTTPError as exc:
            reply = Reply(exc.code, dict(exc.headers or {}), exc.read(MAX_REPLY))
    if deadline.fired:  # an answer cut short at the deadline may have looked complete
        raise TimeoutError("the hub did not answer in time")
    return reply


class HubClient:
    """Signed calls from this site to its hub."""

    def __init__(self, url: str, site_key: str, secret: bytes, *,
                 transport: Transport | None = None, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"not a hub URL: {url!r}")
        self.url = url.rstrip("/")
        self.site_key = site_key
        self._secret = secret
        self._transport = transport or urllib_transport
        self.timeout = timeout

    def call(self, method: str, path: str, payload: t.Any = None) -> Reply:
        """Send one signed request; raise :class:`HubUnavailable` unless the hub answered 2xx."""
        body = json.dumps(payload, separators=(",", ":")).encode() if payload is not None else b""
        full_path = urlsplit(self.url).path.rstrip("/") + path
        headers = signing.sign_request(self._secret, self.site_key, method, full_path, "", body)
        headers["User-Agent"] = "HeadlessKey-agent"
        if body:
            headers["Content-Type"] = "application/json"
        try:
            reply = self._transport(method, self.url + path, headers, body, self.timeout)
        except (OSError, http.client.HTTPException) as exc:
            # Not reached, or what answered does not speak HTTP (a bad status line, a header
            # line past 64 KiB, a body cut short): the hub is down either way.
            raise HubUnavailable(f"hub unreachable: {type(exc).__name__}") from None
        if not 200 <= reply.status < 300:
            code = str((reply.object() or {}).get("code", ""))
            raise HubUnavailable(f"hub answered {reply.status} {code}".strip(), reply.status, code)
        return reply

    def directory(self) -> dict[str, t.Any]:
        """The directory; an answer of another shape is no directory (it is never cached in
        place of the last good one): see :func:`_is_directory`."""
        body = _object(self.call("GET", "/api/v1/directory"))
        if not _is_directory(body):
            raise HubUnavailable("hub answered without a directory", 200)
        return body

    def register_key(self, jwk: dict[str, t.Any], status: str = "active") -> dict[str, t.Any]:
        return _object(self.call("POST", "/api/v1/keys", {"jwk": jwk, "status": status}))

    def retire_key(self, kid: str) -> None:
        self.call("DELETE", "/api/v1/keys/" + quote(kid, safe=""))

    def rotate_secret(self) -> dict[str, t.Any]:
        """A new secret for this site; the hub keeps the old ones for ``grace_seconds``."""
        return _object(self.call("POST", "/api/v1/secret/rotate", {}))


def _object(reply: Reply) -> dict[str, t.Any]:
    """A 2xx answer's JSON object, or :class:`HubUnavailable` (a proxy's HTML page, say)."""
    body = reply.object()
    if body is None:
        raise HubUnavailable("hub answered without a JSON object", reply.status)
    return body


def _is_directory(body: dict[str, t.Any]) -> bool:
    """Whether ``body`` has a directory's shape: this site, peers with a site key, an issuer and
    lists of keys and exchange keys, and lists of logouts and redeliveries where given."""
    peers = body.get("peers")
    return (isinstance(body.get("site"), dict) and isinstance(peers, list)
            and all(isinstance(peer, dict) and isinstance(peer.get("site_key"), str)
                    and isinstance(peer.get("issuer"), str)
                    and isinstance(peer.get("keys"), list)
                    and isinstance(peer.get("exchange_keys"), list) for peer in peers)
            and all(isinstance(body.get(name, []), list)
                    for name in ("logouts", "webhook_redeliveries")))
