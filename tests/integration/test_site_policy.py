"""Site settings set in the hub console change what a member site does, across real processes.

A federation of ``headlesskey-hub serve`` and ``headlesskey-agent serve`` (two gunicorn workers
and the jobs process, which refreshes the directory every second), built with the real
commands. Each test changes one group of settings through the console over HTTP, waits until
the site applied that version, and checks the site's API over HTTP: a lockout threshold, a
device limit, an endpoint made role-restricted then public, a pinned setting left alone, and
an algorithm switch with a token signed before it still valid.
"""

from __future__ import annotations

import json
import re
import time
import typing as t
from pathlib import Path

import jwt
import pytest

from tests.conftest import PASSWORD
from tests.conftest import lifetime
from tests.hub.test_console import Console
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Federation
from tests.integration.test_sso import login
from tests.integration.test_sso import new_user

ADMIN_PASSWORD = "Tidy-console-Passphrase-2024"  # noqa: S105 (a test admin's)
SETTINGS = {
    "HEADLESSKEY_DIRECTORY_REFRESH": "1",
    "HEADLESSKEY_JWKS_MAX_AGE": "0",  # a new key signs 4 s after it is made, not 5 minutes
    # Pinned at the site: every request of these tests comes from 127.0.0.1.
    "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "1000",
    "HEADLESSKEY_REGISTRATION": "open",
}


class Fleet:
    """A running federation, a signed-in console, and helpers to change a site's settings."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.hub = fed.hub
        self.console = Console(fed.hub)  # type: ignore[arg-type]
        assert self.console.login("admin", ADMIN_PASSWORD).status_code == 302

    def hub_version(self, site_key: str) -> int:
        rows = self.hub.rows("SELECT coalesce(max(p.version), 0) FROM hub_site_policies p "
                             "JOIN hub_sites s ON s.id = p.site_id WHERE s.site_key = ?", site_key)
        return int(rows[0][0])

    def save(self, agent: Agent, group: str, form: dict[str, str]) -> int:
        """Post one settings page and wait until ``agent`` applied the new version."""
        url = f"/console/sites/{agent.site_key}/settings/{group}"
        r = self.console.post(url, form, form_page=url)
        assert r.status_code == 302, r.text
        version = self.hub_version(agent.site_key)
        wait_applied(agent, version)
        return version


def applied(agent: Agent) -> dict[str, t.Any]:
    rows = agent.rows("SELECT body FROM hk_federation_cache WHERE name = 'policy'")
    return json.loads(rows[0][0]) if rows else {}


def wait_applied(agent: Agent, version: int, timeout: float = 20) -> None:
    """Until the site stored ``version``, then the second a worker may keep its copy."""
    deadline = time.monotonic() + timeout
    while applied(agent).get("version") != version:
        assert time.monotonic() < deadline, f"version {version} not applied: {applied(agent)}"
        time.sleep(0.2)
    time.sleep(1.2)  # agent.policy.CHECK_INTERVAL


class UnpinnedAgent(Agent):
    """An agent whose site.toml leaves the token algorithm to the hub (no ``algorithm`` line,
    so it starts on the built-in HS256)."""

    def init(self) -> None:
        super().init()
        path = self.instance / "site.toml"
        lines = [line for line in path.read_text().splitlines()
                 if not line.startswith(("algorithm =", "private_key_file ="))]
        path.write_text("\n".join(lines) + "\n")


def build_fleet(root: Path, names: t.Sequence[str] = ("a",)) -> Fleet:
    fed = Federation(root, list(names), SETTINGS)
    fed.hub.env["HEADLESSKEY_HUB_SECURE_COOKIES"] = "false"  # the console over plain http
    for name in names:
        agent = UnpinnedAgent(name, root, SETTINGS)
        agent.jobs = True
        fed.agents[name] = agent
    try:
        fed._build()
        fed.hub.cli("admins", "create", "--username", "admin", "--password-stdin",
                    stdin=ADMIN_PASSWORD + "\n")
        return Fleet(fed)
    except BaseException:
        fed.stop()
        raise


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Fleet]:
    built = build_fleet(tmp_path_factory.mktemp("policy"))
    try:
        yield built
    finally:
        built.fed.stop()


def token_login(agent: Agent, username: str, password: str = PASSWORD) -> t.Any:
    return agent.post("/token", json={"username": username, "password": password})


def test_lockout_threshold(fleet: Fleet) -> None:
    a = fleet.fed["a"]
    for name in ("lock-before", "lock-after"):
        new_user(a, name)
    # Built-in threshold (5): two failures lock nothing.
    for _ in range(2):
        assert token_login(a, "lock-before", "wrong password").status_code == 401
    assert token_login(a, "lock-before").status_code == 200
    fleet.save(a, "security", {"LOCKOUT_MAX_FAILURES": "2"})
    for _ in range(2):
        assert token_login(a, "lock-after", "wrong password").status_code == 401
    r = token_login(a, "lock-after")
    assert r.status_code == 429 and r.json()["code"] == "too_many_attempts", r.text
    fleet.save(a, "security", {})


def test_device_limit(fleet: Fleet) -> None:
    a = fleet.fed["a"]
    new_user(a, "devices")  # one session already
    assert token_login(a, "devices").status_code == 200  # no limit: a second device
    fleet.save(a, "security", {"MAX_SESSIONS": "2", "SESSION_LIMIT_POLICY": "reject"})
    r = token_login(a, "devices")
    assert r.status_code == 403 and r.json()["code"] == "session_limit_reached", r.text
    fleet.save(a, "security", {"MAX_SESSIONS": "2", "SESSION_LIMIT_POLICY": "evict_oldest"})
    assert token_login(a, "devices").status_code == 200
    sessions = a.rows("SELECT count(*) FROM hk_sessions s JOIN hk_users u ON u.id = s.user_id "
                      "WHERE u.user_login = 'devices' AND s.revoked_at IS NULL")
    assert sessions[0][0] == 2
    fleet.save(a, "security", {})


def test_endpoint_access(fleet: Fleet) -> None:
    a = fleet.fed["a"]
    user = new_user(a, "reader")
    assert a.get("/me", token=user.token).status_code == 200
    assert a.get("/openapi.json").status_code == 200
    fleet.save(a, "access", {"mode-me": "roles", "roles-me": "editor",
                             "mode-openapi": "authenticated"})
    r = a.get("/me", token=user.token)
    assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
    assert a.get("/openapi.json").status_code == 401
    assert a.get("/openapi.json", token=user.token).status_code == 200
    fleet.save(a, "access", {"mode-openapi": "public"})
    assert a.get("/me", token=user.token).status_code == 200
    assert a.get("/openapi.json").status_code == 200


def test_pinned_settings_are_left_alone(fleet: Fleet) -> None:
    a = fleet.fed["a"]
    fleet.save(a, "general", {"REGISTRATION": "closed"})
    fleet.save(a, "security", {"LOCKOUT_IP_MAX_FAILURES": "1"})
    new_user(a, "pinned-open")  # registration stays open: pinned by the site's environment
    for _ in range(2):
        assert token_login(a, "pinned-open", "wrong password").status_code == 401
    assert token_login(a, "pinned-open").status_code == 200  # the IP limit stays 1000
    # The console shows both keys as pinned, from the site's health report.
    page = fleet.console.get(f"/console/sites/{a.site_key}/settings/general").text
    assert 'id="pinned-REGISTRATION"' in page
    assert 'id="pinned-ACCESS_TOKEN_TTL"' not in page
    fleet.save(a, "general", {})
    fleet.save(a, "security", {})


def test_algorithm_switch_keeps_old_tokens_valid(fleet: Fleet) -> None:
    a = fleet.fed["a"]
    user = new_user(a, "algo")
    assert jwt.get_unverified_header(user.token)["alg"] == "HS256"
    fleet.save(a, "algorithms", {"ALGORITHM": "ES256", "password": ADMIN_PASSWORD})
    deadline = time.monotonic() + 20
    while True:
        fresh = login(a, "algo")
        if jwt.get_unverified_header(fresh.token)["alg"] == "ES256":
            break
        assert time.monotonic() < deadline, "the site still signs with HS256"
        time.sleep(0.5)
    # The new key is published; the token signed before the switch still works.
    jwks = a.http.get(a.base + "/.well-known/jwks.json", timeout=10).json()
    kid = jwt.get_unverified_header(fresh.token)["kid"]
    assert kid in {k["kid"] for k in jwks["keys"]}
    assert a.get("/me", token=user.token).status_code == 200
    assert a.get("/me", token=fresh.token).status_code == 200
    r = a.post("/token/validate", json={"token": user.token})
    assert r.status_code == 200 and r.json()["valid"] is True, r.text


def test_applied_version_is_reported(fleet: Fleet) -> None:
    a = fleet.fed["a"]
    version = fleet.save(a, "general", {"ACCESS_TOKEN_TTL": "300"})
    assert token_login(a, "reader").json()["expires_in"] in lifetime(300)
    deadline = time.monotonic() + 20
    url = f"/console/sites/{a.site_key}/settings/general"
    while not re.search(rf'id="applied-version">{version}<', fleet.console.get(url).text):
        assert time.monotonic() < deadline, "the site's report did not reach the hub"
        time.sleep(0.5)
    fleet.save(a, "general", {})
    assert token_login(a, "reader").json()["expires_in"] in lifetime(900)
