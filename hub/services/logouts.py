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

from agent.text import holds_controls

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
    if (not isinstance(value, str) or not value.strip() or len(value) > MAX_SUBJECT
            or holds_controls(value)):
        raise BadRequest(fields={"subject": [
            "The user's id at the site (1-255 characters, no control characters)."]})
    return value.strip()


def record(db: DBSession, state: HubState, site: Site, subject: t.Any, *, actor: str,
           via: str, ip: str = "", origin: t.Any = None) -> Logout:
    """Record a logout of ``subject`` at ``site`` (the caller's transaction), logged.

    ``origin``: the id of a listed logout this one passes on (a member ending the sessions of
    an account linked to it); the new row keeps the chain's first logout as its origin and that
    logout's time and expiry, and a site passes a chain on once (the same row is returned).
    """
    now = state.clock()
    subject = clean_subject(subject)
    created, expires, root = now, now + KEEP, None
    if origin is not None:
        first = _listed(db, state, origin)
        root = first.origin_id or first.id
        # Pass-ons of one chain take turns (a lock on its first row), so a retry sent while the
        # first request runs finds its row: apart, both found none and both stored one.
        db.execute(select(Logout.id).where(Logout.id == root).with_for_update())
        again = db.scalar(select(Logout).where(Logout.site_key == site.site_key,
                                               Logout.subject == subject,
                                               Logout.origin_id == root))
        if again is not None:
            return again
        created, expires = first.created_at, first.expires_at
    row = Logout(created_at=created, site_key=site.site_key, issuer=site.issuer,
                 subject=subject, expires_at=expires, origin_id=root)
    db.add(row)
    db.flush()
    details: dict[str, t.Any] = {"subject": row.subject, "via": via, "logout_id": row.id}
    if root is not None:
        details["origin"] = root
    events.log(db, state, "logout.global", actor=actor, site_key=site.site_key, ip=ip,
               details=details)
    return row


def _listed(db: DBSession, state: HubState, value: t.Any) -> Logout:
    """The unexpired logout ``value`` names; else 400 invalid_request."""
    row = None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31:
        row = db.get(Logout, value)
    if row is None or row.expires_at <= state.clock():
        raise BadRequest(fields={"origin": ["The id of a logout the directory lists."]})
    return row


def as_dict(row: Logout) -> dict[str, t.Any]:
    return {"id": row.id, "issuer": row.issuer, "subject": row.subject,
            "site_key": row.site_key, "origin": row.origin_id or row.id,
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
