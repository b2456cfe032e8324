"""The background jobs: pruning old rows, and the scheduler that runs the jobs.

Job bodies are called directly with a moved clock; the scheduler is started for real once, with
a short interval, against a served agent and a loopback receiver.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlalchemy import select

from agent.jobs import DELIVER_JOB_ID
from agent.jobs import PRUNE_JOB_ID
from agent.jobs import once_per_period
from agent.jobs import prune
from agent.jobs import run_scheduler
from agent.models import AuditEvent
from agent.models import JobRun
from agent.models import PasswordReset
from agent.models import RefreshToken
from agent.models import Session
from agent.models import Throttle
from agent.models import WebhookAttempt
from agent.rotation import JOB_ID as ROTATE_JOB_ID
from agent.webhooks import deliver_due
from tests.agent.test_webhooks import Receiver
from tests.agent.test_webhooks import endpoint
from tests.agent.test_webhooks import new_secret
from tests.agent.test_webhooks import outbox
from tests.agent.test_webhooks import register
from tests.agent.test_webhooks import verifies
from tests.conftest import Site

DAY = 86400


@pytest.fixture
def receiver() -> t.Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def count(site: Site, model: t.Any, *where: t.Any) -> int:
    with site.db() as db:
        return int(db.scalar(select(func.count()).select_from(model).where(*where)) or 0)


SKIPPED = "skipped, the database is unavailable"


def test_prune_deletes_only_what_is_past_its_keep_time(
    make_site: t.Callable[..., Site], receiver: Receiver
) -> None:
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", receiver, new_secret())])
    site.create_user("alice")
    t0 = site.clock()

    # Day 0: a revoked session, a live one, a reset code, failure counters, webhook messages
    # delivered, dead and pending.
    revoked = site.api.login("alice")
    assert site.api.post("/token/revoke", json={"refresh_token": revoked["refresh_token"]}
                         ).status_code == 200
    expiring = site.api.login("alice")
    assert site.api.post("/forgot-password", json={"login": "alice", "delivery": "otp"}
                         ).status_code == 200
    site.state.background.drain()  # the reset is stored after the answer
    assert site.api.post("/token", json={"username": "ghost", "password": "whatever it is"}
                         ).status_code != 200
    assert count(site, Throttle, Throttle.key == "l:ghost") == 1
    sent = len(outbox(site))
    assert sent == 5
    receiver.then(sent - 1, status=200).then(1, status=410)  # the last message dies
    assert deliver_due(site.state) == sent
    assert [m.status for m in outbox(site)] == ["delivered"] * (sent - 1) + ["dead"]
    register(site, "pending")  # stays pending: never delivered here
    audit_day0 = count(site, AuditEvent)

    # Nothing is old yet.
    assert not any(prune(site.state).values())

    # Day 2: the used and expired reset code and the old counters go; nothing else.
    site.clock.advance(2 * DAY)
    counts = prune(site.state)
    assert counts["password_resets"] == 1
    assert counts["throttle"] >= 1 and count(site, Throttle) == 0
    assert counts["sessions"] == counts["audit"] == counts["webhook_messages"] == 0
    fresh = site.api.login("alice")  # a session, counters and a reset link of day 2
    assert site.api.post("/forgot-password", json={"login": "alice", "delivery": "link"}
                         ).status_code == 200
    site.state.background.drain()  # the reset is stored after the answer
    assert count(site, Throttle) >= 1 and count(site, PasswordReset) == 1
    assert not any(prune(site.state).values())  # fresh rows stay

    # Day 8: the session revoked on day 0 goes, with its refresh tokens.
    site.clock.advance(6 * DAY)
    counts = prune(site.state)
    assert counts["sessions"] == 1 and counts["refresh_tokens"] >= 1
    assert count(site, Session, Session.id == revoked["sid"]) == 0
    assert count(site, RefreshToken, RefreshToken.session_id == revoked["sid"]) == 0
    assert count(site, Session) == 2
    # Day 2's link expired an hour after it was sent, day 2's counters' window long ago.
    assert counts["password_resets"] == 1 and count(site, PasswordReset) == 0
    assert counts["throttle"] >= 1 and count(site, Throttle) == 0

    # Day 38: the session that expired on day 30 goes; day 2's (expires day 32) stays a week.
    site.clock.advance(30 * DAY)
    counts = prune(site.state)
    assert counts["sessions"] == 1
    assert count(site, Session, Session.id == expiring["sid"]) == 0
    assert count(site, Session, Session.id == fresh["sid"]) == 1
    assert count(site, RefreshToken, RefreshToken.session_id == expiring["sid"]) == 0
    assert count(site, Throttle) == 0 and count(site, PasswordReset) == 0
    assert count(site, AuditEvent) > audit_day0  # nothing near the retention yet

    # Day 91: day 0's activity log and delivered messages are past the 90-day retention.
    site.clock.advance(53 * DAY)
    before = count(site, AuditEvent)
    counts = prune(site.state)
    assert counts["audit"] == audit_day0
    assert count(site, AuditEvent) == before - audit_day0
    assert count(site, AuditEvent, AuditEvent.created_at < t0 + dt.timedelta(days=1)) == 0
    assert counts["webhook_messages"] == counts["webhook_attempts"] == sent - 1
    assert [m.status for m in outbox(site)] == ["dead"] + ["pending"] * (len(outbox(site)) - 1)
    assert count(site, WebhookAttempt) == 1  # the dead message's attempt is kept with it

    # Idempotent, and safe on every instance at once.
    errors: list[BaseException] = []
    results: list[dict[str, int]] = []

    def run() -> None:
        try:
            results.append(prune(site.state))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert all(not any(r.values()) for r in results)


def test_the_scheduler_runs_the_jobs_and_stops(
    make_site: t.Callable[..., Site], receiver: Receiver
) -> None:
    secret = new_secret()
    site = make_site(HEADLESSKEY_WEBHOOKS=[endpoint("ops", receiver, secret)])
    scheduler = run_scheduler(site.app, webhook_interval=0.2, prune_interval=3600)
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {DELIVER_JOB_ID, PRUNE_JOB_ID, ROTATE_JOB_ID}
        for job in jobs.values():
            assert job.coalesce is True and job.max_instances == 1
        register(site, "olga")
        register(site, "paul")
        got = receiver.wait_for(2, timeout=10)
        assert sorted(r.payload["data"]["login"] for r in got) == ["olga", "paul"]
        assert all(verifies(secret, r) for r in got)
    finally:
        scheduler.shutdown(wait=True)
    assert not scheduler.running
    register(site, "quinn")
    time.sleep(0.6)  # three intervals: nothing runs any more
    assert len(receiver.snapshot()) == 2


def test_the_jobs_wait_out_a_database_outage(
    make_site: t.Callable[..., Site], receiver: Receiver, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the database cannot be opened each run logs one warning line (no traceback) and
    the scheduler keeps going; once the file is back the next run delivers."""
    path = tmp_path / "jobs.db"
    secret = new_secret()
    site = make_site(HEADLESSKEY_DATABASE_URL=f"sqlite:///{path}",
                     HEADLESSKEY_WEBHOOKS=[endpoint("ops", receiver, secret)])
    scheduler = run_scheduler(site.app, webhook_interval=0.2, prune_interval=3600)
    try:
        register(site, "olga")
        assert len(receiver.wait_for(1, timeout=10)) == 1
        caplog.set_level(logging.INFO)
        caplog.clear()
        path.rename(tmp_path / "aside.db")
        path.mkdir()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(
                SKIPPED in r.getMessage() for r in caplog.records) < 3:
            time.sleep(0.1)
        path.rmdir()
        (tmp_path / "aside.db").rename(path)
        register(site, "paul")
        got = receiver.wait_for(2, timeout=10)
        assert sorted(r.payload["data"]["login"] for r in got) == ["olga", "paul"]
        assert scheduler.running
    finally:
        scheduler.shutdown(wait=True)
    skipped = [r for r in caplog.records if SKIPPED in r.getMessage()]
    assert len(skipped) >= 3
    assert all(r.levelno == logging.WARNING and "Deliver due webhook messages" in r.getMessage()
               and r.exc_info is None for r in skipped)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_nothing_is_scheduled_on_import() -> None:
    code = (
        "import sys, threading\n"
        "import agent.jobs, agent.webhooks, agent.cli, agent.standalone\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert 'apscheduler.schedulers.background' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_period_is_claimed_once_by_many_apps_and_threads(
    make_site: t.Callable[..., Site]
) -> None:
    first = make_site()
    # Another app on the same database: another worker or instance.
    second = make_site(HEADLESSKEY_DATABASE_URL=first.state.settings.database_url,
                       HEADLESSKEY_SECRET_KEY=first.app.config["HEADLESSKEY_SECRET_KEY"])
    second.clock.offset = first.clock.offset
    ran: list[str] = []
    lock = threading.Lock()

    def work(app: t.Any) -> str:
        with lock:
            ran.append(app.name)
        return "done"

    barrier = threading.Barrier(8)

    def contender(site: Site) -> str | None:
        barrier.wait()
        return once_per_period(site.app, "test.job", 3600, work)

    results: list[str | None] = []
    threads = [threading.Thread(target=lambda s=s: results.append(contender(s)))
               for s in [first, second] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert (results.count("done"), results.count(None)) == (1, 7), results
    assert len(ran) == 1
    with first.db() as db:
        (row,) = db.scalars(select(JobRun).where(JobRun.job == "test.job"))
        assert row.finished_at is not None and row.runner.endswith(f":{os.getpid()}")
    # The next period is a new claim.
    first.clock.advance(3600)
    assert once_per_period(first.app, "test.job", 3600, work) == "done"
    assert once_per_period(second.app, "test.job", 3600, work) is None
    assert count(first, JobRun, JobRun.job == "test.job") == 2
