"""HeadlessKey hub: the federation's site registry, signed site API, JWKS and admin console."""

from __future__ import annotations

import json
import os
import tomllib
import typing as t
from pathlib import Path

from flask import Flask
from flask import Response
from flask import jsonify
from flask import request
from sqlalchemy.orm import sessionmaker
from werkzeug.exceptions import HTTPException

from agent.db import DATABASE_ERRORS
from agent.db import unavailable
from agent.errors import AgentError
from agent.errors import ConfigError
from agent.errors import ValidationFailed
from agent.extension import url_holds_nul

from . import config as config_module
from .crypto import MasterKeyError
from .crypto import Vault
from .state import HubState
from .state import close_db
from .state import request_is_https

CONFIG_FILE = "hub.toml"
MASTER_KEY_FILE = "master.key"
JSON_PREFIXES = ("/api/", "/.well-known/")


def create_app(
    test_config: t.Mapping[str, t.Any] | None = None, instance_path: str | None = None
) -> Flask:
    """Create the hub app: defaults, then ``hub.toml``, then ``HEADLESSKEY_HUB_*``, then
    test_config."""
    instance_path = instance_path or os.environ.get("HEADLESSKEY_HUB_INSTANCE")
    app = Flask(
        __name__,
        instance_relative_config=True,
        instance_path=str(Path(instance_path).resolve()) if instance_path else None,
    )
    prefix = config_module.PREFIX
    app.config.update({prefix + k: v for k, (v, _doc) in config_module.DEFAULTS.items()})
    _load_file(app, Path(app.instance_path) / CONFIG_FILE)
    _load_env(app)
    if test_config:
        app.config.update(test_config)
    app.json.sort_keys = False  # type: ignore[attr-defined]

    state = _build_state(app)
    app.extensions["headlesskey_hub"] = state
    app.teardown_appcontext(close_db)
    app.config["MAX_CONTENT_LENGTH"] = state.setting("MAX_BODY")

    from . import api
    from . import console
    from . import wellknown

    app.register_blueprint(api.bp)
    app.register_blueprint(wellknown.bp)
    console.init_app(app)
    app.register_error_handler(AgentError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    for error in DATABASE_ERRORS:
        app.register_error_handler(error, _database_error)
    app.before_request(_refuse_nul)
    app.after_request(_security_headers)
    return app


def _load_file(app: Flask, path: Path) -> None:
    if not path.is_file():
        return
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for key, value in data.items():
        if key.upper() not in config_module.DEFAULTS:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        app.config[config_module.PREFIX + key.upper()] = value


def _load_env(app: Flask) -> None:
    """``HEADLESSKEY_HUB_<KEY>`` variables, JSON-decoded where they parse, under their full name.

    (Flask's ``from_prefixed_env`` would store them without the prefix, where nothing reads them.)
    """
    prefix = config_module.PREFIX
    for name in sorted(os.environ):
        if not name.startswith(prefix) or name[len(prefix):] not in config_module.DEFAULTS:
            continue  # e.g. HEADLESSKEY_HUB_INSTANCE, read by create_app and the CLI
        value: t.Any = os.environ[name]
        try:
            value = json.loads(value)
        except ValueError:
            pass
        app.config[name] = value


def _whole_number(key: str, value: t.Any, low: int, high: int) -> int:
    """``value`` (an int, or text that JSON-decodes to one) if within ``low``..``high``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{key}: expected a whole number between {low} and {high}, "
                          f"got {value}")
    return value


def _build_state(app: Flask) -> HubState:
    from .db import make_engine

    prefix = config_module.PREFIX
    url = app.config[prefix + "DATABASE_URL"] or (
        f"sqlite:///{Path(app.instance_path) / 'hub.db'}"
    )
    master = app.config[prefix + "MASTER_KEY"]
    keys: list[bytes] = []
    if master:
        keys = [k.strip().encode() for k in str(master).split(",") if k.strip()]
    else:
        key_file = Path(app.instance_path) / MASTER_KEY_FILE
        if key_file.is_file():
            keys = [line.strip().encode() for line in key_file.read_text().splitlines()
                    if line.strip()]
    try:
        vault = Vault(keys)
    except MasterKeyError as exc:
        raise ConfigError(
            f"{prefix}MASTER_KEY: {exc} (run `headlesskey-hub init` or set the variable)"
        ) from None
    for name, (low, high) in config_module.RANGES.items():
        app.config[prefix + name] = _whole_number(prefix + name, app.config[prefix + name],
                                                  low, high)
    engine = make_engine(str(url))
    if app.config.get(prefix + "AUTO_MIGRATE"):
        from .db import upgrade

        upgrade(engine)
    from agent import store

    redis_url = store.check_url(prefix + "REDIS_URL", app.config[prefix + "REDIS_URL"])
    return HubState(
        config=app.config,
        engine=engine,
        session_factory=sessionmaker(engine, expire_on_commit=False),
        vault=vault,
        redis=store.connect(prefix + "REDIS_URL", redis_url) if redis_url else None,
    )


def _wants_json() -> bool:
    return request.path.startswith(JSON_PREFIXES)


def _api_error(error: AgentError) -> Response:
    response = jsonify(error.to_dict())
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def _database_error(exc: Exception) -> Response:
    """503 (JSON for the API, the console's error page for the console); the request's
    transaction never committed."""
    from .console.views import DATABASE_DOWN
    from .console.views import error_page

    error = unavailable(exc)
    if _wants_json():
        return _api_error(error)
    response = error_page(error.status, text=DATABASE_DOWN)
    response.headers.update(error.headers)
    return response


def _refuse_nul() -> None:
    """400 for a NUL (``%00``) in the URL or in a console form: no site key, name, filter or id
    holds one, and PostgreSQL text cannot store one. (API bodies are checked field by field.)"""
    # Every value of every field: a field sent twice is read as a list by some forms.
    form = (request.form.items(multi=True) if request.method == "POST" and not _wants_json()
            else ())
    if url_holds_nul() or any("\x00" in key or "\x00" in value for key, value in form):
        raise ValidationFailed("The request may not contain NUL (%00).")


def _http_error(exc: HTTPException) -> t.Any:
    if not _wants_json():
        return exc
    status = exc.code or 500
    message = "An internal error occurred." if status >= 500 else (exc.description or exc.name)
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        status, "internal_error" if status >= 500 else "http_error"
    )
    response = jsonify({"code": code, "message": message, "data": {"status": status}})
    response.status_code = status
    allowed = getattr(exc, "valid_methods", None)
    if status == 405 and allowed:
        response.headers["Allow"] = ", ".join(allowed)  # RFC 9110 §15.5.6
    return response


def _security_headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("X-Frame-Options", "DENY")
    if request_is_https():
        headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
    if request.path.startswith("/api/"):
        headers.setdefault("Cache-Control", "no-store")
    if not _wants_json():
        headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        )
        headers.setdefault("Cache-Control", "no-store")
    if headers.get("Cache-Control") == "no-store":
        headers.setdefault("Pragma", "no-cache")  # HTTP/1.0 caches (RFC 6749 §5.1)
    return response
