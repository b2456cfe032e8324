"""Devices over HTTP: the session limit (evict the oldest or reject), device labels, admin views."""

from __future__ import annotations

import concurrent.futures
import typing as t

import pytest
import requests

from agent.services.devices import describe
from tests.conftest import PASSWORD
from tests.conftest import Site

IPHONE_SAFARI = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
FIREFOX_WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"


def limited_site(make_site: t.Callable[..., Site], policy: str = "evict_oldest") -> Site:
    """MAX_SESSIONS = 3; alice (1), bob (2) and an administrator root (3)."""
    s = make_site(
        "HS256", HEADLESSKEY_MAX_SESSIONS=3, HEADLESSKEY_SESSION_LIMIT_POLICY=policy
    )
    assert s.create_user("alice") == 1
    assert s.create_user("bob") == 2
    assert s.create_user("root", roles=["administrator"]) == 3
    return s


def login(s: Site, name: str = "alice", **kw: t.Any) -> requests.Response:
    return s.api.post("/token", json={"username": name, "password": PASSWORD}, **kw)


def active_rows(s: Site, user_id: int = 1) -> int:
    return t.cast(
        int,
        s.scalar(
            "SELECT count(*) FROM hk_sessions WHERE user_id = :u AND revoked_at IS NULL",
            u=user_id,
        ),
    )


def works(s: Site, pair: dict[str, t.Any]) -> bool:
    status = s.api.get("/me", token=pair["token"]).status_code
    assert status in (200, 401)
    return status == 200


def refresh_status(s: Site, pair: dict[str, t.Any]) -> int:
    return s.api.post("/token/refresh", json={"refresh_token": pair["refresh_token"]}).status_code


def concurrent_logins(s: Site, count: int) -> list[requests.Response]:
    def one(_: int) -> requests.Response:
        return requests.post(
            s.api.url("/token"), json={"username": "alice", "password": PASSWORD}, timeout=60
        )

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def assert_limit_reached(r: requests.Response) -> None:
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "session_limit_reached"


# --- evict the oldest -----------------------------------------------------------------------


def test_fourth_login_evicts_the_oldest_session(make_site: t.Callable[..., Site]) -> None:
    s = limited_site(make_site)
    admin = s.api.login("root")["token"]
    pairs = []
    for _ in range(4):
        pairs.append(s.api.login())
        s.clock.advance(1)
    first, *newest = pairs
    assert not works(s, first)
    assert refresh_status(s, first) == 400
    for pair in newest:
        assert works(s, pair)
    listed = s.api.get("/sessions", token=newest[-1]["token"])
    assert listed.status_code == 200
    assert sorted(x["id"] for x in listed.json()["sessions"]) == sorted(p["sid"] for p in newest)
    assert active_rows(s) == 3
    logs = s.api.get("/admin/logs", params={"event": "session.evicted"}, token=admin)
    assert logs.status_code == 200, logs.text
    (row,) = logs.json()["events"]
    assert row["user_id"] == 1
    assert row["session_id"] == first["sid"]
    assert row["details"]["by_session"] == newest[-1]["sid"]
    assert row["outcome"] == "info"
    # Refreshing the newest sessions does not count as a new session.
    for pair in newest:
        assert refresh_status(s, pair) == 200
    assert active_rows(s) == 3


def test_concurrent_logins_leave_exactly_the_limit(make_site: t.Callable[..., Site]) -> None:
    s = limited_site(make_site)
    answers = concurrent_logins(s, 10)
    assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers]
    assert active_rows(s) == 3
    alive = [r.json() for r in answers if works(s, r.json())]
    assert len(alive) == 3


def test_other_users_do_not_count(make_site: t.Callable[..., Site]) -> None:
    s = limited_site(make_site)
    alices = [s.api.login() for _ in range(3)]
    bobs = [s.api.login("bob") for _ in range(3)]
    assert all(works(s, p) for p in alices + bobs)
    assert active_rows(s, 1) == active_rows(s, 2) == 3


# --- reject -----------------------------------------------------------------------------------


def test_reject_policy_refuses_the_fourth_login(make_site: t.Callable[..., Site]) -> None:
    s = limited_site(make_site, "reject")
    admin = s.api.login("root")["token"]
    pairs = [s.api.login() for _ in range(3)]
    r = login(s)
    assert_limit_reached(r)
    assert "token" not in r.json()
    assert s.scalar("SELECT count(*) FROM hk_sessions WHERE user_id = 1") == 3
    assert all(works(s, p) for p in pairs)
    logs = s.api.get("/admin/logs", params={"event": "session.limit_reached"}, token=admin)
    (row,) = logs.json()["events"]
    assert (row["user_id"], row["outcome"]) == (1, "blocked")


def test_reject_policy_under_concurrency(make_site: t.Callable[..., Site]) -> None:
    s = limited_site(make_site, "reject")
    answers = concurrent_logins(s, 10)
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 3 + [403] * 7, [r.text for r in answers]
    for r in answers:
        if r.status_code == 403:
            assert r.json()["code"] == "session_limit_reached"
    assert active_rows(s) == 3
    assert s.scalar("SELECT count(*) FROM hk_sessions WHERE user_id = 1") == 3


def test_refused_logins_are_not_failed_passwords(make_site: t.Callable[..., Site]) -> None:
    """A user at the limit who keeps trying with the right password is told the real reason."""
    s = limited_site(make_site, "reject")
    pairs = [s.api.login() for _ in range(3)]
    for _ in range(8):
        assert_limit_reached(login(s))
    # Logging out on one device is enough to log in again.
    assert s.api.post("/token/revoke", json={"token": pairs[0]["refresh_token"]}).status_code == 200
    r = login(s)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("policy", ["evict_oldest", "reject"])
def test_logging_out_frees_a_slot(make_site: t.Callable[..., Site], policy: str) -> None:
    s = limited_site(make_site, policy)
    pairs = [s.api.login() for _ in range(3)]
    ended = s.api.delete(f"/sessions/{pairs[1]['sid']}", token=pairs[0]["token"])
    assert ended.status_code == 200, ended.text
    assert active_rows(s) == 2
    fourth = login(s)
    assert fourth.status_code == 200, fourth.text
    # Nobody was evicted to make room.
    assert works(s, pairs[0]) and works(s, pairs[2]) and works(s, fourth.json())
    assert active_rows(s) == 3
    fifth = login(s)
    if policy == "reject":
        assert_limit_reached(fifth)
    else:
        assert fifth.status_code == 200
        assert not works(s, pairs[0])
    assert active_rows(s) == 3


# --- device labels --------------------------------------------------------------------------


def test_sessions_list_names_the_device(make_site: t.Callable[..., Site]) -> None:
    s = limited_site(make_site)
    phone = login(s, headers={"User-Agent": IPHONE_SAFARI}).json()
    s.clock.advance(1)
    desktop = login(s, headers={"User-Agent": FIREFOX_WINDOWS}).json()
    r = s.api.get("/sessions", token=phone["token"])
    assert r.status_code == 200
    by_id = {x["id"]: x for x in r.json()["sessions"]}
    assert set(by_id) == {phone["sid"], desktop["sid"]}
    mine = by_id[phone["sid"]]
    assert mine["device"] == "Safari 17 on iOS"
    assert mine["user_agent"] == IPHONE_SAFARI
    assert mine["ip"] == "127.0.0.1"
    assert mine["current"] is True
    other = by_id[desktop["sid"]]
    assert other["device"] == "Firefox 128 on Windows"
    assert other["current"] is False
    # Newest first.
    assert [x["id"] for x in r.json()["sessions"]] == [desktop["sid"], phone["sid"]]


CHROME = "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"


@pytest.mark.parametrize(("user_agent", "label"), [
    (f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) {CHROME} Safari/537.36", "Chrome 126 on Windows"),
    (f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) {CHROME} Safari/537.36 Edg/126.0.2592.68",
     "Edge 126 on Windows"),
    (f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) {CHROME} Safari/537.36 OPR/111.0.0.0",
     "Opera 111 on macOS"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.5 Safari/605.1.15", "Safari 17 on macOS"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0.6478.71 Mobile Safari/537.36", "Chrome 126 on Android"),
    ("Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/25.0 Chrome/121.0.0.0 Mobile Safari/537.36", "Samsung Internet 25 on Android"),
    ("Mozilla/5.0 (Android 14; Mobile; rv:128.0) Gecko/128.0 Firefox/128.0",
     "Firefox 128 on Android"),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
     "Gecko) CriOS/126.0.6478.54 Mobile/15E148 Safari/604.1", "Chrome 126 on iOS"),
    ("Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "FxiOS/128.0 Mobile/15E148 Safari/605.1.15", "Firefox 128 on iOS"),
    (f"Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) {CHROME} Safari/537.36", "Chrome 126 on Chrome OS"),
    (f"Mozilla/5.0 (X11; Linux x86_64) {CHROME.replace('Chrome', 'HeadlessChrome')} Safari/537.36",
     "Headless Chrome 126 on Linux"),
    ("Mozilla/5.0 (Windows NT 10.0; WOW64; Trident/7.0; rv:11.0) like Gecko",
     "Internet Explorer 11 on Windows"),
    ("curl/8.5.0", "curl 8"),
    ("python-requests/2.32.3", "python-requests 2"),
    ("okhttp/4.12.0", "okhttp 4"),
    ("MyShop/3.2 (iPhone; iOS 17.5; Scale/3.00)", "MyShop 3 on iOS"),
    ("Mozilla/5.0 (compatible; SomethingNew)", "Unknown client"),
    ("!!!", "Unknown client"),
    ("", ""),
    ("   ", ""),
])
def test_device_labels(user_agent: str, label: str) -> None:
    assert describe(user_agent) == label


def test_device_label_of_a_hostile_user_agent_is_short_and_plain() -> None:
    """A crafted User-Agent cannot put markup or control characters in the label, nor make it
    long or slow: the label is fixed words, digits and one product name."""
    assert describe("<script>/1 " + "x" * 100_000) == "Unknown client"
    assert describe("a" * 200 + "/9") == "Unknown client"  # a product name is 64 at most
    assert describe("Firefox/1\r\nX-Injected: 1") == "Firefox 1"
    slow = "Mozilla/5.0 (Windows) Version/1" + " Mobile/x" * 5000  # only 512 characters are read
    assert describe(slow) == "Unknown client on Windows"
    assert len(describe("Mozilla/5.0 " + "Chrome/1 " * 1000)) <= 128


# --- administrators -------------------------------------------------------------------------


def test_admin_lists_and_ends_another_users_sessions(make_site: t.Callable[..., Site]) -> None:
    s = limited_site(make_site)
    admin = s.api.login("root")["token"]
    phone = login(s, headers={"User-Agent": IPHONE_SAFARI}).json()
    desktop = login(s, headers={"User-Agent": FIREFOX_WINDOWS}).json()
    bob = s.api.login("bob")

    r = s.api.get("/admin/users/1/sessions", token=admin)
    assert r.status_code == 200, r.text
    listed = r.json()["sessions"]
    assert sorted(x["id"] for x in listed) == sorted([phone["sid"], desktop["sid"]])
    assert {x["user_agent"] for x in listed} == {IPHONE_SAFARI, FIREFOX_WINDOWS}
    assert all(x["current"] is False for x in listed)

    # A subscriber can neither look nor end anyone's session.
    for response in (
        s.api.get("/admin/users/1/sessions", token=bob["token"]),
        s.api.delete(f"/admin/sessions/{phone['sid']}", token=bob["token"]),
    ):
        assert response.status_code == 403
        assert response.json()["code"] == "forbidden"
    foreign = s.api.delete(f"/sessions/{phone['sid']}", token=bob["token"])
    assert foreign.status_code == 404
    assert foreign.json()["code"] == "session_not_found"
    assert works(s, phone)

    ended = s.api.delete(f"/admin/sessions/{phone['sid']}", token=admin)
    assert ended.status_code == 200, ended.text
    assert ended.json()["code"] == "session_ended"
    assert not works(s, phone)
    assert refresh_status(s, phone) == 400
    assert works(s, desktop)
    assert works(s, bob)
    remaining = s.api.get("/admin/users/1/sessions", token=admin).json()["sessions"]
    assert [x["id"] for x in remaining] == [desktop["sid"]]
    again = s.api.delete(f"/admin/sessions/{phone['sid']}", token=admin)
    assert again.status_code == 404

    logs = s.api.get("/admin/logs", params={"event": "session.ended"}, token=admin).json()
    (row,) = logs["events"]
    assert row["user_id"] == 1
    assert row["session_id"] == phone["sid"]
    assert row["details"]["reason"] == "ended_by_admin"

    missing = s.api.get("/admin/users/999/sessions", token=admin)
    assert missing.status_code == 404
    assert missing.json()["code"] == "user_not_found"
    assert s.api.get("/admin/users/1/sessions").status_code == 401


def test_the_log_names_the_administrator_who_ended_a_session(
        make_site: t.Callable[..., Site]) -> None:
    """As for a disable, an enable or an unlock: ``details.by`` is the administrator's ID."""
    s = limited_site(make_site)
    s.create_user("root2", roles=["administrator"])
    admin = s.api.login("root2")["token"]
    phone = login(s).json()
    assert s.api.delete(f"/admin/sessions/{phone['sid']}", token=admin).status_code == 200
    mine = login(s).json()
    other = login(s).json()
    assert s.api.delete(f"/sessions/{other['sid']}", token=mine["token"]).status_code == 200
    logs = s.api.get("/admin/logs", params={"event": "session.ended"}, token=admin).json()
    assert [(e["session_id"], e["details"]) for e in logs["events"]] == [
        (other["sid"], {"reason": "ended_by_user"}),
        (phone["sid"], {"reason": "ended_by_admin", "by": 4}),
    ]


def test_admin_disables_and_enables_a_user(make_site: t.Callable[..., Site]) -> None:
    """S-14: disabling ends every session of the user at once (access and refresh tokens), and
    refuses their logins like a wrong password; enabling lets them log in again, while the old
    sessions stay ended. Both are in the activity log."""
    s = limited_site(make_site)
    admin = s.api.login("root")["token"]
    phone, desktop, bob = login(s).json(), login(s).json(), s.api.login("bob")

    assert s.api.post("/admin/users/1/disable", token=bob["token"]).status_code == 403
    assert works(s, phone)
    r = s.api.post("/admin/users/1/disable", token=admin)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "code": "user_disabled", "message": "User disabled.",
                        "sessions_ended": 2}
    assert not works(s, phone) and not works(s, desktop)
    assert refresh_status(s, phone) == 400
    refused = login(s)
    assert refused.status_code == 401 and refused.json()["code"] == "invalid_credentials"
    assert works(s, bob)
    assert s.api.post("/admin/users/999/disable", token=admin).status_code == 404

    r = s.api.post("/admin/users/1/enable", token=admin)
    assert r.status_code == 200 and r.json()["code"] == "user_enabled", r.text
    assert not works(s, phone)
    assert login(s).status_code == 200
    logs = s.api.get("/admin/logs", params={"user": 1}, token=admin).json()["events"]
    assert [(e["event"], e["details"].get("by")) for e in logs[:2]] == [
        ("login.succeeded", None), ("user.enabled", 3)]
    disabled = next(e for e in logs if e["event"] == "user.disabled")
    assert disabled["details"] == {"by": 3, "sessions_ended": 2}


def test_admin_user_id_beyond_64_bits_is_404(make_site: t.Callable[..., Site]) -> None:
    """A user id no database column can hold is an unknown route (404), not a driver error."""
    s = limited_site(make_site)
    admin = s.api.login("root")["token"]
    huge = str(2**63)
    for method, path in (("GET", f"/admin/users/{huge}/sessions"),
                         ("POST", f"/admin/users/{huge}/unlock"),
                         ("POST", f"/admin/users/{huge}/disable"),
                         ("POST", f"/admin/users/{huge}/enable")):
        r = s.api.request(method, path, token=admin)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["code"] == "rest_no_route"
    # Ids are 32-bit INTEGER columns on PostgreSQL: the largest one is an unknown user, one
    # more is no route; neither reaches the driver.
    r = s.api.get(f"/admin/users/{2**31 - 1}/sessions", token=admin)
    assert r.status_code == 404 and r.json()["code"] != "rest_no_route", r.text
    r = s.api.get(f"/admin/users/{2**31}/sessions", token=admin)
    assert r.status_code == 404 and r.json()["code"] == "rest_no_route", r.text
    assert s.api.get("/admin/users/1/sessions", token=admin).status_code == 200


@pytest.mark.parametrize("user_id", ["\uff11", "\u0661", "\u0967", "1\uff10"])
def test_admin_user_id_in_other_digits_is_404(make_site: t.Callable[..., Site],
                                              user_id: str) -> None:
    """A user id written in other digits than 0-9 (fullwidth, Arabic-Indic, Devanagari) is an
    unknown route, as in the ``user`` filter of /admin/logs; "１" was user 1 and disabled it."""
    s = limited_site(make_site)
    admin = s.api.login("root")["token"]
    phone = login(s).json()
    for method, action in (("GET", "sessions"), ("POST", "unlock"), ("POST", "disable"),
                           ("POST", "enable")):
        r = s.api.request(method, f"/admin/users/{user_id}/{action}", token=admin)
        assert r.status_code == 404, (action, r.text)
        assert r.json()["code"] == "rest_no_route"
    assert works(s, phone)
    assert s.scalar("SELECT status FROM hk_users WHERE id = 1") == "active"
    assert s.scalar("SELECT count(*) FROM hk_audit WHERE event LIKE 'user.%'") == 0


# --- long lists -----------------------------------------------------------------------------


def pages(s: Site, path: str, token: str, limit: int) -> list[list[str]]:
    """The session ids of every page of ``path``, following ``next_cursor`` to the end."""
    out: list[list[str]] = []
    cursor: str | None = None
    while True:
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        r = s.api.get(path, params=params, token=token)
        assert r.status_code == 200, r.text
        body = r.json()
        out.append([x["id"] for x in body["sessions"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return out
        assert len(out) < 20, "next_cursor never ran out"


def test_sessions_are_listed_newest_first_a_page_at_a_time(
    make_site: t.Callable[..., Site],
) -> None:
    """Without a session limit an account may gather any number of sessions: the lists come a
    page at a time (``limit``, ``cursor`` -> ``next_cursor``), and a session started or ended
    between two pages neither repeats nor skips another."""
    s = make_site("HS256")
    s.create_user("alice")
    s.create_user("root", roles=["administrator"])
    admin = s.api.login("root")["token"]
    sids = [s.api.login()["sid"] for _ in range(7)]
    newest_first = sids[::-1]
    mine = s.api.login()  # the caller's own session: newest of all
    everything = [mine["sid"], *newest_first]

    assert pages(s, "/sessions", mine["token"], 3) == [everything[0:3], everything[3:6],
                                                       everything[6:8]]
    assert pages(s, "/sessions", mine["token"], 8) == [everything]
    whole = s.api.get("/sessions", token=mine["token"]).json()  # 100 a page unless asked
    assert [x["id"] for x in whole["sessions"]] == everything
    assert whole["next_cursor"] is None
    assert [x["current"] for x in whole["sessions"]] == [True] + [False] * 7
    assert pages(s, "/admin/users/1/sessions", admin, 5) == [everything[0:5], everything[5:8]]

    first = s.api.get("/sessions", params={"limit": "3"}, token=mine["token"]).json()
    later = s.api.login()["sid"]  # newer than every page: never in the pages that follow
    assert s.api.delete(f"/sessions/{everything[4]}", token=mine["token"]).status_code == 200
    rest = s.api.get("/sessions", params={"limit": "10", "cursor": first["next_cursor"]},
                     token=mine["token"]).json()
    assert [x["id"] for x in rest["sessions"]] == [everything[3], *everything[5:8]]
    assert later not in [x["id"] for x in rest["sessions"]]
    assert rest["next_cursor"] is None


@pytest.mark.parametrize("params, bad", [
    ({"limit": "0"}, ["limit"]),
    ({"limit": "501"}, ["limit"]),
    ({"limit": "ten"}, ["limit"]),
    ({"limit": "-1"}, ["limit"]),
    ({"limit": "1e2"}, ["limit"]),
    ({"cursor": "nope"}, ["cursor"]),
    ({"cursor": "MTIzLg"}, ["cursor"]),  # "123." : no session id
    ({"cursor": "eC5hYmM"}, ["cursor"]),  # "x.abc": no time
    ({"cursor": "A" * 129}, ["cursor"]),
    ({"limit": "0", "cursor": "%%%"}, ["cursor", "limit"]),
])
def test_a_bad_page_of_sessions_is_a_400_naming_the_parameter(
    make_site: t.Callable[..., Site], params: dict[str, str], bad: list[str],
) -> None:
    s = make_site("HS256")
    s.create_user("alice")
    s.create_user("root", roles=["administrator"])
    admin = s.api.login("root")["token"]
    mine = s.api.login()["token"]
    for path, token in (("/sessions", mine), ("/admin/users/1/sessions", admin)):
        r = s.api.get(path, params=params, token=token)
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["code"] == "invalid_request", body
        assert sorted(body["data"]["fields"]) == bad, body
