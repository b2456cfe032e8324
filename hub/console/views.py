"""Blueprint "console": the hub's server-rendered admin console.

How it is kept safe (SECURITY.md §9, B-08 to B-11):

- Every page but the login form needs a signed-in admin. A session idle for longer than
  ``SESSION_IDLE_TIMEOUT`` seconds (by the hub's clock) is ended. Logging in clears the session
  first, so nothing set before the login (a planted session) survives it.
- The session is Flask's signed cookie, keyed by HKDF-SHA256 over the hub's first master key
  (info ``hub-console-session``): ``__Host-hk_console``; Secure; HttpOnly; SameSite=Strict;
  Path=/ and no Domain (``hk_console`` without Secure only for plain-http dev).
- Every POST carries a Flask-WTF CSRF token, and a POST that says it comes from another site
  (``Origin`` or ``Sec-Fetch-Site``) is refused before its token is even read.
- ``GET`` never writes. A site secret appears only in the response to the POST that made it:
  never in a URL, the session, a log line or a later page.
- Pages are plain HTML with one static stylesheet: no inline script or style, so the hub's CSP
  (``script-src 'self'; style-src 'self'; frame-ancestors 'none'``) holds.
"""

from __future__ import annotations

import datetime as dt
import typing as t
from urllib.parse import urlsplit

from flask import Blueprint
from flask import Flask
from flask import Response
from flask import abort
from flask import flash
from flask import g
from flask import make_response
from flask import redirect
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError  # type: ignore[import-untyped]
from flask_wtf.csrf import CSRFProtect
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import HTTPException

from agent.db import MAX_ID
from agent.errors import AgentError

from ..models import Admin
from ..models import Event
from ..models import HubKey
from ..models import Setting
from ..models import Site
from ..models import SiteHealth
from ..models import SiteKey
from ..models import SitePolicy
from ..models import SiteSecret
from ..services import admins
from ..services import events
from ..services import health as health_service
from ..services import keys as key_service
from ..services import logouts as logout_service
from ..services import sites
from ..state import client_ip
from ..state import get_db
from ..state import get_state
from . import forms

bp = Blueprint("console", __name__)
csrf = CSRFProtect()

SESSION_INFO = b"hub-console-session"
COOKIE_NAME = "hk_console"
LOGIN_FAILED = "Invalid username or password."
ADDRESS_BLOCKED = "Too many failed sign-ins from your address. Try again later."
PAGE_SIZE = 50
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ERROR_TEXT = {
    400: ("Bad request", "The request could not be understood."),
    403: ("Forbidden", "That is not allowed."),
    404: ("Not found", "There is no page at this address."),
    405: ("Method not allowed", "This page does not accept that kind of request."),
    413: ("Request too large", "The form sent more data than the hub accepts."),
    500: ("Internal error", "Something went wrong on the hub. Nothing was changed; try again."),
}
# Not an HTTP error handler (a 503 may have other causes): the app's database error handler.
DATABASE_DOWN = ("Database unavailable", "The hub's database cannot be reached just now, so "
                                         "nothing was changed. Try again in a few seconds.")


def init_app(app: Flask) -> None:
    """Configure the session cookie and CSRF protection, then register the blueprint."""
    secure = _flag(get_state(app).setting("SECURE_COOKIES"))
    app.secret_key = session_key(app)
    app.config.update(
        SESSION_COOKIE_NAME=("__Host-" if secure else "") + COOKIE_NAME,
        SESSION_COOKIE_SECURE=secure,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_PATH="/",
        SESSION_COOKIE_DOMAIN=None,  # host-only: a __Host- cookie must not name a Domain
        # CSRF is checked by the console's own before_request only: the signed site API has no
        # cookies, so no browser can be tricked into sending its requests.
        WTF_CSRF_CHECK_DEFAULT=False,
        # Flask-WTF's strict mode wants a Referer on HTTPS, which Referrer-Policy: no-referrer
        # removes; the Origin / Sec-Fetch-Site check in guard() does that job instead.
        WTF_CSRF_SSL_STRICT=False,
    )
    csrf.init_app(app)
    app.register_blueprint(bp)
    for code in ERROR_TEXT:
        app.register_error_handler(code, _http_error_page)


def _flag(value: t.Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def session_key(app: Flask) -> bytes:
    """The session signing key: derived from the current master key, never a constant.

    Rotating the master key ends every console session.
    """
    return get_state(app).vault.derive(SESSION_INFO)


# --- request guard ---------------------------------------------------------------------------


@bp.before_request
def guard() -> ResponseReturnValue | None:
    """Refuse cross-site and token-less POSTs, end idle sessions, require a signed-in admin."""
    if request.method not in SAFE_METHODS:
        _refuse_cross_site()
        csrf.protect()
    g.hub_admin = _signed_in_admin()
    if g.hub_admin is None and request.endpoint != "console.login":
        target = request.full_path.rstrip("?") if request.method == "GET" else None
        return redirect(url_for("console.login", next=target))
    return None


def _own_origins() -> set[str]:
    origins = {request.host_url.rstrip("/").lower()}
    parts = urlsplit(str(get_state().setting("URL")))
    if parts.scheme and parts.netloc:
        origins.add(f"{parts.scheme}://{parts.netloc}".lower())
    return origins


def _refuse_cross_site() -> None:
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site != "same-origin":
        abort(403, description="This form was sent from another site; it was refused.")
    origin = request.headers.get("Origin")
    if origin is None:
        return
    if origin == "null":
        # Under Referrer-Policy: no-referrer a browser sends "Origin: null" even for our own
        # forms; it is accepted only when the browser also vouches for the same origin.
        if fetch_site == "same-origin":
            return
        abort(403, description="This form was sent from an unknown origin; it was refused.")
    if origin.rstrip("/").lower() not in _own_origins():
        abort(403, description="This form was sent from another site; it was refused.")


def _signed_in_admin() -> Admin | None:
    admin_id = session.get("admin_id")
    if not isinstance(admin_id, int):
        return None
    state = get_state()
    now = state.clock().timestamp()
    seen = session.get("seen_at")
    timeout = state.setting("SESSION_IDLE_TIMEOUT")
    if not isinstance(seen, (int, float)) or now - seen > timeout:
        session.clear()
        flash(f"Your session ended after {_duration(timeout)} without activity. "
              "Please sign in again.", "info")
        return None
    admin = get_db().get(Admin, admin_id)
    if admin is None or not admin.active or session.get("epoch") != admin.session_epoch:
        session.clear()
        return None
    session["seen_at"] = now
    return admin


def _ip() -> str:
    return client_ip()


def _actor() -> str:
    admin = g.get("hub_admin")
    return admin.username if admin is not None else ""


def _log(event: str, *, site_key: str | None = None, outcome: str = "success",
         details: dict[str, t.Any] | None = None) -> None:
    events.log(get_db(), get_state(), event, outcome=outcome, actor=_actor(), site_key=site_key,
               ip=_ip(), details=details)


def _commit() -> None:
    """Commit, giving the admin's IP to the events a service logged without one."""
    db = get_db()
    for obj in db.new:
        if isinstance(obj, Event) and obj.source == "hub" and not obj.ip:
            obj.ip = _ip()
    db.commit()


def _safe_next(value: str | None) -> str:
    """A console path to go to after login; anything else (another host) is ignored (B-14)."""
    if (
        isinstance(value, str)
        and len(value) <= 512
        and (value == "/" or value.startswith("/console/"))
        and not value.startswith("/console/login")
        and "//" not in value
        and "\\" not in value
        and value.isprintable()
    ):
        return value
    return url_for("console.dashboard")


# --- login -----------------------------------------------------------------------------------


@bp.route("/console/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    """The login form; the same answer for a wrong password, an unknown name and a lock."""
    next_page = request.values.get("next", "")
    if request.method == "GET":
        if g.hub_admin is not None:
            return redirect(_safe_next(next_page))
        return render_template("console/login.html", username="", error=None, next=next_page)
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    db = get_db()
    state = get_state()
    try:
        admin = admins.authenticate(db, state, username, password, _ip())
    except admins.AddressBlocked:
        return render_template("console/login.html", username=username, error=ADDRESS_BLOCKED,
                               next=next_page), 429, {
            "Retry-After": str(state.setting("ADMIN_LOCK_SECONDS"))}
    except admins.LoginFailed:
        return render_template("console/login.html", username=username, error=LOGIN_FAILED,
                               next=next_page), 200
    db.commit()
    now = state.clock().timestamp()
    session.clear()  # a new session: nothing from before the login is kept
    session.update(admin_id=admin.id, login_at=now, seen_at=now, epoch=admin.session_epoch)
    return redirect(_safe_next(next_page))


def _recent_login(back: str | None = None) -> ResponseReturnValue | None:
    """None when the admin entered the password within ``REAUTH_SECONDS``; else a redirect
    to confirm it, then to ``back``, the page the form was on (by default the site's page, or
    the onboarding form); nothing is done meanwhile."""
    state = get_state()
    login_at = session.get("login_at")
    # Within REAUTH_SECONDS either way: a sign-in stamped ahead by a clock that has been set
    # back since is not recent for as long as the clock had run ahead.
    if isinstance(login_at, (int, float)) and (
            abs(state.clock().timestamp() - login_at) <= state.setting("REAUTH_SECONDS")):
        return None
    site_key = request.view_args.get("site_key") if request.view_args else None
    if back is None:
        back = (url_for("console.site_detail", site_key=site_key) if site_key
                else url_for("console.site_new"))
    flash("Enter your password again to do that.", "info")
    return redirect(url_for("console.reauth", next=back))


@bp.route("/console/reauth", methods=["GET", "POST"])
def reauth() -> ResponseReturnValue:
    """Confirm the signed-in admin's password; failures count towards the lock like logins."""
    next_page = request.values.get("next", "")
    admin = g.hub_admin
    if request.method == "GET":
        return render_template("console/reauth.html", error=None, next=next_page)
    db = get_db()
    state = get_state()
    try:
        admins.authenticate(db, state, admin.username, request.form.get("password", ""), _ip())
    except admins.LoginFailed:
        if (ended := _end_sessions_if_locked(admin)) is not None:
            return ended
        db.commit()  # the failure is counted
        return render_template("console/reauth.html", error=LOGIN_FAILED, next=next_page), 200
    db.commit()
    session["login_at"] = state.clock().timestamp()
    return redirect(_safe_next(next_page))


def _end_sessions_if_locked(admin: Admin) -> ResponseReturnValue | None:
    """After a wrong password at a confirmation: when the admin is locked now, every session
    of theirs ends (this one too) and the answer is the login page; else None (the caller
    commits the counted failure)."""
    state = get_state()
    if not admins.is_locked(state, admin, state.clock()):
        return None
    admin.session_epoch += 1
    _commit()
    session.clear()
    return redirect(url_for("console.login"))


@bp.post("/console/logout")
def logout() -> ResponseReturnValue:
    admin = g.hub_admin
    if admin is not None:
        admin.session_epoch += 1  # every cookie of this admin's sessions stops working
    _log("admin.logout")
    _commit()
    session.clear()
    flash("You are signed out.", "ok")
    return redirect(url_for("console.login"))


# --- dashboard -------------------------------------------------------------------------------


@bp.get("/")
def dashboard() -> ResponseReturnValue:
    """Site counts, member keys due for rotation, the hub key's age, recent events."""
    db = get_db()
    state = get_state()
    now = state.clock()
    settings = forms.effective_settings(db, state)
    counts = dict(db.execute(select(Site.status, func.count()).group_by(Site.status)).all())
    cutoff = now - dt.timedelta(days=settings["KEY_ROTATION_DAYS"])
    due = db.execute(
        select(SiteKey, Site)
        .join(Site, Site.id == SiteKey.site_id)
        .where(SiteKey.status == "active", SiteKey.created_at <= cutoff)
        .order_by(SiteKey.created_at)
    ).all()
    hub_key = db.scalar(select(HubKey).where(HubKey.status == "active").order_by(HubKey.id.desc()))
    recent, _ = events.query(db, limit=10)
    health = health_service.flags(db, state)
    flagged = [(site, health[site.site_key]) for site in sites.list_sites(db)
               if health.get(site.site_key)]
    return render_template(
        "console/dashboard.html",
        flagged=flagged,
        active=counts.get("active", 0),
        suspended=counts.get("suspended", 0),
        due=due,
        hub_key=hub_key,
        settings=settings,
        recent=recent,
        now=now,
    )


# --- sites -----------------------------------------------------------------------------------


@bp.get("/console/sites")
def site_list() -> ResponseReturnValue:
    db = get_db()
    key_counts = dict(db.execute(
        select(SiteKey.site_id, func.count()).where(SiteKey.status != "retired")
        .group_by(SiteKey.site_id)
    ).all())
    policy_versions = dict(db.execute(
        select(SitePolicy.site_id, func.max(SitePolicy.version)).group_by(SitePolicy.site_id)
    ).all())
    reports = {h.site_id: h for h in db.scalars(select(SiteHealth))}
    return render_template("console/sites.html", sites=sites.list_sites(db),
                           key_counts=key_counts, health=health_service.flags(db, get_state()),
                           policy_versions=policy_versions, reports=reports)


@bp.route("/console/sites/new", methods=["GET", "POST"])
def site_new() -> ResponseReturnValue:
    """Onboard a site. The secret is in this POST's response only (no redirect, no session)."""
    if request.method == "GET":
        return render_template("console/site_new.html", values={}, errors={}, message=None)
    if (confirm := _recent_login()) is not None:
        return confirm
    db = get_db()
    state = get_state()
    try:
        onboarded = sites.add_site(db, state, _actor(), **forms.site_fields(request.form))
    except AgentError as exc:
        db.rollback()
        return render_template("console/site_new.html", values=request.form,
                               errors=exc.fields or {}, message=exc.message), exc.status
    _commit()
    return render_template("console/onboarded.html", site=onboarded.site,
                           secret=onboarded.secret, hub_url=state.setting("URL"))


def _site(site_key: str) -> Site:
    """The site a console URL names. A form (POST) locks its row until the change is committed,
    so two admins' changes of one site take turns: the second sees the first's (a site removed
    meanwhile is 404), on any number of workers."""
    if len(site_key) > 64:
        abort(404)
    return sites.get(get_db(), site_key, lock=request.method == "POST")


def _render_site(site: Site, *, status: int = 200, remove_error: str | None = None,
                 logout_error: str | None = None) -> ResponseReturnValue:
    db = get_db()
    state = get_state()
    now = state.clock()
    secrets = db.scalars(
        select(SiteSecret).where(SiteSecret.site_id == site.id)
        .order_by(SiteSecret.version.desc())
    ).all()
    recent, _ = events.query(db, site_key=site.site_key, limit=10)
    return render_template(
        "console/site.html",
        site=site,
        keys=key_service.site_keys(db, site, include_retired=True),
        secrets=secrets,
        recent=recent,
        now=now,
        health=health_service.get(db, site),
        health_flags=health_service.flags_for(db, state, site),
        remove_error=remove_error,
        logout_error=logout_error,
    ), status


@bp.get("/console/sites/<site_key>")
def site_detail(site_key: str) -> ResponseReturnValue:
    return _render_site(_site(site_key))


def _set_status(site_key: str, status: str) -> ResponseReturnValue:
    site = _site(site_key)
    sites.set_status(get_db(), get_state(), site, status, _actor())
    _commit()
    flash(f"{site.name} is now {status}.", "ok")
    return redirect(url_for("console.site_detail", site_key=site.site_key))


@bp.post("/console/sites/<site_key>/suspend")
def site_suspend(site_key: str) -> ResponseReturnValue:
    """Suspend a site: the hub refuses its signed requests until it is resumed."""
    return _set_status(site_key, "suspended")


@bp.post("/console/sites/<site_key>/resume")
def site_resume(site_key: str) -> ResponseReturnValue:
    return _set_status(site_key, "active")


@bp.post("/console/sites/<site_key>/rotate-secret")
def site_rotate_secret(site_key: str) -> ResponseReturnValue:
    """A new secret, shown in this response only; the old one works for the grace period."""
    site = _site(site_key)
    if (confirm := _recent_login()) is not None:
        return confirm
    db = get_db()
    state = get_state()
    grace = forms.effective_settings(db, state)["SECRET_GRACE"]
    secret = sites.rotate_secret(db, state, site, _actor(), grace=grace)
    _commit()
    return render_template("console/rotated.html", site=site, secret=secret, grace=grace,
                           until=state.clock() + dt.timedelta(seconds=grace),
                           hub_url=state.setting("URL"))


@bp.post("/console/sites/<site_key>/logout-user")
def site_logout_user(site_key: str) -> ResponseReturnValue:
    """Log a user of this site out everywhere: a logout row every member applies (24 h)."""
    site = _site(site_key)
    subject = request.form.get("subject", "").strip()
    if not subject or len(subject) > logout_service.MAX_SUBJECT:
        return _render_site(site, status=400,
                            logout_error="Enter the user's id at this site (1-255 characters).")
    logout_service.record(get_db(), get_state(), site, subject, actor=_actor(), via="console",
                          ip=_ip())
    _commit()
    flash(f"User {subject} of {site.name} will be logged out on every site where the identity "
          "is linked, within each site's directory refresh interval.", "ok")
    return redirect(url_for("console.site_detail", site_key=site.site_key))


@bp.post("/console/sites/<site_key>/remove")
def site_remove(site_key: str) -> ResponseReturnValue:
    """Remove a site once the admin has typed its site key; its events stay in the log."""
    site = _site(site_key)
    if (confirm := _recent_login()) is not None:
        return confirm
    if request.form.get("confirm", "").strip() != site.site_key:
        return _render_site(site, status=400,
                            remove_error=f"Type the site key ({site.site_key}) to confirm.")
    name = site.name
    sites.remove(get_db(), get_state(), site, _actor())
    _commit()
    flash(f"{name} ({site_key}) was removed. Its events stay in the activity log.", "ok")
    return redirect(url_for("console.site_list"))


# --- activity --------------------------------------------------------------------------------


@bp.get("/console/activity")
def activity() -> ResponseReturnValue:
    """The federation's events, newest first, filtered by site, event and outcome."""
    db = get_db()
    filters = {
        "site": request.args.get("site", "").strip()[:64],
        "event": request.args.get("event", "").strip()[:48],
        "outcome": request.args.get("outcome", "").strip()[:16],
    }
    raw_before = request.args.get("before", "")
    before = (int(raw_before) if raw_before.isascii() and raw_before.isdigit()
              and len(raw_before) < 19 else None)
    if before is not None and before > MAX_ID:  # every id is below it: the newest page (and
        before = None  # PostgreSQL's 32-bit id column could not even compare with it)
    rows, next_before = events.query(
        db, site_key=filters["site"] or None, event=filters["event"] or None,
        outcome=filters["outcome"] or None, before=before, limit=PAGE_SIZE,
    )
    active: dict[str, t.Any] = {k: v for k, v in filters.items() if v}
    site_keys = set(db.scalars(select(Event.site_key).where(Event.site_key.is_not(None))
                               .distinct()))
    site_keys |= set(db.scalars(select(Site.site_key)))
    return render_template(
        "console/activity.html",
        rows=rows,
        filters=filters,
        older=url_for("console.activity", **active, before=next_before) if next_before else None,
        newest=url_for("console.activity", **active) if before else None,
        event_names=sorted(set(db.scalars(select(Event.event).distinct())) | {filters["event"]}
                           - {""}),
        outcomes=sorted(set(db.scalars(select(Event.outcome).distinct())) | {filters["outcome"]}
                        - {""}),
        site_keys=sorted(site_keys | {filters["site"]} - {""}),
    )


# --- settings --------------------------------------------------------------------------------


@bp.route("/console/settings", methods=["GET", "POST"])
def settings() -> ResponseReturnValue:
    """Rotation periods and retention, stored in hub_settings with who changed them and when."""
    db = get_db()
    state = get_state()
    rows = forms.setting_rows(db)
    current = forms.effective_settings(db, state)
    if request.method == "GET":
        return render_template("console/settings.html", specs=forms.SETTINGS, values=current,
                               rows=rows, errors={})
    values, errors = forms.parse_settings(request.form)
    if errors:
        return render_template("console/settings.html", specs=forms.SETTINGS,
                               values=request.form, rows=rows, errors=errors), 400
    for attempt in (1, 2):
        try:
            changed = _save_settings(values, rows, current)
            break
        except IntegrityError:  # another admin stored a first value of a setting meanwhile
            db.rollback()
            if attempt == 2:
                raise
            rows = forms.setting_rows(db)
            current = forms.effective_settings(db, state)
    flash("Settings saved." if changed else "Nothing changed.", "ok")
    return redirect(url_for("console.settings"))


def _save_settings(values: dict[str, int], rows: dict[str, Setting],
                   current: dict[str, int]) -> dict[str, int]:
    """Store and log the values that differ from ``current``; committed. Returns them."""
    changed = {key: value for key, value in values.items() if value != current[key]}
    now = get_state().clock()
    for key, value in changed.items():
        row = rows.get(key)
        if row is None:
            get_db().add(Setting(key=key, value=value, updated_at=now, updated_by=_actor()))
        else:
            row.value = value
            row.updated_at = now
            row.updated_by = _actor()
    if changed:
        _log("settings.updated",
             details={"changed": {k: {"from": current[k], "to": v} for k, v in changed.items()}})
    _commit()
    return changed


# --- errors ----------------------------------------------------------------------------------


def error_page(status: int, message: str | None = None,
               text: tuple[str, str] | None = None) -> Response:
    """The console's error page (it reads nothing from the database); ``text`` is a (title,
    message) pair in place of the status's own."""
    title, default = text or ERROR_TEXT.get(status, ("Error", "The request failed."))
    return make_response(render_template("console/error.html", status=status, title=title,
                                         message=message or default), status)


@bp.errorhandler(AgentError)
def _service_error(exc: AgentError) -> ResponseReturnValue:
    get_db().rollback()
    return error_page(exc.status, exc.message)


@bp.errorhandler(CSRFError)
def _csrf_error(exc: CSRFError) -> ResponseReturnValue:
    return error_page(403, "This form's security token is missing, wrong or expired, so "
                            "nothing was changed. Go back, reload the page and try again.")


def _http_error_page(exc: HTTPException) -> ResponseReturnValue:
    """HTML error pages for the console; the JSON API and well-known URIs keep JSON errors."""
    from .. import JSON_PREFIXES
    from .. import _http_error

    if request.path.startswith(JSON_PREFIXES):
        return t.cast(ResponseReturnValue, _http_error(exc))
    status = exc.code or 500
    # A description given to abort() is ours to show; werkzeug's stock texts are replaced.
    custom = exc.description if exc.description != type(exc).description else None
    response = error_page(status, custom if status in (400, 403) else None)
    allowed = getattr(exc, "valid_methods", None)
    if allowed:
        response.headers["Allow"] = ", ".join(allowed)
    return response


# --- template helpers ------------------------------------------------------------------------


def _duration(seconds: int | float) -> str:
    seconds = int(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


@bp.context_processor
def _template_context() -> dict[str, t.Any]:
    return {"admin": g.get("hub_admin")}


@bp.app_template_filter("when")
def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@bp.app_template_filter("duration")
def _duration_filter(seconds: int | float) -> str:
    return _duration(seconds)


@bp.app_template_filter("age_days")
def _age_days(value: dt.datetime) -> int:
    return max(0, (get_state().clock() - value).days)


from . import policy_views  # noqa: E402,F401  (registers the site settings pages on bp)
