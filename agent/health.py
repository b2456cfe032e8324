"""Fleet health: this site's report to its hub (``POST /api/v1/health``), sent every minute.

The report says which version of the agent runs, what time this site's clock says (the hub
works out the skew against its own clock), the ``kid`` of the federation key (its RFC 7638
thumbprint), the last successful SSO exchange (the newest ``sso.exchanged`` row of the activity
log), when the hub directory was last fetched, the version of the hub's site policy applied here
with the keys this site pins (agent.policy), and the newest webhook deliveries. Before
reporting, the directory is refreshed if it is due, so a site whose hub answers never looks
unsynced merely for being idle.

The hub shows the last report in its console and flags a clock drift, a key overdue for
rotation and a site that has not synced. A hub that is down is not an error here: the report
is skipped and sent again at the next run.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import typing as t

from sqlalchemy import select

from . import federation
from . import policy
from . import webhooks
from .hub_client import HubUnavailable
from .models import AuditEvent
from .models import FederationCache

if t.TYPE_CHECKING:
    from flask import Flask

    from .extension import State

log = logging.getLogger(__name__)

HEALTH_PATH = "/api/v1/health"
HEALTH_JOB_ID = "headlesskey.report_health"
HEALTH_INTERVAL = 60.0  # seconds between two reports (the hub flags 15 minutes of silence)


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value else None


def agent_version() -> str:
    try:
        return importlib.metadata.version("headlesskey")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def gather(state: State, *, sync: bool = True) -> dict[str, t.Any]:
    """The report's fields; with ``sync``, refresh the hub directory first if it is due."""
    with state.session_factory() as db:
        if sync:
            try:
                federation.directory(db, state)
            except (federation.FederationUnavailable, HubUnavailable):
                db.rollback()  # reported as an old (or missing) last sync
        last_exchange = db.scalar(
            select(AuditEvent.created_at)
            .where(AuditEvent.event == "sso.exchanged", AuditEvent.outcome == "success")
            .order_by(AuditEvent.id.desc())
            .limit(1)
        )
        cached = db.get(FederationCache, "directory")
        last_sync = cached.fetched_at if cached is not None else None
        deliveries = webhooks.delivery_log(db)
    try:
        kid = federation.federation_key(state).kid or ""
    except federation.NotFederated:
        kid = ""
    return {
        "version": agent_version(),
        "time": _iso(state.clock()),
        "key_fingerprint": kid,
        "last_exchange_at": _iso(last_exchange),
        "last_sync_at": _iso(last_sync),
        **policy.report(state),
        "webhook_log": deliveries,
    }


def report(state: State) -> bool:
    """Send this site's health to the hub; False (never an exception) if it could not be sent."""
    if not state.settings.federated:
        return False
    try:
        payload = gather(state)
        reply = federation.client(state).call("POST", HEALTH_PATH, payload)
    except HubUnavailable as exc:
        log.warning("health report not sent: %s", exc)
        return False
    flags = (reply.object() or {}).get("flags")
    if isinstance(flags, list) and flags:
        log.warning("the hub flags this site: %s", ", ".join(str(f) for f in flags))
    return True


def report_job(app: Flask) -> bool:
    """The health job: :func:`report` inside the app's context."""
    from .extension import get_state

    with app.app_context():
        return report(get_state(app))
