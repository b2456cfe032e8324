"""The hub's scheduled jobs, called directly as the scheduler would (DESIGN §6).

What a site or an admin sees is checked: a replayed request stays refused after its nonce is
forgotten, an old secret stops working and its row goes, old events leave the log, and the hub
key in the published JWKS rotates with an overlap. Concurrency is real: two threads, and two
hub apps on one database, run the same job at the same instant.
"""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
from sqlalchemy import select

from hub import jobs
from hub.models import HubKey
from hub.models import Setting
from tests.hub.conftest import Hub

DIRECTORY = "/api/v1/directory"
DAY = 86400


def hub_kids(hub: Hub) -> list[str]:
    r = hub.http.get(hub.url + "/.well-known/jwks.json", timeout=30)
    assert r.status_code == 200
    return [k["kid"] for k in r.json()["keys"] if k["hk_site"] == "hub"]


def key_rows(hub: Hub) -> list[tuple[str, str]]:
    with hub.state.session_factory() as db:
        return [(k.kid, k.status) for k in db.scalars(select(HubKey).order_by(HubKey.id))]


def second_worker(make_hub: t.Callable[..., Hub], first: Hub) -> Hub:
    """Another hub app (another worker or host) on the same database and master key."""
    return make_hub(
        HEADLESSKEY_HUB_DATABASE_URL=first.app.config["HEADLESSKEY_HUB_DATABASE_URL"],
        HEADLESSKEY_HUB_MASTER_KEY=first.app.config["HEADLESSKEY_HUB_MASTER_KEY"],
    )


# ---------------------------------------------------------------------------------------------
# nonces


SKIPPED = "skipped, the database is unavailable"


def test_prune_nonces_forgets_old_nonces_but_replays_stay_refused(hub: Hub) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    nonce = "replayed-nonce-0001"
    old_stamp = hub.clock().timestamp()
    assert hub.signed("GET", DIRECTORY, shop, secret, nonce=nonce).status_code == 200
    hub.clock.advance(800)
    assert hub.signed("GET", DIRECTORY, shop, secret).status_code == 200
    assert hub.scalar("SELECT count(*) FROM hub_nonces") == 2

    hub.clock.advance(101)  # the first nonce is 901 s old, the second 101 s
    assert jobs.prune_nonces(hub.app) == 1
    assert hub.scalar("SELECT count(*) FROM hub_nonces") == 1
    # The forgotten nonce's request is still refused: its timestamp is far outside the window.
    r = hub.signed("GET", DIRECTORY, shop, secret, nonce=nonce, now=old_stamp)
    assert r.status_code == 401
    assert r.json()["code"] == "skewed_request"


def test_prune_nonces_keeps_them_at_least_600_s(make_hub: t.Callable[..., Hub]) -> None:
    hub = make_hub(HEADLESSKEY_HUB_NONCE_TTL=10)
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    # Signed 300 s ahead of the hub's clock: acceptable for 600 s from now.
    stamp = int(hub.clock().timestamp()) + 299
    nonce = "future-dated-nonce-1"
    assert hub.signed("GET", DIRECTORY, shop, secret, nonce=nonce, now=stamp).status_code == 200
    hub.clock.advance(550)
    assert jobs.prune_nonces(hub.app) == 0
    r = hub.signed("GET", DIRECTORY, shop, secret, nonce=nonce, now=stamp)
    assert r.status_code == 401
    assert r.json()["code"] == "replayed_request"


def test_a_job_runs_once_per_interval(hub: Hub) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    assert jobs.prune_nonces(hub.app) == 0
    assert hub.signed("GET", DIRECTORY, shop, secret).status_code == 200
    hub.clock.advance(60)  # a minute after the first run: not this job's turn yet
    assert jobs.prune_nonces(hub.app) is None
    hub.clock.advance(jobs.NONCE_INTERVAL)
    assert jobs.prune_nonces(hub.app) == 0  # claimed; the nonce is still young
    hub.clock.advance(1000)
    assert jobs.prune_nonces(hub.app) == 1


def test_a_job_runs_again_after_the_clock_was_set_back(hub: Hub) -> None:
    hub.clock.advance(30 * DAY)  # a host whose clock ran a month ahead runs the jobs
    assert jobs.prune_nonces(hub.app) == 0
    assert jobs.expire_secrets(hub.app) == 0
    hub.clock.advance(-30 * DAY)  # NTP puts it right: the jobs run on, not a month later
    assert jobs.prune_nonces(hub.app) == 0
    assert jobs.expire_secrets(hub.app) == 0
    hub.clock.advance(60)
    assert jobs.prune_nonces(hub.app) is None  # and once per interval again
    hub.clock.advance(jobs.NONCE_INTERVAL)
    assert jobs.prune_nonces(hub.app) == 0


# ---------------------------------------------------------------------------------------------
# secrets and events


def test_expire_secrets_deletes_secrets_past_their_grace(make_hub: t.Callable[..., Hub]) -> None:
    hub = make_hub(HEADLESSKEY_HUB_SECRET_GRACE=600)
    shop, old = hub.add_site("Shop", "https://shop.example.com")
    new = hub.signed("POST", "/api/v1/secret/rotate", shop, old).json()["secret"]
    assert jobs.expire_secrets(hub.app) == 0  # still in its grace period
    assert hub.scalar("SELECT count(*) FROM hub_site_secrets") == 2
    assert hub.signed("GET", DIRECTORY, shop, old).status_code == 200

    hub.clock.advance(jobs.SECRET_INTERVAL)
    assert jobs.expire_secrets(hub.app) == 1
    assert hub.scalar("SELECT count(*) FROM hub_site_secrets") == 1
    assert hub.signed("GET", DIRECTORY, shop, old).status_code == 401
    assert hub.signed("GET", DIRECTORY, shop, new).status_code == 200


def _upload(hub: Hub, shop: str, secret: str, items: list[tuple[str, dt.datetime]]) -> None:
    events = [{"id": i, "event": "login.success", "time": at.isoformat()} for i, at in items]
    r = hub.signed("POST", "/api/v1/events", shop, secret, json={"events": events})
    assert r.json() == {"accepted": len(items)}, r.text


def test_prune_events_applies_the_retention(hub: Hub) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    now = hub.clock()
    _upload(hub, shop, secret, [("old", now - dt.timedelta(days=181)),
                                ("kept", now - dt.timedelta(days=179))])
    assert jobs.prune_events(hub.app) == 1
    assert hub.scalar("SELECT count(*) FROM hub_events WHERE source = 'site'") == 1
    assert hub.scalar("SELECT remote_id FROM hub_events WHERE source = 'site'") == "kept"
    assert hub.scalar("SELECT count(*) FROM hub_events WHERE event = 'site.added'") == 1


def test_prune_events_honours_the_console_setting(hub: Hub) -> None:
    shop, secret = hub.add_site("Shop", "https://shop.example.com")
    now = hub.clock()
    _upload(hub, shop, secret, [("a", now - dt.timedelta(days=31)),
                                ("b", now - dt.timedelta(days=29))])
    with hub.state.session_factory() as db:
        db.add(Setting(key="EVENT_RETENTION_DAYS", value=30, updated_at=now, updated_by="t"))
        db.commit()
    assert jobs.prune_events(hub.app) == 1
    assert hub.scalar("SELECT count(*) FROM hub_events WHERE source = 'site'") == 1


# ---------------------------------------------------------------------------------------------
# the hub's signing key


def test_rotate_hub_key_creates_rotates_and_retires(make_hub: t.Callable[..., Hub]) -> None:
    # A one-hour JWKS cache: the old key stays published 2 h after the rotation.
    hub = make_hub(HEADLESSKEY_HUB_JWKS_MAX_AGE=3600)
    assert hub_kids(hub) == []
    first = jobs.rotate_hub_key(hub.app)
    assert first is not None and first["rotated"]
    k1 = first["rotated"]
    assert hub_kids(hub) == [k1]

    hub.clock.advance(89 * DAY)  # younger than HUB_KEY_ROTATION_DAYS (90): kept
    assert jobs.rotate_hub_key(hub.app) == {"rotated": None, "retired": 0}
    assert hub_kids(hub) == [k1]

    hub.clock.advance(1 * DAY)
    second = jobs.rotate_hub_key(hub.app)
    assert second is not None
    k2 = second["rotated"]
    assert k2 and k2 != k1
    assert hub_kids(hub) == [k1, k2]  # both published: caches never meet an unknown kid
    assert key_rows(hub) == [(k1, "retiring"), (k2, "active")]

    hub.clock.advance(3600)  # retire_after (2 x 3600 s) not reached yet
    assert jobs.rotate_hub_key(hub.app) == {"rotated": None, "retired": 0}
    assert hub_kids(hub) == [k1, k2]

    hub.clock.advance(3601)
    assert jobs.rotate_hub_key(hub.app) == {"rotated": None, "retired": 1}
    assert hub_kids(hub) == [k2]
    assert key_rows(hub) == [(k1, "retired"), (k2, "active")]
    assert hub.scalar("SELECT count(*) FROM hub_events WHERE event = 'hub_key.rotated'") == 1


def test_rotate_hub_key_honours_the_console_setting(hub: Hub) -> None:
    k1 = (jobs.rotate_hub_key(hub.app) or {})["rotated"]
    with hub.state.session_factory() as db:
        db.add(Setting(key="HUB_KEY_ROTATION_DAYS", value=7, updated_at=hub.clock(),
                       updated_by="admin"))
        db.commit()
    hub.clock.advance(6 * DAY)
    assert jobs.rotate_hub_key(hub.app) == {"rotated": None, "retired": 0}
    hub.clock.advance(1 * DAY)
    result = jobs.rotate_hub_key(hub.app)
    assert result is not None and result["rotated"] not in (None, k1)


def test_a_bad_console_setting_falls_back_to_the_configuration(hub: Hub) -> None:
    jobs.rotate_hub_key(hub.app)
    with hub.state.session_factory() as db:
        db.add(Setting(key="HUB_KEY_ROTATION_DAYS", value="soon", updated_at=hub.clock(),
                       updated_by="admin"))
        db.commit()
    hub.clock.advance(30 * DAY)
    assert jobs.rotate_hub_key(hub.app) == {"rotated": None, "retired": 0}
    hub.clock.advance(60 * DAY)
    assert (jobs.rotate_hub_key(hub.app) or {}).get("rotated")


def _at_once(calls: list[t.Callable[[], t.Any]]) -> list[t.Any]:
    """Run the calls in threads released together; their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[t.Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    return results


def test_two_threads_rotate_the_hub_key_once(hub: Hub) -> None:
    jobs.rotate_hub_key(hub.app)
    hub.clock.advance(91 * DAY)
    for _attempt in range(3):
        results = _at_once([lambda: jobs.rotate_hub_key(hub.app)] * 4)
        assert sum(1 for r in results if r is not None) == 1, results
        hub.clock.advance(jobs.HUB_KEY_INTERVAL)
    # One rotation: the first key and its successor; the later runs found a young key.
    assert hub.scalar("SELECT count(*) FROM hub_keys") == 2
    assert hub.scalar("SELECT count(*) FROM hub_keys WHERE status = 'active'") == 1


def test_two_hub_apps_on_one_database_rotate_once(make_hub: t.Callable[..., Hub]) -> None:
    first = make_hub()
    second = second_worker(make_hub, first)
    results = _at_once([lambda: jobs.rotate_hub_key(first.app),
                        lambda: jobs.rotate_hub_key(second.app)])
    assert sum(1 for r in results if r is not None) == 1, results
    assert first.scalar("SELECT count(*) FROM hub_keys") == 1  # not one key per app

    for hub in (first, second):
        hub.clock.advance(91 * DAY)
    results = _at_once([lambda: jobs.rotate_hub_key(first.app),
                        lambda: jobs.rotate_hub_key(second.app)])
    assert sum(1 for r in results if r is not None) == 1, results
    assert first.scalar("SELECT count(*) FROM hub_keys") == 2
    assert first.scalar("SELECT count(*) FROM hub_keys WHERE status = 'active'") == 1
    assert hub_kids(first) == hub_kids(second)
    # Every job claims its own runs: the pruning jobs of both apps run once too.
    for job in (jobs.prune_nonces, jobs.expire_secrets, jobs.prune_events):
        results = _at_once([lambda j=job: j(first.app), lambda j=job: j(second.app)])
        assert sum(1 for r in results if r is not None) == 1, (job.__name__, results)


# ---------------------------------------------------------------------------------------------
# the scheduler


def test_init_scheduler_registers_the_jobs_without_starting() -> None:
    from flask import Flask

    app = Flask("not-a-hub")
    scheduler = jobs.init_scheduler(app)
    assert not scheduler.running
    registered = {job.id: job for job in scheduler.get_jobs()}
    assert set(registered) == {
        "headlesskey-hub.prune_nonces",
        "headlesskey-hub.expire_secrets",
        "headlesskey-hub.prune_events",
        "headlesskey-hub.rotate_hub_key",
    }
    for job in registered.values():
        assert job.coalesce is True
        assert job.max_instances == 1
        assert job.args == (app,)
    # Built again (a restart), the same ids replace the old jobs rather than doubling them.
    again = jobs.init_scheduler(app)
    assert len(again.get_jobs()) == 4


def test_the_scheduled_jobs_wait_out_a_database_outage(
    make_hub: t.Callable[..., Hub], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Run as scheduled while the database cannot be opened, each job logs one warning line
    and returns; once the file is back the same jobs run."""
    path = tmp_path / "outage-hub.db"
    hub = make_hub(HEADLESSKEY_HUB_DATABASE_URL=f"sqlite:///{path}")
    scheduled = jobs.init_scheduler(hub.app).get_jobs()
    assert key_rows(hub) == []  # the rotation job makes the hub's first signing key
    caplog.set_level(logging.INFO)
    path.rename(tmp_path / "aside.db")
    path.mkdir()
    for job in scheduled:
        assert job.func(*job.args) is None
    warnings = [r for r in caplog.records if SKIPPED in r.getMessage()]
    named = sorted(r.getMessage().split("'")[1] for r in warnings)
    assert named == sorted(j.name for j in scheduled)
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in warnings)
    path.rmdir()
    (tmp_path / "aside.db").rename(path)
    caplog.clear()
    for job in scheduled:
        job.func(*job.args)
    assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert [status for _kid, status in key_rows(hub)] == ["active"]


def test_importing_the_jobs_module_starts_nothing() -> None:
    code = "import threading, hub.jobs, hub.cli; print(threading.active_count())"
    out = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "1"


def test_run_forever_runs_every_job_at_start_and_stops(hub: Hub) -> None:
    stop = threading.Event()
    runner = threading.Thread(target=jobs.run_forever, args=(hub.app,), kwargs={"stop": stop})
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ran = "SELECT count(*) FROM hub_job_runs WHERE last_run_at > '1971-01-01'"
            if hub.scalar(ran) == 4:
                break
            time.sleep(0.1)
        assert hub.scalar("SELECT count(*) FROM hub_job_runs") == 4
        assert len(hub_kids(hub)) == 1  # the first run gave the hub its key
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()


@pytest.mark.parametrize("value", [0, -3, True, "x", None])
def test_effective_setting_ignores_values_that_are_not_positive(hub: Hub, value: t.Any) -> None:
    with hub.state.session_factory() as db:
        db.add(Setting(key="HUB_KEY_ROTATION_DAYS", value=value, updated_at=hub.clock()))
        db.commit()
        assert jobs.effective_setting(db, hub.state, "HUB_KEY_ROTATION_DAYS") == 90
