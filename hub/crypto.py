"""Hub key material: the master key for secrets at rest, site secrets, the hub signing key.

The only module that touches hub key material. Site secrets are 32 random bytes, stored
encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) under the master key;
the master key lives outside the database (instance file mode 0600, or an environment
variable), so a copy of the database alone reveals no secret.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import typing as t
from pathlib import Path

import jwt
from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken
from cryptography.fernet import MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.services.keys import generate_private_key_pem
from agent.services.keys import jwk_thumbprint

SECRET_BYTES = 32
SECRET_PREFIX = "hks_"  # noqa: S105 - the public prefix of generated site secrets


class MasterKeyError(Exception):
    pass


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never briefly readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def new_master_key() -> bytes:
    return Fernet.generate_key()


class Vault:
    """Encrypts and decrypts secrets at rest; the first key encrypts, all keys decrypt."""

    def __init__(self, keys: t.Sequence[bytes]) -> None:
        if not keys:
            raise MasterKeyError("no master key")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
            self._first = base64.urlsafe_b64decode(keys[0])
        except (ValueError, TypeError) as exc:
            raise MasterKeyError(f"not a Fernet key ({exc})") from None

    def derive(self, info: bytes) -> bytes:
        """A 32-byte key for one purpose, derived (HKDF-SHA256) from the current master key."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._first)

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._fernet.encrypt(plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        try:
            return self._fernet.decrypt(ciphertext)
        except InvalidToken:
            raise MasterKeyError("a stored secret does not decrypt with the master key") from None


def new_site_secret() -> tuple[bytes, str]:
    """A fresh site secret: the raw bytes, and the text form shown once to the admin."""
    raw = secrets.token_bytes(SECRET_BYTES)
    return raw, SECRET_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def parse_site_secret(text: str) -> bytes:
    """The raw bytes of a secret in its text form (``hks_...``); raises ValueError."""
    if not text.startswith(SECRET_PREFIX):
        raise ValueError("a site secret starts with hks_")
    body = text[len(SECRET_PREFIX):]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    if len(raw) < SECRET_BYTES:
        raise ValueError("a site secret has at least 32 bytes")
    return raw


def new_hub_key() -> tuple[str, bytes, dict[str, t.Any]]:
    """A fresh ES256 hub signing key: (kid, private PEM, public JWK)."""
    pem = generate_private_key_pem("ES256")
    private = serialization.load_pem_private_key(pem, password=None)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))  # type: ignore[arg-type]
    kid = jwk_thumbprint(jwk)
    jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
    return kid, pem, jwk
