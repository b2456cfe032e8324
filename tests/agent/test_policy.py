"""The site policy from the agent's side: a member agent applies what its hub's directory
carries, keeps pinned keys, refuses a bad policy (keeping the last good one) and says so to the
hub, redelivers webhook messages on request once, and a site with no hub is unaffected.

Real HTTP: a hub served by ``make_hub`` and a member agent by ``make_site``; the directory is
fetched by moving the agent's clock past the refresh interval.
"""

from __future__ import annotations

import datetime as dt
import typing as t
from pathlib import Path

import pytest
from sqlalchemy import select

from agent import federation
from agent import health
from agent import policy
from agent.models import WebhookMessage
from hub.models import Site as HubSite
from hub.models import SiteHealth
from hub.models import SitePolicy
from hub.services import policies
from tests.agent.test_health import member_site
from tests.conftest import Site
from tests.conftest import lifetime
from tests.hub.conftest import Hub
from tests.hub.conftest import make_hub  # noqa: F401  (the fixture)


@pytest.fixture
def hub(make_hub: t.Callable[..., Hub]) -> Hub:  # noqa: F811
    return make_hub()


def join(hub: Hub, make_site: t.Callable[..., Site], tmp_path: Path, name: str = "Shop") -> Site:
    site_key, secret = hub.add_site(name, f"https://{name.lower()}.example.com")
    return member_site(make_site, tmp_path, hub.url, site_key, secret)


def set_policy(hub: Hub, site: Site, changes: dict[str, t.Any]) -> int:
    with hub.app.app_context(), hub.state.session_factory() as db:
        hub_site = db.scalar(select(HubSite).where(
            HubSite.site_key == site.state.settings.hub_site_key))
        row = policies.save(db, hub.state, hub_site, changes, actor="test")
        db.commit()
        assert row is not None
        return row.version


def refresh(site: Site) -> None:
    """A directory fetch, as the jobs process makes it when the refresh is due."""
    site.clock.advance(61)
    with site.app.app_context(), site.state.session_factory() as db:
        federation.directory(db, site.state)


def login_expires_in(site: Site) -> int:
    return int(site.api.login()["expires_in"])


def test_the_policy_applies_without_a_restart(hub: Hub, make_site: t.Callable[..., Site],
                                              tmp_path: Path) -> None:
    site = join(hub, make_site, tmp_path)
    site.create_user("alice")
    assert login_expires_in(site) in lifetime(900)
    version = set_policy(hub, site, {"ACCESS_TOKEN_TTL": 120, "MAX_SESSIONS": 3})
    refresh(site)
    assert login_expires_in(site) in lifetime(120)
    assert site.state.settings.max_sessions == 3
    with site.app.app_context():
        assert policy.report(site.state) == {"policy_version": version,
                                             "pinned": ["ALGORITHM"], "policy_error": None}
    # Back to the site's own value when the hub unsets it.
    set_policy(hub, site, {"ACCESS_TOKEN_TTL": None})
    refresh(site)
    assert login_expires_in(site) in lifetime(900)
    assert site.state.settings.max_sessions == 3


def test_pinned_keys_keep_the_sites_value(hub: Hub, make_site: t.Callable[..., Site],
                                          tmp_path: Path) -> None:
    site_key, secret = hub.add_site("Docs", "https://docs.example.com")
    site = member_site_with(make_site, tmp_path, hub, site_key, secret,
                            HEADLESSKEY_ACCESS_TOKEN_TTL=600)
    site.create_user("alice")
    set_policy(hub, site, {"ACCESS_TOKEN_TTL": 120, "REGISTRATION": "closed"})
    refresh(site)
    assert login_expires_in(site) in lifetime(600)
    assert site.state.settings.registration == "closed"
    assert health.report(site.state)
    with hub.state.session_factory() as db:
        row = db.scalar(select(SiteHealth))
        assert row is not None and row.pinned == ["ACCESS_TOKEN_TTL", "ALGORITHM"]


def member_site_with(make_site: t.Callable[..., Site], tmp_path: Path, hub: Hub, site_key: str,
                     secret: str, **settings: t.Any) -> Site:
    from agent.services.keys import generate_private_key_pem

    secret_file = tmp_path / f"{site_key}-secret.key"
    secret_file.write_text(secret + "\n")
    key_file = tmp_path / f"{site_key}-federation.pem"
    key_file.write_bytes(generate_private_key_pem("ES256"))
    return make_site(HEADLESSKEY_HUB_URL=hub.url, HEADLESSKEY_HUB_SITE_KEY=site_key,
                     HEADLESSKEY_HUB_SECRET_FILE=str(secret_file),
                     HEADLESSKEY_FEDERATION_KEY_FILE=str(key_file), **settings)


def test_a_bad_policy_is_refused_and_reported(hub: Hub, make_site: t.Callable[..., Site],
                                              tmp_path: Path) -> None:
    site = join(hub, make_site, tmp_path)
    site.create_user("alice")
    good = set_policy(hub, site, {"ACCESS_TOKEN_TTL": 300})
    refresh(site)
    # A version the agent's rules refuse (as from a hub of another release): stored directly.
    with hub.state.session_factory() as db:
        hub_site = db.scalar(select(HubSite))
        assert hub_site is not None
        db.add(SitePolicy(site_id=hub_site.id, version=good + 1, settings={"ACCESS_TOKEN_TTL": 5,
                                                                "LOCKOUT_WINDOW": "soon"},
                          created_at=dt.datetime.now(dt.UTC), created_by="test", note=""))
        db.commit()
    refresh(site)
    assert login_expires_in(site) in lifetime(300)  # the last good version stays in force
    with site.app.app_context():
        reported = policy.report(site.state)
    assert reported["policy_version"] == good
    assert reported["policy_error"]["version"] == good + 1
    assert set(reported["policy_error"]["errors"]) == {"ACCESS_TOKEN_TTL", "LOCKOUT_WINDOW"}
    assert health.report(site.state)
    with hub.state.session_factory() as db:
        row = db.scalar(select(SiteHealth))
        assert row is not None and row.policy_version == good
        assert row.policy_error is not None and row.policy_error["version"] == good + 1
    fixed = set_policy(hub, site, {"ACCESS_TOKEN_TTL": 200, "LOCKOUT_WINDOW": None})
    refresh(site)
    assert login_expires_in(site) in lifetime(200)
    with site.app.app_context():
        assert policy.report(site.state)["policy_error"] is None
        assert policy.report(site.state)["policy_version"] == fixed


@pytest.mark.parametrize(("own", "changes", "field"), [
    # The site's default role (its own, or the built-in subscriber) is the policy's admin role.
    ({}, {"ACCESS": {"admin": ["subscriber"]}}, "DEFAULT_ROLE"),
    ({"HEADLESSKEY_DEFAULT_ROLE": "editor"}, {"ACCESS": {"admin": ["editor"]}}, "DEFAULT_ROLE"),
], ids=["built-in default role", "pinned default role"])
def test_a_policy_that_conflicts_with_pinned_values_is_refused_and_reported(
        hub: Hub, make_site: t.Callable[..., Site], tmp_path: Path, own: dict[str, t.Any],
        changes: dict[str, t.Any], field: str) -> None:
    """Each key passes the hub's checks, but over the site's own values the settings do not
    hold together: the last good version stays in force and the refusal is reported (such a
    version was stored and reported as applied, while the site fell back to its own
    configuration alone)."""
    site_key, secret = hub.add_site("Docs", "https://docs.example.com")
    site = member_site_with(make_site, tmp_path, hub, site_key, secret, **own)
    site.create_user("alice")
    good = set_policy(hub, site, {"ACCESS_TOKEN_TTL": 300})
    refresh(site)
    assert login_expires_in(site) in lifetime(300)
    bad = set_policy(hub, site, {"ACCESS_TOKEN_TTL": 120, **changes})
    refresh(site)
    assert login_expires_in(site) in lifetime(300)  # the last good version stays in force
    with site.app.app_context():
        reported = policy.report(site.state)
    assert reported["policy_version"] == good
    assert reported["policy_error"]["version"] == bad
    assert field in reported["policy_error"]["errors"], reported
    fixed = set_policy(hub, site, {key: None for key in changes})
    refresh(site)
    assert login_expires_in(site) in lifetime(120)
    with site.app.app_context():
        assert policy.report(site.state)["policy_error"] is None
        assert policy.report(site.state)["policy_version"] == fixed


def test_webhooks_from_the_hub_and_redelivery_once(hub: Hub, make_site: t.Callable[..., Site],
                                                   tmp_path: Path) -> None:
    site = join(hub, make_site, tmp_path)
    with hub.app.app_context(), hub.state.session_factory() as db:
        hub_site = db.scalar(select(HubSite))
        assert hub_site is not None
        _row, secret = policies.add_webhook(db, hub.state, hub_site, "https://hooks.example.com",
                                            ["login.failed"], actor="test")
        db.commit()
    refresh(site)
    (endpoint,) = site.state.settings.webhooks
    assert endpoint.secret == secret and endpoint.events == frozenset({"login.failed"})
    now = site.clock()
    with site.db() as db:
        db.add(WebhookMessage(message_id="msg_dead", endpoint=endpoint.id, event="login.failed",
                              body="{}", created_at=now, status="dead", attempts=8,
                              next_attempt_at=now))
        db.commit()
    with hub.app.app_context(), hub.state.session_factory() as db:
        hub_site = db.scalar(select(HubSite))
        assert hub_site is not None
        policies.request_redelivery(db, hub.state, hub_site, "msg_dead", actor="test")
        db.commit()
    refresh(site)
    assert site.scalar("SELECT status FROM hk_webhook_outbox") == "pending"
    with site.db() as db:  # delivered since; a later refresh must not queue it again
        db.query(WebhookMessage).update({"status": "delivered", "delivered_at": now})
        db.commit()
    refresh(site)
    assert site.scalar("SELECT status FROM hk_webhook_outbox") == "delivered"
    with site.app.app_context(), site.state.session_factory() as db:
        (logged,) = health.webhooks.delivery_log(db)
    assert logged["message_id"] == "msg_dead" and logged["status"] == "delivered"


def test_a_site_without_a_hub_reads_its_own_configuration(
        make_site: t.Callable[..., Site]) -> None:
    site = make_site(HEADLESSKEY_ACCESS_TOKEN_TTL=450)
    assert site.state.settings is site.state.base_settings
    site.create_user("alice")
    assert login_expires_in(site) in lifetime(450)
