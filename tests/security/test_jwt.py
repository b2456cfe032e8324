"""JWT verification (SECURITY.md §1, J-01 to J-38) over HTTP, against the three member sites.

Every forgery starts from a genuine access token of a fresh user. Where a case needs a token
that is correctly signed yet hostile in one respect (a wrong ``iss``, a ``crit`` header, an
expired ``exp``), it is re-signed with the site's own key read from its instance, so the only
thing wrong with it is the thing under test. Each refusal is checked as the checklist's REJECT
(401 ``invalid_token``, the same body whatever the reason, no token, no cookie, quick), then
the persistence check: the genuine token still validates, so the refusal came from the
verifier and not from a session that died.

Forgeries are sent from loopback addresses of their own (127.64.0.0/10), so that the per-IP
limit on failed validations (J-38) never throttles the genuine requests from 127.0.0.1.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import itertools
import json
import re
import secrets
import subprocess
import threading
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from agent.services.keys import SigningKey
from tests.conftest import PASSWORD
from tests.conftest import SERVER_POLL
from tests.conftest import free_port
from tests.integration.test_sso import AGENT
from tests.integration.test_sso import LEEWAY
from tests.integration.test_sso import Agent
from tests.integration.test_sso import clean_env
from tests.integration.test_sso import session_from
from tests.security.conftest import Fleet
from tests.security.jwt_forge import ALGORITHMS
from tests.security.jwt_forge import attacker_ec
from tests.security.jwt_forge import attacker_ed25519
from tests.security.jwt_forge import attacker_rsa
from tests.security.jwt_forge import b64d
from tests.security.jwt_forge import b64url
from tests.security.jwt_forge import enc
from tests.security.jwt_forge import next_address
from tests.security.jwt_forge import now
from tests.security.jwt_forge import public_key
from tests.security.jwt_forge import random_kid
from tests.security.jwt_forge import resign
from tests.security.jwt_forge import signed
from tests.security.jwt_forge import site_key
from tests.security.jwt_forge import split
from tests.security.jwt_forge import unsigned

case = pytest.mark.case
TOKEN_FIELDS = {"token", "access_token", "refresh_token", "id_token"}
NORMAL_BAND = 2.0  # seconds: a refusal answers well inside this


# --- the victim and the checks ---------------------------------------------------------------


@dataclass
class Victim:
    """A fresh user logged in at a site: the genuine tokens every forgery starts from."""

    agent: Agent
    id: int
    username: str
    token: str
    refresh_token: str

    @property
    def header(self) -> dict[str, t.Any]:
        return split(self.token)[0]

    @property
    def claims(self) -> dict[str, t.Any]:
        return split(self.token)[1]

    @property
    def segments(self) -> list[str]:
        return self.token.split(".")


def victim(agent: Agent) -> Victim:
    """Register and log in a new user at ``agent`` over HTTP."""
    name = f"j{secrets.token_hex(5)}"
    r = agent.post("/register", json={"username": name, "email": f"{name}@example.com",
                                      "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = agent.post("/token", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    return Victim(agent, body["user"]["ID"], name, body["token"], body["refresh_token"])


class Attacker:
    """Sends hostile requests from addresses of its own, a fresh one every ``per_address``."""

    def __init__(self, per_address: int = 40) -> None:
        self.per_address = per_address
        self.sent = 0
        self.session: requests.Session | None = None

    def request(self, agent: Agent, method: str, path: str, token: str | None,
                **kw: t.Any) -> requests.Response:
        if self.session is None or self.sent % self.per_address == 0:
            if self.session is not None:
                self.session.close()
            self.session = session_from(next_address())
        self.sent += 1
        return agent.request(method, path, token=token, session=self.session, **kw)

    def validate(self, agent: Agent, token: str, *, in_body: bool = False) -> requests.Response:
        if in_body:
            return self.request(agent, "POST", "/token/validate", None, json={"token": token})
        return self.request(agent, "POST", "/token/validate", token)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


@pytest.fixture
def attacker() -> t.Iterator[Attacker]:
    hostile = Attacker()
    yield hostile
    hostile.close()


def assert_reject(r: requests.Response, what: str = "") -> None:
    """REJECT: 401 ``invalid_token`` (the one generic code), no token, no cookie, quick."""
    label = f"{what}: {r.status_code} {r.text[:300]}"
    assert r.status_code == 401, label
    body = r.json()
    assert body["code"] == "invalid_token", label
    assert set(body) == {"code", "message", "data"}, label
    assert not TOKEN_FIELDS & set(body), label
    assert "Set-Cookie" not in r.headers, label
    assert r.elapsed.total_seconds() < NORMAL_BAND, f"{what}: took {r.elapsed}"


def assert_valid(v: Victim, token: str | None = None) -> dict[str, t.Any]:
    """ACCEPT / the persistence check: the token validates (from 127.0.0.1)."""
    r = v.agent.post("/token/validate", token=token or v.token)
    assert r.status_code == 200, r.text
    assert r.json()["valid"] is True
    return t.cast(dict[str, t.Any], r.json()["data"])


def refuse_all(attacker: Attacker, v: Victim, forgeries: t.Mapping[str, str], *,
               in_body: bool = False) -> None:
    """Every forgery is refused at /token/validate, then the genuine token still works."""
    assert forgeries
    for name, token in forgeries.items():
        assert token != v.token, name
        assert_reject(attacker.validate(v.agent, token, in_body=in_body), name)
    assert_valid(v)


def with_header(v: Victim, **changes: t.Any) -> str:
    """The genuine token with header changes, re-signed with the site's real key."""
    return resign(v.agent, v.token, header=changes)


def with_claims(v: Victim, **changes: t.Any) -> str:
    return resign(v.agent, v.token, **changes)


def flip_bit(segment: str, index: int | None = None) -> str:
    raw = bytearray(b64d(segment))
    raw[len(raw) // 2 if index is None else index] ^= 0x01
    return b64url(bytes(raw))


# --- 1a. algorithm handling ------------------------------------------------------------------


@case("J-01")
def test_J01_alg_none(agent: Agent, attacker: Attacker) -> None:
    """``alg: none`` in any case, with an empty or the original signature, is refused."""
    v = victim(agent)
    _, payload, sig = v.segments
    forgeries = {}
    for alg in ("none", "None", "NONE", "nOnE"):
        header = enc({**v.header, "alg": alg})
        forgeries[f"{alg} empty"] = unsigned(header, payload)
        forgeries[f"{alg} original signature"] = unsigned(header, payload, sig)
    refuse_all(attacker, v, forgeries)


@case("J-02")
def test_J02_null_signature(agent: Agent, attacker: Attacker) -> None:
    """``header.payload.`` with the original ``alg`` is refused (CVE-2020-28042)."""
    v = victim(agent)
    header, payload, _ = v.segments
    # Also with claims changed, and with the alg the header already names.
    refuse_all(attacker, v, {
        "original": unsigned(header, payload),
        "escalated": unsigned(header, enc({**v.claims, "roles": ["administrator"]})),
    })


@case("J-03")
def test_J03_broken_signature(agent: Agent, attacker: Attacker) -> None:
    """A truncated signature and one with a single bit flipped are refused."""
    v = victim(agent)
    header, payload, sig = v.segments
    refuse_all(attacker, v, {
        "last 4 chars removed": f"{header}.{payload}.{sig[:-4]}",
        "one bit flipped": f"{header}.{payload}.{flip_bit(sig)}",
        "first bit flipped": f"{header}.{payload}.{flip_bit(sig, 0)}",
    })


def _confusion_forgeries(v: Victim, secrets_: dict[str, bytes]) -> dict[str, str]:
    claims = {**v.claims, "roles": ["administrator"]}
    out = {}
    for name, secret in secrets_.items():
        for header in ({**v.header, "alg": "HS256"}, {"alg": "HS256", "typ": "at+jwt"}):
            out[f"{name} kid={'kid' in header}"] = signed(header, claims, "HS256", secret)
    return out


def _hub_jwk(fleet: Fleet, site: Agent) -> list[dict[str, t.Any]]:
    r = requests.get(fleet.hub.url + "/.well-known/jwks.json", timeout=10)
    assert r.status_code == 200, r.text
    return [k for k in r.json()["keys"] if k.get("hk_site") == site.site_key]


def _public_forms(key: t.Any, jwk: dict[str, t.Any]) -> dict[str, bytes]:
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    forms = {
        "SPKI PEM": pem,
        "SPKI PEM without newline": pem.rstrip(b"\n"),
        "SPKI DER": key.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo),
        "OpenSSH": key.public_bytes(serialization.Encoding.OpenSSH,
                                    serialization.PublicFormat.OpenSSH),
        "JWK JSON": json.dumps(jwk).encode(),
        "JWK JSON compact": json.dumps(jwk, separators=(",", ":")).encode(),
        "JWK JSON sorted": json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode(),
    }
    if isinstance(key, ec.EllipticCurvePublicKey):
        forms["uncompressed point"] = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        forms["compressed point"] = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    else:
        forms["PKCS#1 PEM"] = key.public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.PKCS1)
        forms["PKCS#1 DER"] = key.public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.PKCS1)
        n = key.public_numbers().n
        forms["modulus bytes"] = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return forms


@case("J-04")
def test_J04_rs256_to_hs256_key_confusion(fleet: Fleet, attacker: Attacker) -> None:
    """The RS256 site's public key, in every byte form, is no HS256 secret."""
    v = victim(fleet["rs"])
    key, jwk = public_key(v.agent)
    forms = _public_forms(key, jwk)
    for i, member in enumerate(_hub_jwk(fleet, v.agent)):  # the site's keys the hub publishes
        forms[f"hub JWK {i}"] = json.dumps(member).encode()
    refuse_all(attacker, v, _confusion_forgeries(v, forms))


@case("J-05")
def test_J05_es256_to_hs256_key_confusion(fleet: Fleet, attacker: Attacker) -> None:
    """The ES256 site's public key (PEM, OpenSSH, point bytes, JWK) is no HS256 secret."""
    v = victim(fleet["es"])
    key, jwk = public_key(v.agent)
    refuse_all(attacker, v, _confusion_forgeries(v, _public_forms(key, jwk)))


@case("J-06")
def test_J06_cross_asymmetric_swap(agent: Agent, attacker: Attacker) -> None:
    """Tokens under any other algorithm, signed with attacker keys, are refused."""
    v = victim(agent)
    claims = {**v.claims, "roles": ["administrator"]}
    keys = {"RS256": attacker_rsa(), "RS512": attacker_rsa(), "PS256": attacker_rsa(),
            "ES256": attacker_ec(), "ES384": attacker_ec("P-384"), "EdDSA": attacker_ed25519()}
    forgeries = {alg: signed({**v.header, "alg": alg}, claims, alg, key)
                 for alg, key in keys.items() if alg != site_key(agent).alg}
    refuse_all(attacker, v, forgeries)


@case("J-07")
def test_J07_alg_case_and_unknown(agent: Agent, attacker: Attacker) -> None:
    """A wrong-cased, padded, unknown, missing or non-string ``alg`` is refused, even with a
    signature the site's own key made over exactly that header."""
    v = victim(agent)
    real = site_key(agent).alg
    values: list[t.Any] = [real.lower(), real.capitalize(), real + " ", " " + real, "HS1", "RS0",
                           "", 256, [real], None, {"alg": real}]
    forgeries = {f"alg={value!r}": with_header(v, alg=value) for value in values}
    header = dict(v.header)
    del header["alg"]
    forgeries["alg missing"] = site_key(agent).sign(header, v.claims)
    refuse_all(attacker, v, forgeries)


@case("J-08")
def test_J08_es256_only_with_p256(fleet: Fleet, attacker: Attacker) -> None:
    """ES256 tokens signed with P-384 or secp256k1 keys under the site's ``kid`` are refused."""
    v = victim(fleet["es"])
    claims = {**v.claims, "roles": ["administrator"]}
    refuse_all(attacker, v, {
        curve: signed(v.header, claims, "ES256", attacker_ec(curve))
        for curve in ("P-384", "secp256k1", "P-256")
    })


# --- 1b. signature encoding -------------------------------------------------------------------

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _rs(r: int, s: int) -> str:
    return b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


@case("J-09")
def test_J09_psychic_signature(fleet: Fleet, attacker: Attacker) -> None:
    """r = s = 0, raw or DER encoded, never verifies (CVE-2022-21449)."""
    v = victim(fleet["es"])
    header, payload, _ = v.segments
    refuse_all(attacker, v, {
        "64 zero bytes": f"{header}.{payload}.{b64url(bytes(64))}",
        "DER r=s=0": f"{header}.{payload}.MAYCAQACAQA",
    })


@case("J-10")
def test_J10_out_of_range_r_s(fleet: Fleet, attacker: Attacker) -> None:
    """r or s equal to the group order, or zero, is refused."""
    v = victim(fleet["es"])
    header, payload, sig = v.segments
    raw = b64d(sig)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    n = P256_ORDER
    refuse_all(attacker, v, {
        f"{name}": f"{header}.{payload}.{_rs(rr, ss)}"
        for name, rr, ss in (("r=n", n, s), ("s=n", r, n), ("r=0", 0, s), ("s=0", r, 0),
                             ("r+n", r + n, s), ("s+n", r, s + n))
        if rr < 2**256 and ss < 2**256
    })


@case("J-11")
def test_J11_der_instead_of_raw(fleet: Fleet, attacker: Attacker) -> None:
    """The genuine ECDSA signature in DER form (instead of 64-byte R||S) is refused."""
    v = victim(fleet["es"])
    header, payload, sig = v.segments
    raw = b64d(sig)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    assert decode_dss_signature(der) == (int.from_bytes(raw[:32], "big"),
                                         int.from_bytes(raw[32:], "big"))
    padded = b64url(raw + bytes(1))
    refuse_all(attacker, v, {"DER": f"{header}.{payload}.{b64url(der)}",
                             "R||S||0": f"{header}.{payload}.{padded}"})


@case("J-13")
def test_J13_truncated_hmac(fleet: Fleet, attacker: Attacker) -> None:
    """Prefixes of the correct MAC (1, 8, 16, 31 bytes) are refused."""
    v = victim(fleet["hs"])
    header, payload, sig = v.segments
    mac = b64d(sig)
    assert len(mac) == 32
    refuse_all(attacker, v, {f"{n} bytes": f"{header}.{payload}.{b64url(mac[:n])}"
                             for n in (1, 8, 16, 31)})


def _spelled_with_dash_or_underscore(v: Victim) -> str:
    """A correctly signed variant of ``v.token`` whose signature contains ``-`` or ``_``."""
    for i in range(500):
        token = with_claims(v, pad=i)
        if set(token.split(".")[2]) & {"-", "_"}:
            return token
    raise AssertionError("no signature with - or _ in 500 tries")


@case("J-14")
def test_J14_non_canonical_base64url(agent: Agent, attacker: Attacker) -> None:
    """Padding, whitespace, ``+``/``/`` and non-zero unused bits are refused."""
    v = victim(agent)
    good = _spelled_with_dash_or_underscore(v)
    assert_valid(v, good)  # control: the re-signed spelling itself is accepted
    h, p, s = good.split(".")
    forgeries = {
        "padded header": f"{h}==.{p}.{s}",
        "padded payload": f"{h}.{p}=.{s}",
        "padded signature": f"{h}.{p}.{s}=",
        "newline in payload": f"{h}.{p[:10]}\n{p[10:]}.{s}",
        "space in signature": f"{h}.{p}.{s[:10]} {s[10:]}",
        "tab before dot": f"{h}\t.{p}.{s}",
        "standard alphabet": f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}",
    }
    unused = (len(s) * 6) % 8  # low bits of the last character that encode nothing
    if unused:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet[alphabet.index(s[-1]) ^ 1]
        assert b64d(s[:-1] + last) == b64d(s)
        forgeries["unused bits set"] = f"{h}.{p}.{s[:-1]}{last}"
    refuse_all(attacker, v, forgeries, in_body=True)
    # Whitespace cannot travel in a header value; the rest is refused as a bearer token too.
    refuse_all(attacker, v, {k: f for k, f in forgeries.items()
                             if not any(c in f for c in "\n\t ")})


# --- 1c. header parameters that select or carry keys ------------------------------------------


@case("J-15")
def test_J15_embedded_jwk(agent: Agent, attacker: Attacker) -> None:
    """A ``jwk`` header carries no trust: the attacker's own key is not used to verify."""
    v = victim(agent)
    claims = {**v.claims, "roles": ["administrator"]}
    rsa_jwk = json.loads(ALGORITHMS["RS256"].to_jwk(attacker_rsa().public_key()))
    ec_jwk = json.loads(ALGORITHMS["ES256"].to_jwk(attacker_ec().public_key()))
    forgeries = {}
    for kid in (None, v.header["kid"]):
        for alg, jwk, key in (("RS256", rsa_jwk, attacker_rsa()), ("ES256", ec_jwk, attacker_ec())):
            header = {"alg": alg, "typ": "at+jwt", "jwk": jwk, **({"kid": kid} if kid else {})}
            forgeries[f"{alg} kid={kid is not None}"] = signed(header, claims, alg, key)
    refuse_all(attacker, v, forgeries)


class _Listener(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        _Listener.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"keys": []}).encode())

    def log_message(self, *args: t.Any) -> None:
        pass


@case("J-16")
def test_J16_jku_x5u_x5c_spoof(agent: Agent, attacker: Attacker) -> None:
    """``jku``/``x5u`` pointing at an attacker's listener, and an ``x5c`` chain, are refused,
    and the site never calls the listener."""
    v = victim(agent)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Listener)
    _Listener.hits = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": SERVER_POLL},
                              daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        key = attacker_rsa()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(dt.datetime(2020, 1, 1))
                .not_valid_after(dt.datetime(2100, 1, 1))
                .sign(key, hashes.SHA256()))
        x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        claims = {**v.claims, "roles": ["administrator"]}
        forgeries = {}
        for kid in (random_kid(), v.header["kid"]):
            base = {"alg": "RS256", "typ": "at+jwt", "kid": kid}
            forgeries[f"jku {kid}"] = signed({**base, "jku": url + "/jwks.json"}, claims,
                                             "RS256", key)
            forgeries[f"x5u {kid}"] = signed({**base, "x5u": url + "/cert.pem"}, claims,
                                             "RS256", key)
            forgeries[f"x5c {kid}"] = signed({**base, "x5c": x5c}, claims, "RS256", key)
        refuse_all(attacker, v, forgeries)
        time.sleep(0.3)  # room for any fetch the refusals might have started
        assert _Listener.hits == []
    finally:
        server.shutdown()
        server.server_close()


KID_PATHS = ["../../../../../../dev/null", "/dev/null", "/invalid_path",
             "..\\..\\windows\\win.ini", "/proc/self/cmdline", "../../../../etc/passwd"]


@case("J-17")
def test_J17_kid_path_traversal(agent: Agent, attacker: Attacker) -> None:
    """A ``kid`` naming a file, HMAC-signed with that file's (empty) content, is refused."""
    v = victim(agent)
    claims = {**v.claims, "roles": ["administrator"]}
    forgeries = {}
    for kid in KID_PATHS:
        header = {"alg": "HS256", "typ": "at+jwt", "kid": kid}
        forgeries[f"{kid} empty"] = signed(header, claims, "HS256", b"")
        forgeries[f"{kid} zero byte"] = signed(header, claims, "HS256", b"\x00")
        forgeries[f"{kid} site alg"] = with_header(v, kid=kid)
    refuse_all(attacker, v, forgeries)


SQL_ERRORS = ("sql", "syntax", "sqlite", "psycopg", "operationalerror", "traceback", "select")


@case("J-18")
def test_J18_kid_sql_injection(agent: Agent, attacker: Attacker) -> None:
    """SQL in ``kid`` (with the secret the injection would return) is refused, no SQL error."""
    v = victim(agent)
    claims = {**v.claims, "roles": ["administrator"]}
    forgeries = {}
    for kid in ("x' UNION SELECT '1';--", "' OR '1'='1", "\" OR \"\"=\"", "1; DROP TABLE hk_keys"):
        forgeries[kid] = signed({"alg": "HS256", "typ": "at+jwt", "kid": kid}, claims,
                                "HS256", b"1")
    for name, token in forgeries.items():
        r = attacker.validate(agent, token)
        assert_reject(r, name)
        assert not any(word in r.text.lower() for word in SQL_ERRORS), r.text
    assert_valid(v)
    assert agent.rows("SELECT count(*) FROM hk_keys")[0][0] >= 1


@case("J-19")
def test_J19_kid_command_injection(agent: Agent, attacker: Attacker) -> None:
    """Shell syntax in ``kid`` is refused within the normal band (no 10 s sleep ran)."""
    v = victim(agent)
    forgeries = {kid: with_header(v, kid=kid)
                 for kid in ("|sleep 10", ";sleep 10", "$(sleep 10)", "`sleep 10`",
                             "x && sleep 10")}
    refuse_all(attacker, v, forgeries)  # assert_reject bounds each answer at 2 s


@case("J-20")
def test_J20_kid_type_and_size(agent: Agent, attacker: Attacker) -> None:
    """A non-string, huge, NUL or CRLF ``kid`` is refused (never 500) and splits no log line."""
    v = victim(agent)
    marker = f"FORGED-{secrets.token_hex(4)}"
    kids: list[t.Any] = [12345, {"kid": v.header["kid"]}, [v.header["kid"]], None, True,
                         "k" * 10240, v.header["kid"] + "\x00", "\x00",
                         f"x\r\n{marker} level=INFO user=admin", f"x\n{marker}"]
    forgeries = {f"kid={str(kid)[:40]!r}": with_header(v, kid=kid) for kid in kids}
    refuse_all(attacker, v, forgeries, in_body=True)
    # In the Authorization header the 10 KB kid is the server's header limit's (J-34).
    refuse_all(attacker, v, {k: f for k, f in forgeries.items() if len(f) < 8000})
    assert v.agent.service is not None
    logs = v.agent.service.logs()
    assert f"\n{marker}" not in logs and f"\r{marker}" not in logs


@case("J-21")
def test_J21_unknown_kid(agent: Agent, fleet: Fleet) -> None:
    """500 correctly signed tokens with distinct unknown ``kid``s: each refused, no call to the
    hub, and the genuine key still verifies afterwards. (An unknown kid is refused before any
    algorithm's code runs, so the RS256 and ES256 sites get 150 to keep the suite quick.)"""
    v = victim(agent)
    before = fleet.hub.signed_calls(agent.site_key)
    count = 500 if site_key(agent).alg == "HS256" else 150
    tokens = [with_header(v, kid=random_kid()) for _ in range(count)]
    chunks = [tokens[i:i + 50] for i in range(0, len(tokens), 50)]
    addresses = [next_address() for _ in chunks]

    def send(job: tuple[str, list[str]]) -> list[tuple[int, str, float]]:
        address, batch = job
        with session_from(address) as session:
            out = []
            for token in batch:
                r = agent.request("POST", "/token/validate", token=token, session=session)
                out.append((r.status_code, r.json().get("code", ""), r.elapsed.total_seconds()))
            return out

    with ThreadPoolExecutor(4) as pool:
        results = [x for chunk in pool.map(send, zip(addresses, chunks, strict=True))
                   for x in chunk]
    assert len(results) == count
    assert {(status, code) for status, code, _ in results} == {(401, "invalid_token")}
    assert max(elapsed for *_, elapsed in results) < NORMAL_BAND
    assert fleet.hub.signed_calls(agent.site_key) == before
    assert_valid(v)


@case("J-22")
def test_J22_kid_of_another_member_site(agent: Agent, fleet: Fleet, attacker: Attacker) -> None:
    """A token signed by another member site's key, naming that key and this issuer, is
    refused: a site's key vouches for its own issuer only."""
    v = victim(agent)
    forgeries = {}
    for other in fleet.agents:
        if other is agent:
            continue
        key = site_key(other)
        forgeries[other.name] = key.sign({**v.header, "kid": key.kid, "alg": key.alg}, v.claims)
        # And the other site's genuine token, shown here: its iss and key are the other's.
        forgeries[f"{other.name} genuine"] = victim(other).token
    # This site's own single sign-on key signs assertions only, never access tokens.
    sso = SigningKey.from_pem("ES256", agent.federation_pem)
    assert sso.kid in {jwk["kid"] for jwk in _hub_jwk(fleet, agent)}  # the key the hub lists
    forgeries["own SSO key"] = signed({**v.header, "kid": sso.kid, "alg": "ES256"}, v.claims,
                                      "ES256", sso.signing_key)
    refuse_all(attacker, v, forgeries)


# --- 1d. crit, typ and token kinds ------------------------------------------------------------


@case("J-23")
def test_J23_crit(agent: Agent, attacker: Attacker) -> None:
    """Any ``crit`` header, well formed or not, is refused though correctly signed."""
    v = victim(agent)
    variants: dict[str, dict[str, t.Any]] = {
        "crit exp": {"crit": ["exp"], "exp": now() + 60},
        "crit x-custom": {"crit": ["x-custom"], "x-custom": True},
        "crit empty": {"crit": []},
        "crit string": {"crit": "exp", "exp": now() + 60},
        "crit number": {"crit": [1]},
        "crit absent member": {"crit": ["x-absent"]},
        "crit b64": {"crit": ["b64"], "b64": False},
    }
    refuse_all(attacker, v, {name: with_header(v, **extra) for name, extra in variants.items()})


@case("J-24")
def test_J24_explicit_typing(fleet: Fleet, agent: Agent, attacker: Attacker) -> None:
    """Only ``typ: at+jwt`` tokens are access tokens; other kinds are refused as such, and an
    access token is no refresh token nor reset token."""
    v = victim(agent)
    peer = next(a for a in fleet.agents if a is not agent)
    assertion = agent.post("/sso/issue", json={"target": peer.site_key}, token=v.token)
    assert assertion.status_code == 200, assertion.text
    forgeries = {
        "sso assertion": assertion.json()["token"],
        "refresh token": v.refresh_token,
        "typ JWT": with_header(v, typ="JWT"),
        "typ at+JWT": with_header(v, typ="at+JWT"),
        "typ application/at+jwt": with_header(v, typ="application/at+jwt"),
        "typ sso": with_header(v, typ="hk-sso+jwt"),
        "typ absent": site_key(agent).sign({k: x for k, x in v.header.items() if k != "typ"},
                                           v.claims),
    }
    # The password-reset link token, from the mail the site sends.
    email = f"{v.username}@example.com"
    r = agent.post("/forgot-password", json={"login": v.username, "delivery": "link"})
    assert r.status_code == 200, r.text
    (mail,) = fleet.mail.wait_for(email)
    payload = mail.get_payload(decode=True)
    assert isinstance(payload, bytes)
    links = re.findall(r"[?&]token=([A-Za-z0-9_%-]+)", payload.decode())
    assert len(links) == 1, payload
    forgeries["reset link token"] = links[0]
    refuse_all(attacker, v, forgeries)
    # An access token is not a refresh token, nor a reset token.
    r = attacker.request(agent, "POST", "/token/refresh", None, json={"refresh_token": v.token})
    assert r.status_code == 400 and r.json()["code"] == "invalid_grant", r.text
    assert not TOKEN_FIELDS & set(r.json())
    r = attacker.request(agent, "POST", "/reset-password", None,
                         json={"token": v.token[:128], "password": "a new long passphrase"})
    assert r.status_code == 400 and r.json()["code"] in ("invalid_reset_token",
                                                         "invalid_request"), r.text
    r = attacker.request(agent, "POST", "/reset-password", None,
                         json={"token": v.token, "password": "a new long passphrase"})
    assert r.status_code == 400, r.text
    assert_valid(v)
    r = agent.post("/token", json={"username": v.username, "password": PASSWORD})
    assert r.status_code == 200, r.text  # the password was not reset


@case("J-25")
def test_J25_nested_jwt_and_jwe(agent: Agent, attacker: Attacker) -> None:
    """``cty: JWT`` (a nested token), ``zip`` and 5-segment JWE compact tokens are refused."""
    v = victim(agent)
    key = site_key(agent)
    h = enc({**v.header, "cty": "JWT"})
    inner = b64url(v.token.encode())
    nested = signed(h, inner, key.alg, key.key)
    jwe_header = enc({"alg": "dir", "enc": "A256GCM", "zip": "DEF", "kid": v.header["kid"]})
    forgeries = {
        "cty JWT, payload a JWT": nested,
        "cty JWT, payload claims": with_header(v, cty="JWT"),
        "cty jwt": with_header(v, cty="jwt"),
        "zip DEF": with_header(v, zip="DEF"),
        "JWE compact": ".".join([jwe_header, "", b64url(secrets.token_bytes(12)),
                                 b64url(secrets.token_bytes(64)), b64url(secrets.token_bytes(16))]),
        "JWE compact, 5 full segments": ".".join([jwe_header] + [b64url(b"x" * 16)] * 4),
    }
    refuse_all(attacker, v, forgeries, in_body=True)
    refuse_all(attacker, v, forgeries)


# --- 1e. registered claims --------------------------------------------------------------------


@case("J-26")
def test_J26_expired(agent: Agent, attacker: Attacker) -> None:
    """Expired beyond the leeway (30 s) is refused; expired within it is accepted."""
    v = victim(agent)
    t0 = now()
    late = t0 - (LEEWAY + 5)
    refuse_all(attacker, v, {
        "exp beyond leeway": with_claims(v, iat=late - 300, nbf=late - 300, exp=late),
        "exp long ago": with_claims(v, iat=1, nbf=1, exp=2),
        "exp zero": with_claims(v, exp=0),
    })
    inside = t0 - (LEEWAY - 5)
    assert_valid(v, with_claims(v, iat=inside - 300, nbf=inside - 300, exp=inside))


@case("J-27")
def test_J27_not_yet_valid(agent: Agent, attacker: Attacker) -> None:
    """``nbf`` or ``iat`` beyond the leeway in the future is refused; within it, accepted."""
    v = victim(agent)
    future = now() + LEEWAY + 5
    refuse_all(attacker, v, {
        "nbf future": with_claims(v, nbf=future),
        "iat future": with_claims(v, iat=future),
    })
    assert_valid(v, with_claims(v, nbf=now() + LEEWAY - 5, iat=now() + LEEWAY - 5))


@case("J-28")
def test_J28_missing_or_mistyped_time_claims(agent: Agent, attacker: Attacker) -> None:
    """No ``exp``, or ``exp``/``nbf``/``iat`` as string, huge float, array, boolean: refused."""
    v = victim(agent)
    key = site_key(agent)
    forgeries = {"no exp": resign(agent, v.token, drop=["exp"]),
                 "no iat": resign(agent, v.token, drop=["iat"]),
                 "no nbf": resign(agent, v.token, drop=["nbf"])}
    for name in ("exp", "nbf", "iat"):
        for value in ("9999999999", [9999999999], True, None, {"t": 1}):
            forgeries[f"{name}={value!r}"] = with_claims(v, **{name: value})
        # 1e400 and NaN cannot come from json.dumps: write the payload by hand.
        for raw in ("1e400", "-1e400", "NaN", "Infinity"):
            claims = {**v.claims, name: "@@"}
            text = json.dumps(claims, separators=(",", ":")).replace('"@@"', raw)
            forgeries[f"{name}={raw}"] = signed(v.header, b64url(text.encode()), key.alg, key.key)
    refuse_all(attacker, v, forgeries)


@case("J-29")
def test_J29_audience_no_audience_configured(agent: Agent, attacker: Attacker) -> None:
    """A site with no audience configured refuses any token that names one (even empty)."""
    v = victim(agent)
    assert "aud" not in v.claims
    refuse_all(attacker, v, {f"aud={aud!r}": with_claims(v, aud=aud)
                             for aud in ("site-x", ["site-x"], "", [], None, agent.base, 0)})


@case("J-30")
def test_J30_issuer_exact_match(fleet: Fleet, agent: Agent, attacker: Attacker) -> None:
    """Only the exact issuer string is accepted: no prefix, suffix, slash or case variant."""
    v = victim(agent)
    iss = v.claims["iss"]
    assert iss == agent.issuer
    variants = ["http", fleet.hub.url, iss + ".evil.com", iss + "/", iss.upper(),
                iss.replace("http://", "HTTP://"), iss + " ", " " + iss, iss[:-1], "",
                [iss], {"iss": iss}, None, iss.replace("127.0.0.1", "localhost")]
    refuse_all(attacker, v, {f"iss={value!r}": with_claims(v, iss=value) for value in variants})


@case("J-31")
def test_J31_sub_and_jti_types(agent: Agent, attacker: Attacker) -> None:
    """``sub``, ``jti`` or ``sid`` as number, array, object or empty string are refused."""
    v = victim(agent)
    forgeries = {}
    for name in ("sub", "jti", "sid"):
        genuine = v.claims[name]
        for value in (int(genuine) if genuine.isdigit() else 1, [genuine], {"v": genuine}, "",
                      None, True):
            forgeries[f"{name}={value!r}"] = with_claims(v, **{name: value})
    refuse_all(attacker, v, forgeries)


# --- 1f. parsing robustness -------------------------------------------------------------------


@case("J-33")
def test_J33_structure(agent: Agent, attacker: Attacker) -> None:
    """Wrong segment counts, non-object header or payload, invalid UTF-8: 401, never 500."""
    v = victim(agent)
    key = site_key(agent)
    h, p, s = v.segments
    forgeries = {
        "1 segment": h,
        "2 segments": f"{h}.{p}",
        "4 segments": f"{h}.{p}.{s}.{s}",
        "5 segments": f"{h}.{p}.{s}.{s}.{s}",
        "empty": "..",
        "dots only": "....",
    }
    values: list[t.Any] = [[], None, 1, "x", True]
    for value in values:
        forgeries[f"header {value!r}"] = signed(enc(value), p, key.alg, key.key)
        forgeries[f"payload {value!r}"] = signed(v.header, enc(value), key.alg, key.key)
    forgeries["header invalid UTF-8"] = signed(b64url(b'{"alg":"\xff\xfe"}'), p, key.alg, key.key)
    forgeries["payload invalid UTF-8"] = signed(v.header, b64url(b'{"sub":"\xff"}'),
                                                key.alg, key.key)
    forgeries["header not JSON"] = signed(b64url(b"{alg"), p, key.alg, key.key)
    refuse_all(attacker, v, forgeries, in_body=True)
    refuse_all(attacker, v, forgeries)
    # A body ``token`` that is no string at all.
    for value in (12345, [v.token], {"token": v.token}, None, True, ""):
        r = attacker.request(agent, "POST", "/token/validate", None, json={"token": value})
        assert_reject(r, f"token={value!r}")
    assert_valid(v)


@case("J-34")
def test_J34_oversized_token(agent: Agent, attacker: Attacker) -> None:
    """Oversized headers, payloads and signatures get a fast 4xx, never a full parse."""
    v = victim(agent)
    key = site_key(agent)
    h, p, s = v.segments
    big_header = {**v.header, "x": "h" * 600}
    forgeries = {
        "header > 512 bytes": key.sign(big_header, v.claims),
        "payload > 128 KB": key.sign(v.header, {**v.claims, "x": "p" * 131072}),
        "signature > 1 KB": f"{h}.{p}.{b64url(secrets.token_bytes(1100))}",
        "16 KB": f"{h}.{p}.{s}" + "A" * 16384,
    }
    refuse_all(attacker, v, {k: forgeries[k] for k in ("header > 512 bytes", "signature > 1 KB")})
    for name, token in forgeries.items():
        r = attacker.validate(agent, token, in_body=True)
        assert r.status_code in (400, 401, 413), (name, r.status_code, r.text[:200])
        assert not TOKEN_FIELDS & set(r.json()), name
        assert r.elapsed.total_seconds() < NORMAL_BAND, (name, r.elapsed)
    statuses: list[int] = []
    for size in (16 * 1024, 64 * 1024, 1024 * 1024):
        token = f"{h}.{p}.{s}" + "A" * size
        started = time.monotonic()
        try:
            r = attacker.validate(agent, token)
            status = r.status_code
        except requests.ConnectionError:
            status = 0  # the server closed the connection on the oversized header: refused
        assert status in (0, 400, 401, 413, 431), (size, status)
        statuses.append(status)
        assert time.monotonic() - started < NORMAL_BAND, size
    assert statuses[0] == 431, statuses  # gunicorn's header limit answers before the app
    assert_valid(v)


@case("J-35")
def test_J35_deep_nesting(agent: Agent, attacker: Attacker) -> None:
    """Deeply nested JSON in a correctly signed payload or header: 401 quickly, never 500."""
    v = victim(agent)
    key = site_key(agent)
    deep = 2500  # beyond the JSON parser's recursion limit, yet inside the 8 KiB token limit
    nested_payload = b64url(("[" * deep + "]" * deep).encode())
    nested_claim = json.dumps({**v.claims, "x": "@@"}, separators=(",", ":")).replace(
        '"@@"', "[" * deep + "]" * deep)
    forgeries = {
        "payload nested": signed(v.header, nested_payload, key.alg, key.key),
        "claim nested": signed(v.header, b64url(nested_claim.encode()), key.alg, key.key),
        "header nested": signed(b64url(("[" * 400 + "]" * 400).encode()), v.segments[1],
                                key.alg, key.key),
    }
    wide: t.Any = [{}] * 200
    for _ in range(10):
        wide = {"a": [wide] * 2}
    h, _, s = v.segments
    forgeries["objects in arrays, unsigned"] = f"{h}.{enc({**v.claims, 'x': wide})[:7000]}.{s}"
    refuse_all(attacker, v, forgeries, in_body=True)
    huge = b64url(("[" * 100_000 + "]" * 100_000).encode())
    r = attacker.validate(agent, signed(v.header, huge, key.alg, key.key), in_body=True)
    assert r.status_code in (400, 401, 413), r.text[:200]
    assert r.elapsed.total_seconds() < NORMAL_BAND
    assert_valid(v)


COMMON_SECRETS = ["", "secret", "secret123", "password", "123456", "changeme",
                  "your-256-bit-secret", "your_jwt_secret", "jwt_secret", "jwtsecret",
                  "supersecret", "mysecret",
                  "secretkey", "secret_key", "SECRET_KEY", "key", "private", "default", "test",
                  "admin", "qwerty", "letmein", "headlesskey", "HeadlessKey", "hk", "wordpress",
                  "AUTH_KEY", "put your unique phrase here", "shhhhh", "s3cr3t", "1", "0", " ",
                  "null", "undefined", "None", "gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr9C",
                  "HS256", "at+jwt", "jwt", "token", "access", "change-me-in-production"]


@case("J-37")
def test_J37_weak_or_blank_hmac_secret(fleet: Fleet, attacker: Attacker) -> None:
    """HS256 tokens signed with a blank or common secret are refused (with the site's kid or
    none), and the genuine key is none of them."""
    v = victim(fleet["hs"])
    assert site_key(v.agent).key not in {s.encode() for s in COMMON_SECRETS}
    # The site's HMAC key, and the secret the hub issued it, are at least 32 bytes (RFC 7518
    # §3.2); the hub generates every site secret itself and accepts none from outside.
    assert len(site_key(v.agent).key) >= 32 and len(v.agent.raw_secret) >= 32
    claims = {**v.claims, "roles": ["administrator"]}
    forgeries = {}
    for secret in COMMON_SECRETS:
        forgeries[f"{secret!r}"] = signed(v.header, claims, "HS256", secret.encode())
        forgeries[f"{secret!r} unmodified"] = signed(v.header, v.claims, "HS256", secret.encode())
    forgeries["no kid, blank"] = signed({"alg": "HS256", "typ": "at+jwt"}, claims, "HS256", b"")
    refuse_all(attacker, v, forgeries)


@case("J-37")
def test_J37_short_secrets_are_refused_at_configuration(tmp_path: Path) -> None:
    """A site secret or hub secret shorter than 32 bytes stops the agent with a clear error."""
    assert AGENT
    instance = tmp_path / "short"
    init = subprocess.run([AGENT, "init", "--instance", str(instance), "--algorithm", "HS256"],
                          capture_output=True, text=True, env=clean_env(), timeout=60)
    assert init.returncode == 0, init.stderr
    short = subprocess.run([AGENT, "keys", "list", "--instance", str(instance)],
                           capture_output=True, text=True, timeout=60,
                           env=clean_env(HEADLESSKEY_SECRET_KEY="x" * 31))
    assert short.returncode != 0
    assert "HEADLESSKEY_SECRET_KEY" in short.stderr and "32 bytes" in short.stderr, short.stderr
    ok = subprocess.run([AGENT, "keys", "list", "--instance", str(instance)],
                        capture_output=True, text=True, timeout=60, env=clean_env())
    assert ok.returncode == 0, ok.stderr  # control: the instance's own 64-byte secret
    weak_hub = "hks_" + b64url(secrets.token_bytes(31))
    joined = subprocess.run(
        [AGENT, "join", "--instance", str(instance), "--hub", "http://127.0.0.1:9",
         "--site-key", "site-short", "--secret-stdin"],
        input=weak_hub + "\n", capture_output=True, text=True, env=clean_env(), timeout=60)
    assert joined.returncode != 0
    assert "32 bytes" in joined.stderr + joined.stdout, joined.stderr


@case("J-38")
def test_J38_validate_is_not_an_oracle(agent: Agent, attacker: Attacker) -> None:
    """20 distinct invalid tokens get byte-identical answers that echo none of their claims."""
    v = victim(agent)
    marker = f"ECHO{secrets.token_hex(6)}"
    key = site_key(agent)
    h, p, s = v.segments
    late = now() - LEEWAY - 60
    invalid = [
        with_claims(v, exp=late, marker=marker),
        with_claims(v, aud="elsewhere", marker=marker),
        with_claims(v, iss=marker),
        with_claims(v, sub=marker),
        with_header(v, kid=marker),
        with_header(v, kid=random_kid()),
        with_header(v, alg="none"),
        with_header(v, typ=marker),
        with_header(v, crit=[marker]),
        f"{h}.{p}.{flip_bit(s)}",
        f"{h}.{p}.",
        f"{h}.{enc({**v.claims, 'marker': marker})}.{s}",
        signed(v.header, {**v.claims, "marker": marker}, "HS256", b""),
        key.sign(v.header, {**v.claims, "jti": marker}),
        key.sign(v.header, {**v.claims, "sid": marker}),
        f"{h}.{p}",
        marker,
        v.refresh_token,
        with_claims(v, nbf=now() + 3600),
        with_claims(v, exp=str(now() + 600)),
    ]
    assert len(set(invalid)) == 20
    answers = set()
    for token in invalid:
        r = attacker.validate(agent, token)
        assert_reject(r, token[:60])
        assert marker not in r.text and v.username not in r.text
        answers.add((r.status_code, r.text, r.headers.get("WWW-Authenticate"),
                     r.headers.get("Content-Type")))
    assert len(answers) == 1, answers
    assert_valid(v)


# --- every endpoint that takes an access token ------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # {sid}, {uid} filled from the victim
    body: dict[str, t.Any] | None = None
    quiet: bool = False  # RFC 7009 revocation: 200 whatever the token, and no state change


PROTECTED = [
    Endpoint("POST", "/token/validate"),
    Endpoint("GET", "/me"),
    Endpoint("GET", "/sessions"),
    Endpoint("DELETE", "/sessions/{sid}"),
    Endpoint("POST", "/change-password",
             {"current_password": PASSWORD, "new_password": "an entirely new passphrase"}),
    Endpoint("POST", "/sso/issue", {"target": "site-rs"}),
    Endpoint("GET", "/admin/logs"),
    Endpoint("POST", "/admin/users/{uid}/unlock"),
    Endpoint("GET", "/admin/users/{uid}/sessions"),
    Endpoint("DELETE", "/admin/sessions/{sid}"),
    Endpoint("POST", "/token/revoke", {}, quiet=True),
    Endpoint("POST", "/token/revoke", {"scope": "others"}, quiet=True),
    Endpoint("POST", "/token/revoke", {"scope": "global"}, quiet=True),
]


def family(v: Victim, fleet: Fleet) -> dict[str, str]:
    """The representative forgeries: one of each kind the verifier must refuse."""
    agent = v.agent
    h, p, s = v.segments
    escalated = {**v.claims, "roles": ["administrator"]}
    late = now() - LEEWAY - 60
    other = site_key(next(a for a in fleet.agents if a is not agent))
    if site_key(agent).alg == "HS256":
        confusion = signed(v.header, escalated, "HS256", b"")
    else:
        key, _ = public_key(agent)
        pem = key.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        confusion = signed({**v.header, "alg": "HS256"}, escalated, "HS256", pem)
    return {
        "alg none": unsigned(enc({**v.header, "alg": "none"}), enc(escalated)),
        "null signature": f"{h}.{p}.",
        "broken signature": f"{h}.{enc(escalated)}.{s}",
        "flipped bit": f"{h}.{p}.{flip_bit(s)}",
        "key confusion": confusion,
        "expired": with_claims(v, iat=late - 300, nbf=late - 300, exp=late),
        "wrong aud": with_claims(v, aud="site-elsewhere"),
        "wrong iss": with_claims(v, iss=fleet.hub.url),
        "unknown kid": with_header(v, kid=random_kid()),
        "other site's key": other.sign({**v.header, "kid": other.kid, "alg": other.alg},
                                       v.claims),
        "refresh token": v.refresh_token,
    }


def _state(v: Victim) -> tuple[t.Any, ...]:
    """What a forged request could change: the password, the sessions, successful events."""
    agent = v.agent
    return (
        agent.rows("SELECT password_hash FROM hk_users WHERE id = ?", v.id),
        agent.rows("SELECT id, revoked_at FROM hk_sessions WHERE user_id = ? ORDER BY id", v.id),
        agent.rows("SELECT count(*) FROM hk_audit WHERE user_id = ? AND outcome = 'success'",
                   v.id),
        agent.counter(f"u:{v.id}"),
    )


@case("J-01", "J-02", "J-03", "J-04", "J-05", "J-24", "J-26", "J-29", "J-30", "J-21", "J-22")
@pytest.mark.parametrize("endpoint", PROTECTED,
                         ids=[f"{e.method} {e.path}{' ' + str(e.body) if e.quiet else ''}"
                              for e in PROTECTED])
def test_J_forgeries_on_every_protected_endpoint(agent: Agent, fleet: Fleet, endpoint: Endpoint,
                                                 attacker: Attacker) -> None:
    """The family of forgeries is refused by every route that takes an access token, and
    changes nothing: no password, session, lock or successful event."""
    v = victim(agent)
    # A second session of the same user: "others" / "global" revocations would end it.
    second = agent.post("/token", json={"username": v.username, "password": PASSWORD})
    assert second.status_code == 200, second.text
    sid = v.claims["sid"]
    path = endpoint.path.format(sid=sid, uid=v.id)
    before = _state(v)
    for name, token in family(v, fleet).items():
        if endpoint.quiet and name == "refresh token":
            continue  # a genuine refresh token may end its own session (RFC 7009)
        r = attacker.request(agent, endpoint.method, path, token, json=endpoint.body)
        if endpoint.quiet:
            assert r.status_code == 200, (name, r.status_code, r.text)
            assert r.json()["code"] == "jwt_auth_token_revoked", (name, r.text)
            assert r.json().get("global") in (None, False), (name, r.text)
            assert not TOKEN_FIELDS & set(r.json()), name
        else:
            assert_reject(r, f"{endpoint.method} {path} with {name}")
        assert r.status_code != 500
    assert _state(v) == before
    assert_valid(v)
    assert_valid(v, second.json()["token"])


@case("J-38")
def test_J38_body_and_header_token_answer_alike(fleet: Fleet, attacker: Attacker) -> None:
    """The token in the body or in the Authorization header: the same refusal."""
    v = victim(fleet["hs"])
    forged = with_claims(v, aud="elsewhere")
    a = attacker.validate(v.agent, forged)
    b = attacker.validate(v.agent, forged, in_body=True)
    assert (a.status_code, a.text) == (b.status_code, b.text)
    assert_reject(a)


# --- a site of its own: a configured audience and a tight validation limit ---------------------

OWN_LIMIT = 10  # HEADLESSKEY_VALIDATE_MAX_FAILURES of the site below
OWN_AUDIENCE = "site-x"


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Agent]:
    """A standalone HS256 site with ``aud`` configured and a limit of 10 failed validations."""
    site = Agent("x", tmp_path_factory.mktemp("jwt-own"), {
        "HEADLESSKEY_AUDIENCE": OWN_AUDIENCE,
        "HEADLESSKEY_VALIDATE_MAX_FAILURES": str(OWN_LIMIT),
        "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "1000",
    })
    site.algorithm = "HS256"
    try:
        site.init()
        site.start()
        assert site.service is not None
        site.service.wait_ready()
        yield site
    finally:
        site.stop()


@pytest.fixture(scope="module")
def own_twin(own: Agent) -> t.Iterator[Agent]:
    """A second ``serve`` of the same site (its instance and database), on a port of its own."""
    twin = Agent("x-twin", own.root, {})
    twin.instance, twin.env = own.instance, own.env
    twin.algorithm = own.algorithm
    try:
        twin.start()
        assert twin.service is not None
        twin.service.wait_ready()
        yield twin
    finally:
        twin.stop()


@case("J-29")
def test_J29_audience_configured(own: Agent, fleet: Fleet) -> None:
    """With an audience configured, only that exact string is accepted: not a list holding
    it, not a near spelling, not a missing ``aud``, not another site's token."""
    v = victim(own)
    assert v.claims["aud"] == OWN_AUDIENCE
    forgeries = {f"aud={aud!r}": with_claims(v, aud=aud)
                 for aud in ([OWN_AUDIENCE], [OWN_AUDIENCE, "site-hs"], ["site-hs", OWN_AUDIENCE],
                             OWN_AUDIENCE + " ", OWN_AUDIENCE.upper(), "Site-x", "site-", "",
                             None, own.base)}
    forgeries["aud missing"] = resign(own, v.token, drop=["aud"])
    forgeries["another site's token"] = victim(fleet["hs"]).token
    forgeries["another site's token, aud set"] = resign(
        fleet["hs"], victim(fleet["hs"]).token, aud=OWN_AUDIENCE)
    hostile = Attacker(per_address=OWN_LIMIT - 1)
    try:
        refuse_all(hostile, v, forgeries)
    finally:
        hostile.close()


@case("J-38")
def test_J38_validate_is_rate_limited_per_ip(own: Agent, own_twin: Agent) -> None:
    """After 10 invalid tokens in a minute an IP gets 429 with Retry-After for every token,
    valid ones included; valid tokens are not counted; other IPs are not affected. Requests
    alternate between two instances of the site, each on a new connection (either worker):
    they all share the one counter."""
    v = victim(own)
    mark = own.last_audit_id()
    address = next_address()
    instances = itertools.cycle([own, own_twin])

    def from_attacker(token: str) -> requests.Response:
        with session_from(address) as session:  # a new connection: either worker
            return next(instances).request("POST", "/token/validate", token=token,
                                           session=session)

    for _ in range(2 * OWN_LIMIT):  # valid validations: never counted
        r = from_attacker(v.token)
        assert r.status_code == 200, r.text
    for i in range(OWN_LIMIT):
        assert_reject(from_attacker(with_claims(v, exp=now() - 3600, n=i)), f"invalid {i}")
    for token in (v.token, "x.y.z", with_header(v, kid=random_kid())):
        r = from_attacker(token)
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "too_many_attempts", r.text
        assert 0 < int(r.headers["Retry-After"]) <= 60
        assert not TOKEN_FIELDS & set(r.json()) and "data" not in r.json()["data"]
    counter = own.counter(f"validate:{address}")
    assert counter is not None and counter[1], counter  # locked
    started = own.audit("lockout.started", mark)
    assert [row["details"] for row in started] == [{"scope": "validate", "seconds": 60}]
    # Another client, and the user's token, are not affected.
    assert_valid(v)
    with session_from(next_address()) as other:
        r = own.request("POST", "/token/validate", token=v.token, session=other)
        assert r.status_code == 200, r.text
