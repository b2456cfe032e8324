"""Logout everywhere (issue 5 item 6) across real processes: a hub and three agents A, B, C.

The agents run WITH their jobs process (``serve`` without ``--no-jobs``), which refreshes the
directory every ``HEADLESSKEY_DIRECTORY_REFRESH`` seconds (1 s here), so a logout recorded at
the hub reaches B without any SSO traffic. Each test uses usernames of its own.

``/token/revoke`` scopes, as Supabase Auth's: ``local`` ends this session only, ``others`` every
other session of the user at this site, ``global`` every session here and at every site where
the identity is linked.
"""

from __future__ import annotations

import time
import typing as t
from pathlib import Path

import pytest
import requests

from tests.conftest import PASSWORD
from tests.integration.test_sso import AGENT
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Federation
from tests.integration.test_sso import Service
from tests.integration.test_sso import db_time
from tests.integration.test_sso import exchange
from tests.integration.test_sso import issue
from tests.integration.test_sso import login
from tests.integration.test_sso import new_user

REFRESH = 1  # HEADLESSKEY_DIRECTORY_REFRESH, seconds
PROPAGATION_LIMIT = 10.0  # seconds: a few refresh intervals, with room for a loaded machine
SETTINGS = {
    "HEADLESSKEY_DIRECTORY_REFRESH": str(REFRESH),
    "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "1000",
    "HEADLESSKEY_LOCKOUT_MAX_FAILURES": "100",
}


class JobsAgent(Agent):
    """An agent served with its jobs process (the directory refresh runs there)."""

    def start(self) -> None:
        assert AGENT
        self.service = Service(
            [AGENT, "serve", "--instance", str(self.instance), "--port", str(self.port),
             "--workers", "2"],
            self.env, self.root / f"{self.name}.log", f"{self.base}/",
        )


class JobsFederation(Federation):
    def __init__(self, root: Path, names: list[str], settings: dict[str, str]) -> None:
        super().__init__(root, names, settings)
        self.agents = {name: JobsAgent(name, root, settings) for name in names}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Federation]:
    federation = JobsFederation.build(tmp_path_factory.mktemp("logout"), ["a", "b", "c"],
                                      **SETTINGS)
    try:
        yield federation
    finally:
        federation.stop()


def revoke(agent: Agent, token: str, **body: t.Any) -> requests.Response:
    return agent.post("/token/revoke", json={"token": token, **body})


def works(agent: Agent, token: str) -> bool:
    status = agent.get("/me", token=token).status_code
    assert status in (200, 401), status
    return status == 200


def continue_to(fed: Federation, token: str, src: str = "a", dst: str = "b") -> str:
    """Exchange an assertion of ``src`` at ``dst``; the access token at ``dst``."""
    r = exchange(fed[dst], issue(fed[src], token, fed[dst].site_key))
    assert r.status_code == 200, r.text
    return t.cast(str, r.json()["token"])


def hub_logouts(fed: Federation, subject: str | int | None = None) -> list[tuple[t.Any, ...]]:
    sql = "SELECT id, site_key, issuer, subject FROM hub_logouts"
    params: tuple[t.Any, ...] = ()
    if subject is not None:
        sql += " WHERE subject = ?"
        params = (str(subject),)
    return fed.hub.rows(sql, *params)


def wait_refused(agent: Agent, token: str, limit: float = PROPAGATION_LIMIT) -> float:
    """Poll ``/me`` until ``token`` is refused; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if not works(agent, token):
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{agent.name}: token still accepted after {limit}s\n"
                         f"{agent.service.logs()[-3000:] if agent.service else ''}")


def test_global_logout_ends_sessions_here_and_at_linked_sites(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    alice = new_user(a, "alice-global")
    second = login(a, "alice-global").token  # another device at A
    at_b = continue_to(fed, alice.token)
    assert works(b, at_b) and works(a, second)
    mark_b = b.last_audit_id()

    started = time.monotonic()
    r = revoke(a, alice.token, scope="global")
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "global" and r.json()["global"] is True
    assert not works(a, alice.token) and not works(a, second)  # every session at A, at once
    assert [(site, subject) for _, site, _, subject in hub_logouts(fed, alice.id)
            if site == a.site_key] == [(a.site_key, str(alice.id))]

    waited = wait_refused(b, at_b)
    total = time.monotonic() - started
    print(f"\nglobal logout reached B in {total:.2f}s (polled {waited:.2f}s, "
          f"DIRECTORY_REFRESH={REFRESH}s)")
    assert total < PROPAGATION_LIMIT
    applied = [e for e in b.audit("token.revoked", mark_b) if e["details"].get("scope") == "global"]
    assert len(applied) == 1, applied
    assert applied[0]["details"]["from"] == a.site_key and applied[0]["details"]["sessions"] == 1
    revoked_at_a = a.rows("SELECT revoke_reason FROM hk_sessions WHERE user_id = ?", alice.id)
    assert {reason for (reason,) in revoked_at_a} == {"global_logout"}

    # Logging in again afterwards works, here and at B: the logout ended only older sessions,
    # and it is applied once (several refreshes later the new sessions still work).
    again = login(a, "alice-global").token
    again_b = continue_to(fed, again)
    time.sleep(REFRESH * 3 + 0.5)
    assert works(a, again) and works(b, again_b)
    assert len([e for e in b.audit("token.revoked", mark_b)
                if e["details"].get("scope") == "global"]) == 1


def test_global_logout_follows_a_chain_of_links(fed: Federation) -> None:
    """Bob went from A to B, then from B to C: C knows him as B's user, not A's. A global
    logout at A still reaches C: B, ending the sessions of its linked account, passes the
    logout on for that account (its origin is A's logout), and C applies that."""
    a, b, c = fed["a"], fed["b"], fed["c"]
    bob = new_user(a, "bob-chain")
    at_b = continue_to(fed, bob.token)
    at_c = continue_to(fed, at_b, src="b", dst="c")
    assert works(b, at_b) and works(c, at_c)
    b_user = int(b.rows("SELECT user_id FROM hk_identity_links WHERE issuer = ? AND subject = ?",
                        a.issuer, str(bob.id))[0][0])

    started = time.monotonic()
    assert revoke(a, bob.token, scope="global").json()["global"] is True
    wait_refused(b, at_b)
    wait_refused(c, at_c)
    print(f"\nglobal logout reached C, two links away, in {time.monotonic() - started:.2f}s")
    rows = fed.hub.rows(
        "SELECT id, site_key, subject, origin_id FROM hub_logouts "
        "WHERE id = (SELECT max(id) FROM hub_logouts WHERE site_key = ? AND subject = ?) "
        "OR origin_id = (SELECT max(id) FROM hub_logouts WHERE site_key = ? AND subject = ?) "
        "ORDER BY id", a.site_key, str(bob.id), a.site_key, str(bob.id))
    first = rows[0][0]
    assert [(site, subject, origin) for _, site, subject, origin in rows][:2] == [
        (a.site_key, str(bob.id), None), (b.site_key, str(b_user), first)]
    # C passed it on too (someone may know C's account), once; nobody passes it on twice.
    assert {site for _, site, _, _ in rows} <= {a.site_key, b.site_key, c.site_key}
    assert len(rows) == len({site for _, site, _, _ in rows})
    # A new login at A and the way to C again work: only older sessions ended.
    again_b = continue_to(fed, login(a, "bob-chain").token)
    again_c = continue_to(fed, again_b, src="b", dst="c")
    time.sleep(REFRESH * 3 + 0.5)
    assert works(b, again_b) and works(c, again_c)


def test_local_logout_leaves_other_sessions_and_sites_alone(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    bob = new_user(a, "bob-local")
    other = login(a, "bob-local").token
    at_b = continue_to(fed, bob.token)
    r = revoke(a, bob.token)  # scope local is the default
    assert r.status_code == 200 and r.json()["scope"] == "local"
    assert "global" not in r.json()
    assert not works(a, bob.token)
    r = revoke(a, other, scope="local")
    assert r.status_code == 200 and not works(a, other)
    time.sleep(REFRESH * 3 + 0.5)  # several directory refreshes
    assert works(b, at_b)
    assert hub_logouts(fed, bob.id) == []


def test_others_ends_every_other_session_and_keeps_this_one(fed: Federation) -> None:
    a, b = fed["a"], fed["b"]
    carol = new_user(a, "carol-others")
    second = login(a, "carol-others").token
    third = login(a, "carol-others").token
    at_b = continue_to(fed, carol.token)
    r = revoke(a, carol.token, scope="others")
    assert r.status_code == 200 and r.json()["scope"] == "others", r.text
    assert works(a, carol.token)
    assert not works(a, second) and not works(a, third)
    reasons = a.rows("SELECT revoke_reason FROM hk_sessions WHERE user_id = ? "
                     "AND revoked_at IS NOT NULL", carol.id)
    assert sorted(r for (r,) in reasons) == ["revoked_others", "revoked_others"]
    time.sleep(REFRESH * 2 + 0.5)
    assert works(b, at_b)  # others is this site only
    assert hub_logouts(fed, carol.id) == []


INVALID_SCOPES = ["everywhere", "", "GLOBAL", 1, None, ["global"]]


@pytest.mark.parametrize("n", range(len(INVALID_SCOPES)))
def test_an_invalid_scope_is_refused(fed: Federation, n: int) -> None:
    a, scope = fed["a"], INVALID_SCOPES[n]
    dave = new_user(a, f"dave-scope-{n}")  # one user per case: no two cases share a name
    r = revoke(a, dave.token, scope=scope)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    assert works(a, dave.token)  # nothing ended


def test_invalid_scope_in_the_query_string_is_refused(fed: Federation) -> None:
    a = fed["a"]
    r = a.post("/token/revoke?scope=all", json={"token": "whatever"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"


def test_global_with_a_garbage_or_ended_token_is_a_quiet_200(fed: Federation) -> None:
    a = fed["a"]
    before = len(hub_logouts(fed))
    for token in ("garbage", "eyJhbGciOiJFUzI1NiJ9.e30.AAAA", ""):
        r = revoke(a, token, scope="global")
        assert r.status_code == 200, r.text
        assert r.json()["scope"] == "global" and r.json()["global"] is False
    erin = new_user(a, "erin-ended")
    assert revoke(a, erin.token).status_code == 200  # ended locally first
    r = revoke(a, erin.token, scope="global")
    assert r.status_code == 200 and r.json()["global"] is False
    assert len(hub_logouts(fed)) == before


def test_others_and_global_need_the_access_token(fed: Federation) -> None:
    a = fed["a"]
    new_user(a, "frank-refresh")
    body = a.post("/token", json={"username": "frank-refresh", "password": PASSWORD})
    assert body.status_code == 200, body.text
    refresh = body.json()["refresh_token"]
    for scope in ("others", "global"):
        r = a.post("/token/revoke", json={"refresh_token": refresh, "scope": scope})
        assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    assert works(a, body.json()["token"])


def test_an_admin_logout_in_the_hub_ends_sessions_at_the_site_and_linked_sites(
        fed: Federation) -> None:
    """The console records a row for (site A's issuer, user id at A); A itself and B apply it."""
    a, b = fed["a"], fed["b"]
    gina = new_user(a, "gina-admin")
    at_b = continue_to(fed, gina.token)
    issuer = fed.hub.rows("SELECT issuer FROM hub_sites WHERE site_key = ?", a.site_key)[0][0]
    # What hub.services.logouts.record writes for the console form (tests/hub covers the form).
    fed.hub.store.write(
        "INSERT INTO hub_logouts (created_at, site_key, issuer, subject, expires_at) "
        "VALUES (?, ?, ?, ?, ?)", db_time(0), a.site_key, issuer, str(gina.id), db_time(-86400))
    waited_a = wait_refused(a, gina.token)
    waited_b = wait_refused(b, at_b)
    print(f"\nadmin logout reached A in {waited_a:.2f}s, B in {waited_a + waited_b:.2f}s")
    assert works(a, login(a, "gina-admin").token)  # a new login afterwards works
