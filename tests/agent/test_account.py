"""The signed-in user's account over HTTP: change password, profile, sessions (devices)."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import re
import threading
import time
import typing as t

import pytest
import requests
from sqlalchemy import text

from tests.conftest import PASSWORD
from tests.conftest import Mailbox
from tests.conftest import Site

NEW_PASSWORD = "amber falcon over quiet harbours"
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
FIREFOX_LINUX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


@pytest.fixture
def asite(smtp: Mailbox, make_site: t.Any) -> Site:
    """An HS256 site with alice and bob that mails through the loopback SMTP server.

    ``smtp`` comes first so it is torn down last, after the site's mailer has flushed.
    """
    s = make_site("HS256", mailbox=smtp)
    s.create_user("alice")
    s.create_user("bob")
    return t.cast(Site, s)


def change(site: Site, token: str | None, **body: t.Any) -> requests.Response:
    return site.api.post("/change-password", json=body, token=token)


def can_log_in(site: Site, login: str, password: str) -> bool:
    r = site.api.post("/token", json={"username": login, "password": password})
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


def access_works(site: Site, pair: dict[str, t.Any]) -> bool:
    status = site.api.get("/me", token=pair["token"]).status_code
    assert status in (200, 401)
    return status == 200


def refresh_status(site: Site, pair: dict[str, t.Any]) -> int:
    return site.api.post("/token/refresh",
                         json={"refresh_token": pair["refresh_token"]}).status_code


# --- change password -------------------------------------------------------------------------


def test_change_password_ends_the_other_sessions(asite: Site, smtp: Mailbox) -> None:
    current = asite.api.login()
    others = [asite.api.login(), asite.api.login()]
    bobs = asite.api.login("bob")
    r = change(asite, current["token"], current_password=PASSWORD, new_password=NEW_PASSWORD)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    assert body["code"] == "password_changed"
    assert body["sessions_ended"] == 2
    # The caller's own session lives on: its access token and its refresh token.
    assert access_works(asite, current)
    refreshed = asite.api.post("/token/refresh", json={"refresh_token": current["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
    assert asite.api.get("/me", token=refreshed.json()["token"]).status_code == 200
    # Every other session of alice is over.
    for pair in others:
        assert asite.api.get("/me", token=pair["token"]).status_code == 401
        assert refresh_status(asite, pair) == 400
    # bob is not alice.
    assert access_works(asite, bobs)
    assert can_log_in(asite, "alice", NEW_PASSWORD)
    assert not can_log_in(asite, "alice", PASSWORD)
    (notice,) = smtp.wait_for("alice@example.com")
    assert "changed" in notice["Subject"].lower()
    assert NEW_PASSWORD not in notice.get_payload(decode=True).decode()
    assert smtp.to("bob@example.com") == []


def test_change_password_with_no_other_session(asite: Site, smtp: Mailbox) -> None:
    only = asite.api.login()
    r = change(asite, only["token"], current_password=PASSWORD, new_password=NEW_PASSWORD)
    assert r.status_code == 200
    assert r.json()["sessions_ended"] == 0
    assert access_works(asite, only)
    smtp.wait_for("alice@example.com")


def test_wrong_current_password(asite: Site) -> None:
    current = asite.api.login()
    other = asite.api.login()
    r = change(asite, current["token"], current_password="not my password at all",
               new_password=NEW_PASSWORD)
    assert r.status_code == 400
    assert r.json()["code"] == "incorrect_password"
    assert can_log_in(asite, "alice", PASSWORD)
    assert not can_log_in(asite, "alice", NEW_PASSWORD)
    assert access_works(asite, other)


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        ({"new_password": NEW_PASSWORD}, {"current_password"}),
        ({"current_password": PASSWORD}, {"new_password"}),
        ({}, {"current_password", "new_password"}),
        ({"current_password": PASSWORD, "new_password": ""}, {"new_password"}),
    ],
)
def test_missing_fields(asite: Site, body: dict[str, str], missing: set[str]) -> None:
    token = asite.api.login()["token"]
    r = change(asite, token, **body)
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_request"
    assert set(r.json()["data"]["fields"]) == missing
    assert can_log_in(asite, "alice", PASSWORD)


@pytest.mark.parametrize("weak", ["short", "password123", "aaaaaaaaaaaa", "alice-in-wonderland"])
def test_weak_new_password(asite: Site, weak: str) -> None:
    current = asite.api.login()
    other = asite.api.login()
    r = change(asite, current["token"], current_password=PASSWORD, new_password=weak)
    assert r.status_code == 400
    assert r.json()["code"] == "weak_password"
    assert r.json()["data"]["fields"]
    assert can_log_in(asite, "alice", PASSWORD)
    assert not can_log_in(asite, "alice", weak)
    assert access_works(asite, other)


def test_weak_new_passwords_use_up_no_attempt(asite: Site) -> None:
    """The current password is right each time: more weak tries than the lockout allows still
    leave the account and the IP free (no attempt reserved and left hanging)."""
    current = asite.api.login()
    for _ in range(asite.state.settings.lockout_max_failures + 3):
        r = change(asite, current["token"], current_password=PASSWORD, new_password="password")
        assert r.status_code == 400
        assert r.json()["code"] == "weak_password"
    assert asite.scalar("SELECT coalesce(sum(pending), 0) FROM hk_throttle") == 0
    assert can_log_in(asite, "alice", PASSWORD)
    r = change(asite, current["token"], current_password=PASSWORD, new_password=NEW_PASSWORD)
    assert r.status_code == 200, r.text


def during_the_hash(site: Site, action: t.Callable[[], None]) -> None:
    """Run ``action`` (another request, as another worker would) once, while the next password
    check hashes: after the account was read and before the request writes."""
    real = site.state.hasher.verify
    done: list[bool] = []

    def verify(stored: str | None, password: str) -> bool:
        ok = real(stored, password)
        if not done:
            done.append(True)
            worker = threading.Thread(target=action)
            worker.start()
            worker.join()
        return ok

    site.state.hasher.verify = verify  # type: ignore[method-assign]


def reset_by_code(site: Site, smtp: Mailbox, password: str) -> None:
    before = len(smtp.to("alice@example.com"))
    r = site.api.post("/forgot-password", json={"login": "alice", "delivery": "otp"})
    assert r.status_code == 200
    mail = smtp.wait_for("alice@example.com", count=before + 1)[-1]
    body = mail.get_payload(decode=True).decode()
    (code,) = re.findall(r"(?<!\d)\d{6}(?!\d)", body)
    r = site.api.post("/reset-password", json={"login": "alice", "otp": code,
                                               "password": password})
    assert r.status_code == 200, r.text


def test_a_reset_during_a_change_wins(asite: Site, smtp: Mailbox) -> None:
    """The owner resets the password while a holder of one of the sessions changes it: the
    reset ended that session, so the change is refused and the owner's password stands."""
    holder = asite.api.login()
    during_the_hash(asite, lambda: reset_by_code(asite, smtp, "the owners own new passphrase"))
    r = change(asite, holder["token"], current_password=PASSWORD, new_password=NEW_PASSWORD)
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "invalid_token"
    assert can_log_in(asite, "alice", "the owners own new passphrase")
    assert not can_log_in(asite, "alice", NEW_PASSWORD)
    assert not access_works(asite, holder)
    assert asite.scalar("SELECT coalesce(sum(pending), 0) FROM hk_throttle") == 0


def test_a_disable_during_a_change_stays(asite: Site) -> None:
    with asite.db() as db:
        from agent.services import accounts

        accounts.create_user(db, asite.state, username="root", email="root@example.com",
                             password=PASSWORD, roles=["administrator"])
        db.commit()
    admin = asite.api.login("root")
    holder = asite.api.login()

    def disable() -> None:
        r = asite.api.post("/admin/users/1/disable", token=admin["token"])
        assert r.status_code == 200, r.text

    during_the_hash(asite, disable)
    r = change(asite, holder["token"], current_password=PASSWORD, new_password=NEW_PASSWORD)
    assert r.status_code == 401, r.text
    assert asite.scalar("SELECT status FROM hk_users WHERE id = 1") == "disabled"
    assert not can_log_in(asite, "alice", NEW_PASSWORD)
    assert not can_log_in(asite, "alice", PASSWORD)


def test_a_login_during_a_reset_opens_no_session(asite: Site, smtp: Mailbox) -> None:
    """A login with the old password whose hash ran while the owner reset the password: the
    reset ends every session, and must not miss the one this login would open after it."""
    during_the_hash(asite, lambda: reset_by_code(asite, smtp, "the owners own new passphrase"))
    r = asite.api.post("/token", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "invalid_credentials"
    live = asite.scalar("SELECT count(*) FROM hk_sessions WHERE user_id = 1 AND revoked_at IS NULL")
    assert live == 0
    assert asite.scalar("SELECT coalesce(sum(pending), 0) FROM hk_throttle") == 0
    reason = asite.scalar("SELECT details FROM hk_audit WHERE event = 'login.failed'")
    assert "account_changed" in str(reason)
    assert can_log_in(asite, "alice", "the owners own new passphrase")


def test_change_password_needs_a_token(asite: Site) -> None:
    r = change(asite, None, current_password=PASSWORD, new_password=NEW_PASSWORD)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert can_log_in(asite, "alice", PASSWORD)
    assert change(asite, "not-a-token", current_password=PASSWORD,
                  new_password=NEW_PASSWORD).status_code == 401
    assert can_log_in(asite, "alice", PASSWORD)


# --- profile ---------------------------------------------------------------------------------


def test_me_returns_the_profile(asite: Site) -> None:
    r = asite.api.get("/me", token=asite.api.login()["token"])
    assert r.status_code == 200
    profile = r.json()
    registered = profile.pop("user_registered")
    assert profile == {
        "ID": 1,
        "user_login": "alice",
        "user_email": "alice@example.com",
        "display_name": "alice",
        "roles": ["subscriber"],
        "email_verified": False,
        "status": "active",
    }
    assert registered.endswith("Z")
    when = dt.datetime.fromisoformat(registered.replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60
    # bob's token gives bob's profile.
    bob = asite.api.get("/me", token=asite.api.login("bob")["token"]).json()
    assert (bob["ID"], bob["user_login"]) == (2, "bob")


# --- sessions --------------------------------------------------------------------------------


def test_sessions_lists_the_callers_active_sessions(asite: Site) -> None:
    chrome = asite.api.login(headers={"User-Agent": CHROME_WINDOWS})
    firefox = asite.api.login(headers={"User-Agent": FIREFOX_LINUX})
    revoked = asite.api.login()
    assert asite.api.post("/token/revoke", token=revoked["token"]).status_code == 200
    bobs = asite.api.login("bob")
    r = asite.api.get("/sessions", token=chrome["token"])
    assert r.status_code == 200
    listed = {s["id"]: s for s in r.json()["sessions"]}
    assert set(listed) == {chrome["sid"], firefox["sid"]}
    assert revoked["sid"] not in listed
    assert bobs["sid"] not in listed
    mine = listed[chrome["sid"]]
    assert mine["current"] is True
    assert listed[firefox["sid"]]["current"] is False
    assert "Chrome" in mine["device"]
    assert "Windows" in mine["device"]
    assert mine["user_agent"] == CHROME_WINDOWS
    assert "Firefox" in listed[firefox["sid"]]["device"]
    for s in listed.values():
        assert s["ip"] == "127.0.0.1"
        for key in ("created", "last_seen", "expires"):
            assert s[key].endswith("Z")
    # Seen from the other session, "current" follows the caller.
    seen = {s["id"]: s["current"]
            for s in asite.api.get("/sessions", token=firefox["token"]).json()["sessions"]}
    assert seen == {chrome["sid"]: False, firefox["sid"]: True}


def test_sessions_needs_a_token(asite: Site) -> None:
    assert asite.api.get("/sessions").status_code == 401


def test_end_one_of_my_other_sessions(asite: Site) -> None:
    mine = asite.api.login()
    other = asite.api.login()
    r = asite.api.delete(f"/sessions/{other['sid']}", token=mine["token"])
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    assert asite.api.get("/me", token=other["token"]).status_code == 401
    assert refresh_status(asite, other) == 400
    assert access_works(asite, mine)
    listed = [s["id"] for s in asite.api.get("/sessions", token=mine["token"]).json()["sessions"]]
    assert listed == [mine["sid"]]
    # Ending it again: it is gone.
    again = asite.api.delete(f"/sessions/{other['sid']}", token=mine["token"])
    assert again.status_code == 404
    assert again.json()["code"] == "session_not_found"


def test_cannot_end_another_users_session(asite: Site) -> None:
    mine = asite.api.login()
    bobs = asite.api.login("bob")
    r = asite.api.delete(f"/sessions/{bobs['sid']}", token=mine["token"])
    assert r.status_code == 404
    assert r.json()["code"] == "session_not_found"
    assert access_works(asite, bobs)
    assert refresh_status(asite, bobs) == 200
    assert asite.scalar("SELECT revoked_at FROM hk_sessions WHERE id = :sid",
                        sid=bobs["sid"]) is None


def test_unknown_session_id(asite: Site) -> None:
    mine = asite.api.login()
    r = asite.api.delete("/sessions/no-such-session", token=mine["token"])
    assert r.status_code == 404
    assert r.json()["code"] == "session_not_found"
    assert access_works(asite, mine)


def test_ending_a_session_needs_a_token(asite: Site) -> None:
    mine = asite.api.login()
    assert asite.api.delete(f"/sessions/{mine['sid']}").status_code == 401
    assert access_works(asite, mine)


def test_a_session_past_its_lifetime_is_not_ended_again(asite: Site) -> None:
    """A session past its absolute lifetime is no longer listed; ending it is 404 as for an
    ended one (it said "Session ended." and logged session.ended for a session long over)."""
    from agent.models import Session

    asite.create_user("root", roles=["administrator"])
    old, mine, admin = asite.api.login(), asite.api.login(), asite.api.login("root")
    with asite.db() as db:  # its lifetime ended a minute ago
        db.get(Session, old["sid"]).expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        db.commit()
    listed = [s["id"] for s in asite.api.get("/sessions", token=mine["token"]).json()["sessions"]]
    assert listed == [mine["sid"]]
    for r in (asite.api.delete(f"/sessions/{old['sid']}", token=mine["token"]),
              asite.api.delete(f"/admin/sessions/{old['sid']}", token=admin["token"])):
        assert r.status_code == 404, r.text
        assert r.json()["code"] == "session_not_found"
    assert asite.scalar("SELECT count(*) FROM hk_audit WHERE event = 'session.ended'") == 0
    assert asite.scalar("SELECT revoked_at FROM hk_sessions WHERE id = :sid",
                        sid=old["sid"]) is None
    assert access_works(asite, mine)


def holding_the_session_row(site: Site, sid: str) -> t.Any:
    """A transaction holding the session's row (the whole file's writes, on SQLite); the caller
    commits or rolls it back."""
    conn = site.state.engine.connect()
    held = conn.begin()  # on SQLite, the agent's engine begins IMMEDIATE: the writer's lock
    conn.execute(text("SELECT id FROM hk_sessions WHERE id = :sid FOR UPDATE"
                      if conn.dialect.name != "sqlite"
                      else "UPDATE hk_sessions SET ip = ip WHERE id = :sid"), {"sid": sid})
    return conn, held


def wait_for_waiters(site: Site, count: int) -> None:
    """Until ``count`` statements on sessions wait for a lock (PostgreSQL; other tests sharing
    the database may wait too, so at most 10 s); a moment on SQLite."""
    if site.state.engine.dialect.name == "sqlite":
        time.sleep(0.5)
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if site.scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                       " AND datname = current_database() AND query LIKE '%hk_sessions%'"
                       ) >= count:
            time.sleep(0.1)
            return
        time.sleep(0.02)


def test_a_session_ended_twice_at_once_is_ended_once(asite: Site) -> None:
    """Two requests ending the same session at once (a double click, the owner and an
    administrator): one ends it, the other finds it gone (404), and the log has one row."""
    asite.create_user("root", roles=["administrator"])
    mine = asite.api.login()
    other = asite.api.login()
    admin = asite.api.login("root")
    conn, held = holding_the_session_row(asite, other["sid"])
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            by_owner = pool.submit(asite.api.delete, f"/sessions/{other['sid']}",
                                   token=mine["token"])
            by_admin = pool.submit(asite.api.delete, f"/admin/sessions/{other['sid']}",
                                   token=admin["token"])
            wait_for_waiters(asite, 2)
            held.rollback()
            answers = [by_owner.result(), by_admin.result()]
    finally:
        conn.close()
    assert sorted(r.status_code for r in answers) == [200, 404], [r.text for r in answers]
    (gone,) = [r for r in answers if r.status_code == 404]
    assert gone.json()["code"] == "session_not_found"
    assert asite.scalar("SELECT count(*) FROM hk_audit WHERE event = 'session.ended'") == 1
    reason = asite.scalar("SELECT revoke_reason FROM hk_sessions WHERE id = :sid",
                          sid=other["sid"])
    ended = asite.scalar("SELECT details FROM hk_audit WHERE event = 'session.ended'")
    assert reason in str(ended)
    assert not access_works(asite, other)
    assert access_works(asite, mine)


@pytest.mark.parametrize("token", ["token", "refresh_token"])
def test_a_logout_while_the_session_is_being_ended_ends_it_once(asite: Site, token: str) -> None:
    """A logout of a session another device is ending at that moment: the session is ended
    once, with one reason, and one row in the log; the logout still answers 200 (RFC 7009)."""
    mine = asite.api.login()
    other = asite.api.login()
    conn, held = holding_the_session_row(asite, other["sid"])
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            ending = pool.submit(asite.api.delete, f"/sessions/{other['sid']}",
                                 token=mine["token"])
            wait_for_waiters(asite, 1)
            logout = pool.submit(asite.api.post, "/token/revoke", json={"token": other[token]})
            wait_for_waiters(asite, 2)
            held.rollback()
            ended, out = ending.result(), logout.result()
    finally:
        conn.close()
    assert out.status_code == 200, out.text
    # PostgreSQL lets the first in line go first; SQLite's waiters may come in either order.
    assert ended.status_code in (200, 404), ended.text
    first, reason = (("session.ended", "ended_by_user") if ended.status_code == 200
                     else ("token.revoked", "revoked"))
    logged = asite.scalar("SELECT count(*) FROM hk_audit"
                          " WHERE event IN ('session.ended', 'token.revoked')")
    assert logged == 1
    assert asite.scalar("SELECT count(*) FROM hk_audit WHERE event = :e", e=first) == 1
    assert asite.scalar("SELECT revoke_reason FROM hk_sessions WHERE id = :sid",
                        sid=other["sid"]) == reason
    assert not access_works(asite, other)
