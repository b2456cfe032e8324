"""Security webhooks as a receiver sees them (SECURITY.md §8, W-01…W-09).

Every test runs a real HTTP receiver on loopback that records each request and can be told to
fail its first requests (5xx, a hang, 410, a redirect, 429 with Retry-After). Events are made
over HTTP against a served agent; delivery is driven by calling ``deliver_due`` and moving the
agent's clock past each backoff, so a day of retries takes milliseconds.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import email.utils
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import typing as t
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
import requests
import standardwebhooks.webhooks as swh
from flask import Flask
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from agent import HeadlessKey
from agent.errors import ConfigError
from agent.extension import State
from agent.models import User
from agent.models import WebhookAttempt
from agent.models import WebhookMessage
from agent.webhooks import SCHEDULE
from agent.webhooks import InvalidSignature
from agent.webhooks import deliver_due
from agent.webhooks import redeliver
from agent.webhooks import verify
from tests.conftest import PASSWORD
from tests.conftest import SERVER_POLL
from tests.conftest import Clock
from tests.conftest import Mailbox
from tests.conftest import Site
from tests.conftest import answering
from tests.conftest import free_port
from tests.conftest import process_env as clean_env

NEW_PASSWORD = "amber falcon over quiet harbours"
THIRD_PASSWORD = "seventeen paper lanterns drifting"


def new_secret(size: int = 32) -> str:
    """A Standard Webhooks secret: ``whsec_`` and the base64 of ``size`` random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(size)).decode()


# ---------------------------------------------------------------------------------------------
# The receiver


@dataclasses.dataclass(frozen=True)
class Answer:
    """How the receiver answers one request."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    hang: float = 0.0  # seconds to wait (until released) before answering


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    answer: Answer

    @property
    def ok(self) -> bool:
        return 200 <= self.answer.status < 300 and not self.answer.hang

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, t.Any]:
        return t.cast(dict[str, t.Any], json.loads(self.body))


class Receiver:
    """A webhook endpoint on a free loopback port that records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.default = Answer()
        self.delay = 0.0
        self._plan: list[Answer] = []
        self._lock = threading.Lock()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                receiver._handle(self)

            do_GET = do_PUT = do_POST  # noqa: N815

            def log_message(self, *args: t.Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: t.Any, client_address: t.Any) -> None:
                pass  # a client that gave up (timeout) is expected here

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.server = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": SERVER_POLL}, daemon=True
        )
        self.thread.start()

    def then(self, count: int, status: int = 500, hang: float = 0.0, **headers: str) -> Receiver:
        """Answer the next ``count`` requests so (after those already planned)."""
        answer = Answer(status, tuple((k.replace("_", "-"), v) for k, v in headers.items()), hang)
        with self._lock:
            self._plan += [answer] * count
        return self

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        with self._lock:
            answer = self._plan.pop(0) if self._plan else self.default
            self.requests.append(
                Received(
                    handler.path,
                    {k.lower(): v for k, v in handler.headers.items()},
                    body,
                    answer,
                )
            )
        if answer.hang:
            self.release.wait(answer.hang)
        elif self.delay:
            time.sleep(self.delay)
        try:
            handler.send_response(answer.status)
            for name, value in answer.headers:
                handler.send_header(name, value)
            handler.send_header("Content-Length", "2")
            handler.end_headers()
            handler.wfile.write(b"ok")
        except OSError:
            pass

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def delivered(self) -> list[Received]:
        """The requests answered with a 2xx in time: what the receiver processed."""
        return [r for r in self.snapshot() if r.ok]

    def wait_for(self, count: int, timeout: float = 15) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.delivered()) < count:
            assert time.monotonic() < deadline, (count, self.snapshot())
            time.sleep(0.05)
        return self.delivered()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receivers() -> t.Iterator[t.Callable[[], Receiver]]:
    made: list[Receiver] = []

    def make() -> Receiver:
        receiver = Receiver()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


def endpoint(id: str, receiver: Receiver, secret: str, events: list[str] | None = None
             ) -> dict[str, t.Any]:
    item: dict[str, t.Any] = {"id": id, "url": receiver.url, "secret": secret}
    if events is not None:
        item["events"] = events
    return item


# ---------------------------------------------------------------------------------------------
# Helpers


def outbox(site: Site | State) -> list[WebhookMessage]:
    state = site.state if isinstance(site, Site) else site
    with state.session_factory() as db:
        return list(db.scalars(select(WebhookMessage).order_by(WebhookMessage.id)))


def attempts_of(site: Site, message_id: str) -> list[WebhookAttempt]:
    with site.db() as db:
        return list(
            db.scalars(
                select(WebhookAttempt)
                .join(WebhookMessage, WebhookMessage.id == WebhookAttempt.message_id)
                .where(WebhookMessage.message_id == message_id)
                .order_by(WebhookAttempt.id)
            )
        )


def advance_to_next_attempt(state: State, clock: Clock) -> None:
    """Move the clock one second past the earliest pending retry."""
    pending = [m for m in outbox(state) if m.status == "pending"]
    assert pending, "nothing pending"
    due = min(m.next_attempt_at for m in pending)
    clock.advance(max(0.0, (due - clock()).total_seconds()) + 1)


def deliver_all(state: State, clock: Clock, rounds: int = 20) -> None:
    """Deliver, then retry after each backoff, until nothing is pending."""
    for _ in range(rounds):
        deliver_due(state)
        if all(m.status != "pending" for m in outbox(state)):
            return
        advance_to_next_attempt(state, clock)
    raise AssertionError(f"still pending after {rounds} rounds: {outbox(state)}")


def register(site: Site, username: str, password: str = PASSWORD) -> None:
    r = site.api.post(
        "/register",
        json={"username": username, "email": f"{username}@example.com", "password": password},
    )
    assert r.status_code == 201, r.text


def verifies(secret: str, req: Received, now: dt.datetime | None = None) -> bool:
    """Does ``req`` verify with the reference library, as a receiver would at ``now``?

    The library checks ``webhook-timestamp`` against its own clock (5 minutes' tolerance); a
    test that moved the agent's clock by hours gives the receiver the same time.
    """
    frozen = now

    class At(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
            return frozen if frozen is not None else dt.datetime.now(tz)

    with mock.patch.object(swh, "datetime", At):
        try:
            payload = Webhook(secret).verify(req.body, req.headers)
        except WebhookVerificationError:
            return False
    assert payload == json.loads(req.body)
    return True


def tampered(req: Received) -> Received:
    """``req`` with one byte of its body changed."""
    body = bytearray(req.body)
    index = body.index(b'"type"') + 2
    body[index] ^= 0x01
    return dataclasses.replace(req, body=bytes(body))


# ---------------------------------------------------------------------------------------------
# W-01, W-02, W-03, W-08: every event arrives once, signed per endpoint, retried with a stable id


def test_every_event_arrives_exactly_once_signed_with_its_endpoints_secret(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    ops, sec = receivers(), receivers()
    # The usual padded form, and the unpadded one some generators print.
    ops_secret, sec_secret = new_secret(), new_secret().rstrip("=")
    site = make_site(
        HEADLESSKEY_WEBHOOKS=[
            endpoint("ops", ops, ops_secret),
            endpoint("sec", sec, sec_secret, ["login.failed", "password.changed"]),
        ]
    )
    ops.then(2, status=500)  # the first two requests fail, then the receiver recovers
    sec.then(1, status=503)

    register(site, "bob")
    pair = site.api.login("bob")
    failed = site.api.post("/token", json={"username": "bob", "password": "not the password"})
    assert failed.status_code in (400, 401, 403), failed.text
    refreshed = site.api.post("/token/refresh", json={"refresh_token": pair["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
    fresh = refreshed.json()
    changed = site.api.post(
        "/change-password",
        token=fresh["token"],
        json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
    )
    assert changed.status_code == 200, changed.text
    revoked = site.api.post("/token/revoke", json={"refresh_token": fresh["refresh_token"]})
    assert revoked.status_code == 200, revoked.text

    expected = [
        "user.registered", "login.succeeded", "login.failed", "token.refreshed",
        "password.changed", "token.revoked",
    ]
    with site.db() as db:
        audited = [r[0] for r in db.execute(select(WebhookMessage.event).where(
            WebhookMessage.endpoint == "ops").order_by(WebhookMessage.id))]
    assert audited == expected
    # Nothing is sent on the request path.
    assert ops.snapshot() == [] and sec.snapshot() == []

    assert deliver_due(site.state) == 8  # 6 for ops, 2 for sec
    assert len(ops.snapshot()) == 6 and len(sec.snapshot()) == 2
    assert deliver_due(site.state) == 0  # the failed ones wait for their backoff
    site.clock.advance(SCHEDULE[0] * 1.2 + 1)
    assert deliver_due(site.state) == 3
    assert deliver_due(site.state) == 0
    assert {m.status for m in outbox(site)} == {"delivered"}

    for receiver, secret, other, events in (
        (ops, ops_secret, sec_secret, expected),
        (sec, sec_secret, ops_secret, ["login.failed", "password.changed"]),
    ):
        seen = receiver.snapshot()
        delivered = receiver.delivered()
        # Exactly once each, in the order of the events, for every event the endpoint wants.
        assert sorted(r.payload["type"] for r in delivered) == sorted(events)
        assert len({r.id for r in delivered}) == len(delivered) == len(events)
        with site.db() as db:
            ids = set(db.scalars(select(WebhookMessage.message_id).where(
                WebhookMessage.endpoint == ("ops" if receiver is ops else "sec"))))
        assert {r.id for r in delivered} == ids
        for req in seen:
            # W-01: the headers of the spec.
            assert req.path == "/hooks"
            assert req.headers["content-type"] == "application/json"
            assert re.fullmatch(r"msg_[0-9a-f]{32}", req.headers["webhook-id"])
            assert req.headers["webhook-timestamp"].isdigit()
            assert re.fullmatch(r"(v1,[A-Za-z0-9+/=]+ ?)+", req.headers["webhook-signature"])
            assert "HeadlessKey" in req.headers["user-agent"]
            # W-02: verifies with this endpoint's secret only, and not once a byte changed.
            assert verifies(secret, req)
            assert not verifies(other, req)
            assert not verifies(secret, tampered(req))
            assert verify(secret, req.body, req.headers) == req.payload
            with pytest.raises(InvalidSignature):
                verify(secret, tampered(req).body, req.headers)
            with pytest.raises(InvalidSignature):
                verify(other, req.body, req.headers)
            # The timestamp is the agent's clock at the attempt (within the test's slack).
            sent = int(req.headers["webhook-timestamp"])
            assert abs(sent - site.clock().timestamp()) < SCHEDULE[0] * 1.2 + 30

        # W-03: a retried message keeps its id and body, with a new timestamp and signature.
        by_id: dict[str, list[Received]] = {}
        for req in seen:
            by_id.setdefault(req.id, []).append(req)
        retried = [reqs for reqs in by_id.values() if len(reqs) > 1]
        assert len(retried) == (2 if receiver is ops else 1)
        for first, second in retried:
            assert not first.ok and second.ok
            assert first.body == second.body
            first_at, second_at = (int(r.headers["webhook-timestamp"]) for r in (first, second))
            assert second_at > first_at
            assert second.headers["webhook-signature"] != first.headers["webhook-signature"]
            # Every attempt is recorded with its answer.
            attempts = attempts_of(site, first.id)
            assert [a.status_code for a in attempts] == [first.answer.status, 200]
            assert attempts[0].error == f"HTTP {first.answer.status}"
            assert all(a.duration_ms >= 0 for a in attempts)
        for reqs in by_id.values():
            assert len(attempts_of(site, reqs[0].id)) == len(reqs)

    # The payload is the event as documented: {type, timestamp, data}.
    login_ok = next(r.payload for r in ops.delivered() if r.payload["type"] == "login.succeeded")
    assert set(login_ok) == {"type", "timestamp", "data"}
    assert login_ok["timestamp"].endswith("Z")
    assert login_ok["data"]["login"] == "bob" and login_ok["data"]["outcome"] == "success"
    assert login_ok["data"]["session_id"] == pair["sid"]


def test_a_rotating_endpoint_is_signed_by_both_secrets_until_the_previous_expires(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    """W-08: with ``previous_secret`` each delivery carries two signatures, so a receiver holding
    either secret verifies it; past ``previous_secret_expires`` only the new secret signs."""
    ops = receivers()
    new, old, stranger = new_secret(), new_secret(), new_secret()
    ends = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=1)
    site = make_site(HEADLESSKEY_WEBHOOKS=[dict(
        endpoint("ops", ops, new), previous_secret=old,
        previous_secret_expires=ends.isoformat().replace("+00:00", "Z"))])
    register(site, "rita")
    assert deliver_due(site.state) == 1
    (during,) = ops.wait_for(1)
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    at = site.clock()
    assert verifies(new, during, at) and verifies(old, during, at)
    assert not verifies(stranger, during, at)
    assert not verifies(old, tampered(during), at)

    site.clock.advance((ends - site.clock()).total_seconds())
    register(site, "rory")
    assert deliver_due(site.state) == 1
    after = ops.wait_for(2)[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert verifies(new, after, site.clock())
    assert not verifies(old, after, site.clock())


FIRST, SECOND, THIRD = new_secret(), new_secret(), new_secret()


@pytest.mark.parametrize(
    ("rotation", "message"),
    [
        ({"previous_secret": "whsec_c2hvcnQ="}, "previous_secret: expected whsec_"),
        ({"previous_secret_expires": "2026-12-01T12:00:00Z"}, "without a previous_secret"),
        ({"previous_secret": FIRST}, "previous_secret: the same as the secret"),
        ({"previous_secret": THIRD, "previous_secret_expires": "2026-12-01T12:00:00"},
         "previous_secret_expires: expected an ISO 8601 time with its offset"),
        ({"previous_secret": SECOND}, "two endpoints share a secret"),
        ({"previous_secret": THIRD, "previous_secret_expires": "0001-01-01T00:00:00+14:00"},
         "previous_secret_expires: expected an ISO 8601 time with its offset"),
    ],
)
def test_bad_rotation_settings_stop_start_up(
    make_site: t.Callable[..., Site], rotation: dict[str, str], message: str
) -> None:
    """W-08: a previous secret must be a secret of its own, an expiry needs one and a UTC
    offset, and no two endpoints may share a secret."""
    hook = {"id": "a", "url": "https://a.example/h", "secret": FIRST, **rotation}
    other = {"id": "b", "url": "https://b.example/h", "secret": SECOND}
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_site(HEADLESSKEY_WEBHOOKS=[hook, other])


# ---------------------------------------------------------------------------------------------
# W-07: no secret in any payload


def test_payloads_never_carry_passwords_tokens_codes_or_secrets(
    smtp: Mailbox, make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    ops = receivers()
    ops_secret = new_secret()
    site = make_site(
        mailbox=smtp,
        HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, ops_secret)],
        HEADLESSKEY_RESET_OTP_LENGTH=10,  # long enough never to match a timestamp by chance
    )
    secrets_seen: list[str] = [PASSWORD, NEW_PASSWORD, THIRD_PASSWORD, ops_secret,
                               ops_secret.removeprefix("whsec_"),
                               site.app.config["HEADLESSKEY_SECRET_KEY"]]

    register(site, "carol")
    pair = site.api.login("carol")
    secrets_seen += [pair["token"], pair["refresh_token"]]
    refreshed = site.api.post("/token/refresh", json={"refresh_token": pair["refresh_token"]})
    assert refreshed.status_code == 200
    secrets_seen += [refreshed.json()["token"], refreshed.json()["refresh_token"]]
    assert site.api.post("/token", json={"username": "carol", "password": NEW_PASSWORD}
                         ).status_code != 200

    # A reset by one-time code, then a change of password, then a reset link requested.
    assert site.api.post("/forgot-password", json={"login": "carol", "delivery": "otp"}
                         ).status_code == 200
    (mail,) = smtp.wait_for("carol@example.com")
    text = mail.get_payload(decode=True).decode()  # type: ignore[union-attr]
    (code,) = re.findall(r"(?<!\d)\d{10}(?!\d)", text)
    secrets_seen.append(code)
    reset = site.api.post("/reset-password",
                          json={"login": "carol", "otp": code, "password": NEW_PASSWORD})
    assert reset.status_code == 200, reset.text
    again = site.api.login("carol", NEW_PASSWORD)
    secrets_seen += [again["token"], again["refresh_token"]]
    changed = site.api.post("/change-password", token=again["token"],
                            json={"current_password": NEW_PASSWORD, "new_password": THIRD_PASSWORD})
    assert changed.status_code == 200, changed.text
    assert site.api.post("/forgot-password", json={"login": "carol", "delivery": "link"}
                         ).status_code == 200
    mails = smtp.wait_for("carol@example.com", count=4)  # code, 2 notices, link
    texts = [m.get_payload(decode=True).decode() for m in mails]  # type: ignore[union-attr]
    (link_token,) = re.findall(r"token=([A-Za-z0-9_\-%]+)", "".join(texts))
    secrets_seen.append(link_token)
    assert site.api.post("/token/revoke", token=again["token"]).status_code == 200
    with site.db() as db:
        secrets_seen += list(db.scalars(select(User.password_hash)))

    deliver_all(site.state, site.clock)
    bodies = [r.body.decode() for r in ops.delivered()]
    types = {json.loads(b)["type"] for b in bodies}
    assert {"user.registered", "login.succeeded", "login.failed", "token.refreshed",
            "password.reset_requested", "password.reset", "password.changed",
            "token.revoked"} <= types
    for body in bodies:
        for secret in secrets_seen:
            assert secret not in body, (secret, body)
        assert "$argon2" not in body

    forbidden = {"password", "token", "refresh_token", "access_token", "otp", "code", "secret"}

    def keys(value: t.Any) -> t.Iterator[str]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield key
                yield from keys(inner)
        elif isinstance(value, list):
            for inner in value:
                yield from keys(inner)

    for body in bodies:
        assert not forbidden & set(keys(json.loads(body))), body


# ---------------------------------------------------------------------------------------------
# W-04: retry schedule, Retry-After, dead letters


def test_retries_span_more_than_a_day_before_the_message_is_dead(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    ops = receivers()
    ops.default = Answer(500)
    secret = new_secret()
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, secret)])
    register(site, "dave")
    (message,) = outbox(site)

    attempted_at: list[dt.datetime] = []
    while True:
        now = site.clock()
        assert deliver_due(site.state) == 1
        attempted_at.append(now)
        (message,) = outbox(site)
        if message.status == "dead":
            break
        assert message.status == "pending"
        assert message.attempts == len(attempted_at)
        assert message.next_attempt_at > site.clock()
        # Not one request before the backoff is over.
        assert deliver_due(site.state) == 0
        site.clock.advance((message.next_attempt_at - site.clock()).total_seconds() - 0.5)
        assert deliver_due(site.state) == 0
        site.clock.advance(1)

    assert len(attempted_at) == len(SCHEDULE) + 1
    assert message.attempts == len(SCHEDULE) + 1
    assert message.last_status == 500 and message.last_error == "HTTP 500"
    span = attempted_at[-1] - attempted_at[0]
    assert span >= dt.timedelta(hours=24), span
    assert attempted_at[-2] - attempted_at[0] >= dt.timedelta(hours=24) * 0.5
    gaps = [(b - a).total_seconds() for a, b in zip(attempted_at, attempted_at[1:], strict=False)]
    for gap, planned in zip(gaps, SCHEDULE, strict=True):
        assert planned * 0.8 - 1 <= gap <= planned * 1.2 + 1, (gap, planned)
    assert gaps[-1] > 10 * 3600 and gaps[0] < 10  # exponential: seconds first, a day last

    # The receiver saw every attempt, each recorded; a dead message is never sent again.
    assert len(ops.snapshot()) == len(attempted_at)
    for req, at in zip(ops.snapshot(), attempted_at, strict=True):
        assert 0 <= int(req.headers["webhook-timestamp"]) - int(at.timestamp()) <= 1
    assert all(verifies(secret, r, at) for r, at in zip(ops.snapshot(), attempted_at, strict=True))
    assert len(attempts_of(site, message.message_id)) == len(attempted_at)
    site.clock.advance(7 * 86400)
    assert deliver_due(site.state) == 0
    assert len(ops.snapshot()) == len(attempted_at)


def test_backoff_has_jitter(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    ops = receivers()
    ops.default = Answer(500)
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, new_secret())])
    for i in range(6):
        register(site, f"user{i}")
    now = site.clock()
    assert deliver_due(site.state) == 6
    delays = [(m.next_attempt_at - now).total_seconds() for m in outbox(site)]
    assert all(SCHEDULE[0] * 0.8 - 1 <= d <= SCHEDULE[0] * 1.2 + 1 for d in delays), delays
    assert len({round(d, 3) for d in delays}) > 1, delays


@pytest.mark.parametrize(
    ("status", "retry_after", "wait"),
    [(429, "120", 120), (503, "600", 600), (429, "http-date", 300), (503, "9999999", 86400)],
)
def test_retry_after_is_honoured_on_429_and_503(
    make_site: t.Callable[..., Site],
    receivers: t.Callable[[], Receiver],
    status: int,
    retry_after: str,
    wait: int,
) -> None:
    ops = receivers()
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, new_secret())])
    if retry_after == "http-date":
        retry_after = email.utils.format_datetime(
            site.clock() + dt.timedelta(seconds=wait), usegmt=True
        )
    ops.then(1, status=status, Retry_After=retry_after)
    register(site, "erin")
    now = site.clock()
    assert deliver_due(site.state) == 1
    (message,) = outbox(site)
    assert message.status == "pending" and message.last_status == status
    delay = (message.next_attempt_at - now).total_seconds()
    assert wait - 2 <= delay <= wait + 3, delay  # bounded to 24 h, and never before

    site.clock.advance(wait - 5)
    assert deliver_due(site.state) == 0
    assert len(ops.snapshot()) == 1
    site.clock.advance(8)
    assert deliver_due(site.state) == 1
    assert [r.ok for r in ops.snapshot()] == [False, True]
    assert outbox(site)[0].status == "delivered"


def test_410_gone_is_dead_at_once_and_can_be_redelivered(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    ops = receivers()
    ops.then(1, status=410)
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, new_secret())])
    register(site, "frank")
    assert deliver_due(site.state) == 1
    (message,) = outbox(site)
    assert (message.status, message.attempts, message.last_status) == ("dead", 1, 410)
    site.clock.advance(3 * 86400)
    assert deliver_due(site.state) == 0
    assert len(ops.snapshot()) == 1

    # An admin puts it back: it goes out again under the same webhook-id.
    with site.db() as db:
        assert redeliver(db, message.message_id, now=site.clock())
        assert not redeliver(db, message.message_id, now=site.clock())  # already pending
        assert not redeliver(db, "msg_unknown", now=site.clock())
        db.commit()
    assert deliver_due(site.state) == 1
    first, second = ops.snapshot()
    assert first.id == second.id == message.message_id and second.ok
    (message,) = outbox(site)
    assert message.status == "delivered" and message.delivered_at is not None

    # A delivered message can be sent again too.
    with site.db() as db:
        assert redeliver(db, message.message_id, now=site.clock())
        db.commit()
    assert deliver_due(site.state) == 1
    assert [r.id for r in ops.delivered()] == [message.message_id] * 2


def audit_rows(site: Site, event: str) -> list[tuple[str, dict[str, t.Any]]]:
    from agent.models import AuditEvent

    with site.db() as db:
        return [(r.outcome, r.details) for r in db.scalars(
            select(AuditEvent).where(AuditEvent.event == event).order_by(AuditEvent.id))]


def test_410_disables_the_endpoint_and_tells_the_administrators(
    smtp: Mailbox, make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    """W-05: after a 410 the endpoint's pending and later messages die unsent; the activity
    log says why, the other endpoints get ``webhook.disabled``, every administrator (and no one
    else) a mail. Redelivering one of its messages enables it again."""
    ops, sec = receivers(), receivers()
    site = make_site(mailbox=smtp, HEADLESSKEY_WEBHOOKS=[
        endpoint("ops", ops, new_secret()), endpoint("sec", sec, new_secret())])
    site.create_user("root", email="root@example.com", roles=["administrator"])
    site.create_user("plain", email="plain@example.com")
    ops.then(1, status=410)
    register(site, "gina")
    register(site, "gus")  # pending for ops when the 410 comes
    deliver_due(site.state)
    assert [r.answer.status for r in ops.snapshot()] == [410]
    ops_rows = [m for m in outbox(site) if m.endpoint == "ops"]
    assert [(m.status, m.attempts) for m in ops_rows] == [("dead", 1), ("dead", 0)]
    assert ops_rows[1].last_error == "endpoint disabled (410 Gone)"
    assert audit_rows(site, "webhook.disabled") == [
        ("info", {"endpoint": "ops", "reason": "410 Gone"})]
    (mail,) = smtp.wait_for("root@example.com")
    assert "ops" in mail["Subject"] and "410 Gone" in mail.get_payload(decode=True).decode()
    assert smtp.to("plain@example.com") == []

    register(site, "gwen")  # a later message: never sent to ops
    deliver_due(site.state)
    assert len(ops.snapshot()) == 1
    assert "webhook.disabled" in [r.payload["type"] for r in sec.delivered()]
    assert all(m.status == "dead" for m in outbox(site) if m.endpoint == "ops")

    with site.db() as db:
        assert redeliver(db, ops_rows[0].message_id, now=site.clock())
        db.commit()
    deliver_due(site.state)
    assert [r.answer.status for r in ops.snapshot()] == [410, 200]
    register(site, "gil")
    deliver_due(site.state)
    assert len(ops.delivered()) == 2


def test_a_dead_streak_disables_the_endpoint_until_its_url_changes(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    """W-05: a message dead after the whole schedule disables its endpoint; the same endpoint
    given a new URL is enabled."""
    ops, fixed = receivers(), receivers()
    ops.default = Answer(500)
    secret = new_secret()
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, secret)])
    register(site, "dora")
    deliver_all(site.state, site.clock, rounds=len(SCHEDULE) + 2)
    assert len(ops.snapshot()) == len(SCHEDULE) + 1
    ((_, details),) = audit_rows(site, "webhook.disabled")
    assert details["endpoint"] == "ops"
    assert details["reason"].startswith(f"{len(SCHEDULE) + 1} failed attempts")
    register(site, "dick")
    deliver_due(site.state)
    assert len(ops.snapshot()) == len(SCHEDULE) + 1
    assert [m.last_error for m in outbox(site)][-1].startswith("endpoint disabled")

    # The same endpoint id at a new URL (a restart with new settings): enabled.
    moved = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", fixed, secret)],
                      HEADLESSKEY_DATABASE_URL=site.app.config["HEADLESSKEY_DATABASE_URL"],
                      HEADLESSKEY_SECRET_KEY=site.app.config["HEADLESSKEY_SECRET_KEY"])
    register(moved, "dina")
    deliver_due(moved.state)
    assert [r.payload["type"] for r in fixed.delivered()] == ["user.registered"]


# ---------------------------------------------------------------------------------------------
# W-05: only 2xx delivers; redirects are failures and are not followed


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_failures_and_are_not_followed(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver], status: int
) -> None:
    ops, target = receivers(), receivers()
    ops.then(1, status=status, Location=target.url)
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, new_secret())])
    register(site, "gina")
    assert deliver_due(site.state) == 1
    (message,) = outbox(site)
    assert message.status == "pending" and message.attempts == 1
    assert message.last_status == status and message.last_error == f"HTTP {status}"
    assert target.snapshot() == []

    advance_to_next_attempt(site.state, site.clock)
    assert deliver_due(site.state) == 1
    assert outbox(site)[0].status == "delivered"
    assert [r.ok for r in ops.snapshot()] == [False, True]
    assert target.snapshot() == []


@pytest.mark.parametrize("status", [400, 404, 500, 502])
def test_only_2xx_is_success(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver], status: int
) -> None:
    ops = receivers()
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, new_secret())])
    register(site, "hank")
    ops.then(1, status=status)
    deliver_due(site.state)
    (message,) = outbox(site)
    assert message.status == "pending" and message.last_status == status
    ops.then(1, status=204)
    advance_to_next_attempt(site.state, site.clock)
    deliver_due(site.state)
    assert outbox(site)[0].status == "delivered"
    assert outbox(site)[0].last_status == 204


def test_an_unreachable_endpoint_is_retried(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    ops = receivers()
    url = ops.url
    closed = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens there
    site = make_site(HEADLESSKEY_WEBHOOKS=[{"id": "ops", "url": closed, "secret": new_secret()}])
    register(site, "ivy")
    assert deliver_due(site.state) == 1
    (message,) = outbox(site)
    assert message.status == "pending" and message.last_status is None
    assert "refused" in message.last_error.lower()
    (attempt,) = attempts_of(site, message.message_id)
    assert attempt.status_code is None and "refused" in attempt.error.lower()

    # The endpoint's URL is fixed in the settings; a restarted agent reads the new one.
    settings = site.state.base_settings
    site.state.base_settings = dataclasses.replace(
        settings, webhooks=(dataclasses.replace(settings.webhooks[0], url=url),)
    )
    advance_to_next_attempt(site.state, site.clock)
    assert deliver_due(site.state) == 1
    assert [r.id for r in ops.delivered()] == [message.message_id]


def test_a_message_whose_endpoint_is_gone_is_dead(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    ops = receivers()
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, new_secret())])
    register(site, "jack")
    site.state.base_settings = dataclasses.replace(site.state.base_settings, webhooks=())
    assert deliver_due(site.state) == 0
    (message,) = outbox(site)
    assert message.status == "dead" and "no longer configured" in message.last_error
    assert ops.snapshot() == []


# ---------------------------------------------------------------------------------------------
# W-09: delivery is not on the request path; a hanging endpoint stalls nothing else


def test_a_hanging_receiver_slows_neither_logins_nor_other_endpoints(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    slow, fast = receivers(), receivers()
    slow.default = Answer(200, hang=30)
    slow_secret = new_secret()
    site = make_site(
        HEADLESSKEY_WEBHOOKS=[
            endpoint("slow", slow, slow_secret), endpoint("fast", fast, new_secret())
        ],
        HEADLESSKEY_WEBHOOK_TIMEOUT=3,
    )
    site.create_user("alice")

    # No delivery running at all: every login is answered at once, nothing is sent.
    for _ in range(3):
        started = time.monotonic()
        site.api.login("alice")
        assert time.monotonic() - started < 1.0
    assert slow.snapshot() == [] and fast.snapshot() == []

    # A delivery run stuck on the hanging endpoint: logins are still quick.
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(deliver_due(site.state)))
    started_run = time.monotonic()
    worker.start()
    deadline = time.monotonic() + 5
    while not slow.snapshot():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for _ in range(3):
        started = time.monotonic()
        site.api.login("alice")
        assert time.monotonic() - started < 1.0
    worker.join(30)
    run_took = time.monotonic() - started_run
    # One timeout for the hanging endpoint, not one per message; the other got all three.
    assert 2.5 <= run_took < 6, run_took
    assert len(slow.snapshot()) == 1
    assert result == [1 + 3]
    assert len(fast.delivered()) == 3
    messages = [m for m in outbox(site) if m.endpoint == "slow"]
    assert [m.attempts for m in messages] == [1, 0, 0, 0, 0, 0]  # 3 logins during the run
    (attempt,) = attempts_of(site, messages[0].message_id)
    assert attempt.status_code is None and attempt.error == "timeout"
    assert 2500 <= attempt.duration_ms < 6000

    # The endpoint recovers: everything arrives (the first one twice: it was received but not
    # acknowledged in time; receivers deduplicate on webhook-id).
    slow.default = Answer(200)
    slow.release.set()
    deliver_all(site.state, site.clock)
    got = [r for r in slow.snapshot() if r.ok]
    assert sorted(r.id for r in got) == sorted(m.message_id for m in messages)
    assert all(verifies(slow_secret, r, site.clock()) for r in got)


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_timeout(
    make_site: t.Callable[..., Site], drip: str
) -> None:
    """The timeout bounds the whole attempt, not each read: a receiver sending a byte every
    0.2 s never lets one read time out, yet the attempt ends at WEBHOOK_TIMEOUT."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\n"
            if drip == "body":
                head += b"Content-Length: 1000\r\n\r\n"
            else:
                head += b"X-Slow: "
            conn.sendall(head)
            with contextlib.suppress(OSError):
                for _ in range(40):  # 8 s of dripping at most
                    if stop.wait(0.2):
                        break
                    conn.sendall(b"a")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hooks"
    site = make_site(HEADLESSKEY_WEBHOOKS=[{"id": "ops", "url": url, "secret": new_secret()}],
                     HEADLESSKEY_WEBHOOK_TIMEOUT=2)
    try:
        register(site, "drew")
        started = time.monotonic()
        assert deliver_due(site.state) == 1
        took = time.monotonic() - started
    finally:
        stop.set()
        server.join(5)
        listener.close()
    assert took < 3.5, took
    (message,) = outbox(site)
    assert message.status == "pending" and message.attempts == 1
    (attempt,) = attempts_of(site, message.message_id)
    assert attempt.status_code is None and attempt.error == "timeout"
    assert 1900 <= attempt.duration_ms < 3500


def test_an_answer_holding_control_characters_is_a_failed_attempt(
    make_site: t.Callable[..., Site]
) -> None:
    """What a receiver sends back reaches the attempt's error text: with a NUL in it (here in a
    status line that is no HTTP), recording the attempt failed on PostgreSQL, so the message was
    never counted as attempted, nor retried on the schedule, nor disabled: the job raised on it
    at every run."""
    with answering(b"HTTP/1.1 2\x0000 \x01OK\r\nContent-Length: 0\r\n\r\n") as base:
        site = make_site(HEADLESSKEY_WEBHOOKS=[{"id": "ops", "url": base + "/hooks",
                                                "secret": new_secret()}])
        register(site, "nell")
        assert deliver_due(site.state) == 1
    (message,) = outbox(site)
    assert message.status == "pending" and message.attempts == 1
    assert message.last_status is None and message.last_error.startswith("BadStatusLine")
    assert "\x00" not in message.last_error and "\x01" not in message.last_error
    (attempt,) = attempts_of(site, message.message_id)
    assert attempt.error == message.last_error


# ---------------------------------------------------------------------------------------------
# Durability and concurrency


def second_app(site: Site, tmp_path: Path, **overrides: t.Any) -> tuple[Flask, Clock]:
    """A new agent (a restart, or another instance) on the same database and secret."""
    app = Flask("restarted", instance_path=str(tmp_path / "restarted"))
    app.config.update({k: v for k, v in site.app.config.items() if k.startswith("HEADLESSKEY_")})
    app.config.update(overrides)
    clock = Clock()
    clock.offset = site.clock.offset
    HeadlessKey(app, clock=clock)
    return app, clock


def test_an_agent_restarted_in_between_loses_none(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver], tmp_path: Path
) -> None:
    ops = receivers()
    ops.default = Answer(503)
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, new_secret())])
    site.create_user("alice")
    register(site, "kim")
    site.api.login("alice")
    assert deliver_due(site.state) == 2  # both refused
    # More events after the last attempt: never tried before the "restart".
    site.api.login("kim")
    assert site.api.post("/token", json={"username": "kim", "password": "nope nope"}
                         ).status_code != 200
    expected = [m.message_id for m in outbox(site)]
    assert len(expected) == 4
    site.state.engine.dispose()

    app, clock = second_app(site, tmp_path)
    state = app.extensions["headlesskey"]
    try:
        ops.default = Answer(200)
        deliver_all(state, clock)
    finally:
        state.engine.dispose()
    delivered = ops.delivered()
    assert sorted(r.id for r in delivered) == sorted(expected)  # all of them, once each
    assert [r.payload["type"] for r in sorted(delivered, key=lambda r: expected.index(r.id))] == [
        "user.registered", "login.succeeded", "login.succeeded", "login.failed",
    ]


def test_concurrent_workers_never_send_a_message_twice(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver], tmp_path: Path
) -> None:
    ops = receivers()
    ops.delay = 0.02  # long enough for the workers to overlap
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, new_secret())])
    for i in range(24):
        register(site, f"user{i}")
    other_app, _clock = second_app(site, tmp_path)  # a worker of another instance
    states = [site.state, site.state, other_app.extensions["headlesskey"]]
    barrier = threading.Barrier(len(states))
    counts: list[int] = []
    errors: list[BaseException] = []

    def work(state: State) -> None:
        try:
            barrier.wait()
            counts.append(deliver_due(state))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in states]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        other_app.extensions["headlesskey"].engine.dispose()
    assert errors == []
    assert sum(counts) == 24
    assert max(counts) < 24, counts  # the work really was shared
    ids = [r.id for r in ops.snapshot()]
    assert len(ids) == len(set(ids)) == 24
    assert {m.status for m in outbox(site)} == {"delivered"}
    with site.db() as db:
        assert len(list(db.scalars(select(WebhookAttempt)))) == 24


def test_a_claim_of_a_crashed_worker_lapses(
    make_site: t.Callable[..., Site], receivers: t.Callable[[], Receiver]
) -> None:
    ops = receivers()
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", ops, new_secret())],
                     HEADLESSKEY_WEBHOOK_TIMEOUT=10)
    register(site, "lena")
    # A worker claimed it and died before recording anything.
    with site.db() as db:
        message = db.scalars(select(WebhookMessage)).one()
        message.claimed_until = site.clock() + dt.timedelta(seconds=20)
        db.commit()
    assert deliver_due(site.state) == 0
    site.clock.advance(15)
    assert deliver_due(site.state) == 0
    site.clock.advance(6)
    assert deliver_due(site.state) == 1
    assert [r.id for r in ops.delivered()] == [message.message_id]
    assert outbox(site)[0].claimed_until is None


# ---------------------------------------------------------------------------------------------
# The receiver-side helper


def test_verify_helper_accepts_good_deliveries_and_refuses_the_rest() -> None:
    secret = new_secret()
    body = json.dumps({"type": "login.failed", "timestamp": "2026-01-01T00:00:00Z", "data": {}})
    now = dt.datetime.now(dt.UTC)

    def headers(at: dt.datetime, signed: str = body, key: str = secret) -> dict[str, str]:
        return {
            "Webhook-Id": "msg_1",
            "Webhook-Timestamp": str(int(at.timestamp())),
            "Webhook-Signature": Webhook(key).sign("msg_1", at, signed),
        }

    assert verify(secret, body.encode(), headers(now)) == json.loads(body)
    assert verify(secret, body, headers(now - dt.timedelta(minutes=4))) == json.loads(body)
    bad = [
        (body.replace("failed", "failex"), headers(now)),
        (body, headers(now, key=new_secret())),
        (body, headers(now - dt.timedelta(minutes=6))),
        (body, headers(now + dt.timedelta(minutes=6))),
        (body, {k: v for k, v in headers(now).items() if k != "Webhook-Signature"}),
        (body, {**headers(now), "Webhook-Signature": "garbage"}),
        (body, {**headers(now), "Webhook-Timestamp": "yesterday"}),
        ("[1, 2]", headers(now, signed="[1, 2]")),
    ]
    for data, hdrs in bad:
        with pytest.raises(InvalidSignature):
            verify(secret, data.encode(), hdrs)


# ---------------------------------------------------------------------------------------------
# The jobs process, as an operator runs it


AGENT = shutil.which("headlesskey-agent", path=str(Path(sys.executable).parent))


def webhook_instance(tmp_path: Path, receiver: Receiver, secret: str) -> Path:
    assert AGENT, "headlesskey-agent is not installed next to the interpreter"
    instance = tmp_path / "site"
    done = subprocess.run([AGENT, "init", "--instance", str(instance), "--algorithm", "HS256"],
                          capture_output=True, text=True, env=clean_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    with (instance / "site.toml").open("a") as fh:
        fh.write(f'\n[[webhooks]]\nid = "ops"\nurl = "{receiver.url}"\nsecret = "{secret}"\n'
                 'events = ["user.registered", "login.failed"]\n')
    return instance


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    assert AGENT
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([AGENT, *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=clean_env())


def wait_http(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if requests.get(base + "/", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(log.read_text())


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError("did not stop on SIGTERM") from None
    return t.cast(int, proc.returncode)


def jobs_processes(instance: Path) -> list[int]:
    """PIDs of running `jobs` processes of ``instance``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"jobs" in argv and str(instance.resolve()).encode() in argv:
            found.append(int(entry.name))
    return found


def test_the_jobs_process_delivers_what_serve_records(
    tmp_path: Path, receivers: t.Callable[[], Receiver]
) -> None:
    ops = receivers()
    secret = new_secret()
    instance = webhook_instance(tmp_path, ops, secret)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = start(["serve", "--instance", str(instance), "--port", str(port), "--workers", "2",
                   "--no-jobs"], tmp_path / "serve.log")
    jobs = None
    try:
        wait_http(base, serve, tmp_path / "serve.log")
        assert jobs_processes(instance) == []  # --no-jobs
        jobs = start(["jobs", "--instance", str(instance)], tmp_path / "jobs.log")
        r = requests.post(base + "/wp-json/headlesskey/v1/register", timeout=10, json={
            "username": "mia", "email": "mia@example.com", "password": PASSWORD})
        assert r.status_code == 201, r.text
        r = requests.post(base + "/wp-json/headlesskey/v1/token", timeout=10,
                          json={"username": "mia", "password": "wrong password"})
        assert r.status_code != 200
        got = ops.wait_for(2, timeout=15)
        assert [g.payload["type"] for g in got] == ["user.registered", "login.failed"]
        assert all(verifies(secret, g) for g in got)
        assert stop(jobs) == 0
        log = (tmp_path / "jobs.log").read_text()
        assert "Traceback" not in log, log
        assert "Jobs stopped." in log
        assert secret not in log and secret.removeprefix("whsec_") not in log
        assert got[0].id in log  # the message id is logged, with the endpoint and the status
    finally:
        if jobs is not None:
            stop(jobs)
        stop(serve)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_serve_runs_the_jobs_beside_gunicorn_and_stops_them(
    tmp_path: Path, receivers: t.Callable[[], Receiver]
) -> None:
    ops = receivers()
    secret = new_secret()
    instance = webhook_instance(tmp_path, ops, secret)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = start(["serve", "--instance", str(instance), "--port", str(port), "--workers", "2"],
                  tmp_path / "serve.log")
    try:
        wait_http(base, serve, tmp_path / "serve.log")
        assert len(jobs_processes(instance)) == 1
        r = requests.post(base + "/wp-json/headlesskey/v1/register", timeout=10, json={
            "username": "noa", "email": "noa@example.com", "password": PASSWORD})
        assert r.status_code == 201, r.text
        (got,) = ops.wait_for(1, timeout=15)
        assert got.payload["type"] == "user.registered" and verifies(secret, got)
    finally:
        assert stop(serve) == 0
    deadline = time.monotonic() + 10
    while jobs_processes(instance):
        assert time.monotonic() < deadline, "the jobs process outlived serve"
        time.sleep(0.1)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log
    assert "Jobs stopped." in log


def test_administrators_with_any_role_name_are_told(make_site: t.Callable[..., Site]) -> None:
    """The administrators mailed when an endpoint is disabled hold a role of the ``admin``
    rule, whatever its name: one with non-ASCII letters or a quote (stored escaped in the JSON
    list) was never found; LIKE's ``_`` matches no other role."""
    from agent.webhooks import _administrators

    roles = ["Gérant", "管理者", 'ops "on call"', "a_b", "50%"]
    site = make_site(HEADLESSKEY_ACCESS={"admin": roles})
    for i, role in enumerate(roles):
        site.create_user(f"admin{i}", email=f"admin{i}@example.com", roles=["x", role])
    site.create_user("near", email="near@example.com", roles=["aXb", "50", "Gerant"])
    site.create_user("plain", email="plain@example.com")
    with site.db() as db:
        found = sorted(_administrators(db, site.state))
    assert found == [f"admin{i}@example.com" for i in range(len(roles))]
