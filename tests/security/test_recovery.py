"""Checklist section 5: password recovery by mailed link or one-time code, over HTTP.

Every reset here is asked for at a fleet site and read from the mail the suite's real SMTP
server received: the link (``RESET_URL?login=...&token=...``) or the 6-digit code. Each test
uses an account of its own. R-10 (a reset while locked) needs tight lockout limits and runs in
``test_accounts.py``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import time
from email.message import Message
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import PASSWORD
from tests.conftest import Mailbox
from tests.integration.test_sso import Agent
from tests.integration.test_sso import User
from tests.integration.test_sso import db_time
from tests.integration.test_sso import new_user
from tests.security.conftest import Fleet
from tests.security.conftest import fresh_user

NEW_PASSWORD = "amber falcon over quiet harbours"  # noqa: S105
OTHER_PASSWORD = "seventeen paper lanterns drifting"  # noqa: S105
MAILS_PER_HOUR = 5  # HEADLESSKEY_RESET_MAX_PER_HOUR, default


def body_of(msg: Message) -> str:
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(msg.get_content_charset() or "utf-8")


def reset_mails(box: Mailbox, to: str) -> list[Message]:
    return [m for m in box.to(to) if str(m["Subject"]).startswith("Reset your")]


def wait_reset_mails(box: Mailbox, to: str, count: int, timeout: float = 10) -> list[Message]:
    deadline = time.monotonic() + timeout
    while len(reset_mails(box, to)) < count:
        assert time.monotonic() < deadline, f"{len(reset_mails(box, to))} reset mails to {to}"
        time.sleep(0.02)
    return reset_mails(box, to)


def link_of(msg: Message) -> dict[str, str]:
    """The login and token of the reset link in ``msg``."""
    urls = re.findall(r"https?://\S+/reset-password\?\S+", body_of(msg))
    assert len(urls) == 1, body_of(msg)
    query = parse_qs(urlsplit(urls[0]).query)
    return {"login": query["login"][0], "token": query["token"][0]}


def code_of(msg: Message) -> str:
    codes: list[str] = re.findall(r"^ +(\d{6})\r?$", body_of(msg), re.MULTILINE)  # its own line
    assert len(codes) == 1, body_of(msg)
    return codes[0]


def forgot(agent: Agent, login: str, delivery: str = "link") -> requests.Response:
    r = agent.post("/forgot-password", json={"login": login, "delivery": delivery})
    assert r.status_code == 200, r.text
    return r


def ask(fleet: Fleet, agent: Agent, user: User, delivery: str) -> Message:
    """Ask for a reset of ``user`` and return the mail it sends."""
    before = len(reset_mails(fleet.mail, user.email))
    forgot(agent, user.username, delivery)
    return wait_reset_mails(fleet.mail, user.email, before + 1)[before]


def ask_link(fleet: Fleet, agent: Agent, user: User) -> dict[str, str]:
    return link_of(ask(fleet, agent, user, "link"))


def ask_code(fleet: Fleet, agent: Agent, user: User) -> str:
    return code_of(ask(fleet, agent, user, "otp"))


def reset(agent: Agent, login: str, password: str = NEW_PASSWORD,
          **secret: str) -> requests.Response:
    return agent.post("/reset-password", json={"login": login, "password": password, **secret})


def assert_refused(r: requests.Response) -> None:
    """REJECT: 400 ``invalid_reset_token`` whatever the reason, and no token."""
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == "invalid_reset_token", body
    assert "token" not in body and "refresh_token" not in body


def logs_in(agent: Agent, login: str, password: str) -> bool:
    r = agent.post("/token", json={"username": login, "password": password})
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


def other_code(code: str, i: int = 1) -> str:
    return f"{(int(code) + i) % 10**6:06d}"


@pytest.fixture
def site(fleet: Fleet) -> Agent:
    return fleet["hs"]


@pytest.mark.case("R-01")
@pytest.mark.parametrize("delivery", ["link", "otp"])
def test_R01_single_use(fleet: Fleet, agent: Agent, delivery: str) -> None:
    """A link or code resets once; replayed (even with another new password) it is refused."""
    user = fresh_user(agent, "r01")
    msg = ask(fleet, agent, user, delivery)
    secret = link_of(msg)["token"] if delivery == "link" else code_of(msg)
    field = "token" if delivery == "link" else "otp"
    assert reset(agent, user.username, **{field: secret}).status_code == 200
    assert_refused(reset(agent, user.username, OTHER_PASSWORD, **{field: secret}))
    assert logs_in(agent, user.username, NEW_PASSWORD)
    assert not logs_in(agent, user.username, OTHER_PASSWORD)


@pytest.mark.case("R-02")
@pytest.mark.parametrize(("delivery", "ttl"), [("link", 3600), ("otp", 600)])
def test_R02_expiry(fleet: Fleet, site: Agent, delivery: str, ttl: int) -> None:
    """The lifetime is explicit (link 1 h, code 10 min, said in the mail); once past it the
    secret is refused and the password unchanged."""
    user = fresh_user(site, "r02")
    msg = ask(fleet, site, user, delivery)
    assert f"expires in {ttl // 60} minutes" in body_of(msg)
    ((created, expires),) = site.rows(
        "SELECT created_at, expires_at FROM hk_password_resets WHERE user_id = ?", user.id)
    lifetime = dt.datetime.fromisoformat(expires) - dt.datetime.fromisoformat(created)
    assert lifetime == dt.timedelta(seconds=ttl)
    # Age the record past its expiry, as a clock moved forward would see it.
    assert site.write("UPDATE hk_password_resets SET expires_at = ? WHERE user_id = ?",
                      db_time(1), user.id) == 1
    secret = {"token": link_of(msg)["token"]} if delivery == "link" else {"otp": code_of(msg)}
    assert_refused(reset(site, user.username, **secret))
    assert logs_in(site, user.username, PASSWORD)


@pytest.mark.case("R-03")
@pytest.mark.parametrize("delivery", ["link", "otp"])
def test_R03_newest_wins(fleet: Fleet, site: Agent, delivery: str) -> None:
    """A second request voids the first secret; the second works."""
    user = fresh_user(site, "r03")
    first, second = (ask(fleet, site, user, delivery) for _ in range(2))
    if delivery == "link":
        old, new = {"token": link_of(first)["token"]}, {"token": link_of(second)["token"]}
    else:
        old, new = {"otp": code_of(first)}, {"otp": code_of(second)}
    if old != new:  # two random codes coincide once in a million
        assert_refused(reset(site, user.username, **old))
    assert reset(site, user.username, **new).status_code == 200
    assert logs_in(site, user.username, NEW_PASSWORD)


@pytest.mark.case("R-04")
def test_R04_code_burned_after_five_wrong_tries(fleet: Fleet, site: Agent) -> None:
    """Five wrong codes burn the code: the right one is then refused; a new one works."""
    user = fresh_user(site, "r04")
    code = ask_code(fleet, site, user)
    for i in range(1, 6):
        assert_refused(reset(site, user.username, otp=other_code(code, i)))
    assert_refused(reset(site, user.username, otp=code))
    assert logs_in(site, user.username, PASSWORD)
    fresh = ask_code(fleet, site, user)
    assert reset(site, user.username, otp=fresh).status_code == 200
    assert logs_in(site, user.username, NEW_PASSWORD)


@pytest.mark.case("R-04")
def test_R04_four_wrong_tries_leave_the_code_usable(fleet: Fleet, site: Agent) -> None:
    """The control: four wrong codes do not burn it."""
    user = fresh_user(site, "r04b")
    code = ask_code(fleet, site, user)
    for i in range(1, 5):
        assert_refused(reset(site, user.username, otp=other_code(code, i)))
    assert reset(site, user.username, otp=code).status_code == 200


@pytest.mark.case("R-05")
@pytest.mark.parametrize("delivery", ["link", "otp"])
def test_R05_bound_to_its_user_and_site(fleet: Fleet, delivery: str) -> None:
    """A's code or link, presented for B (B with a pending reset of their own), or at another
    site where A's name also exists, is refused; both accounts keep their passwords."""
    hs, rs = fleet["hs"], fleet["rs"]
    a, b = fresh_user(hs, "r05a"), fresh_user(hs, "r05b")
    namesake = new_user(rs, a.username)  # the same name at another site
    msg_a = ask(fleet, hs, a, delivery)
    msg_b = ask(fleet, hs, b, delivery)
    field = "token" if delivery == "link" else "otp"
    secret_a = link_of(msg_a)["token"] if delivery == "link" else code_of(msg_a)
    secret_b = link_of(msg_b)["token"] if delivery == "link" else code_of(msg_b)
    if secret_a != secret_b:
        assert_refused(reset(hs, b.username, **{field: secret_a}))
        assert_refused(reset(hs, b.email, **{field: secret_a}))
    assert_refused(reset(rs, namesake.username, **{field: secret_a}))
    assert logs_in(hs, b.username, PASSWORD) and logs_in(rs, namesake.username, PASSWORD)
    # Control: each secret works for its own user.
    assert reset(hs, a.username, **{field: secret_a}).status_code == 200
    assert reset(hs, b.username, OTHER_PASSWORD, **{field: secret_b}).status_code == 200


@pytest.mark.case("R-06")
def test_R06_entropy_and_storage(fleet: Fleet, site: Agent) -> None:
    """Codes are 6 digits, link tokens at least 128 bits; neither is stored as sent nor as a
    plain hash of itself (a keyed digest), and consecutive ones differ."""
    user = fresh_user(site, "r06")
    tokens = [ask_link(fleet, site, user)["token"] for _ in range(2)]
    codes = [ask_code(fleet, site, user) for _ in range(2)]
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", token), token  # >= 256 bits, base64url
    assert tokens[0] != tokens[1]
    assert all(re.fullmatch(r"\d{6}", c) for c in codes)
    stored = [row[0] for row in site.rows(
        "SELECT secret_hash FROM hk_password_resets WHERE user_id = ? ORDER BY id", user.id)]
    assert len(stored) == 4
    for value in stored:
        assert re.fullmatch(r"[0-9a-f]{64}", value), value
    for secret in tokens + codes:
        plain = {secret, hashlib.sha256(secret.encode()).hexdigest(),
                 hashlib.sha256(f"{user.id}|link|{secret}".encode()).hexdigest(),
                 hashlib.sha256(f"{user.id}|otp|{secret}".encode()).hexdigest()}
        assert plain.isdisjoint(stored)
    assert len(set(stored)) == 4


@pytest.mark.case("R-08")
def test_R08_no_leak_of_the_reset_secret(fleet: Fleet, site: Agent) -> None:
    """The recovery answers carry ``Referrer-Policy: no-referrer`` and ``no-store``; the agent
    serves no page at the link (the reset page is the frontend's, at RESET_URL), and neither the
    token nor the code reaches the site's log."""
    user = fresh_user(site, "r08")
    link = ask_link(fleet, site, user)
    code = ask_code(fleet, site, user)
    answers = [
        forgot(site, "nobody@example.com"),
        reset(site, user.username, otp=other_code(code)),
        reset(site, user.username, otp=code),
    ]
    for r in answers:
        assert r.headers.get("Referrer-Policy") == "no-referrer", r.headers
        assert r.headers.get("Cache-Control") == "no-store", r.headers
        assert r.headers.get("X-Content-Type-Options") == "nosniff"
        assert link["token"] not in r.text and code not in r.text
    page = requests.get(f"{site.base}/reset-password", params=link, timeout=10)
    assert page.status_code == 404, page.text[:200]
    assert link["token"] not in page.text
    assert site.service is not None
    log = site.service.logs()
    assert link["token"] not in log and code not in log


@pytest.mark.case("R-09")
def test_R09_reset_ends_every_session(fleet: Fleet, agent: Agent) -> None:
    """Two sessions before the reset: afterwards their access and refresh tokens are refused."""
    user = fresh_user(agent, "r09")
    second = agent.post("/token", json={"username": user.username, "password": PASSWORD}).json()
    third = agent.post("/token", json={"username": user.username, "password": PASSWORD}).json()
    assert agent.get("/me", token=second["token"]).status_code == 200
    link = ask_link(fleet, agent, user)
    assert reset(agent, user.username, token=link["token"]).status_code == 200
    for token in (user.token, second["token"], third["token"]):
        r = agent.get("/me", token=token)
        assert r.status_code == 401 and r.json()["code"] == "invalid_token", r.text
        v = agent.post("/token/validate", json={"token": token})
        assert v.status_code == 401, v.text
    for refresh in (second["refresh_token"], third["refresh_token"]):
        r = agent.post("/token/refresh", json={"refresh_token": refresh})
        assert r.status_code in (400, 401), r.text
        assert "token" not in r.json()
    assert logs_in(agent, user.username, NEW_PASSWORD)


@pytest.mark.case("R-11")
def test_R11_owner_is_told(fleet: Fleet, site: Agent) -> None:
    """A reset and a change each mail the owner a notice (and nobody else)."""
    user = fresh_user(site, "r11")
    link = ask_link(fleet, site, user)
    assert reset(site, user.username, token=link["token"]).status_code == 200
    notices = fleet.mail.wait_for(user.email, 2)
    changed = [m for m in notices if "password was changed" in str(m["Subject"])]
    assert len(changed) == 1, [m["Subject"] for m in notices]
    assert user.username in body_of(changed[0])
    assert link["token"] not in body_of(changed[0])

    session = site.post("/token", json={"username": user.username,
                                        "password": NEW_PASSWORD}).json()
    r = site.post("/change-password", token=session["token"],
                  json={"current_password": NEW_PASSWORD, "new_password": OTHER_PASSWORD})
    assert r.status_code == 200, r.text
    notices = fleet.mail.wait_for(user.email, 3)
    assert sum("password was changed" in str(m["Subject"]) for m in notices) == 2


@pytest.mark.case("R-12", "A-05")
def test_R12_reset_mails_are_throttled_silently(fleet: Fleet, site: Agent) -> None:
    """100 requests for one account within a minute send 5 mails; every answer (first,
    throttled, or for an unknown email) is the same 200."""
    user = fresh_user(site, "r12")
    unknown = f"nobody{secrets.token_hex(4)}@example.com"
    mark = site.last_audit_id()
    answers: list[requests.Response] = []
    started = time.monotonic()
    for i in range(100):
        answers.append(site.post("/forgot-password", json={"login": user.email}))
        if i % 10 == 0:
            answers.append(site.post("/forgot-password", json={"login": unknown}))
    assert time.monotonic() - started < 60
    first = answers[0]
    assert all((r.status_code, r.json()) == (first.status_code, first.json()) for r in answers)
    assert first.status_code == 200
    wait_reset_mails(fleet.mail, user.email, MAILS_PER_HOUR)
    # The rows are written after the answers, by each worker's background thread, in turn:
    # wait for all 100 of the account's (a loaded machine may take seconds to write them).
    deadline = time.monotonic() + 60
    while len(outcomes := [row["outcome"] for row in site.audit("password.reset_requested", mark)
                           if row["user_id"] == user.id]) < 100:
        assert time.monotonic() < deadline, f"{len(outcomes)} of 100 requests recorded"
        time.sleep(0.1)
    time.sleep(0.5)  # anything more would be on its way by now
    assert len(reset_mails(fleet.mail, user.email)) == MAILS_PER_HOUR
    assert reset_mails(fleet.mail, unknown) == []
    outcomes = [row["outcome"] for row in site.audit("password.reset_requested", mark)
                if row["user_id"] == user.id]
    assert outcomes.count("success") == MAILS_PER_HOUR
    assert outcomes.count("blocked") == 100 - MAILS_PER_HOUR
    # The newest mailed link still works: the throttled requests voided nothing.
    links = [link_of(m)["token"] for m in reset_mails(fleet.mail, user.email)]
    statuses = [reset(site, user.username, token=token).status_code for token in links]
    assert sorted(statuses) == [200] + [400] * (MAILS_PER_HOUR - 1), statuses
