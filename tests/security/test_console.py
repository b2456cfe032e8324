"""SECURITY.md §9, B-08 and B-10 to B-14: the hub's admin console and cross-site access.

The fleet's hub serves its console as in production (``SECURE_COOKIES`` on: a ``__Host-``,
``Secure`` cookie). The test client keeps and sends that cookie over the loopback's plain HTTP
as a browser would over HTTPS; everything else is what a browser sees. Each test uses admins
and sites of its own, made with the hub's own commands, and reads the hub's database for the
state a refused request must not have changed.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import typing as t
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import Mailbox
from tests.integration.test_sso import Hub
from tests.integration.test_sso import k
from tests.security.conftest import Fleet
from tests.security.test_headers import EVIL
from tests.security.test_headers import signed
from tests.security.test_headers import surface

ADMIN_PASSWORD = "a long console passphrase 1"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Console:
    """A browser session on the hub's console.

    It keeps the session cookie itself and sends it over the loopback's plain HTTP, as a
    browser sends the ``Secure`` cookie over HTTPS (requests would hold it back).
    """

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                **kw: t.Any) -> requests.Response:
        cookie = "; ".join(f"{name}={value}" for name, value in self.cookies.items())
        response = requests.request(method, self.hub.url + path, allow_redirects=False,
                                    timeout=30, headers={**({"Cookie": cookie} if cookie else {}),
                                                         **(headers or {})}, **kw)
        for header in response.raw.headers.getlist("Set-Cookie"):
            name, _, rest = header.partition("=")
            value = rest.split(";")[0]
            if "expires=thu, 01 jan 1970" in header.lower() or not value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return response

    def get(self, path: str, **kw: t.Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: dict[str, str] | None = None,
             **kw: t.Any) -> requests.Response:
        return self.request("POST", path, data=data or {}, **kw)

    def token(self, path: str = "/console/sites") -> str:
        page = self.get(path)
        assert page.status_code == 200, page.status_code
        match = CSRF.search(page.text)
        assert match, "no CSRF token on the page"
        return match.group(1)

    def login(self, username: str, password: str = ADMIN_PASSWORD) -> requests.Response:
        return self.post("/console/login", {"username": username, "password": password,
                                            "csrf_token": self.token("/console/login")})


def new_admin(hub: Hub) -> str:
    username = f"admin{secrets.token_hex(4)}"
    hub.cli("admins", "create", "--username", username, "--password-stdin",
            stdin=ADMIN_PASSWORD + "\n")
    return username


def new_site(hub: Hub) -> str:
    key = f"target-{secrets.token_hex(4)}"
    hub.cli("sites", "add", "--name", key, "--url", f"https://{key}.example", "--key", key,
            "--json")
    return key


def signed_in(hub: Hub) -> Console:
    console = Console(hub)
    response = console.login(new_admin(hub))
    assert response.status_code == 302, response.text
    return console


def hub_rows(hub: Hub, sql: str, *params: t.Any) -> list[tuple[t.Any, ...]]:
    return hub.rows(sql, *params)


def site_status(hub: Hub, site_key: str) -> str:
    return str(hub_rows(hub, "SELECT status FROM hub_sites WHERE site_key = ?", site_key)[0][0])


def secret_versions(hub: Hub, site_key: str) -> int:
    return int(hub_rows(hub, "SELECT count(*) FROM hub_site_secrets s JOIN hub_sites t "
                             "ON t.id = s.site_id WHERE t.site_key = ?", site_key)[0][0])


def last_event(hub: Hub) -> int:
    return int(hub_rows(hub, "SELECT coalesce(max(id), 0) FROM hub_events")[0][0])


def events_since(hub: Hub, after: int) -> list[str]:
    return [r[0] for r in hub_rows(hub, "SELECT event FROM hub_events WHERE id > ? ORDER BY id",
                                   after)]


@pytest.mark.case("B-08")
def test_B08_console_cannot_be_framed(fleet: Fleet) -> None:
    """Every console page (login, signed-in pages, error pages, a refused form) has a CSP with
    ``frame-ancestors 'none'``, ``object-src 'none'`` and scripts from the hub only (no inline
    script or eval), and ``X-Frame-Options: DENY`` for older browsers."""
    console = signed_in(fleet.hub)
    responses = [Console(fleet.hub).get("/console/login"), console.get("/"),
                 console.get("/console/sites"), console.get("/console/activity"),
                 console.get("/console/no-such-page"), console.post("/console/sites/new")]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 404, 403]
    for response in responses:
        policy = {d.split()[0]: d.split()[1:] for d in
                  response.headers["Content-Security-Policy"].split(";") if d.strip()}
        assert policy["frame-ancestors"] == ["'none'"]
        assert policy["object-src"] == ["'none'"]
        assert policy["default-src"] == ["'self'"]
        assert policy["script-src"] == ["'self'"]
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Cache-Control"] == "no-store"
        assert "<script>" not in response.text and " onclick=" not in response.text


@pytest.mark.case("B-10")
def test_B10_session_cookie_flags(fleet: Fleet) -> None:
    """The console's session cookie is ``__Host-`` prefixed, ``Secure``, ``HttpOnly``,
    ``SameSite=Strict``, ``Path=/`` and names no ``Domain``; signing in issues a new cookie
    (a planted one is not kept), and after sign-out the old cookie opens nothing."""
    hub = fleet.hub
    console = Console(hub)
    console.get("/console/login")
    planted = dict(console.cookies)
    response = console.login(new_admin(hub))
    assert response.status_code == 302
    cookie = response.headers["Set-Cookie"]
    name, _, rest = cookie.partition("=")
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in rest.split(";")[1:]}
    assert name == "__Host-hk_console"
    assert {"secure", "httponly", "samesite", "path"} <= set(attributes), cookie
    assert attributes["samesite"] == "SameSite=Strict" and attributes["path"] == "Path=/"
    assert "domain" not in attributes
    assert console.cookies.get(name) != planted.get(name)
    stolen = dict(console.cookies)
    assert console.get("/console/sites").status_code == 200
    logout = console.post("/console/logout", {"csrf_token": console.token()})
    assert logout.status_code == 302
    thief = Console(hub)
    thief.cookies = stolen
    replay = thief.get("/console/sites")
    assert replay.status_code == 302
    assert urlsplit(replay.headers["Location"]).path == "/console/login"


@pytest.mark.case("B-11")
def test_B11_csrf(fleet: Fleet) -> None:
    """A state-changing console POST (suspend a site, rotate its secret, add a site) without
    the form's CSRF token, with another session's token, or marked as cross-site (``Origin``
    of another site, ``Sec-Fetch-Site: cross-site``, ``Origin: null`` without the browser
    vouching for the same origin) is 403 and changes nothing; the same POST with the session's
    own token from the hub's own origin works."""
    hub = fleet.hub
    site = new_site(hub)
    console, other = signed_in(hub), signed_in(hub)
    own, foreign = console.token(), other.token()
    assert own != foreign
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        ({}, {}),
        ({"csrf_token": foreign}, {}),
        ({"csrf_token": "x" * len(own)}, {}),
        ({"csrf_token": own}, {"Origin": EVIL}),
        ({"csrf_token": own}, {"Origin": hub.url + ".evil.example"}),
        ({"csrf_token": own}, {"Sec-Fetch-Site": "cross-site"}),
        ({"csrf_token": own}, {"Sec-Fetch-Site": "same-site"}),
        ({"csrf_token": own}, {"Origin": "null"}),
    ]
    mark, versions, sites = last_event(hub), secret_versions(hub, site), hub_rows(
        hub, "SELECT count(*) FROM hub_sites")
    for form, headers in attempts:
        for path, extra in ((f"/console/sites/{site}/suspend", {}),
                            (f"/console/sites/{site}/rotate-secret", {}),
                            ("/console/sites/new", {"name": "Evil", "url": EVIL,
                                                    "site_key": "evil-site"})):
            response = console.post(path, {**form, **extra}, headers=headers)
            assert response.status_code == 403, (path, form.keys(), headers, response.status_code)
            assert "whsec_" not in response.text and "secret" not in response.headers.get(
                "Location", "")
    assert site_status(hub, site) == "active"
    assert secret_versions(hub, site) == versions
    assert hub_rows(hub, "SELECT count(*) FROM hub_sites") == sites
    assert "site.suspended" not in events_since(hub, mark)
    # GET never changes state: the POST-only URL answers 405.
    assert console.get(f"/console/sites/{site}/suspend").status_code == 405
    assert site_status(hub, site) == "active"
    # The genuine form post, from the hub's own page and origin, is accepted.
    done = console.post(f"/console/sites/{site}/suspend", {"csrf_token": own},
                        headers={"Origin": hub.url, "Sec-Fetch-Site": "same-origin"})
    assert done.status_code == 302
    assert site_status(hub, site) == "suspended"


@pytest.mark.case("B-12")
def test_B12_console_needs_a_signed_in_admin(fleet: Fleet) -> None:
    """Without a session, or with a forged cookie, every console page sends the browser to the
    login form and every admin action changes nothing (a valid CSRF token of the login page does
    not help); a locked admin is refused even with the right password, with the very answer a
    wrong password gets."""
    hub = fleet.hub
    site = new_site(hub)
    anonymous = Console(hub)
    token = anonymous.token("/console/login")
    forged = Console(hub)
    forged.cookies["__Host-hk_console"] = "eyJhZG1pbl9pZCI6MX0.ZZZZZZ.forged"
    for browser in (anonymous, forged):
        for path in ("/", "/console/sites", f"/console/sites/{site}", "/console/activity",
                     "/console/settings"):
            response = browser.get(path)
            assert response.status_code == 302, path
            assert urlsplit(response.headers["Location"]).path == "/console/login"
        for path in (f"/console/sites/{site}/suspend", f"/console/sites/{site}/rotate-secret",
                     f"/console/sites/{site}/remove"):
            response = browser.post(path, {"csrf_token": token, "confirm": site})
            assert response.status_code in (302, 403), path
            assert "whsec_" not in response.text
    assert site_status(hub, site) == "active"
    assert secret_versions(hub, site) == 1

    admin = new_admin(hub)
    mark = last_event(hub)
    browser = Console(hub)
    wrong = [browser.login(admin, "not the passphrase") for _ in range(5)]
    locked = browser.login(admin)
    assert all(r.status_code == 200 for r in [*wrong, locked])
    assert "Invalid username or password." in locked.text
    assert _form_error(locked.text) == _form_error(wrong[0].text)
    assert browser.get("/console/sites").status_code == 302
    assert events_since(hub, mark).count("admin.locked") == 1
    assert "admin.login" not in events_since(hub, mark)


def _form_error(page: str) -> str:
    """The login page's text without its CSRF token (which differs per answer)."""
    return CSRF.sub("", page)


@pytest.fixture(scope="module")
def reauth_hub(request: pytest.FixtureRequest, mail: Mailbox) -> Hub:
    """The hub of the shared federation, which wants the password again 2 s after sign-in."""
    return surface(request, mail).hub


@pytest.mark.case("B-12")
def test_B12_secrets_need_a_recent_password(reauth_hub: Hub) -> None:
    """Once ``REAUTH_SECONDS`` have passed since the password was entered, rotating a site's
    secret (which shows it) or removing a site sends the admin to confirm the password and
    changes nothing; a wrong password does not help; the right one lets the same form work.
    (Every console admin is a full admin: there is no lesser role to refuse, and admins are
    added only on the host with ``headlesskey-hub admins create``.)"""
    hub = reauth_hub
    site = new_site(hub)
    console = signed_in(hub)
    time.sleep(2.2)
    page = f"/console/sites/{site}"
    for path, data in ((f"{page}/rotate-secret", {}), (f"{page}/remove", {"confirm": site})):
        response = console.post(path, {**data, "csrf_token": console.token(page)})
        assert response.status_code == 302, path
        assert urlsplit(response.headers["Location"]).path == "/console/reauth"
        assert "whsec_" not in response.text and "hks_" not in response.text
    assert secret_versions(hub, site) == 1 and site_status(hub, site) == "active"
    wrong = console.post("/console/reauth", {"password": "not the passphrase", "next": page,
                                             "csrf_token": console.token("/console/reauth")})
    assert wrong.status_code == 200 and "Invalid username or password." in wrong.text
    right = console.post("/console/reauth", {"password": ADMIN_PASSWORD, "next": page,
                                             "csrf_token": console.token("/console/reauth")})
    assert right.status_code == 302 and urlsplit(right.headers["Location"]).path == page
    rotated = console.post(f"{page}/rotate-secret", {"csrf_token": console.token(page)})
    assert rotated.status_code == 200
    assert secret_versions(hub, site) == 2


@pytest.mark.case("B-13")
def test_B13_a_site_cannot_reach_another_sites_data(fleet: Fleet) -> None:
    """Site ``hs`` signing its own requests cannot retire site ``rs``'s key by its kid, sees no
    exchange key of a pair it is not part of in its directory, and a logout it records names
    its own issuer only. The hub's API has no route taking another site's key."""
    hub, a, b = fleet.hub, fleet["hs"], fleet["rs"]
    kids = [r[0] for r in hub_rows(hub, "SELECT k.kid FROM hub_site_keys k JOIN hub_sites s "
                                        "ON s.id = k.site_id WHERE s.site_key = ? AND "
                                        "k.status = 'active'", b.site_key)]
    assert kids
    response = signed(hub, a, "DELETE", f"/api/v1/keys/{kids[0]}")
    assert response.status_code == 404, response.text
    assert response.json()["code"] == "key_not_found"
    assert kids[0] in [k["kid"] for k in requests.get(hub.url + "/.well-known/jwks.json",
                                                      timeout=30).json()["keys"]]
    directory = signed(hub, a, "GET", "/api/v1/directory")
    assert directory.status_code == 200
    text = directory.text
    others = [k(fleet.fed, "rs", "es"), k(fleet.fed, "es", "rs")]
    for key in others:
        for form in (key.hex(), base64.urlsafe_b64encode(key).decode().rstrip("=")):
            assert form not in text
    # A subject no site has, so the logout everywhere it records touches no other test.
    body = json.dumps({"subject": f"nobody-{secrets.token_hex(4)}", "issuer": b.issuer}).encode()
    logout = signed(hub, a, "POST", "/api/v1/logouts", body)
    assert logout.status_code == 201, logout.text
    assert logout.json().get("issuer", a.issuer) == a.issuer
    for path in (f"/api/v1/sites/{b.site_key}", f"/api/v1/sites/{b.site_key}/secret",
                 f"/api/v1/sites/{b.site_key}/events"):
        assert signed(hub, a, "GET", path).status_code == 404


@pytest.mark.case("B-14")
def test_B14_login_redirects_only_inside_the_console(fleet: Fleet) -> None:
    """After sign-in the console goes only to one of its own pages: an absolute URL, a
    protocol-relative or backslash path, a ``javascript:`` URL or the login page itself in
    ``next`` sends the admin to the dashboard instead. (The agent's API has no redirect: it
    answers JSON, and SSO targets are site keys resolved through the hub's directory.)"""
    hub = fleet.hub
    admin = new_admin(hub)
    for target in ("https://evil.example/", "//evil.example/console/", "/\\evil.example",
                   "/console//evil.example", "javascript:alert(1)", "/console/login?next=//x",
                   "https:evil.example", "/%2F%2Fevil.example"):
        console = Console(hub)
        token = console.token("/console/login")
        response = console.post(f"/console/login?next={requests.utils.quote(target)}",
                                {"username": admin, "password": ADMIN_PASSWORD,
                                 "csrf_token": token, "next": target})
        assert response.status_code == 302, target
        location = urlsplit(response.headers["Location"])
        assert location.netloc in ("", urlsplit(hub.url).netloc), target
        assert location.path == "/", (target, response.headers["Location"])
    console = Console(hub)
    token = console.token("/console/login")
    response = console.post("/console/login", {"username": admin, "password": ADMIN_PASSWORD,
                                               "csrf_token": token, "next": "/console/activity"})
    assert urlsplit(response.headers["Location"]).path == "/console/activity"
