"""Errors of the agent, each with a stable code and an HTTP status.

Every error leaves the API in the WordPress REST shape that frontends written for the
HeadlessKey plugin already parse::

    {"code": "invalid_token", "message": "...", "data": {"status": 401}}

Input validation adds ``data.fields`` (field name -> list of messages).

Hierarchy::

    AgentError
    ├── BadRequest                400 bad_request
    │   ├── InvalidJSON           400 invalid_json
    │   ├── ValidationFailed      400 invalid_request (with data.fields)
    │   ├── WeakPassword          400 weak_password (with data.fields)
    │   ├── InvalidResetToken     400 invalid_reset_token
    │   ├── IncorrectPassword     400 incorrect_password
    │   └── InvalidGrant          400 invalid_grant (refresh token unusable)
    ├── Unauthorized              401 (sets WWW-Authenticate)
    │   ├── InvalidCredentials    401 invalid_credentials
    │   └── InvalidToken          401 invalid_token
    ├── Forbidden                 403 forbidden
    │   └── RegistrationClosed    403 registration_closed
    ├── NotFound                  404 not_found
    ├── Conflict                  409 conflict
    │   └── UsernameTaken         409 existing_user_login
    ├── PayloadTooLarge           413 payload_too_large
    ├── UnsupportedMediaType      415 unsupported_media_type
    └── ServiceUnavailable        503 service_unavailable
        ├── DatabaseUnavailable   503 database_unavailable (no connection, or it broke)
        └── StoreUnavailable      503 store_unavailable (Redis down; agent.store)

ConfigError is separate: it stops start-up with one line naming the setting.
"""

from __future__ import annotations

import typing as t


class ConfigError(Exception):
    """A setting is missing or has a bad value; the message names the setting."""


class AgentError(Exception):
    """Base of every error the API turns into a JSON response."""

    code = "error"
    status = 500
    message = "An error occurred."

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        fields: dict[str, list[str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message or self.message)
        if message is not None:
            self.message = message
        if code is not None:
            self.code = code
        self.fields = fields
        self.headers = headers or {}

    def to_dict(self) -> dict[str, t.Any]:
        """Return the WordPress REST error body."""
        data: dict[str, t.Any] = {"status": self.status}
        if self.fields:
            data["fields"] = self.fields
        return {"code": self.code, "message": self.message, "data": data}


class BadRequest(AgentError):
    code = "bad_request"
    status = 400
    message = "The request is malformed."


class InvalidJSON(BadRequest):
    code = "invalid_json"
    message = "The request body is not a valid JSON object."


class ValidationFailed(BadRequest):
    code = "invalid_request"
    message = "Some fields are missing or invalid."


class WeakPassword(BadRequest):
    code = "weak_password"
    message = "The password does not meet the password policy."


class InvalidResetToken(BadRequest):
    code = "invalid_reset_token"
    message = "The reset token or code is invalid or has expired."


class IncorrectPassword(BadRequest):
    code = "incorrect_password"
    message = "The current password is incorrect."


class InvalidGrant(BadRequest):
    """RFC 6749 §5.2: the refresh token is invalid, expired, revoked or already used."""

    code = "invalid_grant"
    message = "The refresh token is invalid or has expired."


class Unauthorized(AgentError):
    code = "unauthorized"
    status = 401
    message = "Authentication is required."

    challenge = 'Bearer realm="headlesskey"'

    def __init__(self, message: str | None = None, **kw: t.Any) -> None:
        super().__init__(message, **kw)
        # RFC 6750 §3: a 401 names the scheme; an error code only when a token was presented
        # and is bad (§3.1), never for a request that carried none.
        self.headers.setdefault("WWW-Authenticate", self.challenge)


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"
    message = "The username, email or password is incorrect."


class InvalidToken(Unauthorized):
    code = "invalid_token"
    message = "The token is invalid or has expired."
    challenge = 'Bearer realm="headlesskey", error="invalid_token"'


class Forbidden(AgentError):
    code = "forbidden"
    status = 403
    message = "You are not allowed to do this."


class RegistrationClosed(Forbidden):
    code = "registration_closed"
    message = "Registration is closed on this site."


class NotFound(AgentError):
    code = "not_found"
    status = 404
    message = "Not found."


class Conflict(AgentError):
    code = "conflict"
    status = 409
    message = "The request conflicts with the current state."


class UsernameTaken(Conflict):
    code = "existing_user_login"
    message = "That username is already taken; choose another."


class PayloadTooLarge(AgentError):
    code = "payload_too_large"
    status = 413
    message = "The request body is too large."


class UnsupportedMediaType(AgentError):
    code = "unsupported_media_type"
    status = 415
    message = "Send the request body as application/json."


class ServiceUnavailable(AgentError):
    code = "service_unavailable"
    status = 503
    message = "The service is temporarily unavailable."


class DatabaseUnavailable(ServiceUnavailable):
    """The database could not be reached, or the connection broke mid-request: the request's
    transaction is rolled back, so nothing of it was written, and it may be sent again."""

    code = "database_unavailable"
    message = "The database is unavailable. Try again shortly."

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "5"})
