"""HMAC request signing between an agent and the hub (both sides import this module).

Every call from an agent to the hub carries::

    X-HK-Site:      <site_key>
    X-HK-Timestamp: <unix seconds>
    X-HK-Nonce:     <random, 16-64 url-safe characters>
    X-HK-Signature: v1=<hex HMAC-SHA256(secret, canonical)>

where ``canonical`` is::

    "v1\\n" METHOD "\\n" path "\\n" sorted-encoded-query "\\n" site_key "\\n" timestamp "\\n"
    nonce "\\n" hex(sha256(raw body))

The receiver verifies over the raw body bytes before parsing them, rejects a clock skew over
300 s and a nonce seen before (the caller keeps the nonce store), and compares full-length
digests in constant time. Several secrets may be valid at once (rotation grace period): the
signature may match any of them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import typing as t
from dataclasses import dataclass
from urllib.parse import parse_qsl
from urllib.parse import urlencode

VERSION = "v1"
MAX_SKEW = 300
HEADER_SITE = "X-HK-Site"
HEADER_TIMESTAMP = "X-HK-Timestamp"
HEADER_NONCE = "X-HK-Nonce"
HEADER_SIGNATURE = "X-HK-Signature"
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_SITE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SIGNATURE = re.compile(r"v1=([0-9a-f]{64})")


class SignatureError(Exception):
    """The request is unsigned, malformed, skewed or badly signed; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def canonical_query(query: str) -> str:
    """The query string with its pairs sorted and percent-encoded the one canonical way."""
    return urlencode(sorted(parse_qsl(query, keep_blank_values=True)))


def canonical(
    method: str, path: str, query: str, site_key: str, timestamp: str, nonce: str, body: bytes
) -> bytes:
    return "\n".join(
        [
            VERSION,
            method.upper(),
            path,
            canonical_query(query),
            site_key,
            timestamp,
            nonce,
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()


def sign(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_request(
    secret: bytes,
    site_key: str,
    method: str,
    path: str,
    query: str = "",
    body: bytes = b"",
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four headers that sign one request."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = nonce or secrets.token_urlsafe(18)
    message = canonical(method, path, query, site_key, timestamp, nonce, body)
    return {
        HEADER_SITE: site_key,
        HEADER_TIMESTAMP: timestamp,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: f"{VERSION}={sign(secret, message)}",
    }


@dataclass(frozen=True)
class SignedRequest:
    """The parsed signing headers of a request (not yet verified)."""

    site_key: str
    timestamp: int
    nonce: str
    digest: str


def parse_headers(headers: t.Mapping[str, str], *, now: float | None = None) -> SignedRequest:
    """Check the headers' presence, shape and clock skew; raise :class:`SignatureError`."""
    site_key = headers.get(HEADER_SITE, "")
    timestamp = headers.get(HEADER_TIMESTAMP, "")
    nonce = headers.get(HEADER_NONCE, "")
    signature = headers.get(HEADER_SIGNATURE, "")
    if not (site_key and timestamp and nonce and signature):
        raise SignatureError("unsigned")
    match = _SIGNATURE.fullmatch(signature)
    if (
        not _SITE_KEY.fullmatch(site_key)
        or not _NONCE.fullmatch(nonce)
        or not (timestamp.isascii() and timestamp.isdigit())
        or len(timestamp) > 12
        or match is None
    ):
        raise SignatureError("malformed")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > MAX_SKEW:
        raise SignatureError("skewed")
    return SignedRequest(site_key, int(timestamp), nonce, match.group(1))


def verify(
    signed: SignedRequest,
    secrets_: t.Iterable[bytes],
    method: str,
    path: str,
    query: str,
    body: bytes,
) -> bool:
    """True when the signature matches one of ``secrets_`` (each compared in constant time)."""
    message = canonical(method, path, query, signed.site_key, str(signed.timestamp),
                        signed.nonce, body)
    ok = False
    for secret in secrets_:
        # Check every candidate: the time taken does not tell which secret matched.
        ok |= hmac.compare_digest(sign(secret, message), signed.digest)
    return ok


def pairwise_key(secret_a: bytes, site_a: str, site_b: str) -> bytes:
    """K_AB = HMAC-SHA256(secret_A, "hk-sso-v1|A|B"): A's SSO MAC key towards B (DESIGN §5)."""
    return hmac.new(secret_a, f"hk-sso-v1|{site_a}|{site_b}".encode(), hashlib.sha256).digest()
