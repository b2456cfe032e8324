"""The OpenAPI 3.1 document of the agent's API, built for the configured prefix."""

from __future__ import annotations

import typing as t

from .config import Settings

_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_USER_ID = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def _obj(props: dict[str, t.Any], required: list[str] | None = None,
         extra: bool = True) -> dict[str, t.Any]:
    schema: dict[str, t.Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    if not extra:
        schema["additionalProperties"] = False
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


# GET /sessions and GET /admin/users/{id}/sessions (agent.services.sessions.live_sessions).
_SESSION_PAGE = _obj({"sessions": {"type": "array", "items": _ref("SessionInfo")},
                      "next_cursor": {"type": ["string", "null"]}}, ["sessions", "next_cursor"])
_SESSION_PAGE_PARAMETERS = [
    {"name": name, "in": "query", "required": False, "schema": schema}
    for name, schema in (("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                         ("cursor", _STR))
]


def _json(schema: dict[str, t.Any]) -> dict[str, t.Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, t.Any]:
    text = {
        400: "Malformed request or invalid field",
        401: "Missing, invalid or expired credentials",
        403: "Not allowed",
        404: "Not found",
        409: "Conflict",
        503: "Unavailable: the database cannot be reached (database_unavailable), or for SSO "
             "the federation hub is unreachable and the cached directory too old",
        413: "Body too large",
        415: "Body is not JSON",
        429: "Too many failed attempts (Retry-After says when to try again)",
    }
    return {
        str(s): {"description": text[s], **_json(_ref("Error"))}
        for s in (*statuses, 413, 415, 503)
    }


def _op(
    summary: str,
    ok: dict[str, t.Any],
    *,
    body: dict[str, t.Any] | None = None,
    errors: tuple[int, ...] = (400,),
    auth: bool = False,
    ok_status: int = 200,
) -> dict[str, t.Any]:
    op: dict[str, t.Any] = {
        "summary": summary,
        "responses": {str(ok_status): {"description": "OK", **_json(ok)}, **_errors(*errors)},
    }
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if auth:
        op["security"] = [{"bearer": []}]
        op["responses"].update(_errors(401))
    return op


def document(settings: Settings) -> dict[str, t.Any]:
    """Return the OpenAPI 3.1 document; paths match the registered routes."""
    p = settings.prefix
    credentials = _obj(
        {
            "username": {**_STR, "maxLength": 254},
            "email": {**_STR, "maxLength": 254},
            "password": {**_STR, "maxLength": 4096},
        },
        ["password"],
    )
    token_field = _obj({"token": {**_STR, "maxLength": 8192}})
    success = _ref("Success")
    paths: dict[str, t.Any] = {
        f"{p}/token": {
            "post": _op("Log in; returns an access and a refresh token", _ref("TokenResponse"),
                        body=credentials, errors=(400, 401, 403, 429))
        },
        f"{p}/login": {
            "post": _op("Log in; returns tokens and the full profile", _ref("TokenResponse"),
                        body=credentials, errors=(400, 401, 403, 429))
        },
        f"{p}/token/validate": {
            "post": _op(
                "Check an access token (body `token` or the Bearer header)",
                _obj({"valid": _BOOL, "code": _STR, "data": {"type": "object"}}, ["valid", "data"]),
                body=token_field,
                errors=(400, 401, 429),
            )
        },
        f"{p}/token/refresh": {
            "post": _op(
                "Rotate a refresh token into a new pair",
                _ref("TokenResponse"),
                body=_obj({"refresh_token": {**_STR, "maxLength": 128},
                           "token": {**_STR, "maxLength": 128}}),
                errors=(400,),
            )
        },
        f"{p}/token/revoke": {
            "post": _op(
                "End sessions: this one, the user's others, or everywhere (scope; 200, RFC 7009)",
                success,
                body=_obj({"token": _STR, "refresh_token": _STR,
                           "scope": {**_STR, "enum": ["local", "others", "global"]}}),
                errors=(400,),
            )
        },
        f"{p}/register": {
            "post": _op(
                "Create an account",
                success,
                body=_obj(
                    {
                        "username": {**_STR, "minLength": 3, "maxLength": 60},
                        "email": {**_STR, "format": "email", "maxLength": 254},
                        "password": {**_STR, "maxLength": 4096},
                        "display_name": {**_STR, "maxLength": 250},
                    },
                    ["username", "email", "password"],
                ),
                errors=(400, 403, 409),
                ok_status=201,
            )
        },
        f"{p}/forgot-password": {
            "post": _op(
                "Mail a reset link or a one-time code"
                " (same answer whether or not the account exists)",
                success,
                body=_obj({"login": {**_STR, "maxLength": 254},
                           "email": {**_STR, "maxLength": 254},
                           "delivery": {"enum": ["link", "otp"]}}),
            )
        },
        f"{p}/reset-password": {
            "post": _op(
                "Set a new password with the link token or the code",
                success,
                body=_obj(
                    {
                        "login": {**_STR, "maxLength": 254},
                        "password": {**_STR, "maxLength": 4096},
                        "token": {**_STR, "maxLength": 128},
                        "otp": {**_STR, "maxLength": 16},
                    },
                    ["login", "password"],
                ),
                errors=(400, 429),
            )
        },
        f"{p}/change-password": {
            "post": _op(
                "Change the password; ends the user's other sessions",
                _obj({"success": _BOOL, "code": _STR, "message": _STR, "sessions_ended": _INT}),
                body=_obj(
                    {"current_password": {**_STR, "maxLength": 4096},
                     "new_password": {**_STR, "maxLength": 4096}},
                    ["current_password", "new_password"],
                ),
                auth=True,
                errors=(400, 429),
            )
        },
        f"{p}/me": {"get": _op("The caller's profile", _ref("Profile"), auth=True, errors=())},
        f"{p}/sessions": {
            "get": {
                **_op("The caller's active sessions, newest first, a page at a time",
                      _SESSION_PAGE, auth=True, errors=(400,)),
                "parameters": _SESSION_PAGE_PARAMETERS,
            }
        },
        f"{p}/sessions/{{session_id}}": {
            "delete": {
                **_op("End one of the caller's sessions", success, auth=True, errors=(404,)),
                "parameters": [
                    {"name": "session_id", "in": "path", "required": True, "schema": _STR}
                ],
            }
        },
        f"{p}/sso/issue": {
            "post": _op(
                "An assertion of the caller for a peer site (valid 60 s, single use)",
                _obj({"site_key": _STR, "token": _STR, "signature": _STR, "target": _STR,
                      "target_url": {"type": ["string", "null"]}, "expires_in": _INT},
                     ["site_key", "token", "signature", "target"]),
                body=_obj({"target": {**_STR, "maxLength": 64}}, ["target"]),
                auth=True,
                errors=(400, 404, 503),
            )
        },
        f"{p}/sso/exchange": {
            "post": _op(
                "Exchange a peer site's assertion for a local login (full profile)",
                _ref("TokenResponse"),
                body=_obj({"site_key": {**_STR, "maxLength": 64},
                           "token": {**_STR, "maxLength": 8192},
                           "signature": {**_STR, "maxLength": 64}},
                          ["site_key", "token", "signature"]),
                errors=(400, 401, 403, 404, 429, 503),
            )
        },
        f"{p}/admin/logs": {
            "get": {
                **_op(
                    "The activity log, newest first (administrators)",
                    _obj({"events": {"type": "array", "items": _ref("AuditEvent")},
                          "next_cursor": {"type": ["string", "null"]}}, ["events", "next_cursor"]),
                    auth=True,
                    errors=(400, 403),
                ),
                "parameters": [
                    {"name": name, "in": "query", "required": False, "schema": schema}
                    for name, schema in (
                        ("user", {**_STR, "pattern": "^[0-9]+$"}),
                        ("event", {**_STR, "maxLength": 64}),
                        ("outcome", {**_STR, "maxLength": 64}),
                        ("ip", {**_STR, "maxLength": 64}),
                        ("since", {**_STR, "format": "date-time"}),
                        ("until", {**_STR, "format": "date-time"}),
                        ("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                        ("cursor", _STR),
                    )
                ],
            }
        },
        f"{p}/admin/users": {
            "get": {
                **_op("Accounts by ID, filtered by login or status, a page at a time "
                      "(administrators)",
                      _obj({"users": {"type": "array", "items": _ref("Profile")},
                            "next_cursor": {"type": ["string", "null"]}},
                           ["users", "next_cursor"]),
                      auth=True, errors=(400, 403)),
                "parameters": [
                    {"name": name, "in": "query", "required": False, "schema": schema}
                    for name, schema in (
                        ("login", {**_STR, "maxLength": 254}),
                        ("status", {**_STR, "enum": ["active", "disabled"]}),
                        ("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                        ("cursor", _STR),
                    )
                ],
            }
        },
        f"{p}/admin/users/{{user_id}}": {
            "get": {
                **_op("One account's profile, with its status and roles (administrators)",
                      _ref("Profile"), auth=True, errors=(403, 404)),
                "parameters": [{"name": "user_id", "in": "path", "required": True,
                                "schema": _USER_ID}],
            }
        },
        f"{p}/admin/users/{{user_id}}/unlock": {
            "post": {
                **_op("Clear a user's brute-force lock (administrators)",
                      _obj({"success": _BOOL, "code": _STR, "message": _STR,
                            "counters_cleared": _INT}),
                      auth=True, errors=(403, 404)),
                "parameters": [{"name": "user_id", "in": "path", "required": True,
                                "schema": _USER_ID}],
            }
        },
        f"{p}/admin/users/{{user_id}}/disable": {
            "post": {
                **_op("Disable a user: no login, every session ended (administrators)",
                      _obj({"success": _BOOL, "code": _STR, "message": _STR,
                            "sessions_ended": _INT}),
                      auth=True, errors=(403, 404)),
                "parameters": [{"name": "user_id", "in": "path", "required": True,
                                "schema": _USER_ID}],
            }
        },
        f"{p}/admin/users/{{user_id}}/enable": {
            "post": {
                **_op("Enable a disabled user again (administrators)",
                      _obj({"success": _BOOL, "code": _STR, "message": _STR}),
                      auth=True, errors=(403, 404)),
                "parameters": [{"name": "user_id", "in": "path", "required": True,
                                "schema": _USER_ID}],
            }
        },
        f"{p}/admin/users/{{user_id}}/roles": {
            "put": {
                **_op("Replace a user's roles; they hold from the user's next request "
                      "(administrators)",
                      _obj({"success": _BOOL, "code": _STR, "message": _STR,
                            "roles": {"type": "array", "items": _STR}}),
                      body=_obj({"roles": {"type": "array", "maxItems": 32,
                                           "items": {**_STR, "minLength": 1, "maxLength": 64}}},
                                ["roles"]),
                      auth=True, errors=(400, 403, 404)),
                "parameters": [{"name": "user_id", "in": "path", "required": True,
                                "schema": _USER_ID}],
            }
        },
        f"{p}/admin/users/{{user_id}}/sessions": {
            "get": {
                **_op("A user's active sessions, newest first, a page at a time "
                      "(administrators)", _SESSION_PAGE, auth=True, errors=(400, 403, 404)),
                "parameters": [{"name": "user_id", "in": "path", "required": True,
                                "schema": _USER_ID}, *_SESSION_PAGE_PARAMETERS],
            }
        },
        f"{p}/admin/sessions/{{session_id}}": {
            "delete": {
                **_op("End anyone's session (administrators)", success, auth=True,
                      errors=(403, 404)),
                "parameters": [{"name": "session_id", "in": "path", "required": True,
                                "schema": _STR}],
            }
        },
        f"{p}/openapi.json": {
            "get": _op("This document", {"type": "object"}, errors=())
        },
        "/.well-known/jwks.json": {
            "get": _op(
                "Public keys of this site's access tokens (RFC 7517)",
                _obj({"keys": {"type": "array", "items": {"type": "object"}}}, ["keys"]),
                errors=(),
            )
        },
    }
    user = _obj(
        {
            "ID": _INT,
            "user_login": _STR,
            "user_email": _STR,
            "display_name": _STR,
            "roles": {"type": "array", "items": _STR},
        },
        ["ID", "user_login", "user_email", "display_name", "roles"],
    )
    profile = {
        "allOf": [
            user,
            _obj({"user_registered": _STR, "email_verified": _BOOL, "status": _STR},
                 ["user_registered", "email_verified", "status"]),
        ]
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"{settings.site_name} auth API (HeadlessKey agent)",
            "version": "1.0.0",
            "description": (
                "JWT authentication API compatible with the HeadlessKey WordPress plugin."
            ),
        },
        "servers": [{"url": settings.site_url}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": {
                "Error": _obj(
                    {
                        "code": _STR,
                        "message": _STR,
                        "data": _obj(
                            {"status": _INT,
                             "fields": {"type": "object",
                                        "additionalProperties": {"type": "array", "items": _STR}}},
                            ["status"],
                        ),
                    },
                    ["code", "message", "data"],
                ),
                "Success": _obj({"success": _BOOL, "code": _STR, "message": _STR},
                                ["success", "code", "message"]),
                "User": user,
                "Profile": profile,
                "TokenResponse": _obj(
                    {
                        "token": _STR,
                        "token_type": {"const": "Bearer"},
                        "expires_in": _INT,
                        "expiration": {**_STR, "format": "date-time"},
                        "refreshable": _BOOL,
                        "jti": _STR,
                        "sid": _STR,
                        "refresh_token": _STR,
                        "refresh_token_expires_in": _INT,
                        "refresh_expiration": {**_STR, "format": "date-time"},
                        "user": {"anyOf": [user, profile]},
                    },
                    ["token", "token_type", "expires_in", "expiration", "refreshable", "jti",
                     "refresh_token", "refresh_token_expires_in", "user"],
                ),
                "AuditEvent": _obj(
                    {
                        "id": _INT,
                        "time": {**_STR, "format": "date-time"},
                        "event": _STR,
                        "outcome": _STR,
                        "user_id": {"type": ["integer", "null"]},
                        "login": _STR,
                        "session_id": {"type": ["string", "null"]},
                        "ip": _STR,
                        "user_agent": _STR,
                        "device": _STR,
                        "details": {"type": "object"},
                    },
                    ["id", "time", "event", "outcome", "user_id", "ip", "device", "details"],
                ),
                "SessionInfo": _obj(
                    {
                        "id": _STR,
                        "current": _BOOL,
                        "device": _STR,
                        "user_agent": _STR,
                        "ip": _STR,
                        "created": _STR,
                        "last_seen": _STR,
                        "expires": _STR,
                    },
                    ["id", "current", "device", "created", "last_seen"],
                ),
            },
        },
    }
