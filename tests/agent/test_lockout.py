"""Brute-force protection over HTTP: per-account and per-IP counters, locks, escalation, unlock.

Every test runs once per store of the counters: the database (default) and Redis
(``REDIS_URL``; that variant needs ``HEADLESSKEY_TEST_REDIS_URL``, e.g. redis://127.0.0.1:6379/9,
and skips without it).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
import typing as t
import uuid

import pytest
import requests
from sqlalchemy import text

from tests.conftest import PASSWORD
from tests.conftest import Site

WRONG = "not the right password at all"
NEW_PASSWORD = "amber falcon over quiet harbours"
INVALID_CREDENTIALS = {
    "code": "invalid_credentials",
    "message": "The username, email or password is incorrect.",
    "data": {"status": 401},
}


def attempt(
    site: Site, login: str, password: str, path: str = "/token", **kw: t.Any
) -> requests.Response:
    field = "email" if "@" in login else "username"
    return site.api.post(path, json={field: login, "password": password}, **kw)


def assert_invalid(r: requests.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.json() == INVALID_CREDENTIALS


def retry_after(r: requests.Response) -> int:
    """The Retry-After of a 429 ``too_many_attempts`` answer, checked to be positive."""
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "too_many_attempts"
    assert r.json()["data"]["status"] == 429
    value = int(r.headers["Retry-After"])
    assert value > 0
    return value


@pytest.fixture(params=["database", "redis"])
def make_site(
    request: pytest.FixtureRequest, make_site: t.Callable[..., Site]
) -> t.Callable[..., Site]:
    """The sites of these tests, with their counters in the database or in Redis."""
    if request.param == "database":
        return make_site
    url = os.environ.get("HEADLESSKEY_TEST_REDIS_URL")
    if not url:
        pytest.skip("HEADLESSKEY_TEST_REDIS_URL is not set: the Redis variant needs a Redis")

    def factory(algorithm: str = "HS256", **settings: t.Any) -> Site:
        # An issuer of its own: counters are per site, and this Redis outlives the test.
        settings.setdefault("HEADLESSKEY_ISSUER", f"https://{uuid.uuid4().hex}.example")
        settings.setdefault("HEADLESSKEY_REDIS_URL", url)
        return make_site(algorithm, **settings)

    return factory


def sessions_of(site: Site, user_id: int) -> int:
    count = site.scalar("SELECT count(*) FROM hk_sessions WHERE user_id = :u", u=user_id)
    return t.cast(int, count)


@pytest.fixture
def s(make_site: t.Callable[..., Site]) -> Site:
    """An HS256 site with the default lockout settings and the user alice (ID 1)."""
    site = make_site("HS256")
    site.create_user("alice")
    return site


# --- per account ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail_path", "fail_login", "probe_path", "probe_login"),
    [
        ("/token", "alice", "/login", "alice@example.com"),
        ("/login", "ALICE@example.com", "/token", "alice"),
    ],
)
def test_sixth_attempt_is_refused_even_with_the_right_password(
    s: Site, fail_path: str, fail_login: str, probe_path: str, probe_login: str
) -> None:
    for _ in range(5):
        assert_invalid(attempt(s, fail_login, WRONG, fail_path))
    # The right password, by the other endpoint and the other name of the account: still locked.
    r = attempt(s, probe_login, PASSWORD, probe_path)
    assert retry_after(r) <= 900
    assert retry_after(attempt(s, fail_login, PASSWORD, fail_path)) <= 900
    assert sessions_of(s, 1) == 0


def test_token_and_login_share_the_counters(s: Site) -> None:
    """Failures spread over /token and /login, username and email, add up on one account."""
    for path, login in [
        ("/token", "alice"),
        ("/login", "alice@example.com"),
        ("/token", "Alice@Example.com"),
        ("/login", "ALICE"),
        ("/token", "alice"),
    ]:
        assert_invalid(attempt(s, login, WRONG, path))
    for path, login in [("/token", "alice"), ("/login", "alice"), ("/token", "alice@example.com")]:
        retry_after(attempt(s, login, PASSWORD, path))
    assert sessions_of(s, 1) == 0


def test_unknown_username_answers_exactly_like_a_known_one(s: Site) -> None:
    """No existence oracle: the same statuses, bodies and headers in the same order."""

    def run(login: str, final_password: str) -> list[tuple[int, t.Any, bool, str | None]]:
        answers = [attempt(s, login, WRONG) for _ in range(6)]
        answers.append(attempt(s, login, final_password))
        return [
            (
                r.status_code,
                r.json(),
                "Retry-After" in r.headers,
                r.headers.get("WWW-Authenticate"),
            )
            for r in answers
        ]

    known = run("alice", PASSWORD)
    unknown = run("nobody", PASSWORD)
    assert [a[0] for a in known] == [401] * 5 + [429, 429]
    assert unknown == known
    # The lock of an unknown name lasts as long as a real one.
    a = attempt(s, "alice", PASSWORD)
    b = attempt(s, "nobody", PASSWORD)
    assert abs(retry_after(a) - retry_after(b)) <= 2


@pytest.mark.parametrize("name", ["alice", "alice@example.com"])
def test_spellings_of_a_login_do_not_tell_whether_it_exists(s: Site, name: str) -> None:
    """Logins are matched ignoring case, surrounding spaces and Unicode width; so are counters.

    Five spellings of one existing login lock its account. If five spellings of an unknown
    login did not lock too, the sixth answer would tell an attacker which logins exist.
    """
    unknown = "nobody" if "@" not in name else "nobody@example.com"

    def spellings(login: str) -> list[str]:
        wide = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in login)
        return [login, f" {login}", f"{login} ", login.upper(), wide]

    # Every spelling is the same account for a login...
    for login in spellings(name)[1:]:
        r = attempt(s, login, PASSWORD)
        assert r.status_code == 200, (login, r.text)
    answers: dict[str, list[tuple[int, t.Any]]] = {}
    for login in (name, unknown):
        rs = [attempt(s, spelled, WRONG) for spelled in spellings(login)]
        rs.append(attempt(s, login, PASSWORD))
        answers[login] = [(r.status_code, r.json()) for r in rs]
    assert [status for status, _ in answers[name]] == [401] * 5 + [429]
    assert answers[unknown] == answers[name]


def test_lock_ends_after_retry_after(s: Site) -> None:
    for _ in range(5):
        assert_invalid(attempt(s, "alice", WRONG))
    wait = retry_after(attempt(s, "alice", PASSWORD))
    assert 890 <= wait <= 900  # the default 15-minute lock
    s.clock.advance(wait - 30)
    assert 25 <= retry_after(attempt(s, "alice", PASSWORD)) <= 35
    s.clock.advance(31)
    r = attempt(s, "alice", PASSWORD)
    assert r.status_code == 200, r.text
    assert r.json()["user"]["ID"] == 1


def test_a_repeated_lock_lasts_longer(s: Site) -> None:
    for _ in range(5):
        assert_invalid(attempt(s, "alice", WRONG))
    first = retry_after(attempt(s, "alice", WRONG))
    s.clock.advance(first + 1)
    # The lock is over: five new guesses are allowed again, then a second, longer lock.
    for _ in range(5):
        assert_invalid(attempt(s, "alice", WRONG))
    second = retry_after(attempt(s, "alice", PASSWORD))
    assert abs(second - 2 * first) <= 5, (first, second)
    s.clock.advance(first + 1)  # the first lock's length is not enough any more
    retry_after(attempt(s, "alice", PASSWORD))
    s.clock.advance(second - first)
    assert attempt(s, "alice", PASSWORD).status_code == 200


def test_a_success_resets_the_account_counter(s: Site) -> None:
    for _ in range(4):
        assert_invalid(attempt(s, "alice", WRONG))
    assert attempt(s, "alice", PASSWORD).status_code == 200
    for _ in range(4):
        assert_invalid(attempt(s, "alice", WRONG))
    assert attempt(s, "alice", PASSWORD).status_code == 200


# --- per IP ---------------------------------------------------------------------------------


def ip_site(make_site: t.Callable[..., Site], users: int, **settings: t.Any) -> Site:
    site = make_site("HS256", HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES=10, **settings)
    for i in range(users):
        site.create_user(f"user{i:02d}")
    return site


def test_ip_lock_across_accounts(make_site: t.Callable[..., Site]) -> None:
    s = ip_site(make_site, 12)
    for i in range(10):
        assert_invalid(attempt(s, f"user{i:02d}", WRONG))
    # An eleventh account, never attacked, with its right password: the IP is locked.
    assert 890 <= retry_after(attempt(s, "user10", PASSWORD)) <= 900
    # X-Forwarded-For is not trusted (TRUSTED_PROXIES = 0): rotating it changes nothing.
    for i in range(5):
        r = attempt(s, "user11", PASSWORD, headers={"X-Forwarded-For": f"198.51.100.{i + 1}"})
        retry_after(r)
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 0
    # Each account had one failure only: the lock is the IP's.
    s.clock.advance(901)
    assert attempt(s, "user00", PASSWORD).status_code == 200


def test_attempts_at_a_locked_account_take_nothing_from_the_ip(s: Site) -> None:
    """An attempt refused by one counter gives back what it took on the others: 25 attempts
    at a locked account leave the client's IP counter (limit 20) with nothing held, so another
    account logs in from that IP at once."""
    s.create_user("bob")
    for _ in range(5):
        assert_invalid(attempt(s, "alice", WRONG))
    for _ in range(25):
        retry_after(attempt(s, "alice", PASSWORD))
    assert attempt(s, "bob", PASSWORD).status_code == 200
    assert s.scalar("SELECT coalesce(sum(pending), 0) FROM hk_throttle") == 0


def test_checks_in_flight_fill_the_counter_until_they_go_stale(s: Site) -> None:
    """Five password checks in flight (reserved, not yet counted) fill the account's counter:
    a sixth attempt waits for them and, when none ends, is refused. Reservations left by a
    process that died mid-check stop counting after a minute."""
    from agent.services import lockout

    keys = lockout.keys_for(s.state, user_id=1, login="alice", ip="192.0.2.77")
    for _ in range(5):
        lockout.acquire(s.state, keys)
    assert retry_after(attempt(s, "alice", PASSWORD)) == 1
    assert sessions_of(s, 1) == 0
    s.clock.advance(lockout.STALE_PENDING.total_seconds() + 1)
    assert attempt(s, "alice", PASSWORD).status_code == 200
    assert sessions_of(s, 1) == 1


def test_trusted_proxy_gives_each_forwarded_client_its_own_counter(
    make_site: t.Callable[..., Site],
) -> None:
    s = ip_site(make_site, 13, HEADLESSKEY_TRUSTED_PROXIES=1)
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    for i in range(10):
        assert_invalid(attempt(s, f"user{i:02d}", WRONG, headers=attacker))
    retry_after(attempt(s, "user10", PASSWORD, headers=attacker))
    # Prepending a spoofed address does not help: the proxy's own hop is the one read.
    retry_after(attempt(s, "user10", PASSWORD, headers={"X-Forwarded-For": "1.2.3.4, 203.0.113.7"}))
    # Another client behind the same proxy is not locked.
    r = attempt(s, "user11", PASSWORD, headers={"X-Forwarded-For": "203.0.113.8"})
    assert r.status_code == 200, r.text
    # Nor is the proxy's socket address itself.
    assert attempt(s, "user12", PASSWORD).status_code == 200
    assert s.scalar(
        "SELECT count(*) FROM hk_audit WHERE event = 'lockout.started' AND ip = '203.0.113.7'"
    ) == 1


@pytest.mark.parametrize(
    ("forwarded", "address"),
    [
        ("203.0.113.7:{port}", "203.0.113.7"),
        ("[2001:db8::7]:{port}", "2001:db8::7"),
    ],
)
def test_a_forwarded_port_does_not_make_another_client(
    make_site: t.Callable[..., Site], forwarded: str, address: str
) -> None:
    """Some proxies write the client's source port into X-Forwarded-For: each attempt from a
    new port is still the same client, locked after the per-IP limit, logged without port."""
    s = ip_site(make_site, 13, HEADLESSKEY_TRUSTED_PROXIES=1)
    for i in range(10):
        headers = {"X-Forwarded-For": forwarded.format(port=40000 + i)}
        assert_invalid(attempt(s, f"user{i:02d}", WRONG, headers=headers))
    retry_after(attempt(s, "user10", PASSWORD,
                        headers={"X-Forwarded-For": forwarded.format(port=50000)}))
    # The address without port, bracketed or not, is the same locked client.
    bare = f"[{address}]" if ":" in address else address
    retry_after(attempt(s, "user11", PASSWORD, headers={"X-Forwarded-For": bare}))
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 0
    # The activity log shows the address without port, failed and refused attempts alike.
    assert s.scalar("SELECT count(*) FROM hk_audit WHERE event = 'login.failed'") == 12
    assert s.scalar("SELECT count(DISTINCT ip) FROM hk_audit") == 1
    assert s.scalar("SELECT min(ip) FROM hk_audit") == address
    # Another client behind the proxy is not locked.
    r = attempt(s, "user12", PASSWORD, headers={"X-Forwarded-For": "198.51.100.1:40000"})
    assert r.status_code == 200, r.text


def test_a_forwarded_address_is_logged_in_one_form_and_found_in_any(
    make_site: t.Callable[..., Site],
) -> None:
    """However the proxy writes an address (IPv6 in capitals or with its zeros, IPv4 mapped
    into IPv6), the activity log holds it in one form, and the log's ip filter finds it written
    any of those ways (an exact text match found nothing)."""
    s = ip_site(make_site, 0, HEADLESSKEY_TRUSTED_PROXIES=1)
    s.create_user("root", roles=["administrator"])
    token = s.api.login("root")["token"]
    for forwarded in ("2001:DB8:0:0::7", "[2001:0db8::7]:443", "::ffff:203.0.113.9"):
        assert_invalid(attempt(s, "ghost", WRONG, headers={"X-Forwarded-For": forwarded}))
    with s.state.engine.connect() as conn:
        logged = conn.execute(text("SELECT ip FROM hk_audit WHERE event = 'login.failed'"
                                   " ORDER BY id")).scalars().all()
    assert logged == ["2001:db8::7", "2001:db8::7", "203.0.113.9"]
    for written, count in (("2001:DB8::0:7", 2), ("2001:db8::7", 2), ("::FFFF:203.0.113.9", 1),
                           ("203.0.113.9", 1), ("not an address", 0)):
        r = s.api.get("/admin/logs", params={"ip": written, "event": "login.failed"},
                      token=token)
        assert r.status_code == 200, r.text
        assert len(r.json()["events"]) == count, (written, r.json())


def test_an_ipv6_client_is_counted_by_its_64_bit_prefix(
    make_site: t.Callable[..., Site],
) -> None:
    """A client with an IPv6 address has a whole /64 to itself: it is one client, so
    changing the address inside it for each guess does not escape the IP's counter. An
    IPv4-mapped IPv6 address counts as its IPv4 address."""
    s = ip_site(make_site, 14, HEADLESSKEY_TRUSTED_PROXIES=1)
    for i in range(10):
        forwarded = {"X-Forwarded-For": f"2001:db8:1:2:{i + 1:x}::{i + 7:x}"}
        assert_invalid(attempt(s, f"user{i:02d}", WRONG, headers=forwarded))
    retry_after(attempt(s, "user10", PASSWORD,
                        headers={"X-Forwarded-For": "2001:DB8:1:2:ffff:0:0:1"}))
    # The next /64 is another client.
    r = attempt(s, "user11", PASSWORD, headers={"X-Forwarded-For": "2001:db8:1:3::1"})
    assert r.status_code == 200, r.text
    for i in range(10):
        assert_invalid(attempt(s, f"ghost{i}", WRONG,
                               headers={"X-Forwarded-For": "203.0.113.9"}))
    retry_after(attempt(s, "user12", PASSWORD,
                        headers={"X-Forwarded-For": "::ffff:203.0.113.9"}))
    assert s.scalar("SELECT count(*) FROM hk_sessions") == 1


def test_allowlisted_ip_is_never_locked(make_site: t.Callable[..., Site]) -> None:
    s = make_site(
        "HS256", HEADLESSKEY_LOCKOUT_ALLOWLIST=["127.0.0.1"], HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES=10
    )
    s.create_user("alice")
    for _ in range(12):
        assert_invalid(attempt(s, "alice", WRONG))
    for i in range(12):
        assert_invalid(attempt(s, f"ghost{i}", WRONG))
    assert attempt(s, "alice", PASSWORD).status_code == 200
    assert s.scalar("SELECT count(*) FROM hk_audit WHERE event = 'lockout.started'") == 0


# --- races ----------------------------------------------------------------------------------


def test_concurrent_guesses_get_at_most_five_password_checks(s: Site) -> None:
    def guess(_: int) -> int:
        return requests.post(
            s.api.url("/token"), json={"username": "alice", "password": WRONG}, timeout=60
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(guess, range(50)))
    assert set(statuses) <= {401, 429}, statuses
    assert 1 <= statuses.count(401) <= 5, statuses
    assert statuses.count(429) == 50 - statuses.count(401)
    failures = s.scalar(
        "SELECT count(*) FROM hk_audit WHERE event = 'login.failed' AND outcome = 'failure' "
        "AND user_id = 1"
    )
    assert failures == statuses.count(401)
    assert failures <= 5
    retry_after(attempt(s, "alice", PASSWORD))


def test_concurrent_right_passwords_all_get_through(s: Site) -> None:
    """20 logins at once with the right password, four times the account's limit: each waits
    for a free place on the counter if it must, none is refused, and each opens its session."""
    def log_in(_: int) -> int:
        return requests.post(
            s.api.url("/token"), json={"username": "alice", "password": PASSWORD}, timeout=60
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(log_in, range(20)))
    assert statuses == [200] * 20
    assert sessions_of(s, 1) == 20
    assert s.scalar("SELECT count(*) FROM hk_audit WHERE event = 'login.succeeded'") == 20
    assert s.scalar("SELECT coalesce(sum(pending), 0) FROM hk_throttle") == 0


# --- other password checks ------------------------------------------------------------------


def test_wrong_current_passwords_in_change_password_count(s: Site) -> None:
    token = s.api.login()["token"]
    for _ in range(5):
        r = s.api.post(
            "/change-password",
            json={"current_password": WRONG, "new_password": NEW_PASSWORD},
            token=token,
        )
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "incorrect_password"
    r = s.api.post(
        "/change-password",
        json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        token=token,
    )
    retry_after(r)
    retry_after(attempt(s, "alice", PASSWORD))
    # The password did not change.
    s.clock.advance(901)
    assert attempt(s, "alice", PASSWORD).status_code == 200


# --- administrators -------------------------------------------------------------------------


@pytest.fixture
def team(s: Site) -> dict[str, t.Any]:
    """alice (1), an administrator and bob, with tokens for the last two."""
    admin_id = s.create_user("root", roles=["administrator"])
    bob_id = s.create_user("bob")
    return {
        "admin_id": admin_id,
        "admin": s.api.login("root")["token"],
        "bob_id": bob_id,
        "bob": s.api.login("bob")["token"],
    }


def lock_alice(s: Site) -> None:
    for _ in range(5):
        assert_invalid(attempt(s, "alice", WRONG))
    retry_after(attempt(s, "alice", PASSWORD))


def test_admin_unlock(s: Site, team: dict[str, t.Any]) -> None:
    lock_alice(s)
    refused = s.api.post("/admin/users/1/unlock", token=team["bob"])
    assert refused.status_code == 403
    assert refused.json()["code"] == "forbidden"
    assert s.api.post("/admin/users/1/unlock").status_code == 401
    retry_after(attempt(s, "alice", PASSWORD))  # still locked
    r = s.api.post("/admin/users/1/unlock", token=team["admin"])
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    assert r.json()["code"] == "user_unlocked"
    ok = attempt(s, "alice", PASSWORD)
    assert ok.status_code == 200, ok.text
    missing = s.api.post("/admin/users/999/unlock", token=team["admin"])
    assert missing.status_code == 404
    assert missing.json()["code"] == "user_not_found"


def test_an_unlock_made_while_another_runs_clears_nothing_more(
    s: Site, team: dict[str, t.Any]
) -> None:
    """Two administrators unlock one account at once: the second waits for the first, then
    reports that it cleared nothing (on PostgreSQL it reported the first's counters as its own,
    deleting rows already gone)."""
    from agent.services import lockout

    lock_alice(s)
    with s.app.app_context(), s.state.session_factory() as db:
        cleared = lockout.unlock_user(db, s.state, 1, ("alice", "alice@example.com"))
        assert cleared >= 1
        db.flush()  # not committed yet
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(s.api.post, "/admin/users/1/unlock", token=team["admin"])
            time.sleep(0.5)  # the second unlock reaches the counters' rows and waits
            db.commit()
            r = second.result(timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["counters_cleared"] == 0
    assert attempt(s, "alice", PASSWORD).status_code == 200


def test_admin_unlock_also_clears_a_lock_taken_by_email(s: Site, team: dict[str, t.Any]) -> None:
    for _ in range(5):
        assert_invalid(attempt(s, "alice@example.com", WRONG))
    retry_after(attempt(s, "alice", PASSWORD))
    assert s.api.post("/admin/users/1/unlock", token=team["admin"]).status_code == 200
    assert attempt(s, "alice@example.com", PASSWORD).status_code == 200


def test_lockout_appears_in_the_activity_log(s: Site, team: dict[str, t.Any]) -> None:
    lock_alice(s)
    r = s.api.get("/admin/logs", params={"event": "lockout.started"}, token=team["admin"])
    assert r.status_code == 200, r.text
    (row,) = r.json()["events"]
    assert row["user_id"] == 1
    assert row["outcome"] == "info"
    assert row["ip"] == "127.0.0.1"
    assert row["details"]["scope"] == "account"
    assert row["details"]["seconds"] == 900
    logs = s.api.get("/admin/logs", params={"user": 1}, token=team["admin"]).json()["events"]
    seen = [(e["event"], e["outcome"]) for e in reversed(logs)]
    assert seen == [("login.failed", "failure")] * 4 + [
        ("lockout.started", "info"),
        ("login.failed", "failure"),
        ("login.failed", "blocked"),
    ]
    assert s.api.post("/admin/users/1/unlock", token=team["admin"]).status_code == 200
    unlocked = s.api.get("/admin/logs", params={"event": "user.unlocked"}, token=team["admin"])
    (row,) = unlocked.json()["events"]
    assert row["user_id"] == 1
    assert row["details"]["by"] == team["admin_id"]
    # A subscriber cannot read the log.
    assert s.api.get("/admin/logs", token=team["bob"]).status_code == 403


# --- failed token validations ---------------------------------------------------------------


def validate(s: Site, token: str, ip: str) -> requests.Response:
    return s.api.post("/token/validate", json={"token": token}, headers={"X-Forwarded-For": ip})


def test_failed_validations_lock_the_ip_for_a_minute(make_site: t.Callable[..., Site]) -> None:
    s = make_site("HS256", HEADLESSKEY_VALIDATE_MAX_FAILURES=5, HEADLESSKEY_TRUSTED_PROXIES=1)
    s.create_user("alice")
    good = s.api.login()["token"]
    for i in range(5):
        r = validate(s, f"not-a-token-{i}", "203.0.113.7")
        assert r.status_code == 401 and r.json()["code"] == "invalid_token", r.text
    # Locked: every answer is 429, a valid token's too, so the limit is no oracle either.
    assert 55 <= retry_after(validate(s, good, "203.0.113.7")) <= 60
    assert 55 <= retry_after(validate(s, "not-a-token", "203.0.113.7")) <= 60
    # Another client is not locked, and its valid tokens are never counted.
    for _ in range(10):
        assert validate(s, good, "203.0.113.8").status_code == 200
    s.clock.advance(61)
    assert validate(s, good, "203.0.113.7").status_code == 200
    assert s.scalar(
        "SELECT count(*) FROM hk_audit WHERE event = 'lockout.started' AND ip = '203.0.113.7'"
    ) == 1


def test_failed_validations_count_within_a_minute(make_site: t.Callable[..., Site]) -> None:
    s = make_site("HS256", HEADLESSKEY_VALIDATE_MAX_FAILURES=3)
    s.create_user("alice")
    good = s.api.login()["token"]
    for _ in range(2):
        assert validate(s, "x.y.z", "ignored").status_code == 401
    s.clock.advance(61)  # a new window: the two failures are forgotten
    for _ in range(2):
        assert validate(s, "x.y.z", "ignored").status_code == 401
    assert validate(s, good, "ignored").status_code == 200
    assert validate(s, "x.y.z", "ignored").status_code == 401
    retry_after(validate(s, good, "ignored"))


def test_validation_limit_off_and_allowlist(make_site: t.Callable[..., Site]) -> None:
    for settings in ({"HEADLESSKEY_VALIDATE_MAX_FAILURES": 0},
                     {"HEADLESSKEY_VALIDATE_MAX_FAILURES": 2,
                      "HEADLESSKEY_LOCKOUT_ALLOWLIST": ["127.0.0.1"]}):
        s = make_site("HS256", **settings)
        s.create_user("alice")
        good = s.api.login()["token"]
        for _ in range(5):
            assert validate(s, "x.y.z", "ignored").status_code == 401
        assert validate(s, good, "ignored").status_code == 200


# --- Redis only -----------------------------------------------------------------------------


def test_in_redis_the_counters_name_no_login_or_address(
    request: pytest.FixtureRequest, make_site: t.Callable[..., Site]
) -> None:
    """The Redis variant keeps every counter in Redis, none in the database; a key and its
    fields tell neither the login nor the client address, and every key expires."""
    if request.node.callspec.params["make_site"] != "redis":
        pytest.skip("about the Redis store")
    s = make_site("HS256", HEADLESSKEY_TRUSTED_PROXIES=1)
    s.create_user("alice")
    ip = {"X-Forwarded-For": "203.0.113.77"}
    for _ in range(5):
        assert_invalid(attempt(s, "alice", WRONG, headers=ip))
    assert_invalid(attempt(s, "nobody-here", WRONG, headers=ip))
    retry_after(attempt(s, "alice", PASSWORD, headers=ip))
    assert s.scalar("SELECT count(*) FROM hk_throttle") == 0
    import redis  # redis-py, a test dependency, reads what the agent's own client wrote

    client = redis.Redis.from_url(s.state.settings.redis_url)
    keys = [k.decode() for k in client.keys("hk:{lockout}:*")]
    dumped = " ".join(keys + [str(client.hgetall(k)) for k in keys])
    assert "alice" not in dumped and "nobody" not in dumped and "203.0.113" not in dumped
    mine = [k for k in keys if client.hget(k, "locked_until") is not None]
    assert mine, "the account's lock is in Redis"
    for key in mine:
        assert 0 < client.ttl(key) <= 900 + 900 + 86400 + 1


def test_a_redis_that_does_not_answer_refuses_the_attempt(
    request: pytest.FixtureRequest, make_site: t.Callable[..., Site]
) -> None:
    """Counters that cannot be read let no attempt through: 503 and no session."""
    if request.node.callspec.params["make_site"] != "redis":
        pytest.skip("about the Redis store")
    from tests.conftest import free_port

    s = make_site("HS256", HEADLESSKEY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    s.create_user("alice")
    for path in ("/token", "/login"):
        r = attempt(s, "alice", PASSWORD, path)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "store_unavailable"
        assert r.headers["Retry-After"] == "5"
    r = s.api.post("/token/validate", json={"token": "not-a-token"})
    assert r.status_code == 503 and r.json()["code"] == "store_unavailable", r.text
    assert sessions_of(s, 1) == 0
