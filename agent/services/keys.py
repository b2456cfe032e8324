"""Key material: purpose keys derived from the site secret, and the access-token key ring.

RFC 8725 §3.1: each key is used with exactly one algorithm. A :class:`SigningKey` binds a
``kid`` to one algorithm and to parsed key objects (parsed once; PyJWT handed a PEM string
would re-parse it on every call). Verification looks the key up by ``kid`` and accepts only
that key's algorithm, whatever the token's header claims.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import secrets
import typing as t
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError


def derive_key(secret: bytes, purpose: str, length: int = 32) -> bytes:
    """Derive an independent key for one purpose from the master secret (HKDF-SHA256, RFC 5869)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=b"headlesskey|" + purpose.encode()
    ).derive(secret)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ensure_key_file(path: Path, make: t.Callable[[], bytes]) -> Path:
    """Create ``path`` (mode 0600) with ``make()`` unless it exists; safe across processes.

    Several workers starting at once all end up with the content of whichever created it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return path
    # Written under a private name, then linked into place: the file appears whole or not at
    # all, so a process starting meanwhile never reads it half written.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(make())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process won: keep its key
    finally:
        temporary.unlink(missing_ok=True)
    return path


def generate_private_key_pem(algorithm: str) -> bytes:
    """A fresh PEM (PKCS#8) private key: RSA 3072 for RS256, P-256 for ES256."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    elif algorithm == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"no private key for {algorithm}")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class SigningKey:
    """One key bound to one algorithm."""

    kid: str
    alg: str
    signing_key: t.Any = field(repr=False)
    verify_key: t.Any = field(repr=False)
    public_jwk: dict[str, t.Any] | None = None  # None for HMAC keys: never published

    @classmethod
    def hmac(cls, secret: bytes) -> SigningKey:
        key = derive_key(secret, "access-token-hs256")
        # The kid names the key without revealing it: a separate derivation, truncated.
        kid = b64url(derive_key(secret, "access-token-hs256-kid", 12))
        return cls(kid=kid, alg="HS256", signing_key=key, verify_key=key)

    @classmethod
    def from_pem(cls, alg: str, pem: bytes) -> SigningKey:
        """The key of a PEM private key for ``alg``, or :class:`ConfigError`. Parsed once per
        process: loading an RSA key checks its numbers, about 0.15 s for 3072 bits, and a start
        reads the configured key twice (to name it, then as stored)."""
        return _from_pem(alg, bytes(pem))


@functools.lru_cache(maxsize=32)
def _from_pem(alg: str, pem: bytes) -> SigningKey:
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"HEADLESSKEY_PRIVATE_KEY_FILE: not a PEM private key ({exc})") from None
    if alg == "RS256":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ConfigError("HEADLESSKEY_PRIVATE_KEY_FILE: RS256 needs an RSA key")
        if private.key_size < 2048:
            raise ConfigError("HEADLESSKEY_PRIVATE_KEY_FILE: RSA keys must be >= 2048 bits")
    elif alg == "ES256":
        if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
            private.curve, ec.SECP256R1
        ):
            raise ConfigError("HEADLESSKEY_PRIVATE_KEY_FILE: ES256 needs a P-256 key")
    else:
        raise ConfigError(f"HEADLESSKEY_ALGORITHM: {alg} takes no PEM key")
    public = private.public_key()
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(public))
    kid = jwk_thumbprint(jwk)
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return SigningKey(kid=kid, alg=alg, signing_key=private, verify_key=public,
                      public_jwk=jwk)


def jwk_thumbprint(jwk: dict[str, t.Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256), used as the ``kid`` of asymmetric keys."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


class KeyRing:
    """The keys that verify access tokens, and the one that signs new ones."""

    def __init__(self, active: SigningKey, others: t.Iterable[SigningKey] = ()) -> None:
        self._active = active
        self._by_kid = {k.kid: k for k in (active, *others)}

    @property
    def active(self) -> SigningKey:
        """The key that signs new tokens."""
        return self._active

    def get(self, kid: str) -> SigningKey | None:
        return self._by_kid.get(kid)

    def jwks(self) -> dict[str, t.Any]:
        """RFC 7517 JWK Set of the public keys (HMAC keys are never published)."""
        return {"keys": [k.public_jwk for k in self._by_kid.values() if k.public_jwk]}
