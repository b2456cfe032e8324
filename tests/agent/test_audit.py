"""The activity log over HTTP: every auth event once, nothing secret, filters, paging, read-only."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import time
import typing as t
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import PASSWORD
from tests.conftest import Mailbox
from tests.conftest import Site

FIREFOX_WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"
FIREFOX_DEVICE = "Firefox 128 on Windows"
WRONG = "not the right password at all"
NEW_PASSWORD = "amber falcon over quiet harbours"
RESET_PASSWORD = "seventeen paper lanterns drifting"
DAVE_PASSWORD = "quiet copper kettles whistling"


def all_rows(s: Site, token: str, **params: t.Any) -> list[dict[str, t.Any]]:
    r = s.api.get("/admin/logs", params={"limit": 500, **params}, token=token)
    assert r.status_code == 200, r.text
    assert r.json()["next_cursor"] is None
    return t.cast(list[dict[str, t.Any]], r.json()["events"])


def matches(row: dict[str, t.Any], spec: dict[str, t.Any]) -> bool:
    for key, value in spec.items():
        if key == "details":
            if any(row["details"].get(k) != v for k, v in value.items()):
                return False
        elif row[key] != value:
            return False
    return True


def reset_mail_body(box: Mailbox, to: str, index: int) -> str:
    """The body of the ``index``-th reset mail to ``to`` (waiting for it)."""
    deadline = time.monotonic() + 10
    while True:
        found = [m for m in box.to(to) if m["Subject"].startswith("Reset your")]
        if len(found) > index:
            payload = found[index].get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode(found[index].get_content_charset() or "utf-8")
        assert time.monotonic() < deadline, f"no reset mail #{index} to {to}"
        time.sleep(0.02)


# --- coverage ---------------------------------------------------------------------------------


def test_every_event_is_logged_once_without_secrets(
    smtp: Mailbox, make_site: t.Callable[..., Site]
) -> None:
    s = make_site(
        "HS256",
        mailbox=smtp,
        HEADLESSKEY_MAX_SESSIONS=2,
        HEADLESSKEY_LOCKOUT_MAX_FAILURES=1,
    )
    ids = {
        name: s.create_user(name)
        for name in ("alice", "bob", "carol", "erin", "frank", "gina", "hank")
    }
    ids["root"] = s.create_user("root", roles=["administrator"])
    s.api.http.headers["User-Agent"] = FIREFOX_WINDOWS
    secrets: list[str] = [PASSWORD, WRONG, NEW_PASSWORD, RESET_PASSWORD, DAVE_PASSWORD]
    pairs: list[dict[str, t.Any]] = []

    def login(name: str) -> dict[str, t.Any]:
        pair = s.api.login(name)
        pairs.append(pair)
        return pair

    expected: list[dict[str, t.Any]] = []

    def logged_in(name: str, pair: dict[str, t.Any]) -> None:
        expected.append({"event": "login.succeeded", "outcome": "success", "user_id": ids[name],
                         "session_id": pair["sid"], "login": name})

    admin = login("root")
    logged_in("root", admin)
    alice = login("alice")
    logged_in("alice", alice)

    # Registration.
    r = s.api.post("/register", json={"username": "dave", "email": "dave@example.com",
                                      "password": DAVE_PASSWORD})
    assert r.status_code == 201, r.text
    ids["dave"] = s.scalar("SELECT id FROM hk_users WHERE user_login = 'dave'")
    expected.append({"event": "user.registered", "outcome": "success", "user_id": ids["dave"],
                     "login": "dave"})

    # A failed login that locks the account (one failure is the limit here), then an unlock.
    r = s.api.post("/token", json={"username": "carol", "password": WRONG})
    assert r.status_code == 401
    expected.append({"event": "login.failed", "outcome": "failure", "user_id": ids["carol"],
                     "login": "carol", "details": {"reason": "invalid_credentials"}})
    expected.append({"event": "lockout.started", "outcome": "info", "user_id": ids["carol"],
                     "details": {"scope": "account", "seconds": 900}})
    r = s.api.post(f"/admin/users/{ids['carol']}/unlock", token=admin["token"])
    assert r.status_code == 200, r.text
    expected.append({"event": "user.unlocked", "outcome": "info", "user_id": ids["carol"],
                     "details": {"by": ids["root"]}})

    # Refresh, then revoke.
    r = s.api.post("/token/refresh", json={"refresh_token": alice["refresh_token"]})
    assert r.status_code == 200, r.text
    alice2 = r.json()
    pairs.append(alice2)
    expected.append({"event": "token.refreshed", "outcome": "success", "user_id": ids["alice"],
                     "session_id": alice["sid"]})
    assert s.api.post("/token/revoke", token=alice2["token"]).status_code == 200
    expected.append({"event": "token.revoked", "outcome": "success", "user_id": ids["alice"],
                     "session_id": alice["sid"]})

    # Reuse of a rotated refresh token after the grace window.
    bob = login("bob")
    logged_in("bob", bob)
    r = s.api.post("/token/refresh", json={"refresh_token": bob["refresh_token"]})
    assert r.status_code == 200
    pairs.append(r.json())
    expected.append({"event": "token.refreshed", "outcome": "success", "user_id": ids["bob"],
                     "session_id": bob["sid"]})
    s.clock.advance(11)  # past the 10 s grace window (tokens are checked against real time)
    r = s.api.post("/token/refresh", json={"refresh_token": bob["refresh_token"]})
    assert r.status_code == 400
    assert r.json()["code"] == "refresh_token_reused"
    expected.append({"event": "token.reuse_detected", "outcome": "blocked",
                     "user_id": ids["bob"], "session_id": bob["sid"]})

    # Password reset requests: a code and a link for erin, and both for an unknown login.
    for login_value, delivery in (("erin", "otp"), ("erin", "link"),
                                  ("ghost", "link"), ("ghost@example.com", "otp")):
        r = s.api.post("/forgot-password", json={"login": login_value, "delivery": delivery})
        assert r.status_code == 200, r.text
        if login_value == "erin":
            expected.append({"event": "password.reset_requested", "outcome": "success",
                             "user_id": ids["erin"], "login": "erin",
                             "details": {"delivery": delivery}})
        else:
            expected.append({"event": "password.reset_requested", "outcome": "ignored",
                             "user_id": None, "login": login_value,
                             "details": {"delivery": delivery}})
    s.state.background.drain()  # the requests are handled after their answers
    code_mail = reset_mail_body(smtp, "erin@example.com", 0)
    (code,) = re.findall(r"(?<!\d)\d{6}(?!\d)", code_mail)
    link_mail = reset_mail_body(smtp, "erin@example.com", 1)
    (url,) = re.findall(r"https://app\.example/reset\?\S+", link_mail)
    reset_token = parse_qs(urlsplit(url).query)["token"][0]
    secrets += [code, reset_token]
    r = s.api.post("/reset-password", json={"login": "erin", "token": reset_token,
                                            "password": RESET_PASSWORD})
    assert r.status_code == 200, r.text
    expected.append({"event": "password.reset", "outcome": "success", "user_id": ids["erin"],
                     "details": {"method": "link"}})

    # A password change.
    frank = login("frank")
    logged_in("frank", frank)
    r = s.api.post("/change-password", token=frank["token"],
                   json={"current_password": PASSWORD, "new_password": NEW_PASSWORD})
    assert r.status_code == 200, r.text
    expected.append({"event": "password.changed", "outcome": "success", "user_id": ids["frank"],
                     "session_id": frank["sid"], "details": {"sessions_ended": 0}})

    # A third session evicts the oldest (MAX_SESSIONS is 2 here).
    gina = []
    for _ in range(3):
        gina.append(login("gina"))
        logged_in("gina", gina[-1])
        s.clock.advance(1)
    expected.append({"event": "session.evicted", "outcome": "info", "user_id": ids["gina"],
                     "session_id": gina[0]["sid"], "details": {"by_session": gina[2]["sid"]}})

    # A user ends one of their sessions.
    hank = [login("hank"), login("hank")]
    for pair in hank:
        logged_in("hank", pair)
    r = s.api.delete(f"/sessions/{hank[1]['sid']}", token=hank[0]["token"])
    assert r.status_code == 200, r.text
    expected.append({"event": "session.ended", "outcome": "success", "user_id": ids["hank"],
                     "session_id": hank[1]["sid"], "details": {"reason": "ended_by_user"}})

    rows = all_rows(s, admin["token"])
    for spec in expected:
        found = [row for row in rows if matches(row, spec)]
        assert len(found) == 1, (spec, found)
    # Nothing else was logged: each row is one of the expected events.
    assert len(rows) == len(expected), [
        (r["event"], r["user_id"]) for r in rows if not any(matches(r, e) for e in expected)
    ]
    for row in rows:
        assert row["ip"] == "127.0.0.1", row
        assert row["user_agent"] == FIREFOX_WINDOWS, row
        assert row["device"] == FIREFOX_DEVICE, row
        assert row["time"].endswith("Z")
    # The log holds no password, token, refresh token or reset code, whole or in part.
    for pair in pairs:
        secrets += [pair["token"], pair["token"].split(".")[2], pair["refresh_token"],
                    pair["refresh_token"].removeprefix("hkr_")]
    dump = json.dumps(rows)
    for secret in secrets:
        assert secret not in dump, secret
    with s.state.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT * FROM hk_audit").all()
    raw = json.dumps([[str(value) for value in row] for row in stored])
    for secret in secrets:
        assert secret not in raw, secret


# --- filters ----------------------------------------------------------------------------------


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def history(make_site: t.Callable[..., Site]) -> dict[str, t.Any]:
    """Events at three hours from two client IPs (behind one trusted proxy).

    T0:       root logs in (10.0.0.9); alice logs in (10.0.0.1)
    T0 + 1 h: bob fails (10.0.0.2)
    T0 + 2 h: alice fails (10.0.0.1); bob logs in (10.0.0.2)
    """
    s = make_site("HS256", HEADLESSKEY_TRUSTED_PROXIES=1)
    s.create_user("alice")
    s.create_user("bob")
    s.create_user("root", roles=["administrator"])
    t0 = s.clock()

    def post(name: str, password: str, ip: str) -> requests.Response:
        return s.api.post("/token", json={"username": name, "password": password},
                          headers={"X-Forwarded-For": ip})

    admin = post("root", PASSWORD, "10.0.0.9").json()["token"]
    assert post("alice", PASSWORD, "10.0.0.1").status_code == 200
    s.clock.advance(3600)
    assert post("bob", WRONG, "10.0.0.2").status_code == 401
    s.clock.advance(3600)
    assert post("alice", WRONG, "10.0.0.1").status_code == 401
    assert post("bob", PASSWORD, "10.0.0.2").status_code == 200
    return {"site": s, "admin": admin, "t0": t0}


def query(history: dict[str, t.Any], **params: t.Any) -> list[tuple[str, str, int | None, str]]:
    s, admin = history["site"], history["admin"]
    return [(r["event"], r["outcome"], r["user_id"], r["ip"]) for r in all_rows(s, admin, **params)]


ALICE_OK = ("login.succeeded", "success", 1, "10.0.0.1")
BOB_FAIL = ("login.failed", "failure", 2, "10.0.0.2")
ALICE_FAIL = ("login.failed", "failure", 1, "10.0.0.1")
BOB_OK = ("login.succeeded", "success", 2, "10.0.0.2")
ROOT_OK = ("login.succeeded", "success", 3, "10.0.0.9")


def test_unfiltered_log_is_newest_first(history: dict[str, t.Any]) -> None:
    assert query(history) == [BOB_OK, ALICE_FAIL, BOB_FAIL, ALICE_OK, ROOT_OK]


def test_filter_by_user_event_outcome_and_ip(history: dict[str, t.Any]) -> None:
    assert query(history, user=1) == [ALICE_FAIL, ALICE_OK]
    assert query(history, user=2) == [BOB_OK, BOB_FAIL]
    assert query(history, user=99) == []
    assert query(history, event="login.failed") == [ALICE_FAIL, BOB_FAIL]
    assert query(history, event="login.succeeded") == [BOB_OK, ALICE_OK, ROOT_OK]
    assert query(history, event="no.such.event") == []
    assert query(history, outcome="failure") == [ALICE_FAIL, BOB_FAIL]
    assert query(history, outcome="success") == [BOB_OK, ALICE_OK, ROOT_OK]
    assert query(history, ip="10.0.0.2") == [BOB_OK, BOB_FAIL]
    assert query(history, ip="10.0.0.1") == [ALICE_FAIL, ALICE_OK]
    assert query(history, ip="127.0.0.1") == []
    assert query(history, user=2, outcome="success") == [BOB_OK]
    assert query(history, event="login.failed", ip="10.0.0.1") == [ALICE_FAIL]


def test_filter_by_time(history: dict[str, t.Any]) -> None:
    t0: dt.datetime = history["t0"]
    half = dt.timedelta(minutes=30)
    hour = dt.timedelta(hours=1)
    assert query(history, since=iso(t0 + half)) == [BOB_OK, ALICE_FAIL, BOB_FAIL]
    assert query(history, since=iso(t0 + hour + half)) == [BOB_OK, ALICE_FAIL]
    assert query(history, until=iso(t0 + half)) == [ALICE_OK, ROOT_OK]
    assert query(history, until=iso(t0 + hour + half)) == [BOB_FAIL, ALICE_OK, ROOT_OK]
    assert query(history, since=iso(t0 + half), until=iso(t0 + hour + half)) == [BOB_FAIL]
    assert query(history, since=iso(t0 + 3 * hour)) == []
    # The same instant written with another UTC offset selects the same rows.
    plus_two = (t0 + half).astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert query(history, since=plus_two.isoformat()) == [BOB_OK, ALICE_FAIL, BOB_FAIL]
    # Filters combine with time.
    assert query(history, user=1, since=iso(t0 + half)) == [ALICE_FAIL]


def test_paging_walks_every_row_once(history: dict[str, t.Any]) -> None:
    s, admin = history["site"], history["admin"]
    full = all_rows(s, admin)
    for params in ({}, {"event": "login.succeeded"}, {"user": 2}):
        walked: list[dict[str, t.Any]] = []
        cursor = None
        pages = 0
        while True:
            args = {"limit": 2, **params, **({"cursor": cursor} if cursor else {})}
            r = s.api.get("/admin/logs", params=args, token=admin)
            assert r.status_code == 200, r.text
            page = r.json()
            assert 1 <= len(page["events"]) <= 2
            walked += page["events"]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert len(page["events"]) == 2
            assert pages < 10
        expected = all_rows(s, admin, **params)
        assert [e["id"] for e in walked] == [e["id"] for e in expected]
        assert walked == expected
        ids = [e["id"] for e in walked]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
        assert pages == (len(expected) + 1) // 2
    assert len(full) == 5


def walk(s: Site, token: str, **params: t.Any) -> list[dict[str, t.Any]]:
    """Every page of ``/admin/logs`` with ``params``, two rows a page."""
    walked: list[dict[str, t.Any]] = []
    cursor = None
    while True:
        args = {"limit": 2, **params, **({"cursor": cursor} if cursor else {})}
        r = s.api.get("/admin/logs", params=args, token=token)
        assert r.status_code == 200, r.text
        walked += r.json()["events"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return walked
        assert len(walked) < 100


def test_the_log_is_in_time_order_whatever_the_ids(history: dict[str, t.Any]) -> None:
    """An instance whose clock lags writes rows with newer ids but older times, and rows can
    share one instant: pages follow time (then id), and a walk sees every row once."""
    from agent.models import AuditEvent

    s, admin = history["site"], history["admin"]
    t0: dt.datetime = history["t0"]
    lagging = t0 + dt.timedelta(minutes=30)
    bob_failed = next(e for e in all_rows(s, admin, user=2) if e["event"] == "login.failed")
    same = dt.datetime.fromisoformat(bob_failed["time"].replace("Z", "+00:00"))
    with s.state.session_factory() as db:
        for at in (lagging, same, same, lagging):
            db.add(AuditEvent(created_at=at, event="user.updated", outcome="info", user_id=7,
                              ip="10.0.0.7", details={}))
        db.commit()
    full = all_rows(s, admin)
    assert len(full) == 9
    keys = [(e["time"], e["id"]) for e in full]
    assert keys == sorted(keys, reverse=True)
    assert [e["id"] for e in walk(s, admin)] == [e["id"] for e in full]
    for params in ({"user": 7}, {"ip": "10.0.0.7"}, {"event": "user.updated"},
                   {"since": iso(t0 + dt.timedelta(minutes=20)),
                    "until": iso(t0 + dt.timedelta(minutes=90))}):
        expected = all_rows(s, admin, **params)
        assert [e["id"] for e in walk(s, admin, **params)] == [e["id"] for e in expected]
    window = all_rows(s, admin, since=iso(t0 + dt.timedelta(minutes=20)),
                      until=iso(t0 + dt.timedelta(minutes=90)))
    assert [e["user_id"] for e in window] == [7, 7, 2, 7, 7]


def test_a_cursor_of_the_id_only_form_still_pages(history: dict[str, t.Any]) -> None:
    s, admin = history["site"], history["admin"]
    full = all_rows(s, admin)
    legacy = base64.urlsafe_b64encode(f"a{full[1]['id']}".encode()).rstrip(b"=").decode()
    r = s.api.get("/admin/logs", params={"limit": 500, "cursor": legacy}, token=admin)
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()["events"]] == [e["id"] for e in full[2:]]


def test_rows_arriving_while_paging_do_not_shift_pages(history: dict[str, t.Any]) -> None:
    s, admin = history["site"], history["admin"]
    before = [e["id"] for e in all_rows(s, admin)]
    first = s.api.get("/admin/logs", params={"limit": 2}, token=admin).json()
    s.api.post("/token", json={"username": "alice", "password": PASSWORD})
    rest = []
    cursor = first["next_cursor"]
    while cursor:
        page = s.api.get("/admin/logs", params={"limit": 2, "cursor": cursor}, token=admin).json()
        rest += [e["id"] for e in page["events"]]
        cursor = page["next_cursor"]
    assert [e["id"] for e in first["events"]] + rest == before


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "YWJj"}, "cursor"),  # valid base64, not ours
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"until": "yesterday"}, "until"),
        # Instants before year 1 or after 9999 in UTC, which no UTC column holds.
        ({"since": "0001-01-01T00:00:00+14:00"}, "since"),
        ({"until": "9999-12-31T23:59:59-14:00"}, "until"),
        ({"user": "abc"}, "user"),
        ({"user": "-1"}, "user"),
        ({"event": "e" * 65}, "event"),
        # Control characters: no event, outcome or address has one.
        ({"event": "login.failed\n"}, "event"),
        ({"outcome": "\x1b[2J"}, "outcome"),
        ({"ip": "10.0.0.1\r\nX: y"}, "ip"),
        # Numbers no database integer holds, and digits that are not ASCII (L-05: not a 500).
        ({"user": str(2**63)}, "user"),
        ({"user": str(2**31)}, "user"),
        ({"user": "\u00b2"}, "user"),
        ({"limit": "\u00b9"}, "limit"),
        ({"cursor": "YTkyMjMzNzIwMzY4NTQ3NzU4MDg"}, "cursor"),  # "a" + 2**63
    ],
)
def test_bad_parameters_are_400(
    history: dict[str, t.Any], params: dict[str, str], field: str
) -> None:
    s, admin = history["site"], history["admin"]
    r = s.api.get("/admin/logs", params=params, token=admin)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == "invalid_request"
    assert list(body["data"]["fields"]) == [field]


@pytest.mark.parametrize("params", [{"ip": "\x00"}, {"event": "login\x00"}, {"\x00": "1"}])
def test_a_nul_in_the_query_is_400_not_a_database_error(
    history: dict[str, t.Any], params: dict[str, str]
) -> None:
    """PostgreSQL text cannot hold NUL (SQLite would match nothing): refused before any query."""
    s, admin = history["site"], history["admin"]
    r = s.api.get("/admin/logs", params=params, token=admin)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_request" and "NUL" in r.json()["message"]


def test_every_bad_parameter_is_named_at_once(history: dict[str, t.Any]) -> None:
    s, admin = history["site"], history["admin"]
    r = s.api.get(
        "/admin/logs",
        params={"cursor": "x", "limit": "0", "since": "yesterday", "user": "abc"},
        token=admin,
    )
    assert r.status_code == 400
    assert set(r.json()["data"]["fields"]) == {"cursor", "limit", "since", "user"}


def test_limit_bounds_are_accepted(history: dict[str, t.Any]) -> None:
    s, admin = history["site"], history["admin"]
    one = s.api.get("/admin/logs", params={"limit": 1}, token=admin)
    assert one.status_code == 200
    assert len(one.json()["events"]) == 1
    assert one.json()["next_cursor"]
    most = s.api.get("/admin/logs", params={"limit": 500}, token=admin)
    assert most.status_code == 200
    assert len(most.json()["events"]) == 5


# --- read-only --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_the_log_cannot_be_changed_through_the_api(
    history: dict[str, t.Any], method: str
) -> None:
    s, admin = history["site"], history["admin"]
    before = all_rows(s, admin)
    r = s.api.request(method, "/admin/logs", json={"events": []}, token=admin)
    assert r.status_code == 405, r.text
    assert r.json()["code"] == "method_not_allowed"
    assert "GET" in r.headers["Allow"]
    one = s.api.request(method, f"/admin/logs/{before[0]['id']}", json={"event": "x"}, token=admin)
    assert one.status_code in (404, 405), one.text
    assert all_rows(s, admin) == before
