"""Logouts everywhere as a member agent applies them from the directory (issue 5 item 6).

A real hub (``make_hub``) and a member agent (``make_site``); the agent's directory fetch
applies the hub's logouts: the sessions of the account linked to the logged-out identity end,
and the agent passes the logout on for that account, naming its origin, so that a site linked
to this one (and not to the first) follows.
"""

from __future__ import annotations

import datetime as dt
import typing as t

import pytest
from sqlalchemy import select

from agent import federation
from agent.models import IdentityLink
from hub.models import Logout
from tests.agent.test_health import hub  # noqa: F401  (the fixture)
from tests.agent.test_health import member  # noqa: F401  (the fixture)
from tests.conftest import Site
from tests.hub.conftest import Hub
from tests.hub.conftest import make_hub  # noqa: F401  (the fixture)

DOCS = "https://docs.example.com"


@pytest.fixture
def linked(hub: Hub, member: Site) -> tuple[str, str, str]:  # noqa: F811
    """Carol of Docs (user 5 there) is linked to the member's alice; alice is logged in."""
    docs, docs_secret = hub.add_site("Docs", DOCS)
    user_id = member.create_user("alice")
    with member.db() as db:
        db.add(IdentityLink(issuer=DOCS, subject="5", user_id=user_id,
                            created_at=member.clock()))
        db.commit()
    token = member.api.login()["token"]
    return docs, docs_secret, token


def fetch(member: Site) -> dict[str, t.Any]:  # noqa: F811
    """The directory fetch, made due by moving the agent's clock on (and back after it: tokens
    are checked against real time)."""
    member.clock.advance(120)
    try:
        with member.app.app_context(), member.state.session_factory() as db:
            return federation.directory(db, member.state)
    finally:
        member.clock.offset = dt.timedelta()


def logouts(hub: Hub) -> list[tuple[str, str, int | None]]:  # noqa: F811
    with hub.state.session_factory() as db:
        return [(r.site_key, r.subject, r.origin_id)
                for r in db.scalars(select(Logout).order_by(Logout.id))]


def test_a_linked_account_is_logged_out_and_the_logout_passed_on(
        hub: Hub, member: Site, linked: tuple[str, str, str]) -> None:  # noqa: F811
    docs, docs_secret, token = linked
    first = hub.signed("POST", "/api/v1/logouts", docs, docs_secret, json={"subject": "5"}).json()
    assert member.api.get("/me", token=token).status_code == 200
    fetch(member)
    assert member.api.get("/me", token=token).status_code == 401
    shop = member.state.settings.hub_site_key
    assert logouts(hub) == [(docs, "5", None), (shop, "1", first["id"])]
    # Applied once: later fetches neither end new sessions nor pass it on again.
    again = member.api.login()["token"]
    with member.app.app_context(), member.state.session_factory() as db:
        for _ in range(2):
            assert federation.apply_logouts(
                db, member.state, federation.client(member.state).directory()) == 0
    assert member.api.get("/me", token=again).status_code == 200
    assert len(logouts(hub)) == 2


def test_a_logout_the_hub_does_not_take_is_passed_on_at_the_next_fetch(
        hub: Hub, member: Site, linked: tuple[str, str, str]) -> None:  # noqa: F811
    docs, docs_secret, token = linked
    made = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    # A listed logout the hub no longer knows (say, pruned meanwhile): the pass-on is refused.
    gone = {"logouts": [{"id": 99, "issuer": DOCS, "subject": "5", "site_key": docs,
                         "origin": 99, "created_at": made}]}
    with member.app.app_context(), member.state.session_factory() as db:
        assert federation.apply_logouts(db, member.state, gone) == 1
        # The sessions ended at once; the logout is not marked applied, so it is tried again.
        assert federation.apply_logouts(db, member.state, gone) == 0
        applied = db.get(federation.FederationCache, federation.LOGOUTS_APPLIED)
        assert applied is None or 99 not in applied.body["ids"]
    assert member.api.get("/me", token=token).status_code == 401
    assert logouts(hub) == []


def test_the_sites_own_logout_is_not_passed_on(hub: Hub, member: Site) -> None:  # noqa: F811
    user_id = member.create_user("bob")
    token = member.api.login("bob")["token"]
    shop = t.cast(str, member.state.settings.hub_site_key)
    with hub.app.app_context(), hub.state.session_factory() as db:
        from hub.models import Site as HubSite
        from hub.services import logouts as logout_service

        site = db.scalar(select(HubSite).where(HubSite.site_key == shop))
        assert site is not None
        logout_service.record(db, hub.state, site, user_id, actor="admin", via="console")
        db.commit()
    fetch(member)
    assert member.api.get("/me", token=token).status_code == 401
    assert logouts(hub) == [(shop, str(user_id), None)]
