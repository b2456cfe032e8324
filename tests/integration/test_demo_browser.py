"""The demo federation of `./dev run`, clicked through in Chromium: register at A, log in,
continue to B, arrive at B logged in. Screenshots go to test-output/demo/."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import typing as t
import urllib.request
from pathlib import Path

import pytest

from tests.browser import launch
from tests.browser import require_chromium
from tests.conftest import free_port

require_chromium()

from playwright.sync_api import expect  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback only
            return True
    except OSError:
        return False


@pytest.fixture
def demo(tmp_path: Path) -> t.Iterator[dict[str, str]]:
    base = free_port(13)  # the hub at base, APIs +1 and +2, frontends +11 and +12
    env = {**os.environ, "HEADLESSKEY_ARGON2_TIME_COST": "1", "HEADLESSKEY_ARGON2_MEMORY_COST": "8"}
    log = (tmp_path / "demo.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--dir", str(tmp_path / "demo"),
         "--base-port", str(base)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    urls = {"a": f"http://127.0.0.1:{base + 11}", "b": f"http://127.0.0.1:{base + 12}",
            "hub": f"http://127.0.0.1:{base}"}
    try:
        deadline = time.monotonic() + 90
        while not (_answers(urls["a"] + "/config.js") and _answers(urls["b"] + "/config.js")):
            assert process.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo did not start in 90 s"
            time.sleep(0.3)
        yield urls
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_register_at_a_and_continue_to_b_logged_in(demo: dict[str, str]) -> None:
    shots = Path(os.environ.get("HEADLESSKEY_TEST_OUTPUT", "test-output")) / "demo"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(demo["a"] + "/")
        expect(page.locator("#site-name")).to_have_text("Site A")
        page.screenshot(path=str(shots / "01-site-a.png"), full_page=True)

        form = page.locator("#register")
        form.locator("input[name=username]").fill("ada")
        form.locator("input[name=email]").fill("ada@example.com")
        form.locator("input[name=display_name]").fill("Ada Lovelace")
        form.locator("input[name=password]").fill("analytical engine notes")
        form.locator("button").click()
        expect(page.locator("#display-name")).to_have_text("Ada Lovelace")
        page.screenshot(path=str(shots / "02-registered-at-a.png"), full_page=True)

        # Log out and in again through the login form.
        page.locator("#logout").click()
        expect(page.locator("#login")).to_be_visible()
        page.locator("#login input[name=username]").fill("ada@example.com")
        page.locator("#login input[name=password]").fill("analytical engine notes")
        page.locator("#login button").click()
        expect(page.locator("#display-name")).to_have_text("Ada Lovelace")
        page.screenshot(path=str(shots / "03-logged-in-at-a.png"), full_page=True)

        page.locator("#continue").click()
        page.wait_for_url(demo["b"] + "/**")
        expect(page.locator("#site-name")).to_have_text("Site B")
        expect(page.locator("#display-name")).to_have_text("Ada Lovelace")
        expect(page.locator("#arrived")).to_be_visible()
        expect(page.locator("#from")).to_have_text("site-a")
        assert "#sso=" not in page.url  # the assertion does not linger in the address bar
        page.screenshot(path=str(shots / "04-arrived-at-b.png"), full_page=True)

        assert not errors, errors
        browser.close()
