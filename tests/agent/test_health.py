"""Fleet health from the agent's side (issue 5, item 7): a member agent reports its version,
clock, federation key and sync state to a real hub, which stores it and flags problems.

Real HTTP: a hub served by ``make_hub`` and a member agent by ``make_site`` with a hub URL,
site key, secret file and federation key; the agent's clock is moved, never slept on.
"""

from __future__ import annotations

import datetime as dt
import time
import typing as t
from pathlib import Path

import pytest
from sqlalchemy import select

from agent import health
from agent.federation import client
from agent.federation import federation_key
from agent.health import report
from agent.jobs import run_scheduler
from agent.models import AuditEvent
from agent.models import FederationCache
from agent.services.keys import generate_private_key_pem
from hub.models import Site as HubSite
from hub.models import SiteHealth
from hub.services import health as health_service
from tests.agent.test_hub_client import NESTED
from tests.agent.test_hub_client import rewrite
from tests.conftest import Site
from tests.conftest import free_port
from tests.hub.conftest import Hub
from tests.hub.conftest import make_hub  # noqa: F401  (the fixture)
from tests.hub.test_console import Console
from tests.hub.test_console import make_admin


def member_site(make_site: t.Callable[..., Site], tmp_path: Path, hub_url: str, site_key: str,
                secret: str) -> Site:
    secret_file = tmp_path / f"{site_key}-secret.key"
    secret_file.write_text(secret + "\n")
    key_file = tmp_path / f"{site_key}-federation.pem"
    key_file.write_bytes(generate_private_key_pem("ES256"))
    site = make_site(
        HEADLESSKEY_HUB_URL=hub_url,
        HEADLESSKEY_HUB_SITE_KEY=site_key,
        HEADLESSKEY_HUB_SECRET_FILE=str(secret_file),
        HEADLESSKEY_FEDERATION_KEY_FILE=str(key_file),
    )
    assert site.state.settings.federated
    return site


@pytest.fixture
def hub(make_hub: t.Callable[..., Hub]) -> Hub:  # noqa: F811
    return make_hub()


@pytest.fixture
def member(hub: Hub, make_site: t.Callable[..., Site], tmp_path: Path) -> Site:
    site_key, secret = hub.add_site("Shop", "https://shop.example.com")
    site = member_site(make_site, tmp_path, hub.url, site_key, secret)
    with site.app.app_context():
        key = federation_key(site.state)
        assert key.public_jwk is not None
        client(site.state).register_key(dict(key.public_jwk), "active")
    return site


def hub_row(hub: Hub, site: Site) -> SiteHealth | None:
    with hub.state.session_factory() as db:
        return db.scalar(select(SiteHealth).join(HubSite, HubSite.id == SiteHealth.site_id)
                         .where(HubSite.site_key == site.state.settings.hub_site_key))


def hub_flags(hub: Hub, site: Site) -> list[str]:
    with hub.app.app_context(), hub.state.session_factory() as db:
        return health_service.flags(db, hub.state)[t.cast(str, site.state.settings.hub_site_key)]


def test_a_report_reaches_the_hub_with_version_kid_and_sync(hub: Hub, member: Site) -> None:
    exchanged = member.clock() - dt.timedelta(minutes=5)
    with member.db() as db:
        db.add(AuditEvent(created_at=exchanged - dt.timedelta(hours=1), event="sso.exchanged",
                          outcome="success", details={}))
        db.add(AuditEvent(created_at=exchanged, event="sso.exchanged", outcome="success",
                          details={}))
        db.add(AuditEvent(created_at=exchanged, event="login.succeeded", outcome="success",
                          details={}))
        db.commit()

    assert report(member.state) is True

    row = hub_row(hub, member)
    assert row is not None
    assert row.agent_version == health.agent_version() != "unknown"
    with member.app.app_context():
        assert row.key_fingerprint == federation_key(member.state).kid
    assert abs(row.clock_skew_seconds) < 5
    assert row.last_exchange_at is not None
    assert abs((row.last_exchange_at - exchanged).total_seconds()) < 1
    # The report refreshed the directory first: the last sync is the cache's fetch time.
    with member.db() as db:
        cached = db.get(FederationCache, "directory")
        assert cached is not None
        fetched = cached.fetched_at
    assert row.last_sync_at is not None
    assert abs((row.last_sync_at - fetched).total_seconds()) < 1
    assert hub_flags(hub, member) == []


def test_a_site_without_an_exchange_reports_none(hub: Hub, member: Site) -> None:
    assert report(member.state) is True
    row = hub_row(hub, member)
    assert row is not None and row.last_exchange_at is None


def test_a_drifting_clock_is_flagged_in_the_service_and_the_console(hub: Hub,
                                                                       member: Site) -> None:
    assert report(member.state) is True
    assert hub_flags(hub, member) == []

    member.clock.advance(120)
    assert report(member.state) is True
    row = hub_row(hub, member)
    assert row is not None and 115 < row.clock_skew_seconds < 125
    assert "clock drift" in hub_flags(hub, member)

    make_admin(hub)
    console = Console(hub)
    assert console.login().status_code == 302
    panel = console.get("/").text.split('id="fleet-health"', 1)[1].split("</section>", 1)[0]
    assert "Shop" in panel and "clock drift" in panel
    page = console.get(f"/console/sites/{member.state.settings.hub_site_key}").text
    assert "+12" in page.split('id="health-skew">', 1)[1][:12]

    member.clock.advance(-120)  # NTP fixed it
    assert report(member.state) is True
    assert hub_flags(hub, member) == []


def test_a_report_to_a_hub_that_is_down_returns_false(hub: Hub, make_site: t.Callable[..., Site],
                                                       tmp_path: Path) -> None:
    site_key, secret = hub.add_site("Lone", "https://lone.example.com")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    site = member_site(make_site, tmp_path, dead, site_key, secret)
    assert report(site.state) is False
    assert hub_row(hub, site) is None
    assert hub_flags(hub, site) == ["not synced"]


def test_a_report_the_hub_refuses_returns_false(hub: Hub, make_site: t.Callable[..., Site],
                                                tmp_path: Path) -> None:
    site_key, _ = hub.add_site("Wrong", "https://wrong.example.com")
    _, other_secret = hub.add_site("Other", "https://other.example.com")
    site = member_site(make_site, tmp_path, hub.url, site_key, other_secret)
    assert report(site.state) is False  # 401: not an exception either
    assert hub_row(hub, site) is None


@pytest.mark.parametrize("answer", [NESTED, b"<html>ok</html>", b'{"flags": 5}',
                                    b'{"flags": "drift"}', b"[]"])
def test_a_report_the_hub_answers_oddly_is_sent(hub: Hub, member: Site, answer: bytes) -> None:
    """The report reached the hub; an answer of another shape (JSON nested past the stack, flags
    that are no list) is no exception in the health job."""
    member.state.hub_transport = rewrite(health.HEALTH_PATH, lambda _: answer)
    assert report(member.state) is True
    assert hub_row(hub, member) is not None


def test_an_unfederated_site_does_not_report(make_site: t.Callable[..., Site]) -> None:
    site = make_site()
    assert report(site.state) is False


def test_the_scheduler_reports_when_federated(hub: Hub, member: Site,
                                              make_site: t.Callable[..., Site]) -> None:
    scheduler = run_scheduler(member.app, prune_interval=3600)
    try:
        assert health.HEALTH_JOB_ID in {job.id for job in scheduler.get_jobs()}
        deadline = time.monotonic() + 15
        while hub_row(hub, member) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hub_row(hub, member) is not None
    finally:
        scheduler.shutdown()
    lone = run_scheduler(make_site().app, prune_interval=3600)
    try:
        assert health.HEALTH_JOB_ID not in {job.id for job in lone.get_jobs()}
    finally:
        lone.shutdown()


def test_workers_fetching_the_first_directory_at_once_all_get_it(member: Site) -> None:
    import threading

    from agent import federation

    state = member.state
    with state.session_factory() as db:
        db.query(FederationCache).delete()
        db.commit()
    barrier = threading.Barrier(6)
    results: list[t.Any] = []

    def fetch() -> None:
        barrier.wait()
        try:
            with state.session_factory() as db:
                results.append(federation.directory(db, state)["site"]["site_key"])
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    site_key = state.settings.hub_site_key
    assert results == [site_key] * 6
    with state.session_factory() as db:
        assert db.scalars(select(FederationCache.name)).all().count("directory") == 1
