"""The admin console over real HTTP: login, onboarding, site actions, CSRF, cookies, settings.

Each test drives the console like a browser would (a ``requests.Session`` with its cookie jar,
the CSRF token read from the form), against a hub served by the ``hub`` fixture.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import time
import typing as t
from pathlib import Path

import jwt
import pytest
import requests
from click.testing import CliRunner
from click.testing import Result
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import Response
from sqlalchemy import select
from werkzeug.exceptions import InternalServerError

from hub.cli import main as hub_main
from hub.models import Event
from hub.models import Setting
from hub.services import admins
from hub.services import events
from tests.hub.conftest import Hub

PASSWORD = "Tidy-console-Passphrase-2024"  # noqa: S105 (a test admin's)
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
SECRET = re.compile(r"hks_[A-Za-z0-9_-]{20,}")
LOGIN_FAILED = "Invalid username or password."
WRONG = "not-the-password-at-all"  # noqa: S105
FORGED = "IjEyMyI.forged.token"  # noqa: S105 (a made-up CSRF token)
PAGES = ("/", "/console/sites", "/console/sites/new", "/console/activity", "/console/settings")
SITE_FORM = {
    "name": "Shop",
    "base_url": "https://shop.example.com",
    "site_key": "",
    "allowed_origins": "https://shop.example.com\nhttps://www.shop.example.com\n",
    "contact": "web-team@example.com",
}


class Console:
    """A browser-like client of one hub's console."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.http = requests.Session()

    def get(self, path: str, **kw: t.Any) -> requests.Response:
        return self.http.get(self.hub.url + path, allow_redirects=False, timeout=30, **kw)

    def token(self, path: str = "/console/login") -> str:
        match = CSRF.search(self.get(path).text)
        assert match, f"no CSRF token on {path}"
        return match.group(1)

    def post(self, path: str, data: dict[str, t.Any] | None = None, *, token: str | None = None,
             form_page: str = "/", headers: dict[str, str] | None = None) -> requests.Response:
        """POST a form with this session's CSRF token (or ``token``, "" to leave it out)."""
        fields = dict(data or {})
        if token is None:
            token = self.token(form_page)
        if token:
            fields["csrf_token"] = token
        return self.http.post(self.hub.url + path, data=fields, headers=headers or {},
                              allow_redirects=False, timeout=30)

    def login(self, username: str = "alice", password: str = PASSWORD,
              **extra: str) -> requests.Response:
        token = self.token("/console/login")
        return self.post("/console/login", {"username": username, "password": password, **extra},
                         token=token)

    def onboard(self, **fields: str) -> requests.Response:
        return self.post("/console/sites/new", {**SITE_FORM, **fields},
                         form_page="/console/sites/new")


def make_admin(hub: Hub, username: str = "alice", password: str = PASSWORD) -> None:
    with hub.app.app_context(), hub.state.session_factory() as db:
        admins.create(db, hub.state, username, password)
        db.commit()


@pytest.fixture
def console(hub: Hub) -> Console:
    """A console session signed in as alice."""
    make_admin(hub)
    c = Console(hub)
    r = c.login()
    assert r.status_code == 302 and r.headers["Location"] == "/", r.text
    return c


def count(hub: Hub, table: str, where: str = "1=1", **params: t.Any) -> int:
    return int(hub.scalar(f"SELECT count(*) FROM {table} WHERE {where}", **params))  # noqa: S608


def hub_events(hub: Hub, event: str | None = None) -> list[dict[str, t.Any]]:
    """The hub's events (of one kind), oldest first."""
    stmt = select(Event).order_by(Event.id)
    if event:
        stmt = stmt.where(Event.event == event)
    with hub.state.session_factory() as db:
        return [{"site_key": e.site_key, "actor": e.actor, "ip": e.ip, "outcome": e.outcome,
                 "details": e.details} for e in db.scalars(stmt)]


def secret_of(response: requests.Response) -> str:
    found = SECRET.findall(response.text)
    assert len(set(found)) == 1, f"expected one secret on the page, got {found}"
    return found[0]


def location(response: requests.Response) -> str:
    assert response.status_code in (302, 303), (response.status_code, response.text[:300])
    return response.headers["Location"]


# --- login -----------------------------------------------------------------------------------


def test_login_answers_alike_for_wrong_password_unknown_user_and_lock(hub: Hub) -> None:
    make_admin(hub)
    c = Console(hub)
    wrong = c.login(password=WRONG)
    unknown = c.login(username="mallory")
    assert wrong.status_code == unknown.status_code == 200
    assert LOGIN_FAILED in wrong.text and LOGIN_FAILED in unknown.text
    assert 'value="mallory"' in unknown.text  # the name typed stays, the password does not
    for _ in range(hub.state.setting("ADMIN_MAX_FAILURES") - 1):
        c.login(password=WRONG)
    locked = c.login()  # the right password, on a locked account
    assert locked.status_code == 200 and LOGIN_FAILED in locked.text
    assert "lock" not in locked.text.lower()
    assert location(c.get("/")).startswith("/console/login")
    assert hub_events(hub, "admin.locked")[0]["actor"] == "alice"
    failures = hub_events(hub, "admin.login_failed")
    assert {e["actor"] for e in failures} == {"alice", "mallory"}
    assert all(e["ip"] == "127.0.0.1" for e in failures)

    hub.clock.advance(hub.state.setting("ADMIN_LOCK_SECONDS") + 1)
    ok = c.login()
    assert location(ok) == "/"
    home = c.get("/")
    assert home.status_code == 200 and "Dashboard" in home.text and "alice" in home.text
    assert hub_events(hub, "admin.login")[0]["ip"] == "127.0.0.1"


def test_a_lock_stamped_ahead_by_a_clock_set_back_since_ends_in_time(hub: Hub) -> None:
    """An admin locked while the hub's clock ran a month ahead is not locked out for that
    month once the clock is put right (no command could unlock them)."""
    make_admin(hub)
    c = Console(hub)
    hub.clock.advance(30 * 86400)
    for _ in range(hub.state.setting("ADMIN_MAX_FAILURES")):
        c.login(password=WRONG)
    assert LOGIN_FAILED in c.login().text  # locked
    hub.clock.advance(-30 * 86400)
    assert location(c.login()) == "/"


def wrong_passwords_at_once(hub: Hub, usernames: list[str]) -> list[requests.Response]:
    """A wrong password for each of ``usernames``, all sent at once from one address, each from
    a console session of its own (the server answers each in a thread of its own)."""
    consoles = [Console(hub) for _ in usernames]
    tokens = [c.token("/console/login") for c in consoles]
    with concurrent.futures.ThreadPoolExecutor(len(usernames)) as pool:
        return list(pool.map(
            lambda c, token, name: c.post("/console/login",
                                          {"username": name, "password": WRONG}, token=token),
            consoles, tokens, usernames))


def test_concurrent_wrong_passwords_are_each_counted(make_hub: t.Callable[..., Hub]) -> None:
    """Wrong passwords sent at once (the server answers each in a thread of its own, hashing in
    parallel) are all counted: none is lost to another's write of the same counter, so
    parallel guesses cannot outrun the lock."""
    hub = make_hub(HEADLESSKEY_HUB_ADMIN_MAX_FAILURES=100)
    make_admin(hub)
    guesses = 12
    answers = wrong_passwords_at_once(hub, ["alice"] * guesses)
    assert all(r.status_code == 200 and LOGIN_FAILED in r.text for r in answers)
    assert hub.scalar("SELECT failures FROM hub_admins WHERE username = 'alice'") == guesses
    assert len(hub_events(hub, "admin.login_failed")) == guesses


def test_an_address_with_many_failed_logins_is_refused_for_a_while(
        make_hub: t.Callable[..., Hub]) -> None:
    """Failures from one address count whatever the names tried (unknown ones too); past the
    limit its logins are refused with 429, the right password included, and checked no more,
    until the window has passed since the last failure."""
    hub = make_hub(HEADLESSKEY_HUB_ADMIN_IP_MAX_FAILURES=3)
    make_admin(hub)
    c = Console(hub)
    for name in ("mallory", "root", "alice"):
        r = c.login(username=name, password=WRONG)
        assert r.status_code == 200 and LOGIN_FAILED in r.text
    blocked = c.login()  # alice, with her right password
    assert blocked.status_code == 429 and "Too many failed sign-ins" in blocked.text
    assert blocked.headers["Retry-After"] == str(hub.state.setting("ADMIN_LOCK_SECONDS"))
    assert location(c.get("/")).startswith("/console/login")
    assert len(hub_events(hub, "admin.login_failed")) == 3  # refusals are not failures
    assert [e["actor"] for e in hub_events(hub, "admin.login_blocked")] == ["alice"]
    assert hub.scalar("SELECT failures FROM hub_admins WHERE username = 'alice'") == 1

    hub.clock.advance(hub.state.setting("ADMIN_LOCK_SECONDS") - 5)
    assert c.login().status_code == 429  # still within the window of the failures
    hub.clock.advance(10)
    assert location(c.login()) == "/"


def test_failed_logins_sent_at_once_from_one_address_stop_at_its_limit(
        make_hub: t.Callable[..., Hub]) -> None:
    """Guesses sent at once from one address (each answered in a thread of its own) cannot
    outrun the address limit: as many are checked as the limit allows, the rest are 429."""
    hub = make_hub(HEADLESSKEY_HUB_ADMIN_IP_MAX_FAILURES=3)
    make_admin(hub)
    guesses = 12
    answers = wrong_passwords_at_once(hub, [f"name{i}" for i in range(guesses)])
    assert sorted(r.status_code for r in answers) == [200] * 3 + [429] * (guesses - 3)
    assert len(hub_events(hub, "admin.login_failed")) == 3


def test_the_address_limit_is_per_client_address(make_hub: t.Callable[..., Hub]) -> None:
    """Behind a trusted proxy each client is limited on its own address."""
    hub = make_hub(HEADLESSKEY_HUB_ADMIN_IP_MAX_FAILURES=2, HEADLESSKEY_HUB_TRUSTED_PROXIES=1)
    make_admin(hub)
    attacker, admin = Console(hub), Console(hub)
    attacker.http.headers["X-Forwarded-For"] = "203.0.113.7"
    admin.http.headers["X-Forwarded-For"] = "198.51.100.20"
    for name in ("mallory", "root"):
        assert attacker.login(username=name, password=WRONG).status_code == 200
    assert attacker.login(username="trent", password=WRONG).status_code == 429
    assert location(admin.login()) == "/"
    assert {e["ip"] for e in hub_events(hub, "admin.login_failed")} == {"203.0.113.7"}


def test_every_page_needs_login(hub: Hub) -> None:
    c = Console(hub)
    for path in PAGES + ("/console/sites/shop",):
        r = c.get(path)
        assert r.status_code == 302, path
        assert r.headers["Location"].startswith("/console/login?next="), path
    hub.add_site("Docs", "https://docs.example.com")
    token = c.token("/console/login")
    for path in ("/console/sites/new", "/console/sites/docs/suspend",
                 "/console/sites/docs/rotate-secret", "/console/settings"):
        r = c.post(path, {**SITE_FORM, "confirm": "docs", "KEY_ROTATION_DAYS": "5"}, token=token)
        assert location(r).startswith("/console/login"), path
    assert count(hub, "hub_sites") == 1
    assert count(hub, "hub_sites", "status = 'active'") == 1
    assert count(hub, "hub_site_secrets") == 1
    assert count(hub, "hub_settings") == 0


def test_login_starts_a_new_session_and_next_stays_on_the_hub(hub: Hub) -> None:
    make_admin(hub)
    c = Console(hub)
    before = c.token("/console/login")
    assert location(c.login(next="https://evil.example/")) == "/"
    # session.clear() at login: the token of the session before it is worthless now.
    r = c.post("/console/sites/new", SITE_FORM, token=before)
    assert r.status_code == 403
    assert count(hub, "hub_sites") == 0
    c.post("/console/logout")
    assert location(c.login(next="/console/sites")) == "/console/sites"
    c.post("/console/logout")
    assert location(c.login(next="//evil.example/console/")) == "/"


def test_a_copied_session_cookie_dies_at_sign_out(console: Console) -> None:
    thief = requests.Session()
    thief.cookies.update(console.http.cookies)  # a copy of the signed-in cookie
    assert thief.get(console.hub.url + "/", allow_redirects=False, timeout=30).status_code == 200
    assert location(console.post("/console/logout")) == "/console/login"
    stale = thief.get(console.hub.url + "/", allow_redirects=False, timeout=30)
    assert location(stale).startswith("/console/login")
    # Signing in again works, and only the new session counts.
    assert location(console.login()) == "/"
    assert location(thief.get(console.hub.url + "/", allow_redirects=False,
                              timeout=30)).startswith("/console/login")


def test_logout_ends_the_session(console: Console) -> None:
    r = console.post("/console/logout")
    assert location(r) == "/console/login"
    assert "You are signed out." in console.get("/console/login").text
    assert location(console.get("/")).startswith("/console/login")
    assert hub_events(console.hub, "admin.logout")[0]["actor"] == "alice"
    assert console.get("/console/logout").status_code == 405


def test_idle_session_ends(console: Console) -> None:
    hub = console.hub
    timeout = hub.state.setting("SESSION_IDLE_TIMEOUT")
    token = console.token("/console/sites/new")
    hub.clock.advance(timeout - 5)
    assert console.get("/").status_code == 200  # activity renews the idle timer
    hub.clock.advance(timeout - 5)
    assert console.get("/console/sites").status_code == 200
    hub.clock.advance(timeout + 1)
    r = console.get("/console/sites")
    assert location(r).startswith("/console/login")
    assert "without activity" in console.get("/console/login").text
    assert location(console.get("/")).startswith("/console/login")
    # A form left open does not work after the timeout either.
    r = console.post("/console/sites/new", SITE_FORM, token=token)
    assert r.status_code in (302, 403)
    assert count(hub, "hub_sites") == 0


# --- admins managed with the CLI ------------------------------------------------------------

NEW_PASSWORD = "Another-console-Passphrase-2025"  # noqa: S105 (a test admin's)


def hub_cli(hub: Hub, monkeypatch: pytest.MonkeyPatch, *args: str,
            input: str | None = None) -> Result:  # noqa: A002 - click's name
    """``headlesskey-hub ARGS`` on this hub's instance and database, as its operator runs it."""
    for name in ("HEADLESSKEY_HUB_DATABASE_URL", "HEADLESSKEY_HUB_MASTER_KEY"):
        monkeypatch.setenv(name, hub.app.config[name])
    return CliRunner().invoke(hub_main, [*args[:2], "--instance", hub.app.instance_path,
                                         *args[2:]], input=input, catch_exceptions=False)


def test_a_password_set_with_the_cli_ends_the_sessions_and_signs_in(
        console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = console.hub
    other = Console(hub)
    assert location(other.login()) == "/"
    result = hub_cli(hub, monkeypatch, "admins", "set-password", "alice", "--password-stdin",
                     input=NEW_PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    for c in (console, other):  # every session of alice's has ended
        assert location(c.get("/")).startswith("/console/login")
    assert LOGIN_FAILED in console.login().text  # the old password is refused
    assert location(console.login(password=NEW_PASSWORD)) == "/"
    assert console.get("/").status_code == 200
    assert location(other.get("/")).startswith("/console/login")
    assert [(e["actor"], e["details"]) for e in hub_events(hub, "admin.password_set")] == [
        ("cli", {"username": "alice"})]


def test_a_password_set_with_the_cli_lets_a_locked_admin_in(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    make_admin(hub)
    c = Console(hub)
    for _ in range(hub.state.setting("ADMIN_MAX_FAILURES")):
        c.login(password=WRONG)
    assert LOGIN_FAILED in c.login(password=PASSWORD).text  # locked
    result = hub_cli(hub, monkeypatch, "admins", "set-password", "alice", "--password-stdin",
                     input=NEW_PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert location(c.login(password=NEW_PASSWORD)) == "/"


def test_the_cli_unlocks_a_locked_admin(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    make_admin(hub)
    c = Console(hub)
    for _ in range(hub.state.setting("ADMIN_MAX_FAILURES")):
        c.login(password=WRONG)
    assert LOGIN_FAILED in c.login().text  # locked
    listed = json.loads(hub_cli(hub, monkeypatch, "admins", "list", "--json").stdout)
    assert listed[0]["locked_until"] is not None
    result = hub_cli(hub, monkeypatch, "admins", "unlock", "alice")
    assert result.exit_code == 0 and "Unlocked admin alice." in result.stdout, result.output
    assert location(c.login()) == "/"
    assert [(e["actor"], e["details"]) for e in hub_events(hub, "admin.unlocked")] == [
        ("cli", {"username": "alice", "was_locked": True})]
    unknown = hub_cli(hub, monkeypatch, "admins", "unlock", "mallory")
    assert unknown.exit_code == 1 and "No admin 'mallory'" in unknown.stderr


def test_an_admin_disabled_with_the_cli_is_signed_out_and_refused(
        console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = console.hub
    assert hub_cli(hub, monkeypatch, "admins", "disable", "alice").exit_code == 0
    assert location(console.get("/")).startswith("/console/login")
    assert LOGIN_FAILED in console.login().text
    assert hub_cli(hub, monkeypatch, "admins", "enable", "alice").exit_code == 0
    assert location(console.login()) == "/"
    for event in ("admin.disabled", "admin.enabled"):
        assert [(e["actor"], e["details"]) for e in hub_events(hub, event)] == [
            ("cli", {"username": "alice"})]


# --- onboarding ------------------------------------------------------------------------------


def test_onboarding_shows_the_secret_once(console: Console) -> None:
    hub = console.hub
    r = console.onboard()
    assert r.status_code == 200, r.text
    secret = secret_of(r)
    assert "no-store" in r.headers["Cache-Control"]
    assert 'id="site-key">shop<' in r.text
    assert f"--hub {hub.url} --site-key shop --secret-stdin" in r.text
    assert f'url = "{hub.url}"' in r.text and 'site_key = "shop"' in r.text
    # The secret works against the signed API.
    assert hub.signed("GET", "/api/v1/directory", "shop", secret).status_code == 200

    for path in ("/console/sites/shop", "/console/sites", "/", "/console/activity"):
        page = console.get(path)
        assert page.status_code == 200, path
        assert secret not in page.text and not SECRET.search(page.text), path
    site_page = console.get("/console/sites/shop").text
    assert "shown once at creation" in site_page
    assert "https://www.shop.example.com" in site_page and "web-team@example.com" in site_page
    added = hub_events(hub, "site.added")
    assert added == [{"site_key": "shop", "actor": "alice", "ip": "127.0.0.1",
                      "outcome": "success", "details": added[0]["details"]}]
    assert secret not in json.dumps(added)


def test_onboarding_errors_show_next_to_the_field_and_save_nothing(console: Console) -> None:
    hub = console.hub
    hub.add_site("Shop", "https://shop.example.com")
    duplicate = console.onboard(site_key="shop-2")
    assert duplicate.status_code == 409
    assert "A site with that name exists." in duplicate.text
    assert re.search(r'id="name-error">Already taken\.<', duplicate.text)
    assert not SECRET.search(duplicate.text)

    bad_url = console.onboard(name="Docs", base_url="ftp://docs.example.com")
    assert bad_url.status_code == 400
    assert re.search(r'id="base_url-error">An https:// URL', bad_url.text)
    assert 'value="Docs"' in bad_url.text  # what was typed is kept

    bad_origin = console.onboard(name="Docs", base_url="https://docs.example.com",
                                 allowed_origins="https://docs.example.com/path")
    assert bad_origin.status_code == 400 and 'id="allowed_origins-error"' in bad_origin.text

    taken_key = console.onboard(name="Docs", base_url="https://docs.example.com", site_key="shop")
    assert taken_key.status_code == 409 and 'id="site_key-error"' in taken_key.text

    assert count(hub, "hub_sites") == 1
    assert count(hub, "hub_site_secrets") == 1
    assert count(hub, "hub_events", "event = 'site.added'") == 1


@pytest.mark.parametrize("field", ["base_url", "allowed_origins", "redirect_uris"])
@pytest.mark.parametrize("url", ["https://[::1", "https://docs.example.com:99999",
                                 "https://evil.example\uff03@docs.example.com"])
def test_onboarding_refuses_a_url_python_cannot_split(console: Console, field: str,
                                                      url: str) -> None:
    """Hosts with an unclosed ``[``, ports out of range, and hosts that Unicode normalisation
    turns into another URL are form errors, not server errors."""
    form = {"name": "Docs", "base_url": "https://docs.example.com", field: url}
    r = console.onboard(**form)
    assert r.status_code == 400, r.text[:300]
    assert f'id="{field}-error">Not a valid URL.<' in r.text
    assert count(console.hub, "hub_sites") == 0


@pytest.mark.parametrize("field", ["base_url", "allowed_origins", "redirect_uris"])
@pytest.mark.parametrize("url", ["https://docs.exa\tmple.com", "https://docs.exa mple.com",
                                 "https://docs.example.com/a\u00a0b",
                                 "https://docs.example.com/\x1b", "https://docs.example.com/\x7f"])
def test_onboarding_refuses_a_url_with_whitespace_or_a_control_character(
        console: Console, field: str, url: str) -> None:
    """A tab or line break inside a URL is dropped by the URL parser, so it was checked without
    it but stored with it (an issuer every peer refuses); any whitespace or control character
    inside a URL is a form error."""
    r = console.onboard(**{"name": "Docs", "base_url": "https://docs.example.com", field: url})
    assert r.status_code == 400, r.text[:300]
    assert f'id="{field}-error">Not a valid URL.<' in r.text
    assert count(console.hub, "hub_sites") == 0


@pytest.mark.parametrize("field", ["name", "contact"])
def test_onboarding_refuses_a_control_character_in_the_name_or_contact(
        console: Console, field: str) -> None:
    r = console.onboard(**{"name": "Docs", "base_url": "https://docs.example.com",
                           field: "Do\x1b[31mcs"})
    assert r.status_code == 400, r.text[:300]
    assert re.search(rf'id="{field}-error">[^<]*no control characters\.<', r.text)
    assert count(console.hub, "hub_sites") == 0


def test_two_sites_cannot_share_an_issuer(console: Console) -> None:
    """Peers key identity links by issuer (a site's base URL unless the import file names
    another): a second site under a taken issuer, or one longer than those keys, is refused."""
    hub = console.hub
    hub.add_site("Shop", "https://shop.example.com", issuer="https://docs.example.com")
    same = console.onboard(name="Docs", base_url="https://docs.example.com")
    assert same.status_code == 409, same.text[:300]
    assert re.search(r'id="base_url-error">Already taken\.<', same.text)
    long = "https://docs.example.com/" + "x" * 240
    too_long = console.onboard(name="Docs", base_url=long)
    assert too_long.status_code == 400
    assert 'id="base_url-error">At most 255 characters' in too_long.text
    assert count(hub, "hub_sites") == 1


def test_two_onboardings_at_once_cannot_share_an_issuer(console: Console) -> None:
    """An onboarding under way (the CLI's, say) and the console's of another site with the same
    base URL take turns, so the second sees the first and is refused. (On PostgreSQL both were
    stored: the issuer has no unique index, and each checked before the other wrote.)"""
    hub = console.hub
    from hub.services import sites

    with hub.app.app_context(), hub.state.session_factory() as db:
        sites.add_site(db, hub.state, "cli", name="Shop",
                       base_url="https://docs.example.com")  # not committed yet
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(console.onboard, name="Docs",
                                 base_url="https://docs.example.com")
            time.sleep(0.5)
            db.commit()
            r = second.result(timeout=30)
    assert r.status_code == 409, r.text[:300]
    assert re.search(r'id="base_url-error">Already taken\.<', r.text)
    assert not SECRET.search(r.text)
    assert count(hub, "hub_sites") == 1


# --- CSRF and cross-site posts ---------------------------------------------------------------


def test_post_without_or_with_a_wrong_csrf_token_is_refused(console: Console, hub: Hub) -> None:
    events_before = count(hub, "hub_events")
    missing = console.post("/console/sites/new", SITE_FORM, token="")
    forged = console.post("/console/sites/new", SITE_FORM, token=FORGED)
    other = Console(hub)
    other_token = other.token("/console/login")
    make_admin(hub, "bob")
    other.login("bob")
    theirs = console.post("/console/sites/new", SITE_FORM, token=other.token("/"))
    stale = console.post("/console/sites/new", SITE_FORM, token=other_token)
    for r in (missing, forged, theirs, stale):
        assert r.status_code == 403, r.text
        assert "text/html" in r.headers["Content-Type"]
        assert "security token" in r.text
    assert count(hub, "hub_sites") == 0
    # Only bob's own login was written meanwhile.
    assert count(hub, "hub_events") == events_before + 2  # admin.created, admin.login


def test_cross_site_posts_are_refused(console: Console) -> None:
    hub = console.hub
    hub.add_site("Docs", "https://docs.example.com")
    refused = [
        {"Origin": "https://evil.example"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
        {"Origin": hub.url + ".evil.example"},
        {"Origin": hub.url.replace("http://", "https://")},
    ]
    for headers in refused:
        r = console.post("/console/sites/docs/suspend", form_page="/console/sites/docs",
                         headers=headers)
        assert r.status_code == 403, headers
        assert "another site" in r.text or "unknown origin" in r.text
    assert count(hub, "hub_sites", "status = 'active'") == 1
    assert count(hub, "hub_events", "event = 'site.suspended'") == 0

    own = console.post("/console/sites/docs/suspend", form_page="/console/sites/docs",
                       headers={"Origin": hub.url, "Sec-Fetch-Site": "same-origin"})
    assert location(own) == "/console/sites/docs"
    # Chromium sends "Origin: null" for our own forms under Referrer-Policy: no-referrer.
    null_same = console.post("/console/sites/docs/resume", form_page="/console/sites/docs",
                             headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert location(null_same) == "/console/sites/docs"
    assert count(hub, "hub_events", "event IN ('site.suspended', 'site.resumed')") == 2


def test_get_never_changes_state(console: Console) -> None:
    hub = console.hub
    hub.add_site("Docs", "https://docs.example.com")
    for action in ("suspend", "resume", "rotate-secret", "remove"):
        r = console.get(f"/console/sites/docs/{action}")
        assert r.status_code == 405
        assert "GET" not in r.headers["Allow"] and "POST" in r.headers["Allow"]
        assert "text/html" in r.headers["Content-Type"]
    console.get("/console/settings?KEY_ROTATION_DAYS=1")
    console.get("/console/logout")
    assert count(hub, "hub_sites", "status = 'active'") == 1
    assert count(hub, "hub_site_secrets") == 1
    assert count(hub, "hub_settings") == 0
    assert console.get("/").status_code == 200


# --- site actions ----------------------------------------------------------------------------


def test_suspend_resume_rotate_and_remove(console: Console) -> None:
    hub = console.hub
    secret = secret_of(console.onboard())
    page = "/console/sites/shop"

    r = console.post("/console/sites/shop/suspend", form_page=page)
    assert location(r) == page
    shown = console.get(page).text
    assert 'id="site-status">suspended<' in shown and "Resume site" in shown
    refused = hub.signed("GET", "/api/v1/directory", "shop", secret)
    assert refused.status_code == 401 and refused.json()["code"] == "bad_signature"

    assert location(console.post("/console/sites/shop/resume", form_page=page)) == page
    assert 'id="site-status">active<' in console.get(page).text
    assert hub.signed("GET", "/api/v1/directory", "shop", secret).status_code == 200

    rotated = console.post("/console/sites/shop/rotate-secret", form_page=page)
    assert rotated.status_code == 200
    new_secret = secret_of(rotated)
    assert new_secret != secret
    grace = hub.state.setting("SECRET_GRACE")
    assert f"stays valid for {grace} seconds" in rotated.text
    assert "no-store" in rotated.headers["Cache-Control"]
    for s in (secret, new_secret):  # both work during the grace period
        assert hub.signed("GET", "/api/v1/directory", "shop", s).status_code == 200
    after = console.get(page).text
    assert new_secret not in after and not SECRET.search(after)
    assert "valid until" in after and "v2" in after

    wrong = console.post("/console/sites/shop/remove", {"confirm": "Shop"}, form_page=page)
    assert wrong.status_code == 400
    assert "Type the site key (shop) to confirm." in wrong.text
    assert count(hub, "hub_sites") == 1

    gone = console.post("/console/sites/shop/remove", {"confirm": "shop"}, form_page=page)
    assert location(gone) == "/console/sites"
    assert "was removed" in console.get("/console/sites").text
    assert count(hub, "hub_sites") == 0
    assert count(hub, "hub_site_secrets") == 0
    assert console.get(page).status_code == 404

    for name in ("site.suspended", "site.resumed", "secret.rotated", "site.removed"):
        logged = hub_events(hub, name)
        assert len(logged) == 1, name
        assert logged[0]["actor"] == "alice" and logged[0]["ip"] == "127.0.0.1", name
        assert logged[0]["site_key"] == "shop"
    all_details = json.dumps([e["details"] for e in hub_events(hub)])
    assert secret not in all_details and new_secret not in all_details
    assert "hks_" not in all_details


@pytest.mark.parametrize("action", ["remove", "suspend", "rotate-secret"])
def test_a_change_of_a_site_removed_meanwhile_is_not_found(console: Console,
                                                           action: str) -> None:
    """Another admin removes the site while this one's form is on its way: the form waits for
    the removal and answers 404. (On PostgreSQL it was a 500: it changed a row that was gone.)"""
    hub = console.hub
    from hub.services import sites

    shop, _secret = hub.add_site("Shop", "https://shop.example.com")
    page = f"/console/sites/{shop}"
    token = console.token(page)
    with hub.app.app_context(), hub.state.session_factory() as db:
        sites.remove(db, hub.state, sites.get(db, shop), "bob")
        db.flush()  # not committed yet
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(console.post, f"{page}/{action}", {"confirm": shop},
                                 token=token)
            time.sleep(0.5)
            db.commit()
            r = second.result(timeout=30)
    assert r.status_code == 404, r.text[:300]
    assert "No site" in r.text
    assert count(hub, "hub_sites") == 0
    assert count(hub, "hub_site_secrets") == 0
    assert [e["actor"] for e in hub_events(hub, "site.removed")] == ["bob"]


def test_two_admins_suspending_a_site_at_once_suspend_it_once(console: Console) -> None:
    hub = console.hub
    from hub.services import sites

    shop, _secret = hub.add_site("Shop", "https://shop.example.com")
    page = f"/console/sites/{shop}"
    token = console.token(page)
    with hub.app.app_context(), hub.state.session_factory() as db:
        sites.set_status(db, hub.state, sites.get(db, shop), "suspended", "bob")
        db.flush()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(console.post, f"{page}/suspend", token=token)
            time.sleep(0.5)
            db.commit()
            r = second.result(timeout=30)
    assert r.status_code == 302, r.text[:300]
    assert [e["actor"] for e in hub_events(hub, "site.suspended")] == ["bob"]


def test_secrets_and_removal_need_a_recent_password(console: Console) -> None:
    """REAUTH_SECONDS after sign-in, rotating a secret, onboarding a site and removing one send
    the admin to confirm the password first and change nothing until then (B-12)."""
    hub = console.hub
    secret_of(console.onboard())
    page = "/console/sites/shop"
    hub.clock.advance(hub.state.setting("REAUTH_SECONDS") + 1)
    for path, data in (("/console/sites/shop/rotate-secret", {}),
                       ("/console/sites/shop/remove", {"confirm": "shop"}),
                       ("/console/sites/new", {**SITE_FORM, "site_key": "docs2"})):
        r = console.post(path, data, form_page=page)
        assert r.status_code == 302, path
        assert location(r).startswith("/console/reauth?next="), location(r)
    assert count(hub, "hub_site_secrets") == 1 and count(hub, "hub_sites") == 1
    wrong = console.post("/console/reauth", {"password": "not it", "next": page},
                         form_page="/console/reauth")
    assert wrong.status_code == 200 and "Invalid username or password." in wrong.text
    assert console.post("/console/sites/shop/rotate-secret", form_page=page).status_code == 302
    right = console.post("/console/reauth", {"password": PASSWORD, "next": page},
                         form_page="/console/reauth")
    assert location(right) == page
    rotated = console.post("/console/sites/shop/rotate-secret", form_page=page)
    assert rotated.status_code == 200 and secret_of(rotated)
    assert count(hub, "hub_site_secrets") == 2


def test_a_sign_in_stamped_ahead_by_a_clock_set_back_since_is_no_recent_password(
        hub: Hub) -> None:
    """A sign-in while the hub's clock ran a month ahead does not count as a recent password
    for that month once the clock is put right."""
    make_admin(hub)
    hub.clock.advance(30 * 86400)
    console = Console(hub)
    assert location(console.login()) == "/"
    secret_of(console.onboard())
    hub.clock.advance(-30 * 86400)
    r = console.post("/console/sites/shop/rotate-secret", form_page="/console/sites/shop")
    assert location(r).startswith("/console/reauth?next="), location(r)
    assert count(hub, "hub_site_secrets") == 1


def test_site_page_lists_keys(console: Console) -> None:
    hub = console.hub
    site_key, secret = hub.add_site("Docs", "https://docs.example.com")
    jwk = _es256_jwk("docs-key-2024")
    r = hub.signed("POST", "/api/v1/keys", site_key, secret, json={"jwk": jwk, "status": "active"})
    assert r.status_code == 201, r.text
    page = console.get("/console/sites/docs").text
    assert "docs-key-2024" in page and "ES256" in page
    assert 'badge-active">active<' in page
    assert console.get("/console/sites/" + "x" * 80).status_code == 404
    not_found = console.get("/console/sites/nope")
    assert not_found.status_code == 404 and "No site" in not_found.text
    assert "text/html" in not_found.headers["Content-Type"]


# --- activity --------------------------------------------------------------------------------


def test_activity_filters_and_pages(console: Console) -> None:
    hub = console.hub
    hub.add_site("Docs", "https://docs.example.com")
    with hub.app.app_context(), hub.state.session_factory() as db:
        for i in range(60):
            events.log(db, hub.state, "test.ping", site_key="docs", actor=f"n{i}",
                       outcome="failure" if i % 2 else "success")
        events.log(db, hub.state, "test.pong", site_key="other")
        db.commit()

    first = console.get("/console/activity?event=test.ping")
    assert first.status_code == 200
    assert first.text.count("<code>test.ping</code>") == 50
    assert "test.pong" not in first.text.split("<tbody>")[1]
    assert ">n59<" in first.text and ">n9<" not in first.text
    older = re.search(r'href="([^"]+)" id="older"', first.text)
    assert older, "no link to older events"
    second = console.get(older.group(1).replace("&amp;", "&"))
    assert second.text.count("<code>test.ping</code>") == 10
    assert ">n9<" in second.text and 'id="older"' not in second.text
    assert 'id="newest"' in second.text

    failures = console.get("/console/activity?event=test.ping&outcome=failure")
    assert failures.text.count("<code>test.ping</code>") == 30
    other = console.get("/console/activity?site=other")
    body = other.text.split("<tbody>")[1]
    assert "test.pong" in body and "test.ping" not in body
    assert console.get("/console/activity?before=oops").status_code == 200


@pytest.mark.parametrize("before", ["2147483648", "999999999999999999"])
def test_activity_before_an_id_past_any_is_the_newest_page(console: Console, before: str) -> None:
    """An id past any an id column holds (an edited link) pages from the newest event."""
    hub = console.hub
    with hub.app.app_context(), hub.state.session_factory() as db:
        events.log(db, hub.state, "test.ping", actor="n1")
        db.commit()
    r = console.get(f"/console/activity?before={before}")
    assert r.status_code == 200
    assert "<code>test.ping</code>" in r.text.split("<tbody>")[1]


# --- settings --------------------------------------------------------------------------------


def test_settings_are_validated_and_saved_with_who_and_when(console: Console) -> None:
    hub = console.hub
    good = {"KEY_ROTATION_DAYS": "30", "HUB_KEY_ROTATION_DAYS": "60",
            "EVENT_RETENTION_DAYS": "365", "SECRET_GRACE": "3600"}
    for field, bad in (("KEY_ROTATION_DAYS", "0"), ("HUB_KEY_ROTATION_DAYS", "abc"),
                       ("EVENT_RETENTION_DAYS", "100000"), ("SECRET_GRACE", "-5"),
                       ("SECRET_GRACE", "1.5"), ("KEY_ROTATION_DAYS", "")):
        r = console.post("/console/settings", {**good, field: bad}, form_page="/console/settings")
        assert r.status_code == 400, (field, bad)
        assert "Nothing was saved." in r.text
        assert f'id="{field}-error"' in r.text, (field, bad)
    assert count(hub, "hub_settings") == 0

    r = console.post("/console/settings", good, form_page="/console/settings")
    assert location(r) == "/console/settings"
    page = console.get("/console/settings").text
    assert "Settings saved." in page and "Changed by alice" in page
    assert 'value="3600"' in page
    assert count(hub, "hub_settings", "updated_by = 'alice'") == 4
    with hub.state.session_factory() as db:
        stored = db.get(Setting, "SECRET_GRACE")
        assert stored is not None and stored.value == 3600 and stored.updated_by == "alice"
    logged = hub_events(hub, "settings.updated")
    assert len(logged) == 1 and logged[0]["actor"] == "alice"
    changed = logged[0]["details"]["changed"]
    assert changed["SECRET_GRACE"] == {"from": hub.state.setting("SECRET_GRACE"), "to": 3600}

    # The stored grace period is the one a rotation from the console uses.
    hub.add_site("Docs", "https://docs.example.com")
    rotated = console.post("/console/sites/docs/rotate-secret", form_page="/console/sites/docs")
    assert "stays valid for 3600 seconds (1 hour)" in rotated.text


def test_two_admins_saving_a_first_value_at_once_both_save(console: Console) -> None:
    """Another admin stores the first value of a setting while this one's form is on its way:
    this form is saved over it, as over any stored value, and logged as a change from it. (On
    PostgreSQL the second insert of the setting's row was a 500.)"""
    hub = console.hub
    form = {"KEY_ROTATION_DAYS": "45", "HUB_KEY_ROTATION_DAYS": "90",
            "EVENT_RETENTION_DAYS": "180", "SECRET_GRACE": "86400"}
    token = console.token("/console/settings")
    with hub.state.session_factory() as db:
        db.add(Setting(key="KEY_ROTATION_DAYS", value=30, updated_at=hub.clock(),
                       updated_by="bob"))
        db.flush()  # not committed yet
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(console.post, "/console/settings", form, token=token)
            time.sleep(0.5)
            db.commit()
            r = second.result(timeout=30)
    assert location(r) == "/console/settings", r.text[:300]
    with hub.state.session_factory() as db:
        stored = db.get(Setting, "KEY_ROTATION_DAYS")
        assert stored is not None and stored.value == 45 and stored.updated_by == "alice"
    changes = [e["details"]["changed"] for e in hub_events(hub, "settings.updated")]
    assert changes == [{"KEY_ROTATION_DAYS": {"from": 30, "to": 45}}]


def test_dashboard_counts_sites_and_keys_due(hub: Hub) -> None:
    make_admin(hub)
    shop, shop_secret = hub.add_site("Shop", "https://shop.example.com")
    hub.add_site("Docs", "https://docs.example.com")
    r = hub.signed("POST", "/api/v1/keys", shop, shop_secret,
                   json={"jwk": _es256_jwk("shop-key-old"), "status": "active"})
    assert r.status_code == 201
    hub.clock.advance(91 * 86400)
    c = Console(hub)
    c.login()
    c.post("/console/sites/docs/suspend", form_page="/console/sites/docs")
    home = c.get("/").text
    assert 'id="count-active">1<' in home and 'id="count-suspended">1<' in home
    assert 'id="count-due">1<' in home and "shop-key-old" in home
    assert "site.suspended" in home  # recent activity
    c.post("/console/settings", {"KEY_ROTATION_DAYS": "120", "HUB_KEY_ROTATION_DAYS": "90",
                                 "EVENT_RETENTION_DAYS": "180", "SECRET_GRACE": "86400"},
           form_page="/console/settings")
    assert 'id="count-due">0<' in c.get("/").text


# --- cookies, headers, error pages -----------------------------------------------------------


def _set_cookie(response: requests.Response) -> str:
    header = response.headers.get("Set-Cookie")
    assert header, "no Set-Cookie"
    return header


def test_session_cookie_flags_with_secure_cookies(make_hub: t.Callable[..., Hub]) -> None:
    hub = make_hub(HEADLESSKEY_HUB_SECURE_COOKIES=True)
    r = requests.get(hub.url + "/console/login", timeout=30)
    cookie = _set_cookie(r)
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert cookie.startswith("__Host-hk_console=")
    assert "secure" in attrs and "httponly" in attrs
    assert "samesite=strict" in attrs and "path=/" in attrs
    assert not any(a.startswith("domain") for a in attrs)
    assert not any(a.startswith(("expires", "max-age")) for a in attrs)  # ends with the browser


def test_session_cookie_flags_for_plain_http_dev(hub: Hub) -> None:
    cookie = _set_cookie(requests.get(hub.url + "/console/login", timeout=30))
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert cookie.startswith("hk_console=")
    assert "httponly" in attrs and "samesite=strict" in attrs and "secure" not in attrs
    assert not any(a.startswith("domain") for a in attrs)


def test_session_key_is_derived_from_the_master_key(make_hub: t.Callable[..., Hub]) -> None:
    one, two = make_hub(), make_hub()
    master = one.app.config["HEADLESSKEY_HUB_MASTER_KEY"]
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"hub-console-session").derive(base64.urlsafe_b64decode(master))
    assert one.app.secret_key == expected
    assert two.app.secret_key not in (None, expected)
    # A session of one hub means nothing to another.
    make_admin(one)
    c = Console(one)
    c.login()
    stolen = c.http.cookies.get("hk_console")
    r = requests.get(two.url + "/", cookies={"hk_console": stolen}, allow_redirects=False,
                     timeout=30)
    assert location(r).startswith("/console/login")


def test_security_headers_and_no_inline_code(console: Console) -> None:
    hub = console.hub
    hub.add_site("Docs", "https://docs.example.com")
    anonymous = Console(hub)
    responses = [(p, console.get(p)) for p in (*PAGES, "/console/sites/docs", "/console/nope")]
    responses.append(("/console/login", anonymous.get("/console/login")))
    responses.append(("failed login", anonymous.login("nobody")))
    for path, r in responses:
        assert r.status_code in (200, 404), path
        csp = r.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "object-src 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "no-store" in r.headers["Cache-Control"]
        html = r.text.lower()
        assert "<script" not in html and "<style" not in html and " style=" not in html, path
        assert 'rel="stylesheet" href="/static/console.css"' in html, path
    css = console.get("/static/console.css")
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
    assert "@import" not in css.text and "url(" not in css.text  # nothing fetched from outside


def test_error_pages_are_html_in_the_console_and_json_in_the_api(console: Console) -> None:
    hub = console.hub
    missing = console.get("/console/nope")
    assert missing.status_code == 404 and "Not found" in missing.text
    assert "text/html" in missing.headers["Content-Type"]
    method = console.http.put(hub.url + "/console/sites", timeout=30)
    assert method.status_code == 405 and "Method not allowed" in method.text
    api = requests.get(hub.url + "/api/v1/nope", timeout=30)
    assert api.status_code in (401, 404) and api.headers["Content-Type"] == "application/json"
    well_known = requests.get(hub.url + "/.well-known/nope", timeout=30)
    assert well_known.status_code == 404 and well_known.json()["code"] == "not_found"
    api_method = requests.put(hub.url + "/.well-known/jwks.json", timeout=30)
    assert api_method.status_code == 405 and api_method.json()["code"] == "method_not_allowed"

    from hub.console import views

    with hub.app.test_request_context("/console/sites"):
        response = t.cast(Response, views._http_error_page(InternalServerError()))
    body = response.get_data(as_text=True)
    assert response.status_code == 500 and "Internal error" in body and "Traceback" not in body


def test_a_nul_in_a_url_or_form_is_the_consoles_400_page(hub: Hub) -> None:
    """No site key, name or filter holds a NUL, and PostgreSQL text cannot: the console answers
    its own 400 page (nothing stored) where the database would otherwise fail."""
    make_admin(hub)
    console = Console(hub)
    assert console.login().status_code == 302
    token = console.token("/console/sites/new")
    for r in (console.get("/console/activity?site=%00"),
              console.get("/console/sites/shop%00"),
              console.post("/console/sites/new", dict(SITE_FORM, name="Sh\x00op"), token=token),
              # A field sent twice, the NUL in its second value (some forms read every value).
              console.post("/console/sites/new", dict(SITE_FORM, name=["Shop", "Sh\x00op"]),
                           token=token),
              console.post("/console/sites/new", dict(SITE_FORM, **{"na\x00me": "x"}),
                           token=token)):
        assert r.status_code == 400, r.text
        assert "text/html" in r.headers["Content-Type"] and "Traceback" not in r.text
    assert count(hub, "hub_sites") == 0
    assert console.get("/console/activity?site=shop").status_code == 200


def test_a_database_outage_is_the_consoles_503_page(
    make_hub: t.Callable[..., Hub], tmp_path: Path,
) -> None:
    """The database file cannot be opened: pages and forms answer the console's own 503 page
    (nothing changed, Retry-After), the API answers JSON; once the file is back, all works."""
    path = tmp_path / "console-outage.db"
    hub = make_hub(HEADLESSKEY_HUB_DATABASE_URL=f"sqlite:///{path}")
    make_admin(hub)
    console = Console(hub)
    assert console.login().status_code == 302
    token = console.token("/console/sites/new")

    path.rename(tmp_path / "aside.db")
    path.mkdir()
    for r in (console.get("/console/sites"),
              console.post("/console/sites/new", SITE_FORM, token=token)):
        assert r.status_code == 503, r.text
        assert "text/html" in r.headers["Content-Type"] and r.headers["Retry-After"] == "5"
        assert "Database unavailable" in r.text and "nothing was changed" in r.text
        assert r.headers["X-Frame-Options"] == "DENY" and "Traceback" not in r.text
    api = requests.get(hub.url + "/.well-known/jwks.json", timeout=30)
    assert api.status_code == 503 and api.json()["code"] == "database_unavailable"

    path.rmdir()
    (tmp_path / "aside.db").rename(path)
    assert console.get("/console/sites").status_code == 200
    assert count(hub, "hub_sites") == 0
    assert console.onboard().status_code in (200, 302)
    assert count(hub, "hub_sites") == 1


def _es256_jwk(kid: str) -> dict[str, t.Any]:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
    return t.cast(dict[str, t.Any], jwk)
