"""Forging JWS compact tokens for the JWT verification cases (SECURITY.md §1).

Everything an attacker (or, for the controls, the site itself) needs to build a token by hand:
base64url segments, HMAC / RSA / ECDSA signatures over any header and payload bytes, attacker
key pairs, and the site's own access-token key read from its instance (the "test build" signer
that lets a test produce a correctly signed token carrying a hostile header or claim).
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import time
import typing as t
from dataclasses import dataclass
from functools import cache

import jwt
import requests
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.services.keys import derive_key
from tests.integration.test_sso import Agent

ALGORITHMS = jwt.algorithms.get_default_algorithms()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def enc(value: t.Any) -> str:
    """A JSON value as a base64url segment (compact separators)."""
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def split(token: str) -> tuple[dict[str, t.Any], dict[str, t.Any], bytes]:
    """Header, claims and raw signature of a compact JWS (not verified)."""
    h, p, s = token.split(".")
    return json.loads(b64d(h)), json.loads(b64d(p)), b64d(s)


def signed(header: t.Any, claims: t.Any, alg: str, key: t.Any) -> str:
    """``header.claims.signature`` with ``alg``'s primitive and ``key``, whatever the header
    says (PyJWT's ``sign`` takes raw HMAC bytes, even PEM text, unlike ``jwt.encode``)."""
    signing_input = (header if isinstance(header, str) else enc(header)) + "." + (
        claims if isinstance(claims, str) else enc(claims))
    return signing_input + "." + b64url(ALGORITHMS[alg].sign(signing_input.encode(), key))


def unsigned(header: t.Any, claims: t.Any, signature: str = "") -> str:
    return (header if isinstance(header, str) else enc(header)) + "." + (
        claims if isinstance(claims, str) else enc(claims)) + "." + signature


# --- the site's own key ----------------------------------------------------------------------


@dataclass(frozen=True)
class SiteKey:
    """The active access-token key of a site: ``kid``, algorithm, and signing material."""

    kid: str
    alg: str
    key: t.Any  # HMAC bytes or a private key object

    def sign(self, header: dict[str, t.Any], claims: t.Any) -> str:
        return signed(header, claims, self.alg, self.key)

    @property
    def public(self) -> t.Any:
        return self.key.public_key()


@cache
def _site_key(agent: Agent) -> SiteKey:
    secret = (agent.instance / "secret.key").read_bytes().strip()
    fernet = Fernet(base64.urlsafe_b64encode(derive_key(secret, "key-store")))
    ((kid, alg, material),) = agent.rows(
        "SELECT kid, alg, material FROM hk_keys WHERE purpose = 'access' "
        "ORDER BY active_from DESC, id DESC LIMIT 1")
    plain = fernet.decrypt(material)
    key = plain if alg == "HS256" else serialization.load_pem_private_key(plain, None)
    return SiteKey(kid, alg, key)


def site_key(agent: Agent) -> SiteKey:
    """The key the site signs access tokens with (read from its instance and database)."""
    return _site_key(agent)


def public_key(agent: Agent) -> tuple[t.Any, dict[str, t.Any]]:
    """The site's public key as anyone can fetch it: its JWKS (the matching ``kid``)."""
    r = requests.get(agent.base + "/.well-known/jwks.json", timeout=10)
    assert r.status_code == 200, r.text
    kid = site_key(agent).kid
    (jwk,) = [k for k in r.json()["keys"] if k["kid"] == kid]
    return ALGORITHMS[jwk["alg"]].from_jwk(jwk), jwk


def resign(agent: Agent, token: str, *, header: dict[str, t.Any] | None = None,
           drop: t.Iterable[str] = (), **claims: t.Any) -> str:
    """``token`` with header / claim changes, correctly signed with the site's real key."""
    h, c, _ = split(token)
    h.update(header or {})
    c.update(claims)
    for name in drop:
        c.pop(name, None)
    return site_key(agent).sign(h, c)


# --- attacker keys ---------------------------------------------------------------------------


@cache
def attacker_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def attacker_ec(curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "secp256k1": ec.SECP256K1()}
    return ec.generate_private_key(curves[curve])


@cache
def attacker_ed25519() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


# --- hostile clients -------------------------------------------------------------------------

_addresses = (f"127.{a}.{b}.{c}" for a, b, c in itertools.product(range(64, 128), range(256),
                                                                      range(1, 255)))


def next_address() -> str:
    """A loopback address no other request of this run has used (its own per-IP counters)."""
    return next(_addresses)


def now() -> int:
    return int(time.time())


def random_kid() -> str:
    return b64url(secrets.token_bytes(16))
