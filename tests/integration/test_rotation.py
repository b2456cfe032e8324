"""Rotation under traffic (DESIGN §6), across real processes.

A hub and two sites (A with ES256 access tokens, B with RS256), each ``headlesskey-agent serve``
with two gunicorn workers and its jobs process, with rotation periods of seconds. While a client
logs in, validates, refreshes and crosses from A to B in a loop, the access-token keys, the SSO
keys and the hub secrets rotate several times. Not one request may fail, and a key may leave a
JWKS only once every token it signed has expired.
"""

from __future__ import annotations

import time
import typing as t

import jwt
import pytest
import requests

from tests.conftest import PASSWORD
from tests.integration.test_sso import Federation
from tests.integration.test_sso import exchange
from tests.integration.test_sso import new_user

RUN = 55.0  # seconds of traffic: long enough for a superseded access-token key to retire
SETTINGS = {
    "HEADLESSKEY_KEY_ROTATION": "8",
    "HEADLESSKEY_FEDERATION_KEY_ROTATION": "8",
    "HEADLESSKEY_HUB_SECRET_ROTATION": "10",
    "HEADLESSKEY_JWKS_MAX_AGE": "2",
    "HEADLESSKEY_DIRECTORY_REFRESH": "1",
    "HEADLESSKEY_ACCESS_TOKEN_TTL": "30",
    "HEADLESSKEY_SSO_ASSERTION_TTL": "10",
    "HEADLESSKEY_LEEWAY": "0",
    "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "1000",
    "HEADLESSKEY_LOCKOUT_MAX_FAILURES": "100",
}


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Federation]:
    fed = Federation.build(tmp_path_factory.mktemp("rotation"), ["a", "b"], jobs=True,
                           algorithms={"a": "ES256", "b": "RS256"}, **SETTINGS)
    try:
        yield fed
    finally:
        fed.stop()


def kids(url: str) -> set[str]:
    r = requests.get(url, timeout=10)
    assert r.status_code == 200, r.text
    return {k["kid"] for k in r.json()["keys"]}


def test_nothing_fails_while_keys_and_secrets_rotate(rotating: Federation) -> None:
    a, b, hub = rotating["a"], rotating["b"], rotating.hub
    user = new_user(a, "rotor")
    failures: list[str] = []
    # kid -> the latest `exp` of a token (or assertion) it signed
    access_exp: dict[str, int] = {}
    sso_exp: dict[str, int] = {}
    held: list[str] = []  # older access tokens of A, validated again while they live
    requests_made = 0

    def check(response: requests.Response, what: str, status: int = 200) -> dict[str, t.Any]:
        nonlocal requests_made
        requests_made += 1
        if response.status_code != status:
            failures.append(f"{what}: {response.status_code} {response.text[:200]}")
            return {}
        return t.cast(dict[str, t.Any], response.json())

    def note(token: str, seen: dict[str, int]) -> None:
        header = jwt.get_unverified_header(token)
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        seen[header["kid"]] = max(seen.get(header["kid"], 0), exp)

    def published_while_alive(url: str, seen: dict[str, int], what: str) -> None:
        now = time.time()
        listed = kids(url)
        for kid, exp in seen.items():
            if exp > now + 0.5 and kid not in listed:
                failures.append(f"{what}: key {kid} left the JWKS {exp - now:.1f}s "
                                "before its last token expired")

    # A session of its own for refreshes (a refreshed session's older access tokens end).
    refresh_token = a.post("/token", json={"username": user.username, "password": PASSWORD}
                           ).json()["refresh_token"]
    deadline = time.monotonic() + RUN
    while time.monotonic() < deadline and len(failures) < 5:
        login = check(a.post("/token", json={"username": user.username, "password": PASSWORD}),
                      "login at A")
        if not login:
            continue
        note(login["token"], access_exp)
        held.append(login["token"])
        check(a.post("/token/validate", token=login["token"]), "validate at A")
        oldest = jwt.decode(held[0], options={"verify_signature": False})["exp"]
        if oldest < time.time() + 2:
            held.pop(0)
        else:
            check(a.post("/token/validate", token=held[0]), "validate an older token at A")
        refreshed = check(a.post("/token/refresh", json={"refresh_token": refresh_token}),
                          "refresh at A")
        if refreshed:
            refresh_token = refreshed["refresh_token"]
            note(refreshed["token"], access_exp)

        assertion = check(a.post("/sso/issue", token=login["token"], json={"target": b.site_key}),
                          "SSO issue at A")
        if assertion:
            note(assertion["token"], sso_exp)
            at_b = check(exchange(b, assertion), "exchange at B")
            if at_b:
                check(b.post("/token/validate", token=at_b["token"]), "validate at B")
        published_while_alive(f"{a.base}/.well-known/jwks.json", access_exp, "A's JWKS")
        published_while_alive(f"{hub.url}/.well-known/jwks.json", sso_exp, "the hub's JWKS")
        time.sleep(0.05)

    assert failures == [], "\n".join(failures)
    ended = time.time()
    access_keys = len(access_exp)
    sso_keys = len(sso_exp)
    secrets_a = a.rows("SELECT count(*) FROM hk_keys WHERE purpose = 'hub-secret'")[0][0]
    retired = [kid for kid, exp in access_exp.items()
               if exp < ended and kid not in kids(f"{a.base}/.well-known/jwks.json")]
    print(f"\n[rotation] {requests_made} requests in {RUN:.0f}s, none failed; "
          f"access-token keys used at A: {access_keys}, SSO keys: {sso_keys}, "
          f"hub secrets stored at A: {secrets_a}; retired from A's JWKS: {len(retired)}")
    assert access_keys >= 3, "A's access-token key did not rotate under traffic"
    assert sso_keys >= 2, "A's SSO key did not rotate under traffic"
    assert secrets_a >= 2, "A's hub secret did not rotate under traffic"
    assert retired, "no superseded key left A's JWKS after its last token expired"
    for site in (a, b):
        assert site.service is not None and "Traceback" not in site.service.logs()
