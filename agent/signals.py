"""Blinker signals, one per auth event, sent after the event's transaction committed.

Connect a receiver to react in-process::

    from agent.signals import login_succeeded

    @login_succeeded.connect
    def on_login(sender, event):      # sender: the Flask app; event: agent.events.Event
        print(event.user_id, event.ip)

Every signal carries the same :class:`agent.events.Event` (name, outcome, user, IP, device,
details). ``any_event`` is sent for every event as well.
"""

from __future__ import annotations

from blinker import Namespace

from .config import WEBHOOK_EVENTS

_signals = Namespace()

any_event = _signals.signal("any-event")
login_succeeded = _signals.signal("login.succeeded")
login_failed = _signals.signal("login.failed")
lockout_started = _signals.signal("lockout.started")
user_registered = _signals.signal("user.registered")
user_unlocked = _signals.signal("user.unlocked")
user_disabled = _signals.signal("user.disabled")
user_enabled = _signals.signal("user.enabled")
user_roles_changed = _signals.signal("user.roles_changed")
token_refreshed = _signals.signal("token.refreshed")
token_reuse_detected = _signals.signal("token.reuse_detected")
token_revoked = _signals.signal("token.revoked")
password_reset_requested = _signals.signal("password.reset_requested")
password_reset = _signals.signal("password.reset")
password_changed = _signals.signal("password.changed")
session_evicted = _signals.signal("session.evicted")
session_ended = _signals.signal("session.ended")
session_limit_reached = _signals.signal("session.limit_reached")
sso_issued = _signals.signal("sso.issued")
sso_exchanged = _signals.signal("sso.exchanged")
sso_rejected = _signals.signal("sso.rejected")
webhook_disabled = _signals.signal("webhook.disabled")
key_rotated = _signals.signal("key.rotated")

BY_EVENT = {name: _signals.signal(name) for name in WEBHOOK_EVENTS}
