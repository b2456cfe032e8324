"""The security suite: the checklist (``cases.py``) as black-box tests over HTTP.

Every test here runs against real server processes: a session-wide :class:`Fleet` of a hub and
three member sites, one per access-token algorithm (``hs`` HS256, ``rs`` RS256, ``es`` ES256),
each ``headlesskey-agent serve`` with two gunicorn workers and its mail sent to a real SMTP
server on loopback. Tests that need other settings (tight lockout limits, a trusted proxy) build
a small federation of their own with :meth:`tests.integration.test_sso.Federation.build`.

Each test names the checklist cases it covers with ``@pytest.mark.case("J-01", ...)``; a case
that does not apply is a test that skips with the reason. At the end of the run the report
(``tests/security/report.py``) prints how many cases were covered, skipped (with reasons) and
failed, and any case that no test names.
"""

from __future__ import annotations

import secrets
import typing as t
from pathlib import Path

import pytest

from tests.conftest import Mailbox
from tests.conftest import smtp_server
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Federation
from tests.integration.test_sso import User
from tests.integration.test_sso import login
from tests.integration.test_sso import new_user

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
    with smtp_server() as box:
        yield box


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
