"""Console pages of a member site's settings: General, Security policy, Algorithms, Endpoint
access, Webhooks, and the history with rollback (hub.services.policies).

Registered on the console blueprint, so the guard (signed-in admin, CSRF, same origin) runs
first. A refused change re-renders the page with a message per field and saves nothing.
"""

from __future__ import annotations

import typing as t

from flask import abort
from flask import flash
from flask import g
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from flask.typing import ResponseReturnValue

from agent.config import WEBHOOK_EVENTS

from ..models import Site
from ..services import admins
from ..services import health as health_service
from ..services import policies
from ..state import get_db
from ..state import get_state
from . import policy_forms as pf
from .views import _actor
from .views import _commit
from .views import _end_sessions_if_locked
from .views import _ip
from .views import _recent_login
from .views import _site
from .views import bp


def _context(site: Site) -> dict[str, t.Any]:
    db = get_db()
    row = policies.current(db, site)
    return {
        "site": site,
        "pages": pf.PAGES,
        "row": row,
        "stored": policies.redacted(row.settings) if row is not None else {},
        "health": health_service.get(db, site),
    }


def _render(site: Site, group: str, *, values: t.Mapping[str, t.Any] | None = None,
            errors: dict[str, list[str]] | None = None, message: str | None = None,
            status: int = 200, secret: str | None = None) -> ResponseReturnValue:
    context = _context(site)
    stored = context["stored"]
    fields = pf.FIELDS.get(group, ())
    shown = values if values is not None else {
        f.key: pf.display(f, stored.get(f.key)) for f in fields}
    return render_template(
        "console/site_settings.html", group=group, fields=fields, values=shown,
        errors=errors or {}, message=message, secret=secret,
        access_rows=pf.access_rows(stored.get("ACCESS")), endpoints=pf.ENDPOINTS,
        webhook_events=WEBHOOK_EVENTS, hooks=stored.get("WEBHOOKS", []), **context,
    ), status


def _saved(site: Site, group: str, row: t.Any) -> ResponseReturnValue:
    _commit()
    if row is None:
        flash("Nothing changed.", "info")
    else:
        flash(f"Saved as version {row.version}. {site.name} applies it at its next directory "
              "refresh.", "ok")
    return redirect(url_for("console.site_settings", site_key=site.site_key, group=group))


@bp.route("/console/sites/<site_key>/settings/<group>", methods=["GET", "POST"])
def site_settings(site_key: str, group: str) -> ResponseReturnValue:
    """One settings page of a site; a POST saves a new version of its policy."""
    if group not in pf.PAGES:
        abort(404)
    site = _site(site_key)
    if request.method == "GET":
        return _render(site, group)
    if group == "webhooks":
        abort(405)
    db = get_db()
    note = (request.form.get("note") or "").strip()
    if group == "access":
        rules, problems = pf.parse_access(request.form)
        if problems:
            return _render(site, group, errors={k: [v] for k, v in problems.items()},
                           message="Some rules are incomplete; nothing was saved.", status=400)
        changes: dict[str, t.Any] = {"ACCESS": rules}
    else:
        changes = pf.parse(group, request.form)
    wanted = changes.get("ALGORITHM")
    if group == "algorithms" and wanted in (None, *pf.ALGORITHMS) \
            and wanted != _algorithm_of(site):
        # RFC 8725 §3.1: a switch retires the signing key; only the admin, not a session
        # left open, may do that.
        if not admins.confirm(db, get_state(), g.hub_admin, request.form.get("password", ""),
                              _ip()):
            if (ended := _end_sessions_if_locked(g.hub_admin)) is not None:
                return ended
            _commit()  # the failure is counted
            return _render(site, group, values=request.form, status=403,
                           errors={"password": ["Your password is needed for this change."]},
                           message="Confirm the algorithm change with your password; "
                           "nothing was saved.")
    try:
        row = policies.save(db, get_state(), site, changes, actor=_actor(), note=note)
    except policies.PolicyRefused as exc:
        db.rollback()
        return _render(site, group, values=request.form, errors=exc.fields or {},
                       message=exc.message, status=400)
    return _saved(site, group, row)


def _algorithm_of(site: Site) -> t.Any:
    """The access-token algorithm the hub has set for ``site`` (None: the site's own)."""
    row = policies.current(get_db(), site)
    return (row.settings or {}).get("ALGORITHM") if row is not None else None


@bp.post("/console/sites/<site_key>/settings/webhooks/add")
def site_webhook_add(site_key: str) -> ResponseReturnValue:
    """Add an endpoint; its secret is in this response only, so the admin's password must
    have been entered recently, as for a site secret."""
    site = _site(site_key)
    if (confirm := _recent_login(url_for("console.site_settings", site_key=site.site_key,
                                         group="webhooks"))) is not None:
        return confirm
    db = get_db()
    url = (request.form.get("url") or "").strip()
    chosen = [e for e in request.form.getlist("events") if e]
    try:
        _row, secret = policies.add_webhook(db, get_state(), site, url, chosen, actor=_actor())
    except policies.PolicyRefused as exc:
        db.rollback()
        return _render(site, "webhooks", values={"url": url}, errors=exc.fields or {},
                       message=exc.message, status=400)
    _commit()
    return _render(site, "webhooks", secret=secret)


@bp.post("/console/sites/<site_key>/settings/webhooks/<endpoint_id>/remove")
def site_webhook_remove(site_key: str, endpoint_id: str) -> ResponseReturnValue:
    site = _site(site_key)
    row = policies.remove_webhook(get_db(), get_state(), site, endpoint_id[:64], actor=_actor())
    return _saved(site, "webhooks", row)


@bp.post("/console/sites/<site_key>/settings/webhooks/redeliver")
def site_webhook_redeliver(site_key: str) -> ResponseReturnValue:
    site = _site(site_key)
    message_id = (request.form.get("message_id") or "").strip()
    policies.request_redelivery(get_db(), get_state(), site, message_id, actor=_actor())
    _commit()
    flash(f"{site.name} delivers message {message_id} again at its next directory refresh.",
          "ok")
    return redirect(url_for("console.site_settings", site_key=site.site_key, group="webhooks"))


@bp.get("/console/sites/<site_key>/settings-history")
def site_settings_history(site_key: str) -> ResponseReturnValue:
    """Every version of the site's policy: who, when, note, and what changed."""
    site = _site(site_key)
    rows = policies.history(get_db(), site)
    changes = []
    for index, row in enumerate(rows):
        before = rows[index + 1].settings if index + 1 < len(rows) else {}
        changes.append(policies.diff(before, row.settings))
    pairs = list(zip(rows, changes, strict=True))
    return render_template("console/site_history.html", rows=pairs, **_context(site))


@bp.post("/console/sites/<site_key>/settings-history/rollback")
def site_settings_rollback(site_key: str) -> ResponseReturnValue:
    """A new version equal to an earlier one."""
    site = _site(site_key)
    raw = request.form.get("version", "")
    if not (raw.isascii() and raw.isdigit() and len(raw) < 10):
        abort(400, description="Choose a version to roll back to.")
    target = policies.version(get_db(), site, int(raw))
    if (target.settings or {}).get("ALGORITHM") != _algorithm_of(site):
        flash("That version has another token algorithm: change it on the Algorithms page, "
              "which asks for your password.", "error")
        return redirect(url_for("console.site_settings_history", site_key=site.site_key))
    row = policies.rollback(get_db(), get_state(), site, int(raw), actor=_actor())
    _commit()
    if row is None:
        flash(f"Version {raw} is already in force.", "info")
    else:
        flash(f"Rolled back: version {row.version} equals version {raw}.", "ok")
    return redirect(url_for("console.site_settings_history", site_key=site.site_key))
