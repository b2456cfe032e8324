"""The site policy a federation hub manages: which settings, their checks, and the overlay.

An admin sets a member site's policy in the hub console; the hub serves it, versioned, in the
site's HMAC-signed directory (``"policy": {"version": 7, "settings": {...}}``). The agent checks
it with the very rules that check ``site.toml`` (:data:`agent.config.CHECKS`; the hub imports
:func:`validate` from here, so there is one copy of the rules), keeps the last good one in the
``hk_federation_cache`` row ``policy`` (every worker reads it from there) and reads its settings
per request from an overlay:

    built-in defaults  <  hub policy  <  the site's own values (pinned)

**Pinned**: every managed key set explicitly in the site's own configuration (``site.toml``,
a ``HEADLESSKEY_*`` environment variable, or the host app's ``app.config``) is pinned: the
site's value wins and the hub's is ignored. To let the hub manage a key, remove it from the
site's configuration. The agent reports the version it applied and its pinned keys in its
health report; a policy that fails a check is not applied (the last good one stays) and the
refusal is reported too.

A site with no hub reads its configuration alone, as before.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import typing as t
from dataclasses import dataclass

from flask import g
from flask import has_app_context
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session as DBSession

from . import config as config_module
from .errors import ConfigError
from .models import FederationCache
from .models import save_cache

if t.TYPE_CHECKING:
    from .extension import State

log = logging.getLogger(__name__)

PREFIX = config_module.PREFIX
POLICY_ROW = "policy"  # hk_federation_cache row: the last policy applied
CHECK_INTERVAL = 1.0  # seconds a worker trusts its copy before looking at the row again

# The settings a hub manages, by console page.
GROUPS: dict[str, tuple[str, ...]] = {
    "general": (
        "ACCESS_TOKEN_TTL", "REFRESH_TOKEN_TTL", "SESSION_MAX_AGE", "REGISTRATION",
        "DEFAULT_ROLE", "PASSWORD_MIN_LENGTH", "PASSWORD_MAX_LENGTH",
    ),
    "security": (
        "LOCKOUT_MAX_FAILURES", "LOCKOUT_IP_MAX_FAILURES", "LOCKOUT_WINDOW", "LOCKOUT_DURATION",
        "MAX_SESSIONS", "SESSION_LIMIT_POLICY", "CORS", "TRUSTED_PROXIES", "SSO_LINK_BY_EMAIL",
    ),
    "algorithms": ("ALGORITHM",),
    "access": ("ACCESS",),
    "webhooks": ("WEBHOOKS",),
}
MANAGED: tuple[str, ...] = tuple(key for keys in GROUPS.values() for key in keys)


class PolicyError(ValueError):
    """A policy fails a check; ``fields`` maps each bad key to a message for a person."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))
        self.fields = fields


def _message(key: str, exc: ConfigError) -> str:
    text = str(exc)
    # "HEADLESSKEY_ACCESS_TOKEN_TTL: must be ..." -> "must be ..." (the form names the field);
    # "HEADLESSKEY_WEBHOOKS[0].url: ..." keeps its "WEBHOOKS[0].url" part.
    head = PREFIX + key + ": "
    return text[len(head):] if text.startswith(head) else text.removeprefix(PREFIX)


def canonical(key: str, checked: t.Any) -> t.Any:
    """A checked value (:data:`agent.config.CHECKS`) back in plain JSON form."""
    if key == "CORS":
        return checked if isinstance(checked, bool) else list(checked)
    if key == "ACCESS":
        return {name: rule if isinstance(rule, str) else list(rule)
                for name, rule in checked.items()}
    if key == "WEBHOOKS":
        return [{"id": e.id, "url": e.url, "secret": e.secret, "events": sorted(e.events)}
                for e in checked]
    return checked


def validate(values: t.Any) -> dict[str, t.Any]:
    """Check a (partial) policy with the agent's own rules; return it in canonical JSON form.

    Raises :class:`PolicyError` naming every bad key; nothing is half accepted.
    """
    if not isinstance(values, dict):
        raise PolicyError({"settings": "expected a table of setting = value"})
    errors: dict[str, str] = {}
    out: dict[str, t.Any] = {}
    for key, value in values.items():
        if key not in MANAGED:
            errors[str(key)[:64]] = "not a setting the hub manages"
            continue
        try:
            out[key] = canonical(key, config_module.CHECKS[key](PREFIX + key, value))
        except ConfigError as exc:
            errors[key] = _message(key, exc)
            continue
        if key == "ACCESS":  # keep only the rules given: the others stay the built-in ones
            given = config_module.json_value(PREFIX + key, value)
            out[key] = {name: rule for name, rule in out[key].items() if name in given}
    if "DEFAULT_ROLE" in out:
        admin = (out.get("ACCESS") or {}).get("admin", config_module.ENDPOINT_ACCESS["admin"])
        try:
            config_module.check_default_role(out["DEFAULT_ROLE"], admin)
        except ConfigError as exc:
            errors["DEFAULT_ROLE"] = _message("DEFAULT_ROLE", exc)
    low, high = out.get("PASSWORD_MIN_LENGTH"), out.get("PASSWORD_MAX_LENGTH")
    if low is not None and high is not None and low > high:
        errors["PASSWORD_MIN_LENGTH"] = (
            "must not be above the maximum length"  # noqa: S105 - an error message, no password
        )
    if errors:
        raise PolicyError(errors)
    return out


def pinned(state: State) -> tuple[str, ...]:
    """The managed keys the site sets itself (file, environment or app.config): they win."""
    return tuple(k for k in MANAGED if state.configured.get(PREFIX + k) is not None)


@dataclass(frozen=True)
class _Copy:
    version: int | None
    settings: config_module.Settings
    checked_at: float


def stored(db: DBSession) -> dict[str, t.Any]:
    """The ``policy`` row: ``{version, settings, applied_at, rejected?}`` (``{}`` if none)."""
    row = db.get(FederationCache, POLICY_ROW)
    return dict(row.body) if row is not None else {}


def read(state: State) -> dict[str, t.Any]:
    """The ``policy`` row as committed, read on a read-only connection of its own: it never
    waits for a writer (SQLite WAL), not even one held by a session of this very thread."""
    with state.engine.connect().execution_options(hk_readonly=True) as conn:
        found = conn.execute(select(FederationCache.body)
                             .where(FederationCache.name == POLICY_ROW)).scalar()
    return dict(found) if found is not None else {}


def overlay(state: State, values: t.Mapping[str, t.Any]) -> config_module.Settings:
    """The site's settings with the policy ``values`` under its pinned keys."""
    keep = set(pinned(state))
    merged = {PREFIX + k: v for k, v in values.items()
              if k in MANAGED and k not in keep and k != "ALGORITHM"}
    merged.update(state.configured)
    settings = config_module.build_settings(merged, state.instance_path)
    algorithm = values.get("ALGORITHM")
    if algorithm in config_module.ALGORITHMS and "ALGORITHM" not in keep:
        # The signing key is not a setting: a switch is carried out by the key ring (see
        # apply), which keeps the old key for verification; the setting says what is wanted.
        settings = dataclasses.replace(settings, algorithm=algorithm)
    return settings


def effective(state: State) -> config_module.Settings:
    """The settings in force: read once per request (or job run), at most once a second from
    the database per process, rebuilt only when the applied version changes."""
    base = state.base_settings
    if not base.federated:
        return base
    in_context = has_app_context()
    if in_context:
        cached = g.get("_headlesskey_settings")
        if cached is not None:
            return t.cast(config_module.Settings, cached)
    copy: _Copy | None = getattr(state, "_policy_copy", None)
    now = time.monotonic()
    if copy is None or now - copy.checked_at >= CHECK_INTERVAL:
        copy = _reload(state, copy, now)
    if in_context:
        g._headlesskey_settings = copy.settings
    return copy.settings


def _reload(state: State, copy: _Copy | None, now: float) -> _Copy:
    try:
        body = read(state)
    except SQLAlchemyError:
        log.warning("policy: the database did not answer; keeping the settings in force")
        body = None
    if body is None:
        fresh = copy or _Copy(None, state.base_settings, now)
    elif copy is not None and copy.version == body.get("version"):
        fresh = _Copy(copy.version, copy.settings, now)
    else:
        try:
            settings = overlay(state, body.get("settings") or {})
        except ConfigError as exc:  # checked before it was stored; a bug if it happens
            log.error("policy version %s not applicable: %s", body.get("version"), exc)
            settings = state.base_settings
        fresh = _Copy(body.get("version"), settings, now)
    state._policy_copy = fresh  # type: ignore[attr-defined]
    return fresh


def forget(state: State) -> None:
    """Drop this process's copy (the next read goes to the database)."""
    state._policy_copy = None  # type: ignore[attr-defined]
    if has_app_context():
        g.pop("_headlesskey_settings", None)


def apply(db: DBSession, state: State, directory: dict[str, t.Any]) -> bool:
    """Store the directory's policy if it is new and passes every check; True if it changed.

    A policy that fails a check is not applied: the last good one stays in force, and the
    refusal is kept in the row (``rejected``) for the health report.
    """
    doc = directory.get("policy")
    if not isinstance(doc, dict):
        return False  # a hub that manages no policy
    version, values = doc.get("version"), doc.get("settings")
    if not isinstance(version, int) or isinstance(version, bool):
        return False
    current = stored(db)
    if current.get("version") == version and "rejected" not in current:
        return False
    now = state.clock()
    when = now.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    try:
        checked = validate(values)
        _applicable(state, checked)
    except PolicyError as exc:
        if current.get("rejected", {}).get("version") != version:
            log.warning("policy version %s refused: %s", version, exc)
        body = dict(current, rejected={"version": version, "errors": exc.fields, "at": when})
        save_cache(db, POLICY_ROW, body, now)
        db.commit()
        return False
    save_cache(db, POLICY_ROW, {"version": version, "settings": checked, "applied_at": when}, now)
    db.commit()
    forget(state)
    log.info("policy version %s applied (%s)", version, ", ".join(sorted(checked)) or "empty")
    return True


def _applicable(state: State, checked: dict[str, t.Any]) -> None:
    """Raise :class:`PolicyError` when ``checked``, under the site's pinned values, makes no
    settings (the site's own ``DEFAULT_ROLE`` among the policy's admin roles, say): each key
    passed on its own, but such a policy would not be in force."""
    try:
        overlay(state, checked)
    except ConfigError as exc:
        key = str(exc).partition(":")[0].removeprefix(PREFIX) or "settings"
        raise PolicyError({key: _message(key, exc)}) from None


def ensure_algorithm(state: State) -> bool:
    """Switch the access-token key when the algorithm in force is not the newest key's.

    The new key is made by :func:`agent.services.keystore.rotate_local`: published at once,
    signing after the publication delay, while the old key verifies until its last token has
    expired. One process makes it however many try (the rotation claims the current key).
    True if this call made the key.
    """
    from .services import keystore

    wanted = state.settings.algorithm
    current = state.keys.newest(keystore.ACCESS)
    if current is None or current.key is None or current.key.alg == wanted:
        return False
    made = keystore.rotate_local(state.keys, wanted)
    if made is not None:
        log.info("access-token algorithm switched from %s to %s (new key %s)",
                 current.key.alg, wanted, made.kid)
    return made is not None


def report(state: State) -> dict[str, t.Any]:
    """What the health report says about the policy: applied version, pinned keys, refusal."""
    body = read(state)
    rejected = body.get("rejected")
    return {
        "policy_version": body.get("version"),
        "pinned": list(pinned(state)),
        "policy_error": rejected if isinstance(rejected, dict) else None,
    }
