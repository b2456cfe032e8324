"""``POST /api/v1/health``: a member's agent reports its health (see :mod:`hub.services.health`).

Registered on the signed site API blueprint, so the caller is verified before this runs.
"""

from __future__ import annotations

from flask import Response
from flask import g
from flask import jsonify

from ..services import health as health_service
from ..state import get_db
from ..state import get_state
from . import _json
from . import bp


@bp.post("/health")
def report_health() -> Response:
    """Store ``{version, time, key_fingerprint, last_exchange_at, last_sync_at}``.

    Answers ``{"clock_skew_seconds": agent − hub, "flags": [...]}``: the site's problems as the
    console shows them.
    """
    db = get_db()
    state = get_state()
    health = health_service.store(db, state, g.hub_site, _json())
    db.commit()
    return jsonify({"clock_skew_seconds": health.clock_skew_seconds,
                    "flags": health_service.flags_for(db, state, g.hub_site)})
