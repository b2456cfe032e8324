"""Password recovery over HTTP with a real SMTP server: links, one-time codes, and their limits."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import re
import time
import typing as t
from email.message import Message
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import text

from tests.conftest import PASSWORD
from tests.conftest import Mailbox
from tests.conftest import Site

NEW_PASSWORD = "amber falcon over quiet harbours"
OTHER_PASSWORD = "seventeen paper lanterns drifting"
ALICE = "alice@example.com"
BOB = "bob@example.com"


@pytest.fixture
def rsite(smtp: Mailbox, make_site: t.Any) -> Site:
    """An HS256 site that mails through the loopback SMTP server, with alice and bob.

    ``smtp`` comes first so it is torn down last, after the site's mailer has flushed.
    """
    s = make_site("HS256", mailbox=smtp)
    s.create_user("alice")
    s.create_user("bob")
    return t.cast(Site, s)


def body_of(msg: Message) -> str:
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(msg.get_content_charset() or "utf-8")


def reset_mails(box: Mailbox, to: str) -> list[Message]:
    """The reset mails (not the "password changed" notices) received for ``to``."""
    return [m for m in box.to(to) if m["Subject"].startswith("Reset your")]


def forgot(site: Site, login: str, delivery: str, to: str) -> Message:
    """Ask for a reset and return the reset mail it sends to ``to``."""
    box = site.mailbox
    assert box is not None
    before = len(reset_mails(box, to))
    r = site.api.post("/forgot-password", json={"login": login, "delivery": delivery})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while len(reset_mails(box, to)) <= before:
        assert time.monotonic() < deadline, f"no reset mail to {to}"
        time.sleep(0.02)
    return reset_mails(box, to)[before]


def link_of(msg: Message) -> dict[str, str]:
    urls = re.findall(r"https://app\.example/reset\?\S+", body_of(msg))
    assert len(urls) == 1, body_of(msg)
    parts = urlsplit(urls[0])
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "app.example", "/reset")
    query = parse_qs(parts.query)
    return {"login": query["login"][0], "token": query["token"][0]}


def code_of(msg: Message) -> str:
    codes = re.findall(r"(?<!\d)\d{6}(?!\d)", body_of(msg))
    assert len(codes) == 1, body_of(msg)
    return codes[0]


def request_link(site: Site, login: str = "alice", to: str = ALICE) -> dict[str, str]:
    return link_of(forgot(site, login, "link", to))


def request_code(site: Site, login: str = "alice", to: str = ALICE) -> str:
    return code_of(forgot(site, login, "otp", to))


def reset(site: Site, **body: str) -> requests.Response:
    body.setdefault("password", NEW_PASSWORD)
    return site.api.post("/reset-password", json=body)


def assert_invalid(r: requests.Response) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_reset_token"


def can_log_in(site: Site, login: str, password: str) -> bool:
    r = site.api.post("/token", json={"username": login, "password": password})
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


def wrong_code(code: str, i: int = 1) -> str:
    return f"{(int(code) + i) % 10**6:06d}"


def test_forgot_password_answers_the_same_for_everyone(rsite: Site, smtp: Mailbox) -> None:
    # Unknown accounts first: the mailer sends in order, so once alice's mails are in,
    # anything queued for the unknown ones would have arrived too.
    answers = [
        rsite.api.post("/forgot-password", json={"login": login, "delivery": "link"})
        for login in ("nobody", "ghost@example.com", "alice", "ALICE@example.com")
    ]
    assert [r.status_code for r in answers] == [200] * 4
    assert all(r.json() == answers[0].json() for r in answers)
    assert answers[0].json()["success"] is True
    assert answers[0].json()["code"] == "password_reset_requested"
    mails = smtp.wait_for(ALICE, 2)
    assert all("reset" in m["Subject"].lower() for m in mails)
    assert smtp.to("ghost@example.com") == []
    assert smtp.to(BOB) == []
    assert {m["To"] for m in smtp.messages} == {ALICE}
    # Only accounts that exist get a reset row.
    assert rsite.scalar("SELECT count(*) FROM hk_password_resets WHERE user_id != 1") == 0


def test_an_unmailable_stored_address_answers_as_any_other(
    rsite: Site, smtp: Mailbox, caplog: pytest.LogCaptureFixture
) -> None:
    """An address stored before the stricter check, which the mail header parser cannot take:
    no 500, the same answer as for everyone, a masked line in the log, and no mail."""
    with rsite.state.engine.begin() as conn:
        conn.execute(text("UPDATE hk_users SET email = 'bob@[example.com' WHERE id = 2"))
    caplog.set_level(logging.ERROR, logger="headlesskey.mail")
    r = rsite.api.post("/forgot-password", json={"login": "bob"})
    assert r.status_code == 200, r.text
    assert r.json()["code"] == "password_reset_requested"
    rsite.state.background.drain()  # the request is handled after the answer
    assert "mail to b***@[example.com not sent" in caplog.text
    rsite.api.post("/forgot-password", json={"login": "alice"})
    smtp.wait_for(ALICE)
    assert {m["To"] for m in smtp.messages} == {ALICE}


def test_reset_by_link(rsite: Site) -> None:
    link = request_link(rsite)
    assert link["login"] == "alice"
    r = reset(rsite, login=link["login"], token=link["token"])
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    assert r.json()["code"] == "password_reset"
    assert can_log_in(rsite, "alice", NEW_PASSWORD)
    assert not can_log_in(rsite, "alice", PASSWORD)
    # bob is untouched.
    assert can_log_in(rsite, "bob", PASSWORD)


def test_reset_by_code(rsite: Site) -> None:
    code = request_code(rsite)
    assert re.fullmatch(r"\d{6}", code)
    r = reset(rsite, login="alice", otp=code)
    assert r.status_code == 200, r.text
    assert can_log_in(rsite, "alice", NEW_PASSWORD)
    assert not can_log_in(rsite, "alice", PASSWORD)


@pytest.mark.parametrize(
    "written",
    ["{a} {b}", "{a}-{b}", " {a}{b} ", "\t{a} - {b} ", "{a}\u00a0{b}", "{a1} {a2} {b1} {b2}"],
)
def test_a_code_pasted_with_spaces_or_dashes_works(rsite: Site, written: str) -> None:
    """A code as people copy it out of a mail or type it in groups is the code: no wrong try."""
    code = request_code(rsite)
    typed = written.format(a=code[:3], b=code[3:], a1=code[:2], a2=code[2:3],
                           b1=code[3:5], b2=code[5:])
    r = reset(rsite, login="alice", otp=typed)
    assert r.status_code == 200, r.text
    assert rsite.scalar("SELECT attempts FROM hk_password_resets WHERE kind = 'otp'") == 0
    assert can_log_in(rsite, "alice", NEW_PASSWORD)
    assert rsite.scalar(
        "SELECT count(*) FROM hk_audit WHERE event = 'password.reset' AND outcome = 'failure'"
    ) == 0


def test_a_wrong_code_with_spaces_is_still_a_wrong_try(rsite: Site) -> None:
    code = request_code(rsite)
    wrong = wrong_code(code)
    assert_invalid(reset(rsite, login="alice", otp=f" {wrong[:3]} - {wrong[3:]} "))
    # Other characters are not taken out: a code with them is wrong.
    assert_invalid(reset(rsite, login="alice", otp=f"{code[:3]}.{code[3:]}"))
    assert rsite.scalar("SELECT attempts FROM hk_password_resets WHERE kind = 'otp'") == 2
    # A line break is a control character, refused in the code as in every field.
    r = reset(rsite, login="alice", otp=f"{code}\n")
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    assert rsite.scalar("SELECT attempts FROM hk_password_resets WHERE kind = 'otp'") == 2
    assert reset(rsite, login="alice", otp=code).status_code == 200


def test_link_works_once(rsite: Site) -> None:
    link = request_link(rsite)
    assert reset(rsite, **link).status_code == 200
    assert_invalid(reset(rsite, **link, password=OTHER_PASSWORD))
    assert can_log_in(rsite, "alice", NEW_PASSWORD)
    assert not can_log_in(rsite, "alice", OTHER_PASSWORD)


def test_code_works_once(rsite: Site) -> None:
    code = request_code(rsite)
    assert reset(rsite, login="alice", otp=code).status_code == 200
    assert_invalid(reset(rsite, login="alice", otp=code, password=OTHER_PASSWORD))
    assert can_log_in(rsite, "alice", NEW_PASSWORD)


def test_link_expires_after_an_hour(rsite: Site) -> None:
    link = request_link(rsite)
    rsite.clock.advance(3601)
    assert_invalid(reset(rsite, **link))
    assert can_log_in(rsite, "alice", PASSWORD)


def test_link_works_within_the_hour(rsite: Site) -> None:
    link = request_link(rsite)
    rsite.clock.advance(3500)
    assert reset(rsite, **link).status_code == 200


def test_code_expires_after_ten_minutes(rsite: Site) -> None:
    code = request_code(rsite)
    rsite.clock.advance(601)
    assert_invalid(reset(rsite, login="alice", otp=code))
    assert can_log_in(rsite, "alice", PASSWORD)


def test_code_works_within_ten_minutes(rsite: Site) -> None:
    code = request_code(rsite)
    rsite.clock.advance(540)
    assert reset(rsite, login="alice", otp=code).status_code == 200


def test_newest_request_wins(rsite: Site) -> None:
    first = request_link(rsite)
    second = request_link(rsite)
    assert first["token"] != second["token"]
    assert_invalid(reset(rsite, **first))
    assert reset(rsite, **second).status_code == 200
    assert can_log_in(rsite, "alice", NEW_PASSWORD)


def test_reset_mails_are_limited_per_account(rsite: Site, smtp: Mailbox) -> None:
    """Five reset mails per account per hour; more requests get the same answer and no mail."""
    for _ in range(5):
        request_link(rsite)
    answers = [rsite.api.post("/forgot-password", json={"login": login, "delivery": "link"})
               for login in ("alice", "alice", "nobody")]
    assert [r.status_code for r in answers] == [200] * 3
    assert all(r.json() == answers[0].json() for r in answers)
    request_link(rsite, "bob", BOB)  # other accounts are not affected; bob's mail comes after
    assert len(reset_mails(smtp, ALICE)) == 5
    assert rsite.scalar("SELECT count(*) FROM hk_audit WHERE event = 'password.reset_requested' "
                        "AND outcome = 'blocked'") == 2
    rsite.clock.advance(3601)
    assert request_link(rsite)["token"]  # an hour later, mails go out again


def test_newest_code_wins(rsite: Site) -> None:
    first = request_code(rsite)
    second = request_code(rsite)
    if first != second:  # two random codes may coincide (one chance in a million)
        assert_invalid(reset(rsite, login="alice", otp=first))
    assert reset(rsite, login="alice", otp=second).status_code == 200


def test_code_is_burned_after_five_wrong_tries(smtp: Mailbox, make_site: t.Any) -> None:
    # A lockout threshold above the code's own limit isolates the code's rule.
    rsite = make_site("HS256", mailbox=smtp, HEADLESSKEY_LOCKOUT_MAX_FAILURES=10)
    rsite.create_user("alice")
    code = request_code(rsite)
    for i in range(1, 6):
        assert_invalid(reset(rsite, login="alice", otp=wrong_code(code, i)))
    assert_invalid(reset(rsite, login="alice", otp=code))
    assert rsite.scalar("SELECT used_at FROM hk_password_resets WHERE kind = 'otp'") is not None
    assert rsite.scalar("SELECT attempts FROM hk_password_resets WHERE kind = 'otp'") == 5
    assert can_log_in(rsite, "alice", PASSWORD)
    assert not can_log_in(rsite, "alice", NEW_PASSWORD)


def test_concurrent_wrong_codes_are_each_counted(smtp: Mailbox, make_site: t.Any) -> None:
    """Wrong codes sent at once (the server answers each in a thread of its own) all count
    against the code: none is lost to another's write of the same counter."""
    rsite = make_site("HS256", mailbox=smtp, HEADLESSKEY_LOCKOUT_MAX_FAILURES=100,
                      HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES=1000,
                      HEADLESSKEY_RESET_OTP_MAX_ATTEMPTS=20)
    rsite.create_user("alice")
    code = request_code(rsite)
    guesses = 12

    def guess(i: int) -> requests.Response:
        return requests.post(rsite.api.url("/reset-password"), timeout=30, json={
            "login": "alice", "otp": wrong_code(code, i), "password": NEW_PASSWORD})

    with concurrent.futures.ThreadPoolExecutor(guesses) as pool:
        for r in pool.map(guess, range(1, guesses + 1)):
            assert_invalid(r)
    assert rsite.scalar("SELECT attempts FROM hk_password_resets WHERE kind = 'otp'") == guesses


def test_concurrent_requests_send_at_most_the_hourly_mails(smtp: Mailbox, make_site: t.Any) -> None:
    """Forgot-password posted for one account many times at once (each answered in a thread of
    its own): at most ``RESET_MAX_PER_HOUR`` resets are stored and mailed, and only the newest
    works. (The requests are handled after their answers, on the background thread; across
    workers and instances, each locks the account's row while it counts and stores.)"""
    rsite = make_site("HS256", mailbox=smtp, HEADLESSKEY_RESET_MAX_PER_HOUR=3,
                      HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES=1000)
    rsite.create_user("alice")

    def ask(_: int) -> requests.Response:
        return requests.post(rsite.api.url("/forgot-password"), timeout=30,
                             json={"login": "alice", "delivery": "otp"})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for r in pool.map(ask, range(16)):
            assert r.status_code == 200, r.text
    rsite.state.background.drain()
    assert rsite.scalar("SELECT count(*) FROM hk_password_resets") == 3
    assert rsite.scalar("SELECT count(*) FROM hk_password_resets WHERE used_at IS NULL") == 1
    smtp.wait_for(ALICE, count=3)
    time.sleep(0.5)  # a fourth mail, if any, would be in by now
    assert len(reset_mails(smtp, ALICE)) == 3


def test_wrong_codes_count_toward_the_account_lockout(rsite: Site) -> None:
    code = request_code(rsite)
    for i in range(1, 6):
        assert_invalid(reset(rsite, login="alice", otp=wrong_code(code, i)))
    # The sixth try is refused by the lockout before the code is even looked at.
    locked = reset(rsite, login="alice", otp=code)
    assert locked.status_code == 429
    assert locked.json()["code"] == "too_many_attempts"
    assert int(locked.headers["Retry-After"]) > 0
    assert rsite.api.post("/token",
                          json={"username": "alice", "password": PASSWORD}).status_code == 429


def test_four_wrong_tries_leave_the_code_usable(rsite: Site) -> None:
    code = request_code(rsite)
    for i in range(1, 5):
        assert_invalid(reset(rsite, login="alice", otp=wrong_code(code, i)))
    assert rsite.scalar("SELECT used_at FROM hk_password_resets WHERE kind = 'otp'") is None
    r = reset(rsite, login="alice", otp=code)
    assert r.status_code == 200, r.text
    assert can_log_in(rsite, "alice", NEW_PASSWORD)


def test_code_is_bound_to_its_user(rsite: Site) -> None:
    alice_code = request_code(rsite)
    bob_code = request_code(rsite, "bob", BOB)
    if alice_code == bob_code:  # one chance in a million
        bob_code = request_code(rsite, "bob", BOB)
    assert_invalid(reset(rsite, login="bob", otp=alice_code))
    assert can_log_in(rsite, "bob", PASSWORD)
    assert not can_log_in(rsite, "bob", NEW_PASSWORD)
    # The code still belongs to alice.
    assert reset(rsite, login="alice", otp=alice_code).status_code == 200


def test_link_is_bound_to_its_user(rsite: Site) -> None:
    link = request_link(rsite)
    request_link(rsite, "bob", BOB)
    assert_invalid(reset(rsite, login="bob", token=link["token"]))
    assert can_log_in(rsite, "bob", PASSWORD)


def test_reset_ends_every_session(rsite: Site) -> None:
    one = rsite.api.login()
    two = rsite.api.login()
    bobs = rsite.api.login("bob")
    for pair in (one, two):
        assert rsite.api.get("/me", token=pair["token"]).status_code == 200
    code = request_code(rsite)
    assert reset(rsite, login="alice", otp=code).status_code == 200
    for pair in (one, two):
        me = rsite.api.get("/me", token=pair["token"])
        assert me.status_code == 401
        refreshed = rsite.api.post("/token/refresh", json={"refresh_token": pair["refresh_token"]})
        assert refreshed.status_code == 400
    # Another user's session is not touched.
    assert rsite.api.get("/me", token=bobs["token"]).status_code == 200


def test_owner_is_told_the_password_changed(rsite: Site, smtp: Mailbox) -> None:
    link = request_link(rsite)
    assert reset(rsite, **link).status_code == 200
    reset_mail, notice = smtp.wait_for(ALICE, 2)
    assert "reset" in reset_mail["Subject"].lower()
    assert "changed" in notice["Subject"].lower()
    assert "changed" in body_of(notice)
    # The notice does not carry the new password.
    assert NEW_PASSWORD not in body_of(notice)


def test_weak_new_password_does_not_spend_the_token(rsite: Site) -> None:
    link = request_link(rsite)
    weak = reset(rsite, **link, password="password123")
    assert weak.status_code == 400
    assert weak.json()["code"] == "weak_password"
    assert "password" in weak.json()["data"]["fields"]
    assert can_log_in(rsite, "alice", PASSWORD)
    assert reset(rsite, **link).status_code == 200
    assert can_log_in(rsite, "alice", NEW_PASSWORD)


def test_weak_new_password_does_not_spend_the_code(rsite: Site) -> None:
    code = request_code(rsite)
    weak = reset(rsite, login="alice", otp=code, password="alice-secret-words")
    assert weak.status_code == 400
    assert weak.json()["code"] == "weak_password"
    assert reset(rsite, login="alice", otp=code).status_code == 200


def test_reset_secrets_are_stored_as_keyed_digests(rsite: Site) -> None:
    token = request_link(rsite)["token"]
    link_hash = rsite.scalar("SELECT secret_hash FROM hk_password_resets WHERE kind = 'link'")
    code = request_code(rsite)
    code_hash = rsite.scalar("SELECT secret_hash FROM hk_password_resets WHERE kind = 'otp'")
    for secret, stored in ((token, link_hash), (code, code_hash)):
        assert stored
        assert stored != secret
        assert secret not in stored
        # Not a plain hash either: a stolen table must not let anyone test 10^6 codes offline.
        assert stored != hashlib.sha256(secret.encode()).hexdigest()
    assert rsite.scalar(
        "SELECT count(*) FROM hk_password_resets WHERE secret_hash = :t OR secret_hash = :c",
        t=token,
        c=code,
    ) == 0


def test_no_secrets_in_logs(rsite: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    link = request_link(rsite)
    assert reset(rsite, **link).status_code == 200
    code = request_code(rsite)
    assert reset(rsite, login="alice", otp=code, password=OTHER_PASSWORD).status_code == 200
    assert can_log_in(rsite, "alice", OTHER_PASSWORD)
    assert rsite.mailbox is not None
    rsite.mailbox.wait_for(ALICE, 4)  # both reset mails and both notices went out
    # aiosmtpd ("mail.*") is the test's own SMTP server, which logs what it receives.
    records = [r for r in caplog.records if not r.name.startswith("mail.")]
    messages = [r.getMessage() for r in records]
    # The server's request log was captured, so a leak would have been seen.
    assert any("/reset-password" in m for m in messages)
    for secret in (link["token"], code, NEW_PASSWORD, OTHER_PASSWORD):
        leaks = [m for m in messages if secret in m]
        assert leaks == [], leaks


def test_a_reset_and_new_requests_at_once_never_fail_on_each_other(
    smtp: Mailbox, make_site: t.Any,
) -> None:
    """A reset with the right code while new resets of the account are requested: each request
    is answered as alone (the reset 200 or, voided by a newer request, invalid_reset_token;
    every request 200), never 503 because the two waited on each other's rows."""
    rsite = make_site("HS256", mailbox=smtp, HEADLESSKEY_RESET_MAX_PER_HOUR=100,
                      HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES=1000,
                      # A hash slow enough for the requests to meet while it runs.
                      HEADLESSKEY_ARGON2_TIME_COST=2, HEADLESSKEY_ARGON2_MEMORY_COST=65536)
    rsite.create_user("alice")
    for _round in range(3):
        code = request_code(rsite)

        def send(i: int, code: str = code) -> requests.Response:
            if i == 0:
                return reset(rsite, login="alice", otp=code)
            time.sleep(0.01 * i)
            return requests.post(rsite.api.url("/forgot-password"), timeout=30,
                                 json={"login": "alice", "delivery": "otp"})

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(send, range(6)))
        if answers[0].status_code != 200:
            assert_invalid(answers[0])
        for r in answers[1:]:
            assert r.status_code == 200, r.text


def test_a_reset_and_logins_at_once_never_fail_on_each_other(
    smtp: Mailbox, make_site: t.Any,
) -> None:
    """A reset with the right code while the account logs in with its old password: the reset
    answers 200 and each login 200 (before it) or 401 (after it), never 503 because the two
    waited on each other's rows (the account's and its brute-force counter's)."""
    rsite = make_site("HS256", mailbox=smtp, HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES=1000,
                      HEADLESSKEY_LOCKOUT_MAX_FAILURES=100,
                      # A hash slow enough for the requests to meet while it runs.
                      HEADLESSKEY_ARGON2_TIME_COST=2, HEADLESSKEY_ARGON2_MEMORY_COST=65536)
    rsite.create_user("alice")
    for n in range(3):
        password = PASSWORD if n == 0 else f"{NEW_PASSWORD} {n - 1}"
        code = request_code(rsite)

        def send(i: int, code: str = code, password: str = password,
                 n: int = n) -> requests.Response:
            if i == 0:
                return reset(rsite, login="alice", otp=code, password=f"{NEW_PASSWORD} {n}")
            time.sleep(0.015 * i)
            return requests.post(rsite.api.url("/token"), timeout=30,
                                 json={"username": "alice", "password": password})

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(send, range(6)))
        assert answers[0].status_code == 200, answers[0].text
        for r in answers[1:]:
            assert r.status_code in (200, 401), r.text


@pytest.mark.parametrize("delivery", ["otp", "link"])
def test_a_code_or_link_of_an_account_disabled_since_does_not_work(
    rsite: Site, smtp: Mailbox, delivery: str,
) -> None:
    """A disabled account gets no reset mail, and one mailed before the disable no longer
    works: the password stays as it was, and nobody is mailed that it changed."""
    mail = forgot(rsite, "alice", delivery, ALICE)
    secret = {"otp": code_of(mail)} if delivery == "otp" else {"token": link_of(mail)["token"]}
    with rsite.db() as db:
        db.execute(text("UPDATE hk_users SET status = 'disabled' WHERE login_key = 'alice'"))
        db.commit()
    assert_invalid(reset(rsite, login="alice", **secret))
    with rsite.db() as db:
        db.execute(text("UPDATE hk_users SET status = 'active' WHERE login_key = 'alice'"))
        db.commit()
    assert can_log_in(rsite, "alice", PASSWORD)
    assert not can_log_in(rsite, "alice", NEW_PASSWORD)
    assert not [m for m in smtp.to(ALICE) if "changed" in m["Subject"]]


def test_a_reset_page_with_a_query_of_its_own_gets_a_working_link(
    smtp: Mailbox, make_site: t.Any,
) -> None:
    """``RESET_URL`` may carry a query of its own (a language, a tenant): the link adds login and
    token to it, and they reset the password."""
    rsite = make_site("HS256", mailbox=smtp,
                      HEADLESSKEY_RESET_URL="https://app.example/reset?lang=fr")
    rsite.create_user("alice")
    urls = re.findall(r"https://app\.example/reset\?\S+", body_of(forgot(rsite, "alice", "link",
                                                                          ALICE)))
    assert len(urls) == 1
    query = parse_qs(urlsplit(urls[0]).query)
    assert query["lang"] == ["fr"]
    assert query["login"] == ["alice"]
    r = reset(rsite, login=query["login"][0], token=query["token"][0])
    assert r.status_code == 200, r.text
    assert can_log_in(rsite, "alice", NEW_PASSWORD)


# ---------------------------------------------------------------------------------------------
# The answer to /forgot-password is not timed by the account's lookup


def test_the_answer_does_not_wait_for_the_accounts_rows(rsite: Site, smtp: Mailbox) -> None:
    """While another transaction holds the database's writes (an account's row, on PostgreSQL;
    the whole file, on SQLite), /forgot-password still answers at once, for an existing account
    as for an unknown one: the lookup and the rows come after the answer, so its time tells
    nothing about which accounts exist. The mail goes out once the database is free."""
    with rsite.state.engine.connect() as conn:
        held = conn.begin()  # on SQLite, the agent's engine begins IMMEDIATE: the writer's lock
        conn.execute(text("SELECT id FROM hk_users FOR UPDATE" if conn.dialect.name != "sqlite"
                          else "UPDATE hk_users SET display_name = display_name"))
        for login in ("alice", "nobody-here"):
            started = time.monotonic()
            r = rsite.api.post("/forgot-password", json={"login": login, "delivery": "otp"})
            took = time.monotonic() - started
            assert r.status_code == 200 and r.json()["code"] == "password_reset_requested"
            assert took < 1.0, (login, took)
        time.sleep(0.3)
        assert smtp.messages == []
        held.rollback()
    code = code_of(smtp.wait_for(ALICE)[0])
    assert reset(rsite, login="alice", otp=code).status_code == 200
    rsite.state.background.drain()
    assert rsite.scalar("SELECT count(*) FROM hk_audit WHERE event = 'password.reset_requested'"
                        " AND outcome = 'ignored'") == 1


def test_a_request_made_while_the_database_is_down_is_stored_when_it_is_back(
    smtp: Mailbox, make_site: t.Any, pg_proxy: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The database cannot be reached when the request is handled: it is tried again (after 1,
    3 and 10 s), so the code is mailed once the database is back; the log says nothing of the
    login."""
    from tests.conftest import fresh_schema

    proxy, url = pg_proxy
    site = make_site("HS256", mailbox=smtp, HEADLESSKEY_DATABASE_URL=fresh_schema(url, 91))
    site.create_user("alice")
    proxy.stop()
    r = site.api.post("/forgot-password", json={"login": "alice", "delivery": "otp"})
    assert r.status_code == 200, r.text
    time.sleep(1.5)  # the first try and the first retry fail
    proxy.start()
    code = code_of(smtp.wait_for(ALICE, timeout=15)[0])
    assert reset(site, login="alice", otp=code).status_code == 200
    assert "alice" not in caplog.text


def test_a_full_queue_is_a_503_for_everyone() -> None:
    """At most ``limit`` requests wait for the background thread; one more is 503 at once
    (whatever its login), or, given a ``wait``, once none freed in that time."""
    import threading

    from agent.background import Background
    from agent.errors import ServiceUnavailable

    background = Background(limit=2, wait=0.2)
    release = threading.Event()
    ran: list[int] = []
    try:
        background.submit(release.wait, 10)
        background.submit(ran.append, 1)
        with pytest.raises(ServiceUnavailable):
            background.submit(ran.append, 2)
        background.wait_for_place = 0
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            background.submit(ran.append, 2)
        assert time.monotonic() - started < 0.1
        release.set()
        background.drain()
        background.submit(ran.append, 3)
        background.drain()
        assert ran == [1, 3]
    finally:
        release.set()
        background.shutdown()
