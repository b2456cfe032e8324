"""Access tokens (RFC 9068 ``at+jwt``): minting and the strict verification of every request.

Verification order, each step refusing with the same generic ``invalid_token``:

1. size and shape: three base64url segments, no padding, at most 8 KiB (RFC 8725 §3.7);
2. header: a JSON object with ``typ`` exactly ``at+jwt`` (RFC 8725 §3.11) so no other kind of
   token minted here is ever taken for an access token, a string ``kid`` naming a key of this
   site, ``alg`` equal to that key's algorithm, and no ``crit`` (we understand no extension,
   RFC 7515 §4.1.11);
3. signature with that key and only its algorithm, canonical base64url (RFC 7515 §2);
4. claims: ``exp``, ``nbf``, ``iat`` (with leeway), ``iss`` exact, ``aud`` when configured,
   string ``sub``, ``jti`` and ``sid``.

The session check (revocation) is the caller's: see :mod:`agent.services.sessions`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import typing as t
from dataclasses import dataclass

import jwt

from ..errors import InvalidToken
from .keys import KeyRing

ACCESS_TYP = "at+jwt"
MAX_TOKEN_LENGTH = 8192
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


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
    if audience:
        claims["aud"] = audience
    return jwt.encode(
        claims, key.signing_key, algorithm=key.alg, headers={"kid": key.kid, "typ": ACCESS_TYP}
    )


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _canonical(segment: str) -> bool:
    """True when the segment is the one canonical encoding of its bytes (RFC 7515 §2)."""
    try:
        raw = _b64decode(segment)
    except (binascii.Error, ValueError):
        return False
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == segment


def verify_access_token(
    token: t.Any,
    ring: KeyRing,
    *,
    issuer: str,
    audience: str | None,
    leeway: int,
) -> dict[str, t.Any]:
    """Return the claims of a valid access token of this site, or raise :class:`InvalidToken`."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not _SHAPE.fullmatch(token):
        raise InvalidToken()
    header_segment, _, signature_segment = token.split(".")
    if len(header_segment) > 1024 or not _canonical(signature_segment):
        raise InvalidToken()
    try:
        header = json.loads(_b64decode(header_segment))
    except (ValueError, binascii.Error, RecursionError):
        raise InvalidToken() from None
    if not isinstance(header, dict) or header.get("typ") != ACCESS_TYP or "crit" in header:
        raise InvalidToken()
    kid = header.get("kid")
    key = ring.get(kid) if isinstance(kid, str) else None
    # The algorithm comes from our key, never from the token (RFC 8725 §2.1, §3.1).
    if key is None or header.get("alg") != key.alg:
        raise InvalidToken()
    try:
        claims: dict[str, t.Any] = jwt.decode(
            token,
            key.verify_key,
            algorithms=[key.alg],  # exactly one: the key's
            issuer=issuer,  # exact string match (no prefix, no URL canonicalisation)
            audience=audience,  # when None, a token that carries `aud` is refused
            leeway=leeway,
            options={
                "require": ["exp", "iat", "nbf", "iss", "sub", "jti", "sid"],
                "verify_signature": True,
                "verify_exp": True,
                "verify_nbf": True,
                "verify_iat": True,
                "verify_iss": True,
                "verify_aud": True,
                "strict_aud": True,  # `aud` must be the one string, not a list containing it
                "verify_sub": True,
                "verify_jti": True,
                "enforce_minimum_key_length": True,
            },
        )
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
        raise InvalidToken() from None
    for name in ("sub", "jti", "sid"):
        if not isinstance(claims.get(name), str) or not claims[name]:
            raise InvalidToken()
    if not isinstance(claims.get("roles", []), list):
        raise InvalidToken()
    return claims
