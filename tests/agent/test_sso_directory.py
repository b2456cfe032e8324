"""Single sign-on and what the hub answers: junk is refused before the directory is read; the
hub down, slow or answering no directory is asked at most once per cooldown and process and
never holds the site's database; identities are never cut to fit the identity keys.

A hub (``make_hub``) and member sites (``make_site``) in this process over real HTTP, as in
tests/agent/test_replay_store.py. The receiving site B talks to the hub through a
:class:`Counter`, which counts its directory fetches and can stand in for a hub that is down,
slow, or answers something else.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
import time
import typing as t
from pathlib import Path

import jwt
import pytest
import requests
from sqlalchemy import text

from agent import federation
from agent.hub_client import Reply
from agent.hub_client import urllib_transport
from agent.signing import pairwise_key
from tests.agent.test_hub_replies import cached
from tests.agent.test_hub_replies import fetch
from tests.agent.test_replay_store import Federation
from tests.agent.test_replay_store import redis_from_env
from tests.conftest import PASSWORD
from tests.conftest import Site
from tests.conftest import answering
from tests.hub.conftest import Hub
from tests.hub.conftest import make_hub  # noqa: F401 - the fixture, for this module

Edit = t.Callable[[dict[str, t.Any]], dict[str, t.Any]]


class Counter:
    """A transport to the hub that counts directory fetches. ``body`` answers 200 with those
    bytes instead of the hub, ``down`` refuses the connection, ``delay`` answers that much
    later, ``edit`` changes the hub's directory before the site sees it."""

    def __init__(self) -> None:
        self.directory_gets = 0
        self.body: bytes | None = None
        self.down = False
        self.delay = 0.0
        self.edit: Edit | None = None
        self._lock = threading.Lock()

    def __call__(self, method: str, url: str, headers: dict[str, str], body: bytes,
                 timeout: float) -> Reply:
        is_directory = url.endswith("/api/v1/directory")
        if is_directory:
            with self._lock:
                self.directory_gets += 1
        time.sleep(self.delay)
        if self.down:
            raise ConnectionRefusedError("the hub is down")
        if self.body is not None:
            return Reply(200, {"Content-Type": "application/json"}, self.body)
        reply = urllib_transport(method, url, headers, body, timeout)
        if is_directory and self.edit is not None and reply.status == 200:
            return Reply(reply.status, reply.headers, json.dumps(self.edit(reply.json())).encode())
        return reply


def counted(site: Site) -> Counter:
    counter = Counter()
    site.state.hub_transport = counter
    return counter


@pytest.fixture
def fed(make_hub: t.Callable[..., Hub], make_site: t.Callable[..., Site],  # noqa: F811
        tmp_path: Path) -> Federation:
    return Federation(make_hub(), make_site, tmp_path, redis_from_env())


def forged(peer: Site, audience: str = "site-b", **changes: t.Any) -> dict[str, str]:
    """An assertion of ``peer`` for ``audience``, signed and MACed with the peer's own keys
    (as ``/sso/issue`` makes them), with ``changes`` to its claims (None drops one)."""
    state = peer.state
    key = federation.federation_key(state)
    now = int(time.time())
    claims: dict[str, t.Any] = {
        "iss": state.settings.issuer, "aud": audience, "sub": "7", "email_verified": False,
        "iat": now, "nbf": now, "exp": now + 30, "jti": secrets.token_urlsafe(16)}
    claims.update(changes)
    claims.setdefault("email", f"user-{claims['sub']}@example.com")
    claims = {name: value for name, value in claims.items() if value is not None}
    token = jwt.encode(claims, key.signing_key, algorithm=key.alg,
                       headers={"kid": key.kid, "typ": "hk-sso+jwt"})
    secret = state.keys.sso_secret()
    assert secret is not None and state.settings.hub_site_key is not None
    k_ab = pairwise_key(secret, state.settings.hub_site_key, audience)
    return {"site_key": state.settings.hub_site_key, "token": token,
            "signature": hmac.new(k_ab, token.encode(), hashlib.sha256).hexdigest()}


def exchange(site: Site, assertion: dict[str, str]) -> requests.Response:
    return site.api.post("/sso/exchange", json=assertion)


def refused(r: requests.Response) -> bool:
    return r.status_code == 401 and r.json()["code"] == "invalid_assertion"


def unavailable(r: requests.Response) -> bool:
    return r.status_code == 503 and r.json()["code"] == "federation_unavailable"


def count(site: Site, sql: str, **params: t.Any) -> int:
    return int(site.scalar(sql, **params))


# ---------------------------------------------------------------------------------------------
# what needs no directory


def _junk(fed: Federation) -> dict[str, dict[str, str]]:
    a = fed.a
    upper = forged(a)
    rest = forged(a)["token"].partition(".")[2]
    hs_header = jwt.utils.base64url_encode(json.dumps(
        {"alg": "HS256", "kid": "k", "typ": "hk-sso+jwt"}).encode()).decode()
    return {
        "for another site": forged(a, "site-c"),
        "for no site": forged(a, aud=None),
        "for two sites": forged(a, aud=["site-b", "site-c"]),
        "expired": forged(a, iat=int(time.time()) - 300, nbf=None, exp=int(time.time()) - 240),
        "not yet valid": forged(a, nbf=int(time.time()) + 300),
        "issued in the future": forged(a, iat=int(time.time()) + 300, exp=int(time.time()) + 330),
        "living 2 minutes": forged(a, exp=int(time.time()) + 120),
        "ending before it began": forged(a, iat=int(time.time()) + 10, exp=int(time.time()) + 5),
        "without an issuer": forged(a, iss=None),
        "with an issuer of 256 characters": forged(a, iss="https://a.example/" + "x" * 238),
        "with a number for subject": forged(a, sub=7),
        "with a subject of 256 characters": forged(a, sub="x" * 256),
        "with an empty jti": forged(a, jti=""),
        "with a jti of 65 characters": forged(a, jti="j" * 65),
        "with a string exp": forged(a, exp=str(int(time.time()) + 30)),
        "with a true iat": forged(a, iat=True),
        "with a float nbf": forged(a, nbf=time.time()),
        "with an HS256 header": dict(upper, token=hs_header + "." + rest),
        "with an upper-case HMAC": dict(upper, signature=upper["signature"].upper()),
        "with an HMAC that is no hex": dict(upper, signature="g" * 64),
        "naming this site as the peer": dict(forged(a), site_key="site-b"),
    }


def test_junk_is_refused_before_the_hub_is_asked(fed: Federation) -> None:
    """With no directory cached, each of these would make B ask the hub; none needs to."""
    b = fed.b
    counter = counted(b)
    for name, assertion in _junk(fed).items():
        r = exchange(b, assertion)
        assert refused(r), (name, r.status_code, r.text)
        assert counter.directory_gets == 0, name
    assert cached(b) is None
    assert count(b, "SELECT count(*) FROM hk_sessions") == 0
    # Control: a genuine assertion makes B fetch its directory, and gets in.
    r = exchange(b, forged(fed.a))
    assert r.status_code == 200, r.text
    assert counter.directory_gets == 1


# ---------------------------------------------------------------------------------------------
# the hub down, slow, or answering no directory


def test_with_the_hub_slow_and_down_a_flood_makes_one_request(fed: Federation) -> None:
    """No directory cached, the hub taking a second to fail: concurrent exchanges wait for the
    one request their process makes, and the next ones within the cooldown make none."""
    b = fed.b
    counter = counted(b)
    counter.down, counter.delay = True, 1.0
    assertions = [forged(fed.a) for _ in range(8)]
    barrier = threading.Barrier(len(assertions))

    def attempt(assertion: dict[str, str]) -> requests.Response:
        barrier.wait(10)
        return requests.post(b.api.url("/sso/exchange"), json=assertion, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(len(assertions)) as pool:
        answers = list(pool.map(attempt, assertions))
    assert all(unavailable(r) for r in answers), [(r.status_code, r.text) for r in answers]
    assert counter.directory_gets == 1
    for assertion in assertions:
        assert unavailable(exchange(b, assertion))
    assert counter.directory_gets == 1
    # After the cooldown the hub, up again, is asked once more; the unspent assertions work.
    b.clock.advance(6)
    counter.down, counter.delay = False, 0.0
    assert [exchange(b, assertion).status_code for assertion in assertions[:2]] == [200, 200]
    assert counter.directory_gets == 2


def test_while_the_hub_answers_slowly_the_site_is_not_held_up(fed: Federation) -> None:
    """No directory cached and the hub taking 2 s: B's first exchange waits for it, but a
    password login at B meanwhile does not (no transaction is open while the hub answers)."""
    b = fed.b
    b.create_user("otto")
    counter = counted(b)
    counter.delay = 2.0
    assertion = forged(fed.a)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(exchange, b, assertion)
        time.sleep(0.3)  # the exchange is waiting for the hub
        started = time.monotonic()
        login = b.api.post("/token", json={"username": "otto", "password": PASSWORD})
        took = time.monotonic() - started
        r = pending.result(timeout=30)
    assert login.status_code == 200, login.text
    assert took < 1.0, f"a login waited {took:.2f} s for the hub's answer to another request"
    assert r.status_code == 200, r.text
    assert counter.directory_gets == 1


MALFORMED = {
    "logouts that are no list": {"logouts": 5},
    "redeliveries that are no list": {"webhook_redeliveries": {"id": 1}},
    "a peer without an issuer": {"peers": [{"site_key": "site-a", "keys": [],
                                            "exchange_keys": []}]},
    "a peer whose keys are no list": {"peers": [{"site_key": "site-a", "issuer": "x",
                                                 "keys": 1, "exchange_keys": []}]},
}


@pytest.mark.parametrize("change", MALFORMED.values(), ids=list(MALFORMED))
def test_a_directory_of_another_shape_is_the_hub_down(fed: Federation,
                                                      change: dict[str, t.Any]) -> None:
    """Nothing is cached, the exchange is a 503 (not a 500); with a good directory cached,
    that one stays and serves."""
    b = fed.b
    counter = counted(b)
    counter.edit = lambda body: {**body, **change}
    assertion = forged(fed.a)
    assert unavailable(exchange(b, assertion))
    assert cached(b) is None
    counter.edit = None
    b.clock.advance(6)  # past the cooldown of the failed fetch
    good = fetch(b)
    counter.edit = lambda body: {**body, **change}
    b.clock.advance(61)  # the refresh is due
    r = exchange(b, assertion)
    assert r.status_code == 200, r.text
    assert counter.directory_gets == 3
    assert cached(b) == good


def test_json_nested_beyond_the_stack_is_the_hub_down(fed: Federation) -> None:
    b = fed.b
    counter = counted(b)
    counter.body = b"[" * 100_000 + b"]" * 100_000
    assert unavailable(exchange(b, forged(fed.a)))
    assert cached(b) is None


NOT_HTTP = {
    "no status line": b"garbage\r\n\r\n",
    "a header line past 64 KiB": b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n",
    "a chunked body cut short": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


@pytest.fixture
def speaks(request: pytest.FixtureRequest) -> t.Iterator[str]:
    """A TCP server on loopback answering every connection with ``request.param`` (no HTTP)."""
    with answering(request.param) as url:
        yield url


@pytest.mark.parametrize("speaks", NOT_HTTP.values(), ids=list(NOT_HTTP), indirect=True)
def test_a_hub_that_does_not_answer_in_http_is_the_hub_down(fed: Federation,
                                                            speaks: str) -> None:
    """Whatever reaches B at the hub's address instead of an HTTP answer (a proxy or another
    service on that port): an exchange is a 503, and a global logout ends B's sessions and says
    the federation was not told (neither a 500)."""
    b = fed.b
    hub = b.state.settings.hub_url
    assert hub is not None

    def elsewhere(method: str, url: str, headers: dict[str, str], body: bytes,
                  timeout: float) -> Reply:
        return urllib_transport(method, speaks + url.removeprefix(hub), headers, body, timeout)

    b.state.hub_transport = elsewhere
    assert unavailable(exchange(b, forged(fed.a)))
    assert cached(b) is None
    b.create_user("otto")
    token = b.api.login("otto")["token"]
    r = b.api.post("/token/revoke", json={"scope": "global"}, token=token)
    assert r.status_code == 200, r.text
    assert r.json()["global"] is False
    assert b.api.get("/me", token=token).status_code == 401


def test_a_logout_of_another_shape_is_skipped(fed: Federation) -> None:
    """One entry the site cannot read does not make the directory (or its other logouts) fail."""
    b = fed.b
    counter = counted(b)
    first = exchange(b, forged(fed.a, sub="41"))
    assert first.status_code == 200, first.text
    token = first.json()["token"]
    now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    logouts = [{"id": 9001, "issuer": "https://b.example", "subject": "999",
                "site_key": "site-b", "origin": [1], "created_at": now},
               {"id": 9002, "issuer": "https://a.example", "subject": "41",
                "site_key": "site-a", "origin": 9002, "created_at": now}]
    counter.edit = lambda body: {**body, "logouts": body["logouts"] + logouts}
    b.clock.advance(61)
    r = exchange(b, forged(fed.a))
    assert r.status_code == 200, r.text
    assert b.api.get("/me", token=token).status_code == 401  # the readable logout applied
    assert [lo["id"] for lo in (cached(b) or {})["logouts"]][-2:] == [9001, 9002]


# ---------------------------------------------------------------------------------------------
# identities are never cut to fit


A_255 = "https://a.example/" + "x" * (255 - len("https://a.example/"))
C_LONGER = A_255 + "/c"  # alike in its first 255 characters


def with_issuers(body: dict[str, t.Any]) -> dict[str, t.Any]:
    """The directory as a hub would list A with an issuer of 255 characters and C with a longer
    one that begins alike."""
    issuers = {"site-a": A_255, "site-c": C_LONGER}
    peers = [dict(peer, issuer=issuers.get(peer["site_key"], peer["issuer"]))
             for peer in body["peers"]]
    return {**body, "peers": peers}


def test_an_issuer_longer_than_255_characters_reaches_no_one_elses_account(
        fed: Federation) -> None:
    b, c = fed.b, fed.member("c")
    counter = counted(b)
    counter.edit = with_issuers
    first = exchange(b, forged(fed.a, iss=A_255, sub="7"))
    assert first.status_code == 200, first.text
    ann = first.json()["user"]["ID"]
    users = count(b, "SELECT count(*) FROM hk_users")
    r = exchange(b, forged(c, iss=C_LONGER, sub="7", email="mallory@example.com"))
    assert refused(r), r.text
    assert count(b, "SELECT count(*) FROM hk_users") == users
    assert count(b, "SELECT count(*) FROM hk_identity_links") == 1
    assert count(b, "SELECT count(*) FROM hk_sessions WHERE user_id = :u", u=ann) == 1
    assert counter.directory_gets == 1


def test_a_logout_of_an_issuer_longer_than_255_characters_ends_no_one_elses_session(
        fed: Federation) -> None:
    b = fed.b
    counter = counted(b)
    counter.edit = with_issuers
    first = exchange(b, forged(fed.a, iss=A_255, sub="7"))
    assert first.status_code == 200, first.text
    now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    logout = {"id": 9003, "issuer": C_LONGER, "subject": "7", "site_key": "site-c",
              "origin": 9003, "created_at": now}
    counter.edit = lambda body: {**with_issuers(body), "logouts": body["logouts"] + [logout]}
    b.clock.advance(61)
    fetch(b)
    assert counter.directory_gets == 2
    assert b.api.get("/me", token=first.json()["token"]).status_code == 200


# ---------------------------------------------------------------------------------------------
# the brute-force counter


def test_exchanges_while_the_hub_is_down_neither_count_nor_clear_failures(
        fed: Federation) -> None:
    """A 503 is no guess and no success: its reservation is given back, the IP's failures stay
    as they were."""
    b = fed.again(fed.b, HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES=3, HEADLESSKEY_REDIS_URL=None)
    counter = counted(b)
    junk = {"site_key": "site-a", "token": "x.y.z", "signature": "0" * 64}
    assert [refused(exchange(b, junk)) for _ in range(2)] == [True, True]
    counter.down = True
    for _ in range(5):
        assert unavailable(exchange(b, forged(fed.a)))
    assert refused(exchange(b, junk))  # the third failure: the IP is locked
    r = exchange(b, forged(fed.a))
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "too_many_attempts"



CONTROLS = {
    "a NUL in the subject": {"sub": "7\x00"},
    "a line break in the subject": {"sub": "7\n"},
    "a lone surrogate in the subject": {"sub": "7\ud800"},
    "a NUL in the jti": {"jti": "j\x00" + "x" * 20},
}


@pytest.mark.parametrize("change", CONTROLS.values(), ids=list(CONTROLS))
def test_an_id_holding_a_control_character_is_refused(fed: Federation,
                                                      change: dict[str, t.Any]) -> None:
    """Signed by the peer, still no id (PostgreSQL text holds no NUL: it was a 500 there)."""
    b = fed.b
    assert refused(exchange(b, forged(fed.a, **change)))
    assert count(b, "SELECT count(*) FROM hk_users") == 0
    assert count(b, "SELECT count(*) FROM hk_identity_links") == 0
    assert count(b, "SELECT count(*) FROM hk_sessions") == 0
    rejected = b.scalar("SELECT details FROM hk_audit WHERE event = 'sso.rejected'")
    assert "bad_token" in str(rejected)


def test_a_name_holding_a_control_character_names_the_account_after_its_login(
        fed: Federation) -> None:
    b = fed.b
    r = exchange(b, forged(fed.a, sub="8", email="ann@example.com", name="Ann\x00"))
    assert r.status_code == 200, r.text
    assert r.json()["user"]["display_name"] == r.json()["user"]["user_login"] == "ann"


# ---------------------------------------------------------------------------------------------
# an account disabled while it signs on


def test_a_sign_on_while_the_account_is_being_disabled_opens_no_session(
        fed: Federation) -> None:
    """A disable (POST /admin/users/{id}/disable: the account's row, then its sessions) under
    way while an exchange signs the account on: the exchange waits for it and is refused, so
    no session outlives the disable (and none comes back when the account is enabled)."""
    b = fed.b
    first = exchange(b, forged(fed.a, sub="8", email="ann@example.com"))
    assert first.status_code == 200, first.text
    user_id = first.json()["user"]["ID"]
    with b.state.engine.connect() as conn:
        disabling = conn.begin()  # on SQLite, the agent's engine begins IMMEDIATE
        conn.execute(text("UPDATE hk_users SET status = 'disabled' WHERE id = :id"),
                      {"id": user_id})
        conn.execute(text("UPDATE hk_sessions SET revoked_at = CURRENT_TIMESTAMP,"
                          " revoke_reason = 'user_disabled'"
                          " WHERE user_id = :id AND revoked_at IS NULL"), {"id": user_id})
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(exchange, b, forged(fed.a, sub="8", email="ann@example.com"))
            time.sleep(1.0)  # the exchange, as far as it gets before the disable is committed
            disabling.commit()
            r = pending.result()
    assert refused(r), r.text
    assert count(b, "SELECT count(*) FROM hk_sessions WHERE user_id = :id"
                    " AND revoked_at IS NULL", id=user_id) == 0
    rejected = b.scalar("SELECT details FROM hk_audit WHERE event = 'sso.rejected'")
    assert "account_disabled" in str(rejected)
