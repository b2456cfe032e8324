"""Confirming the admin's password in the console over real HTTP: at ``/console/reauth`` and on
a site's Algorithms page, wrong passwords count toward the admin's lock, and the one that locks
the admin ends every console session of theirs, the one guessing and any other (B-12, K-10)."""

from __future__ import annotations

import typing as t

import pytest
import requests

from tests.hub.conftest import Hub
from tests.hub.test_console import Console
from tests.hub.test_console import count
from tests.hub.test_console import hub_events
from tests.hub.test_console import location
from tests.hub.test_console import make_admin

ALGORITHMS = "/console/sites/shop/settings/algorithms"


def _at_reauth(console: Console, password: str) -> requests.Response:
    return console.post("/console/reauth", {"password": password, "next": "/"},
                        form_page="/console/reauth")


def _at_algorithms(console: Console, password: str) -> requests.Response:
    return console.post(ALGORITHMS, {"ALGORITHM": "RS256", "password": password},
                        form_page=ALGORITHMS)


@pytest.mark.parametrize(("confirm", "refused"), [(_at_reauth, 200), (_at_algorithms, 403)],
                         ids=["reauth", "algorithms"])
def test_the_lock_from_a_wrong_confirmation_ends_every_session(
        hub: Hub, confirm: t.Callable[[Console, str], requests.Response], refused: int) -> None:
    make_admin(hub)
    hub.add_site("Shop", "https://shop.example.com")
    guessing, other = Console(hub), Console(hub)
    assert guessing.login().status_code == 302 and other.login().status_code == 302
    for _ in range(hub.state.setting("ADMIN_MAX_FAILURES") - 1):
        assert confirm(guessing, "not the password").status_code == refused
    assert other.get("/").status_code == 200  # not locked yet: every session goes on
    locked = confirm(guessing, "not the password")
    assert locked.status_code == 302 and location(locked) == "/console/login"
    for console in (guessing, other):
        r = console.get("/")
        assert r.status_code == 302 and location(r).startswith("/console/login"), r.text[:200]
    assert [e["actor"] for e in hub_events(hub, "admin.locked")] == ["alice"]
    assert count(hub, "hub_site_policies") == 0
