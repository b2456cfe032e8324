"""The hub's signed site API as a member site sees it (DESIGN §4; SECURITY.md H-01…H-12, K-01…K-06).

Every request goes over real HTTP to a served hub. The hub's clock is moved, never slept on.
Each refusal is checked twice: the answer the site gets, and the ``api.rejected`` event an admin
sees in the federation log.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import json
import math
import secrets
import threading
import time
import typing as t
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select
from sqlalchemy import text

from agent import signing
from agent.services.keys import SigningKey
from agent.services.keys import generate_private_key_pem
from agent.signing import pairwise_key
from hub.crypto import parse_site_secret
from hub.models import Event
from hub.services import keys as key_service
from hub.services import sites as site_service
from hub.state import RefusalLog
from tests.hub.conftest import Hub

DIRECTORY = "/api/v1/directory"
KEYS = "/api/v1/keys"
ROTATE = "/api/v1/secret/rotate"
EVENTS = "/api/v1/events"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def jwks_pair() -> dict[str, SigningKey]:
    """One ES256 and one RS256 federation key, as an agent makes them (made once: RSA is slow)."""
    return {alg: SigningKey.from_pem(alg, generate_private_key_pem(alg))
            for alg in ("ES256", "RS256")}


def public_jwk(key: SigningKey) -> dict[str, t.Any]:
    assert key.public_jwk is not None
    return dict(key.public_jwk)


def jwk_of(public_key: t.Any, alg: str, kid: str) -> dict[str, t.Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    jwk = json.loads(algorithm.to_jwk(public_key))
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


def sign_headers(
    hub: Hub,
    site_key: str,
    secret: str,
    method: str,
    path: str,
    query: str = "",
    body: bytes = b"",
    **kw: t.Any,
) -> dict[str, str]:
    headers = signing.sign_request(
        parse_site_secret(secret), site_key, method, path, query, body,
        now=kw.pop("now", hub.clock().timestamp()), **kw,
    )
    if body:
        headers["Content-Type"] = "application/json"
    return headers


def send(
    hub: Hub, method: str, path: str, headers: dict[str, str], body: bytes = b"", query: str = ""
) -> requests.Response:
    url = hub.url + path + (f"?{query}" if query else "")
    return hub.http.request(method, url, data=body, headers=headers, timeout=30)


def refused(response: requests.Response, status: int, code: str) -> dict[str, t.Any]:
    assert response.status_code == status, response.text
    body = t.cast(dict[str, t.Any], response.json())
    assert body["code"] == code, body
    assert body["data"]["status"] == status
    return body


def rejections(hub: Hub) -> list[Event]:
    with hub.state.session_factory() as db:
        return list(db.scalars(select(Event).where(Event.event == "api.rejected")
                               .order_by(Event.id)))


def assert_logged(hub: Hub, reason: str, before: int, site_key: str | None = None) -> None:
    """Exactly one new ``api.rejected`` event, with ``reason`` (and the claimed site)."""
    rows = rejections(hub)
    assert len(rows) == before + 1, [r.details for r in rows]
    row = rows[-1]
    assert row.details["reason"] == reason, row.details
    assert row.outcome == "failure"
    if site_key is not None:
        assert row.site_key == site_key


def directory_ok(hub: Hub, site_key: str, secret: str) -> dict[str, t.Any]:
    r = hub.signed("GET", DIRECTORY, site_key, secret)
    assert r.status_code == 200, r.text
    return t.cast(dict[str, t.Any], r.json())


def jwks(hub: Hub) -> dict[str, t.Any]:
    r = hub.http.get(hub.url + "/.well-known/jwks.json", timeout=30)
    assert r.status_code == 200, r.text
    return t.cast(dict[str, t.Any], r.json())


def kids(hub: Hub) -> set[str]:
    return {k["kid"] for k in jwks(hub)["keys"]}


@pytest.fixture
def two(hub: Hub) -> tuple[Hub, tuple[str, str], tuple[str, str]]:
    """A hub with two member sites: (hub, (shop, secret), (docs, secret))."""
    shop = hub.add_site("Shop", "https://shop.example.com")
    docs = hub.add_site("Docs", "https://docs.example.com")
    return hub, shop, docs


# ---------------------------------------------------------------------------------------------
# valid calls


def test_every_endpoint_accepts_a_signed_call(two: t.Any, jwks_pair: dict[str, SigningKey]) -> None:
    hub, (shop, secret), _docs = two
    assert directory_ok(hub, shop, secret)["site"]["site_key"] == shop

    jwk = public_jwk(jwks_pair["ES256"])
    r = hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk, "status": "active"})
    assert r.status_code == 201, r.text
    assert r.json() == {"kid": jwk["kid"], "status": "active"}

    r = hub.signed("DELETE", f"{KEYS}/{jwk['kid']}", shop, secret)
    assert r.status_code == 200, r.text
    assert r.json() == {"kid": jwk["kid"], "status": "retired"}

    event = {"id": "e1", "event": "login.success", "time": "2025-01-01T00:00:00Z"}
    r = hub.signed("POST", EVENTS, shop, secret, json={"events": [event]})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 1}

    r = hub.signed("POST", ROTATE, shop, secret)
    assert r.status_code == 200, r.text
    assert r.json()["secret"].startswith("hks_")
    assert r.headers["Cache-Control"] == "no-store"
    assert rejections(hub) == []


def test_a_flood_of_refusals_writes_a_few_events_a_minute(two: t.Any) -> None:
    """Every refused request is answered, but one address gets at most BURST events a minute;
    its next event says how many were left out."""
    hub = two[0]
    before = len(rejections(hub))
    burst = RefusalLog.BURST
    for _ in range(burst + 15):
        refused(send(hub, "GET", DIRECTORY, {}), 401, "unsigned_request")
    rows = rejections(hub)
    assert len(rows) - before == burst
    assert all("suppressed" not in r.details for r in rows[before:])
    hub.clock.advance(61)
    refused(send(hub, "GET", DIRECTORY, {}), 401, "unsigned_request")
    last = rejections(hub)[-1]
    assert last.details == {"reason": "unsigned", "path": DIRECTORY, "suppressed": 15}
    assert len(rejections(hub)) - before == burst + 1


# ---------------------------------------------------------------------------------------------
# unsigned and malformed (H-01, H-07)


def test_a_missing_header_is_an_unsigned_request(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    for count, missing in enumerate([signing.HEADER_SITE, signing.HEADER_TIMESTAMP,
                                     signing.HEADER_NONCE, signing.HEADER_SIGNATURE]):
        headers = sign_headers(hub, shop, secret, "GET", DIRECTORY)
        del headers[missing]
        refused(send(hub, "GET", DIRECTORY, headers), 401, "unsigned_request")
        assert_logged(hub, "unsigned", 2 * count)
        headers[missing] = ""  # present but empty is no better
        refused(send(hub, "GET", DIRECTORY, headers), 401, "unsigned_request")
        assert_logged(hub, "unsigned", 2 * count + 1)
    assert hub.scalar("SELECT count(*) FROM hub_nonces") == 0
    directory_ok(hub, shop, secret)


def test_no_headers_at_all_is_an_unsigned_request(hub: Hub) -> None:
    refused(hub.http.post(hub.url + EVENTS, json={"events": []}, timeout=30), 401,
            "unsigned_request")
    assert_logged(hub, "unsigned", 0)


def _bad_hex(h: dict[str, str]) -> None:
    h[signing.HEADER_SIGNATURE] = "v1=" + "g" * 64


def _v2(h: dict[str, str]) -> None:
    h[signing.HEADER_SIGNATURE] = "v2=" + h[signing.HEADER_SIGNATURE][3:]


def _upper(h: dict[str, str]) -> None:
    h[signing.HEADER_SIGNATURE] = "v1=" + h[signing.HEADER_SIGNATURE][3:].upper()


def _trailing(h: dict[str, str]) -> None:
    h[signing.HEADER_SIGNATURE] += "="


def _truncated(h: dict[str, str]) -> None:
    h[signing.HEADER_SIGNATURE] = h[signing.HEADER_SIGNATURE][:3 + 32]


def _timestamp(h: dict[str, str]) -> None:
    h[signing.HEADER_TIMESTAMP] = h[signing.HEADER_TIMESTAMP][:-1] + "x"


def _float_timestamp(h: dict[str, str]) -> None:
    h[signing.HEADER_TIMESTAMP] += ".0"


def _superscript_timestamp(h: dict[str, str]) -> None:
    # "\xb2" (latin-1 on the wire) is "²": a digit to str.isdigit(), not to int() (L-05).
    h[signing.HEADER_TIMESTAMP] = h[signing.HEADER_TIMESTAMP][:-1] + "\xb2"


def _bad_site(h: dict[str, str]) -> None:
    h[signing.HEADER_SITE] = "shop/../docs"


BREAKERS = [_bad_hex, _v2, _upper, _trailing, _truncated, _timestamp, _float_timestamp,
            _superscript_timestamp, _bad_site]


def test_malformed_headers_are_refused(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    for count, breaker in enumerate(BREAKERS):
        headers = sign_headers(hub, shop, secret, "GET", DIRECTORY)
        breaker(headers)
        body = refused(send(hub, "GET", DIRECTORY, headers), 401, "bad_signature")
        assert body["message"] == "The signature does not match.", breaker.__name__
        assert_logged(hub, "malformed", count)
    assert hub.scalar("SELECT count(*) FROM hub_nonces") == 0
    # The persistence check: the site's own correct calls still work.
    directory_ok(hub, shop, secret)


def test_a_malformed_nonce_is_refused(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    for count, nonce in enumerate(["short", "a" * 15, "a" * 65, "has space in it!!!", "ü" * 20]):
        # The signature covers the nonce and is right: only the nonce's shape is wrong.
        headers = sign_headers(hub, shop, secret, "GET", DIRECTORY, nonce=nonce)
        headers[signing.HEADER_NONCE] = nonce.encode().decode("latin-1")
        refused(send(hub, "GET", DIRECTORY, headers), 401, "bad_signature")
        assert_logged(hub, "malformed", count)
    # 16 and 64 characters are the bounds.
    for nonce in ("b" * 16, "c" * 64):
        assert hub.signed("GET", DIRECTORY, shop, secret, nonce=nonce).status_code == 200


# ---------------------------------------------------------------------------------------------
# binding of the signature to the request (H-02, H-04, H-07)


def test_a_body_changed_after_signing_is_refused(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    body = b'{"events": [{"id": "1", "event": "login.success", "time": "2025-01-01T00:00:00Z"}]}'
    headers = sign_headers(hub, shop, secret, "POST", EVENTS, body=body)
    for tampered in (body.replace(b": ", b":"), body.replace(b"success", b"failure"),
                     body + b" ", body[:-1]):
        refused(send(hub, "POST", EVENTS, headers, tampered), 401, "bad_signature")
    assert len(rejections(hub)) == 4
    assert {r.details["reason"] for r in rejections(hub)} == {"bad"}
    assert hub.scalar("SELECT count(*) FROM hub_events WHERE source = 'site'") == 0
    # The untouched request (its nonce never stored by the refusals) is accepted.
    assert send(hub, "POST", EVENTS, headers, body).json() == {"accepted": 1}


def test_a_signature_for_another_path_is_refused(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    headers = sign_headers(hub, shop, secret, "POST", EVENTS, body=b'{"events": []}')
    refused(send(hub, "POST", ROTATE, headers, b'{"events": []}'), 401, "bad_signature")
    assert_logged(hub, "bad", 0, site_key=shop)
    assert hub.scalar("SELECT count(*) FROM hub_site_secrets") == 2  # nothing rotated


def test_a_signature_for_another_query_is_refused(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    headers = sign_headers(hub, shop, secret, "GET", DIRECTORY, query="page=1")
    refused(send(hub, "GET", DIRECTORY, headers, query="page=2"), 401, "bad_signature")
    refused(send(hub, "GET", DIRECTORY, headers), 401, "bad_signature")
    refused(send(hub, "GET", DIRECTORY, headers, query="page=1&page=2"), 401, "bad_signature")
    assert [r.details["reason"] for r in rejections(hub)] == ["bad"] * 3
    # Query parameters are signed in canonical (sorted) order, so their order on the wire is free.
    headers = sign_headers(hub, shop, secret, "GET", DIRECTORY, query="b=2&a=1")
    assert send(hub, "GET", DIRECTORY, headers, query="a=1&b=2").status_code == 200


def test_a_signature_for_another_method_is_refused(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    headers = sign_headers(hub, shop, secret, "POST", DIRECTORY)
    refused(send(hub, "GET", DIRECTORY, headers), 401, "bad_signature")
    assert_logged(hub, "bad", 0, site_key=shop)


def test_a_signature_made_with_another_sites_secret_is_refused(two: t.Any) -> None:
    hub, (shop, shop_secret), (docs, docs_secret) = two
    # Shop signs, claiming to be docs (H-02).
    refused(hub.signed("GET", DIRECTORY, docs, shop_secret), 401, "bad_signature")
    assert_logged(hub, "bad", 0, site_key=docs)
    # Shop's signature with the site header swapped to docs.
    headers = sign_headers(hub, shop, shop_secret, "GET", DIRECTORY)
    headers[signing.HEADER_SITE] = docs
    refused(send(hub, "GET", DIRECTORY, headers), 401, "bad_signature")
    directory_ok(hub, docs, docs_secret)


def test_a_wrong_signature_of_the_right_length_is_refused(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    headers = sign_headers(hub, shop, secret, "GET", DIRECTORY)
    digest = headers[signing.HEADER_SIGNATURE][3:]
    for flipped in ("0" if digest[0] != "0" else "1") + digest[1:], digest[:-1] + (
        "0" if digest[-1] != "0" else "1"
    ):
        headers[signing.HEADER_SIGNATURE] = "v1=" + flipped
        refused(send(hub, "GET", DIRECTORY, headers), 401, "bad_signature")
    assert [r.details["reason"] for r in rejections(hub)] == ["bad", "bad"]


# ---------------------------------------------------------------------------------------------
# clock skew (H-05)


def test_a_timestamp_more_than_300_s_away_is_refused(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    for count, offset in enumerate([-301, 301, -1000, 10**9]):
        now = hub.clock().timestamp()
        # Whole seconds, rounded away from the hub's clock: the skew is at least |offset| s.
        stamp = math.ceil(now) + offset if offset > 0 else math.floor(now) + offset
        refused(hub.signed("GET", DIRECTORY, shop, secret, now=stamp), 401, "skewed_request")
        assert_logged(hub, "skewed", count, site_key=shop)


def test_a_timestamp_within_300_s_is_accepted(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    for offset in (-299, 299):
        now = hub.clock().timestamp()
        # Rounded towards the hub's clock: the skew is at most |offset| s.
        stamp = math.floor(now) + offset if offset > 0 else math.ceil(now) + offset
        r = hub.signed("GET", DIRECTORY, shop, secret, now=stamp)
        assert r.status_code == 200, (offset, r.text)


def test_the_hubs_clock_decides_the_skew(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    stamp = hub.clock().timestamp()
    hub.clock.advance(400)
    refused(hub.signed("GET", DIRECTORY, shop, secret, now=stamp), 401, "skewed_request")


# ---------------------------------------------------------------------------------------------
# replay (H-06)


def test_the_same_nonce_twice_is_a_replay(two: t.Any) -> None:
    hub, (shop, secret), (docs, docs_secret) = two
    nonce = "n" * 24
    assert hub.signed("GET", DIRECTORY, shop, secret, nonce=nonce).status_code == 200
    refused(hub.signed("GET", DIRECTORY, shop, secret, nonce=nonce), 401, "replayed_request")
    assert_logged(hub, "replay", 0, site_key=shop)
    # Even for another endpoint and body, a nonce is used once per site.
    refused(hub.signed("POST", EVENTS, shop, secret, json={"events": []}, nonce=nonce), 401,
            "replayed_request")
    # Nonces are per site: another site may happen to pick the same one.
    assert hub.signed("GET", DIRECTORY, docs, docs_secret, nonce=nonce).status_code == 200


def test_an_exact_replay_of_a_rotation_rotates_once(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    headers = sign_headers(hub, shop, secret, "POST", ROTATE)
    assert send(hub, "POST", ROTATE, headers).status_code == 200
    refused(send(hub, "POST", ROTATE, headers), 401, "replayed_request")
    assert hub.scalar("SELECT max(version) FROM hub_site_secrets s JOIN hub_sites t "
                      "ON t.id = s.site_id WHERE t.site_key = :k", k=shop) == 2


def test_a_replay_to_another_hub_worker_on_the_same_database_is_refused(
    make_hub: t.Callable[..., Hub],
) -> None:
    first = make_hub()
    second = make_hub(
        HEADLESSKEY_HUB_DATABASE_URL=first.app.config["HEADLESSKEY_HUB_DATABASE_URL"],
        HEADLESSKEY_HUB_MASTER_KEY=first.app.config["HEADLESSKEY_HUB_MASTER_KEY"],
    )
    shop, secret = first.add_site("Shop", "https://shop.example.com")
    headers = sign_headers(first, shop, secret, "GET", DIRECTORY)
    assert send(first, "GET", DIRECTORY, headers).status_code == 200
    refused(send(second, "GET", DIRECTORY, headers), 401, "replayed_request")
    assert_logged(second, "replay", 0, site_key=shop)
    # And the other way round.
    headers = sign_headers(first, shop, secret, "GET", DIRECTORY)
    assert send(second, "GET", DIRECTORY, headers).status_code == 200
    refused(send(first, "GET", DIRECTORY, headers), 401, "replayed_request")


# ---------------------------------------------------------------------------------------------
# unknown and suspended sites (H-10)


def test_an_unknown_site_gets_the_same_answer_as_a_bad_signature(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    unknown = refused(hub.signed("GET", DIRECTORY, "ghost", secret), 401, "bad_signature")
    bad = refused(hub.signed("GET", DIRECTORY, shop, "hks_" + "A" * 43), 401, "bad_signature")
    assert unknown == bad
    reasons = [(r.details["reason"], r.site_key) for r in rejections(hub)]
    assert reasons == [("unknown", "ghost"), ("bad", shop)]


def test_a_suspended_site_is_refused_like_a_bad_signature_until_resumed(
        two: t.Any, jwks_pair: dict[str, SigningKey]) -> None:
    hub, (shop, secret), (docs, docs_secret) = two
    jwk = public_jwk(jwks_pair["ES256"])
    r = hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk, "status": "active"})
    assert r.status_code == 201, r.text
    assert jwk["kid"] in kids(hub)
    with hub.app.app_context(), hub.state.session_factory() as db:
        site_service.set_status(db, hub.state, site_service.get(db, shop), "suspended", "test")
        db.commit()
    for method, path, body in (("GET", DIRECTORY, None), ("POST", ROTATE, None),
                               ("POST", EVENTS, {"events": []})):
        suspended = refused(hub.signed(method, path, shop, secret, json=body), 401, "bad_signature")
        assert suspended == refused(hub.signed(method, path, shop, docs_secret, json=body), 401,
                                    "bad_signature")
    assert [r.details["reason"] for r in rejections(hub)] == ["suspended", "bad"] * 3
    assert hub.scalar("SELECT count(*) FROM hub_site_secrets") == 2  # no rotation happened
    assert jwk["kid"] not in kids(hub)  # whoever reads only the JWKS trusts it no more either
    # A badly signed call from it is still just a bad signature (no status oracle).
    refused(hub.signed("GET", DIRECTORY, shop, docs_secret), 401, "bad_signature")
    with hub.app.app_context(), hub.state.session_factory() as db:
        site_service.set_status(db, hub.state, site_service.get(db, shop), "active", "test")
        db.commit()
    directory_ok(hub, shop, secret)
    assert jwk["kid"] in kids(hub)


# ---------------------------------------------------------------------------------------------
# secret rotation (H-11, H-12, K-09)


def test_rotation_keeps_the_old_secret_for_the_grace_period_only(
    make_hub: t.Callable[..., Hub],
) -> None:
    hub = make_hub(HEADLESSKEY_HUB_SECRET_GRACE=600)
    shop, old = hub.add_site("Shop", "https://shop.example.com")
    r = hub.signed("POST", ROTATE, shop, old)
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert r.json()["grace_seconds"] == 600
    assert new != old and len(parse_site_secret(new)) >= 32
    directory_ok(hub, shop, old)
    directory_ok(hub, shop, new)
    hub.clock.advance(590)
    directory_ok(hub, shop, old)
    hub.clock.advance(11)
    refused(hub.signed("GET", DIRECTORY, shop, old), 401, "bad_signature")
    assert_logged(hub, "bad", 0, site_key=shop)
    directory_ok(hub, shop, new)
    # Rotating again with the new secret works the same way.
    newer = hub.signed("POST", ROTATE, shop, new).json()["secret"]
    assert newer not in (old, new)
    directory_ok(hub, shop, new)
    directory_ok(hub, shop, newer)


def test_the_grace_period_set_in_the_console_applies_to_api_rotations(hub: Hub) -> None:
    from hub.models import Setting

    shop, old = hub.add_site("Shop", "https://shop.example.com")
    with hub.state.session_factory() as db:
        db.add(Setting(key="SECRET_GRACE", value=120, updated_at=hub.clock(), updated_by="admin"))
        db.commit()
    r = hub.signed("POST", ROTATE, shop, old)
    assert r.json()["grace_seconds"] == 120
    new = r.json()["secret"]
    hub.clock.advance(110)
    directory_ok(hub, shop, old)
    hub.clock.advance(11)
    refused(hub.signed("GET", DIRECTORY, shop, old), 401, "bad_signature")
    directory_ok(hub, shop, new)


def test_two_rotations_at_once_leave_one_current_secret(make_hub: t.Callable[..., Hub]) -> None:
    """An admin rotates while the site rotates through the API: the later rotation expires the
    secret the earlier one made. (On PostgreSQL the later one waited for the earlier one's row
    and then added its version without expiring the one just made: two secrets for ever.)"""
    hub = make_hub(HEADLESSKEY_HUB_SECRET_GRACE=600)
    shop, first = hub.add_site("Shop", "https://shop.example.com")
    with hub.app.app_context(), hub.state.session_factory() as db:
        admins_secret = site_service.rotate_secret(db, hub.state, site_service.get(db, shop),
                                                   "alice")  # not committed yet
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            api = pool.submit(hub.signed, "POST", ROTATE, shop, first)
            time.sleep(0.5)  # the API call reaches the site's rows and waits
            db.commit()
            r = api.result(timeout=30)
    assert r.status_code == 200, r.text
    sites_secret = r.json()["secret"]
    assert hub.scalar("SELECT count(*) FROM hub_site_secrets WHERE expires_at IS NULL") == 1
    hub.clock.advance(601)
    for gone in (first, admins_secret):
        refused(hub.signed("GET", DIRECTORY, shop, gone), 401, "bad_signature")
    directory_ok(hub, shop, sites_secret)


def test_secrets_are_encrypted_at_rest(make_hub: t.Callable[..., Hub]) -> None:
    hub = make_hub()
    shop, first = hub.add_site("Shop", "https://shop.example.com")
    second = hub.signed("POST", ROTATE, shop, first).json()["secret"]
    texts = [first, second]
    raws = [parse_site_secret(s) for s in texts]
    with hub.state.engine.connect() as conn:
        stored = [bytes(c) for c in conn.execute(text("SELECT ciphertext FROM hub_site_secrets"))
                  .scalars()]
    assert len(stored) == 2
    for blob in stored:
        for raw, secret in zip(raws, texts, strict=True):
            assert raw not in blob
            assert secret.encode() not in blob
            assert secret[4:].encode() not in blob
            assert base64.b64encode(raw) not in blob
    url = hub.state.engine.url
    if url.get_backend_name() == "sqlite":
        files = [Path(f"{url.database}{suffix}") for suffix in ("", "-wal")]
        dump = b"".join(f.read_bytes() for f in files if f.exists())
        assert dump
        for raw, secret in zip(raws, texts, strict=True):
            assert raw not in dump
            assert secret.encode() not in dump
            assert secret[4:].encode() not in dump
        assert b"hks_" not in dump


def test_secret_values_are_fresh_and_long(hub: Hub) -> None:
    secrets_ = [hub.add_site(f"Site {i}", f"https://s{i}.example.com")[1] for i in range(5)]
    raw = [parse_site_secret(s) for s in secrets_]
    assert len(set(raw)) == 5
    assert all(32 <= len(r) <= 64 for r in raw)


# ---------------------------------------------------------------------------------------------
# member keys and the JWKS (K-01, K-02, K-03, K-06)


def test_registered_keys_are_published_without_private_members(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    hub, (shop, secret), (docs, docs_secret) = two
    for alg in ("ES256", "RS256"):
        jwk = public_jwk(jwks_pair[alg])
        r = hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk, "status": "next"})
        assert r.status_code == 201, r.text
        assert r.json() == {"kid": jwk["kid"], "status": "next"}
    document = jwks(hub)
    published = {k["kid"]: k for k in document["keys"]}
    for alg, key in jwks_pair.items():
        entry = published[key.kid]
        assert entry["alg"] == alg
        assert entry["use"] == "sig"
        assert entry["kty"] == ("EC" if alg == "ES256" else "RSA")
        assert entry["hk_site"] == shop
    for entry in document["keys"]:
        assert {"kty", "kid", "alg", "use"} <= set(entry)
        assert not PRIVATE_MEMBERS & set(entry), entry
        assert entry["kty"] != "oct"
    assert len(published) == len(document["keys"])  # kids are unique
    # The peer finds the keys in its directory as well.
    peer = directory_ok(hub, docs, docs_secret)["peers"][0]
    assert {k["kid"] for k in peer["keys"]} == {k.kid for k in jwks_pair.values()}


def test_only_a_keys_public_parameters_kid_alg_and_use_are_published(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    """A member's certificate chain, URLs and members of its own are never published (the hub
    checked none of them), and every published key says ``use: sig`` (K-01), also when the
    member left ``use`` out; ``key_ops`` other than ``["verify"]`` is refused."""
    hub, (shop, secret), (docs, docs_secret) = two
    jwk = public_jwk(jwks_pair["ES256"])
    del jwk["use"]
    extras = {"x5u": "https://evil.example/chain.pem", "x5c": ["MIIB" + "A" * 500],
              "key_ops": ["verify"], "note": "x" * 200_000}
    r = hub.signed("POST", KEYS, shop, secret, json={"jwk": {**jwk, **extras}})
    assert r.status_code == 201, r.text
    wanted = {"kty", "crv", "x", "y", "kid", "alg", "use"}
    entry = next(k for k in jwks(hub)["keys"] if k["kid"] == jwk["kid"])
    assert set(entry) == wanted | {"hk_site"} and entry["use"] == "sig", entry
    assert set(directory_ok(hub, docs, docs_secret)["peers"][0]["keys"][0]) == wanted
    # The same key as an agent sends it is the same registration.
    r = hub.signed("POST", KEYS, shop, secret, json={"jwk": public_jwk(jwks_pair["ES256"])})
    assert r.status_code == 201, r.text
    for ops in (["sign"], ["verify", "encrypt"], "verify"):
        other = {**public_jwk(jwks_pair["RS256"]), "key_ops": ops}
        r = hub.signed("POST", KEYS, shop, secret, json={"jwk": other})
        assert r.status_code == 400, (ops, r.text)
    assert hub.scalar("SELECT count(*) FROM hub_site_keys") == 1


def test_key_events_of_the_api_name_the_callers_address(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    """The event a signed call logs (here ``key.registered``) carries the caller's IP (L-01)."""
    hub, (shop, secret), _docs = two
    jwk = public_jwk(jwks_pair["ES256"])
    assert hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk}).status_code == 201
    ip = hub.scalar("SELECT ip FROM hub_events WHERE event = 'key.registered' AND site_key = :s",
                    s=shop)
    assert ip == "127.0.0.1"


def test_registering_the_same_key_again_is_idempotent(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    hub, (shop, secret), _docs = two
    jwk = public_jwk(jwks_pair["ES256"])
    assert hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk}).status_code == 201
    r = hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk, "status": "active"})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "active"
    assert [k["kid"] for k in jwks(hub)["keys"]].count(jwk["kid"]) == 1


def _while_uncommitted(hub: Hub, change: t.Callable[[t.Any], t.Any],
                       call: t.Callable[[], requests.Response]) -> tuple[t.Any, requests.Response]:
    """``call`` (a signed request) sent while ``change``, made through the service in another
    transaction, is not committed yet; that transaction commits half a second later."""
    with hub.app.app_context(), hub.state.session_factory() as db:
        made = change(db)
        db.flush()  # not committed yet
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(call)
            time.sleep(0.5)  # the request reaches the site's rows and waits
            db.commit()
            r = second.result(timeout=30)
        return made, r


@pytest.mark.parametrize("status", ["next", "active"])
def test_a_registration_retried_while_the_first_runs_is_idempotent(
    two: t.Any, jwks_pair: dict[str, SigningKey], status: str
) -> None:
    """A site retries a key registration while its first request is still running: the retry
    answers the key the first one registered, as a plain retry does. (On PostgreSQL neither saw
    the other's row, both inserted the kid and the retry was a 500.)"""
    hub, (shop, secret), _docs = two
    jwk = public_jwk(jwks_pair["ES256"])
    _key, r = _while_uncommitted(
        hub,
        lambda db: key_service.register(db, hub.state, site_service.get(db, shop), jwk, status),
        lambda: hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk, "status": status}))
    assert r.status_code == 201, r.text
    assert r.json() == {"kid": jwk["kid"], "status": status}
    assert hub.scalar("SELECT count(*) FROM hub_site_keys") == 1
    assert hub.scalar("SELECT count(*) FROM hub_events WHERE event = 'key.registered'") == 1
    assert [k["kid"] for k in jwks(hub)["keys"]].count(jwk["kid"]) == 1


def test_a_kid_another_site_is_registering_meanwhile_is_a_conflict(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    """Two sites register one kid at once: the second is 409 kid_taken, as it is after the
    first. (On PostgreSQL it was a 500: both inserted the kid.)"""
    hub, (shop, _secret), (docs, docs_secret) = two
    jwk = public_jwk(jwks_pair["ES256"])
    _key, r = _while_uncommitted(
        hub, lambda db: key_service.register(db, hub.state, site_service.get(db, shop), jwk),
        lambda: hub.signed("POST", KEYS, docs, docs_secret, json={"jwk": jwk}))
    refused(r, 409, "kid_taken")
    assert [k["hk_site"] for k in jwks(hub)["keys"] if k["kid"] == jwk["kid"]] == [shop]


@pytest.mark.parametrize("registered", [False, True], ids=["new", "registered-before"])
def test_two_activations_at_once_leave_one_active_key(
    two: t.Any, jwks_pair: dict[str, SigningKey], registered: bool
) -> None:
    """A site activates two of its keys at once (two of its workers rolling keys, say): the later
    activation wins and the earlier key is retiring, as one after the other. (On PostgreSQL
    neither saw the other's active key and the site was left with two active keys.)"""
    hub, (shop, secret), _docs = two
    first, second = public_jwk(jwks_pair["ES256"]), public_jwk(jwks_pair["RS256"])
    if registered:
        for jwk in (first, second):
            r = hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk, "status": "next"})
            assert r.status_code == 201, r.text
    _key, r = _while_uncommitted(
        hub,
        lambda db: key_service.register(db, hub.state, site_service.get(db, shop), first,
                                        "active"),
        lambda: hub.signed("POST", KEYS, shop, secret, json={"jwk": second, "status": "active"}))
    assert r.status_code == 201, r.text
    assert r.json() == {"kid": second["kid"], "status": "active"}
    statuses = {k.kid: k.status for k in _site_keys(hub, shop)}
    assert statuses == {first["kid"]: "retiring", second["kid"]: "active"}


def test_a_key_retired_while_it_is_activated_stays_retired(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    """A site activates a key another of its workers is retiring: the activation waits and is
    409 kid_retired, as after the retirement. (On PostgreSQL it made the retired key active
    again.)"""
    hub, (shop, secret), _docs = two
    jwk = public_jwk(jwks_pair["ES256"])
    assert hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk}).status_code == 201
    _none, r = _while_uncommitted(
        hub, lambda db: key_service.retire(db, hub.state, site_service.get(db, shop), jwk["kid"]),
        lambda: hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk, "status": "active"}))
    refused(r, 409, "kid_retired")
    assert hub.scalar("SELECT status FROM hub_site_keys") == "retired"
    assert jwk["kid"] not in kids(hub)


def test_activations_of_many_keys_at_once_leave_one_active_key(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    """Several workers of a site each activate a key of their own at the same moment."""
    hub, (shop, secret), _docs = two
    keys = [jwk_of(ec.generate_private_key(ec.SECP256R1()).public_key(), "ES256",
                   f"worker-key-{i}") for i in range(6)]
    barrier = threading.Barrier(len(keys))

    def activate(jwk: dict[str, t.Any]) -> requests.Response:
        barrier.wait(10)
        return hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk, "status": "active"})

    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        answers = [a.result(timeout=60) for a in [pool.submit(activate, k) for k in keys]]
    assert [a.status_code for a in answers] == [201] * len(keys), [a.text for a in answers]
    statuses = sorted(k.status for k in _site_keys(hub, shop))
    assert statuses == ["active"] + ["retiring"] * (len(keys) - 1), statuses


def _site_keys(hub: Hub, site_key: str) -> list[t.Any]:
    with hub.state.session_factory() as db:
        return key_service.site_keys(db, site_service.get(db, site_key))


def _with_private(keys: dict[str, SigningKey]) -> dict[str, t.Any]:
    key = keys["ES256"]
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.signing_key))
    jwk.update({"kid": key.kid, "alg": "ES256", "use": "sig"})
    assert "d" in jwk
    return jwk


def _rsa_1024(_keys: dict[str, SigningKey]) -> dict[str, t.Any]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    return jwk_of(private.public_key(), "RS256", "rsa-1024-key")


def _rsa_8192(_keys: dict[str, SigningKey]) -> dict[str, t.Any]:
    """A public key with an 8192-bit modulus (any odd number will do for a public key: no
    private key needs generating)."""
    modulus = (1 << 8191) | secrets.randbits(8190) | 1
    public = rsa.RSAPublicNumbers(65537, modulus).public_key()
    return jwk_of(public, "RS256", "rsa-8192-key")


def _p384(_keys: dict[str, SigningKey]) -> dict[str, t.Any]:
    private = ec.generate_private_key(ec.SECP384R1())
    return jwk_of(private.public_key(), "ES256", "p384-key-labelled-es256")


def _rsa_as_es256(keys: dict[str, SigningKey]) -> dict[str, t.Any]:
    return {**public_jwk(keys["RS256"]), "alg": "ES256"}


def _oct(_keys: dict[str, SigningKey]) -> dict[str, t.Any]:
    return {"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "hmac-key-01", "alg": "HS256"}


def _no_kid(keys: dict[str, SigningKey]) -> dict[str, t.Any]:
    jwk = public_jwk(keys["ES256"])
    del jwk["kid"]
    return jwk


def _encryption_key(keys: dict[str, SigningKey]) -> dict[str, t.Any]:
    return {**public_jwk(keys["ES256"]), "use": "enc"}


def _not_an_object(_keys: dict[str, SigningKey]) -> t.Any:
    return ["not", "a", "jwk"]


BAD_KEYS = [_with_private, _rsa_1024, _rsa_8192, _p384, _rsa_as_es256, _oct, _no_kid,
            _encryption_key, _not_an_object]


def test_unacceptable_keys_are_refused(two: t.Any, jwks_pair: dict[str, SigningKey]) -> None:
    hub, (shop, secret), _docs = two
    before = jwks(hub)
    for make in BAD_KEYS:
        r = hub.signed("POST", KEYS, shop, secret, json={"jwk": make(jwks_pair)})
        assert r.status_code == 400, (make.__name__, r.text)
        assert r.json()["code"] == "invalid_request"
    assert jwks(hub) == before
    assert hub.scalar("SELECT count(*) FROM hub_site_keys") == 0


def test_a_site_holds_at_most_ten_keys_that_are_not_retired(two: t.Any) -> None:
    """Each published key is in the JWKS and every directory: an eleventh key that is not
    retired is 409 too_many_keys (nothing stored); once one is retired, a new one is taken."""
    hub, (shop, secret), _docs = two
    made = [jwk_of(ec.generate_private_key(ec.SECP256R1()).public_key(), "ES256", f"shop-key-{i}")
            for i in range(11)]
    for jwk in made[:10]:
        assert hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk}).status_code == 201
    refused(hub.signed("POST", KEYS, shop, secret, json={"jwk": made[10]}), 409, "too_many_keys")
    assert hub.scalar("SELECT count(*) FROM hub_site_keys") == 10
    assert "shop-key-10" not in kids(hub)
    # The same key again is still idempotent at the cap.
    assert hub.signed("POST", KEYS, shop, secret, json={"jwk": made[0]}).status_code == 201
    assert hub.signed("DELETE", f"{KEYS}/shop-key-0", shop, secret).status_code == 200
    assert hub.signed("POST", KEYS, shop, secret, json={"jwk": made[10]}).status_code == 201
    assert "shop-key-10" in kids(hub)


def test_a_kid_of_another_site_is_a_conflict(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    hub, (shop, secret), (docs, docs_secret) = two
    shop_jwk = public_jwk(jwks_pair["ES256"])
    assert hub.signed("POST", KEYS, shop, secret, json={"jwk": shop_jwk}).status_code == 201
    # The very same public key...
    refused(hub.signed("POST", KEYS, docs, docs_secret, json={"jwk": shop_jwk}), 409, "kid_taken")
    # ...and a different key under the same kid.
    other = jwk_of(ec.generate_private_key(ec.SECP256R1()).public_key(), "ES256", shop_jwk["kid"])
    refused(hub.signed("POST", KEYS, docs, docs_secret, json={"jwk": other}), 409, "kid_taken")
    # Not even the owner may change the key behind a kid.
    refused(hub.signed("POST", KEYS, shop, secret, json={"jwk": other}), 409, "kid_taken")
    published = [k for k in jwks(hub)["keys"] if k["kid"] == shop_jwk["kid"]]
    assert len(published) == 1
    assert published[0]["x"] == shop_jwk["x"] and published[0]["hk_site"] == shop


def test_a_kid_of_the_hubs_own_keys_is_a_conflict(two: t.Any) -> None:
    """The hub's keys share the JWKS with the members' (K-03): a member cannot register the
    hub's public key, another key under its kid, or the kid of a hub key since retired."""
    hub, (shop, secret), _docs = two
    with hub.app.app_context(), hub.state.session_factory() as db:
        first = dict(key_service.ensure_hub_key(db, hub.state).jwk)
        db.commit()
    refused(hub.signed("POST", KEYS, shop, secret, json={"jwk": first}), 409, "kid_taken")
    other = jwk_of(ec.generate_private_key(ec.SECP256R1()).public_key(), "ES256", first["kid"])
    refused(hub.signed("POST", KEYS, shop, secret, json={"jwk": other, "status": "active"}), 409,
            "kid_taken")
    assert [k["hk_site"] for k in jwks(hub)["keys"] if k["kid"] == first["kid"]] == ["hub"]
    with hub.app.app_context(), hub.state.session_factory() as db:
        key_service.rotate_hub_key(db, hub.state)
        hub.clock.advance(2 * hub.state.setting("JWKS_MAX_AGE") + 1)
        assert key_service.retire_hub_keys(db, hub.state) == 1
        db.commit()
    assert first["kid"] not in kids(hub)
    refused(hub.signed("POST", KEYS, shop, secret, json={"jwk": other}), 409, "kid_taken")
    assert hub.scalar("SELECT count(*) FROM hub_site_keys") == 0


def test_a_retired_key_leaves_the_jwks_for_good(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    hub, (shop, secret), (docs, docs_secret) = two
    jwk = public_jwk(jwks_pair["RS256"])
    assert hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk}).status_code == 201
    assert jwk["kid"] in kids(hub)
    # Another site cannot retire it.
    refused(hub.signed("DELETE", f"{KEYS}/{jwk['kid']}", docs, docs_secret), 404, "key_not_found")
    assert jwk["kid"] in kids(hub)
    r = hub.signed("DELETE", f"{KEYS}/{jwk['kid']}", shop, secret)
    assert r.status_code == 200, r.text
    assert jwk["kid"] not in kids(hub)
    assert directory_ok(hub, docs, docs_secret)["peers"][0]["keys"] == []
    # Retiring is idempotent; a retired kid cannot come back.
    assert hub.signed("DELETE", f"{KEYS}/{jwk['kid']}", shop, secret).status_code == 200
    refused(hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk}), 409, "kid_retired")
    refused(hub.signed("DELETE", f"{KEYS}/no-such-kid", shop, secret), 404, "key_not_found")


def test_the_jwks_is_cacheable_with_a_conditional_get(
    two: t.Any, jwks_pair: dict[str, SigningKey]
) -> None:
    hub, (shop, secret), _docs = two
    first = hub.http.get(hub.url + "/.well-known/jwks.json", timeout=30)
    assert first.status_code == 200
    assert "max-age=300" in first.headers["Cache-Control"]
    etag = first.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = hub.http.get(hub.url + "/.well-known/jwks.json", headers={"If-None-Match": etag},
                         timeout=30)
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["ETag"] == etag
    jwk = public_jwk(jwks_pair["ES256"])
    assert hub.signed("POST", KEYS, shop, secret, json={"jwk": jwk}).status_code == 201
    changed = hub.http.get(hub.url + "/.well-known/jwks.json", headers={"If-None-Match": etag},
                           timeout=30)
    assert changed.status_code == 200
    assert changed.headers["ETag"] != etag
    assert jwk["kid"] in {k["kid"] for k in changed.json()["keys"]}


def test_the_jwks_max_age_follows_the_setting(make_hub: t.Callable[..., Hub]) -> None:
    hub = make_hub(HEADLESSKEY_HUB_JWKS_MAX_AGE=42)
    r = hub.http.get(hub.url + "/.well-known/jwks.json", timeout=30)
    assert "max-age=42" in r.headers["Cache-Control"]


# ---------------------------------------------------------------------------------------------
# the directory


def test_the_directory_lists_active_peers_with_their_exchange_keys(hub: Hub) -> None:
    shop, shop_secret = hub.add_site("Shop", "https://shop.example.com")
    docs, docs_secret = hub.add_site("Docs", "https://docs.example.com",
                                     allowed_origins=["https://docs.example.com"])
    blog, blog_secret = hub.add_site("Blog", "https://blog.example.com")
    document = directory_ok(hub, shop, shop_secret)
    assert document["site"]["site_key"] == shop
    assert document["hub"]["jwks_uri"] == hub.url + "/.well-known/jwks.json"
    peers = {p["site_key"]: p for p in document["peers"]}
    assert set(peers) == {docs, blog}
    assert peers[docs]["base_url"] == "https://docs.example.com"
    assert peers[docs]["issuer"] == "https://docs.example.com"
    assert peers[docs]["allowed_origins"] == ["https://docs.example.com"]
    for peer, secret in ((docs, docs_secret), (blog, blog_secret)):
        # K_peer→shop, which only the peer (from its secret) and shop (from here) can know.
        expected = pairwise_key(parse_site_secret(secret), peer, shop).hex()
        assert peers[peer]["exchange_keys"] == [expected]
    serialized = json.dumps(document)
    for secret in (shop_secret, docs_secret, blog_secret):
        assert secret not in serialized
        assert parse_site_secret(secret).hex() not in serialized
    # Docs sees shop's key towards docs, not towards anyone else.
    docs_view = {p["site_key"]: p for p in directory_ok(hub, docs, docs_secret)["peers"]}
    assert docs_view[shop]["exchange_keys"] == [
        pairwise_key(parse_site_secret(shop_secret), shop, docs).hex()
    ]

    with hub.app.app_context(), hub.state.session_factory() as db:
        site_service.set_status(db, hub.state, site_service.get(db, blog), "suspended", "test")
        db.commit()
    assert [p["site_key"] for p in directory_ok(hub, shop, shop_secret)["peers"]] == [docs]


def test_the_directory_carries_both_keys_while_a_peer_rotates(
    make_hub: t.Callable[..., Hub],
) -> None:
    hub = make_hub(HEADLESSKEY_HUB_SECRET_GRACE=600)
    shop, shop_secret = hub.add_site("Shop", "https://shop.example.com")
    docs, old = hub.add_site("Docs", "https://docs.example.com")
    new = hub.signed("POST", ROTATE, docs, old).json()["secret"]
    keys = directory_ok(hub, shop, shop_secret)["peers"][0]["exchange_keys"]
    assert keys == [pairwise_key(parse_site_secret(s), docs, shop).hex() for s in (new, old)]
    hub.clock.advance(601)
    keys = directory_ok(hub, shop, shop_secret)["peers"][0]["exchange_keys"]
    assert keys == [pairwise_key(parse_site_secret(new), docs, shop).hex()]


def test_the_directory_is_private_and_briefly_cacheable(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    r = hub.signed("GET", DIRECTORY, shop, secret)
    assert r.headers["Cache-Control"] == "private, max-age=300"


# ---------------------------------------------------------------------------------------------
# event upload


def _events(n: int, start: int = 0) -> list[dict[str, t.Any]]:
    return [
        {"id": f"ev-{i}", "event": "login.success", "outcome": "success", "user_id": 7,
         "ip": "203.0.113.9", "device": "Firefox on Linux", "time": "2025-06-01T12:00:00Z",
         "details": {"n": i}}
        for i in range(start, start + n)
    ]


def site_events(hub: Hub) -> list[Event]:
    with hub.state.session_factory() as db:
        return list(db.scalars(select(Event).where(Event.source == "site").order_by(Event.id)))


def test_an_event_batch_is_stored_once(two: t.Any) -> None:
    hub, (shop, secret), (docs, docs_secret) = two
    r = hub.signed("POST", EVENTS, shop, secret, json={"events": _events(3)})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 3}
    rows = site_events(hub)
    assert [(e.site_key, e.remote_id, e.event, e.actor, e.ip) for e in rows] == [
        (shop, f"ev-{i}", "login.success", "7", "203.0.113.9") for i in range(3)
    ]
    assert rows[0].created_at == dt.datetime(2025, 6, 1, 12, tzinfo=dt.UTC)
    # Re-sending (a retry after a lost answer) adds nothing; new ids in the batch are kept.
    r = hub.signed("POST", EVENTS, shop, secret, json={"events": _events(3)})
    assert r.json() == {"accepted": 0}
    r = hub.signed("POST", EVENTS, shop, secret, json={"events": _events(4)})
    assert r.json() == {"accepted": 1}
    # Ids are per site: another site's "ev-0" is its own event.
    r = hub.signed("POST", EVENTS, docs, docs_secret, json={"events": _events(1)})
    assert r.json() == {"accepted": 1}
    assert len(site_events(hub)) == 5
    assert hub.signed("POST", EVENTS, shop, secret, json={"events": []}).json() == {"accepted": 0}


def test_control_characters_in_events_are_dropped_not_a_database_error(two: t.Any) -> None:
    """A site's events are display text: NUL (which PostgreSQL text cannot hold) and other
    control characters are dropped from every stored field, and the batch is accepted."""
    hub, (shop, secret), _docs = two
    event = {"id": "ev\x00-1", "event": "login.\x00failed", "time": "2025-06-01T12:00:00Z",
             "outcome": "fail\x00ure", "user_id": "7\x00", "login": "ali\x00ce\r\n",
             "ip": "203.0.113.9\x00", "device": "Fire\x00fox", "details": {"k": "v"}}
    r = hub.signed("POST", EVENTS, shop, secret, json={"events": [event]})
    assert r.status_code == 200 and r.json() == {"accepted": 1}, r.text
    (row,) = site_events(hub)
    assert (row.remote_id, row.event, row.outcome, row.actor, row.ip) == (
        "ev-1", "login.failed", "failure", "alice", "203.0.113.9")
    assert row.details["device"] == "Firefox" and row.details["user_id"] == "7"
    # Nothing left but control characters: the event has no name, and the batch is refused.
    r = hub.signed("POST", EVENTS, shop, secret, json={"events": [dict(event, event="\x00")]})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text


def test_a_nul_in_the_url_is_400(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    r = hub.signed("GET", "/api/v1/directory", shop, secret, query="site=%00")
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_request" and "NUL" in r.json()["message"]
    r = hub.signed("DELETE", "/api/v1/keys/kid%00x", shop, secret)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text


MALFORMED_BATCHES = [
    {"events": "nope"},
    {"events": {"id": "x"}},
    {},
    {"events": [*_events(2), {"event": "login.success", "time": "2025-06-01T12:00:00Z"}]},
    {"events": [*_events(2), {"id": "x", "time": "2025-06-01T12:00:00Z"}]},
    {"events": [*_events(2), {"id": "x", "event": "login.success", "time": "yesterday"}]},
    {"events": [*_events(2), "not an object"]},
    {"events": [*_events(2), {"id": ["x"], "event": "e", "time": "2025-06-01T12:00:00Z"}]},
]


def test_a_malformed_batch_stores_nothing(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    for batch in MALFORMED_BATCHES:
        r = hub.signed("POST", EVENTS, shop, secret, json=batch)
        assert r.status_code == 400, (batch, r.text)
        assert r.json()["code"] == "invalid_request"
        assert r.json()["data"]["fields"]
    assert site_events(hub) == []


@pytest.mark.parametrize("time", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_an_event_time_outside_the_utc_calendar_is_400(two: t.Any, time: str) -> None:
    """A valid ISO 8601 time whose UTC instant is before year 1 or after 9999 cannot be stored:
    the batch is refused like any bad time, not a server error."""
    hub, (shop, secret), _docs = two
    batch = [*_events(2), {"id": "x", "event": "login.success", "time": time}]
    body = refused(hub.signed("POST", EVENTS, shop, secret, json={"events": batch}), 400,
                   "invalid_request")
    assert body["data"]["fields"] == {"events[2].time": ["ISO 8601 time."]}
    assert site_events(hub) == []


def test_more_than_500_events_is_refused(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    r = hub.signed("POST", EVENTS, shop, secret, json={"events": _events(501)})
    assert r.status_code == 400, r.text
    assert site_events(hub) == []
    r = hub.signed("POST", EVENTS, shop, secret, json={"events": _events(500)})
    assert r.json() == {"accepted": 500}


def test_a_body_that_is_not_a_json_object_is_400(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    for body in (b"{not json", b"[1, 2]", b'"text"', b"[" * 100000 + b"]" * 100000):
        refused(hub.signed("POST", EVENTS, shop, secret, body=body), 400, "invalid_json")


def test_a_body_that_is_not_json_typed_is_415(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    r = hub.signed("POST", EVENTS, shop, secret, body=b'{"events": []}',
                   headers={"Content-Type": "text/plain"})
    refused(r, 415, "unsupported_media_type")


# ---------------------------------------------------------------------------------------------
# body size


def test_a_body_over_max_body_is_413(make_hub: t.Callable[..., Hub]) -> None:
    hub = make_hub(HEADLESSKEY_HUB_MAX_BODY=2000)
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    big = json.dumps({"events": _events(40)}).encode()
    assert len(big) > 2000
    refused(hub.signed("POST", EVENTS, shop, secret, body=big), 413, "payload_too_large")
    # Streamed without a Content-Length (chunked), the same.
    headers = sign_headers(hub, shop, secret, "POST", EVENTS, body=big)
    r = hub.http.post(hub.url + EVENTS, data=iter([big[:1500], big[1500:]]), headers=headers,
                      timeout=30)
    refused(r, 413, "payload_too_large")
    # Unsigned, too: the size is checked before anything else is read.
    refused(hub.http.post(hub.url + EVENTS, data=big, timeout=30), 413, "payload_too_large")
    assert site_events(hub) == []
    small = json.dumps({"events": _events(2)}).encode()
    assert hub.signed("POST", EVENTS, shop, secret, body=small).json() == {"accepted": 2}


# ---------------------------------------------------------------------------------------------
# routing errors and the federation metadata


def test_unknown_api_paths_answer_json(two: t.Any) -> None:
    hub, (shop, secret), _docs = two
    r = hub.signed("GET", "/api/v1/nothing-here", shop, secret)
    refused(r, 404, "not_found")
    r = hub.signed("PUT", DIRECTORY, shop, secret)
    refused(r, 405, "method_not_allowed")


def test_the_federation_metadata_names_issuer_jwks_and_api(hub: Hub) -> None:
    r = hub.http.get(hub.url + "/.well-known/headlesskey-federation", timeout=30)
    assert r.status_code == 200
    meta = r.json()
    assert meta["issuer"] == hub.url
    assert meta["jwks_uri"] == hub.url + "/.well-known/jwks.json"
    api = meta["site_api"]
    assert api["directory"] == hub.url + DIRECTORY
    assert api["keys"] == hub.url + KEYS
    assert api["secret_rotate"] == hub.url + ROTATE
    assert api["events"] == hub.url + EVENTS
    assert api["max_skew_seconds"] == 300
    assert requests.get(meta["jwks_uri"], timeout=30).status_code == 200
