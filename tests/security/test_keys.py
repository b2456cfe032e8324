"""Checklist section 3: keys, the hub's JWKS, key registration, secrets and rotation.

The fleet's hub answers the cases about what it publishes and what it refuses to register
(through its signed site API, signed as a fleet site would sign). Rotation, the hub being
down, the console's secrets and the algorithm switch change state, so they run against a
federation of their own: a hub with its console over plain http and an admin, site ``a``
(access-token algorithm left to the hub, with its jobs process, so rotations and settings go
through) and site ``b`` (RS256). Its tests run in file order; the last one stops the hub.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import time
import typing as t
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.config import parse_hub_secret
from agent.hub_client import HubClient
from agent.hub_client import HubUnavailable
from tests.conftest import PASSWORD
from tests.hub.test_console import SITE_FORM
from tests.hub.test_console import Console
from tests.integration.test_site_policy import ADMIN_PASSWORD
from tests.integration.test_site_policy import UnpinnedAgent
from tests.integration.test_site_policy import applied
from tests.integration.test_sso import AGENT
from tests.integration.test_sso import Federation
from tests.integration.test_sso import as_from
from tests.integration.test_sso import b64url
from tests.integration.test_sso import clean_env
from tests.integration.test_sso import es256
from tests.integration.test_sso import exchange
from tests.integration.test_sso import fresh
from tests.integration.test_sso import hand_made
from tests.integration.test_sso import issue
from tests.integration.test_sso import login
from tests.integration.test_sso import new_user
from tests.integration.test_sso import run
from tests.integration.test_sso import unverified
from tests.security.conftest import Fleet

PRIVATE = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
SECRET = re.compile(r"hks_[A-Za-z0-9_-]{40,}")
KEYFED = {
    "HEADLESSKEY_DIRECTORY_REFRESH": "1",
    "HEADLESSKEY_SSO_ASSERTION_TTL": "5",
    "HEADLESSKEY_LEEWAY": "0",
    "HEADLESSKEY_JWKS_MAX_AGE": "0",
    "HEADLESSKEY_FEDERATION_STALE_WINDOW": "120",
    "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "1000",
    "HEADLESSKEY_LOCKOUT_MAX_FAILURES": "100",
}


def hub_jwks(url: str, **headers: str) -> requests.Response:
    return requests.get(url + "/.well-known/jwks.json", headers=headers, timeout=10)


def kids_of(url: str) -> list[str]:
    r = hub_jwks(url)
    assert r.status_code == 200, r.text
    return [k["kid"] for k in r.json()["keys"]]


def client_of(hub_url: str, site_key: str, secret: str) -> HubClient:
    return HubClient(hub_url, site_key, parse_hub_secret("secret", secret))


def refused(call: t.Callable[[], t.Any]) -> HubUnavailable:
    with pytest.raises(HubUnavailable) as info:
        call()
    return info.value


def ec_jwk(curve: ec.EllipticCurve, kid: str, alg: str = "ES256") -> dict[str, t.Any]:
    public = ec.generate_private_key(curve).public_key()
    numbers = public.public_numbers()
    size = (curve.key_size + 7) // 8
    name = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521",
            "secp256k1": "secp256k1"}[curve.name]
    return {"kty": "EC", "crv": name, "x": b64url(numbers.x.to_bytes(size, "big")),
            "y": b64url(numbers.y.to_bytes(size, "big")), "kid": kid, "alg": alg, "use": "sig"}


def rsa_jwk(bits: int, kid: str, *, private: bool = False) -> dict[str, t.Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key if private else key.public_key()))
    jwk.update(kid=kid, alg="RS256", use="sig")
    return t.cast(dict[str, t.Any], jwk)


# --- the fleet's hub ---------------------------------------------------------------------------


@pytest.mark.case("K-01")
def test_K01_jwks_is_public_only(fleet: Fleet) -> None:
    """Every published key is a public signing key with kid, use and alg; no private member
    and no HMAC key, at the hub and at each site."""
    r = hub_jwks(fleet.hub.url)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    keys = r.json()["keys"]
    sites = {k.get("hk_site") for k in keys}
    assert {a.site_key for a in fleet.agents} <= sites, sites  # every member's SSO key
    for agent in fleet.agents:
        site_keys = requests.get(agent.base + "/.well-known/jwks.json", timeout=10).json()["keys"]
        if agent.algorithm != "HS256":
            assert site_keys, f"{agent.name} publishes no access-token key"
        keys = keys + site_keys
    for key in keys:
        assert key["kty"] in ("RSA", "EC"), key
        assert isinstance(key.get("kid"), str) and key["kid"], key
        assert key.get("use") == "sig" or key.get("key_ops") == ["verify"], key
        assert key.get("alg") in ("RS256", "ES256"), key
        assert not PRIVATE & set(key), key
        if key["kty"] == "EC":
            assert key["crv"] == "P-256" and key["alg"] == "ES256", key
        else:
            assert key["alg"] == "RS256"
            assert len(base64.urlsafe_b64decode(key["n"] + "==")) * 8 >= 2048
    # The HS256 site's own JWKS lists nothing: its secret is never published.
    hs = requests.get(fleet["hs"].base + "/.well-known/jwks.json", timeout=10).json()
    assert hs["keys"] == []


@pytest.mark.case("K-02")
@pytest.mark.parametrize("case", ["rsa1024", "rsa2047", "p384", "p521", "secp256k1",
                                  "private-rsa", "private-ec", "oct", "hs256", "none",
                                  "alg-mismatch", "use-enc", "garbage"])
def test_K02_weak_or_private_keys_are_refused(fleet: Fleet, case: str) -> None:
    """The hub's key registration refuses short RSA keys, curves other than P-256, private
    members, HMAC keys and algorithms other than the key's own: 400, nothing published."""
    rs = fleet["rs"]
    kid = f"k02-{case}-{secrets.token_hex(6)}"
    jwk: t.Any
    if case == "rsa1024":
        jwk = rsa_jwk(1024, kid)
    elif case == "rsa2047":
        jwk = rsa_jwk(2047, kid)
    elif case == "p384":
        jwk = ec_jwk(ec.SECP384R1(), kid)
    elif case == "p521":
        jwk = ec_jwk(ec.SECP521R1(), kid)
    elif case == "secp256k1":
        jwk = ec_jwk(ec.SECP256K1(), kid)
    elif case == "private-rsa":
        jwk = rsa_jwk(2048, kid, private=True)
    elif case == "private-ec":
        jwk = dict(ec_jwk(ec.SECP256R1(), kid), d=b64url(secrets.token_bytes(32)))
    elif case == "oct":
        jwk = {"kty": "oct", "k": b64url(secrets.token_bytes(32)), "kid": kid, "alg": "HS256"}
    elif case == "hs256":
        jwk = dict(ec_jwk(ec.SECP256R1(), kid), alg="HS256")
    elif case == "none":
        jwk = dict(ec_jwk(ec.SECP256R1(), kid), alg="none")
    elif case == "alg-mismatch":  # a P-256 key declared as RS256
        jwk = dict(ec_jwk(ec.SECP256R1(), kid), alg="RS256")
    elif case == "use-enc":
        jwk = dict(ec_jwk(ec.SECP256R1(), kid), use="enc")
    else:
        jwk = {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": kid, "alg": "ES256"}
    client = client_of(fleet.hub.url, rs.site_key, rs.secret)
    error = refused(lambda: client.register_key(jwk, "next"))
    assert error.status == 400, error
    assert kid not in kids_of(fleet.hub.url)


@pytest.mark.case("K-03")
def test_K03_kids_are_unique_and_cannot_be_taken(fleet: Fleet) -> None:
    """kids are unique across the federation; registering another site's kid, or one's own
    kid with other key material, is a 409 and changes nothing."""
    document = hub_jwks(fleet.hub.url).json()
    kids = [k["kid"] for k in document["keys"]]
    assert len(kids) == len(set(kids)), kids
    hs_kid = next(k["kid"] for k in document["keys"] if k["hk_site"] == fleet["hs"].site_key)
    rs = fleet["rs"]
    rs_kid = next(k["kid"] for k in document["keys"] if k["hk_site"] == rs.site_key)
    client = client_of(fleet.hub.url, rs.site_key, rs.secret)
    for kid in (hs_kid, rs_kid):
        jwk = ec_jwk(ec.SECP256R1(), kid)
        error = refused(lambda: client.register_key(jwk, "next"))  # noqa: B023 (called at once)
        assert error.status == 409 and error.code == "kid_taken", error
    after = hub_jwks(fleet.hub.url).json()
    assert after == document


@pytest.mark.case("K-06")
def test_K06_jwks_caching_headers(fleet: Fleet) -> None:
    """The hub's JWKS has a short max-age and an ETag, and a conditional GET is a 304."""
    first = hub_jwks(fleet.hub.url)
    match = re.search(r"max-age=(\d+)", first.headers.get("Cache-Control", ""))
    assert match and 0 < int(match.group(1)) <= 3600, first.headers
    etag = first.headers["ETag"]
    again = hub_jwks(fleet.hub.url, **{"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["ETag"] == etag
    other = hub_jwks(fleet.hub.url, **{"If-None-Match": '"not-the-etag"'})
    assert other.status_code == 200 and other.json() == first.json()
    for agent in fleet.agents:  # each site's own JWKS too
        r = requests.get(agent.base + "/.well-known/jwks.json", timeout=10)
        assert re.search(r"max-age=\d+", r.headers.get("Cache-Control", "")), r.headers
        assert "no-store" not in r.headers.get("Cache-Control", "")
        site_etag = r.headers.get("ETag")
        assert site_etag, r.headers
        again = requests.get(agent.base + "/.well-known/jwks.json", timeout=10,
                             headers={"If-None-Match": site_etag})
        assert again.status_code == 304, again.text


@pytest.mark.case("K-08")
@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:70/",
                                 "//hub.example"])
def test_K08_hub_url_must_be_http(fleet: Fleet, url: str, tmp_path: Path) -> None:
    """The hub URL (where the keys come from) is refused at join and at config load unless
    it is an http(s) URL; plain http only to a private host (tests/agent/test_config.py covers
    that rule: the configuration and `join` share the function)."""
    assert AGENT
    joined = subprocess.run(  # noqa: S603 - our own executable
        [AGENT, "join", "--instance", str(tmp_path), "--hub", url, "--site-key", "site-x",
         "--secret-stdin"], input=fleet["hs"].secret + "\n", capture_output=True, text=True,
        env=clean_env(), timeout=60)
    assert joined.returncode != 0
    assert "http(s) URL" in joined.stderr + joined.stdout, joined.stderr
    assert not (tmp_path / "hub-secret.key").exists()
    if not url.startswith("file:"):
        return  # the configuration's check is the same function: one scheme shows it
    secret_file = tmp_path / "secret.key"
    secret_file.write_text(fleet["hs"].secret + "\n")
    loaded = subprocess.run(  # noqa: S603 - our own executable
        [AGENT, "keys", "list", "--instance", str(fleet["hs"].instance)], capture_output=True,
        text=True, timeout=60,
        env={**fleet["hs"].env, "HEADLESSKEY_HUB_URL": url, "HEADLESSKEY_HUB_SITE_KEY": "site-hs",
             "HEADLESSKEY_HUB_SECRET_FILE": str(secret_file)})
    assert loaded.returncode != 0
    assert "HUB_URL" in loaded.stderr + loaded.stdout, loaded.stderr


# --- a federation of its own ------------------------------------------------------------------


class KeyFed:
    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.hub = fed.hub
        self.a = fed["a"]
        self.b = fed["b"]
        self.console = Console(fed.hub)  # type: ignore[arg-type]
        r = self.console.login("admin", ADMIN_PASSWORD)
        assert r.status_code == 302, r.text


@pytest.fixture(scope="module")
def keyfed(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[KeyFed]:
    root = tmp_path_factory.mktemp("keys")
    fed = Federation(root, ["a", "b"], KEYFED)
    fed.hub.env["HEADLESSKEY_HUB_SECURE_COOKIES"] = "false"  # the console over plain http
    a = UnpinnedAgent("a", root, KEYFED)  # HS256 until the hub says otherwise
    a.jobs = True
    fed.agents["a"] = a
    fed["b"].algorithm = "RS256"
    try:
        fed._build()
        fed.hub.cli("admins", "create", "--username", "admin", "--password-stdin",
                    stdin=ADMIN_PASSWORD + "\n")
        built = KeyFed(fed)
    except BaseException:
        fed.stop()
        raise
    try:
        yield built
    finally:
        fed.stop()


@pytest.mark.case("A-20")
def test_A20_no_default_console_accounts(keyfed: KeyFed) -> None:
    """admin/admin and the like do not open the hub console."""
    for username, password in (("admin", "admin"), ("root", "root"), ("admin", "password"),
                               ("administrator", "administrator")):
        console = Console(keyfed.hub)  # type: ignore[arg-type]
        r = console.login(username, password)
        assert r.status_code == 200 and "Invalid username or password." in r.text
        assert console.get("/").status_code == 302  # still signed out


@pytest.mark.case("K-09")
def test_K09_secret_shown_once_then_rotated_with_a_grace(keyfed: KeyFed) -> None:
    """The console shows a site's secret on the onboarding answer only, never again; a
    rotation shows the new one once; the old one works for the grace period and no longer."""
    console, hub = keyfed.console, keyfed.hub
    key = f"k09-{secrets.token_hex(4)}"
    r = console.onboard(**{**SITE_FORM, "name": f"Shop {key}", "site_key": key,
                           "base_url": f"https://{key}.example.com"})
    assert r.status_code == 200, r.text
    (secret,) = set(SECRET.findall(r.text))
    assert client_of(hub.url, key, secret).directory()["site"]
    for page in (f"/console/sites/{key}", "/console/sites", "/"):
        text = console.get(page).text
        assert secret not in text and not SECRET.search(text), page
    stored = hub.store.dump()
    assert secret.encode() not in stored
    assert base64.urlsafe_b64decode(secret[4:] + "==") not in stored  # encrypted at rest

    r = console.post(f"/console/sites/{key}/rotate-secret", form_page=f"/console/sites/{key}")
    assert r.status_code == 200, r.text
    (rotated,) = set(SECRET.findall(r.text))
    assert rotated != secret
    assert not SECRET.search(console.get(f"/console/sites/{key}").text)
    for valid in (secret, rotated):  # the old one within its grace period (24 h by default)
        assert client_of(hub.url, key, valid).directory()

    # The grace period ends: a site onboarded and rotated with a grace of 2 s.
    other = f"k09g-{secrets.token_hex(4)}"
    first = json.loads(hub.cli("sites", "add", "--name", f"Grace {other}", "--url",
                               f"https://{other}.example.com", "--key", other, "--json").stdout)
    out = json.loads(hub.cli("sites", "rotate-secret", other, "--grace", "2", "--json").stdout)
    assert out["grace_seconds"] == 2 and out["secret"] != first["secret"]
    assert client_of(hub.url, other, first["secret"]).directory()  # within the grace period
    time.sleep(2.5)
    error = refused(lambda: client_of(hub.url, other, first["secret"]).directory())
    assert error.status == 401 and error.code == "bad_signature", error
    assert client_of(hub.url, other, out["secret"]).directory()


@pytest.mark.case("K-10")
def test_K10_algorithm_switch_needs_reauth_and_binds_keys(keyfed: KeyFed) -> None:
    """The console asks for the admin's password to switch a site's algorithm (without it,
    nothing changes); after the switch the old key still verifies only its own HS256 tokens,
    the new key only ES256, and neither key's bytes work under the other algorithm."""
    a, console = keyfed.a, keyfed.console
    user = new_user(a, "k10")
    before = jwt.get_unverified_header(user.token)
    assert before["alg"] == "HS256"
    url = f"/console/sites/{a.site_key}/settings/algorithms"
    for form in ({"ALGORITHM": "ES256"}, {"ALGORITHM": "ES256", "password": "not it at all"}):
        r = console.post(url, form, form_page=url)
        assert r.status_code == 403 and 'id="password-error"' in r.text, r.text
    time.sleep(2.5)  # two directory refreshes: nothing new reached the site
    assert applied(a).get("settings", {}).get("ALGORITHM") is None
    assert jwt.get_unverified_header(login(a, "k10").token)["alg"] == "HS256"

    r = console.post(url, {"ALGORITHM": "ES256", "password": ADMIN_PASSWORD}, form_page=url)
    assert r.status_code == 302, r.text
    deadline = time.monotonic() + 30
    while True:
        after = login(a, "k10")
        if jwt.get_unverified_header(after.token)["alg"] == "ES256":
            break
        assert time.monotonic() < deadline, "the site still signs with HS256"
        time.sleep(0.5)
    new_kid = jwt.get_unverified_header(after.token)["kid"]
    assert new_kid != before["kid"]
    assert a.get("/me", token=user.token).status_code == 200  # signed before: still valid
    assert a.get("/me", token=after.token).status_code == 200

    jwks = requests.get(a.base + "/.well-known/jwks.json", timeout=10).json()["keys"]
    (published,) = [k for k in jwks if k["kid"] == new_kid]
    assert published["alg"] == "ES256" and before["kid"] not in {k["kid"] for k in jwks}
    public = jwt.PyJWK(published).key
    claims = unverified(after.token)[1]
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    forgeries = {
        # the new key's public bytes as an HMAC secret, under its own kid
        "ES key as HS256": hand_made({"alg": "HS256", "kid": new_kid, "typ": "at+jwt"},
                                     claims, pem),
        # the old HS256 token relabelled ES256 (its kid is the old key's)
        "old token as ES256": _relabel(user.token, "ES256"),
        # an ES256 signature by an attacker's key under the old HS256 kid
        "ES256 under HS kid": jwt.encode(
            unverified(user.token)[1], ec.generate_private_key(ec.SECP256R1()),
            algorithm="ES256", headers={"kid": before["kid"], "typ": "at+jwt"}),
    }
    for what, token in forgeries.items():
        r = a.get("/me", token=token)
        assert r.status_code == 401 and r.json()["code"] == "invalid_token", (what, r.text)
    assert a.get("/me", token=user.token).status_code == 200  # persistence
    # Put the site back on its own choice (the password again).
    r = console.post(url, {"ALGORITHM": "", "password": ADMIN_PASSWORD}, form_page=url)
    assert r.status_code == 302, r.text


def _relabel(token: str, alg: str) -> str:
    head, payload, signature = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=="))
    header["alg"] = alg
    return ".".join([b64url(json.dumps(header, separators=(",", ":")).encode()), payload,
                     signature])


@pytest.mark.case("K-04", "K-05", "K-03")
def test_K04_K05_rotation_publishes_first_and_overlaps(keyfed: KeyFed) -> None:
    """A forced rotation of A's SSO key: the new key is in the hub's JWKS before the first
    assertion it signs; assertions of the old key stay accepted while it is published; once
    it leaves the JWKS, assertions signed with it are refused."""
    fed, hub, a, b = keyfed.fed, keyfed.hub, keyfed.a, keyfed.b
    user = new_user(a, "k04")
    header, claims = unverified(issue(a, user.token, b.site_key)["token"])
    k1 = header["kid"]
    old_pem = a.federation_pem  # the key `join` made: K1

    def old_key_assertion() -> dict[str, str]:
        return as_from(fed, "a", "b", es256(old_pem, fresh(claims, exp=int(time.time()) + 5), k1))

    r = exchange(b, old_key_assertion())
    assert r.status_code == 200, r.text  # control: K1 signs and verifies today
    before = set(kids_of(hub.url))
    rotated = time.monotonic()
    run(AGENT, "keys", "rotate", "--instance", str(a.instance), "--what", "federation",
        env=a.env)
    (k2,) = set(kids_of(hub.url)) - before
    published = time.monotonic()
    first_k2: float | None = None
    overlap_checked = False
    deadline = rotated + 60
    while time.monotonic() < deadline:
        assertion = issue(a, user.token, b.site_key)
        kid = jwt.get_unverified_header(assertion["token"])["kid"]
        assert kid in (k1, k2), kid
        if kid == k2 and first_k2 is None:
            first_k2 = time.monotonic()
            r = exchange(b, assertion)
            assert r.status_code == 200, r.text  # B's cached directory already had K2
        listed = kids_of(hub.url)
        assert k2 in listed
        if first_k2 is not None and k1 in listed and not overlap_checked:
            r = exchange(b, old_key_assertion())  # K2 signs; K1 still verifies
            assert r.status_code == 200, r.text
            overlap_checked = True
        if first_k2 is not None and k1 not in listed:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"K1 still published {time.monotonic() - rotated:.0f} s after the "
                             "rotation")
    assert first_k2 is not None and overlap_checked
    # K-05: published at least two directory refreshes (2 s) before it signed.
    assert first_k2 - published >= 2.0, first_k2 - published
    time.sleep(2.5)  # B's copy of the directory is refreshed
    r = exchange(b, old_key_assertion())
    assert r.status_code == 401 and r.json()["code"] == "invalid_assertion", r.text
    kids = kids_of(hub.url)
    assert len(kids) == len(set(kids)) and k1 not in kids


@pytest.mark.case("K-07")
def test_K07_hub_down_keeps_the_last_good_keys(keyfed: KeyFed) -> None:
    """With the hub down, B keeps verifying A's assertions with the keys it fetched last
    (fail-safe), refuses unknown kids (not fail-open), and local tokens keep working. Stops
    the module's hub: the last test of the module."""
    fed, hub, a, b = keyfed.fed, keyfed.hub, keyfed.a, keyfed.b
    user = new_user(a, "k07")
    at_b = exchange(b, issue(a, user.token, b.site_key))
    assert at_b.status_code == 200, at_b.text
    hub.stop()
    assert refused(lambda: client_of(hub.url, a.site_key, a.secret).directory()).status == 0
    # Both copies are past their refresh interval: each site tries the hub, fails, and serves
    # from the copy it has.
    a.set_directory_times(fetched_ago=30, attempted_ago=30)
    b.set_directory_times(fetched_ago=30, attempted_ago=30)
    assertion = issue(a, user.token, b.site_key)
    r = exchange(b, assertion)
    assert r.status_code == 200, r.text
    header, claims = unverified(assertion["token"])
    unknown = es256(a.federation_pem, fresh(claims), f"unknown-{secrets.token_hex(8)}")
    r = exchange(b, as_from(fed, "a", "b", unknown))
    assert r.status_code == 401 and r.json()["code"] == "invalid_assertion", r.text
    assert b.get("/me", token=at_b.json()["token"]).status_code == 200
    assert a.get("/me", token=user.token).status_code == 200
    assert a.post("/token", json={"username": user.username, "password": PASSWORD}
                  ).status_code == 200
