"""Form fields of a member site's settings pages (General, Security policy, Algorithms,
Endpoint access, Webhooks) and their parsing into policy changes.

Parsing only turns form text into JSON values; every rule is the agent's
(:func:`agent.policy.validate`, called by :func:`hub.services.policies.save`). An empty field
means "not set by the hub": the site's own value (or the built-in default) applies.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

from agent.config import DEFAULTS
from agent.config import ENDPOINT_ACCESS
from agent.config import WEBHOOK_EVENTS
from agent.policy import GROUPS


@dataclass(frozen=True)
class Field:
    """One setting on a page: its key, label, kind (int, choice, text, bool, origins), help."""

    key: str
    label: str
    kind: str
    help: str
    unit: str = ""
    choices: tuple[str, ...] = ()

    @property
    def default(self) -> str:
        return display(self, DEFAULTS[self.key][0])


FIELDS: dict[str, tuple[Field, ...]] = {
    "general": (
        Field("ACCESS_TOKEN_TTL", "Access token lifetime", "int",
              "Seconds an access token is valid (30 to 86,400).", "seconds"),
        Field("REFRESH_TOKEN_TTL", "Refresh token lifetime", "int",
              "A refresh token unused this long expires (60 s to 365 days).", "seconds"),
        Field("SESSION_MAX_AGE", "Session lifetime", "int",
              "Absolute lifetime of a session, whatever the refreshes.", "seconds"),
        Field("REGISTRATION", "Registration", "choice",
              "Whether anyone may create an account at /register.", choices=("open", "closed")),
        Field("DEFAULT_ROLE", "Default role", "text", "Role given to new accounts."),
        Field("PASSWORD_MIN_LENGTH", "Minimum password length", "int",
              "Characters (6 to 128).", "characters"),
        Field("PASSWORD_MAX_LENGTH", "Maximum password length", "int",
              "Characters (64 to 4,096).", "characters"),
    ),
    "security": (
        Field("LOCKOUT_MAX_FAILURES", "Failures per account", "int",
              "Failed logins of one account within the window before it is locked (1 to 100)."),
        Field("LOCKOUT_IP_MAX_FAILURES", "Failures per IP", "int",
              "Failed logins from one client IP within the window before it is locked."),
        Field("LOCKOUT_WINDOW", "Counting window", "int",
              "Seconds in which failures are counted.", "seconds"),
        Field("LOCKOUT_DURATION", "Lock duration", "int",
              "First lock; doubles on each repeat, at most 24 h.", "seconds"),
        Field("MAX_SESSIONS", "Device limit", "int",
              "Active sessions (devices) per user; 0 means no limit."),
        Field("SESSION_LIMIT_POLICY", "At the device limit", "choice",
              "evict_oldest ends the oldest session; reject refuses the new login.",
              choices=("evict_oldest", "reject")),
        Field("CORS", "CORS origins", "origins",
              "true (any origin, no credentials), false, or allowed origins one per line."),
        Field("TRUSTED_PROXIES", "Trusted proxies", "int",
              "Proxies in front of the site whose X-Forwarded-For is trusted (0 to 10)."),
        Field("SSO_LINK_BY_EMAIL", "Link SSO identities by email", "bool",
              "Link a peer site's identity to a local account with the same verified email."),
    ),
    "algorithms": (
        Field("ALGORITHM", "Token algorithm", "choice",
              "Algorithm of the site's own access tokens. On a switch the site makes a new "
              "key and signs with it; tokens signed before stay valid until they expire.",
              choices=("HS256", "RS256", "ES256")),
    ),
}
ALGORITHMS = ("HS256", "RS256", "ES256")
PAGES = {
    "general": "General",
    "security": "Security policy",
    "algorithms": "Algorithms",
    "access": "Endpoint access",
    "webhooks": "Webhooks",
}
ACCESS_CHOICES = ("public", "authenticated", "roles")
ENDPOINTS = tuple(ENDPOINT_ACCESS)
EVENTS = WEBHOOK_EVENTS
assert {f.key for fields in FIELDS.values() for f in fields} | {"ACCESS", "WEBHOOKS"} == {
    k for keys in GROUPS.values() for k in keys}


def display(field: Field, value: t.Any) -> str:
    """A stored value as the form shows it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if field.kind == "origins" and isinstance(value, list | tuple):
        return "\n".join(value)
    return str(value)


def parse(group: str, form: t.Mapping[str, str]) -> dict[str, t.Any]:
    """The page's fields as policy changes (None: unset, the site's own value applies)."""
    changes: dict[str, t.Any] = {}
    for field in FIELDS[group]:
        raw = (form.get(field.key) or "").strip()
        if not raw:
            changes[field.key] = None
        elif field.kind == "int":
            changes[field.key] = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 10 \
                else raw  # the agent's check names what is wrong with it
        elif field.kind == "origins":
            words = raw.replace(",", " ").split()
            if len(words) == 1 and words[0].lower() in ("true", "false"):
                changes[field.key] = words[0].lower() == "true"
            else:
                changes[field.key] = words
        else:
            changes[field.key] = raw
    return changes


def access_rows(stored: dict[str, t.Any] | None) -> list[dict[str, str]]:
    """One row per endpoint: its built-in rule and the hub's rule (mode + roles), if any."""
    stored = stored or {}
    rows = []
    for endpoint, default in ENDPOINT_ACCESS.items():
        rule = stored.get(endpoint)
        mode = "" if rule is None else rule if isinstance(rule, str) else "roles"
        rows.append({
            "endpoint": endpoint,
            "default": default if isinstance(default, str) else "roles: " + ", ".join(default),
            "mode": mode,
            "roles": ", ".join(rule) if isinstance(rule, list) else "",
        })
    return rows


def parse_access(form: t.Mapping[str, str]) -> tuple[dict[str, t.Any] | None, dict[str, str]]:
    """The access table as an ``ACCESS`` value (None: no rule set), and per-row problems."""
    rules: dict[str, t.Any] = {}
    errors: dict[str, str] = {}
    for endpoint in ENDPOINTS:
        mode = (form.get(f"mode-{endpoint}") or "").strip()
        roles = [r.strip() for r in (form.get(f"roles-{endpoint}") or "").split(",") if r.strip()]
        if not mode:
            continue
        if mode not in ACCESS_CHOICES:
            errors[endpoint] = "Choose public, authenticated or roles."
        elif mode == "roles":
            if not roles:
                errors[endpoint] = "Name at least one role, separated by commas."
            rules[endpoint] = roles
        else:
            rules[endpoint] = mode
    return (rules or None), errors
