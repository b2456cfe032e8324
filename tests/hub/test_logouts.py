"""Logout everywhere at the hub (issue 5 item 6): the signed ``POST /api/v1/logouts``, the
``logouts`` list of every directory, and the console's "log a user out everywhere" form.

A site can only log out its own identities: the issuer recorded is always the calling site's
registered issuer, whatever the body says.
"""

from __future__ import annotations

import concurrent.futures
import time
import typing as t

import pytest

from hub import jobs
from hub.services import logouts as logout_service
from hub.services import sites as site_service
from tests.hub.conftest import Hub
from tests.hub.test_console import Console
from tests.hub.test_console import count
from tests.hub.test_console import hub_events
from tests.hub.test_console import location
from tests.hub.test_console import make_admin
from tests.hub.test_console import secret_of

LOGOUTS = "/api/v1/logouts"
DIRECTORY = "/api/v1/directory"


def test_a_site_logs_out_its_own_identity_and_every_directory_lists_it(hub: Hub) -> None:
    shop, shop_secret = hub.add_site("Shop", "https://shop.example.com")
    docs, docs_secret = hub.add_site("Docs", "https://docs.example.com")

    r = hub.signed("POST", LOGOUTS, shop, shop_secret,
                   json={"subject": "42", "issuer": "https://docs.example.com",
                         "site_key": docs})
    assert r.status_code == 201, r.text
    made = r.json()
    # The body's issuer and site_key are ignored: the caller's own are recorded.
    assert made["issuer"] == "https://shop.example.com"
    assert made["site_key"] == shop and made["subject"] == "42"
    assert count(hub, "hub_logouts", "issuer = :i", i="https://docs.example.com") == 0

    for key, secret in ((shop, shop_secret), (docs, docs_secret)):  # all sites see all
        listed = hub.signed("GET", DIRECTORY, key, secret).json()["logouts"]
        assert [(lo["id"], lo["issuer"], lo["subject"], lo["site_key"]) for lo in listed] == [
            (made["id"], "https://shop.example.com", "42", shop)]
        assert listed[0]["created_at"].endswith("Z")

    logged = hub_events(hub, "logout.global")
    assert len(logged) == 1 and logged[0]["site_key"] == shop and logged[0]["actor"] == shop
    assert logged[0]["details"]["subject"] == "42" and logged[0]["details"]["via"] == "api"


def test_an_integer_subject_is_a_string(hub: Hub) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    r = hub.signed("POST", LOGOUTS, shop, secret, json={"subject": 7})
    assert r.status_code == 201 and r.json()["subject"] == "7"


@pytest.mark.parametrize("body", [{}, {"subject": ""}, {"subject": "  "}, {"subject": True},
                                  {"subject": ["1"]}, {"subject": "x" * 256},
                                  {"subject": None}, {"subject": "4\x002"},
                                  {"subject": "42\r\n"}])
def test_a_bad_subject_is_refused(hub: Hub, body: dict[str, t.Any]) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    r = hub.signed("POST", LOGOUTS, shop, secret, json=body)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    assert count(hub, "hub_logouts") == 0


def test_a_logout_passed_on_keeps_its_origins_time_and_is_recorded_once(hub: Hub) -> None:
    shop, shop_secret = hub.add_site("Shop", "https://shop.example.com")
    docs, docs_secret = hub.add_site("Docs", "https://docs.example.com")
    blog, blog_secret = hub.add_site("Blog", "https://blog.example.com")
    first = hub.signed("POST", LOGOUTS, shop, shop_secret, json={"subject": "1"}).json()
    assert first["origin"] == first["id"]
    hub.clock.advance(30)

    # Docs ended the sessions of its account linked to Shop's user 1 (its user 8): it passes
    # the logout on, and the new row keeps the first one's time and id as origin.
    r = hub.signed("POST", LOGOUTS, docs, docs_secret, json={"subject": "8", "origin": first["id"]})
    assert r.status_code == 201, r.text
    second = r.json()
    assert second["origin"] == first["id"] and second["created_at"] == first["created_at"]
    assert second["issuer"] == "https://docs.example.com" and second["subject"] == "8"
    # Blog passes on Docs' row: the origin is still the first logout.
    third = hub.signed("POST", LOGOUTS, blog, blog_secret,
                       json={"subject": "3", "origin": second["id"]}).json()
    assert third["origin"] == first["id"] and third["created_at"] == first["created_at"]
    # Passing the same chain on again (a retry) returns the row already made.
    again = hub.signed("POST", LOGOUTS, docs, docs_secret,
                       json={"subject": "8", "origin": second["id"]})
    assert again.json()["id"] == second["id"]
    assert count(hub, "hub_logouts") == 3
    listed = hub.signed("GET", DIRECTORY, shop, shop_secret).json()["logouts"]
    assert [lo["origin"] for lo in listed] == [first["id"]] * 3


def test_a_pass_on_retried_while_the_first_runs_is_recorded_once(hub: Hub) -> None:
    """A site retries passing a logout on while its first request is still running: the retry
    answers the row the first one made. (Apart, both found no row of the chain for that user,
    both stored one and both logged it: every directory listed the logout twice.)"""
    shop, shop_secret = hub.add_site("Shop", "https://shop.example.com")
    docs, docs_secret = hub.add_site("Docs", "https://docs.example.com")
    first = hub.signed("POST", LOGOUTS, shop, shop_secret, json={"subject": "1"}).json()
    with hub.app.app_context(), hub.state.session_factory() as db:
        made = logout_service.record(db, hub.state, site_service.get(db, docs), "8",
                                     actor=docs, via="api", origin=first["id"])
        db.flush()  # not committed yet
        made_id = made.id
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            retry = pool.submit(hub.signed, "POST", LOGOUTS, docs, docs_secret,
                                json={"subject": "8", "origin": first["id"]})
            time.sleep(0.5)  # the retry reaches the chain's row and waits
            db.commit()
            r = retry.result(timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == made_id
    assert count(hub, "hub_logouts") == 2
    assert len(hub_events(hub, "logout.global")) == 2
    listed = hub.signed("GET", DIRECTORY, shop, shop_secret).json()["logouts"]
    assert [lo["subject"] for lo in listed] == ["1", "8"]


@pytest.mark.parametrize("origin", [999, 0, -1, True, "1", 2**40, [1]])
def test_a_bad_origin_is_refused(hub: Hub, origin: t.Any) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    r = hub.signed("POST", LOGOUTS, shop, secret, json={"subject": "1", "origin": origin})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    assert "origin" in r.json()["data"]["fields"]
    assert count(hub, "hub_logouts") == 0


def test_an_expired_logout_cannot_be_passed_on(hub: Hub) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    first = hub.signed("POST", LOGOUTS, shop, secret, json={"subject": "1"}).json()
    hub.clock.advance(24 * 3600 + 1)
    r = hub.signed("POST", LOGOUTS, shop, secret, json={"subject": "2", "origin": first["id"]})
    assert r.status_code == 400 and "origin" in r.json()["data"]["fields"], r.text


def test_unsigned_or_forged_requests_record_nothing(hub: Hub) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    hub.add_site("Docs", "https://docs.example.com")
    unsigned = hub.http.post(hub.url + LOGOUTS, json={"subject": "1"}, timeout=30)
    assert unsigned.status_code == 401
    # Shop's secret, claiming to be Docs: a bad signature.
    forged = hub.signed("POST", LOGOUTS, "docs", secret, json={"subject": "1"})
    assert forged.status_code == 401 and forged.json()["code"] == "bad_signature"
    assert count(hub, "hub_logouts") == 0


def test_logouts_leave_the_directory_after_24_hours(hub: Hub) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    assert hub.signed("POST", LOGOUTS, shop, secret, json={"subject": "1"}).status_code == 201
    hub.clock.advance(23 * 3600 + 59 * 60)
    assert len(hub.signed("GET", DIRECTORY, shop, secret).json()["logouts"]) == 1
    hub.clock.advance(120)
    assert hub.signed("GET", DIRECTORY, shop, secret).json()["logouts"] == []
    # The pruning job then deletes the row; the event stays in the log.
    assert hub.scalar("SELECT count(*) FROM hub_logouts") == 1
    jobs.prune_nonces(hub.app)
    assert hub.scalar("SELECT count(*) FROM hub_logouts") == 0
    assert hub.scalar("SELECT count(*) FROM hub_events WHERE event = 'logout.global'") == 1


@pytest.fixture
def console(hub: Hub) -> Console:
    """A console session signed in as alice (as in test_console)."""
    make_admin(hub)
    c = Console(hub)
    assert c.login().status_code == 302
    return c


def test_the_console_logs_a_user_of_a_site_out_everywhere(console: Console) -> None:
    hub = console.hub
    secret = secret_of(console.onboard())
    page = "/console/sites/shop"
    shown = console.get(page).text
    assert "Log a user of this site out everywhere" in shown and 'name="subject"' in shown

    r = console.post(f"{page}/logout-user", {"subject": "17"}, form_page=page)
    assert location(r) == page
    assert "will be logged out on every site" in console.get(page).text
    listed = hub.signed("GET", DIRECTORY, "shop", secret).json()["logouts"]
    assert [(lo["issuer"], lo["subject"], lo["site_key"]) for lo in listed] == [
        ("https://shop.example.com", "17", "shop")]
    logged = hub_events(hub, "logout.global")
    assert len(logged) == 1
    assert logged[0]["actor"] == "alice" and logged[0]["ip"] == "127.0.0.1"
    assert logged[0]["site_key"] == "shop" and logged[0]["details"]["via"] == "console"

    empty = console.post(f"{page}/logout-user", {"subject": " "}, form_page=page)
    assert empty.status_code == 400 and "Enter the user&#39;s id" in empty.text
    assert count(hub, "hub_logouts") == 1


def test_the_console_form_needs_csrf_and_a_signed_in_admin(console: Console) -> None:
    console.onboard()
    page = "/console/sites/shop"
    no_token = console.post(f"{page}/logout-user", {"subject": "17"}, token="")
    assert no_token.status_code in (400, 403)
    other = Console(console.hub)
    anonymous = other.post(f"{page}/logout-user", {"subject": "17"}, token="",
                           form_page="/console/login")
    assert anonymous.status_code in (302, 400, 403)
    assert count(console.hub, "hub_logouts") == 0
    assert console.post("/console/sites/nope/logout-user", {"subject": "1"},
                        form_page=page).status_code == 404
