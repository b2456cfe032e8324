"""Form parsing for the console: the site form and the editable settings.

Plain functions over ``request.form`` values: the site fields are checked by
:func:`hub.services.sites.validate` (one set of rules for the console, the CLI and imports);
the settings are checked here against their bounds. CSRF is checked for every console POST
before a view runs (``CSRFProtect.protect`` in ``views.guard``), so no form class is needed.
"""

from __future__ import annotations

import re
import typing as t
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from ..config import RANGES
from ..models import Setting

if t.TYPE_CHECKING:
    from ..state import HubState

_WHOLE = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class SettingSpec:
    """One console-editable setting: its key (short name), label, unit and bounds."""

    key: str
    label: str
    unit: str
    minimum: int
    maximum: int
    help: str


def _spec(key: str, label: str, unit: str, help: str) -> SettingSpec:
    return SettingSpec(key, label, unit, *RANGES[key], help)


SETTINGS: tuple[SettingSpec, ...] = (
    _spec("KEY_ROTATION_DAYS", "Member key rotation", "days",
          "An active member key older than this is flagged on the dashboard."),
    _spec("HUB_KEY_ROTATION_DAYS", "Hub key rotation", "days",
          "Age at which the hub's own signing key is rotated."),
    _spec("EVENT_RETENTION_DAYS", "Event retention", "days",
          "Federation events older than this are pruned."),
    _spec("SECRET_GRACE", "Secret grace period", "seconds",
          "How long a site's previous secret keeps working after a rotation (60 s to 30 days)."),
)
SPECS = {spec.key: spec for spec in SETTINGS}


def setting_rows(db: DBSession) -> dict[str, Setting]:
    """The stored overrides of the editable settings, by key."""
    rows = db.scalars(select(Setting).where(Setting.key.in_(list(SPECS))))
    return {row.key: row for row in rows}


def effective_settings(db: DBSession, state: HubState) -> dict[str, int]:
    """Each editable setting: its stored override if any, else the configured value."""
    rows = setting_rows(db)
    values: dict[str, int] = {}
    for key in SPECS:
        row = rows.get(key)
        stored = row.value if row is not None else None
        if isinstance(stored, int) and not isinstance(stored, bool):
            values[key] = stored
        else:
            values[key] = int(state.setting(key))
    return values


def parse_settings(form: t.Mapping[str, str]) -> tuple[dict[str, int], dict[str, str]]:
    """The submitted settings as whole numbers, and a message per bad field (none if all good)."""
    values: dict[str, int] = {}
    errors: dict[str, str] = {}
    for spec in SETTINGS:
        raw = (form.get(spec.key) or "").strip()
        if not _WHOLE.fullmatch(raw):
            errors[spec.key] = f"A whole number of {spec.unit}."
            continue
        value = int(raw)
        if not spec.minimum <= value <= spec.maximum:
            errors[spec.key] = f"Between {spec.minimum:,} and {spec.maximum:,} {spec.unit}."
            continue
        values[spec.key] = value
    return values, errors


def lines(value: str | None) -> list[str]:
    """The non-blank lines of a textarea, stripped."""
    return [line.strip() for line in (value or "").splitlines() if line.strip()]


def site_fields(form: t.Mapping[str, str]) -> dict[str, t.Any]:
    """The onboarding form as keyword arguments of :func:`hub.services.sites.add_site`."""
    return {
        "name": (form.get("name") or "").strip(),
        "base_url": (form.get("base_url") or "").strip(),
        "site_key": (form.get("site_key") or "").strip() or None,
        "allowed_origins": lines(form.get("allowed_origins")),
        "redirect_uris": lines(form.get("redirect_uris")),
        "contact": (form.get("contact") or "").strip(),
    }
