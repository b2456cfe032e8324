"""Settings shared by the benchmark apps, all from the environment (set by ``bench/run.py``).

  JWT_ALGORITHM        HS256 | RS256 | ES256
  BENCH_KEYS           folder with hs256.secret (hex), rs256_private.pem, es256_private.pem
  JWT_ISSUER, JWT_AUDIENCE, JWT_TTL_SECONDS
  ARGON2_TIME_COST, ARGON2_MEMORY_KIB, ARGON2_PARALLELISM   (OWASP minimum: 2, 19456, 1)
"""

from __future__ import annotations

import os
import time
import typing as t
import uuid
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError
from argon2.exceptions import VerificationError
from cryptography.hazmat.primitives import serialization

ALGORITHM = os.environ.get("JWT_ALGORITHM", "HS256").upper()
KEYS = Path(os.environ.get("BENCH_KEYS", Path(__file__).resolve().parent.parent / ".work" / "keys"))
ISSUER = os.environ.get("JWT_ISSUER", "https://auth.example.test")
AUDIENCE = os.environ.get("JWT_AUDIENCE", "example-api")
TTL_SECONDS = int(os.environ.get("JWT_TTL_SECONDS", "3600"))

# Claims every token of the peer carries on top of the registered ones.
CUSTOM_CLAIMS: dict[str, t.Any] = {
    "scope": "read:items write:items",
    "roles": ["user", "editor"],
    "tenant_id": "t-1234",
    "email_verified": True,
}


def key_pems(algorithm: str = ALGORITHM) -> tuple[bytes, bytes]:
    """(signing, verifying) material: the HS256 secret twice, or the PEM private/public pair."""
    if algorithm == "HS256":
        secret = bytes.fromhex((KEYS / "hs256.secret").read_text().strip())
        return secret, secret
    stem = algorithm.lower()
    private = (KEYS / f"{stem}_private.pem").read_bytes()
    public = serialization.load_pem_private_key(private, password=None).public_key()
    return private, public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)


def standard_claims(subject: str) -> dict[str, t.Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": subject, "aud": AUDIENCE, "exp": now + TTL_SECONDS,
              "iat": now, "nbf": now, "jti": uuid.uuid4().hex}
    claims.update(CUSTOM_CLAIMS)
    return claims


password_hasher = PasswordHasher(
    time_cost=int(os.environ.get("ARGON2_TIME_COST", "2")),
    memory_cost=int(os.environ.get("ARGON2_MEMORY_KIB", "19456")),
    parallelism=int(os.environ.get("ARGON2_PARALLELISM", "1")),
)
DEMO_USER = "alice"
DEMO_PASSWORD = "correct horse battery staple"  # noqa: S105 - the benchmark user's
USERS = {DEMO_USER: password_hasher.hash(DEMO_PASSWORD)}
_DUMMY_HASH = password_hasher.hash("dummy-password-for-timing")


def check_password(username: str, password: str) -> bool:
    """argon2id verification, against a dummy hash for unknown users (same work either way)."""
    stored = USERS.get(username)
    try:
        password_hasher.verify(stored or _DUMMY_HASH, password or "")
    except (VerificationError, InvalidHashError):
        return False
    return stored is not None
