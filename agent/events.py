"""The one place where an auth event becomes an audit row, a webhook outbox row and a signal.

:func:`record` adds the audit row and one outbox row per subscribed webhook endpoint to the
caller's database transaction, so both are written, or neither, with the change they describe.
The blinker signal is sent once that transaction commits (never for a rollback).

Nothing secret goes in: events carry ids, names, the client's IP and device, and small details
(a delivery method, a reason) — never a password, token, code or key.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import typing as t
import uuid
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field

from blinker import NamedSignal
from flask import current_app
from flask import has_app_context
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session as DBSession

from .db import Writes
from .db import insert_rows
from .models import AuditEvent
from .models import WebhookMessage
from .services.devices import describe

if t.TYPE_CHECKING:
    from .extension import State
    from .services.sessions import ClientInfo

_PENDING = "hk_pending_events"


@dataclass(frozen=True)
class Event:
    """An auth event as hooks and webhooks see it."""

    name: str
    outcome: str
    at: dt.datetime
    user_id: int | None = None
    login: str = ""
    session_id: str | None = None
    ip: str = ""
    user_agent: str = ""
    device: str = ""
    details: dict[str, t.Any] = field(default_factory=dict)

    def payload(self) -> dict[str, t.Any]:
        """The Standard Webhooks payload: ``{type, timestamp, data}``."""
        data = asdict(self)
        for key in ("name", "at", "user_agent"):
            data.pop(key)
        return {
            "type": self.name,
            "timestamp": self.at.isoformat().replace("+00:00", "Z"),
            "data": data,
        }


def record(
    db: DBSession,
    state: State,
    name: str,
    *,
    outcome: str = "success",
    client: ClientInfo | None = None,
    user_id: int | None = None,
    login: str = "",
    session_id: str | None = None,
    details: dict[str, t.Any] | None = None,
    skip_endpoints: t.Collection[str] = (),
) -> Event:
    """Add the audit row and webhook outbox rows of an event to ``db``'s transaction (none for
    the endpoints in ``skip_endpoints``)."""
    ev = make(state, name, outcome=outcome, client=client, user_id=user_id, login=login,
              session_id=session_id, details=details)
    for model, rows in writes_of(state, ev, skip_endpoints):
        insert_rows(db, model, rows)
    pend(db, ev)
    return ev


def make(
    state: State,
    name: str,
    *,
    outcome: str = "success",
    client: ClientInfo | None = None,
    user_id: int | None = None,
    login: str = "",
    session_id: str | None = None,
    details: dict[str, t.Any] | None = None,
) -> Event:
    """The event, stamped now (written by :func:`record`, or by a caller that writes its rows
    with :func:`writes_of` and then calls :func:`pend`)."""
    ua = client.user_agent[:512] if client else ""
    return Event(
        name=name,
        outcome=outcome,
        at=state.clock(),
        user_id=user_id,
        login=login[:254],
        session_id=session_id,
        ip=client.ip if client else "",
        user_agent=ua,
        device=describe(ua),
        details=dict(details or {}),
    )


def writes_of(
    state: State, ev: Event, skip_endpoints: t.Collection[str] = ()
) -> Writes:
    """The rows ``ev`` adds: its audit row, then one outbox row per subscribed endpoint."""
    writes: Writes = [(AuditEvent, [{
        "created_at": ev.at,
        "event": ev.name,
        "outcome": ev.outcome,
        "user_id": ev.user_id,
        "login": ev.login,
        "session_id": ev.session_id,
        "ip": ev.ip,
        "user_agent": ev.user_agent,
        "device": ev.device,
        "details": ev.details,
    }])]
    endpoints = [e for e in state.settings.webhooks
                 if e.wants(ev.name) and e.id not in skip_endpoints]
    if endpoints:
        body = json.dumps(ev.payload(), separators=(",", ":"))
        writes.append((WebhookMessage, [{
            "message_id": f"msg_{uuid.uuid4().hex}",
            "endpoint": endpoint.id,
            "event": ev.name,
            "body": body,
            "created_at": ev.at,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": ev.at,
        } for endpoint in endpoints]))
    return writes


def pend(db: DBSession, ev: Event) -> None:
    """Send ``ev``'s signals once ``db``'s transaction commits (its rows are in it)."""
    db.info.setdefault(_PENDING, []).append(ev)


def committed(db: DBSession) -> None:
    """What ``db.commit()`` runs after its commit (the pended events' signals, the counters'
    releases in Redis), for writes committed on a kept connection (:mod:`agent.direct`) while
    ``db`` holds no transaction: without beginning and committing an empty one, which costs a
    login about 0.1 ms with the caches cold after the password hash."""
    if db.in_transaction():
        db.commit()
    else:
        db.dispatch.after_commit(db)


def _send(signal: NamedSignal, app: t.Any, ev: Event) -> None:
    """Call each receiver of ``signal`` on its own: the change the event describes is already
    committed, so a receiver that raises is logged and the others still run (blinker's ``send``
    would stop at it and turn a done login or registration into a 500)."""
    if signal.is_muted:
        return
    for receiver in signal.receivers_for(app):
        try:
            if inspect.iscoroutinefunction(receiver):
                raise TypeError("a coroutine function cannot receive a signal")
            receiver(app, event=ev)
        except Exception:
            current_app.logger.exception(
                "Receiver %s of signal %s failed on a %s event (the event is committed and "
                "stands; the other receivers still run)", _name_of(receiver), signal.name, ev.name)


def _name_of(receiver: t.Any) -> str:
    target = receiver if hasattr(receiver, "__qualname__") else type(receiver)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def install(factory: t.Any) -> None:
    """Send the signals of committed events; drop those of rolled-back transactions."""

    @sa_event.listens_for(factory, "after_commit")
    def _after_commit(db: DBSession) -> None:
        pending = db.info.pop(_PENDING, [])
        if not pending or not has_app_context():
            return
        from . import signals

        app = current_app._get_current_object()  # type: ignore[attr-defined]
        for ev in pending:
            _send(signals.BY_EVENT[ev.name], app, ev)
            _send(signals.any_event, app, ev)

    @sa_event.listens_for(factory, "after_soft_rollback")
    def _after_rollback(db: DBSession, _previous: t.Any) -> None:
        db.info.pop(_PENDING, None)
