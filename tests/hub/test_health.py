"""Fleet health on the hub: ``POST /api/v1/health``, the flags, and what the console shows.

Reports go over real HTTP, signed like an agent's; the hub's clock is moved, never slept on.
"""

from __future__ import annotations

import datetime as dt
import typing as t

import pytest
import requests
from sqlalchemy import select

from agent.services.keys import SigningKey
from agent.services.keys import generate_private_key_pem
from hub.models import Setting
from hub.models import Site
from hub.models import SiteHealth
from hub.services import health as health_service
from tests.hub.conftest import Hub
from tests.hub.test_console import Console
from tests.hub.test_console import make_admin

HEALTH = "/api/v1/health"
KEYS = "/api/v1/keys"


def iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture(scope="module")
def fed_key() -> SigningKey:
    return SigningKey.from_pem("ES256", generate_private_key_pem("ES256"))


class Member:
    def __init__(self, hub: Hub, name: str = "Shop") -> None:
        self.hub = hub
        self.name = name
        self.site_key, self.secret = hub.add_site(name, f"https://{name.lower()}.example.com")

    def register(self, key: SigningKey) -> str:
        assert key.public_jwk is not None
        r = self.hub.signed("POST", KEYS, self.site_key, self.secret,
                            json={"jwk": dict(key.public_jwk), "status": "active"})
        assert r.status_code == 201, r.text
        return t.cast(str, r.json()["kid"])

    def report(self, *, skew: float = 0.0, kid: str = "", sync_age: float | None = 0.0,
               **extra: t.Any) -> requests.Response:
        now = self.hub.clock()
        body = {
            "version": "1.2.3",
            "time": iso(now + dt.timedelta(seconds=skew)),
            "key_fingerprint": kid,
            "last_exchange_at": None,
            "last_sync_at": None if sync_age is None else iso(now - dt.timedelta(seconds=sync_age)),
            **extra,
        }
        return self.hub.signed("POST", HEALTH, self.site_key, self.secret, json=body)

    def row(self) -> SiteHealth | None:
        with self.hub.state.session_factory() as db:
            return db.scalar(select(SiteHealth).join(Site, Site.id == SiteHealth.site_id)
                             .where(Site.site_key == self.site_key))

    def flags(self) -> list[str]:
        with self.hub.app.app_context(), self.hub.state.session_factory() as db:
            return health_service.flags(db, self.hub.state)[self.site_key]


def test_a_signed_report_is_stored_with_the_skew_by_the_hubs_clock(hub: Hub,
                                                                    fed_key: SigningKey) -> None:
    member = Member(hub)
    kid = member.register(fed_key)
    exchanged = hub.clock() - dt.timedelta(minutes=3)
    r = member.report(kid=kid, last_exchange_at=iso(exchanged))
    assert r.status_code == 200, r.text
    assert abs(r.json()["clock_skew_seconds"]) < 5 and r.json()["flags"] == []
    row = member.row()
    assert row is not None
    assert row.agent_version == "1.2.3" and row.key_fingerprint == kid
    assert abs(row.clock_skew_seconds) < 5
    assert row.last_exchange_at is not None
    assert abs((row.last_exchange_at - exchanged).total_seconds()) < 1
    assert row.last_sync_at is not None

    # The hub's clock moves 100 s ahead; the agent's report says the real time: skew ≈ -100.
    hub.clock.advance(100)
    body = {"version": "1.2.4", "time": iso(dt.datetime.now(dt.UTC)), "key_fingerprint": kid,
            "last_exchange_at": None, "last_sync_at": iso(dt.datetime.now(dt.UTC))}
    r = hub.signed("POST", HEALTH, member.site_key, member.secret, json=body)
    assert r.status_code == 200, r.text
    row = member.row()
    assert row is not None
    assert row.agent_version == "1.2.4"  # one row per site, replaced
    assert -105 < row.clock_skew_seconds < -95
    assert row.last_exchange_at is None
    assert hub.scalar("SELECT count(*) FROM hub_site_health") == 1
    assert "clock drift" in r.json()["flags"]


def test_an_unsigned_report_is_refused(hub: Hub) -> None:
    member = Member(hub)
    r = requests.post(hub.url + HEALTH, json={"version": "1", "time": iso(hub.clock())},
                      timeout=30)
    assert r.status_code == 401 and r.json()["code"] == "unsigned_request"
    # Signed with a wrong secret: refused alike.
    _, other_secret = hub.add_site("Other", "https://other.example.com")
    r = hub.signed("POST", HEALTH, member.site_key, other_secret,
                   json={"version": "1", "time": iso(hub.clock())})
    assert r.status_code == 401 and r.json()["code"] == "bad_signature"
    assert member.row() is None


@pytest.mark.parametrize("fields", [
    {"time": "yesterday"},
    {"time": None},
    {"version": ""},
    {"version": "x" * 65},
    {"last_sync_at": "soon"},
    {"key_fingerprint": 42},
    # Times that exist only in their own offset: in UTC they fall outside years 1 to 9999.
    {"time": "0001-01-01T00:00:00+14:00"},
    {"last_exchange_at": "0001-01-01T00:00:00+14:00"},
    {"last_sync_at": "9999-12-31T23:59:59-14:00"},
])
def test_a_malformed_report_is_refused(hub: Hub, fields: dict[str, t.Any]) -> None:
    member = Member(hub)
    r = member.report(**fields)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_request"
    assert set(r.json()["data"]["fields"]) == set(fields)
    assert member.row() is None


def test_clock_drift_is_flagged_and_cleared(hub: Hub, fed_key: SigningKey) -> None:
    member = Member(hub)
    kid = member.register(fed_key)
    assert member.report(kid=kid, skew=45).status_code == 200
    assert member.flags() == ["clock drift"]
    assert member.report(kid=kid, skew=-45).status_code == 200
    assert member.flags() == ["clock drift"]
    assert member.report(kid=kid, skew=10).status_code == 200
    assert member.flags() == []


def test_not_synced_is_flagged_and_cleared(hub: Hub, fed_key: SigningKey) -> None:
    member = Member(hub)
    kid = member.register(fed_key)
    assert member.flags() == ["not synced"]  # never reported
    member.report(kid=kid, sync_age=None)
    assert member.flags() == ["not synced"]  # never synced its directory
    member.report(kid=kid, sync_age=16 * 60)
    assert member.flags() == ["not synced"]  # its last sync is too old
    member.report(kid=kid, sync_age=60)
    assert member.flags() == []
    hub.clock.advance(16 * 60)  # then the agent falls silent
    assert member.flags() == ["not synced"]
    member.report(kid=kid)
    assert member.flags() == []


def test_key_overdue_is_flagged_and_cleared(hub: Hub, fed_key: SigningKey) -> None:
    member = Member(hub)
    kid = member.register(fed_key)
    member.report(kid=kid)
    assert member.flags() == []
    member.report(kid="not-a-registered-kid")
    assert member.flags() == ["key overdue"]  # a key the hub does not publish
    member.report(kid="")
    assert member.flags() == ["key overdue"]
    member.report(kid=kid)
    assert member.flags() == []

    # The console's Member key rotation setting (here 2 days) ages the active key.
    with hub.state.session_factory() as db:
        db.add(Setting(key="KEY_ROTATION_DAYS", value=2, updated_at=hub.clock(), updated_by="t"))
        db.commit()
    hub.clock.advance(3 * 86400)
    member.report(kid=kid)
    assert member.flags() == ["key overdue"]
    fresh = SigningKey.from_pem("ES256", generate_private_key_pem("ES256"))
    new_kid = member.register(fresh)  # rotated: the old key is retiring, the new one active
    member.report(kid=new_kid)
    assert member.flags() == []

    # A retired key no longer counts as registered.
    r = hub.signed("DELETE", f"{KEYS}/{new_kid}", member.site_key, member.secret)
    assert r.status_code == 200, r.text
    member.report(kid=new_kid)
    assert "key overdue" in member.flags()


def test_a_suspended_site_is_not_flagged(hub: Hub) -> None:
    member = Member(hub)
    assert member.flags() == ["not synced"]
    from hub.services import sites

    with hub.app.app_context(), hub.state.session_factory() as db:
        site = db.scalar(select(Site).where(Site.site_key == member.site_key))
        assert site is not None
        sites.set_status(db, hub.state, site, "suspended", "test")
        db.commit()
    assert member.flags() == []


def test_a_removed_site_takes_its_health_row_along(hub: Hub) -> None:
    member = Member(hub)
    assert member.report().status_code == 200
    from hub.services import sites

    with hub.app.app_context(), hub.state.session_factory() as db:
        site = db.scalar(select(Site).where(Site.site_key == member.site_key))
        assert site is not None
        sites.remove(db, hub.state, site, "test")
        db.commit()
    assert hub.scalar("SELECT count(*) FROM hub_site_health") == 0


def test_the_console_shows_health(hub: Hub, fed_key: SigningKey) -> None:
    healthy = Member(hub, "Alpha")
    drifting = Member(hub, "Bravo")
    silent = Member(hub, "Charlie")
    kid = healthy.register(fed_key)
    assert healthy.report(kid=kid).status_code == 200
    assert drifting.report(skew=120, kid="some-unknown-kid").status_code == 200
    make_admin(hub)
    console = Console(hub)
    assert console.login().status_code == 302

    listing = console.get("/console/sites")
    assert listing.status_code == 200
    rows = {name: listing.text.split(name, 1)[1].split("</tr>", 1)[0]
            for name in ("Alpha", "Bravo", "Charlie")}
    assert "badge-active\">ok<" in rows["Alpha"] and "badge-failure" not in rows["Alpha"]
    assert "clock drift" in rows["Bravo"] and "key overdue" in rows["Bravo"]
    assert "not synced" in rows["Charlie"] and "clock drift" not in rows["Charlie"]

    dashboard = console.get("/")
    assert dashboard.status_code == 200
    panel = dashboard.text.split('id="fleet-health"', 1)[1].split("</section>", 1)[0]
    assert "Fleet health" in dashboard.text
    assert "Bravo" in panel and "Charlie" in panel and "Alpha" not in panel
    assert "clock drift" in panel and "not synced" in panel

    page = console.get(f"/console/sites/{drifting.site_key}")
    assert page.status_code == 200
    assert 'id="health-version">1.2.3<' in page.text
    assert "some-unknown-kid" in page.text
    assert "+120." in page.text.split('id="health-skew">', 1)[1][:20]
    assert "clock drift" in page.text
    page = console.get(f"/console/sites/{silent.site_key}")
    assert "has not reported its health yet" in page.text and "not synced" in page.text
    for response in (listing, dashboard, page):
        assert "style=" not in response.text and "<script>" not in response.text

    # Everything healthy: the panel says so.
    assert drifting.report(kid=drifting.register(
        SigningKey.from_pem("ES256", generate_private_key_pem("ES256")))).status_code == 200
    assert silent.report(kid=silent.register(
        SigningKey.from_pem("ES256", generate_private_key_pem("ES256")))).status_code == 200
    panel = console.get("/").text.split('id="fleet-health"', 1)[1].split("</section>", 1)[0]
    assert "every active site is healthy" in panel
