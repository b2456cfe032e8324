"""The OpenAPI 3.1 document of the hub's HTTP API: the signed site API under ``/api/v1`` and
the public well-known documents. Served at ``GET /api/openapi.json``.

Every ``/api/v1`` operation is signed by the calling site (``signedRequest``: the four
``X-HK-*`` headers, HMAC-SHA256 over method, path, query, site key, timestamp, nonce and body;
see docs/hub.md); an unsigned, badly signed, skewed or replayed request is a 401.
"""

from __future__ import annotations

import typing as t

_STR = {"type": "string"}
_INT = {"type": "integer"}
_OBJ = {"type": "object"}


def _obj(props: dict[str, t.Any], required: list[str] | None = None) -> dict[str, t.Any]:
    schema: dict[str, t.Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, t.Any]) -> dict[str, t.Any]:
    return {"content": {"application/json": {"schema": schema}}}


ERRORS = {
    400: "Malformed body or invalid field",
    401: "Unsigned, badly signed, skewed or replayed request, or an unknown or suspended site",
    404: "No such key of this site",
    409: "Conflicts with an existing key",
    413: "Body larger than MAX_BODY",
    415: "Body is not JSON",
    503: "The database cannot be reached, or the nonce store (Redis) does not answer",
}


def _signed(summary: str, ok: dict[str, t.Any], *, ok_status: int = 200,
            body: dict[str, t.Any] | None = None, errors: tuple[int, ...] = ()) -> dict[str, t.Any]:
    statuses = (*errors, 401, 413, 503) + ((400, 415) if body is not None else ())
    op: dict[str, t.Any] = {
        "summary": summary,
        "security": [{"signedRequest": []}],
        "responses": {
            str(ok_status): {"description": "OK", **_json(ok)},
            **{str(s): {"description": ERRORS[s], **_json(_ref("Error"))}
               for s in sorted(set(statuses))},
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    return op


def document() -> dict[str, t.Any]:
    """Return the OpenAPI 3.1 document; paths match the hub's registered routes."""
    key = _obj({"kid": _STR, "status": _STR}, ["kid", "status"])
    paths: dict[str, t.Any] = {
        "/api/v1/directory": {
            "get": _signed("This site, its peers with their keys and exchange keys, logouts "
                           "everywhere, its managed settings", _ref("Directory")),
        },
        "/api/v1/keys": {
            "post": _signed(
                "Publish one of this site's public keys",
                key, ok_status=201, errors=(409,),
                body=_obj({"jwk": {"type": "object"},
                           "status": {"enum": ["next", "active"]}}, ["jwk"]),
            ),
        },
        "/api/v1/keys/{kid}": {
            "parameters": [{"name": "kid", "in": "path", "required": True, "schema": _STR}],
            "delete": _signed("Retire one of this site's keys", key, errors=(404,)),
        },
        "/api/v1/secret/rotate": {
            "post": _signed(
                "A new site secret; the old one stays valid for the grace period",
                _obj({"secret": _STR, "grace_seconds": _INT}, ["secret", "grace_seconds"]),
            ),
        },
        "/api/v1/events": {
            "post": _signed(
                "Store a batch of this site's activity-log events (idempotent by id)",
                _obj({"accepted": _INT}, ["accepted"]),
                body=_obj({"events": {"type": "array", "items": _OBJ}}, ["events"]),
            ),
        },
        "/api/v1/health": {
            "post": _signed(
                "Report the site's health; answers its clock skew and problems",
                _obj({"clock_skew_seconds": {"type": ["number", "null"]},
                      "flags": {"type": "array"}}, ["clock_skew_seconds", "flags"]),
                body=_obj({"version": _STR, "time": _STR, "key_fingerprint": _STR,
                           "last_exchange_at": {"type": ["string", "null"]},
                           "last_sync_at": {"type": ["string", "null"]}}),
            ),
        },
        "/api/v1/logouts": {
            "post": _signed(
                "Log one of this site's users out everywhere (24 h); with origin, pass on a "
                "listed logout for the account linked to it here",
                _ref("Logout"), ok_status=201,
                body=_obj({"subject": {**_STR, "minLength": 1, "maxLength": 255},
                           "origin": {**_INT, "minimum": 1}}, ["subject"]),
            ),
        },
        "/.well-known/jwks.json": {
            "get": {
                "summary": "Every non-retired member key and the hub's own keys",
                "responses": {
                    "200": {"description": "OK", **_json(_ref("JWKS"))},
                    "304": {"description": "Not modified (If-None-Match)"},
                },
            },
        },
        "/.well-known/headlesskey-federation": {
            "get": {
                "summary": "Where the hub's issuer, JWKS and site API are",
                "responses": {"200": {"description": "OK", **_json(_obj(
                    {"issuer": _STR, "jwks_uri": _STR, "site_api": _OBJ},
                    ["issuer", "jwks_uri", "site_api"]))}},
            },
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": {"description": "OK", **_json(_OBJ)}},
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "HeadlessKey hub", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "signedRequest": {
                    "type": "apiKey", "in": "header", "name": "X-HK-Signature",
                    "description": "v1=<hex HMAC-SHA256> with X-HK-Site, X-HK-Timestamp and "
                                   "X-HK-Nonce (docs/hub.md, signed site API)",
                },
            },
            "schemas": {
                "Error": _obj({"code": _STR, "message": _STR, "data": _OBJ}, ["code", "message"]),
                "Directory": _obj(
                    {"site": _obj({"site_key": _STR, "name": _STR, "issuer": _STR,
                                   "status": _STR}, ["site_key", "issuer"]),
                     "hub": _obj({"issuer": _STR, "jwks_uri": _STR}),
                     "peers": {"type": "array", "items": _OBJ},
                     "logouts": {"type": "array", "items": _ref("Logout")},
                     "policy": _OBJ,
                     "webhook_redeliveries": {"type": "array"},
                     "generated_at": _STR},
                    ["site", "hub", "peers", "logouts", "generated_at"],
                ),
                "Logout": _obj({"id": _INT, "issuer": _STR, "subject": _STR,
                                "site_key": _STR, "origin": _INT, "created_at": _STR},
                               ["issuer", "subject", "created_at"]),
                "JWKS": _obj({"keys": {"type": "array", "items": _obj(
                    {"kty": _STR, "kid": _STR, "hk_site": _STR}, ["kty", "kid"])}}, ["keys"]),
            },
        },
    }
