"""A member site's settings in the console over real HTTP: every page saves a checked version,
a bad value is refused with the agent's message and nothing saved, the history shows who and
what, a rollback is a new version equal to an old one, webhook secrets are shown once and kept
encrypted, and the site's signed directory carries the newest version."""

from __future__ import annotations

import concurrent.futures
import re
import typing as t

import pytest

from hub.services import admins
from tests.hub.conftest import Hub
from tests.hub.test_console import PASSWORD
from tests.hub.test_console import Console

WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=]{40,}")


@pytest.fixture
def console(hub: Hub) -> Console:
    with hub.app.app_context(), hub.state.session_factory() as db:
        admins.create(db, hub.state, "alice", PASSWORD)
        db.commit()
    c = Console(hub)
    assert c.login().status_code == 302
    return c


@pytest.fixture
def shop(hub: Hub) -> tuple[str, str]:
    return hub.add_site("Shop", "https://shop.example.com")


def page(site_key: str, group: str) -> str:
    return f"/console/sites/{site_key}/settings/{group}"


def directory(hub: Hub, shop: tuple[str, str]) -> dict[str, t.Any]:
    r = hub.signed("GET", "/api/v1/directory", *shop)
    assert r.status_code == 200, r.text
    return t.cast(dict[str, t.Any], r.json())


def versions(hub: Hub) -> int:
    return int(hub.scalar("SELECT count(*) FROM hub_site_policies"))


def test_general_page_saves_a_version_the_directory_carries(
        hub: Hub, console: Console, shop: tuple[str, str]) -> None:
    assert directory(hub, shop)["policy"] == {"version": 0, "settings": {}}
    form = page("shop", "general")
    r = console.post(form, {"ACCESS_TOKEN_TTL": "120", "REGISTRATION": "closed",
                            "note": "shorter tokens"}, form_page=form)
    assert r.status_code == 302, r.text
    shown = console.get(form).text
    assert "Saved as version 1" in shown and 'value="120"' in shown
    assert directory(hub, shop)["policy"] == {
        "version": 1, "settings": {"ACCESS_TOKEN_TTL": 120, "REGISTRATION": "closed"}}
    # Emptying a field hands the setting back to the site.
    console.post(form, {"ACCESS_TOKEN_TTL": "", "REGISTRATION": "closed"}, form_page=form)
    assert directory(hub, shop)["policy"] == {"version": 2,
                                             "settings": {"REGISTRATION": "closed"}}
    # The same values again: no new version.
    console.post(form, {"REGISTRATION": "closed"}, form_page=form)
    assert versions(hub) == 2
    event = hub.scalar("SELECT details FROM hub_events WHERE event = 'policy.updated' "
                       "ORDER BY id LIMIT 1")
    assert "shorter tokens" in str(event) and "ACCESS_TOKEN_TTL" in str(event)


@pytest.mark.parametrize(("group", "form", "field", "message"), [
    ("general", {"ACCESS_TOKEN_TTL": "5"}, "ACCESS_TOKEN_TTL", "must be between 30 and 86400"),
    ("general", {"ACCESS_TOKEN_TTL": "soon"}, "ACCESS_TOKEN_TTL", "expected an integer"),
    ("general", {"PASSWORD_MIN_LENGTH": "100", "PASSWORD_MAX_LENGTH": "64"},
     "PASSWORD_MIN_LENGTH", "must not be above the maximum length"),
    ("general", {"REGISTRATION": "maybe"}, "REGISTRATION", "must be one of open, closed"),
    ("security", {"CORS": "javascript:alert(1)"}, "CORS", "is not an origin"),
    ("security", {"CORS": "https://[::1"}, "CORS", "not a URL"),
    ("security", {"CORS": "https://app.example.com:99999"}, "CORS", "not a URL"),
    ("security", {"CORS": "https://evil.example\uff03@app.example.com"}, "CORS", "not a URL"),
    ("security", {"CORS": "https://user@app.example.com"}, "CORS", "is not an origin"),
    ("security", {"LOCKOUT_MAX_FAILURES": "0"}, "LOCKOUT_MAX_FAILURES", "must be between 1"),
    ("access", {"mode-admin": "public"}, "ACCESS", "admin must be a list of roles"),
    ("access", {"mode-me": "roles", "roles-me": "editor, edi\x01tor"}, "ACCESS",
     "a role is 1 to 64 printable characters"),
    ("general", {"DEFAULT_ROLE": "administrator"}, "DEFAULT_ROLE", "may use the admin API"),
    ("security", {"SESSION_LIMIT_POLICY": "shrug"}, "SESSION_LIMIT_POLICY", "must be one of"),
    ("algorithms", {"ALGORITHM": "none"}, "ALGORITHM", "must be one of HS256, RS256, ES256"),
])
def test_a_bad_value_is_refused_with_a_message_and_nothing_saved(
        hub: Hub, console: Console, shop: tuple[str, str], group: str, form: dict[str, str],
        field: str, message: str) -> None:
    url = page("shop", group)
    r = console.post(url, form, form_page=url)
    assert r.status_code == 400
    assert f'id="{field}-error"' in r.text and message in r.text, r.text
    assert "nothing was saved" in r.text
    assert versions(hub) == 0
    assert directory(hub, shop)["policy"]["version"] == 0


def test_endpoint_access_table(hub: Hub, console: Console, shop: tuple[str, str]) -> None:
    url = page("shop", "access")
    r = console.post(url, {"mode-me": "roles", "roles-me": ""}, form_page=url)
    assert r.status_code == 400 and "Name at least one role" in r.text
    r = console.post(url, {"mode-me": "roles", "roles-me": "editor, administrator",
                           "mode-openapi": "authenticated"}, form_page=url)
    assert r.status_code == 302
    assert directory(hub, shop)["policy"]["settings"] == {
        "ACCESS": {"me": ["editor", "administrator"], "openapi": "authenticated"}}
    shown = console.get(url).text
    assert 'value="editor, administrator"' in shown


def test_history_and_rollback(hub: Hub, console: Console, shop: tuple[str, str]) -> None:
    url = page("shop", "general")
    for ttl in ("600", "120"):
        console.post(url, {"ACCESS_TOKEN_TTL": ttl}, form_page=url)
    history = console.get("/console/sites/shop/settings-history").text
    assert 'id="version-2"' in history and "600 → 120" in history and "alice" in history
    r = console.post("/console/sites/shop/settings-history/rollback", {"version": "1"},
                     form_page="/console/sites/shop/settings-history")
    assert r.status_code == 302
    assert directory(hub, shop)["policy"] == {"version": 3,
                                             "settings": {"ACCESS_TOKEN_TTL": 600}}
    assert "rollback to version 1" in console.get("/console/sites/shop/settings-history").text
    r = console.post("/console/sites/shop/settings-history/rollback", {"version": "99"},
                     form_page="/console/sites/shop/settings-history")
    assert r.status_code == 404 and versions(hub) == 3


def test_algorithm_change_needs_the_admins_password(
        hub: Hub, console: Console, shop: tuple[str, str]) -> None:
    """A switch of the token algorithm asks for the password again: none or a wrong one saves
    nothing (and counts as a failure); the right one saves; the same value needs none."""
    url = page("shop", "algorithms")
    for password in (None, "not the password"):
        form = {"ALGORITHM": "RS256"} | ({"password": password} if password else {})
        r = console.post(url, form, form_page=url)
        assert r.status_code == 403, r.text
        assert 'id="password-error"' in r.text and versions(hub) == 0
    assert hub.scalar("SELECT failures FROM hub_admins WHERE username = 'alice'") == 2
    assert hub.scalar("SELECT count(*) FROM hub_events WHERE event = 'admin.reauth_failed'") == 2
    r = console.post(url, {"ALGORITHM": "RS256", "password": PASSWORD}, form_page=url)
    assert r.status_code == 302, r.text
    assert directory(hub, shop)["policy"]["settings"] == {"ALGORITHM": "RS256"}
    assert hub.scalar("SELECT failures FROM hub_admins WHERE username = 'alice'") == 0
    r = console.post(url, {"ALGORITHM": "RS256", "note": "same"}, form_page=url)
    assert r.status_code == 302 and versions(hub) == 1
    # Handing the choice back to the site is a change too.
    r = console.post(url, {"ALGORITHM": ""}, form_page=url)
    assert r.status_code == 403 and versions(hub) == 1


def test_concurrent_wrong_confirmations_are_each_counted(
        make_hub: t.Callable[..., Hub]) -> None:
    """Wrong passwords confirming an algorithm switch, sent at once from several signed-in
    consoles (each answered in a thread of its own), are all counted toward the admin's lock:
    none is lost to another's write of the same counter."""
    hub = make_hub(HEADLESSKEY_HUB_ADMIN_MAX_FAILURES=100)
    with hub.app.app_context(), hub.state.session_factory() as db:
        admins.create(db, hub.state, "alice", PASSWORD)
        db.commit()
    hub.add_site("Shop", "https://shop.example.com")
    url = page("shop", "algorithms")
    guesses = 12
    consoles = [Console(hub) for _ in range(guesses)]
    assert all(c.login().status_code == 302 for c in consoles)
    tokens = [c.token(url) for c in consoles]
    with concurrent.futures.ThreadPoolExecutor(guesses) as pool:
        answers = list(pool.map(
            lambda ct: ct[0].post(url, {"ALGORITHM": "RS256", "password": "not it"},
                                  token=ct[1]),
            zip(consoles, tokens, strict=True)))
    assert [r.status_code for r in answers] == [403] * guesses
    assert hub.scalar("SELECT failures FROM hub_admins WHERE username = 'alice'") == guesses
    assert hub.scalar(
        "SELECT count(*) FROM hub_events WHERE event = 'admin.reauth_failed'") == guesses
    assert versions(hub) == 0


def test_rollback_cannot_switch_the_algorithm(
        hub: Hub, console: Console, shop: tuple[str, str]) -> None:
    url = page("shop", "algorithms")
    console.post(url, {"ALGORITHM": "RS256", "password": PASSWORD}, form_page=url)
    console.post(url, {"ALGORITHM": "ES256", "password": PASSWORD}, form_page=url)
    history = "/console/sites/shop/settings-history"
    r = console.post(history + "/rollback", {"version": "1"}, form_page=history)
    assert r.status_code == 302 and versions(hub) == 2
    assert "Algorithms page" in console.get(history).text
    assert directory(hub, shop)["policy"]["settings"] == {"ALGORITHM": "ES256"}


def test_webhook_secret_shown_once_kept_encrypted(hub: Hub, console: Console,
                                                  shop: tuple[str, str]) -> None:
    url = page("shop", "webhooks")
    r = console.post(f"{url}/add", {"url": "ftp://hooks.example.com"}, form_page=url)
    assert r.status_code == 400 and 'id="url-error"' in r.text and versions(hub) == 0
    r = console.post(f"{url}/add", {"url": "https://hooks.example.com/in",
                                    "events": "login.failed"}, form_page=url)
    assert r.status_code == 200
    secret = WHSEC.search(r.text)
    assert secret, r.text
    assert secret.group(0) not in console.get(url).text  # never shown again
    stored = str(hub.scalar("SELECT settings FROM hub_site_policies"))
    assert secret.group(0) not in stored and "secret_enc" in stored
    (hook,) = directory(hub, shop)["policy"]["settings"]["WEBHOOKS"]
    assert hook["secret"] == secret.group(0) and hook["events"] == ["login.failed"]
    assert secret.group(0) not in str(hub.scalar(
        "SELECT details FROM hub_events WHERE event = 'policy.updated'"))
    # Redelivery requests reach the site in its directory.
    console.post(f"{url}/redeliver", {"message_id": "msg_2abc"}, form_page=url)
    assert [r["message_id"] for r in directory(hub, shop)["webhook_redeliveries"]] == ["msg_2abc"]
    console.post(f"{url}/{hook['id']}/remove", {}, form_page=url)
    assert directory(hub, shop)["policy"]["settings"]["WEBHOOKS"] == []


def test_health_report_shows_applied_version_and_pinned_keys(
        hub: Hub, console: Console, shop: tuple[str, str]) -> None:
    url = page("shop", "general")
    console.post(url, {"ACCESS_TOKEN_TTL": "120"}, form_page=url)
    report = {"version": "1.0", "time": hub.clock().isoformat(), "policy_version": 1,
              "pinned": ["REGISTRATION"], "webhook_log": [
                  {"message_id": "msg_1", "endpoint": "wh_1", "event": "login.failed",
                   "status": "dead", "attempts": 8, "last_status": 500, "last_error": "",
                   "created_at": "2026-01-01T00:00:00Z", "delivered_at": None}]}
    assert hub.signed("POST", "/api/v1/health", *shop, json=report).status_code == 200
    shown = console.get(url).text
    assert re.search(r'id="applied-version">1<', shown) and "in force" in shown
    assert 'id="pinned-REGISTRATION"' in shown and 'id="pinned-ACCESS_TOKEN_TTL"' not in shown
    assert "Redeliver" in console.get(page("shop", "webhooks")).text
    listing = console.get("/console/sites").text
    assert ">v1</a>" in listing and "applied v1" in listing and "1 pinned" in listing
    bad = dict(report, pinned=["SECRET_KEY"])
    assert hub.signed("POST", "/api/v1/health", *shop, json=bad).status_code == 400
