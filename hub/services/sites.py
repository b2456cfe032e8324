"""The site registry: onboarding, status, versioned HMAC secrets, import from TOML."""

from __future__ import annotations

import datetime as dt
import re
import tomllib
import typing as t
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession

from agent.db import rowcount
from agent.text import holds_controls

from ..crypto import new_site_secret
from ..errors import BadRequest
from ..errors import Conflict
from ..errors import NotFound
from ..models import Site
from ..models import SiteSecret
from . import events

if t.TYPE_CHECKING:
    from ..state import HubState

_SITE_KEY = re.compile(r"[a-z0-9][a-z0-9-]{1,63}")
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
ISSUER_MAX = 255  # the length of the (issuer, subject) keys members store
REGISTRY_LOCK = 0x686B5F7369746573  # PostgreSQL advisory lock of onboarding ("hk_sites")


@dataclass(frozen=True)
class Onboarded:
    """A new site and its secret in text form: shown once, never stored in clear."""

    site: Site
    secret: str


def _url(value: t.Any, field: str, errors: dict[str, list[str]]) -> str:
    if not isinstance(value, str) or len(value) > 2048:
        errors.setdefault(field, []).append("A URL is required.")
        return ""
    if holds_controls(value) or any(c.isspace() for c in value.strip()):
        # urlsplit drops a tab or line break inside the host, so the URL would be checked
        # without it yet stored with it; peers refuse an issuer holding a control character.
        errors.setdefault(field, []).append("Not a valid URL.")
        return ""
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - a port that is no number 0-65535 raises here
    except ValueError:  # an unclosed [ in the host, a host that normalises into another URL
        errors.setdefault(field, []).append("Not a valid URL.")
        return ""
    host = parts.hostname or ""
    if parts.scheme == "https" and host or parts.scheme == "http" and host in _LOOPBACK:
        if parts.username or parts.password or parts.fragment:
            errors.setdefault(field, []).append("No credentials or fragment in the URL.")
        return value.strip().rstrip("/")
    errors.setdefault(field, []).append(
        "An https:// URL (http:// only for localhost or 127.0.0.1)."
    )
    return ""


def _origin(value: t.Any, field: str, errors: dict[str, list[str]]) -> str:
    url = _url(value, field, errors)
    parts = urlsplit(url)
    if url and (parts.path not in ("", "/") or parts.query):
        errors.setdefault(field, []).append(f"{value!r} is not an origin (scheme://host[:port]).")
        return ""
    return f"{parts.scheme}://{parts.netloc.lower()}" if url else ""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64]


def validate(
    *,
    name: t.Any,
    base_url: t.Any,
    site_key: t.Any = None,
    issuer: t.Any = None,
    allowed_origins: t.Any = (),
    redirect_uris: t.Any = (),
    contact: t.Any = "",
) -> dict[str, t.Any]:
    """Checked site fields, or :class:`BadRequest` naming every bad one."""
    errors: dict[str, list[str]] = {}
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 120 or holds_controls(name):
        errors["name"] = ["1 to 120 characters, no control characters."]
        name = ""
    url = _url(base_url, "base_url", errors)
    key = site_key if site_key else slug(name or "")
    if not isinstance(key, str) or not _SITE_KEY.fullmatch(key):
        errors["site_key"] = ["2 to 64 characters: lower-case letters, digits and -."]
    iss = _url(issuer, "issuer", errors) if issuer else url
    if len(iss) > ISSUER_MAX:  # the base URL is the issuer unless one is given
        errors.setdefault("issuer" if issuer else "base_url", []).append(
            f"At most {ISSUER_MAX} characters as the site's issuer.")
    lists = {}
    for field, value in (("allowed_origins", allowed_origins), ("redirect_uris", redirect_uris)):
        if value is None or isinstance(value, (list, tuple)):
            lists[field] = list(value or [])
        else:  # a string would be read character by character, each "not a URL"
            errors[field] = ["A list of URLs."]
            lists[field] = []
    origins = [_origin(o, "allowed_origins", errors) for o in lists["allowed_origins"]]
    uris = [_url(u, "redirect_uris", errors) for u in lists["redirect_uris"]]
    if not isinstance(contact, str) or len(contact) > 254 or holds_controls(contact):
        errors["contact"] = ["At most 254 characters, no control characters."]
    if errors:  # each message once, however many entries of a list it is about
        raise BadRequest(fields={k: list(dict.fromkeys(v)) for k, v in errors.items()})
    return {
        "name": name.strip(),
        "site_key": key,
        "base_url": url,
        "issuer": iss,
        "allowed_origins": origins,
        "redirect_uris": uris,
        "contact": contact.strip(),
    }


def add_site(db: DBSession, state: HubState, actor: str, **fields: t.Any) -> Onboarded:
    """Onboard a site: checked fields, a fresh secret (version 1). The caller commits."""
    values = validate(**fields)
    _refuse_clash(db, values)
    now = state.clock()
    site = Site(**values, status="active", created_at=now, updated_at=now)
    db.add(site)
    try:
        db.flush()
    except IntegrityError:
        db.rollback()
        raise Conflict("A site with that name or key exists.") from None
    secret = _add_secret(db, state, site, version=1)
    events.log(db, state, "site.added", actor=actor, site_key=site.site_key)
    return Onboarded(site, secret)


def _refuse_clash(db: DBSession, values: dict[str, t.Any], site_id: int | None = None) -> None:
    """:class:`Conflict` when another site has the name, the site key or the issuer.

    Peers tell sites apart by issuer (it keys their identity links): two members under one
    issuer could sign in as each other's users. No unique index holds issuers, so the check and
    the write that follows it take turns across workers: on PostgreSQL through a lock held
    until the transaction ends (SQLite's ``BEGIN IMMEDIATE`` serialises writers already)."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK})
    clash = db.scalar(select(Site).where(
        (Site.name == values["name"]) | (Site.site_key == values["site_key"])
        | (Site.issuer == values["issuer"]), Site.id != (site_id or 0)).limit(1))
    if clash is not None:
        field = next(f for f in ("name", "site_key", "issuer")
                     if getattr(clash, f) == values[f])
        if field == "issuer" and values["issuer"] == values["base_url"]:
            field = "base_url"  # the issuer no one typed: the base URL is it
        raise Conflict(f"A site with that {field.replace('_', ' ')} exists.",
                       fields={field: ["Already taken."]})


def _add_secret(db: DBSession, state: HubState, site: Site, version: int) -> str:
    raw, text = new_site_secret()
    db.add(
        SiteSecret(
            site_id=site.id,
            version=version,
            ciphertext=state.vault.encrypt(raw),
            created_at=state.clock(),
        )
    )
    db.flush()
    return text


def get(db: DBSession, site_key: str, *, lock: bool = False) -> Site:
    """The site of ``site_key``; with ``lock`` its row stays locked until the transaction ends,
    so changes of one site take turns (one removed meanwhile is :class:`NotFound`)."""
    if holds_controls(site_key):  # no site key holds one (a lone surrogate cannot be sent)
        raise NotFound(f"No site {site_key!r}.", code="site_not_found")
    stmt = select(Site).where(Site.site_key == site_key)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    site = db.scalar(stmt)
    if site is None:
        raise NotFound(f"No site {site_key!r}.", code="site_not_found")
    return site


def list_sites(db: DBSession) -> list[Site]:
    return list(db.scalars(select(Site).order_by(Site.name)))


def set_status(db: DBSession, state: HubState, site: Site, status: str, actor: str) -> None:
    if status not in ("active", "suspended"):
        raise BadRequest(fields={"status": ["active or suspended"]})
    if site.status != status:
        site.status = status
        site.updated_at = state.clock()
        events.log(db, state, "site.suspended" if status == "suspended" else "site.resumed",
                   actor=actor, site_key=site.site_key)


def remove(db: DBSession, state: HubState, site: Site, actor: str) -> None:
    """Delete a site with its secrets and keys; its events stay in the log."""
    events.log(db, state, "site.removed", actor=actor, site_key=site.site_key)
    db.delete(site)


def valid_secrets(db: DBSession, state: HubState, site: Site) -> list[bytes]:
    """Every secret version still accepted, newest first."""
    return valid_secrets_of(db, state, [site.id]).get(site.id, [])


def valid_secrets_of(db: DBSession, state: HubState,
                     site_ids: t.Collection[int]) -> dict[int, list[bytes]]:
    """:func:`valid_secrets` of several sites in one query, by site id."""
    now = state.clock()
    rows = db.execute(
        select(SiteSecret.site_id, SiteSecret.ciphertext)
        .where(SiteSecret.site_id.in_(site_ids))
        .where((SiteSecret.expires_at.is_(None)) | (SiteSecret.expires_at > now))
        .order_by(SiteSecret.site_id, SiteSecret.version.desc())
    )
    found: dict[int, list[bytes]] = {}
    for site_id, ciphertext in rows:
        found.setdefault(site_id, []).append(state.vault.decrypt(ciphertext))
    return found


def rotate_secret(db: DBSession, state: HubState, site: Site, actor: str,
                  grace: int | None = None) -> str:
    """A new secret version; the previous ones stay valid for ``grace`` seconds (default config).

    The site's row is locked first, so concurrent rotations (an admin's and the site's own)
    take turns: each expires the secret the one before it made. :class:`NotFound` when the
    site was removed meanwhile.
    """
    if db.scalar(select(Site.id).where(Site.id == site.id).with_for_update()) is None:
        raise NotFound(f"No site {site.site_key!r}.", code="site_not_found")
    now = state.clock()
    grace = state.setting("SECRET_GRACE") if grace is None else grace
    current = db.scalars(
        select(SiteSecret).where(SiteSecret.site_id == site.id, SiteSecret.expires_at.is_(None))
    ).all()
    for row in current:
        row.expires_at = now + dt.timedelta(seconds=grace)
    version = (db.scalar(select(func.max(SiteSecret.version)).where(
        SiteSecret.site_id == site.id)) or 0) + 1
    text = _add_secret(db, state, site, version)
    events.log(db, state, "secret.rotated", actor=actor, site_key=site.site_key,
               details={"version": version, "grace_seconds": grace})
    return text


def prune_secrets(db: DBSession, state: HubState) -> int:
    """Delete secret versions whose grace period is over (idempotent)."""
    return rowcount(db.execute(
        delete(SiteSecret).where(SiteSecret.expires_at.is_not(None),
                                 SiteSecret.expires_at <= state.clock())
    ))


def import_file(
    db: DBSession, state: HubState, path: Path, actor: str
) -> list[tuple[str, str, str | None]]:
    """Apply a ``sites.example.toml``-style file idempotently.

    Returns (site_key, "added" | "updated" | "unchanged", secret shown once or None). Nothing is
    written unless every entry is valid.
    """
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{path}: cannot read ({exc})") from None
    entries = data.get("site", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadRequest(f"{path}: expected [[site]] tables")
    results: list[tuple[str, str, str | None]] = []
    allowed = {"id", "name", "base_url", "issuer", "allowed_origins", "redirect_uris", "contact"}
    seen: dict[tuple[str, str], int] = {}  # (field, value) -> the entry that has it
    for index, entry in enumerate(entries):
        unknown = set(entry) - allowed
        if unknown:
            raise BadRequest(f"{path}: site #{index + 1}: unknown field {sorted(unknown)[0]!r}")
        fields = {k: v for k, v in entry.items() if k != "id"}
        try:
            values = validate(site_key=entry.get("id"), **fields)
        except BadRequest as exc:
            problems = "; ".join(f"{k}: {' '.join(v)}" for k, v in (exc.fields or {}).items())
            raise BadRequest(f"{path}: site #{index + 1}: {problems}") from None
        # Two entries for one site: the second would update what the first added, and only
        # the last would stand (or a name or issuer taken twice would fail on the first's).
        issuer_field = "issuer" if entry.get("issuer") else "base_url"
        for field, value in (("id", values["site_key"]), ("name", values["name"]),
                             (issuer_field, values["issuer"])):
            first = seen.setdefault((field if field != "base_url" else "issuer", value), index)
            if first != index:
                raise BadRequest(f"{path}: site #{index + 1}: the same {field} as site "
                                 f"#{first + 1} ({value!r})")
        # Locked (and read afresh) until the import commits, as the console's forms lock it: a
        # site an admin is removing meanwhile is waited for, then added anew.
        site = db.scalar(select(Site).where(Site.site_key == values["site_key"])
                         .with_for_update().execution_options(populate_existing=True))
        try:
            if site is None:
                onboarded = add_site(db, state, actor,
                                     **{**fields, "site_key": values["site_key"]})
                results.append((values["site_key"], "added", onboarded.secret))
                continue
            changed = {k: v for k, v in values.items() if getattr(site, k) != v}
            if changed:
                _refuse_clash(db, values, site.id)
        except Conflict as exc:  # a site of the registry has the name, key or issuer
            raise Conflict(f"{path}: site #{index + 1}: {exc.message}",
                           fields=exc.fields) from None
        for key, value in changed.items():
            setattr(site, key, value)
        if changed:
            site.updated_at = state.clock()
            events.log(db, state, "site.updated", actor=actor, site_key=site.site_key,
                       details={"fields": sorted(changed)})
        results.append((site.site_key, "updated" if changed else "unchanged", None))
    db.flush()
    return results
