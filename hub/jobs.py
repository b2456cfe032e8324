"""Scheduled jobs of the hub, and the scheduler that runs them (APScheduler 3.x).

The jobs are plain functions of the app; tests call them directly:

- :func:`prune_nonces`: forget request nonces older than ``NONCE_TTL`` (never sooner than twice
  the 300 s clock skew, so a nonce is remembered as long as its request could be accepted),
  and expired logouts and webhook redelivery requests;
- :func:`expire_secrets`: delete site secret versions whose grace period is over;
- :func:`prune_events`: delete federation events older than ``EVENT_RETENTION_DAYS``;
- :func:`rotate_hub_key`: rotate the hub's own signing key once it is older than
  ``HUB_KEY_ROTATION_DAYS`` and retire the previous keys once their ``retire_after`` has passed
  (the old key stays published meanwhile, so cached JWKS never miss a kid).

Each job runs once per interval across every process, worker and host sharing the database
(DESIGN §6): a run is claimed with one conditional update of its ``hub_job_runs`` row::

    UPDATE hub_job_runs SET last_run_at = :now
    WHERE job = :job AND (last_run_at <= :now - :interval OR last_run_at > :now + :interval)

and only the process whose update hit the row does the work, in the same transaction (so the
row stays locked until the work is committed, and a failed run releases its claim). A run
stamped more than an interval ahead, by a clock that was set back since, is no reason to wait
until that time comes.

Nothing is scheduled on import nor by ``create_app``: ``headlesskey-hub jobs`` (started by
``serve`` unless ``--no-jobs``) calls :func:`run_forever`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import typing as t
from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.orm import Session as DBSession

from agent.db import insert_for
from agent.db import rowcount
from agent.db import skip_while_unavailable
from agent.signing import MAX_SKEW

from .models import HubKey
from .models import JobRun
from .models import Nonce
from .models import WebhookRedelivery
from .services import events
from .services import keys as key_service
from .services import logouts as logout_service
from .services import settings as settings_service
from .services import sites as site_service
from .state import HubState
from .state import get_state

if t.TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
    from flask import Flask

log = logging.getLogger(__name__)

T = t.TypeVar("T")

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# A claim accepts a run slightly before a full interval has passed: a process whose timer fires
# a moment early is not refused a whole period because another fired a moment late last time.
CLAIM_SLACK = 0.9


def claim(db: DBSession, job: str, now: dt.datetime, interval: float) -> bool:
    """Claim the run of ``job`` at ``now`` unless it ran less than ``interval`` seconds ago.

    True for exactly one of several concurrent callers. The caller commits (keeping the row
    locked until its work is done) or rolls back (releasing the claim).
    """
    insert = insert_for(db.get_bind().dialect.name)
    db.execute(
        insert(JobRun).values(job=job, last_run_at=EPOCH).on_conflict_do_nothing(
            index_elements=["job"]
        )
    )
    cutoff = now - dt.timedelta(seconds=interval)
    # A run stamped more than an interval ahead was made by a clock that ran ahead and has been
    # set back since (or by a host whose clock is that far off): it is no reason to wait.
    ahead = now + dt.timedelta(seconds=interval)
    result = db.execute(
        update(JobRun)
        .where(JobRun.job == job, (JobRun.last_run_at <= cutoff) | (JobRun.last_run_at > ahead))
        .values(last_run_at=now)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def _run_claimed(
    app: Flask, job: str, interval: float, work: t.Callable[[DBSession, HubState], T]
) -> T | None:
    """``work`` inside a claimed run of ``job``; None when another process has this run."""
    state = get_state(app)
    with app.app_context(), state.session_factory() as db:
        if not claim(db, job, state.clock(), interval * CLAIM_SLACK):
            db.rollback()
            return None
        result = work(db, state)
        db.commit()
        return result


effective_setting = settings_service.effective


# ---------------------------------------------------------------------------------------------
# The jobs


NONCE_INTERVAL = 300
SECRET_INTERVAL = 3600
EVENT_INTERVAL = 3600
HUB_KEY_INTERVAL = 3600


def prune_nonces(app: Flask) -> int | None:
    """Forget nonces older than ``NONCE_TTL`` (at least 2 x 300 s); returns how many, or None.

    A request is accepted up to 300 s either side of the hub's clock, so a nonce must be
    remembered for 600 s after it was seen; a shorter ``NONCE_TTL`` is raised to that.
    """

    def work(db: DBSession, state: HubState) -> int:
        ttl = max(int(state.setting("NONCE_TTL")), 2 * MAX_SKEW)
        cutoff = state.clock() - dt.timedelta(seconds=ttl)
        count = rowcount(db.execute(delete(Nonce).where(Nonce.seen_at < cutoff)))
        if count:
            log.info("pruned %d nonce(s)", count)
        # Logouts everywhere leave the directory after 24 h; their record stays in the events.
        logouts = logout_service.prune(db, state)
        if logouts:
            log.info("pruned %d expired logout(s)", logouts)
        # Webhook redelivery requests are listed in directories for 24 h, then forgotten too.
        done = rowcount(db.execute(delete(WebhookRedelivery)
                                   .where(WebhookRedelivery.expires_at < state.clock())))
        if done:
            log.info("pruned %d webhook redelivery request(s)", done)
        return count

    return _run_claimed(app, "prune_nonces", NONCE_INTERVAL, work)


def expire_secrets(app: Flask) -> int | None:
    """Delete site secret versions past their grace period; returns how many, or None."""

    def work(db: DBSession, state: HubState) -> int:
        count = site_service.prune_secrets(db, state)
        if count:
            log.info("deleted %d expired site secret(s)", count)
        return count

    return _run_claimed(app, "expire_secrets", SECRET_INTERVAL, work)


def prune_events(app: Flask) -> int | None:
    """Delete events older than ``EVENT_RETENTION_DAYS`` (console setting first); or None."""

    def work(db: DBSession, state: HubState) -> int:
        days = effective_setting(db, state, "EVENT_RETENTION_DAYS")
        count = events.prune(db, state, days=days)
        if count:
            log.info("pruned %d event(s) older than %d days", count, days)
        return count

    return _run_claimed(app, "prune_events", EVENT_INTERVAL, work)


def rotate_hub_key(app: Flask) -> dict[str, t.Any] | None:
    """Rotate the hub key when it is older than ``HUB_KEY_ROTATION_DAYS``; retire old ones.

    The rotation period is the console's ``HUB_KEY_ROTATION_DAYS`` setting when set, else the
    configuration. A hub without a key gets one. Returns ``{"rotated": new kid or None,
    "retired": count}``, or None when another process has this run.
    """

    def work(db: DBSession, state: HubState) -> dict[str, t.Any]:
        now = state.clock()
        days = effective_setting(db, state, "HUB_KEY_ROTATION_DAYS")
        active = db.scalars(
            select(HubKey).where(HubKey.status == "active").order_by(HubKey.created_at.desc())
        ).first()
        rotated: str | None = None
        if active is None:
            rotated = key_service.ensure_hub_key(db, state).kid
            log.info("created the hub signing key %s", rotated)
        elif now - active.created_at >= dt.timedelta(days=days):
            rotated = key_service.rotate_hub_key(db, state).kid
            log.info("rotated the hub signing key: %s replaces %s", rotated, active.kid)
        retired = key_service.retire_hub_keys(db, state)
        if retired:
            events.log(db, state, "hub_key.retired", actor="hub", details={"count": retired})
            log.info("retired %d hub key(s)", retired)
        return {"rotated": rotated, "retired": retired}

    return _run_claimed(app, "rotate_hub_key", HUB_KEY_INTERVAL, work)


@dataclass(frozen=True)
class JobSpec:
    id: str
    name: str
    func: t.Callable[[Flask], t.Any]
    interval: int


JOBS: tuple[JobSpec, ...] = (
    JobSpec("headlesskey-hub.prune_nonces", "Forget old request nonces", prune_nonces,
            NONCE_INTERVAL),
    JobSpec("headlesskey-hub.expire_secrets", "Delete site secrets past their grace period",
            expire_secrets, SECRET_INTERVAL),
    JobSpec("headlesskey-hub.prune_events", "Prune old federation events", prune_events,
            EVENT_INTERVAL),
    JobSpec("headlesskey-hub.rotate_hub_key", "Rotate and retire the hub signing key",
            rotate_hub_key, HUB_KEY_INTERVAL),
)


# ---------------------------------------------------------------------------------------------
# The scheduler


def init_scheduler(app: Flask) -> BackgroundScheduler:
    """A background scheduler with every hub job added, NOT started (call ``.start()``).

    Each job has a fixed id, never overlaps itself (``max_instances=1``), runs once however many
    runs it missed (``coalesce``), and first runs as soon as the scheduler starts. While the
    database is unreachable a run logs one warning line and the next run tries again.
    """
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(
        timezone=dt.UTC, job_defaults={"coalesce": True, "max_instances": 1}
    )
    now = dt.datetime.now(dt.UTC)
    for job in JOBS:
        scheduler.add_job(
            skip_while_unavailable(job.name, job.func),
            "interval",
            args=[app],
            id=job.id,
            name=job.name,
            seconds=job.interval,
            next_run_time=now,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=job.interval,
            replace_existing=True,
        )
    return scheduler


def run_forever(
    app: Flask, *, parent_pid: int | None = None, stop: threading.Event | None = None
) -> None:
    """Run the jobs until SIGTERM or SIGINT (or ``stop`` is set, or ``parent_pid`` is gone).

    Signal handlers are installed only when called from the main thread.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def _on_signal(_signum: int, _frame: t.Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    scheduler = init_scheduler(app)
    scheduler.start()
    log.info("hub jobs running: %s", ", ".join(f"{j.id} every {j.interval}s" for j in JOBS))
    try:
        while not stop.wait(1.0):
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("the serve process is gone; stopping the jobs")
                break
    finally:
        scheduler.shutdown(wait=True)
        get_state(app).engine.dispose()
