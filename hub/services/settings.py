"""Settings an admin can change in the console (``hub_settings``), over the configured values."""

from __future__ import annotations

import logging
import typing as t

from sqlalchemy.orm import Session as DBSession

from ..models import Setting

if t.TYPE_CHECKING:
    from ..state import HubState

log = logging.getLogger(__name__)


def effective(db: DBSession, state: HubState, name: str) -> int:
    """A whole-number setting: the ``hub_settings`` row ``name`` if valid (>= 1), else config.

    ``name`` is the short name (``SECRET_GRACE`` for ``HEADLESSKEY_HUB_SECRET_GRACE``).
    """
    row = db.get(Setting, name)
    if row is not None:
        value = row.value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        log.warning("ignoring hub setting %s=%r (not a whole number >= 1)", name, row.value)
    return int(state.setting(name))
