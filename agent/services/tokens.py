"""Access tokens (RFC 9068 ``at+jwt``): minting and the strict verification of every request.

Verification order, each step refusing with the same generic ``invalid_token``:

1. size and shape: three base64url segments, no padding, at most 8 KiB, a header segment of at
   most 512 characters (RFC 8725 §3.7);
2. header: a JSON object with ``typ`` exactly ``at+jwt`` (RFC 8725 §3.11) so no other kind of
   token minted here is ever taken for an access token, a string ``kid`` naming a key of this
   site, ``alg`` equal to that key's algorithm, no ``crit`` (we understand no extension,
   RFC 7515 §4.1.11), and no ``b64``, ``cty`` (nested tokens) or ``zip``;
3. signature with that key and only its algorithm (PyJWT's primitive for it), canonical
   base64url (RFC 7515 §2). A token that passed steps 1 to 3 in this process, and whose ``kid``
   still names the very key object that verified it, skips them (:class:`VerifiedTokens`, as
   API gateways cache verified JWTs); step 4 runs on every request;
4. claims: a JSON object; ``exp``, ``nbf``, ``iat`` numbers (with leeway), ``iss`` exact,
   ``aud`` the one configured string (and absent, not even empty, when none is), string
   ``sub``, ``jti``, ``sid``. These are PyJWT's checks with the options we used to pass it,
   written out so that a request pays for one base64 pass and one JSON parse.

The session check (revocation) is the caller's: see :mod:`agent.services.sessions`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import secrets
import threading
import time
import typing as t
from dataclasses import dataclass

import jwt

from ..errors import InvalidToken
from .keys import KeyRing
from .keys import SigningKey
from .keys import b64url

ACCESS_TYP = "at+jwt"
MAX_TOKEN_LENGTH = 8192
MAX_HEADER_LENGTH = 512  # ours are about 100 characters (joserfc's default limit)
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_UNSUPPORTED = frozenset({"b64", "cty", "zip"})  # header parameters we never mint nor follow
REQUIRED = ("exp", "iat", "nbf", "iss", "sub", "jti", "sid")
# PyJWT's signature primitives by name, built once (verification looks one up per request).
_ALGORITHMS = jwt.algorithms.get_default_algorithms()


class VerifiedTokens:
    """Tokens whose header and signature this process checked, each with the key that verified
    it and the JSON text of its claims.

    A client sends its access token with every call for minutes, and an RS256 or ES256
    verification costs more than the rest of a request's checks together; the header's and
    payload's decoding are most of what is left. A hit counts only while the ring still holds
    the very key object that verified the token under its ``kid``, so a key retired or rotated
    away stops every token it signed at once. The claims are parsed and checked again on every
    request. Bounded: the oldest entries go first. Only tokens that passed every check up to
    the claims are kept, so forged tokens cannot fill it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict[str, tuple[str, SigningKey, str]] = {}
        self._lock = threading.Lock()

    def claims_text(self, token: str, ring: KeyRing) -> str | None:
        """The token's claims as JSON text if it was verified with the key the ring holds now."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        kid, key, text = entry
        return text if ring.get(kid) is key else None

    def add(self, token: str, kid: str, key: SigningKey, text: str) -> None:
        with self._lock:
            while len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            self._entries[token] = (kid, key, text)


# About 2 MB at the most (tokens of a few hundred bytes, and their claims).
verified_tokens = VerifiedTokens(2048)


@dataclass(frozen=True)
class AccessToken:
    token: str
    jti: str
    iat: int
    exp: int


def new_jti() -> str:
    return secrets.token_urlsafe(16)


def mint_access_token(
    ring: KeyRing,
    *,
    issuer: str,
    audience: str | None,
    user_id: int,
    user_login: str,
    roles: list[str],
    sid: str,
    jti: str,
    iat: int,
    exp: int,
    extra: dict[str, t.Any] | None = None,
) -> str:
    """Sign an access token with the ring's active key."""
    key = ring.active
    claims: dict[str, t.Any] = dict(extra or {})
    claims.update(
        {
            "iss": issuer,
            "sub": str(user_id),
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "jti": jti,
            "sid": sid,
            "roles": list(roles),
            # The plugin's payload, kept so frontends that read it work unchanged.
            "data": {"ID": user_id, "user_login": user_login},
        }
    )
    # ``aud`` is the configured one or none at all, whatever a filter put in ``extra``.
    claims.pop("aud", None)
    if audience:
        claims["aud"] = audience
    # What jwt.encode makes of the same claims, byte for byte (tests hold it to that), signed
    # by PyJWT's primitive for the key's algorithm; without its generic checks of key and
    # headers, which cost a login about 0.1 ms with the caches cold after the password hash.
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{_header_segment(key.kid, key.alg)}.{payload}"
    signature = _ALGORITHMS[key.alg].sign(signing_input.encode(), key.signing_key)
    return f"{signing_input}.{b64url(signature)}"


@functools.lru_cache(maxsize=16)
def _header_segment(kid: str, alg: str) -> str:
    """The header of our access tokens, as jwt.encode writes it (keys sorted)."""
    header = {"alg": alg, "kid": kid, "typ": ACCESS_TYP}
    return b64url(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _canonical(segment: str) -> bytes | None:
    """The segment's bytes if it is their one canonical encoding (RFC 7515 §2), else None."""
    try:
        raw = _b64decode(segment)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == segment else None


def _verify_signature(key: SigningKey, header: str, payload: str, signature: str) -> None:
    """PyJWT's primitive for exactly the key's algorithm (HMAC compared in constant time)."""
    raw = _canonical(signature)
    if raw is None:
        raise InvalidToken()
    try:
        valid = _ALGORITHMS[key.alg].verify(f"{header}.{payload}".encode(), key.verify_key, raw)
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise InvalidToken()


def _numeric_date(value: t.Any) -> int:
    """A NumericDate claim (RFC 7519 §2): a finite JSON number, not a string nor a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidToken()
    return int(value)


def _verified_claims_text(token: str, ring: KeyRing) -> str:
    """Steps 1 to 3: the claims' JSON text of a token whose shape, header and signature hold."""
    if len(token) > MAX_TOKEN_LENGTH or not _SHAPE.fullmatch(token):
        raise InvalidToken()
    header_segment, payload_segment, signature_segment = token.split(".")
    if len(header_segment) > MAX_HEADER_LENGTH:
        raise InvalidToken()
    try:
        header = json.loads(_b64decode(header_segment))
    except (ValueError, binascii.Error, RecursionError):
        raise InvalidToken() from None
    if not isinstance(header, dict) or header.get("typ") != ACCESS_TYP or "crit" in header:
        raise InvalidToken()
    kid = header.get("kid")
    if not isinstance(kid, str) or (key := ring.get(kid)) is None:
        raise InvalidToken()
    # The algorithm comes from our key, never from the token (RFC 8725 §2.1, §3.1). The
    # payload is always the claims, plain base64url JSON: an RFC 7797 "b64" header, a nested
    # token ("cty", RFC 7519 §5.2) and compression ("zip", a JWE parameter) are refused.
    if header.get("alg") != key.alg or not _UNSUPPORTED.isdisjoint(header):
        raise InvalidToken()
    try:
        text = _b64decode(payload_segment).decode()  # JSON in UTF-8 (RFC 7519 §7.2, RFC 8259)
    except (binascii.Error, ValueError):
        raise InvalidToken() from None
    _verify_signature(key, header_segment, payload_segment, signature_segment)
    verified_tokens.add(token, kid, key, text)
    return text


def verify_access_token(
    token: t.Any,
    ring: KeyRing,
    *,
    issuer: str,
    audience: str | None,
    leeway: int,
) -> dict[str, t.Any]:
    """Return the claims of a valid access token of this site, or raise :class:`InvalidToken`."""
    if not isinstance(token, str):
        raise InvalidToken()
    payload = verified_tokens.claims_text(token, ring) or _verified_claims_text(token, ring)
    try:
        claims: dict[str, t.Any] = json.loads(payload)
    except (ValueError, RecursionError):
        raise InvalidToken() from None
    if not isinstance(claims, dict) or any(claims.get(name) is None for name in REQUIRED):
        raise InvalidToken()
    now = time.time()
    if (
        _numeric_date(claims["iat"]) > now + leeway
        or _numeric_date(claims["nbf"]) > now + leeway
        or _numeric_date(claims["exp"]) <= now - leeway
    ):
        raise InvalidToken()
    if not isinstance(claims["iss"], str) or claims["iss"] != issuer:  # exact string match
        raise InvalidToken()
    aud = claims.get("aud")
    if audience is None:
        # A token naming any audience, even an empty or null one, is not one of ours: we
        # mint no ``aud`` when none is configured.
        if "aud" in claims:
            raise InvalidToken()
    elif not isinstance(aud, str) or aud != audience:  # the one string, not a list holding it
        raise InvalidToken()
    for name in ("sub", "jti", "sid"):
        if not isinstance(claims.get(name), str) or not claims[name]:
            raise InvalidToken()
    if not isinstance(claims.get("roles", []), list):
        raise InvalidToken()
    return claims
