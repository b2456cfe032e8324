"""Confirming the admin's password in the console over real HTTP: at ``/console/reauth`` and on
a site's Algorithms page, wrong passwords count toward the admin's lock, and the one that locks
the admin ends every console session of theirs, the one guessing and any other (B-12, K-10).
A form whose answer shows a secret needs the password entered within ``REAUTH_SECONDS``."""

from __future__ import annotations

import typing as t
from urllib.parse import unquote

import pytest
import requests

from tests.hub.conftest import Hub
from tests.hub.test_console import PASSWORD
from tests.hub.test_console import Console
from tests.hub.test_console import count
from tests.hub.test_console import hub_events
from tests.hub.test_console import location
from tests.hub.test_console import make_admin

ALGORITHMS = "/console/sites/shop/settings/algorithms"
WEBHOOKS = "/console/sites/shop/settings/webhooks"


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


def test_adding_a_webhook_needs_a_recent_password(hub: Hub) -> None:
    """The answer to *Add endpoint* shows the endpoint's signing secret: like rotating a site's
    secret, it sends an admin who signed in more than REAUTH_SECONDS ago to confirm the
    password first, and adds nothing until then."""
    make_admin(hub)
    shop = hub.add_site("Shop", "https://shop.example.com")
    console = Console(hub)
    assert console.login().status_code == 302
    hub.clock.advance(hub.state.setting("REAUTH_SECONDS") + 1)
    form = {"url": "https://hooks.example.com/in", "events": "login.failed"}
    r = console.post(f"{WEBHOOKS}/add", form, form_page=WEBHOOKS)
    assert r.status_code == 302 and "whsec_" not in r.text
    assert unquote(location(r)) == f"/console/reauth?next={WEBHOOKS}"
    assert count(hub, "hub_site_policies") == 0
    directory = hub.signed("GET", "/api/v1/directory", *shop).json()
    assert directory["policy"] == {"version": 0, "settings": {}}
    right = console.post("/console/reauth", {"password": PASSWORD, "next": WEBHOOKS},
                         form_page="/console/reauth")
    assert location(right) == WEBHOOKS
    added = console.post(f"{WEBHOOKS}/add", form, form_page=WEBHOOKS)
    assert added.status_code == 200 and 'id="webhook-secret"' in added.text
    assert count(hub, "hub_site_policies") == 1
