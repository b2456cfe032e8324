"""Checklist section 6: the session and token lifecycle, over HTTP against real processes.

Refresh rotation and reuse detection, the grace window for parallel refreshes (threads against
two gunicorn workers), absolute and inactivity lifetimes, revocation, logout, password changes,
the device limit, disabled users and the administrator's kill-switch. Most tests run at every
site of the fleet (HS256, RS256, ES256); the device limit needs sites of its own.

Time is moved by ageing rows of the site's SQLite database (a rotation that happened 11 s ago, a
session past its absolute end), never by sleeping.
"""

from __future__ import annotations

import threading
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import PASSWORD
from tests.integration.test_sso import AGENT
from tests.integration.test_sso import Agent
from tests.integration.test_sso import db_time
from tests.integration.test_sso import run
from tests.security.conftest import Fleet
from tests.security.conftest import fresh_user

GRACE = 10  # the agents' default HEADLESSKEY_REFRESH_GRACE, seconds
NEW_PASSWORD = "violet canyon under moonlight"  # noqa: S105 - a test account's password
TOKEN_FIELDS = ("token", "access_token", "refresh_token")


# --- helpers ---------------------------------------------------------------------------------


def login_pair(agent: Agent, username: str, password: str = PASSWORD,
               session: requests.Session | None = None) -> dict[str, t.Any]:
    """A login's whole answer: access token, refresh token, ``sid``."""
    r = agent.post("/token", json={"username": username, "password": password}, session=session)
    assert r.status_code == 200, r.text
    body = t.cast(dict[str, t.Any], r.json())
    assert body["refresh_token"].startswith("hkr_") and body["sid"]
    return body


def new_account(agent: Agent, prefix: str = "s") -> tuple[str, dict[str, t.Any]]:
    """A fresh user at ``agent`` and its first session (the whole login answer)."""
    user = fresh_user(agent, prefix)
    return user.username, login_pair(agent, user.username)


def refresh(agent: Agent, refresh_token: str,
            session: requests.Session | None = None) -> requests.Response:
    return agent.post("/token/refresh", json={"refresh_token": refresh_token}, session=session)


def valid(agent: Agent, token: str) -> bool:
    """Does ``/token/validate`` accept ``token``? (Only 200 or 401 are acceptable answers.)"""
    r = agent.post("/token/validate", token=token)
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


def assert_no_tokens(r: requests.Response) -> None:
    body = r.json()
    assert not any(field in body for field in TOKEN_FIELDS), r.text
    assert "set-cookie" not in {k.lower() for k in r.headers}, r.headers


def assert_rejected(r: requests.Response, status: int, code: str) -> None:
    """A refusal: the status and generic code, no token in the body, no cookie."""
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.json()["code"] == code, r.text
    assert_no_tokens(r)


def session_row(agent: Agent, sid: str) -> tuple[t.Any, ...]:
    ((revoked_at, reason, expires_at),) = agent.rows(
        "SELECT revoked_at, revoke_reason, expires_at FROM hk_sessions WHERE id = ?", sid)
    return revoked_at, reason, expires_at


def age_rotation(agent: Agent, sid: str, seconds: float) -> None:
    """Pretend the session's last rotation (and every use of its refresh tokens) was earlier."""
    assert agent.write("UPDATE hk_sessions SET rotated_at = ? WHERE id = ?",
                       db_time(seconds), sid) == 1
    assert agent.write("UPDATE hk_refresh_tokens SET used_at = ? "
                       "WHERE session_id = ? AND used_at IS NOT NULL",
                       db_time(seconds), sid) >= 1


def create_admin(agent: Agent) -> str:
    """An administrator of ``agent`` (a new account given the role in the users table, as an
    operator would); returns an access token of a session begun after that."""
    user = fresh_user(agent, "admin")
    assert agent.write("UPDATE hk_users SET roles = ? WHERE id = ?", '["administrator"]',
                       user.id) == 1
    return t.cast(str, login_pair(agent, user.username)["token"])


# --- S-01 .. S-05: refresh -------------------------------------------------------------------


@pytest.mark.case("S-01")
def test_S01_refresh_rotates_and_the_old_token_is_spent(agent: Agent) -> None:
    """A refresh hands out a new pair; once the grace window has passed the old refresh token
    is refused, and the previous access token no longer validates."""
    _, first = new_account(agent)
    r = refresh(agent, first["refresh_token"])
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store" and r.headers["Pragma"] == "no-cache"
    second = r.json()
    assert second["refresh_token"].startswith("hkr_")
    assert second["refresh_token"] != first["refresh_token"]
    assert second["token"] != first["token"] and second["jti"] != first["jti"]
    assert second["sid"] == first["sid"]
    assert valid(agent, second["token"])

    age_rotation(agent, first["sid"], GRACE + 1)
    assert not valid(agent, first["token"])  # the previous access token: past its grace
    assert valid(agent, second["token"])  # the current one is untouched
    assert_rejected(refresh(agent, first["refresh_token"]), 400, "refresh_token_reused")


@pytest.mark.case("S-02")
def test_S02_reuse_of_an_old_refresh_token_ends_the_whole_family(agent: Agent) -> None:
    """RT1 -> RT2 -> RT3 -> RT4, then RT1 again: refused as reuse, and RT4 and the newest
    access token die with the session."""
    _, pair = new_account(agent)
    rt1 = pair["refresh_token"]
    chain = [pair]
    for _ in range(3):
        r = refresh(agent, chain[-1]["refresh_token"])
        assert r.status_code == 200, r.text
        chain.append(r.json())
    latest = chain[-1]
    assert valid(agent, latest["token"])
    mark = agent.last_audit_id()

    assert_rejected(refresh(agent, rt1), 400, "refresh_token_reused")

    assert_rejected(refresh(agent, latest["refresh_token"]), 400, "invalid_grant")
    assert not valid(agent, latest["token"])
    assert agent.get("/me", token=latest["token"]).status_code == 401
    revoked_at, reason, _ = session_row(agent, pair["sid"])
    assert revoked_at is not None and reason == "refresh_reuse"
    reuse = agent.audit("token.reuse_detected", mark)
    assert [(row["outcome"]) for row in reuse] == ["blocked"], reuse


@pytest.mark.case("S-03")
def test_S03_parallel_refreshes_share_one_rotation(agent: Agent) -> None:
    """Eight parallel refreshes of one token (two workers): one rotation, every caller gets the
    same child pair; outside the documented grace window the same token is reuse (S-02)."""
    _, pair = new_account(agent)
    n = 8
    barrier = threading.Barrier(n)

    def attempt(_: int) -> requests.Response:
        with requests.Session() as http:
            barrier.wait(10)
            return refresh(agent, pair["refresh_token"], session=http)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(attempt, range(n)))
    assert [r.status_code for r in answers] == [200] * n, [(r.status_code, r.text[:80])
                                                          for r in answers]
    bodies = [r.json() for r in answers]
    assert len({b["refresh_token"] for b in bodies}) == 1
    assert len({b["jti"] for b in bodies}) == 1 and len({b["sid"] for b in bodies}) == 1
    generations = agent.rows("SELECT generation, used_at IS NOT NULL FROM hk_refresh_tokens "
                             "WHERE session_id = ? ORDER BY generation", pair["sid"])
    assert generations == [(0, 1), (1, 0)], generations  # exactly one rotation happened
    child = bodies[0]
    assert valid(agent, child["token"])

    # Outside the window, the same old token is theft: the session ends.
    age_rotation(agent, pair["sid"], GRACE + 1)
    assert_rejected(refresh(agent, pair["refresh_token"]), 400, "refresh_token_reused")
    assert not valid(agent, child["token"])
    assert_rejected(refresh(agent, child["refresh_token"]), 400, "invalid_grant")


@pytest.mark.case("S-02", "S-03")
def test_S02_parallel_reuse_after_the_child_was_used_is_refused_everywhere(agent: Agent) -> None:
    """Once the child has been used, parallel replays of the parent all fail (no 500), and the
    session is ended."""
    _, pair = new_account(agent)
    child = refresh(agent, pair["refresh_token"]).json()
    grandchild = refresh(agent, child["refresh_token"])
    assert grandchild.status_code == 200, grandchild.text
    n = 6
    barrier = threading.Barrier(n)

    def attempt(_: int) -> requests.Response:
        with requests.Session() as http:
            barrier.wait(10)
            return refresh(agent, pair["refresh_token"], session=http)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(attempt, range(n)))
    for r in answers:
        assert r.status_code == 400, r.text
        assert r.json()["code"] in ("refresh_token_reused", "invalid_grant"), r.text
        assert_no_tokens(r)
    assert any(r.json()["code"] == "refresh_token_reused" for r in answers)
    assert not valid(agent, grandchild.json()["token"])


@pytest.mark.case("S-04")
def test_S04_absolute_lifetime_and_inactivity_end_the_session(agent: Agent) -> None:
    """Refreshing never extends a session's absolute end; past it, the refresh is
    ``session_expired`` and the access token is refused; a refresh token unused past its
    inactivity lifetime is ``session_expired`` too."""
    _, pair = new_account(agent)
    _, _, expires_before = session_row(agent, pair["sid"])
    r = refresh(agent, pair["refresh_token"])
    assert r.status_code == 200, r.text
    current = r.json()
    assert session_row(agent, pair["sid"])[2] == expires_before  # refresh does not extend it

    # The absolute end has passed, as if the session had begun 30 days ago.
    assert agent.write("UPDATE hk_sessions SET expires_at = ? WHERE id = ?",
                       db_time(1), pair["sid"]) == 1
    assert_rejected(refresh(agent, current["refresh_token"]), 400, "session_expired")
    assert not valid(agent, current["token"])

    # Inactivity: the newest refresh token outlived its own lifetime, the session did not.
    idle_user, other = new_account(agent)
    assert agent.write("UPDATE hk_refresh_tokens SET expires_at = ? WHERE session_id = ?",
                       db_time(1), other["sid"]) == 1
    assert_rejected(refresh(agent, other["refresh_token"]), 400, "session_expired")
    # Re-login works.
    assert valid(agent, login_pair(agent, idle_user)["token"])


@pytest.mark.case("S-05")
def test_S05_refresh_and_access_tokens_are_bound_to_their_site(fleet: Fleet) -> None:
    """A refresh token (and an access token) of one site is refused by every other site, and
    still works at home afterwards."""
    for home in fleet.agents:
        _, pair = new_account(home)
        for other in fleet.agents:
            if other is home:
                continue
            assert_rejected(refresh(other, pair["refresh_token"]), 400, "invalid_grant")
            assert not valid(other, pair["token"])
        assert valid(home, pair["token"])
        assert refresh(home, pair["refresh_token"]).status_code == 200


# --- S-06 .. S-09: revoke and logout ---------------------------------------------------------


REVOKED = {"success": True, "code": "jwt_auth_token_revoked", "message": "Token revoked.",
           "scope": "local"}


@pytest.mark.case("S-06", "S-09")
def test_S06_S09_revoking_the_access_token_logs_the_session_out(agent: Agent) -> None:
    """``/token/revoke`` with the bearer token: 200; then the access token is refused on every
    route and the session's refresh token is refused; another session of the user lives on."""
    username, pair = new_account(agent)
    other = login_pair(agent, username)
    r = agent.post("/token/revoke", token=pair["token"])
    assert r.status_code == 200, r.text
    assert r.json() == REVOKED
    assert not valid(agent, pair["token"])
    for method, path in (("GET", "/me"), ("GET", "/sessions"), ("POST", "/sso/issue")):
        assert agent.request(method, path, token=pair["token"]).status_code == 401, path
    assert_rejected(refresh(agent, pair["refresh_token"]), 400, "invalid_grant")
    assert session_row(agent, pair["sid"])[1] == "revoked"
    assert valid(agent, other["token"])  # only the one session ended


@pytest.mark.case("S-07")
def test_S07_revoke_is_quiet_and_touches_nobody_else(agent: Agent) -> None:
    """Garbage, an already revoked token, a forged copy of a victim's token, and an attacker's
    scopes all get the same 200 answer; the victim's session is untouched."""
    _, victim = new_account(agent, "victim")
    _, attacker = new_account(agent, "mallory")
    gone = login_pair(agent, attacker["user"]["user_login"])
    assert agent.post("/token/revoke", token=gone["token"]).status_code == 200
    signing_input, signature = victim["token"].rsplit(".", 1)
    forged = signing_input + "." + signature[::-1]  # the victim's token, signature broken
    attempts = [
        {"json": {"token": "garbage"}},
        {"json": {"refresh_token": "hkr_" + "A" * 43}},
        {"json": {"token": gone["token"]}},
        {"json": {"token": gone["refresh_token"]}},
        {"json": {"token": forged}},
        {"json": {"token": forged}, "token": attacker["token"]},
        {"json": {"scope": "others"}, "token": attacker["token"]},
    ]
    for kw in attempts:
        r = agent.post("/token/revoke", **kw)
        assert r.status_code == 200, (kw, r.text)
        scope = {"scope": "others"} if kw["json"].get("scope") else {}
        assert r.json() == REVOKED | scope, r.text
    # Naming the victim's session is not the attacker's right either: same 404 as an unknown one.
    theirs = agent.request("DELETE", f"/sessions/{victim['sid']}", token=attacker["token"])
    unknown = agent.request("DELETE", "/sessions/no-such-session", token=attacker["token"])
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()
    assert valid(agent, victim["token"])
    assert refresh(agent, victim["refresh_token"]).status_code == 200
    assert session_row(agent, victim["sid"])[0] is None


@pytest.mark.case("S-08")
def test_S08_revoking_the_refresh_token_ends_its_access_tokens(agent: Agent) -> None:
    """Revoking by refresh token ends the session: its access token stops validating at once."""
    _, pair = new_account(agent)
    assert valid(agent, pair["token"])
    r = agent.post("/token/revoke", json={"refresh_token": pair["refresh_token"]})
    assert r.status_code == 200 and r.json() == REVOKED, r.text
    assert not valid(agent, pair["token"])
    assert_rejected(refresh(agent, pair["refresh_token"]), 400, "invalid_grant")


@pytest.mark.case("S-09")
def test_S09_ending_a_device_from_the_sessions_list(agent: Agent) -> None:
    """``DELETE /sessions/{id}`` of one's own other device: that device's tokens are refused,
    the calling session keeps working."""
    username, lost = new_account(agent)
    here = login_pair(agent, username)
    listed = agent.get("/sessions", token=here["token"]).json()["sessions"]
    assert {s["id"] for s in listed} >= {lost["sid"], here["sid"]}
    r = agent.request("DELETE", f"/sessions/{lost['sid']}", token=here["token"])
    assert r.status_code == 200, r.text
    assert not valid(agent, lost["token"])
    assert_rejected(refresh(agent, lost["refresh_token"]), 400, "invalid_grant")
    assert valid(agent, here["token"])


# --- S-10 .. S-12: password changes and re-authentication ------------------------------------


def throttle_failures(agent: Agent, user_id: int) -> int:
    counter = agent.counter(f"u:{user_id}")
    return counter[0] if counter else 0


@pytest.mark.case("S-10")
def test_S10_change_password_requires_the_current_one(agent: Agent) -> None:
    """Without, or with a wrong, current password: 400, the password is unchanged, no session
    ends, and each wrong guess counts toward the account's lockout."""
    username, pair = new_account(agent)
    user_id = pair["user"]["ID"]
    before = agent.rows("SELECT password_hash FROM hk_users WHERE id = ?", user_id)
    failures = throttle_failures(agent, user_id)
    mark = agent.last_audit_id()
    missing = agent.post("/change-password", token=pair["token"],
                         json={"new_password": NEW_PASSWORD})
    assert missing.status_code == 400 and missing.json()["code"] == "invalid_request", missing.text
    wrong = agent.post("/change-password", token=pair["token"],
                       json={"current_password": PASSWORD + "x", "new_password": NEW_PASSWORD})
    assert_rejected(wrong, 400, "incorrect_password")
    # Without a token at all: 401.
    anonymous = agent.post("/change-password", json={"current_password": PASSWORD,
                                                      "new_password": NEW_PASSWORD})
    assert_rejected(anonymous, 401, "unauthorized")

    assert agent.rows("SELECT password_hash FROM hk_users WHERE id = ?", user_id) == before
    assert throttle_failures(agent, user_id) == failures + 1
    assert [row["outcome"] for row in agent.audit("password.changed", mark)] == ["failure"]
    assert valid(agent, pair["token"])
    bad = agent.post("/token", json={"username": username, "password": NEW_PASSWORD})
    assert bad.status_code == 401
    login_pair(agent, username)  # the old password still logs in


@pytest.mark.case("S-11")
def test_S11_change_password_ends_the_other_sessions(fleet: Fleet, agent: Agent) -> None:
    """Sessions S1 and S2; changing the password from S1 keeps S1 (it can refresh) and ends S2
    (refresh and access refused); the owner is mailed a notice."""
    username, s1 = new_account(agent)
    s2 = login_pair(agent, username)
    r = agent.post("/change-password", token=s1["token"],
                   json={"current_password": PASSWORD, "new_password": NEW_PASSWORD})
    assert r.status_code == 200, r.text
    assert r.json()["sessions_ended"] == 2  # S2, and the session fresh_user opened
    assert_no_tokens(r)

    assert valid(agent, s1["token"])
    assert refresh(agent, s1["refresh_token"]).status_code == 200
    assert_rejected(refresh(agent, s2["refresh_token"]), 400, "invalid_grant")
    assert not valid(agent, s2["token"])
    fleet.mail.wait_for(s1["user"]["user_email"])
    login_pair(agent, username, NEW_PASSWORD)


@pytest.mark.case("S-12")
def test_S12_no_route_changes_email_or_mfa(agent: Agent) -> None:
    """S-12 asks that email and MFA changes need re-authentication. The only account change an
    access token can make is the password, which needs the current one (S-10); there is no
    route to change the email and no MFA."""
    _, pair = new_account(agent)
    for method in ("POST", "PUT", "PATCH"):
        r = agent.request(method, "/me", token=pair["token"], json={"email": "x@example.com"})
        assert r.status_code in (404, 405), (method, r.status_code, r.text)
    spec = agent.get("/openapi.json").json()
    paths = " ".join(spec.get("paths", {}))
    assert "email" not in paths and "mfa" not in paths.lower(), paths
    assert agent.rows("SELECT email FROM hk_users WHERE id = ?", pair["user"]["ID"]) == [
        (pair["user"]["user_email"],)]
    pytest.skip("no endpoint changes a user's email or MFA settings (there is no MFA); the one "
                "sensitive change, /change-password, requires the current password (S-10)")


# --- S-13: the device limit (sites of their own) ---------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[dict[str, Agent]]:
    """Two standalone sites with ``MAX_SESSIONS = 2``: ``evict`` (evict_oldest) and ``reject``."""
    root: Path = tmp_path_factory.mktemp("session-limit")
    common = {"HEADLESSKEY_MAX_SESSIONS": "2", "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "10000"}
    agents = {
        "evict": Agent("evict", root, {**common,
                                       "HEADLESSKEY_SESSION_LIMIT_POLICY": "evict_oldest"}),
        "reject": Agent("reject", root, {**common, "HEADLESSKEY_SESSION_LIMIT_POLICY": "reject"}),
    }
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda a: a.init(), agents.values()))
        for site in agents.values():
            site.start()
        for site in agents.values():
            assert site.service is not None
            site.service.wait_ready()
        yield agents
    finally:
        for site in agents.values():  # stop both at once, then wait for each
            if site.service is not None:
                site.service.terminate()
        for site in agents.values():
            site.stop()


@pytest.mark.case("S-13")
def test_S13_evict_oldest_ends_the_oldest_session(limited: dict[str, Agent]) -> None:
    """Limit 2, policy evict_oldest: the third login ends the first session (refresh
    ``invalid_grant``, access refused) and keeps the second and third."""
    site = limited["evict"]
    username, first = new_account(site)  # fresh_user logs in once too: that is the oldest
    second = login_pair(site, username)
    third = login_pair(site, username)
    assert valid(site, second["token"]) and valid(site, third["token"])
    assert not valid(site, first["token"])
    assert_rejected(refresh(site, first["refresh_token"]), 400, "invalid_grant")
    live = site.rows("SELECT count(*) FROM hk_sessions WHERE user_id = ? AND revoked_at IS NULL",
                     third["user"]["ID"])
    assert live == [(2,)]
    assert refresh(site, second["refresh_token"]).status_code == 200


@pytest.mark.case("S-13")
def test_S13_reject_policy_refuses_the_extra_login(limited: dict[str, Agent]) -> None:
    """Limit 2, policy reject: the login over the limit is ``403 session_limit_reached`` with no
    tokens; after one logout the next login works."""
    site = limited["reject"]
    user = fresh_user(site, "r")  # session 1
    second = login_pair(site, user.username)  # session 2
    over = site.post("/token", json={"username": user.username, "password": PASSWORD})
    assert_rejected(over, 403, "session_limit_reached")
    assert valid(site, user.token) and valid(site, second["token"])
    assert site.post("/token/revoke", token=second["token"]).status_code == 200
    login_pair(site, user.username)


# --- S-14, S-15: an administrator's hand ---------------------------------------------------


@pytest.mark.case("S-14")
def test_S14_a_disabled_user_is_locked_out_at_once(agent: Agent) -> None:
    """An administrator disables an account (``POST /admin/users/{id}/disable``): its access and
    refresh tokens are refused at once, on every worker, and it cannot log in (the answer of a
    wrong password); a non-administrator cannot do it. Enabled again, it can log in, while the
    old sessions stay ended."""
    admin = create_admin(agent)
    username, pair = new_account(agent)
    user_id = pair["user"]["ID"]
    _, bystander = new_account(agent, "by")

    denied = agent.post(f"/admin/users/{user_id}/disable", token=bystander["token"])
    assert denied.status_code == 403, denied.text
    assert valid(agent, pair["token"])

    r = agent.post(f"/admin/users/{user_id}/disable", token=admin)
    assert r.status_code == 200 and r.json()["code"] == "user_disabled", r.text
    for _ in range(4):  # both workers answer
        assert not valid(agent, pair["token"])
    assert_rejected(refresh(agent, pair["refresh_token"]), 400, "invalid_grant")
    r = agent.post("/token", json={"username": username, "password": PASSWORD})
    assert_rejected(r, 401, "invalid_credentials")
    assert valid(agent, bystander["token"])

    r = agent.post(f"/admin/users/{user_id}/enable", token=admin)
    assert r.status_code == 200 and r.json()["code"] == "user_enabled", r.text
    assert not valid(agent, pair["token"])
    assert_rejected(refresh(agent, pair["refresh_token"]), 400, "invalid_grant")
    assert valid(agent, login_pair(agent, username)["token"])


@pytest.mark.case("S-15")
def test_S15_admin_ends_every_session_of_a_user(agent: Agent) -> None:
    """An administrator lists a user's sessions and ends each with ``DELETE
    /admin/sessions/{id}``: all their tokens are refused at once; a non-administrator cannot."""
    admin = create_admin(agent)
    username, s1 = new_account(agent)
    s2 = login_pair(agent, username)
    _, bystander = new_account(agent, "by")
    user_id = s1["user"]["ID"]

    denied = agent.request("DELETE", f"/admin/sessions/{s1['sid']}", token=bystander["token"])
    assert denied.status_code == 403, denied.text
    assert valid(agent, s1["token"])

    listed = agent.get(f"/admin/users/{user_id}/sessions", token=admin)
    assert listed.status_code == 200, listed.text
    ids = [s["id"] for s in listed.json()["sessions"]]
    assert {s1["sid"], s2["sid"]} <= set(ids)
    for sid in ids:
        r = agent.request("DELETE", f"/admin/sessions/{sid}", token=admin)
        assert r.status_code == 200, r.text
    for pair in (s1, s2):
        assert not valid(agent, pair["token"])
        assert_rejected(refresh(agent, pair["refresh_token"]), 400, "invalid_grant")
    assert valid(agent, bystander["token"])
    assert agent.get(f"/admin/users/{user_id}/sessions", token=admin).json() == {
        "sessions": [], "next_cursor": None}


@pytest.mark.case("S-15")
def test_S15_kill_switch_for_one_account_and_for_the_whole_site(
    limited: dict[str, Agent]
) -> None:
    """``headlesskey-agent sessions end-all``: with ``--username`` one account's sessions end
    (others live on); with ``--yes`` every session of the site ends. Tokens are refused at once,
    refreshes too; a new login works."""
    site = limited["evict"]
    first, second = fresh_user(site, "k"), fresh_user(site, "k")
    first_pair = login_pair(site, first.username)
    run(AGENT, "sessions", "end-all", "--instance", str(site.instance),
        "--username", first.username, env=site.env)
    assert not valid(site, first.token) and not valid(site, first_pair["token"])
    assert_rejected(refresh(site, first_pair["refresh_token"]), 400, "invalid_grant")
    assert valid(site, second.token)

    out = run(AGENT, "sessions", "end-all", "--instance", str(site.instance), "--yes",
              env=site.env).stdout
    assert "session(s) at once" in out
    assert not valid(site, second.token)
    assert site.rows("SELECT count(*) FROM hk_sessions WHERE revoked_at IS NULL") == [(0,)]
    assert valid(site, login_pair(site, second.username)["token"])
