"""Account enumeration, statistically: neither the answers nor the timings of login, register
and forgot-password tell whether an account exists.

A site of its own with the agent's default argon2 parameters (argon2id, t=2, 19 MiB: the fleet
uses the cheapest ones, where a missing dummy hash would not show), two gunicorn workers, and a
deliberately slow SMTP server (every mail takes ``SMTP_DELAY`` to accept), so a mail sent while
the request waits would show in its timing. Each comparison takes ``SAMPLES`` interleaved
requests per group (A, B, A, B, ... over one keep-alive connection, so drift in the machine's
load falls on both groups alike) and compares medians against a bound derived in the test.

The statistics are the standard library's: medians (robust to the outliers a shared 2-core
machine produces) and interquartile ranges. What each bound means is written where it is used.
"""

from __future__ import annotations

import secrets
import statistics
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
import requests

from tests.conftest import PASSWORD
from tests.conftest import free_port
from tests.integration.test_sso import PREFIX
from tests.integration.test_sso import Agent
from tests.integration.test_sso import Federation

SAMPLES = 40
SMTP_DELAY = 0.2  # seconds the SMTP server takes to accept each mail
REALISTIC_ARGON2 = {  # the agent's defaults (agent/config.py)
    "HEADLESSKEY_ARGON2_TIME_COST": "2",
    "HEADLESSKEY_ARGON2_MEMORY_COST": "19456",
    "HEADLESSKEY_ARGON2_PARALLELISM": "1",
}
LIMITS = {  # every request comes from 127.0.0.1: never a lock here
    "HEADLESSKEY_LOCKOUT_MAX_FAILURES": "100",
    "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "10000",
}


SMTP_SERVER = """
import asyncio, sys
from aiosmtpd.controller import Controller

class Slow:
    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(float(sys.argv[2]))
        with open(sys.argv[3], "a") as log:
            log.write("".join(to + "\\n" for to in envelope.rcpt_tos))
        return "250 OK"

controller = Controller(Slow(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
"""


class SlowMailServer:
    """A real SMTP server in a process of its own (so it takes no CPU time from the process
    that measures), taking ``SMTP_DELAY`` to accept each message; it notes each recipient."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.received = folder / "received.txt"
        self.received.touch()
        self.proc = subprocess.Popen(  # noqa: S603 - this interpreter
            [sys.executable, "-c", SMTP_SERVER, str(self.port), str(SMTP_DELAY),
             str(self.received)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("the SMTP server did not start")

    def count(self, to: str) -> int:
        return self.received.read_text().splitlines().count(to)

    def wait_for(self, to: str, count: int = 1, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.count(to) < count:
            assert time.monotonic() < deadline, f"{self.count(to)} mails to {to}"
            time.sleep(0.05)

    def stop(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.kill()  # mails still held fail at once; nothing here needs them
        self.proc.wait(5)
        self.proc.stdin.close()
        self.proc.stdout.close()


class Site:
    """The site under test, its mailbox and a keep-alive client."""

    def __init__(self, agent: Agent, mail: SlowMailServer) -> None:
        self.agent = agent
        self.mail = mail
        self.http = requests.Session()

    def post(self, path: str, body: dict[str, t.Any]) -> tuple[float, requests.Response]:
        started = time.perf_counter()
        r = self.http.post(self.agent.base + PREFIX + path, json=body, timeout=30)
        return time.perf_counter() - started, r

    def register(self, username: str, email: str | None = None) -> requests.Response:
        return self.post("/register", {"username": username,
                                       "email": email or f"{username}@example.com",
                                       "password": PASSWORD})[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Site]:
    root: Path = tmp_path_factory.mktemp("enumeration")
    mail = SlowMailServer(root)
    try:
        fed = Federation.build(root, ["e"], **REALISTIC_ARGON2, **LIMITS,
                               HEADLESSKEY_MAIL_BACKEND="smtp", HEADLESSKEY_MAIL_HOST="127.0.0.1",
                               HEADLESSKEY_MAIL_PORT=str(mail.port),
                               HEADLESSKEY_MAIL_SECURITY="none")
    except BaseException:
        mail.stop()
        raise
    s = Site(fed["e"], mail)
    try:
        yield s
    finally:
        s.http.close()
        mail.stop()  # queued mails fail at once instead of holding the site's shutdown
        fed.stop()


Sample = tuple[float, requests.Response]


def interleaved(a: t.Callable[[int], Sample], b: t.Callable[[int], Sample],
                n: int = SAMPLES) -> tuple[list[Sample], list[Sample]]:
    """``n`` samples of each, alternating which goes first in each pair."""
    first: list[Sample] = []
    second: list[Sample] = []
    for i in range(n):
        if i % 2:
            second.append(b(i))
            first.append(a(i))
        else:
            first.append(a(i))
            second.append(b(i))
    return first, second


def median(samples: list[Sample]) -> float:
    return statistics.median(s[0] for s in samples)


def iqr(samples: list[Sample]) -> float:
    q1, _q2, q3 = statistics.quantiles([s[0] for s in samples], n=4)
    return q3 - q1


def answers(samples: list[Sample]) -> set[tuple[int, str]]:
    """The distinct answers (status, body) of a group; headers that vary (Date) aside."""
    return {(r.status_code, r.text) for _elapsed, r in samples}


def describe(name: str, samples: list[Sample]) -> str:
    return f"{name}: median {median(samples) * 1000:.1f} ms, IQR {iqr(samples) * 1000:.1f} ms"


@pytest.fixture(scope="module")
def hash_cost(site: Site) -> float:
    """What one password check costs at this site: the median of wrong-password logins minus
    the median of logins refused before any hash (no password: 400)."""
    known = f"cost{secrets.token_hex(4)}"
    assert site.register(known).status_code == 201
    checked, unchecked = interleaved(
        lambda i: site.post("/token", {"username": known, "password": f"wrong {i}"}),
        lambda i: site.post("/token", {"username": known}),
        n=30,
    )
    assert answers(unchecked) == {(400, unchecked[0][1].text)}
    return median(checked) - median(unchecked)


def same_median(a: t.Callable[[int], Sample], b: t.Callable[[int], Sample], bound: float,
                n: int = SAMPLES, rounds: int = 3) -> tuple[list[Sample], list[Sample], float]:
    """Samples of ``a`` and ``b`` until their medians are within ``bound``, at most ``rounds``
    batches of ``n``; every batch adds to the same two groups, so a real gap (which stays
    as samples accumulate) still fails, while a batch spoiled by the shared machine's load gets
    more samples. Returns the groups and the last difference of medians."""
    first: list[Sample] = []
    second: list[Sample] = []
    difference = float("inf")
    for _ in range(rounds):
        done = len(first)
        more_a, more_b = interleaved(lambda i: a(done + i), lambda i: b(done + i), n)  # noqa: B023
        first += more_a
        second += more_b
        difference = abs(median(first) - median(second))
        if difference < bound:
            break
    return first, second, difference


@pytest.mark.case("A-01", "A-02")
def test_A02_login_unknown_user_costs_a_wrong_password(site: Site, hash_cost: float,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Wrong password for an existing user vs any password for an unknown one: the same
    answer every time, and the same median time."""
    known = f"known{secrets.token_hex(4)}"
    assert site.register(known).status_code == 201
    unknown = f"ghost{secrets.token_hex(4)}"
    # The control: with realistic argon2 a password check costs tens of milliseconds, so an
    # unknown user answered without the dummy hash would be faster by about ``hash_cost``.
    assert hash_cost > 0.010, f"a password check costs {hash_cost * 1000:.1f} ms: no real hash"
    # Half a hash: a missing dummy hash shifts the unknown group by a whole one, while equal
    # work differs only by noise, which the medians of 40 interleaved samples keep far below.
    bound = hash_cost / 2
    wrong, ghost, difference = same_median(
        lambda i: site.post("/token", {"username": known, "password": f"guess {i}"}),
        lambda i: site.post("/token", {"username": unknown, "password": f"guess {i}"}),
        bound,
    )
    seen = answers(wrong) | answers(ghost)
    assert len(seen) == 1 and next(iter(seen))[0] == 401, seen
    with capsys.disabled():
        print(f"\n[enumeration] login: {describe('wrong password', wrong)}; "
              f"{describe('unknown user', ghost)}; one hash {hash_cost * 1000:.1f} ms")
    assert difference < bound, (
        f"medians differ by {difference * 1000:.1f} ms (one hash: {hash_cost * 1000:.1f} ms)")


@pytest.mark.case("A-02")
def test_A02_login_to_an_account_made_by_sso_costs_a_wrong_password(
        site: Site, hash_cost: float, capsys: pytest.CaptureFixture[str]) -> None:
    """An account made by SSO has no password: a login to it answers as a wrong password does,
    in the same median time, so timing does not tell which logins exist as federated accounts."""
    known = f"known{secrets.token_hex(4)}"
    federated = f"fed{secrets.token_hex(4)}"
    for name in (known, federated):
        assert site.register(name).status_code == 201
    # What /sso/exchange stores for the accounts it makes (agent/federation.py).
    assert site.agent.write("UPDATE hk_users SET password_hash = '!sso-only' "
                            "WHERE user_login = ?", federated) == 1
    assert hash_cost > 0.010, f"a password check costs {hash_cost * 1000:.1f} ms: no real hash"
    bound = hash_cost / 2  # as for unknown users: a skipped hash shifts the group by a whole one
    wrong, sso_only, difference = same_median(
        lambda i: site.post("/token", {"username": known, "password": f"guess {i}"}),
        lambda i: site.post("/token", {"username": federated, "password": f"guess {i}"}),
        bound,
    )
    with capsys.disabled():
        print(f"\n[enumeration] login: {describe('wrong password', wrong)}; "
              f"{describe('account made by SSO', sso_only)}; one hash {hash_cost * 1000:.1f} ms")
    # Timing first: a gap makes the samples run to the account's lockout (429s) too.
    assert difference < bound, (
        f"medians differ by {difference * 1000:.1f} ms (one hash: {hash_cost * 1000:.1f} ms)")
    seen = answers(wrong) | answers(sso_only)
    assert len(seen) == 1 and next(iter(seen))[0] == 401, seen


@pytest.mark.case("A-04", "A-05")
def test_A04_forgot_password_existing_or_not(site: Site,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Existing vs unknown account: the same answer, and the same median time although the
    existing one gets a mail from an SMTP server that takes 200 ms per message."""
    # Eight accounts take five requests each: every request is one the hourly limit lets mail.
    owners = [f"forgot{secrets.token_hex(4)}" for _ in range(SAMPLES // 5)]
    for name in owners:
        assert site.register(name).status_code == 201
    existing, unknown = interleaved(
        lambda i: site.post("/forgot-password", {"login": f"{owners[i // 5]}@example.com"}),
        lambda i: site.post("/forgot-password",
                            {"login": f"nobody{i}{secrets.token_hex(3)}@example.com"}),
    )
    seen = answers(existing) | answers(unknown)
    assert len(seen) == 1 and next(iter(seen))[0] == 200, seen
    difference = abs(median(existing) - median(unknown))
    band = max(iqr(existing), iqr(unknown))
    with capsys.disabled():
        print(f"\n[enumeration] forgot-password: {describe('existing', existing)}; "
              f"{describe('unknown', unknown)}")
    # A mail sent before answering adds at least SMTP_DELAY (200 ms) to every existing sample.
    # What remains is the extra rows written for an existing account (about nothing: in one
    # process the two answers take the same 3 ms) and the site's mail thread at work in the
    # same worker while it answers (about 10 ms here, with every mail held 200 ms). The bound
    # is the groups' spread, at least 25 ms, never above a third of the SMTP delay.
    bound = min(SMTP_DELAY / 3, max(0.025, band))
    assert difference < bound, (
        f"medians differ by {difference * 1000:.1f} ms (bound {bound * 1000:.1f} ms)")
    # The mails do go out, after the answers.
    site.mail.wait_for(f"{owners[0]}@example.com", 1, timeout=SAMPLES * SMTP_DELAY + 10)


@pytest.mark.case("A-03")
def test_A03_register_with_a_taken_email(site: Site, hash_cost: float,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A taken email gets the answer a free one gets, in the same median time (the password is
    hashed either way), and its owner a notice by mail; no second account appears."""
    owner = f"owner{secrets.token_hex(4)}"
    assert site.register(owner).status_code == 201
    taken_email = f"{owner}@example.com"
    # Half a hash, as for logins: skipping the hash for a taken email would show as a whole
    # one; so would a notice mail sent before answering (200 ms).
    bound = hash_cost / 2
    taken, free, difference = same_median(
        lambda i: site.post("/register", {"username": f"t{i}{secrets.token_hex(4)}",
                                          "email": taken_email, "password": PASSWORD}),
        lambda i: site.post("/register", {"username": f"f{i}{secrets.token_hex(4)}",
                                          "email": f"f{i}{secrets.token_hex(4)}@example.com",
                                          "password": PASSWORD}),
        bound, n=30,
    )
    seen = answers(taken) | answers(free)
    assert len(seen) == 1 and next(iter(seen))[0] == 201, seen
    assert site.agent.rows("SELECT count(*) FROM hk_users WHERE email = ?", taken_email) == [(1,)]
    with capsys.disabled():
        print(f"\n[enumeration] register: {describe('taken email', taken)}; "
              f"{describe('free email', free)}; one hash {hash_cost * 1000:.1f} ms")
    assert difference < bound, (
        f"medians differ by {difference * 1000:.1f} ms (one hash: {hash_cost * 1000:.1f} ms)")
    # The owner, who asked for nothing, gets a mail: the notice.
    site.mail.wait_for(taken_email, 1, timeout=len(taken) * SMTP_DELAY + 10)


@pytest.mark.case("A-03")
def test_A03_taken_username_is_the_plugins_conflict(site: Site) -> None:
    """Documented exception: as the WordPress plugin's API, a taken *username* is a 409
    ``existing_user_login`` (a user choosing a name must learn it is taken). The email, which
    identifies the person, is never revealed: a taken email is a plain 201 (above), and login
    and forgot-password answer alike for names that exist and names that do not."""
    name = f"taken{secrets.token_hex(4)}"
    assert site.register(name).status_code == 201
    r = site.register(name, email=f"other{secrets.token_hex(4)}@example.com")
    assert r.status_code == 409 and r.json()["code"] == "existing_user_login", r.text
    # The same name, differently spelled, is the same name.
    r = site.register(name.upper(), email=f"other{secrets.token_hex(4)}@example.com")
    assert r.status_code == 409, r.text
    free = f"free{secrets.token_hex(4)}"
    for path, body in (("/token", {"password": "some guess here"}),
                       ("/forgot-password", {})):
        _, a = site.post(path, {"username" if path == "/token" else "login": name, **body})
        _, b = site.post(path, {"username" if path == "/token" else "login": free, **body})
        assert (a.status_code, a.json()) == (b.status_code, b.json()), (path, a.text, b.text)
