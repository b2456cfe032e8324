"""Checklist section 8: outgoing security webhooks, as a receiver on loopback sees them.

One standalone site of its own (``headlesskey-agent serve`` with two gunicorn workers and its
jobs process, which delivers every 2 s), whose endpoints are small HTTP servers run here on
loopback (the product allows http and loopback URLs; see docs/webhooks.md). Each endpoint
subscribes to one kind of event and answers in its own way: normally, 500 then 200, 429/503
with ``Retry-After``, 410, a redirect, or a hang past the 3 s attempt timeout. Tests make the
events over HTTP and check what arrives (headers, Standard Webhooks signatures, bodies) and
what the outbox in the site's database says about attempts and schedules.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import re
import statistics
import time
import typing as t
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.agent.test_webhooks import Received
from tests.agent.test_webhooks import Receiver
from tests.agent.test_webhooks import new_secret
from tests.agent.test_webhooks import tampered
from tests.conftest import PASSWORD
from tests.conftest import Mailbox
from tests.integration.test_sso import Agent
from tests.integration.test_sso import User
from tests.security.conftest import fresh_user
from tests.security.conftest import smtp_settings

TIMEOUT = 3  # HEADLESSKEY_WEBHOOK_TIMEOUT of the site, seconds (15 by default)
NEW_PASSWORD = "copper lantern beside the harbour"  # noqa: S105 - a test account's password
WAIT = 20.0  # how long a test waits for a delivery (the jobs poll every 2 s)

# endpoint id -> the events it subscribes to (None: all)
ENDPOINTS: dict[str, list[str] | None] = {
    "main": None,
    "second": None,
    "rotating": ["user.registered"],
    "rotated": ["user.registered"],
    "retry": ["token.revoked"],
    "busy": ["token.refreshed"],
    "gone": ["session.ended"],  # answers 410: disabled
    "moved": ["password.reset_requested"],
    "hang": ["login.failed", "login.succeeded"],
}


class Hooks:
    """The site, its receivers and their secrets."""

    def __init__(self, site: Agent, receivers: dict[str, Receiver], target: Receiver,
                 secrets_: dict[str, str], old_secrets: dict[str, str]) -> None:
        self.site = site
        self.receivers = receivers
        self.target = target  # where the "moved" endpoint redirects to
        self.secrets = secrets_
        self.old = old_secrets
        self.logged_out: User | None = None  # whose logout the "retry" endpoint fails once

    def __getitem__(self, name: str) -> Receiver:
        return self.receivers[name]

    def outbox(self, endpoint: str) -> list[dict[str, t.Any]]:
        rows = self.site.rows(
            "SELECT id, message_id, event, status, attempts, next_attempt_at, last_status, "
            "last_error FROM hk_webhook_outbox WHERE endpoint = ? ORDER BY id", endpoint)
        keys = ("id", "message_id", "event", "status", "attempts", "next_attempt_at",
                "last_status", "last_error")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def attempts(self, row_id: int) -> list[dict[str, t.Any]]:
        rows = self.site.rows("SELECT attempted_at, status_code, error, duration_ms FROM "
                              "hk_webhook_attempts WHERE message_id = ? ORDER BY id", row_id)
        return [dict(zip(("at", "status", "error", "ms"), row, strict=True)) for row in rows]

    def wait_outbox(self, endpoint: str, check: t.Callable[[list[dict[str, t.Any]]], bool],
                    timeout: float = WAIT) -> list[dict[str, t.Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.outbox(endpoint)
            if check(rows):
                return rows
            assert time.monotonic() < deadline, (endpoint, rows)
            time.sleep(0.2)


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory, mail: Mailbox) -> t.Iterator[Hooks]:
    root: Path = tmp_path_factory.mktemp("webhooks")
    receivers = {name: Receiver() for name in ENDPOINTS}
    target = Receiver()
    keys = {name: new_secret() for name in ENDPOINTS}
    old = {"rotating": new_secret(), "rotated": new_secret()}
    passed = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()
    config = []
    for name, events in ENDPOINTS.items():
        item: dict[str, t.Any] = {"id": name, "url": receivers[name].url, "secret": keys[name]}
        if events is not None:
            item["events"] = events
        if name in old:
            item["previous_secret"] = old[name]
        if name == "rotated":
            item["previous_secret_expires"] = passed
        config.append(item)
    site = Agent("w", root, {
        "HEADLESSKEY_WEBHOOKS": json.dumps(config),
        "HEADLESSKEY_WEBHOOK_TIMEOUT": str(TIMEOUT),
        "HEADLESSKEY_LOCKOUT_IP_MAX_FAILURES": "10000",
        "HEADLESSKEY_LOCKOUT_MAX_FAILURES": "3",
        **smtp_settings(mail),
    })
    site.jobs = True
    try:
        site.init()
        site.start()
        assert site.service is not None
        site.service.wait_ready()
        hooks = Hooks(site, receivers, target, keys, old)
        # Started now so that its retry, 5 s later, is due while the other tests run: the
        # "retry" endpoint fails the first delivery of a logout (see the W-03 test).
        receivers["retry"].then(1, status=500)
        hooks.logged_out = fresh_user(site, "re")
        r = site.post("/token/revoke", token=hooks.logged_out.token)
        assert r.status_code == 200, r.text
        yield hooks
    finally:
        for receiver in (*receivers.values(), target):
            receiver.release.set()  # no delivery in flight hangs the stop
        site.stop()
        for receiver in (*receivers.values(), target):
            receiver.close()


def verifies(secret: str, req: Received) -> bool:
    """Does the reference Standard Webhooks library accept ``req`` with ``secret``?"""
    try:
        Webhook(secret).verify(req.body, req.headers)
    except WebhookVerificationError:
        return False
    return True


def events_of(receiver: Receiver) -> list[str]:
    return [r.payload["type"] for r in receiver.delivered()]


def wait_event(receiver: Receiver, event: str, count: int = 1,
               login: str | None = None) -> list[Received]:
    """The deliveries of ``event`` (of ``login``'s, if given), once there are ``count``."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [r for r in receiver.delivered() if r.payload["type"] == event
                 and login in (None, r.payload["data"]["login"])]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, (event, events_of(receiver))
        time.sleep(0.1)


def utc(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


# --- W-01, W-02, W-08 --------------------------------------------------------------------------


@pytest.mark.case("W-01", "W-02")
def test_W01_W02_every_delivery_is_signed_standard_webhooks_style(hooks: Hooks) -> None:
    """Each delivery has ``webhook-id`` (``msg_`` + 32 hex), a current ``webhook-timestamp``,
    ``webhook-signature`` and ``Content-Type: application/json``; the reference library verifies
    it with the endpoint's secret, and refuses it once one body byte is changed."""
    user = fresh_user(hooks.site, "w")
    main = hooks["main"]
    seen = [*wait_event(main, "user.registered", login=user.username),
            *wait_event(main, "login.succeeded", login=user.username)]
    for req in seen:
        assert req.headers["content-type"] == "application/json"
        assert re.fullmatch(r"msg_[0-9a-f]{32}", req.headers["webhook-id"])
        assert abs(int(req.headers["webhook-timestamp"]) - time.time()) < 60
        assert re.fullmatch(r"v1,[A-Za-z0-9+/]+={0,2}", req.headers["webhook-signature"])
        assert verifies(hooks.secrets["main"], req)
        assert not verifies(hooks.secrets["main"], tampered(req))
        forged_ts = dict(req.headers, **{"webhook-timestamp": str(int(time.time()) + 1)})
        assert not verifies(hooks.secrets["main"], Received(req.path, forged_ts, req.body,
                                                            req.answer))
        assert set(req.payload) == {"type", "timestamp", "data"}
    assert len({r.id for r in main.delivered()}) == len(main.delivered())


@pytest.mark.case("W-08")
def test_W08_each_endpoint_has_its_own_secret(hooks: Hooks) -> None:
    """Two endpoints get the same events signed with different secrets: each verifies only with
    its own; an agent refuses two endpoints sharing a secret (see tests/agent)."""
    fresh_user(hooks.site, "p")
    main, second = wait_event(hooks["main"], "user.registered"), \
        wait_event(hooks["second"], "user.registered")
    assert hooks.secrets["main"] != hooks.secrets["second"]
    for req in main:
        assert not verifies(hooks.secrets["second"], req)
    for req in second:
        assert verifies(hooks.secrets["second"], req)
        assert not verifies(hooks.secrets["main"], req)
    # The same event, one message per endpoint: different ids.
    assert not {r.id for r in main} & {r.id for r in second}


@pytest.mark.case("W-08")
def test_W08_rotation_signs_with_both_secrets_until_the_previous_expires(hooks: Hooks) -> None:
    """During a rotation a delivery carries two signatures: a receiver still holding the old
    secret and one holding the new secret both verify it; once the previous secret's end has
    passed, only the new one signs."""
    fresh_user(hooks.site, "rot")
    (rotating,) = wait_event(hooks["rotating"], "user.registered")[-1:]
    assert len(rotating.headers["webhook-signature"].split(" ")) == 2
    assert verifies(hooks.secrets["rotating"], rotating)
    assert verifies(hooks.old["rotating"], rotating)
    assert not verifies(hooks.old["rotating"], tampered(rotating))
    assert not verifies(new_secret(), rotating)

    (rotated,) = wait_event(hooks["rotated"], "user.registered")[-1:]
    assert len(rotated.headers["webhook-signature"].split(" ")) == 1
    assert verifies(hooks.secrets["rotated"], rotated)
    assert not verifies(hooks.old["rotated"], rotated)


# --- W-03, W-04, W-05 --------------------------------------------------------------------------


@pytest.mark.case("W-04")
def test_W04_retry_after_is_honoured_and_the_schedule_spans_days(hooks: Hooks) -> None:
    """429 with ``Retry-After: 3600`` and 503 with ``Retry-After`` as an HTTP date push the next
    attempt that far out (not the 5 s of the schedule); the documented schedule grows
    exponentially with jitter and spans more than a day before giving up."""
    from agent.webhooks import JITTER
    from agent.webhooks import SCHEDULE
    from agent.webhooks import backoff

    receiver = hooks["busy"]
    later = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=2),
                                        usegmt=True)
    receiver.then(1, status=429, Retry_After="3600").then(1, status=503, Retry_After=later)
    user = fresh_user(hooks.site, "busy")
    r = hooks.site.post("/token/refresh", json={"refresh_token": _refresh_token(hooks, user)})
    assert r.status_code == 200, r.text
    r = hooks.site.post("/token/refresh", json={"refresh_token": r.json()["refresh_token"]})
    assert r.status_code == 200, r.text
    rows = hooks.wait_outbox("busy", lambda rows: sum(r["attempts"] == 1 for r in rows) >= 2)
    waits = []
    for row in rows[-2:]:
        assert row["status"] == "pending" and row["last_status"] in (429, 503), row
        (attempt,) = hooks.attempts(row["id"])
        waits.append((utc(row["next_attempt_at"]) - utc(attempt["at"])).total_seconds())
    assert 3600 - 5 <= min(waits) and max(waits) <= 7200 + 5, waits
    assert max(waits) >= 7200 - 60, waits

    assert SCHEDULE[0] == 5 and all(b > a for a, b in zip(SCHEDULE, SCHEDULE[1:], strict=False))
    assert sum(SCHEDULE) * (1 - JITTER) > 24 * 3600
    assert len({round(t.cast(float, backoff(3)), 3) for _ in range(20)}) > 1  # jitter
    assert backoff(len(SCHEDULE) + 1) is None  # then the message is dead


def _refresh_token(hooks: Hooks, user: t.Any) -> str:
    r = hooks.site.post("/token", json={"username": user.username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return t.cast(str, r.json()["refresh_token"])


@pytest.mark.case("W-05")
def test_W05_410_gone_disables_the_endpoint_and_mails_the_administrators(
    hooks: Hooks, mail: Mailbox
) -> None:
    """410 Gone: the message is ``dead`` after that one attempt, the endpoint is disabled (a
    later event for it dies unsent), the activity log says so, and the site's administrator (no
    one else) gets a mail naming the endpoint."""
    site, receiver = hooks.site, hooks["gone"]
    admin = fresh_user(site, "owner")
    assert site.write("UPDATE hk_users SET roles = ? WHERE id = ?", '["administrator"]',
                      admin.id) == 1
    mark = site.last_audit_id()
    receiver.then(1, status=410)
    user = fresh_user(site, "gone")

    def end_a_session() -> None:
        pair = site.post("/token", json={"username": user.username, "password": PASSWORD})
        sid = pair.json()["sid"]
        r = site.request("DELETE", f"/sessions/{sid}", token=user.token)
        assert r.status_code == 200, r.text

    end_a_session()
    rows = hooks.wait_outbox("gone", lambda rows: any(r["status"] == "dead" for r in rows))
    (dead,) = rows
    assert (dead["attempts"], dead["last_status"]) == (1, 410)
    assert len(hooks.attempts(dead["id"])) == 1
    (notice,) = mail.wait_for(admin.email)
    assert "gone" in notice["Subject"] and "410 Gone" in notice.get_payload(decode=True).decode()
    assert [(r["outcome"], r["details"]) for r in site.audit("webhook.disabled", mark)] == [
        ("info", {"endpoint": "gone", "reason": "410 Gone"})]
    assert mail.to(user.email) == []

    end_a_session()  # a later event for the disabled endpoint: given up unsent
    rows = hooks.wait_outbox("gone", lambda rows: len(rows) == 2 and rows[1]["status"] == "dead")
    assert rows[1]["attempts"] == 0 and rows[1]["last_error"] == "endpoint disabled (410 Gone)"
    assert len(receiver.snapshot()) == 1
    # The other endpoints hear of it.
    wait_event(hooks["main"], "webhook.disabled")


@pytest.mark.case("W-05")
def test_W05_a_redirect_is_a_failure_and_is_not_followed(hooks: Hooks) -> None:
    """A 302 (and a 307) to another receiver: a failed attempt, retried later; the redirect
    target receives nothing."""
    receiver = hooks["moved"]
    receiver.then(1, status=302, Location=hooks.target.url).then(
        1, status=307, Location=hooks.target.url)
    user = fresh_user(hooks.site, "mv")
    for _ in range(2):
        r = hooks.site.post("/forgot-password", json={"login": user.username})
        assert r.status_code == 200, r.text
    rows = hooks.wait_outbox("moved", lambda rows: sum(r["attempts"] == 1 for r in rows) >= 2)
    failed = [r for r in rows if r["attempts"] == 1]
    assert sorted(r["last_status"] for r in failed) == [302, 307]
    assert all(r["status"] == "pending" and r["last_error"].startswith("HTTP 3") for r in failed)
    assert hooks.target.snapshot() == []


# --- W-07, W-09, W-10 --------------------------------------------------------------------------


@pytest.mark.case("W-07")
def test_W07_payloads_carry_ids_and_facts_never_secrets(hooks: Hooks, mail: Mailbox) -> None:
    """Login, failures, a lockout, refresh and refresh reuse, a password change, a reset by
    link: every payload sent holds none of the passwords, tokens, reset token or secrets in play,
    and only the documented fields."""
    site = hooks.site
    user = fresh_user(site, "min")
    login = site.post("/token", json={"username": user.username, "password": PASSWORD}).json()
    rotated = site.post("/token/refresh", json={"refresh_token": login["refresh_token"]}).json()
    site.post("/token/refresh", json={"refresh_token": rotated["refresh_token"]})
    reused = site.post("/token/refresh", json={"refresh_token": login["refresh_token"]})
    assert reused.json()["code"] == "refresh_token_reused", reused.text
    changed = site.post("/change-password", token=user.token,
                        json={"current_password": PASSWORD, "new_password": NEW_PASSWORD})
    assert changed.status_code == 200, changed.text
    assert site.post("/forgot-password", json={"login": user.username}).status_code == 200
    texts = [part.get_payload(decode=True).decode()
             for message in mail.wait_for(user.email, count=2) for part in message.walk()
             if part.get_content_type() == "text/plain"]  # the change notice, the reset link
    reset_token = next(filter(None, (re.search(r"token=([A-Za-z0-9_\-]+)", x) for x in texts)),
                       None)
    assert reset_token, texts
    third = "patient otters mend wooden boats"
    r = site.post("/reset-password", json={"login": user.username, "token": reset_token.group(1),
                                           "password": third})
    assert r.status_code == 200, r.text
    victim = fresh_user(site, "lock")
    for _ in range(3):
        site.post("/token", json={"username": victim.username, "password": "Wrong guess 1"})
    wanted = {"login.succeeded", "login.failed", "lockout.started", "token.refreshed",
              "token.reuse_detected", "password.changed", "password.reset_requested",
              "password.reset"}
    deadline = time.monotonic() + WAIT
    while not wanted <= set(events_of(hooks["main"])):
        assert time.monotonic() < deadline, wanted - set(events_of(hooks["main"]))
        time.sleep(0.2)

    secrets_in_play = [PASSWORD, NEW_PASSWORD, third, "Wrong guess 1", user.token, victim.token,
                       login["token"], login["refresh_token"], rotated["token"],
                       rotated["refresh_token"], reset_token.group(1),
                       *hooks.secrets.values(), *hooks.old.values()]
    secrets_in_play += [s.removeprefix("whsec_") for s in secrets_in_play if s.startswith("whsec_")]
    for req in hooks["main"].delivered():
        body = req.body.decode()
        for secret in secrets_in_play:
            assert secret not in body, (req.payload["type"], body)
        assert "password_hash" not in body and "$argon2" not in body
        data = req.payload["data"]
        assert set(data) <= {"outcome", "user_id", "login", "session_id", "ip", "device",
                             "details"}, data
        assert all(isinstance(v, (str, int, float, bool, type(None))) or
                   isinstance(v, (list, dict)) and len(json.dumps(v)) < 300
                   for v in data["details"].values()), data


@pytest.mark.case("W-09", "W-04")
def test_W09_a_hanging_receiver_slows_no_login_and_costs_one_timeout(hooks: Hooks) -> None:
    """Logins are as fast while their webhook endpoint hangs (its deliveries pile up in the
    outbox) as before: nothing is sent on the request path. The hanging attempt ends at the
    attempt timeout (3 s here, 15 s by default), recorded as ``timeout``, and is retried."""
    from agent.config import DEFAULTS

    assert DEFAULTS["WEBHOOK_TIMEOUT"][0] == 15
    site, receiver = hooks.site, hooks["hang"]
    user = fresh_user(site, "fast")
    timed_out = ("SELECT a.duration_ms, o.status FROM hk_webhook_attempts a "
                 "JOIN hk_webhook_outbox o ON o.id = a.message_id "
                 "WHERE o.endpoint = 'hang' AND a.error = 'timeout' ORDER BY a.id")
    timeouts = len(site.rows(timed_out))

    def login_time() -> float:
        started = time.monotonic()
        r = site.post("/token", json={"username": user.username, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return time.monotonic() - started

    baseline = [login_time() for _ in range(4)]
    receiver.then(50, hang=30)
    before = len(receiver.snapshot())
    during = []
    deadline = time.monotonic() + WAIT
    while len(receiver.snapshot()) == before or len(during) < 4:
        during.append(login_time())
        assert time.monotonic() < deadline, "the hanging endpoint got no request"
        time.sleep(0.3)
    hanging = receiver.snapshot()[-1]
    assert hanging.answer.hang
    slow = max(during)
    assert slow < max(baseline) + 1.0 and slow < TIMEOUT, (baseline, during)
    assert statistics.median(during) < statistics.median(baseline) + 0.5, (baseline, during)

    deadline = time.monotonic() + WAIT
    while len(rows := site.rows(timed_out)) == timeouts:
        assert time.monotonic() < deadline, hooks.outbox("hang")
        time.sleep(0.2)
    ms, status = rows[timeouts]
    assert TIMEOUT * 1000 - 200 <= ms <= TIMEOUT * 1000 + 3000, ms
    assert status in ("pending", "delivered")  # retried later, never lost
    with receiver._lock:  # the endpoint answers normally again: no more hangs planned
        receiver._plan.clear()
    receiver.release.set()  # and the stalled request is let go


@pytest.mark.case("W-03", "W-04")
def test_W03_W04_a_failed_delivery_is_retried_under_the_same_id(hooks: Hooks) -> None:
    """The endpoint answered 500 once (to the logout made when the site started): about 5 s
    later (4-6 s, jitter) the same message came again, same ``webhook-id`` and body, a later
    timestamp and a fresh signature, both valid; each attempt is recorded."""
    receiver = hooks["retry"]
    assert hooks.logged_out is not None
    (delivered,) = wait_event(receiver, "token.revoked")
    assert delivered.payload["data"]["user_id"] == hooks.logged_out.id
    tries = [r for r in receiver.snapshot() if r.id == delivered.id]
    assert [r.answer.status for r in tries] == [500, 200], tries
    first, second = tries
    assert first.body == second.body
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]
    assert verifies(hooks.secrets["retry"], first) and verifies(hooks.secrets["retry"], second)

    # The receiver has answered; the jobs process records that a moment later.
    rows = hooks.wait_outbox("retry", lambda rows: any(
        r["message_id"] == delivered.id and r["status"] == "delivered" for r in rows))
    (row,) = [r for r in rows if r["message_id"] == delivered.id]
    attempts = hooks.attempts(row["id"])
    assert [(a["status"], a["error"]) for a in attempts] == [(500, "HTTP 500"), (200, "")]
    gap = (utc(attempts[1]["at"]) - utc(attempts[0]["at"])).total_seconds()
    # The first backoff (5 s, jitter 20 %), plus one poll of the jobs (2 s) and slack for a loaded
    # machine.
    assert 5 * 0.8 <= gap <= 5 * 1.2 + 2 + 3, gap


@pytest.mark.case("W-10")
def test_W10_inbound_admin_webhooks() -> None:
    """Neither the hub nor an agent receives webhooks."""
    pytest.skip("no inbound admin webhooks: the agent and the hub receive no webhook; the "
                "only signed inbound API is the hub's /api/v1, covered by H-01..H-07")


def test_webhook_urls_other_than_http_are_refused_at_start_up() -> None:
    """Not a listed case: a ``file:``, ``gopher:`` or ``ftp:`` URL (or no host) stops the start,
    so deliveries can only ever be HTTP(S) POSTs."""
    from agent.config import build_settings
    from agent.errors import ConfigError

    for url in ("file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "ftp://h/x",
                "http:///nohost", "javascript:alert(1)"):
        config = {"HEADLESSKEY_SECRET_KEY": "k" * 48, "HEADLESSKEY_ALGORITHM": "HS256",
                  "HEADLESSKEY_SITE_URL": "https://site.example",
                  "HEADLESSKEY_WEBHOOKS": json.dumps([{"url": url, "secret": new_secret()}])}
        with pytest.raises(ConfigError, match=r"WEBHOOKS\[0\]\.url"):
            build_settings(config, "/nonexistent")
