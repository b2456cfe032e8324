"""Checklist section 7: ``/sso/exchange`` between the fleet's sites, and the hub's signed API.

The fleet is a real federation: a hub and three member sites (HS256, RS256 and ES256 access
tokens). Exchanges go between them, genuine and forged (pairwise keys ``k()`` derived as the hub
derives them, hand-made JWS). The hub's site API (``/api/v1``, DESIGN §4) is called with requests
signed here exactly as ``agent.signing`` signs them, then tampered with: each refusal must be a
401, write nothing, burn no nonce, and leave the genuine signer working.

The hub API cases use sites of their own, added with ``headlesskey-hub sites add`` while the hub
runs, so rotating or suspending them never touches the fleet's members.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jwt
import pytest
import requests
from requests.adapters import HTTPAdapter

from agent import signing
from agent.config import parse_hub_secret
from tests.integration.test_sso import SSO_TYP
from tests.integration.test_sso import Hub
from tests.integration.test_sso import as_from
from tests.integration.test_sso import db_time
from tests.integration.test_sso import exchange
from tests.integration.test_sso import fresh
from tests.integration.test_sso import hand_made
from tests.integration.test_sso import issue
from tests.integration.test_sso import k
from tests.integration.test_sso import mac
from tests.integration.test_sso import unverified
from tests.security.conftest import ALGORITHMS
from tests.security.conftest import Fleet
from tests.security.conftest import fresh_user

PAIRS = [("hs", "rs"), ("rs", "es"), ("es", "hs")]
BAD_SIGNATURE = {"code": "bad_signature", "message": "The signature does not match.",
                 "data": {"status": 401}}
INVALID_ASSERTION = "invalid_assertion"


# --- signed calls to the hub -----------------------------------------------------------------


@dataclass
class Member:
    """A site registered at the hub (no agent behind it): its key and raw secret."""

    site_key: str
    secret: bytes


def add_member(hub: Hub, prefix: str = "probe") -> Member:
    key = f"{prefix}-{secrets.token_hex(4)}"
    added = json.loads(hub.cli("sites", "add", "--name", f"Probe {key}",
                               "--url", f"https://{key}.example.com", "--key", key,
                               "--json").stdout)
    return Member(key, parse_hub_secret("secret", added["secret"]))


def signed(member: Member, method: str, path: str, query: str = "", body: bytes = b"",
           **kw: t.Any) -> dict[str, str]:
    headers = signing.sign_request(member.secret, member.site_key, method, path, query, body, **kw)
    if body:
        headers["Content-Type"] = "application/json"
    return headers


def send(hub: Hub, method: str, path: str, headers: dict[str, str], query: str = "",
         body: bytes = b"", session: requests.Session | None = None) -> requests.Response:
    url = hub.url + path + (f"?{query}" if query else "")
    return (session or requests).request(method, url, headers=headers, data=body, timeout=30)


def call(hub: Hub, member: Member, method: str, path: str, query: str = "",
         body: bytes = b"") -> requests.Response:
    """A genuine signed call."""
    return send(hub, method, path, signed(member, method, path, query, body), query, body)


class _FromAddress(HTTPAdapter):
    def __init__(self, ip: str) -> None:
        self.ip = ip
        super().__init__()

    def init_poolmanager(self, *args: t.Any, **kw: t.Any) -> None:
        super().init_poolmanager(*args, source_address=(self.ip, 0), **kw)


def own_address() -> requests.Session:
    """A client on a loopback address of its own (127.x.y.z; the hub sees it, not 127.0.0.1).

    The hub writes at most ``RefusalLog.BURST`` refusals of one address a minute to its log, and
    the whole security suite refuses requests from 127.0.0.1: a test that reads its refusals back
    from the log sends them from an address no other test used.
    """
    session = requests.Session()
    session.mount("http://", _FromAddress(f"127.{secrets.randbelow(254) + 1}."
                                          f"{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"))
    return session


def rejected_reasons(hub: Hub, site_key: str, after: int) -> list[str]:
    rows = hub.rows("SELECT details FROM hub_events WHERE event = 'api.rejected' AND id > ? "
                    "AND site_key = ? ORDER BY id", after, site_key)
    return [json.loads(details)["reason"] for (details,) in rows]


def last_event(hub: Hub) -> int:
    return int(hub.rows("SELECT coalesce(max(id), 0) FROM hub_events")[0][0])


def site_events(hub: Hub, site_key: str) -> int:
    return int(hub.rows("SELECT count(*) FROM hub_events WHERE source = 'site' AND site_key = ?",
                        site_key)[0][0])


def event_batch(remote_id: str) -> bytes:
    now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"events": [{"id": remote_id, "event": "login.failed", "time": now}]},
                      separators=(",", ":")).encode()


def assert_401(r: requests.Response, code: str | None = None) -> None:
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    body = r.json()
    if code is not None:
        assert body["code"] == code, r.text
    assert "secret" not in body, r.text


@pytest.fixture(scope="module")
def member(fleet: Fleet) -> Member:
    return add_member(fleet.hub)


# --- H-01 .. H-07, H-10: the hub's signed API --------------------------------------------------


@pytest.mark.case("H-01")
def test_H01_missing_or_junk_signature_is_401_never_500(fleet: Fleet, member: Member) -> None:
    """No signature header, or an empty, ``null``, numeric, array-shaped or prefix-only one: a
    401 (``unsigned_request`` when missing or empty), no nonce used, no event stored."""
    hub = fleet.hub
    body = event_batch("h01")
    good = signed(member, "POST", "/api/v1/events", body=body)
    nonces, stored = hub.signed_calls(member.site_key), site_events(hub, member.site_key)
    missing = {k: v for k, v in good.items() if k != signing.HEADER_SIGNATURE}
    assert_401(send(hub, "POST", "/api/v1/events", missing, body=body), "unsigned_request")
    for other in (signing.HEADER_SITE, signing.HEADER_TIMESTAMP, signing.HEADER_NONCE):
        partial = {k: v for k, v in good.items() if k != other}
        assert_401(send(hub, "POST", "/api/v1/events", partial, body=body), "unsigned_request")
    for junk in ("", "null", "0", "12345", '["v1=00"]', "v1=", "v1", "{}", "true"):
        headers = dict(good, **{signing.HEADER_SIGNATURE: junk})
        r = send(hub, "POST", "/api/v1/events", headers, body=body)
        assert_401(r)
        assert r.json()["code"] in ("unsigned_request", "bad_signature"), (junk, r.text)
    assert hub.signed_calls(member.site_key) == nonces
    assert site_events(hub, member.site_key) == stored
    # Persistence: the genuine request, never spent by the junk ones, still goes through.
    assert send(hub, "POST", "/api/v1/events", good, body=body).status_code == 200


@pytest.mark.case("H-01")
def test_H01_exchange_signature_of_every_json_type(fleet: Fleet) -> None:
    """``/sso/exchange`` with the signature missing, empty, null, a number, an array or an object:
    401 ``invalid_assertion`` (never 500, no tokens); the genuine assertion then works."""
    hs, rs = fleet["hs"], fleet["rs"]
    user = fresh_user(hs)
    assertion = issue(hs, user.token, "site-rs")
    fields = {k: assertion[k] for k in ("site_key", "token")}
    for value in (None, "", 0, 12345, [assertion["signature"]], {"v1": assertion["signature"]},
                  True):
        r = rs.post("/sso/exchange", json=dict(fields, signature=value))
        assert r.status_code == 401, (value, r.status_code, r.text)
        assert r.json()["code"] == INVALID_ASSERTION
        assert "token" not in r.json() and "refresh_token" not in r.json()
    r = rs.post("/sso/exchange", json=fields)
    assert r.status_code == 401 and r.json()["code"] == INVALID_ASSERTION, r.text
    assert exchange(rs, assertion).status_code == 200


@pytest.mark.case("H-02")
def test_H02_signed_with_another_sites_secret(fleet: Fleet, member: Member) -> None:
    """A request naming site A but signed with site B's secret is refused exactly like a bad
    signature; the same for an exchange MACed with another pair's key."""
    hub = fleet.hub
    mark = last_event(hub)
    # Site rs's own secret, but the request names the probe site.
    forged = signing.sign_request(fleet["rs"].raw_secret, member.site_key, "GET",
                                  "/api/v1/directory")
    r = send(hub, "GET", "/api/v1/directory", forged, session=own_address())
    assert_401(r)
    assert r.json() == BAD_SIGNATURE
    assert rejected_reasons(hub, member.site_key, mark) == ["bad"]
    assert call(hub, member, "GET", "/api/v1/directory").status_code == 200

    # Exchange: hs's assertion for rs, MACed with K(es->rs) (rs holds it), still naming hs.
    hs, rs = fleet["hs"], fleet["rs"]
    user = fresh_user(hs)
    assertion = issue(hs, user.token, "site-rs")
    wrong_key = dict(assertion, signature=mac(k(fleet.fed, "es", "rs"), assertion["token"]))
    r = exchange(rs, wrong_key)
    assert r.status_code == 401 and r.json()["code"] == INVALID_ASSERTION, r.text
    # The same token named as coming from es (whose key matches the MAC) is still refused.
    as_es = dict(wrong_key, site_key="site-es")
    r = exchange(rs, as_es)
    assert r.status_code == 401 and r.json()["code"] == INVALID_ASSERTION, r.text
    assert exchange(rs, assertion).status_code == 200


@pytest.mark.case("H-04")
def test_H04_signature_binds_method_path_query_and_raw_body(
    fleet: Fleet, member: Member
) -> None:
    """A valid signature replayed on another method, path, query or body (one byte, or the same
    JSON with other whitespace, or no longer JSON at all) is 401 ``bad_signature``: verified
    over the raw bytes, before parsing. Nothing is stored or rotated."""
    hub = fleet.hub
    body = event_batch("h04")
    stored = site_events(hub, member.site_key)
    secrets_before = hub.rows("SELECT count(*) FROM hub_site_secrets s JOIN hub_sites t "
                              "ON s.site_id = t.id WHERE t.site_key = ?", member.site_key)
    mark = last_event(hub)
    client = own_address()

    def refused(method: str, path: str, headers: dict[str, str], query: str = "",
                data: bytes = b"") -> None:
        r = send(hub, method, path, headers, query, data, session=client)
        assert_401(r, "bad_signature")
        assert r.json() == BAD_SIGNATURE

    # Body: one byte changed; the same JSON re-spaced; something that is not JSON.
    headers = signed(member, "POST", "/api/v1/events", body=body)
    refused("POST", "/api/v1/events", headers, data=body.replace(b"h04", b"h05"))
    refused("POST", "/api/v1/events", headers, data=json.dumps(json.loads(body)).encode())
    refused("POST", "/api/v1/events", headers, data=body + b" ")
    refused("POST", "/api/v1/events", headers, data=b"{not json")
    # Method: GET signed, POST sent (to a route that takes POST).
    refused("POST", "/api/v1/secret/rotate", signed(member, "GET", "/api/v1/secret/rotate"))
    # Path: a key retirement signed for one kid, sent for another.
    refused("DELETE", "/api/v1/keys/victim-kid", signed(member, "DELETE", "/api/v1/keys/my-kid"))
    # Query: changed, added, or dropped.
    q_headers = signed(member, "GET", "/api/v1/directory", "a=1")
    refused("GET", "/api/v1/directory", q_headers, "a=2")
    refused("GET", "/api/v1/directory", q_headers, "a=1&b=2")
    refused("GET", "/api/v1/directory", q_headers)

    assert site_events(hub, member.site_key) == stored
    assert hub.rows("SELECT count(*) FROM hub_site_secrets s JOIN hub_sites t "
                    "ON s.site_id = t.id WHERE t.site_key = ?", member.site_key) == secrets_before
    assert set(rejected_reasons(hub, member.site_key, mark)) == {"bad"}
    # Control: the query is canonical (sorted), and the untouched body goes through.
    ordered = signed(member, "GET", "/api/v1/directory", "b=2&a=1")
    assert send(hub, "GET", "/api/v1/directory", ordered, "a=1&b=2").status_code == 200
    r = send(hub, "POST", "/api/v1/events", headers, body=body)
    assert r.status_code == 200 and r.json() == {"accepted": 1}, r.text


@pytest.mark.case("H-05")
def test_H05_timestamps_beyond_300_seconds_either_way(fleet: Fleet, member: Member) -> None:
    """Signed 301 s in the past or in the future: 401 ``skewed_request``, nonce not burned;
    299 s either way is accepted."""
    hub = fleet.hub
    now = time.time()
    for offset in (-301, 301, -3600, 10**9):
        nonce = secrets.token_urlsafe(18)
        headers = signed(member, "GET", "/api/v1/directory", now=now + offset, nonce=nonce)
        assert_401(send(hub, "GET", "/api/v1/directory", headers), "skewed_request")
    for offset in (-299, 299):
        headers = signed(member, "GET", "/api/v1/directory", now=time.time() + offset)
        r = send(hub, "GET", "/api/v1/directory", headers)
        assert r.status_code == 200, (offset, r.text)
    # A timestamp that is no number at all.
    headers = dict(signed(member, "GET", "/api/v1/directory"),
                   **{signing.HEADER_TIMESTAMP: "-1"})
    assert_401(send(hub, "GET", "/api/v1/directory", headers), "bad_signature")


@pytest.mark.case("H-06")
def test_H06_a_nonce_is_accepted_once(fleet: Fleet, member: Member) -> None:
    """The same signed request twice: 200 then 401 ``replayed_request``; sent by eight threads
    at once to two workers, exactly one wins; the replays store nothing."""
    hub = fleet.hub
    body = event_batch("h06")
    headers = signed(member, "POST", "/api/v1/events", body=body)
    assert send(hub, "POST", "/api/v1/events", headers, body=body).status_code == 200
    assert_401(send(hub, "POST", "/api/v1/events", headers, body=body), "replayed_request")

    body = event_batch("h06-parallel")
    headers = signed(member, "POST", "/api/v1/events", body=body)
    stored = site_events(hub, member.site_key)
    n = 8
    barrier = threading.Barrier(n)

    def attempt(_: int) -> requests.Response:
        with requests.Session() as http:
            barrier.wait(10)
            return send(hub, "POST", "/api/v1/events", headers, body=body, session=http)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(attempt, range(n)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] + [401] * (n - 1), [(r.status_code, r.text[:60]) for r in answers]
    assert all(r.json()["code"] == "replayed_request" for r in answers if r.status_code == 401)
    assert site_events(hub, member.site_key) == stored + 1


@pytest.mark.case("H-07")
def test_H07_truncated_or_recased_signatures(fleet: Fleet, member: Member) -> None:
    """Half the digest, upper-case hex, a trailing ``=`` or byte, a bit flipped, another version
    prefix: each the same 401 as a wrong signature; the genuine request then passes."""
    hub = fleet.hub
    headers = signed(member, "GET", "/api/v1/directory")
    digest = headers[signing.HEADER_SIGNATURE].removeprefix("v1=")
    flipped = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    for variant in (f"v1={digest[:32]}", f"v1={digest[:63]}", f"v1={digest.upper()}",
                    f"V1={digest}", f"v1={digest}=", f"v1={digest}00", f"v2={digest}",
                    f"v1= {digest}", f"v1={flipped}", digest):
        r = send(hub, "GET", "/api/v1/directory", dict(headers, **{signing.HEADER_SIGNATURE:
                                                                   variant}))
        assert_401(r)
        assert r.json() == BAD_SIGNATURE, (variant, r.text)
    assert send(hub, "GET", "/api/v1/directory", headers).status_code == 200


@pytest.mark.case("H-08")
def test_H08_timing() -> None:
    """Optional statistical case."""
    pytest.skip("optional statistical case: over loopback HTTP to 2 gunicorn workers on a "
                "shared 2-core machine the jitter (milliseconds) is far above a digest "
                "comparison (nanoseconds); both sides compare with hmac.compare_digest "
                "(agent.signing.verify, agent.federation)")


@pytest.mark.case("H-10")
def test_H10_unknown_and_suspended_sites_look_like_a_bad_signature(fleet: Fleet) -> None:
    """A site key the hub does not know, and a suspended site signing correctly (it was accepted
    just before), get the very body of a wrong signature; at an agent, an unknown peer gets the
    one ``invalid_assertion``."""
    hub = fleet.hub
    ghost = Member(f"ghost-{secrets.token_hex(4)}", secrets.token_bytes(32))
    r = call(hub, ghost, "GET", "/api/v1/directory")
    assert_401(r)
    assert r.json() == BAD_SIGNATURE

    paused = add_member(hub, "paused")
    assert call(hub, paused, "GET", "/api/v1/directory").status_code == 200
    hub.cli("sites", "suspend", paused.site_key)
    mark = last_event(hub)
    r = send(hub, "GET", "/api/v1/directory", signed(paused, "GET", "/api/v1/directory"),
             session=own_address())
    assert_401(r)
    assert r.json() == BAD_SIGNATURE
    assert rejected_reasons(hub, paused.site_key, mark) == ["suspended"]

    # The exchange: a peer nobody knows, versus a known peer with a bad MAC.
    hs, rs = fleet["hs"], fleet["rs"]
    assertion = issue(hs, fresh_user(hs).token, "site-rs")
    unknown = exchange(rs, dict(assertion, site_key="site-nowhere"))
    bad_mac = exchange(rs, dict(assertion, signature="0" * 64))
    assert unknown.status_code == bad_mac.status_code == 401
    assert unknown.json() == bad_mac.json()
    assert exchange(rs, assertion).status_code == 200


@pytest.mark.case("H-11")
def test_H11_secret_rotation_grace_then_only_the_new_secret(fleet: Fleet) -> None:
    """After ``POST /api/v1/secret/rotate`` both secrets sign valid calls; once the grace period
    is over (its end moved into the past) the old one is 401 and the new one works."""
    hub = fleet.hub
    old = add_member(hub, "rotor")
    r = call(hub, old, "POST", "/api/v1/secret/rotate", body=b"{}")
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    answer = r.json()
    assert answer["grace_seconds"] > 0
    new = Member(old.site_key, parse_hub_secret("secret", answer["secret"]))
    assert new.secret != old.secret
    assert call(hub, old, "GET", "/api/v1/directory").status_code == 200
    assert call(hub, new, "GET", "/api/v1/directory").status_code == 200

    ended = hub.store.write(
        "UPDATE hub_site_secrets SET expires_at = ? WHERE expires_at IS NOT NULL "
        "AND site_id = (SELECT id FROM hub_sites WHERE site_key = ?)", db_time(1), old.site_key)
    assert ended == 1
    r = call(hub, old, "GET", "/api/v1/directory")
    assert_401(r)
    assert r.json() == BAD_SIGNATURE
    assert call(hub, new, "GET", "/api/v1/directory").status_code == 200


@pytest.mark.case("H-12")
def test_H12_hub_secrets_are_random_and_never_stored_or_logged_in_clear(
    fleet: Fleet, member: Member
) -> None:
    """(unit) Secrets from ``sites add`` are 32 CSPRNG bytes (``hks_`` + base64url), all
    different, and neither their text nor their bytes appear in the hub's database files or
    its log (the fleet's sites' secrets neither)."""
    from hub.crypto import SECRET_BYTES
    from hub.crypto import new_site_secret

    hub = fleet.hub
    made = [member, add_member(hub, "quality")]
    made += [Member(site.site_key, site.raw_secret) for site in fleet.agents]
    assert len({m.secret for m in made}) == len(made)
    assert all(32 <= len(m.secret) <= 64 for m in made)
    assert SECRET_BYTES == 32
    raws = {new_site_secret()[0] for _ in range(50)}
    assert len(raws) == 50 and {len(r) for r in raws} == {32}

    blobs = hub.store.dump()
    assert hub.service is not None
    log = hub.service.logs().encode()
    import base64
    for m in made:
        text = "hks_" + base64.urlsafe_b64encode(m.secret).rstrip(b"=").decode()
        for needle in (m.secret, text.encode(), m.secret.hex().encode()):
            assert needle not in blobs, m.site_key
            assert needle not in log, m.site_key


# --- H-09 and forgeries: /sso/exchange across the fleet --------------------------------------


@pytest.mark.case("H-09")
@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_H09_exchanged_token_is_the_targets_own_and_the_assertion_single_use(
    fleet: Fleet, src: str, dst: str
) -> None:
    """The assertion is addressed to the target (``aud``), short-lived, typed ``hk-sso+jwt``
    with a random ``jti``; the exchange yields the target's own access token (its issuer, its
    algorithm, a fresh ``jti``, ``at+jwt``) that the source refuses; a second exchange of the
    same assertion is 401."""
    a, b = fleet[src], fleet[dst]
    user = fresh_user(a, "x")
    assertion = issue(a, user.token, b.site_key)
    header, claims = unverified(assertion["token"])
    assert header["typ"] == SSO_TYP
    assert claims["aud"] == b.site_key and claims["iss"] == a.issuer
    assert 0 < claims["exp"] - claims["iat"] <= 60 and len(claims["jti"]) >= 16
    assert issue(a, user.token, b.site_key)["token"] != assertion["token"]

    r = exchange(b, assertion)
    assert r.status_code == 200, r.text
    body = r.json()
    out_header = jwt.get_unverified_header(body["token"])
    out = jwt.decode(body["token"], options={"verify_signature": False})
    assert out_header["typ"] == "at+jwt" and out_header["alg"] == ALGORITHMS[dst]
    assert out["iss"] == b.issuer and out["jti"] != claims["jti"]
    assert 0 < out["exp"] - out["iat"] <= 900
    assert body["refresh_token"].startswith("hkr_")
    assert b.post("/token/validate", token=body["token"]).status_code == 200
    assert a.post("/token/validate", token=body["token"]).status_code == 401

    again = exchange(b, assertion)
    assert again.status_code == 401 and again.json()["code"] == INVALID_ASSERTION, again.text
    assert "token" not in again.json()


@pytest.mark.case("H-02", "H-04")
def test_exchange_forgeries_across_the_fleet(fleet: Fleet) -> None:
    """Forgeries at each site: the token changed under a valid MAC; a MAC over a changed token
    with another pair's key; an HS256 token keyed with the pairwise MAC key itself; a token
    re-addressed to another site. All 401 ``invalid_assertion``; the genuine one then works."""
    fed = fleet.fed
    for src, dst in PAIRS:
        a, b = fleet[src], fleet[dst]
        third = next(n for n in ALGORITHMS if n not in (src, dst))
        user = fresh_user(a, "f")
        assertion = issue(a, user.token, b.site_key)
        token = assertion["token"]
        header, claims = unverified(token)
        users = b.user_count()
        k_ab = k(fed, src, dst)
        changed = hand_made(header, fresh(claims, sub="1"), None) + "x"
        forgeries = [
            # A signature character changed (one that carries six bits: never a no-op).
            dict(assertion, token=token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]),
            {"site_key": a.site_key, "token": changed, "signature": mac(k_ab, changed)},
            {"site_key": a.site_key, "token": assertion["token"],
             "signature": mac(k(fed, third, dst), assertion["token"])},
            as_from(fed, src, dst, hand_made({"alg": "HS256", "kid": header["kid"],
                                              "typ": SSO_TYP}, fresh(claims), k_ab)),
            as_from(fed, src, dst, hand_made({"alg": "HS256", "kid": header["kid"],
                                              "typ": SSO_TYP}, fresh(claims), a.raw_secret)),
            as_from(fed, src, dst, issue(a, user.token, fleet[third].site_key)["token"]),
        ]
        for forged in forgeries:
            r = exchange(b, forged)
            assert r.status_code == 401, (src, dst, r.status_code, r.text)
            assert r.json()["code"] == INVALID_ASSERTION
        assert b.user_count() == users
        assert exchange(b, assertion).status_code == 200


def test_hmac_helpers_match_the_product() -> None:
    """The signing helper used above signs the way the hub checks (a self-check of the suite)."""
    key = b"k" * 32
    headers = signing.sign_request(key, "site", "GET", "/p", "b=1&a=2", b"", now=1000.0,
                                   nonce="n" * 16)
    parsed = signing.parse_headers(headers, now=1000.0)
    assert signing.verify(parsed, [key], "GET", "/p", "a=2&b=1", b"")
    assert not signing.verify(parsed, [key], "GET", "/p", "a=2&b=1", b" ")
    message = signing.canonical("GET", "/p", "a=2&b=1", "site", "1000", "n" * 16, b"")
    assert parsed.digest == hmac.new(key, message, hashlib.sha256).hexdigest()
