"""Chromium for browser tests: Debian's /usr/bin/chromium driven by Playwright's Python package.

Tests skip with a clear reason where Chromium or Playwright is missing, so a newcomer's
``./dev test`` passes; ``.ci/run`` installs Chromium and sets HEADLESSKEY_REQUIRE_BROWSER=1,
which turns that skip into a failure, so CI can never pass without running them.
Never ``playwright install``: it downloads a browser, which this project does not use.
"""

from __future__ import annotations

import os
import typing as t

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def require_chromium() -> None:
    """Skip (or, in CI, fail) the calling test module unless Chromium and Playwright exist."""
    reason = None
    if not os.access(CHROMIUM, os.X_OK):
        reason = "Chromium not found at /usr/bin/chromium; apt-get install chromium"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = ("the playwright package is not importable; pip install -e '.[test]' "
                      "(never `playwright install`: the system Chromium is used)")
    if reason is None:
        return
    if os.environ.get("HEADLESSKEY_REQUIRE_BROWSER"):
        pytest.fail(f"browser tests are required here: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def launch(playwright: t.Any) -> t.Any:
    """A headless Chromium with no background network traffic."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
