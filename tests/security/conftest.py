"""The security suite: the checklist (``cases.py``) as black-box tests over HTTP.

Every test here runs against real server processes: a session-wide :class:`Fleet` of a hub and
three member sites, one per access-token algorithm (``hs`` HS256, ``rs`` RS256, ``es`` ES256),
each ``headlesskey-agent serve`` with two gunicorn workers and its mail sent to a real SMTP
server on loopback. Tests that need other settings (tight lockout limits, a trusted proxy) build
a small federation of their own with :meth:`tests.integration.test_sso.Federation.build`.

Each test names the checklist cases it covers with ``@pytest.mark.case("J-01", ...)``; a case
that does not apply is a test that skips with the reason. At the end of the run the report
below prints how many cases were covered, skipped (with reasons) and failed, and any case that
no test names.
"""

from __future__ import annotations

import secrets
import typing as t
from collections import defaultdict
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import Mailbox
from tests.conftest import free_port
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Federation
from tests.integration.test_sso import User
from tests.integration.test_sso import login
from tests.integration.test_sso import new_user
from tests.security.cases import CASES

ALGORITHMS = {"hs": "HS256", "rs": "RS256", "es": "ES256"}
FLEET_SETTINGS = {
    # Every request comes from 127.0.0.1: no test may lock the others out. The lockout cases
    # build agents of their own with tight limits.
    "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "10000",
    "HEADLESSKEY_LOCKOUT_MAX_FAILURES": "100",
    "HEADLESSKEY_DIRECTORY_REFRESH": "2",
    # Forgeries are many: the limit on failed validations has a test of its own (J-38).
    "HEADLESSKEY_VALIDATE_MAX_FAILURES": "0",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "case(*ids): the security checklist cases a test covers")


# --- the case report -------------------------------------------------------------------------

_outcomes: dict[str, dict[str, str]] = defaultdict(dict)  # case -> {nodeid: outcome}
_reasons: dict[str, str] = {}  # case -> why it was skipped


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("case"):
            for case in mark.args:
                if case not in CASES:
                    raise pytest.UsageError(f"{item.nodeid}: unknown checklist case {case!r}")


def _cases(item: pytest.Item) -> list[str]:
    return [case for mark in item.iter_markers("case") for case in mark.args]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> t.Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    cases = _cases(item)
    if not cases:
        return
    for case in cases:
        seen = _outcomes[case]
        if report.failed:
            seen[item.nodeid] = "failed"
        elif report.skipped and seen.get(item.nodeid) != "failed":
            seen[item.nodeid] = "skipped"
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            _reasons[case] = reason.removeprefix("Skipped: ")
        elif report.when == "call" and report.passed and item.nodeid not in seen:
            seen[item.nodeid] = "passed"


def pytest_terminal_summary(terminalreporter: t.Any) -> None:
    if not _outcomes:
        return
    covered, skipped, failed, missing = [], [], [], []
    for case in CASES:
        results = set(_outcomes.get(case, {}).values())
        if not results:
            missing.append(case)
        elif "failed" in results:
            failed.append(case)
        elif "passed" in results:
            covered.append(case)
        else:
            skipped.append(case)
    write = terminalreporter.write_line
    terminalreporter.section("security checklist")
    for case in skipped:
        write(f"skipped {case} ({CASES[case]}): {_reasons.get(case, '')}")
    for case in failed:
        write(f"FAILED  {case} ({CASES[case]})")
    if missing:
        write("not run: " + ", ".join(missing))
    write(f"{len(CASES)} cases: {len(covered)} covered, {len(skipped)} skipped, "
          f"{len(failed)} failed, {len(missing)} not run")


# --- the fleet -------------------------------------------------------------------------------


class Fleet:
    """A hub and three member sites (``hs``, ``rs``, ``es``), real processes; mail to ``mail``."""

    def __init__(self, fed: Federation, mail: Mailbox) -> None:
        self.fed = fed
        self.hub = fed.hub
        self.mail = mail

    def __getitem__(self, name: str) -> Agent:
        return self.fed[name]

    @property
    def agents(self) -> list[Agent]:
        return list(self.fed.agents.values())


def smtp_settings(mail: Mailbox) -> dict[str, str]:
    return {"HEADLESSKEY_MAIL_BACKEND": "smtp", "HEADLESSKEY_MAIL_HOST": "127.0.0.1",
            "HEADLESSKEY_MAIL_PORT": str(mail.port),  # type: ignore[attr-defined]
            "HEADLESSKEY_MAIL_SECURITY": "none"}


@pytest.fixture(scope="session")
def mail() -> t.Iterator[Mailbox]:
    """A real SMTP server (aiosmtpd) on loopback for the whole security run."""
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    box.port = controller.port  # type: ignore[attr-defined]
    yield box
    controller.stop()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, mail: Mailbox) -> t.Iterator[Fleet]:
    root: Path = tmp_path_factory.mktemp("security-fleet")
    fed = Federation.build(root, list(ALGORITHMS), algorithms=ALGORITHMS,
                           **FLEET_SETTINGS, **smtp_settings(mail))
    try:
        yield Fleet(fed, mail)
    finally:
        fed.stop()


@pytest.fixture(params=list(ALGORITHMS), ids=list(ALGORITHMS.values()))
def agent(request: pytest.FixtureRequest, fleet: Fleet) -> Agent:
    """Each member site in turn: the test runs once per access-token algorithm."""
    return fleet[request.param]


def fresh_user(agent: Agent, prefix: str = "u") -> User:
    """A new account at ``agent``, registered and logged in over HTTP (a name of its own)."""
    return new_user(agent, f"{prefix}{secrets.token_hex(5)}")


__all__ = ["Fleet", "fresh_user", "login"]
