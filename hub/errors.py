"""Errors of the hub's site API, in the same JSON shape as the agent's.

    HubError
    ├── BadRequest        400 bad_request / invalid_request (with data.fields)
    ├── Unauthorized      401 unsigned, bad_signature, skewed_request, replayed_request,
    │                         unknown_site
    ├── Forbidden         403 site_suspended
    ├── NotFound          404 not_found
    ├── Conflict          409 conflict (duplicate name, key, kid)
    └── PayloadTooLarge   413 payload_too_large

Request bodies are parsed by ``agent.extension.parse_json_object``, whose 400 ``invalid_json``
and 415 ``unsupported_media_type`` (AgentError subclasses) leave the API in the same shape.
"""

from __future__ import annotations

from agent.errors import AgentError


class HubError(AgentError):
    """Base of the hub's API errors; the console shows ``message`` in the page instead."""


class BadRequest(HubError):
    code = "invalid_request"
    status = 400
    message = "Some fields are missing or invalid."


class Unauthorized(HubError):
    code = "unauthorized"
    status = 401
    message = "The request is not signed by a known site."


class Forbidden(HubError):
    code = "forbidden"
    status = 403
    message = "Not allowed."


class NotFound(HubError):
    code = "not_found"
    status = 404
    message = "Not found."


class Conflict(HubError):
    code = "conflict"
    status = 409
    message = "That conflicts with an existing record."


class PayloadTooLarge(HubError):
    code = "payload_too_large"
    status = 413
    message = "The request body is too large."
