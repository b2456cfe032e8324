"""Blueprint "wellknown": the federation JWKS and metadata (RFC 8615 well-known URIs)."""

from __future__ import annotations

from flask import Blueprint
from flask import Response
from flask import jsonify
from flask import request

from .services import keys as key_service
from .state import get_db
from .state import get_state

bp = Blueprint("wellknown", __name__)


@bp.get("/.well-known/jwks.json")
def jwks() -> Response:
    """Every non-retired member key and the hub's own keys; ETag and conditional GET (304)."""
    state = get_state()
    body, etag = key_service.jwks(get_db())
    if etag in request.if_none_match.to_header().replace(" ", "").split(",") or (
        request.if_none_match.contains(etag.strip('"'))
    ):
        response = Response(status=304)
    else:
        response = Response(body, mimetype="application/json")  # serialised once, for the ETag
    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = f"public, max-age={state.setting('JWKS_MAX_AGE')}"
    return response


@bp.get("/.well-known/headlesskey-federation")
def metadata() -> Response:
    """Where the hub's issuer, JWKS and site API are."""
    url = get_state().setting("URL")
    return jsonify(
        {
            "issuer": url,
            "jwks_uri": f"{url}/.well-known/jwks.json",
            "site_api": {
                "base": f"{url}/api/v1",
                "directory": f"{url}/api/v1/directory",
                "keys": f"{url}/api/v1/keys",
                "secret_rotate": f"{url}/api/v1/secret/rotate",
                "events": f"{url}/api/v1/events",
                "signing": "HMAC-SHA256 v1 (X-HK-Site, X-HK-Timestamp, X-HK-Nonce, X-HK-Signature)",
                "max_skew_seconds": 300,
            },
        }
    )


@bp.get("/api/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 description of the hub's site API and well-known documents."""
    from .openapi import document

    return jsonify(document())
