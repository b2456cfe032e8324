"""SECURITY.md §9, B-01 to B-07, B-09 and B-15: CORS and the security headers of every response.

Every response of the agent's API, of the standalone agent's other pages (its index and its
404s), of the hub's API, well-known documents and admin console, errors included, carries
``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``; HSTS is sent when the
request came over TLS, which behind a proxy is what the trusted proxy's ``X-Forwarded-Proto``
says, and only then. Token responses are ``Cache-Control: no-store`` and ``Pragma: no-cache``.

The fleet's sites allow every origin (``CORS = true``: ``*``, never with credentials); the
federation this part of the suite shares (:func:`surface`, also used by test_console, test_audit
and test_leaks) has sites with an allow-list and one trusted proxy in front of the hub and the
sites.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import typing as t
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

import pytest
import requests

from agent import signing
from tests.conftest import SERVER_POLL
from tests.conftest import Mailbox
from tests.integration.test_sso import PREFIX
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Federation
from tests.integration.test_sso import Hub
from tests.security.conftest import Fleet
from tests.security.conftest import fresh_user
from tests.security.conftest import smtp_settings

ALLOWED = "https://site.example"
EVIL = "https://evil.example"
HSTS = re.compile(r"^max-age=(\d+); includeSubDomains$")
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver on loopback: records every request (headers and body), answers 204."""

    seen: list[tuple[dict[str, str], str]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        Receiver.seen.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: t.Any) -> None:
        pass


SURFACE = pytest.StashKey[Federation]()


def surface(request: pytest.FixtureRequest, mail: Mailbox) -> Federation:
    """The federation of this part of the suite, built once per run and shared by its modules.

    A hub (asking for the password again 2 s after sign-in) and sites ``x`` and ``y``, each
    behind one trusted proxy and serving with its jobs process; the sites allow the one origin
    ``ALLOWED``, lock an account after 3 failures, treat a reused refresh token as reuse at once
    (no grace window), mail to ``mail`` and send every event to the webhook receiver
    (:class:`Receiver`, secret ``WEBHOOK_SECRET``).
    """
    config = request.config
    if SURFACE in config.stash:
        return config.stash[SURFACE]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": SERVER_POLL},
                     daemon=True).start()
    hooks = [{"id": "receiver", "url": f"http://127.0.0.1:{server.server_address[1]}/hooks",
              "secret": WEBHOOK_SECRET}]
    root = request.getfixturevalue("tmp_path_factory").mktemp("surface")
    try:
        fed = Federation.build(
                    root, ["x", "y"], jobs=True,
                    hub_settings={"HEADLESSKEY_HUB_TRUSTED_PROXIES": "1",
                                  "HEADLESSKEY_HUB_REAUTH_SECONDS": "2"},
                    HEADLESSKEY_TRUSTED_PROXIES="1", HEADLESSKEY_CORS=json.dumps([ALLOWED]),
                    HEADLESSKEY_LOCKOUT_MAX_FAILURES="3",
                    HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES="1000", HEADLESSKEY_REFRESH_GRACE="0",
                    HEADLESSKEY_DIRECTORY_REFRESH="2",
                    HEADLESSKEY_WEBHOOKS=json.dumps(hooks), **smtp_settings(mail))
    except BaseException:
        server.shutdown()
        raise

    def stop() -> None:
        fed.stop()
        server.shutdown()
        server.server_close()

    config.add_cleanup(stop)
    config.stash[SURFACE] = fed
    return fed


@pytest.fixture(scope="module")
def proxied(request: pytest.FixtureRequest, mail: Mailbox) -> Federation:
    """The shared federation (:func:`surface`); its site ``x`` allows one origin."""
    return surface(request, mail)


def send(method: str, url: str, **kw: t.Any) -> requests.Response:
    kw.setdefault("timeout", 30)
    kw.setdefault("allow_redirects", False)
    return requests.request(method, url, **kw)  # noqa: S113 - the timeout is set just above


def signed(hub: Hub, agent: Agent, method: str, path: str, body: bytes = b"",
           headers: t.Mapping[str, str] | None = None) -> requests.Response:
    """One request to the hub's site API, signed with ``agent``'s secret."""
    signature = signing.sign_request(agent.raw_secret, agent.site_key, method, path, "", body)
    extra = {"Content-Type": "application/json"} if body else {}
    return send(method, hub.url + path, data=body,
                headers={**signature, **extra, **(headers or {})})


def agent_requests(agent: Agent) -> list[tuple[str, str, dict[str, t.Any]]]:
    """(method, url, kwargs): successes, refusals, malformed bodies and 404s of one site."""
    api = agent.base + PREFIX
    return [
        ("GET", agent.base + "/", {}),
        ("GET", agent.base + "/no-such-page", {}),
        ("GET", agent.base + "/.well-known/jwks.json", {}),
        ("GET", api + "/openapi.json", {}),
        ("GET", api + "/no-such-route", {}),
        ("GET", api + "/me", {}),
        ("POST", api + "/token", {"json": {"username": "nobody-here", "password": "x" * 12}}),
        ("POST", api + "/token", {"data": "{not json",
                                  "headers": {"Content-Type": "application/json"}}),
        ("POST", api + "/token", {"data": "a=b"}),
        ("PUT", api + "/token", {}),
        ("OPTIONS", api + "/token", {"headers": {"Origin": ALLOWED,
                                                  "Access-Control-Request-Method": "POST"}}),
    ]


def hub_requests(hub: Hub) -> list[tuple[str, str, dict[str, t.Any]]]:
    return [
        ("GET", hub.url + "/.well-known/jwks.json", {}),
        ("GET", hub.url + "/.well-known/headlesskey-federation", {}),
        ("GET", hub.url + "/api/v1/directory", {}),
        ("POST", hub.url + "/api/v1/events", {"data": "{",
                                              "headers": {"Content-Type": "application/json"}}),
        ("GET", hub.url + "/api/no-such-route", {}),
        ("GET", hub.url + "/", {}),
        ("GET", hub.url + "/console/login", {}),
        ("POST", hub.url + "/console/login", {"data": {"username": "a", "password": "b"}}),
        ("GET", hub.url + "/console/no-such-page", {}),
        ("GET", hub.url + "/no-such-page", {}),
        ("TRACE", hub.url + "/console/login", {}),
    ]


def assert_common_headers(response: requests.Response) -> None:
    """nosniff, a referrer policy, and a Content-Type (with a charset for text) on a response."""
    where = f"{response.request.method} {response.url} -> {response.status_code}"
    headers = response.headers
    assert headers.get("X-Content-Type-Options") == "nosniff", where
    assert headers.get("Referrer-Policy") in ("no-referrer",
                                              "strict-origin-when-cross-origin"), where
    if response.status_code in (204, 301, 302, 303, 304):
        return
    content_type = headers.get("Content-Type", "")
    # JSON is UTF-8 by definition (RFC 8259 §8.1: no charset parameter); text must name one.
    assert content_type.startswith(("application/json", "text/")), f"{where}: {content_type!r}"
    if content_type.startswith("text/"):
        assert "charset=utf-8" in content_type.lower(), f"{where}: {content_type!r}"


@pytest.mark.case("B-07", "B-09")
def test_B07_B09_every_response_is_nosniff_with_a_referrer_policy(fleet: Fleet) -> None:
    """Successes, refusals, malformed bodies, 404s and 405s of the three sites and the hub
    (its API, well-known documents and console) all carry nosniff, ``Referrer-Policy`` and a
    proper ``Content-Type``."""
    responses = [send(m, url, **kw)
                 for agent in fleet.agents for m, url, kw in agent_requests(agent)]
    responses += [send(m, url, **kw) for m, url, kw in hub_requests(fleet.hub)]
    statuses = {r.status_code for r in responses}
    assert {200, 204, 400, 401, 404, 405}.issubset(statuses), statuses
    for response in responses:
        assert response.status_code < 500, response.text
        assert_common_headers(response)
        # Over plain HTTP with no trusted proxy, no HSTS (browsers ignore it there anyway).
        assert "Strict-Transport-Security" not in response.headers


@pytest.mark.case("B-06")
def test_B06_hsts_behind_the_trusted_proxy(proxied: Federation) -> None:
    """Behind one trusted proxy that says ``X-Forwarded-Proto: https``, every response of the
    site and the hub (errors and 404s too) has HSTS for at least a year with subdomains; what
    the client itself put before the proxy's entry does not count."""
    agent, hub = proxied["x"], proxied.hub
    calls = agent_requests(agent) + hub_requests(hub)
    for method, url, kw in calls:
        headers = {**kw.pop("headers", {}), "X-Forwarded-Proto": "https"}
        response = send(method, url, headers=headers, **kw)
        assert_common_headers(response)
        match = HSTS.match(response.headers.get("Strict-Transport-Security", ""))
        assert match, f"{method} {url} -> {response.status_code}: {dict(response.headers)}"
        assert int(match.group(1)) >= 31536000
    for method, url, _kw in calls[:3] + hub_requests(hub)[:3]:
        # The client claims https, the proxy (the last entry) says http: no HSTS.
        response = send(method, url, headers={"X-Forwarded-Proto": "https, http"})
        assert "Strict-Transport-Security" not in response.headers, url
        response = send(method, url)
        assert "Strict-Transport-Security" not in response.headers, url


@pytest.mark.case("B-06")
def test_B06_x_forwarded_proto_is_ignored_without_a_trusted_proxy(fleet: Fleet) -> None:
    """With no trusted proxy configured, a client's own ``X-Forwarded-Proto: https`` gives no
    HSTS: the site and the hub do not believe a header anyone can send."""
    for method, url, kw in agent_requests(fleet["hs"]) + hub_requests(fleet.hub):
        headers = {**kw.pop("headers", {}), "X-Forwarded-Proto": "https"}
        response = send(method, url, headers=headers, **kw)
        assert "Strict-Transport-Security" not in response.headers, url


@pytest.mark.case("B-06")
def test_B06_hub_trusts_x_forwarded_for_only_from_its_proxy(proxied: Federation,
                                                            fleet: Fleet) -> None:
    """The hub logs the client address the trusted proxy reports, and the socket's address when
    it has no trusted proxy (an unsigned API call is logged as ``api.rejected`` with its IP)."""
    for hub, expected in ((proxied.hub, "203.0.113.7"), (fleet.hub, "127.0.0.1")):
        path = f"/api/v1/directory?probe={expected}"
        response = send("GET", hub.url + path, headers={"X-Forwarded-For": "203.0.113.7"})
        assert response.status_code == 401
        rows = [json.loads(details) | {"ip": ip} for ip, details in _hub_rows(
            hub, "SELECT ip, details FROM hub_events WHERE event = 'api.rejected' "
                 "ORDER BY id DESC LIMIT 5")]
        assert rows and rows[0]["ip"] == expected, rows


def _hub_rows(hub: Hub, sql: str) -> list[tuple[t.Any, ...]]:
    return hub.rows(sql)


@pytest.mark.case("B-07")
def test_B07_token_responses_are_not_cached(agent: Agent) -> None:
    """Every answer that hands out a token (login, refresh, SSO exchange) and every refusal of
    one is ``Cache-Control: no-store`` with ``Pragma: no-cache`` (RFC 6749 §5.1)."""
    user = fresh_user(agent)
    login = agent.post("/token", json={"username": user.username,
                                       "password": "correct horse battery staple"})
    refresh = agent.post("/token/refresh", json={"refresh_token": login.json()["refresh_token"]})
    bad = agent.post("/token", json={"username": user.username, "password": "wrong" * 3})
    full = agent.post("/login", json={"username": user.username,
                                      "password": "correct horse battery staple"})
    validate = agent.post("/token/validate", token=user.token)
    for response in (login, refresh, bad, full, validate):
        assert response.headers.get("Cache-Control") == "no-store", response.url
        assert response.headers.get("Pragma") == "no-cache", response.url
    assert login.status_code == refresh.status_code == full.status_code == 200
    assert bad.status_code == 401


@pytest.mark.case("B-07")
def test_B07_hub_secret_rotation_is_not_cached(proxied: Federation) -> None:
    """The hub's answer carrying a new site secret is ``no-store`` and ``Pragma: no-cache``."""
    hub, agent = proxied.hub, proxied["x"]
    response = signed(hub, agent, "GET", "/api/v1/directory")
    assert response.status_code == 200, response.text
    rotated = signed(hub, agent, "POST", "/api/v1/secret/rotate", b"{}")
    assert rotated.status_code == 200, rotated.text
    assert rotated.headers.get("Cache-Control") == "no-store"
    assert rotated.headers.get("Pragma") == "no-cache"
    # The old secret keeps working for the grace period: the site is not cut off.
    assert signed(hub, agent, "GET", "/api/v1/directory").status_code == 200


# --- CORS ------------------------------------------------------------------------------------


def preflight(url: str, origin: str, method: str = "POST",
              request_headers: str = "Content-Type") -> requests.Response:
    return send("OPTIONS", url, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": request_headers})


def simple(url: str, origin: str) -> requests.Response:
    return send("POST", url, json={"username": "nobody-here", "password": "x" * 12},
                headers={"Origin": origin})


@pytest.mark.case("B-01")
def test_B01_arbitrary_origin(fleet: Fleet, proxied: Federation) -> None:
    """An arbitrary origin is never reflected with credentials: a site allowing every origin
    answers ``*`` without ``Allow-Credentials``; a site with an allow-list and the hub (whose
    API is for servers) send no ``Access-Control-Allow-Origin`` at all."""
    open_site = fleet["rs"].base + PREFIX + "/token"
    listed = proxied["x"].base + PREFIX + "/token"
    for response in (preflight(open_site, EVIL), simple(open_site, EVIL)):
        assert response.headers.get("Access-Control-Allow-Origin") == "*"
        assert "Access-Control-Allow-Credentials" not in response.headers
    for response in (preflight(listed, EVIL), simple(listed, EVIL)):
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Credentials" not in response.headers
    for url in (fleet.hub.url + "/api/v1/directory", fleet.hub.url + "/.well-known/jwks.json",
                fleet.hub.url + "/console/login"):
        for response in (preflight(url, EVIL), send("GET", url, headers={"Origin": EVIL})):
            assert not any(h.lower().startswith("access-control-") for h in response.headers), url
    # The refused origin changed nothing: the allowed one is still answered.
    assert simple(listed, ALLOWED).headers.get("Access-Control-Allow-Origin") == ALLOWED


@pytest.mark.case("B-02")
def test_B02_null_origin(fleet: Fleet, proxied: Federation) -> None:
    """``Origin: null`` (sandboxed frames, file: pages) is never allowed by name: not by the
    allow-list site, not by the hub; the open site answers only its public ``*``."""
    listed = proxied["x"].base + PREFIX + "/token"
    for response in (preflight(listed, "null"), simple(listed, "null")):
        assert "Access-Control-Allow-Origin" not in response.headers
    open_site = fleet["es"].base + PREFIX + "/token"
    for response in (preflight(open_site, "null"), simple(open_site, "null")):
        assert response.headers.get("Access-Control-Allow-Origin") == "*"
        assert "Access-Control-Allow-Credentials" not in response.headers
    response = preflight(fleet.hub.url + "/api/v1/directory", "null")
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.case("B-03")
def test_B03_origin_must_match_exactly(proxied: Federation) -> None:
    """Only the exact allowed origin (scheme, host and port) is allowed: not a longer host, a
    host ending in it, plain http, another port, a trailing slash or a different case."""
    url = proxied["x"].base + PREFIX + "/token"
    tricks = ["https://site.example.evil.com", "https://evilsite.example", "http://site.example",
              "https://site.example:8443", "https://site.example/", "https://SITE.example",
              "https://sub.site.example", "https://site.example%60.evil.com"]
    for origin in tricks:
        for response in (preflight(url, origin), simple(url, origin)):
            assert "Access-Control-Allow-Origin" not in response.headers, origin
    for response in (preflight(url, ALLOWED), simple(url, ALLOWED)):
        assert response.headers.get("Access-Control-Allow-Origin") == ALLOWED


@pytest.mark.case("B-04")
def test_B04_vary_origin(proxied: Federation) -> None:
    """Where the answer depends on Origin (the allow-list site), every response says
    ``Vary: Origin``, allowed origin or not, so no cache serves one origin's answer to another."""
    url = proxied["x"].base + PREFIX + "/token"
    for origin in (ALLOWED, EVIL):
        for response in (preflight(url, origin), simple(url, origin)):
            vary = [v.strip().lower() for v in response.headers.get("Vary", "").split(",")]
            assert "origin" in vary, (origin, response.headers)


@pytest.mark.case("B-05")
def test_B05_preflight_lists_only_what_the_api_needs(proxied: Federation) -> None:
    """A preflight from the allowed origin lists the API's methods (GET, POST, DELETE, OPTIONS)
    and headers (Authorization, Content-Type, the fallback header) only: not PUT, PATCH or
    TRACE, not a custom header the client asked for; no credentials."""
    url = proxied["x"].base + PREFIX + "/sessions/abc"
    for method, asked in (("DELETE", "Authorization"), ("PUT", "X-Evil"),
                          ("PATCH", "Authorization, X-Evil")):
        response = preflight(url, ALLOWED, method, asked)
        assert response.status_code in (200, 204)
        methods = {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")}
        allowed = {h.strip().lower()
                   for h in response.headers["Access-Control-Allow-Headers"].split(",")}
        assert methods == {"GET", "POST", "DELETE", "OPTIONS"}
        assert allowed == {"authorization", "content-type", "x-headlesskey-authorization"}
        assert "Access-Control-Allow-Credentials" not in response.headers
    evil = preflight(url, EVIL, "DELETE", "Authorization")
    assert not any(h.startswith("Access-Control-Allow-") for h in evil.headers)


# --- methods ---------------------------------------------------------------------------------


@pytest.mark.case("B-15")
def test_B15_method_hygiene(fleet: Fleet) -> None:
    """``TRACE``, ``PUT``, ``PATCH`` and ``DELETE`` on endpoints that do not take them are 405
    with an ``Allow`` header and a JSON error (the console: an HTML page), never echoing the
    request; the session behind the token still works afterwards."""
    agent = fleet["hs"]
    user = fresh_user(agent)
    api = agent.base + PREFIX
    auth = {"Authorization": f"Bearer {user.token}"}
    for method in ("TRACE", "PUT", "PATCH", "DELETE"):
        for url in (api + "/token", api + "/me", api + "/openapi.json", api + "/admin/logs",
                    fleet.hub.url + "/api/v1/directory", fleet.hub.url + "/.well-known/jwks.json",
                    fleet.hub.url + "/console/login"):
            response = send(method, url, headers=auth)
            assert response.status_code == 405, (method, url, response.status_code)
            assert response.headers.get("Allow"), (method, url)
            assert method not in {m.strip() for m in response.headers["Allow"].split(",")}
            assert user.token not in response.text
            if not url.endswith("/console/login"):
                assert response.json()["code"] == "method_not_allowed", (method, url)
    assert agent.get("/me", token=user.token).status_code == 200
