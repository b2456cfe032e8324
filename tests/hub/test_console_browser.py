"""The admin console in a real Chromium (Playwright's Python package, the system's Chromium).

Logs in through the form, onboards a site, reads its secret once, checks the secret is gone
from the site page, suspends the site and finds the event in the filtered activity log. A
screenshot of each step goes to ``$HEADLESSKEY_TEST_OUTPUT/console`` (default
``test-output/console``, git-ignored). Never runs ``playwright install``: it uses
/usr/bin/chromium and skips with a reason when that or the playwright package is missing.
"""

from __future__ import annotations

import os
import re
import typing as t
from pathlib import Path

import pytest

from hub.services import admins
from tests.browser import ARGS  # noqa: E402
from tests.browser import CHROMIUM  # noqa: E402
from tests.browser import require_chromium  # noqa: E402
from tests.hub.conftest import Hub

require_chromium()

from playwright.sync_api import Page  # noqa: E402
from playwright.sync_api import expect  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

PASSWORD = "Tidy-console-Passphrase-2024"  # noqa: S105 (a test admin's)

@pytest.fixture
def shots() -> Path:
    folder = Path(os.environ.get("HEADLESSKEY_TEST_OUTPUT", "test-output")) / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_console_in_chromium(make_hub: t.Callable[..., Hub], shots: Path) -> None:
    hub = make_hub(HEADLESSKEY_HUB_SECURE_COOKIES=False)
    with hub.app.app_context(), hub.state.session_factory() as db:
        admins.create(db, hub.state, "alice", PASSWORD)
        db.commit()
    hub.add_site("Docs portal", "https://docs.example.com", contact="docs-team@example.com")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(10_000)
            problems: list[str] = []
            # CSP violations ("Refused to ...") and script errors are console errors; a page's
            # own 4xx status is expected (error pages), a failed sub-resource is not.
            page.on("console", lambda m: problems.append(m.text) if m.type == "error"
                    and not m.text.startswith("Failed to load resource") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}")
                    if r.status >= 400 and r.request.resource_type != "document" else None)
            page.on("requestfailed", lambda r: problems.append(f"failed {r.url}"))
            _walk_through(page, hub, shots)
            assert problems == [], problems  # no CSP violation, no failed resource
        finally:
            browser.close()


def _snap(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def _walk_through(page: Page, hub: Hub, shots: Path) -> None:
    # Login, through the form.
    page.goto(hub.url + "/")
    expect(page).to_have_url(re.compile(r"/console/login\?next=/$"))
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(244, 246, 249)", "console.css was not applied"
    _snap(page, shots, "01-login")
    page.fill("#username", "alice")
    page.fill("#password", "wrong password, surely")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".alert-error")).to_have_text("Invalid username or password.")
    _snap(page, shots, "02-login-failed")
    page.fill("#password", PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("h1")).to_have_text("Dashboard")
    expect(page.locator("#count-active")).to_have_text("1")
    _snap(page, shots, "03-dashboard")

    # Onboard: a mistake first (shown next to the field), then the real thing.
    page.get_by_role("link", name="Onboard a site").first.click()
    expect(page.locator("h1")).to_have_text("Onboard a site")
    page.fill("#name", "Shop")
    page.fill("#base_url", "http://shop.example.com")
    page.get_by_role("button", name="Onboard site").click()
    expect(page.locator("#base_url-error")).to_contain_text("An https:// URL")
    page.fill("#name", "Docs portal")
    page.fill("#base_url", "https://shop.example.com")
    page.get_by_role("button", name="Onboard site").click()
    expect(page.locator("#name-error")).to_have_text("Already taken.")
    _snap(page, shots, "04-onboard-errors")
    page.fill("#name", "Shop")
    page.fill("#base_url", "https://shop.example.com")
    page.fill("#allowed_origins", "https://shop.example.com\nhttps://www.shop.example.com")
    page.fill("#contact", "web-team@example.com")
    page.get_by_role("button", name="Onboard site").click()
    secret = page.locator("#secret").inner_text().strip()
    assert secret.startswith("hks_") and len(secret) > 40
    expect(page.locator("#site-key")).to_have_text("shop")
    _snap(page, shots, "05-secret-shown-once")
    assert hub.signed("GET", "/api/v1/directory", "shop", secret).status_code == 200

    # The site page never shows it again, not even after a reload.
    page.click("#done")
    expect(page.locator("#site-status")).to_have_text("active")
    assert secret not in page.content()
    page.reload()
    expect(page.locator("h1")).to_contain_text("Shop")
    assert secret not in page.content()
    expect(page.get_by_text("shown once at creation")).to_be_visible()
    _snap(page, shots, "06-site")

    # Suspend.
    page.click("#suspend")
    expect(page.locator("#site-status")).to_have_text("suspended")
    expect(page.locator(".flash-ok")).to_have_text("Shop is now suspended.")
    _snap(page, shots, "07-suspended")
    assert hub.signed("GET", "/api/v1/directory", "shop", secret).status_code == 401
    page.fill("#confirm", "Shop")
    page.click("#remove")
    expect(page.locator("#confirm-error")).to_have_text("Type the site key (shop) to confirm.")
    _snap(page, shots, "08-remove-needs-confirmation")

    # The activity log, filtered by event.
    page.get_by_role("link", name="Activity", exact=True).click()
    page.select_option("#f-event", "site.suspended")
    page.click("#apply-filters")
    expect(page).to_have_url(re.compile(r"event=site\.suspended"))
    rows = page.locator("table.events tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("shop")
    expect(rows.first).to_contain_text("alice")
    _snap(page, shots, "09-activity-filtered")

    # The other pages, for a look.
    page.get_by_role("link", name="Sites", exact=True).click()
    expect(page.locator("#sites tbody tr")).to_have_count(2)
    _snap(page, shots, "10-sites")
    page.get_by_role("link", name="Settings", exact=True).click()
    page.fill("#SECRET_GRACE", "3600")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator(".flash-ok")).to_have_text("Settings saved.")
    _snap(page, shots, "11-settings")
    page.goto(hub.url + "/console/sites/shop")
    page.click("#rotate")
    rotated = page.locator("#secret").inner_text().strip()
    assert rotated.startswith("hks_") and rotated != secret
    expect(page.locator("#grace")).to_contain_text("stays valid for 3600 seconds (1 hour)")
    _snap(page, shots, "12-secret-rotated")
    page.goto(hub.url + "/console/sites/nope")
    expect(page.locator("h1")).to_have_text("Not found")
    _snap(page, shots, "13-not-found")
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(hub.url + "/console/sites/shop")
    _snap(page, shots, "14-site-mobile")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/console/login$"))
    expect(page.locator(".flash-ok")).to_have_text("You are signed out.")
