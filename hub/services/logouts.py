"""Logout everywhere (issue 5 item 6): the hub's list of identities to log out on every site.

A row names an identity as its own site knows it: (issuer, subject) = the site's registered
issuer and the user's id there. A site can only record its own identities (the issuer comes
from the signed caller, never from the request body); an admin can record one for any site from
the console. Every directory carries the unexpired rows; each member applies those matching an
identity link of its own.
"""

from __future__ import annotations

import datetime as dt
import typing as t

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from ..errors import BadRequest
from ..models import Logout
from ..models import Site
from . import events

if t.TYPE_CHECKING:
    from ..state import HubState

KEEP = dt.timedelta(hours=24)
MAX_SUBJECT = 255


def clean_subject(value: t.Any) -> str:
    """A user id as a string (an integer is accepted too); else 400 invalid_request."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_SUBJECT:
        raise BadRequest(fields={"subject": ["The user's id at the site (1-255 characters)."]})
    return value.strip()


def record(db: DBSession, state: HubState, site: Site, subject: t.Any, *, actor: str,
           via: str, ip: str = "") -> Logout:
    """Record a logout of ``subject`` at ``site`` (the caller's transaction), logged."""
    now = state.clock()
    row = Logout(created_at=now, site_key=site.site_key, issuer=site.issuer,
                 subject=clean_subject(subject), expires_at=now + KEEP)
    db.add(row)
    db.flush()
    events.log(db, state, "logout.global", actor=actor, site_key=site.site_key, ip=ip,
               details={"subject": row.subject, "via": via, "logout_id": row.id})
    return row


def as_dict(row: Logout) -> dict[str, t.Any]:
    return {"id": row.id, "issuer": row.issuer, "subject": row.subject,
            "site_key": row.site_key,
            "created_at": row.created_at.isoformat().replace("+00:00", "Z")}


def active(db: DBSession, state: HubState) -> list[dict[str, t.Any]]:
    """Every unexpired logout, oldest first."""
    rows = db.scalars(select(Logout).where(Logout.expires_at > state.clock())
                      .order_by(Logout.id))
    return [as_dict(r) for r in rows]


def prune(db: DBSession, state: HubState) -> int:
    """Delete logouts no directory lists any more (past their 24 h); returns how many."""
    from sqlalchemy import delete

    from agent.db import rowcount

    return rowcount(db.execute(delete(Logout).where(Logout.expires_at <= state.clock())))
