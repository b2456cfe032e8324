"""The session lease: a worker answers a session check from a row it read within
``SESSION_LEASE_MS``, and every change that takes access away answers only after one lease, so
no other worker or instance accepts the token for a request sent after that answer.

Two apps on one database stand for two workers (each has its own engine and its own leases).
"""

from __future__ import annotations

import time
import typing as t

import pytest
from sqlalchemy import text

from agent.config import ConfigError
from tests.conftest import Site

LEASE_MS = 300  # long enough to tell a lease from a read on a loaded machine


def workers(make_site: t.Callable[..., Site], **settings: t.Any) -> tuple[Site, Site]:
    """Workers A and B of one site: one database, one secret, one issuer."""
    settings = {"HEADLESSKEY_SESSION_LEASE_MS": LEASE_MS,
                "HEADLESSKEY_ISSUER": "https://site.example", **settings}
    a = make_site(**settings)
    config = a.app.config
    b = make_site(**settings, HEADLESSKEY_DATABASE_URL=config["HEADLESSKEY_DATABASE_URL"],
                  HEADLESSKEY_SECRET_KEY=config["HEADLESSKEY_SECRET_KEY"])
    a.create_user("alice")
    return a, b


@pytest.fixture
def pair(make_site: t.Callable[..., Site]) -> tuple[Site, Site]:
    a, b = workers(make_site)
    a.create_user("root", roles=["administrator"])
    return a, b


def ok(site: Site, token: str) -> int:
    return site.api.get("/me", token=token).status_code


def revoke_behind_the_agents_back(site: Site, sid: str) -> None:
    with site.state.engine.begin() as conn:
        conn.execute(text("UPDATE hk_sessions SET revoked_at = CURRENT_TIMESTAMP WHERE id = :s"),
                      {"s": sid})


def test_a_logout_at_one_worker_is_refused_at_the_other_once_it_answers(
        pair: tuple[Site, Site]) -> None:
    a, b = pair
    login = a.api.login()
    assert ok(b, login["token"]) == 200  # B now holds a lease on the session's row
    started = time.monotonic()
    r = a.api.post("/token/revoke", token=login["token"])
    assert r.status_code == 200
    assert time.monotonic() - started >= LEASE_MS / 1000  # the answer waited out B's lease
    assert ok(b, login["token"]) == 401
    assert ok(a, login["token"]) == 401


def test_a_row_is_answered_from_for_one_lease_at_most(pair: tuple[Site, Site]) -> None:
    """A change made behind the agent's back (no wait) holds once the lease is over."""
    a, b = pair
    login = a.api.login()
    assert ok(b, login["token"]) == 200
    revoke_behind_the_agents_back(a, login["sid"])
    # Within the lease B may still answer from its row; A never read it.
    assert ok(a, login["token"]) == 401
    time.sleep(LEASE_MS / 1000)
    assert ok(b, login["token"]) == 401


def test_without_a_lease_every_request_reads_the_row(make_site: t.Callable[..., Site]) -> None:
    site = make_site(HEADLESSKEY_SESSION_LEASE_MS=0)
    site.create_user("alice")
    login = site.api.login()
    assert ok(site, login["token"]) == 200
    revoke_behind_the_agents_back(site, login["sid"])
    assert ok(site, login["token"]) == 401


def test_a_new_token_of_a_leased_session_is_read_again(pair: tuple[Site, Site]) -> None:
    """A lease never refuses: a token its row does not accept (refreshed since) reads again."""
    a, b = pair
    login = a.api.login()
    assert ok(b, login["token"]) == 200
    fresh = a.api.post("/token/refresh", json={"refresh_token": login["refresh_token"]})
    assert fresh.status_code == 200
    assert ok(b, fresh.json()["token"]) == 200
    assert ok(b, login["token"]) == 200  # the previous token, within the refresh grace


def test_with_no_refresh_grace_the_previous_token_ends_with_the_refresh(
        make_site: t.Callable[..., Site]) -> None:
    a, b = workers(make_site, HEADLESSKEY_REFRESH_GRACE=0)
    login = a.api.login()
    assert ok(b, login["token"]) == 200
    started = time.monotonic()
    fresh = a.api.post("/token/refresh", json={"refresh_token": login["refresh_token"]})
    assert fresh.status_code == 200
    assert time.monotonic() - started >= LEASE_MS / 1000
    assert ok(b, login["token"]) == 401
    assert ok(b, fresh.json()["token"]) == 200


def test_a_disabled_account_is_refused_everywhere_once_disabling_answers(
        pair: tuple[Site, Site]) -> None:
    a, b = pair
    alice, root = a.api.login(), a.api.login("root")
    assert ok(b, alice["token"]) == 200
    user_id = alice["user"]["ID"]
    r = a.api.post(f"/admin/users/{user_id}/disable", token=root["token"])
    assert r.status_code == 200, r.text
    assert ok(b, alice["token"]) == 401


def test_a_role_taken_away_holds_everywhere_once_the_change_answers(
        pair: tuple[Site, Site]) -> None:
    a, b = pair
    root = a.api.login("root")
    assert b.api.get("/admin/users", token=root["token"]).status_code == 200
    user_id = root["user"]["ID"]
    started = time.monotonic()
    r = a.api.request("PUT", f"/admin/users/{user_id}/roles", token=root["token"],
                      json={"roles": ["subscriber"]})
    assert r.status_code == 200, r.text
    assert time.monotonic() - started >= LEASE_MS / 1000
    assert b.api.get("/admin/users", token=root["token"]).status_code == 403
    assert ok(b, root["token"]) == 200  # still a valid session, without the role


@pytest.mark.parametrize("value", [-1, 1001, "soon", 1.5])
def test_the_lease_setting_is_checked(make_site: t.Callable[..., Site], value: t.Any) -> None:
    with pytest.raises(ConfigError, match="SESSION_LEASE_MS"):
        make_site(HEADLESSKEY_SESSION_LEASE_MS=value)


def test_a_role_given_holds_everywhere_once_the_change_answers(pair: tuple[Site, Site]) -> None:
    a, b = pair
    alice, root = a.api.login(), a.api.login("root")
    assert b.api.get("/admin/users", token=alice["token"]).status_code == 403
    user_id = alice["user"]["ID"]
    r = a.api.request("PUT", f"/admin/users/{user_id}/roles", token=root["token"],
                      json={"roles": ["administrator"]})
    assert r.status_code == 200, r.text
    assert b.api.get("/admin/users", token=alice["token"]).status_code == 200
