"""Blueprint "api": the HMAC-signed site API (DESIGN §4). Thin JSON views over services.

Every request is verified over its raw body before anything is parsed: signature headers, a
clock skew of at most 300 s, the site's still-valid secrets (old and new during a rotation,
constant-time compare), the site's status, and a nonce never seen before on any worker (a unique
row, or ``SET NX`` in Redis when ``REDIS_URL`` is set). Each
refusal is a JSON error and an event in the federation log (at most
:attr:`~hub.state.RefusalLog.BURST` a minute per address and process; the rest are counted).
"""

from __future__ import annotations

import typing as t

from flask import Blueprint
from flask import Response
from flask import g
from flask import jsonify
from flask import request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DBSession

from agent import signing
from agent import store
from agent.extension import parse_json_object

from ..errors import PayloadTooLarge
from ..errors import Unauthorized
from ..models import Nonce
from ..models import Site
from ..services import directory as directory_service
from ..services import events
from ..services import keys as key_service
from ..services import logouts as logout_service
from ..services import settings as settings_service
from ..services import sites as site_service
from ..state import HubState
from ..state import client_ip
from ..state import get_db
from ..state import get_state

bp = Blueprint("api", __name__, url_prefix="/api/v1")

REASONS = {
    "unsigned": ("unsigned_request", "The request carries no signature headers."),
    # Malformed headers get the very answer of a wrong signature (SECURITY.md H-07): the shape
    # of a refused signature tells a caller nothing; the log keeps the reason.
    "malformed": ("bad_signature", "The signature does not match."),
    "skewed": ("skewed_request",
               "The request timestamp is more than 300 s away from the hub's clock."),
    "bad": ("bad_signature", "The signature does not match."),
    "unknown": ("bad_signature", "The signature does not match."),
    "replay": ("replayed_request", "This request was already received."),
    "suspended": ("bad_signature", "The signature does not match."),
}


def _refuse(reason: str, site_key: str | None) -> t.NoReturn:
    state = get_state()
    db = get_db()
    db.rollback()
    ip = client_ip()
    left_out = state.refusals.admit(ip, state.clock())
    if left_out is not None:
        details: dict[str, t.Any] = {"reason": reason, "path": request.path[:200]}
        if left_out:
            details["suppressed"] = left_out
        events.log(db, state, "api.rejected", outcome="failure", site_key=site_key, ip=ip,
                   details=details)
        db.commit()
    code, message = REASONS[reason]
    raise Unauthorized(message, code=code)


@bp.before_request
def verify_signature() -> None:
    state = get_state()
    db = get_db()
    max_body = state.setting("MAX_BODY")
    if (request.content_length or 0) > max_body:
        raise PayloadTooLarge()
    body = request.get_data(cache=True)
    if request.content_length is None and len(body) >= max_body:
        # A streamed (chunked) body is cut at MAX_CONTENT_LENGTH without an error: refuse it.
        raise PayloadTooLarge()
    now = state.clock().timestamp()
    try:
        signed = signing.parse_headers(t.cast(t.Mapping[str, str], request.headers), now=now)
    except signing.SignatureError as exc:
        _refuse(exc.reason, request.headers.get(signing.HEADER_SITE, "")[:64] or None)
    site = db.query(Site).filter(Site.site_key == signed.site_key).one_or_none()
    secrets_ = site_service.valid_secrets(db, state, site) if site is not None else []
    query = request.query_string.decode("latin-1")
    if site is None or not signing.verify(signed, secrets_, request.method, request.path, query,
                                          body):
        _refuse("bad" if site else "unknown", signed.site_key)
    assert site is not None
    site_key = site.site_key
    if not _first_use(state, db, site_key, signed.nonce):
        _refuse("replay", site_key)
    if site.status != "active":
        # The same answer as a bad signature (SECURITY.md H-10); the reason is in the log.
        _refuse("suspended", site_key)
    g.hub_site = site


def _first_use(state: HubState, db: DBSession, site_key: str, nonce: str) -> bool:
    """Remember ``nonce`` of ``site_key``; False if it was seen before, on any worker or host.

    In Redis (``SET NX EX`` for ``NONCE_TTL``, at least twice the 300 s skew) when configured,
    where a Redis that does not answer is a 503; else a unique row of ``hub_nonces``.
    """
    if state.redis is not None:
        db.commit()  # nothing written: end the transaction (on SQLite, a lock) before Redis
        ttl = max(int(state.setting("NONCE_TTL")), 2 * signing.MAX_SKEW)
        name = store.key("nonce", str(state.setting("URL")), site_key, nonce)
        return store.use_once(state.redis, name, ttl)
    db.add(Nonce(site_key=site_key, nonce=nonce, seen_at=state.clock()))
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        return False
    return True


def _json() -> dict[str, t.Any]:
    # Already bounded by MAX_BODY and verified over these raw bytes in verify_signature.
    return parse_json_object(request.get_data(cache=True), request.mimetype)


@bp.get("/directory")
def directory() -> Response:
    """This site's peers, their keys and the pairwise exchange keys."""
    state = get_state()
    response = jsonify(directory_service.directory_for(get_db(), state, g.hub_site))
    response.headers["Cache-Control"] = f"private, max-age={state.setting('JWKS_MAX_AGE')}"
    return response


@bp.post("/keys")
def register_key() -> tuple[Response, int]:
    """Publish one of this site's public keys: ``{"jwk": {...}, "status": "next"|"active"}``."""
    data = _json()
    db = get_db()
    key = key_service.register(db, get_state(), g.hub_site, data.get("jwk"),
                               data.get("status", "next"))
    db.commit()
    return jsonify({"kid": key.kid, "status": key.status}), 201


@bp.delete("/keys/<kid>")
def retire_key(kid: str) -> Response:
    db = get_db()
    key_service.retire(db, get_state(), g.hub_site, kid[:128])
    db.commit()
    return jsonify({"kid": kid, "status": "retired"})


@bp.post("/secret/rotate")
def rotate_secret() -> Response:
    """A new secret for this site; the old one keeps working for the grace period."""
    state = get_state()
    db = get_db()
    grace = settings_service.effective(db, state, "SECRET_GRACE")  # the console may change it
    secret = site_service.rotate_secret(db, state, g.hub_site, actor=g.hub_site.site_key,
                                        grace=grace)
    db.commit()
    response = jsonify({"secret": secret, "grace_seconds": grace})
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/events")
def upload_events() -> Response:
    """Store a batch of this site's audit events (idempotent by event id)."""
    data = _json()
    db = get_db()
    accepted = events.upload(db, get_state(), g.hub_site.site_key, data.get("events"))
    db.commit()
    return jsonify({"accepted": accepted})


from . import health  # noqa: E402,F401  (registers POST /health on bp)


@bp.post("/logouts")
def record_logout() -> tuple[Response, int]:
    """Log one of this site's users out everywhere: ``{"subject": "<user id at this site>"}``,
    with ``"origin": <logout id>`` when the site passes on a logout of a linked identity.

    The issuer is always the calling site's registered issuer: a site can only log out its own
    identities. Every directory lists the logout for 24 hours (a passed-on one, as long as the
    logout it came from).
    """
    data = _json()
    db = get_db()
    site = g.hub_site
    row = logout_service.record(db, get_state(), site, data.get("subject"),
                                actor=site.site_key, via="api", ip=client_ip(),
                                origin=data.get("origin"))
    db.commit()
    return jsonify(logout_service.as_dict(row)), 201
