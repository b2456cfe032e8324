"""Fleet health: what each member's agent last reported, and the problems it shows.

An agent reports every minute (``POST /api/v1/health``): its version, its clock, the kid of its
federation key, its last successful SSO exchange and its last directory sync. The hub keeps the
last report of each site (``hub_site_health``) and flags an active site when

- **clock drift**: the agent's clock is more than 30 s away from the hub's;
- **not synced**: it never reported, its last report or its last directory sync is more than
  15 minutes old (or it never synced);
- **key overdue**: its active federation key is older than the *Member key rotation* setting
  (``KEY_ROTATION_DAYS``), or the key it reports is not one of its registered, unretired keys.

Suspended sites are not checked: the hub refuses their requests anyway.
"""

from __future__ import annotations

import datetime as dt
import typing as t

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession

from ..errors import BadRequest
from ..models import Site
from ..models import SiteHealth
from ..models import SiteKey
from . import events
from . import settings as settings_service

if t.TYPE_CHECKING:
    from ..state import HubState

CLOCK_DRIFT = "clock drift"
NOT_SYNCED = "not synced"
KEY_OVERDUE = "key overdue"
MAX_SKEW = 30.0  # seconds, either way
SYNC_STALE = dt.timedelta(minutes=15)


def _time(data: dict[str, t.Any], name: str, *, required: bool = False) -> dt.datetime | None:
    value = data.get(name)
    if value is None and not required:
        return None
    try:
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError(name)
        return events.utc_time(value)
    except ValueError:
        raise BadRequest(fields={name: ["ISO 8601 time" + ("." if required else " or null.")]}
                         ) from None


def _text(data: dict[str, t.Any], name: str, limit: int, *, required: bool = False) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable() or (
            required and not value):
        raise BadRequest(fields={name: [f"Up to {limit} printable characters."]})
    return value


LOG_FIELDS = {"message_id": 64, "endpoint": 64, "event": 48, "status": 16, "last_error": 200,
              "created_at": 64, "delivered_at": 64}
MAX_LOG = 50


def _policy_fields(data: dict[str, t.Any]) -> dict[str, t.Any]:
    """The policy version applied, the pinned keys, a refused policy and the delivery log.

    All optional (an older agent sends none); every value is checked and bounded, since the
    console shows them.
    """
    from agent.policy import MANAGED

    version = data.get("policy_version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                or not 0 <= version < 2**31):
        raise BadRequest(fields={"policy_version": ["A whole number or null."]})
    pinned = data.get("pinned", [])
    if not isinstance(pinned, list) or not all(p in MANAGED for p in pinned):
        raise BadRequest(fields={"pinned": ["A list of managed setting names."]})
    error = data.get("policy_error")
    if error is not None:
        ok = (isinstance(error, dict) and isinstance(error.get("version"), int)
              and isinstance(error.get("errors"), dict)
              and all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64
                      and len(v) <= 300 for k, v in error["errors"].items())
              and len(error["errors"]) <= 50)
        if not ok:
            raise BadRequest(fields={"policy_error": ["{version, errors: {key: message}}."]})
        error = {"version": error["version"], "errors": error["errors"]}
    log = data.get("webhook_log", [])
    if not isinstance(log, list) or len(log) > MAX_LOG:
        raise BadRequest(fields={"webhook_log": [f"A list of at most {MAX_LOG} deliveries."]})
    entries = []
    for item in log:
        if not isinstance(item, dict):
            raise BadRequest(fields={"webhook_log": ["Each delivery is an object."]})
        entry: dict[str, t.Any] = {}
        for name, limit in LOG_FIELDS.items():
            value = item.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > limit):
                raise BadRequest(fields={"webhook_log": [f"{name}: up to {limit} characters."]})
            entry[name] = value
        for name in ("attempts", "last_status"):
            value = item.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise BadRequest(fields={"webhook_log": [f"{name}: a whole number."]})
            entry[name] = value
        entries.append(entry)
    return {"policy_version": version, "pinned": sorted(set(pinned)), "policy_error": error,
            "webhook_log": entries}


def store(db: DBSession, state: HubState, site: Site, data: dict[str, t.Any]) -> SiteHealth:
    """Validate one report and keep it as the site's last (clock skew = agent − hub time)."""
    agent_time = _time(data, "time", required=True)
    assert agent_time is not None
    values: dict[str, t.Any] = {
        "agent_version": _text(data, "version", 64, required=True),
        "key_fingerprint": _text(data, "key_fingerprint", 128),
        "last_exchange_at": _time(data, "last_exchange_at"),
        "last_sync_at": _time(data, "last_sync_at"),
        **_policy_fields(data),
    }
    now = state.clock()
    values["reported_at"] = now
    values["clock_skew_seconds"] = round((agent_time - now).total_seconds(), 3)
    for attempt in (1, 2):
        row = db.get(SiteHealth, site.id)
        if row is None:
            row = SiteHealth(site_id=site.id, **values)
            db.add(row)
        else:
            for name, value in values.items():
                setattr(row, name, value)
        try:
            db.flush()
        except IntegrityError:  # another worker stored this site's first report meanwhile
            db.rollback()
            if attempt == 2:
                raise
            continue
        return row
    raise AssertionError("unreachable")


def get(db: DBSession, site: Site) -> SiteHealth | None:
    return db.get(SiteHealth, site.id)


def site_flags(site: Site, health: SiteHealth | None, keys: t.Iterable[SiteKey],
               now: dt.datetime, rotation_days: int) -> list[str]:
    """The problems of one site, given its last report and its unretired keys."""
    if site.status != "active":
        return []
    keys = list(keys)
    found: list[str] = []
    if health is not None and abs(health.clock_skew_seconds) > MAX_SKEW:
        found.append(CLOCK_DRIFT)
    if (health is None or health.last_sync_at is None or now - health.reported_at > SYNC_STALE
            or now - health.last_sync_at > SYNC_STALE):
        found.append(NOT_SYNCED)
    cutoff = now - dt.timedelta(days=rotation_days)
    old_key = any(k.status == "active" and k.created_at <= cutoff for k in keys)
    unknown_key = health is not None and health.key_fingerprint not in {
        k.kid for k in keys if k.status != "retired"}
    if old_key or unknown_key:
        found.append(KEY_OVERDUE)
    return found


def flags(db: DBSession, state: HubState) -> dict[str, list[str]]:
    """Every site's problems by site key (an empty list for a healthy or suspended site)."""
    now = state.clock()
    days = settings_service.effective(db, state, "KEY_ROTATION_DAYS")
    reports = {h.site_id: h for h in db.scalars(select(SiteHealth))}
    keys: dict[int, list[SiteKey]] = {}
    for key in db.scalars(select(SiteKey).where(SiteKey.status != "retired")):
        keys.setdefault(key.site_id, []).append(key)
    return {site.site_key: site_flags(site, reports.get(site.id), keys.get(site.id, []), now, days)
            for site in db.scalars(select(Site).order_by(Site.name))}


def flags_for(db: DBSession, state: HubState, site: Site) -> list[str]:
    """One site's problems (see :func:`flags`)."""
    keys = db.scalars(select(SiteKey).where(SiteKey.site_id == site.id,
                                            SiteKey.status != "retired"))
    return site_flags(site, get(db, site), keys, state.clock(),
                      settings_service.effective(db, state, "KEY_ROTATION_DAYS"))
