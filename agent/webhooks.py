"""Delivery of the webhook outbox (``hk_webhook_outbox``), and a helper for receivers.

Every auth event adds one outbox row per subscribed endpoint in the transaction of the change
it describes (:mod:`agent.events`); nothing is sent on the request path. :func:`deliver_due`,
run every few seconds by the jobs process (:mod:`agent.jobs`), sends what is due:

- a message is *claimed* before it is sent, by a conditional ``UPDATE`` that only one worker
  can win, so any number of job processes on any number of instances never send one message
  at the same time; a claim lapses after twice the timeout, so a worker that dies mid-send
  delays a message but never loses it;
- the stored ``body`` is POSTed as is, signed the Standard Webhooks way (``webhook-id``, stable
  across retries; ``webhook-timestamp``, fresh per attempt; ``webhook-signature``, ``v1,`` +
  HMAC-SHA256 with the endpoint's own secret, and a second signature by its previous secret
  while that one is being rotated out);
- only a 2xx answer delivers; redirects are never followed; 410 Gone gives up at once; any
  other failure is retried on :data:`SCHEDULE` (with jitter, ``Retry-After`` honoured on 429
  and 503) and the message is marked ``dead`` once the schedule is exhausted (> 24 h);
- a 410, or a message dead after the whole schedule, *disables* its endpoint: its pending and
  later messages are marked dead unsent, a ``webhook.disabled`` event goes to the activity log,
  and the site's administrators are mailed. Redelivering one of its messages, or a new URL,
  enables it again.

Delivery is at least once: a receiver should drop a ``webhook-id`` it has already processed.
Neither bodies nor secrets are ever logged; logs name the message id, endpoint id and status.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import http.client
import json
import logging
import secrets
import time
import typing as t
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata

from sqlalchemy import String
from sqlalchemy import cast
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.orm import Session as DBSession
from standardwebhooks.webhooks import Webhook

from .db import rowcount
from .deadline import Deadline
from .models import FederationCache
from .models import User
from .models import WebhookAttempt
from .models import WebhookMessage
from .models import save_cache
from .text import holds_controls

if t.TYPE_CHECKING:
    from .config import WebhookEndpoint
    from .extension import State

__all__ = [
    "SCHEDULE", "InvalidSignature", "backoff", "deliver_due", "redeliver", "sign", "verify",
]

log = logging.getLogger(__name__)

# Seconds to wait after the n-th failed attempt (n = 1, 2, ...); one attempt more than there
# are entries, then the message is dead. Even with the jitter at its lowest the retries span
# more than 24 h (the sum is about 52 h).
SCHEDULE: tuple[int, ...] = (
    5, 30, 120, 600, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 12 * 3600, 24 * 3600,
)
JITTER = 0.2  # each delay is drawn from [delay * (1 - JITTER), delay * (1 + JITTER)]
MAX_RETRY_AFTER = 24 * 3600
_RESPONSE_READ_LIMIT = 64 * 1024  # read (and discard) at most this much of an answer
_ERROR_LENGTH = 200
_random = secrets.SystemRandom()


class InvalidSignature(Exception):
    """A webhook request whose signature, timestamp or body does not verify."""


def _user_agent() -> str:
    try:
        version = metadata.version("headlesskey")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        version = "dev"
    return f"HeadlessKey-Webhooks/{version}"


USER_AGENT = _user_agent()


def backoff(attempts: int) -> float | None:
    """Seconds to wait after ``attempts`` failed attempts, with jitter; None: give up."""
    if attempts < 1 or attempts > len(SCHEDULE):
        return None
    delay = SCHEDULE[attempts - 1]
    return delay * _random.uniform(1 - JITTER, 1 + JITTER)


def sign(endpoint_secret: str, message_id: str, at: dt.datetime, body: str) -> str:
    """The ``webhook-signature`` header of ``body`` sent as ``message_id`` at ``at``."""
    return Webhook(endpoint_secret).sign(message_id, at, body)


class _Headers(t.Protocol):
    def items(self) -> t.Iterable[tuple[str, t.Any]]: ...


def verify(secret: str, body: bytes | str, headers: _Headers) -> dict[str, t.Any]:
    """Check a received webhook and return its payload; raise :class:`InvalidSignature`.

    For a site's receiver: ``secret`` is the endpoint's ``whsec_...`` secret, ``body`` the raw
    request body (before any JSON parsing), ``headers`` the request headers (a dict, Flask's
    ``request.headers``, an ``email.message.Message``).
    The ``webhook-timestamp`` must be within 5 minutes of now. Deduplicate on ``webhook-id``.
    """
    try:
        payload = Webhook(secret).verify(body, {str(k): str(v) for k, v in headers.items()})
    except Exception as exc:  # the library raises several kinds; a receiver needs one
        raise InvalidSignature(str(exc) or type(exc).__name__) from None
    if not isinstance(payload, dict):
        raise InvalidSignature("the payload is not a JSON object")
    return payload


def redeliver(db: DBSession, message_id: str, *, now: dt.datetime | None = None) -> bool:
    """Put a dead or delivered message back in the queue, due ``now``, with a fresh schedule,
    and enable its endpoint again if it was disabled.

    Returns False if there is no such message or it is still pending. The caller commits.
    """
    now = now or dt.datetime.now(dt.UTC)
    stmt = (
        update(WebhookMessage)
        .where(
            WebhookMessage.message_id == message_id,
            WebhookMessage.status.in_(("dead", "delivered")),
        )
        .values(
            status="pending",
            attempts=0,
            next_attempt_at=now,
            claimed_until=None,
            delivered_at=None,
        )
    )
    if rowcount(db.execute(stmt)) != 1:
        return False
    endpoint = db.scalar(select(WebhookMessage.endpoint).where(
        WebhookMessage.message_id == message_id))
    if endpoint is not None:
        _enable(db, endpoint, now)
    return True


REDELIVERED = "redelivered"  # FederationCache row: ids of the hub's redelivery requests done
LOG_SIZE = 20  # messages in the delivery log sent to the hub


def apply_redeliveries(db: DBSession, state: State, directory: dict[str, t.Any]) -> int:
    """Redeliver the messages an admin asked for in the hub console, each request once.

    The directory lists the requests of the last 24 h (``webhook_redeliveries``); the ids done
    are kept in the ``redelivered`` cache row while they are listed. Returns how many messages
    went back into the queue.
    """
    from .models import FederationCache

    listed = [r for r in directory.get("webhook_redeliveries", []) if isinstance(r, dict)
              and isinstance(r.get("id"), int) and isinstance(r.get("message_id"), str)]
    row = db.get(FederationCache, REDELIVERED)
    done: set[int] = set(row.body.get("ids", [])) if row is not None else set()
    todo = [r for r in listed if r["id"] not in done]
    if not todo and (row is None or done <= {r["id"] for r in listed}):
        return 0
    now = state.clock()
    count = sum(redeliver(db, r["message_id"][:40], now=now) for r in todo)
    ids = sorted((done & {r["id"] for r in listed}) | {r["id"] for r in todo})
    save_cache(db, REDELIVERED, {"ids": ids}, now)
    db.commit()
    return count


def delivery_log(db: DBSession, limit: int = LOG_SIZE) -> list[dict[str, t.Any]]:
    """The newest webhook messages and how their delivery went (no bodies, no secrets)."""
    def iso(value: dt.datetime | None) -> str | None:
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value else None

    rows = db.scalars(select(WebhookMessage).order_by(WebhookMessage.id.desc()).limit(limit))
    return [{"message_id": m.message_id, "endpoint": m.endpoint, "event": m.event,
             "status": m.status, "attempts": m.attempts, "last_status": m.last_status,
             "last_error": m.last_error, "created_at": iso(m.created_at),
             "delivered_at": iso(m.delivered_at)} for m in rows]


@dataclass(frozen=True)
class _Claimed:
    id: int
    message_id: str
    endpoint: str
    body: str
    attempts: int
    claimed_until: dt.datetime


@dataclass(frozen=True)
class _Outcome:
    status_code: int | None
    error: str
    duration_ms: int
    retry_after: float | None = None
    timed_out: bool = False


def deliver_due(state: State, *, limit: int = 100) -> int:
    """Send the pending messages that are due; returns how many were attempted.

    Safe to call from any number of threads, processes and instances at once.
    """
    endpoints = {e.id: e for e in state.settings.webhooks}
    now = state.clock()
    due = (
        select(WebhookMessage.id, WebhookMessage.endpoint)
        .where(
            WebhookMessage.status == "pending",
            WebhookMessage.next_attempt_at <= now,
            or_(WebhookMessage.claimed_until.is_(None), WebhookMessage.claimed_until < now),
        )
        .order_by(WebhookMessage.next_attempt_at, WebhookMessage.id)
        .limit(limit)
    )
    # A read-only transaction: polling an empty outbox never takes SQLite's write lock.
    with state.engine.connect().execution_options(hk_readonly=True) as conn:
        candidates = [(row.id, row.endpoint) for row in conn.execute(due)]
    if not candidates:
        return 0
    with state.session_factory() as db:
        disabled = disabled_endpoints(db, state)
    attempted = 0
    stalled: set[str] = set()  # endpoints that timed out in this run
    for row_id, endpoint_id in candidates:
        if endpoint_id in stalled:
            # One hanging endpoint costs one timeout per run, not one per message; its other
            # messages wait for the next run, unclaimed.
            continue
        claimed = _claim(state, row_id)
        if claimed is None:
            continue  # another worker has it, or it is done
        endpoint = endpoints.get(claimed.endpoint)
        if endpoint is None:
            _give_up(state, claimed, "endpoint no longer configured")
            continue
        if endpoint.id in disabled:
            _give_up(state, claimed, f"endpoint disabled ({disabled[endpoint.id]})")
            continue
        attempted += 1
        outcome = _post(endpoint, claimed, state.clock(), state.settings.webhook_timeout)
        _record(state, claimed, outcome, endpoint)
        if outcome.timed_out:
            stalled.add(endpoint.id)
    return attempted


def _claim(state: State, row_id: int) -> _Claimed | None:
    now = state.clock()
    until = now + dt.timedelta(seconds=state.settings.webhook_timeout * 2)
    with state.session_factory() as db:
        won = rowcount(
            db.execute(
                update(WebhookMessage)
                .where(
                    WebhookMessage.id == row_id,
                    WebhookMessage.status == "pending",
                    WebhookMessage.next_attempt_at <= now,
                    or_(
                        WebhookMessage.claimed_until.is_(None),
                        WebhookMessage.claimed_until < now,
                    ),
                )
                .values(claimed_until=until)
            )
        )
        if won != 1:
            db.rollback()
            return None
        row = db.execute(
            select(
                WebhookMessage.message_id,
                WebhookMessage.endpoint,
                WebhookMessage.body,
                WebhookMessage.attempts,
            ).where(WebhookMessage.id == row_id)
        ).one()
        db.commit()
    return _Claimed(row_id, row.message_id, row.endpoint, row.body, row.attempts, until)


def _ours(claimed: _Claimed) -> t.Any:
    """The WHERE clause of a write that only the holder of ``claimed`` may do."""
    return (
        (WebhookMessage.id == claimed.id)
        & (WebhookMessage.status == "pending")
        & (WebhookMessage.claimed_until == claimed.claimed_until)
    )


def _give_up(state: State, claimed: _Claimed, why: str) -> None:
    """Mark a claimed message dead without sending it."""
    with state.session_factory() as db:
        db.execute(
            update(WebhookMessage)
            .where(_ours(claimed))
            .values(status="dead", claimed_until=None, last_error=why[:_ERROR_LENGTH])
        )
        db.commit()
    log.warning("webhook %s to %s: dead (%s)", claimed.message_id, claimed.endpoint, why)


# --- disabled endpoints ------------------------------------------------------------------------

DISABLED = "webhooks_disabled"  # FederationCache row: {"endpoints": {id: {url, reason, at}}}


def _url_print(endpoint: WebhookEndpoint) -> str:
    """A short digest of the endpoint's URL: a disabled endpoint given a new URL is enabled."""
    return hashlib.sha256(endpoint.url.encode()).hexdigest()[:16]


def disabled_endpoints(db: DBSession, state: State) -> dict[str, str]:
    """The configured endpoints that are disabled (still at the URL that failed): id -> why."""
    row = db.get(FederationCache, DISABLED)
    entries = row.body.get("endpoints", {}) if row is not None else {}
    return {e.id: str(entries[e.id].get("reason", "")) for e in state.settings.webhooks
            if isinstance(entries.get(e.id), dict) and entries[e.id].get("url") == _url_print(e)}


def _enable(db: DBSession, endpoint_id: str, now: dt.datetime) -> None:
    row = db.get(FederationCache, DISABLED)
    entries = dict(row.body.get("endpoints", {})) if row is not None else {}
    if entries.pop(endpoint_id, None) is not None:
        save_cache(db, DISABLED, {"endpoints": entries}, now)
        log.warning("webhook endpoint %s: enabled again", endpoint_id)


def _disable(state: State, endpoint: WebhookEndpoint, reason: str) -> None:
    """Turn an endpoint off: its pending messages die unsent, later ones too (see
    :func:`deliver_due`); the activity log gets ``webhook.disabled``; administrators a mail."""
    from . import events

    now = state.clock()
    with state.session_factory() as db:
        if endpoint.id in disabled_endpoints(db, state):
            return  # another message or worker got there first
        row = db.get(FederationCache, DISABLED)
        entries = dict(row.body.get("endpoints", {})) if row is not None else {}
        entries[endpoint.id] = {"url": _url_print(endpoint), "reason": reason,
                                "at": now.isoformat()}
        save_cache(db, DISABLED, {"endpoints": entries}, now)
        db.execute(
            update(WebhookMessage)
            .where(
                WebhookMessage.endpoint == endpoint.id,
                WebhookMessage.status == "pending",
                or_(WebhookMessage.claimed_until.is_(None), WebhookMessage.claimed_until < now),
            )
            .values(status="dead", last_error=f"endpoint disabled ({reason})"[:_ERROR_LENGTH])
        )
        events.record(db, state, "webhook.disabled", outcome="info",
                      details={"endpoint": endpoint.id, "reason": reason},
                      skip_endpoints={endpoint.id})
        admins = _administrators(db, state)
        db.commit()
    log.warning("webhook endpoint %s: disabled (%s)", endpoint.id, reason)
    site = state.settings.site_name
    for address in admins:
        state.mailer.send_later(
            address,
            f"{site}: webhook endpoint {endpoint.id} disabled",
            f"The webhook endpoint {endpoint.id} of {site} was disabled after {reason}.\n\n"
            "Its pending messages were given up, and no more are sent to it. Once the receiver "
            "works again, redeliver one of its messages (which enables the endpoint again) or "
            "give it a new URL.\n",
        )


def _administrators(db: DBSession, state: State) -> list[str]:
    """The email addresses of the active accounts holding a role of the ``admin`` rule."""
    rule = state.settings.access.get("admin", ("administrator",))
    roles = set(rule) if isinstance(rule, tuple) else {"administrator"}
    # A first cut in SQL: the role as it is written in the stored JSON list (non-ASCII and
    # quotes escaped as json.dumps writes them), with LIKE's wildcards escaped.
    rows = db.execute(select(User.email, User.roles).where(
        User.status == "active",
        or_(*(cast(User.roles, String).contains(json.dumps(role), autoescape=True)
              for role in roles))))
    return [email for email, held in rows if roles & set(held or [])]


class _KeepResponses(urllib.request.HTTPErrorProcessor):
    """Hand every answer back as is: no redirect is followed, no status raises."""

    def http_response(
        self, request: urllib.request.Request, response: http.client.HTTPResponse
    ) -> http.client.HTTPResponse:
        return response

    https_response = http_response


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Belt and braces: should a redirect handler ever be reached, refuse to follow."""

    def redirect_request(self, *args: t.Any, **kwargs: t.Any) -> None:
        return None


def _post(
    endpoint: WebhookEndpoint, claimed: _Claimed, now: dt.datetime, timeout: int
) -> _Outcome:
    """One attempt: sign for ``now``, POST, classify the answer. Never raises for I/O."""
    timestamp = dt.datetime.fromtimestamp(int(now.timestamp()), dt.UTC)
    body = claimed.body.encode()
    request = urllib.request.Request(  # noqa: S310 - the URL is checked to be http(s)
        endpoint.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": claimed.message_id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            # One signature per secret in use: the previous one too during a rotation.
            "webhook-signature": " ".join(
                sign(secret, claimed.message_id, timestamp, claimed.body)
                for secret in endpoint.signing_secrets(now)
            ),
        },
    )
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    deadline = Deadline(timeout)
    try:
        opener = deadline.opener(_KeepResponses(), _NoRedirect())
        with deadline, opener.open(request, timeout=timeout) as response:
            status = int(response.status)
            retry_after = response.headers.get("Retry-After")
            _drain(response, started + timeout)
    except TimeoutError:
        return _Outcome(None, "timeout", elapsed(), timed_out=True)
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError) or deadline.fired:
            return _Outcome(None, "timeout", elapsed(), timed_out=True)
        return _Outcome(None, _error_text(reason), elapsed())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.fired:
            return _Outcome(None, "timeout", elapsed(), timed_out=True)
        return _Outcome(None, _error_text(exc), elapsed())
    if deadline.fired:  # the answer, cut short at the deadline, may have looked complete
        return _Outcome(None, "timeout", elapsed(), timed_out=True)
    error = "" if 200 <= status < 300 else f"HTTP {status}"
    wait = _retry_after(retry_after, now) if status in (429, 503) else None
    return _Outcome(status, error, elapsed(), retry_after=wait)


def _drain(response: http.client.HTTPResponse, deadline: float) -> None:
    """Read a little of the answer (so the connection ends cleanly), never past the deadline."""
    remaining = _RESPONSE_READ_LIMIT
    while remaining > 0 and time.monotonic() < deadline:
        chunk = response.read(min(8192, remaining))
        if not chunk:
            return
        remaining -= len(chunk)


def _error_text(exc: object) -> str:
    """An attempt's error as stored and logged. It may quote the receiver's answer (a status
    line that is no HTTP): control characters are dropped (PostgreSQL text holds no NUL)."""
    text = str(exc) if not isinstance(exc, BaseException) else f"{type(exc).__name__}: {exc}"
    text = text[:4 * _ERROR_LENGTH]
    if holds_controls(text):
        text = "".join(c for c in text if not holds_controls(c))
    return text[:_ERROR_LENGTH]


def _retry_after(value: str | None, now: dt.datetime) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), at most 24 h."""
    if not value:
        return None
    value = value.strip()
    seconds: float
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), float(MAX_RETRY_AFTER))


def _record(
    state: State, claimed: _Claimed, outcome: _Outcome, endpoint: WebhookEndpoint
) -> None:
    """Store the attempt and the message's new state (if our claim still holds); a 410 or a
    message dead after the whole schedule disables the endpoint."""
    now = state.clock()
    values: dict[str, t.Any] = {
        "claimed_until": None,
        "last_status": outcome.status_code,
        "last_error": outcome.error[:_ERROR_LENGTH],
    }
    code = outcome.status_code
    disable = ""  # why this failure disables the endpoint, if it does
    if code is not None and 200 <= code < 300:
        values.update(status="delivered", delivered_at=now)
        verdict = "delivered"
    else:
        attempts = claimed.attempts + 1
        values["attempts"] = attempts
        delay = backoff(attempts)
        if code == 410:
            values["status"] = "dead"
            verdict = "dead (410 Gone)"
            disable = "410 Gone"
        elif delay is None:
            values["status"] = "dead"
            verdict = f"dead after {attempts} attempts"
            disable = f"{attempts} failed attempts over about {sum(SCHEDULE) // 3600} hours"
        else:
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)
            values["next_attempt_at"] = now + dt.timedelta(seconds=delay)
            verdict = f"retry in {int(delay)}s"
    with state.session_factory() as db:
        db.add(
            WebhookAttempt(
                message_id=claimed.id,
                attempted_at=now,
                status_code=code,
                error=outcome.error[:_ERROR_LENGTH],
                duration_ms=outcome.duration_ms,
            )
        )
        kept = rowcount(db.execute(update(WebhookMessage).where(_ours(claimed)).values(**values)))
        db.commit()
    status = code if code is not None else outcome.error
    if not kept:
        log.warning(
            "webhook %s to %s: %s, but the claim had lapsed; another worker owns it now",
            claimed.message_id, claimed.endpoint, status,
        )
    elif verdict == "delivered":
        log.info("webhook %s to %s: %s, delivered", claimed.message_id, claimed.endpoint, status)
    else:
        log.warning(
            "webhook %s to %s: %s, %s", claimed.message_id, claimed.endpoint, status, verdict
        )
        if disable:
            _disable(state, endpoint, disable)
