"""Checklist section 4: registration, login, lockout and the password policy, over HTTP.

The fleet's sites answer the cases that need no special settings. The lockout cases run
against a site of their own with tight limits (3 failures per account, 8 per client IP, a first
lock of 2 s); each test there talks from a loopback address of its own (127.0.0.x), so the
per-IP counters of one test never touch another's.
"""

from __future__ import annotations

import secrets
import string
import time
import typing as t
from pathlib import Path

import pytest
import requests

from tests.conftest import PASSWORD
from tests.conftest import Mailbox
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Federation
from tests.integration.test_sso import User
from tests.integration.test_sso import session_from
from tests.security.conftest import Fleet
from tests.security.conftest import fresh_user
from tests.security.conftest import smtp_settings

ACCOUNT_LIMIT = 3  # failures per account before a lock
IP_LIMIT = 8  # failures per client IP before a lock
LOCK_SECONDS = 2  # the first lock
TIGHT = {
    "HEADLESSKEY_LOCKOUT_MAX_FAILURES": str(ACCOUNT_LIMIT),
    "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": str(IP_LIMIT),
    "HEADLESSKEY_LOCKOUT_DURATION": str(LOCK_SECONDS),
    "HEADLESSKEY_LOCKOUT_WINDOW": "900",
}
WRONG = "not the password at all"  # noqa: S105


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, mail: Mailbox) -> t.Iterator[Agent]:
    """One site (``x``, ES256) with tight lockout limits, mailing to the suite's SMTP server."""
    root: Path = tmp_path_factory.mktemp("tight-lockout")
    fed = Federation.build(root, ["x"], **TIGHT, **smtp_settings(mail))
    try:
        yield fed["x"]
    finally:
        fed.stop()


_next_address = iter(range(20, 250))


def new_address() -> requests.Session:
    """A client session from a loopback address no other test uses (a fresh IP counter)."""
    return session_from(f"127.0.0.{next(_next_address)}")


def attempt(agent: Agent, login: str, password: str, *, path: str = "/token",
            session: requests.Session | None = None,
            headers: dict[str, str] | None = None) -> requests.Response:
    field = "email" if "@" in login else "username"
    return (session or agent.http).post(
        agent.base + "/wp-json/headlesskey/v1" + path, json={field: login, "password": password},
        headers=headers or {}, timeout=30)


def answer(r: requests.Response) -> tuple[int, t.Any]:
    """What a client sees of a refusal: status and body (Retry-After is compared apart)."""
    return r.status_code, r.json()


def assert_no_tokens(r: requests.Response) -> None:
    body = r.json()
    assert "token" not in body and "refresh_token" not in body, body
    assert "Set-Cookie" not in r.headers, r.headers


def still_works(agent: Agent, user: User) -> None:
    """The persistence check: the user's original token is still accepted."""
    r = agent.get("/me", token=user.token)
    assert r.status_code == 200, r.text


def random_password(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def register(agent: Agent, username: str, password: str, **extra: t.Any) -> requests.Response:
    return agent.post("/register", json={"username": username, "email": f"{username}@example.com",
                                         "password": password, **extra})


# --- the fleet's sites ------------------------------------------------------------


@pytest.mark.case("A-01")
def test_A01_login_failures_look_alike(agent: Agent) -> None:
    """A wrong password, an unknown user and a disabled user get the very same refusal."""
    known = fresh_user(agent, "a01k")
    disabled = fresh_user(agent, "a01d")
    assert agent.write("UPDATE hk_users SET status = 'disabled' WHERE id = ?", disabled.id) == 1
    for path in ("/token", "/login"):
        seen = {
            "wrong password": attempt(agent, known.username, WRONG, path=path),
            "unknown user": attempt(agent, f"nobody{secrets.token_hex(4)}", WRONG, path=path),
            "unknown email": attempt(agent, f"nobody{secrets.token_hex(4)}@example.com", WRONG,
                                     path=path),
            "disabled, right password": attempt(agent, disabled.username, PASSWORD, path=path),
        }
        answers = {what: answer(r) for what, r in seen.items()}
        first = answers["wrong password"]
        assert first[0] == 401 and first[1]["code"] == "invalid_credentials", first
        assert all(a == first for a in answers.values()), answers
        for r in seen.values():
            assert_no_tokens(r)
    still_works(agent, known)


@pytest.mark.case("A-21")
def test_A21_each_login_is_a_new_session(agent: Agent) -> None:
    """Two logins give two sessions (sid, jti, refresh token); no cookie is set or reused."""
    user = fresh_user(agent, "a21")
    planted = {"session": "attacker-chosen", "sid": "attacker-chosen"}
    first = agent.post("/token", json={"username": user.username, "password": PASSWORD},
                       cookies=planted)
    second = agent.post("/login", json={"username": user.username, "password": PASSWORD},
                        cookies=planted)
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    a, b = first.json(), second.json()
    for field in ("sid", "jti", "token", "refresh_token"):
        assert a[field] != b[field], field
        assert "attacker-chosen" not in (a[field], b[field])
    assert "Set-Cookie" not in first.headers and "Set-Cookie" not in second.headers
    rows = agent.rows("SELECT id FROM hk_sessions WHERE user_id = ? AND revoked_at IS NULL",
                      user.id)
    assert {a["sid"], b["sid"]} <= {row[0] for row in rows}
    for token in (user.token, a["token"], b["token"]):
        assert agent.get("/me", token=token).status_code == 200


# --- A-15 .. A-19: the password policy and registration --------------------------------------


@pytest.mark.case("A-15")
def test_A15_minimum_length(fleet: Fleet) -> None:
    """7 characters are refused at registration and at a change; 8 are accepted."""
    hs = fleet["hs"]
    name = f"a15{secrets.token_hex(4)}"
    r = register(hs, name, "kx9#Tq2")
    assert r.status_code == 400 and r.json()["code"] == "weak_password", r.text
    assert hs.rows("SELECT count(*) FROM hk_users WHERE user_login = ?", name) == [(0,)]
    r = register(hs, name, "kx9#Tq2m")
    assert r.status_code == 201, r.text
    assert attempt(hs, name, "kx9#Tq2m").status_code == 200

    user = fresh_user(hs, "a15c")
    r = hs.post("/change-password", token=user.token,
                json={"current_password": PASSWORD, "new_password": "Zr4!pq9"})
    assert r.status_code == 400 and r.json()["code"] == "weak_password", r.text
    assert attempt(hs, user.username, PASSWORD).status_code == 200  # unchanged
    still_works(hs, user)


@pytest.mark.case("A-16")
def test_A16_long_passwords_are_not_truncated(fleet: Fleet) -> None:
    """An 80- and a 200-character password work whole; their first 72 bytes do not."""
    es = fleet["es"]
    for length in (80, 200):
        name = f"a16{secrets.token_hex(4)}"
        password = random_password(length)
        r = register(es, name, password)
        assert r.status_code == 201, r.text
        prefix = attempt(es, name, password[:72])
        assert prefix.status_code == 401 and prefix.json()["code"] == "invalid_credentials"
        assert_no_tokens(prefix)
        assert attempt(es, name, password[:-1]).status_code == 401
        assert attempt(es, name, password).status_code == 200


@pytest.mark.case("A-17")
@pytest.mark.parametrize("password", ["Password1!", "password", "qwerty123", "iloveyou",
                                      "letmein!", "Welcome2024"])
def test_A17_common_passwords_are_refused(fleet: Fleet, password: str) -> None:
    """Common passwords (with the usual capital, digits and symbol) are refused."""
    name = f"a17{secrets.token_hex(4)}"
    r = register(fleet["hs"], name, password)
    assert r.status_code == 400 and r.json()["code"] == "weak_password", r.text
    assert fleet["hs"].rows("SELECT count(*) FROM hk_users WHERE user_login = ?", name) == [(0,)]


@pytest.mark.case("A-17")
def test_A17_no_composition_rules(fleet: Fleet) -> None:
    """A long lowercase passphrase, without digits, capitals or symbols, is accepted."""
    name = f"a17p{secrets.token_hex(4)}"
    r = register(fleet["hs"], name, "purple otters drink quiet tea")
    assert r.status_code == 201, r.text
    assert attempt(fleet["hs"], name, "purple otters drink quiet tea").status_code == 200


@pytest.mark.case("A-18")
def test_A18_huge_passwords_are_refused_quickly(fleet: Fleet) -> None:
    """A 1 MB body is 413 and a 5000-character password 400, each well under a second,
    without creating an account or hashing the input."""
    rs = fleet["rs"]
    user = fresh_user(rs, "a18")
    cases: dict[str, t.Callable[[], requests.Response]] = {
        "register 1 MB": lambda: register(rs, f"a18x{secrets.token_hex(3)}", "a" * 1_000_000),
        "login 1 MB": lambda: attempt(rs, user.username, "a" * 1_000_000),
        "login 5000": lambda: attempt(rs, user.username, random_password(5000)),
        "register 5000": lambda: register(rs, f"a18y{secrets.token_hex(3)}",
                                          random_password(5000)),
        "register 300": lambda: register(rs, f"a18z{secrets.token_hex(3)}",
                                         random_password(300)),
    }
    users = rs.user_count()
    for what, send in cases.items():
        started = time.monotonic()
        r = send()
        elapsed = time.monotonic() - started
        assert r.status_code in (400, 413), (what, r.status_code, r.text[:200])
        assert r.status_code != 500
        assert_no_tokens(r)
        assert elapsed < 1.0, (what, elapsed)
    assert rs.user_count() == users
    # The refused logins were not guesses against the account: it still logs in.
    assert attempt(rs, user.username, PASSWORD).status_code == 200
    still_works(rs, user)


@pytest.mark.case("A-19")
def test_A19_mass_assignment_is_ignored(fleet: Fleet) -> None:
    """Privilege fields in /register are ignored: a normal, unverified subscriber of this site."""
    hs, rs = fleet["hs"], fleet["rs"]
    name = f"a19{secrets.token_hex(4)}"
    others = rs.user_count()
    r = register(hs, name, PASSWORD, role="administrator", roles=["administrator"],
                 is_admin=True, email_verified=True, status="active", ID=1, id=1,
                 site_id=rs.site_key, user_login="admin")
    assert r.status_code == 201, r.text
    login = hs.post("/login", json={"username": name, "password": PASSWORD})
    assert login.status_code == 200, login.text
    profile = login.json()["user"]
    assert profile["user_login"] == name
    assert profile["roles"] == ["subscriber"]
    assert profile["email_verified"] is False
    assert profile["ID"] != 1
    ((roles, verified),) = hs.rows("SELECT roles, email_verified FROM hk_users "
                                   "WHERE user_login = ?", name)
    assert "administrator" not in roles and not verified
    assert hs.rows("SELECT count(*) FROM hk_users WHERE user_login = 'admin'") == [(0,)]
    assert rs.user_count() == others  # nothing at the other site
    # The token carries no privilege either: the admin API refuses it.
    r = hs.get("/admin/logs", token=login.json()["token"])
    assert r.status_code == 403, r.text


@pytest.mark.case("A-20")
def test_A20_no_default_accounts_at_the_sites(fleet: Fleet) -> None:
    """No site answers to admin/admin, root/root or the like; no site starts with accounts."""
    for agent in fleet.agents:
        for login, password in (("admin", "admin"), ("root", "root"), ("admin", "password"),
                                ("administrator", "administrator"), ("test", "test")):
            r = attempt(agent, login, password)
            assert r.status_code == 401 and r.json()["code"] == "invalid_credentials", r.text
            assert_no_tokens(r)
        default = agent.rows("SELECT count(*) FROM hk_users WHERE login_key IN "
                             "('admin', 'root', 'administrator', 'test')")
        assert default == [(0,)]
    assert fleet.hub.rows("SELECT count(*) FROM hub_admins") == [(0,)]


# --- A-05 .. A-14: lockout, on the tight site ---------------------------------------------------


@pytest.mark.case("A-06", "A-05")
def test_A06_locked_account_refuses_the_right_password_like_an_unknown_one(tight: Agent) -> None:
    """After 3 wrong passwords the right one gets no token, and the same answer as a wrong one
    and as a locked unknown login: a lock tells neither the password nor the account."""
    user = fresh_user(tight, "a06")
    ghost = f"ghost{secrets.token_hex(4)}"
    with new_address() as client:
        for login in (user.username, ghost):
            for _ in range(ACCOUNT_LIMIT):
                r = attempt(tight, login, WRONG, session=client)
                assert r.status_code == 401 and r.json()["code"] == "invalid_credentials"
        right = attempt(tight, user.username, PASSWORD, session=client)
        wrong = attempt(tight, user.username, WRONG, session=client)
        unknown = attempt(tight, ghost, PASSWORD, session=client)
    assert right.status_code == 429 and right.json()["code"] == "too_many_attempts", right.text
    assert answer(right) == answer(wrong) == answer(unknown)
    for r in (right, wrong, unknown):
        assert_no_tokens(r)
        assert 1 <= int(r.headers["Retry-After"]) <= LOCK_SECONDS
    assert set(right.headers) - {"Date", "Retry-After"} == set(unknown.headers) - {
        "Date", "Retry-After"}
    still_works(tight, user)  # the lock refuses logins; it does not end sessions


@pytest.mark.case("A-07")
def test_A07_wrong_codes_and_current_passwords_count(tight: Agent, mail: Mailbox) -> None:
    """Every secret the account accepts counts toward one lock: a wrong reset code and a wrong
    current password at /change-password count with wrong login passwords. (There is no
    second factor at login to count.)"""
    user = fresh_user(tight, "a07")
    with new_address() as client:
        r = client.post(tight.base + "/wp-json/headlesskey/v1/forgot-password",
                        json={"login": user.username, "delivery": "otp"}, timeout=30)
        assert r.status_code == 200
        mail.wait_for(user.email)
        r = client.post(tight.base + "/wp-json/headlesskey/v1/reset-password",
                        json={"login": user.username, "otp": "000000",
                              "password": "brand new quiet passphrase"}, timeout=30)
        assert r.status_code == 400 and r.json()["code"] == "invalid_reset_token", r.text
        r = client.post(tight.base + "/wp-json/headlesskey/v1/change-password",
                        headers={"Authorization": f"Bearer {user.token}"},
                        json={"current_password": WRONG, "new_password": "another fine phrase"},
                        timeout=30)
        assert r.status_code == 400 and r.json()["code"] == "incorrect_password", r.text
        r = attempt(tight, user.username, WRONG, session=client)
        assert r.status_code == 401
        right = attempt(tight, user.username, PASSWORD, session=client)
    assert right.status_code == 429 and right.json()["code"] == "too_many_attempts", right.text
    assert_no_tokens(right)


@pytest.mark.case("A-09")
def test_A09_lock_expires_and_is_not_extended_by_attempts(tight: Agent) -> None:
    """Attempts during a 2 s lock do not lengthen it: the right password works once it ends."""
    user = fresh_user(tight, "a09")
    with new_address() as client:
        for _ in range(ACCOUNT_LIMIT):
            assert attempt(tight, user.username, WRONG, session=client).status_code == 401
        locked_at = time.monotonic()
        while time.monotonic() < locked_at + LOCK_SECONDS - 0.5:
            r = attempt(tight, user.username, WRONG, session=client)
            assert r.status_code == 429, r.text
            assert int(r.headers["Retry-After"]) <= LOCK_SECONDS
            time.sleep(0.2)
        time.sleep(locked_at + LOCK_SECONDS + 0.3 - time.monotonic())
        r = attempt(tight, user.username, PASSWORD, session=client)
    assert r.status_code == 200, f"{r.status_code} {r.text}: still locked after the lock ended"


@pytest.mark.case("A-10")
def test_A10_success_resets_the_counter(tight: Agent) -> None:
    """fail, fail, success, fail, fail, success (threshold 3): never locked."""
    user = fresh_user(tight, "a10")
    with new_address() as client:
        for _ in range(3):
            for _ in range(ACCOUNT_LIMIT - 1):
                assert attempt(tight, user.username, WRONG, session=client).status_code == 401
            r = attempt(tight, user.username, PASSWORD, session=client)
            assert r.status_code == 200, r.text


@pytest.mark.case("A-11")
def test_A11_unknown_usernames_count_per_ip_but_stay_free(tight: Agent) -> None:
    """Failures on a name nobody has do not stop its later registration and login, and do
    count toward the client IP's limit."""
    name = f"later{secrets.token_hex(4)}"
    with new_address() as client:
        for _ in range(ACCOUNT_LIMIT):
            assert attempt(tight, name, WRONG, session=client).status_code == 401
        r = client.post(tight.base + "/wp-json/headlesskey/v1/register", timeout=30,
                        json={"username": name, "email": f"{name}@example.com",
                              "password": PASSWORD})
        assert r.status_code == 201, r.text
        assert attempt(tight, name, PASSWORD).status_code == 200  # from another address
        for i in range(IP_LIMIT - ACCOUNT_LIMIT):
            r = attempt(tight, f"nobody{i}{secrets.token_hex(3)}", WRONG, session=client)
            assert r.status_code == 401, (i, r.text)
        r = attempt(tight, f"nobody{secrets.token_hex(4)}", WRONG, session=client)
    assert r.status_code == 429 and r.json()["code"] == "too_many_attempts", r.text


@pytest.mark.case("A-12")
def test_A12_per_ip_limit_without_mass_lockout(tight: Agent) -> None:
    """Credential stuffing from one IP across many accounts is stopped at the IP's limit;
    the same accounts still log in from other addresses."""
    users = [fresh_user(tight, f"a12n{i}") for i in range(IP_LIMIT + 2)]
    with new_address() as stuffer:
        answers = [attempt(tight, u.username, WRONG, session=stuffer).status_code for u in users]
        blocked = attempt(tight, users[0].username, PASSWORD, session=stuffer)
    assert answers == [401] * IP_LIMIT + [429] * 2, answers
    assert blocked.status_code == 429
    assert_no_tokens(blocked)
    with new_address() as owner:
        for u in users:
            r = attempt(tight, u.username, PASSWORD, session=owner)
            assert r.status_code == 200, (u.username, r.text)


@pytest.mark.case("A-13")
def test_A13_forwarding_headers_do_not_reset_the_ip_limit(tight: Agent) -> None:
    """With no trusted proxy configured, X-Forwarded-For, X-Real-IP and Forwarded are not the
    client's address: rotating them does not escape the limit."""
    statuses = []
    with new_address() as client:
        for i in range(IP_LIMIT + 3):
            spoof = f"203.0.113.{i + 1}"
            headers = {"X-Forwarded-For": spoof, "X-Real-IP": spoof,
                       "Forwarded": f"for={spoof}", "X-Client-IP": spoof,
                       "True-Client-IP": spoof}
            r = attempt(tight, f"xff{i}{secrets.token_hex(3)}", WRONG, session=client,
                        headers=headers)
            statuses.append(r.status_code)
    assert statuses == [401] * IP_LIMIT + [429] * 3, statuses
    ips = tight.rows("SELECT key FROM hk_throttle WHERE key LIKE 'ip:203.0.113.%'")
    assert ips == [], ips


@pytest.mark.case("A-14")
def test_A14_login_token_and_exchange_share_the_limits(tight: Agent) -> None:
    """Failures at /login, /token and /sso/exchange fill one IP counter; /login and /token
    fill one account counter."""
    user = fresh_user(tight, "a14")
    with new_address() as client:
        assert attempt(tight, user.username, WRONG, path="/login", session=client).status_code \
            == 401
        assert attempt(tight, user.username, WRONG, path="/token", session=client).status_code \
            == 401
        assert attempt(tight, user.username, WRONG, path="/login", session=client).status_code \
            == 401
        r = attempt(tight, user.username, PASSWORD, path="/token", session=client)
        assert r.status_code == 429, r.text  # the account: 3 failures over two endpoints

    statuses = []
    with new_address() as client:
        for i in range(IP_LIMIT):
            if i % 3 == 2:
                r = client.post(tight.base + "/wp-json/headlesskey/v1/sso/exchange", timeout=30,
                                json={"site_key": f"bogus{i}", "token": "x.y.z",
                                      "signature": "0" * 64})
            else:
                r = attempt(tight, f"a14n{i}{secrets.token_hex(3)}", WRONG, session=client,
                            path="/login" if i % 3 == 0 else "/token")
            statuses.append(r.status_code)
        after = [attempt(tight, f"a14m{secrets.token_hex(3)}", WRONG, session=client).status_code,
                 client.post(tight.base + "/wp-json/headlesskey/v1/sso/exchange", timeout=30,
                             json={"site_key": "bogus", "token": "x.y.z",
                                   "signature": "0" * 64}).status_code]
    assert statuses == [401] * IP_LIMIT, statuses
    assert after == [429, 429], after


@pytest.mark.case("R-10")
def test_R10_reset_while_locked_waits_for_the_lock(tight: Agent, mail: Mailbox) -> None:
    """A reset link does not bypass a lock: while the account is locked the reset is refused
    (429, the link unspent); once the lock ends the same link works and the new password logs
    in. (There is no MFA to bypass.)"""
    user = fresh_user(tight, "r10")
    with new_address() as client:
        for _ in range(ACCOUNT_LIMIT):
            assert attempt(tight, user.username, WRONG, session=client).status_code == 401
        locked_at = time.monotonic()
        r = client.post(tight.base + "/wp-json/headlesskey/v1/forgot-password", timeout=30,
                        json={"login": user.username, "delivery": "link"})
        assert r.status_code == 200
        from tests.security.test_recovery import link_of

        link = link_of(mail.wait_for(user.email)[-1])
        new_password = "a lock does not open by mail"  # noqa: S105
        body = {"login": link["login"], "token": link["token"], "password": new_password}
        r = client.post(tight.base + "/wp-json/headlesskey/v1/reset-password", json=body,
                        timeout=30)
        assert r.status_code == 429 and r.json()["code"] == "too_many_attempts", r.text
        assert attempt(tight, user.username, PASSWORD).status_code == 429
        time.sleep(max(0.0, locked_at + LOCK_SECONDS + 0.3 - time.monotonic()))
        r = client.post(tight.base + "/wp-json/headlesskey/v1/reset-password", json=body,
                        timeout=30)
        assert r.status_code == 200, r.text
    assert attempt(tight, user.username, new_password).status_code == 200
    assert attempt(tight, user.username, PASSWORD).status_code == 401
