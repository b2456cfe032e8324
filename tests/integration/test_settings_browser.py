"""Site settings in a real Chromium, against a real hub and a real site A (processes).

An admin signs in to the hub console, shortens site A's access-token lifetime and closes its
registration; within A's directory refresh interval a new login at A returns the new
``expires_in``, while registration stays open because A pins it in its own configuration (the
console says so). A bad value is refused with a message and nothing saved; a later change is
rolled back from the history page and A's logins get the old lifetime again. Screenshots go to
``$HEADLESSKEY_TEST_OUTPUT/settings`` (default ``test-output/settings``).
"""

from __future__ import annotations

import os
import re
import time
import typing as t
from pathlib import Path

import pytest

from tests.browser import launch
from tests.browser import require_chromium
from tests.conftest import PASSWORD
from tests.conftest import lifetime
from tests.integration.test_site_policy import ADMIN_PASSWORD
from tests.integration.test_site_policy import Fleet
from tests.integration.test_site_policy import build_fleet
from tests.integration.test_sso import Agent

require_chromium()

from playwright.sync_api import Page  # noqa: E402
from playwright.sync_api import expect  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

REFRESH = 1.0  # HEADLESSKEY_DIRECTORY_REFRESH of the site, seconds
WITHIN = 10.0  # refresh interval + the jobs' schedule + a worker's one-second copy, generously


@pytest.fixture
def shots() -> Path:
    folder = Path(os.environ.get("HEADLESSKEY_TEST_OUTPUT", "test-output")) / "settings"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def fleet(tmp_path: Path) -> t.Iterator[Fleet]:
    built = build_fleet(tmp_path / "fed")
    try:
        yield built
    finally:
        built.fed.stop()


def expires_in(agent: Agent) -> int:
    r = agent.post("/token", json={"username": "reader", "password": PASSWORD})
    assert r.status_code == 200, r.text
    return int(r.json()["expires_in"])


def wait_expires_in(agent: Agent, seconds: int) -> float:
    """Seconds until a new login at ``agent`` gets ``seconds`` of lifetime (one less: rounding)."""
    started = time.monotonic()
    while expires_in(agent) not in lifetime(seconds):
        assert time.monotonic() - started < WITHIN, f"expires_in is not {seconds} yet"
        time.sleep(0.2)
    return time.monotonic() - started


def test_settings_in_chromium(fleet: Fleet, shots: Path) -> None:
    a = fleet.fed["a"]
    r = a.post("/register", json={"username": "reader", "email": "reader@example.com",
                                  "password": PASSWORD})
    assert r.status_code == 201, r.text
    assert expires_in(a) in lifetime(900)  # the built-in lifetime

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15_000)
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error"
                    and not m.text.startswith("Failed to load resource") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}")
                    if r.status >= 400 and r.request.resource_type != "document" else None)
            _walk_through(page, fleet, a, shots)
            assert problems == [], problems
        finally:
            browser.close()


def _snap(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def _wait_applied(page: Page, version: int) -> None:
    """Reload until the console shows the site applied ``version`` (from its health report)."""
    deadline = time.monotonic() + 20
    while page.locator("#applied-version").inner_text().strip() != str(version):
        assert time.monotonic() < deadline, "the site's report did not reach the console"
        time.sleep(0.5)
        page.reload()


def _walk_through(page: Page, fleet: Fleet, a: Agent, shots: Path) -> None:
    page.goto(fleet.hub.url + "/console/login")
    page.fill("#username", "admin")
    page.fill("#password", ADMIN_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("h1")).to_have_text("Dashboard")
    page.goto(f"{fleet.hub.url}/console/sites/{a.site_key}")
    page.click("#site-settings")
    expect(page.locator("h1")).to_have_text("Site A · settings")
    # A pins its registration in its own configuration; its first report says so.
    expect(page.locator("#pinned-REGISTRATION")).to_have_text("pinned at the site")
    expect(page.locator("#pinned-ACCESS_TOKEN_TTL")).to_have_count(0)
    _snap(page, shots, "01-general")

    # Shorten the access-token lifetime and close registration (pinned: A keeps it open).
    page.fill("#ACCESS_TOKEN_TTL", "120")
    page.select_option("#REGISTRATION", "closed")
    page.fill("#note", "shorter tokens for the sale")
    page.click("#save")
    expect(page.locator(".flash-ok")).to_contain_text("Saved as version 1")
    took = wait_expires_in(a, 120)
    assert took < WITHIN
    _wait_applied(page, 1)
    expect(page.locator("#ACCESS_TOKEN_TTL")).to_have_value("120")
    _snap(page, shots, "02-applied")
    r = a.post("/register", json={"username": "still-open", "email": "still-open@example.com",
                                  "password": PASSWORD})
    assert r.status_code == 201, r.text  # the pinned setting is left alone

    # A bad value: refused with the agent's own message, nothing saved.
    page.fill("#ACCESS_TOKEN_TTL", "5")
    page.click("#save")
    expect(page.locator("#form-error")).to_contain_text("nothing was saved")
    expect(page.locator("#ACCESS_TOKEN_TTL-error")).to_have_text(
        "must be between 30 and 86400, got 5")
    expect(page.locator("#policy-version")).to_have_text("1")
    _snap(page, shots, "03-refused")
    assert fleet.hub_version(a.site_key) == 1
    assert expires_in(a) in lifetime(120)

    # Another change, then a rollback to version 1 from the history.
    page.fill("#ACCESS_TOKEN_TTL", "300")
    page.click("#save")
    expect(page.locator(".flash-ok")).to_contain_text("Saved as version 2")
    wait_expires_in(a, 300)
    page.get_by_role("link", name="History").click()
    expect(page.locator("#version-2")).to_contain_text("120 → 300")
    expect(page.locator("#version-1")).to_contain_text("shorter tokens for the sale")
    _snap(page, shots, "04-history")
    page.click("#rollback-1")
    expect(page.locator(".flash-ok")).to_have_text("Rolled back: version 3 equals version 1.")
    expect(page.locator("#version-3")).to_contain_text("rollback to version 1")
    wait_expires_in(a, 120)
    _wait_applied(page, 3)
    expect(page.locator("#applied-version")).to_have_text("3")
    _snap(page, shots, "05-rolled-back")
    assert re.search(r"v3", page.locator("#history").inner_text())

    # Webhooks: the signing secret of a new endpoint is shown once.
    page.get_by_role("link", name="Webhooks").click()
    page.fill("#url", "https://hooks.example.com/in")
    page.check("input[value='login.failed']")
    page.click("#add-webhook")
    secret = page.locator("#webhook-secret").inner_text().strip()
    assert secret.startswith("whsec_") and len(secret) > 40
    _snap(page, shots, "06-webhook-secret-once")
    page.get_by_role("link", name="Webhooks").click()
    expect(page.locator("#webhooks")).to_contain_text("https://hooks.example.com/in")
    assert secret not in page.content()
    page.get_by_role("link", name="Endpoint access").click()
    expect(page.locator("#access")).to_contain_text("sso_exchange")
    _snap(page, shots, "07-endpoint-access")
