"""Background jobs of the agent: webhook delivery, pruning, key rotation, activity upload to the
hub, and the scheduler that runs them.

The job bodies are plain functions of the app's :class:`~agent.extension.State`; tests call them
directly. :func:`run_scheduler` runs them periodically with APScheduler 3.x, in the process
started by ``headlesskey-agent jobs`` (which ``serve`` starts beside gunicorn). Nothing is
scheduled on import, nor by ``create_app``: gunicorn workers never run jobs.

Every job is safe to run on every instance at once, and the periodic ones run once per period
across all of them: pruning and the health report claim each period with a row of
``hk_job_runs`` keyed by (job, start time // interval), inserted only if absent (one atomic
statement: exactly one of the processes that try gets the row, and only it runs the job);
deliveries claim each message with a conditional update (:mod:`agent.webhooks`); a key
rotation claims the current key with a conditional update (:mod:`agent.rotation`); the upload
of activity to the hub is leased to one process at a time (:mod:`agent.uplink`); the directory
refresh claims each fetch with a conditional update (:mod:`agent.federation`).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import socket
import typing as t

from sqlalchemy import and_
from sqlalchemy import delete
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import update

from . import uplink
from . import webhooks
from .db import insert_for
from .db import rowcount
from .db import skip_while_unavailable
from .extension import get_state
from .models import JobRun
from .models import PasswordReset
from .models import RefreshToken
from .models import Session
from .models import Throttle
from .models import UsedAssertion
from .models import WebhookAttempt
from .models import WebhookMessage
from .services import audit
from .services import keystore

if t.TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
    from apscheduler.schedulers.blocking import BlockingScheduler  # type: ignore[import-untyped]
    from flask import Flask

    from .extension import State

log = logging.getLogger(__name__)
T = t.TypeVar("T")

DELIVER_JOB_ID = "headlesskey.deliver_webhooks"
PRUNE_JOB_ID = "headlesskey.prune"
UPLINK_JOB_ID = "headlesskey.upload_activity"
SESSION_KEEP = dt.timedelta(days=7)  # ended sessions stay listed this long after their end
RESET_KEEP = dt.timedelta(days=1)
THROTTLE_KEEP = dt.timedelta(days=1)  # past the window and the lock (a lock is at most 24 h)


JOB_RUN_KEEP = dt.timedelta(days=1)


def runner_name() -> str:
    """``host:pid`` of this process, as written in the job runs it claims."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}"


def claim(state: State, job: str, interval: float) -> int | None:
    """Claim this period of ``job`` (``interval`` seconds long); its slot, or None if taken.

    One ``INSERT ... ON CONFLICT DO NOTHING`` of the row (job, slot), committed at once: of
    every process on every instance trying the same period, exactly one inserts the row.
    """
    now = state.clock()
    slot = int(now.timestamp() // interval)
    with state.session_factory() as db:
        insert = insert_for(db.get_bind().dialect.name)
        # RETURNING, not the row count: drivers differ in the count of an ignored insert.
        claimed = db.scalar(
            insert(JobRun)
            .values(job=job, slot=slot, runner=runner_name(), started_at=now)
            .on_conflict_do_nothing(index_elements=["job", "slot"])
            .returning(JobRun.slot)
        )
        db.commit()
    return slot if claimed is not None else None


def _finish(state: State, job: str, slot: int) -> None:
    with state.session_factory() as db:
        db.execute(update(JobRun).where(JobRun.job == job, JobRun.slot == slot)
                   .values(finished_at=state.clock()))
        db.commit()


def once_per_period(app: Flask, job: str, interval: float,
                    work: t.Callable[[Flask], T]) -> T | None:
    """``work(app)`` if this process claims the current period of ``job``, else None.

    A run that fails keeps its claim (its row has no ``finished_at``): the next period tries
    again, rather than every other process retrying at once.
    """
    state = get_state(app)
    slot = claim(state, job, interval)
    if slot is None:
        return None
    result = work(app)
    _finish(state, job, slot)
    return result


def prune(state: State) -> dict[str, int]:
    """Delete what is no longer needed; returns the number of rows deleted per kind.

    - activity log rows older than ``AUDIT_RETENTION_DAYS``;
    - sessions revoked, or expired, more than 7 days ago, with their refresh tokens;
    - password resets used or expired more than a day ago;
    - brute-force counters whose window and lock ended more than a day ago;
    - keys whose last token has expired (and, at the hub, been retired);
    - job runs (``hk_job_runs``) more than a day old;
    - delivered webhook messages (and their attempts) older than ``AUDIT_RETENTION_DAYS``.

    Each is one idempotent DELETE in its own short transaction.
    """
    s = state.settings
    now = state.clock()
    retention = now - dt.timedelta(days=s.audit_retention_days)
    counts: dict[str, int] = {}

    with state.session_factory() as db:
        counts["audit"] = audit.prune(db, retention)
        db.commit()

    ended = or_(Session.expires_at < now - SESSION_KEEP, Session.revoked_at < now - SESSION_KEEP)
    with state.session_factory() as db:
        counts["refresh_tokens"] = rowcount(
            db.execute(
                delete(RefreshToken).where(
                    RefreshToken.session_id.in_(select(Session.id).where(ended))
                )
            )
        )
        counts["sessions"] = rowcount(db.execute(delete(Session).where(ended)))
        db.commit()

    with state.session_factory() as db:
        counts["password_resets"] = rowcount(
            db.execute(
                delete(PasswordReset).where(
                    or_(
                        PasswordReset.used_at < now - RESET_KEEP,
                        PasswordReset.expires_at < now - RESET_KEEP,
                    )
                )
            )
        )
        db.commit()

    with state.session_factory() as db:
        counts["keys"] = keystore.prune(db, now)
        db.commit()

    with state.session_factory() as db:
        counts["sso_assertions"] = rowcount(
            db.execute(delete(UsedAssertion).where(UsedAssertion.expires_at < now))
        )
        db.commit()

    window = dt.timedelta(seconds=s.lockout_window)
    with state.session_factory() as db:
        counts["throttle"] = rowcount(
            db.execute(
                delete(Throttle).where(
                    Throttle.window_start < now - window - THROTTLE_KEEP,
                    or_(
                        Throttle.locked_until.is_(None),
                        Throttle.locked_until < now - THROTTLE_KEEP,
                    ),
                )
            )
        )
        db.commit()

    with state.session_factory() as db:
        counts["job_runs"] = rowcount(
            db.execute(delete(JobRun).where(JobRun.started_at < now - JOB_RUN_KEEP))
        )
        db.commit()

    old_delivered = and_(
        WebhookMessage.status == "delivered", WebhookMessage.delivered_at < retention
    )
    with state.session_factory() as db:
        counts["webhook_attempts"] = rowcount(
            db.execute(
                delete(WebhookAttempt).where(
                    WebhookAttempt.message_id.in_(select(WebhookMessage.id).where(old_delivered))
                )
            )
        )
        counts["webhook_messages"] = rowcount(
            db.execute(delete(WebhookMessage).where(old_delivered))
        )
        db.commit()

    if any(counts.values()):
        log.info("pruned %s", ", ".join(f"{n} {kind}" for kind, n in counts.items() if n))
    return counts


def deliver_webhooks(app: Flask) -> int:
    """The delivery job: send every due webhook message (see :func:`webhooks.deliver_due`)."""
    with app.app_context():
        return webhooks.deliver_due(get_state(app))


def prune_job(app: Flask) -> dict[str, int]:
    """The pruning job: :func:`prune` inside the app's context."""
    with app.app_context():
        return prune(get_state(app))


def upload_activity(app: Flask) -> int:
    """The uplink job: send the activity the hub has not acknowledged yet (:mod:`agent.uplink`)."""
    with app.app_context():
        return uplink.upload_pending(get_state(app))


@t.overload
def run_scheduler(
    app: Flask,
    *,
    webhook_interval: float = ...,
    prune_interval: float = ...,
    uplink_interval: float = ...,
    blocking: t.Literal[False] = ...,
) -> BackgroundScheduler: ...


@t.overload
def run_scheduler(
    app: Flask,
    *,
    webhook_interval: float = ...,
    prune_interval: float = ...,
    uplink_interval: float = ...,
    blocking: t.Literal[True],
) -> BlockingScheduler: ...


def run_scheduler(
    app: Flask,
    *,
    webhook_interval: float = 2.0,
    prune_interval: float = 3600,
    uplink_interval: float = 5.0,
    blocking: bool = False,
) -> BackgroundScheduler | BlockingScheduler:
    """Schedule the jobs of ``app`` and start the scheduler.

    With ``blocking=False`` (the default) the jobs run in a background thread and the started
    scheduler is returned; stop it with ``scheduler.shutdown()``. With ``blocking=True`` this
    call runs the jobs until the scheduler is shut down (from a job or a signal handler).

    Each job has a fixed id, never overlaps itself (``max_instances=1``) and runs once after a
    delay however many runs it missed (``coalesce=True``). Pruning also runs once at start.
    Pruning and the health report run once per period across every process sharing the
    database (:func:`once_per_period`). The activity upload to the hub is scheduled only when
    the site is federated. While the database is unreachable, each run logs one warning line
    and the next run tries again.
    """
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.blocking import BlockingScheduler

    scheduler_class = BlockingScheduler if blocking else BackgroundScheduler
    scheduler = scheduler_class(
        timezone=dt.UTC,
        job_defaults={"coalesce": True, "max_instances": 1},
    )
    def every(job: t.Callable[[Flask], t.Any], job_id: str, name: str, seconds: float, *,
              now: bool = False, once: bool = False) -> None:
        # next_run_time only when asked: APScheduler reads an explicit None as "paused".
        first = {"next_run_time": dt.datetime.now(dt.UTC)} if now else {}
        if once:  # one run per period across every process sharing the database
            job = functools.partial(once_per_period, job=job_id, interval=seconds, work=job)
        scheduler.add_job(
            skip_while_unavailable(name, job), "interval", args=[app], id=job_id, name=name,
            seconds=seconds, coalesce=True, max_instances=1,
            misfire_grace_time=max(1, int(seconds * 2)), replace_existing=True, **first,
        )

    every(deliver_webhooks, DELIVER_JOB_ID, "Deliver due webhook messages", webhook_interval)
    every(prune_job, PRUNE_JOB_ID, "Prune old rows", prune_interval, now=True, once=True)
    settings = get_state(app).settings
    from . import rotation

    # Key rotation: each rotation claims its key with a conditional update, so it happens once
    # however many instances run this job.
    every(rotation.rotate_job, rotation.JOB_ID, "Rotate keys and the hub secret",
          rotation.job_interval(settings), now=True)
    if settings.federated:
        from . import health
        from .federation import refresh_job

        every(upload_activity, UPLINK_JOB_ID, "Upload activity to the hub", uplink_interval)
        # Fleet health: version, clock, key and sync state for the hub's console.
        every(health.report_job, health.HEALTH_JOB_ID, "Report health to the hub",
              health.HEALTH_INTERVAL, now=True, once=True)
        # Refresh the directory when due, so logouts recorded at the hub apply here without
        # waiting for single sign-on traffic.
        every(refresh_job, "headlesskey.refresh_directory", "Refresh the federation directory",
              max(1.0, settings.directory_refresh / 2), now=True)
        log.info("jobs: activity upload to the hub every %ss", uplink_interval)
    log.info(
        "jobs: webhook delivery every %ss, pruning every %ss", webhook_interval, prune_interval
    )
    scheduler.start()
    return scheduler
