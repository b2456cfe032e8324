"""The agent as its own process, beside a frontend that has no Python backend.

``gunicorn 'agent.standalone:create_app()'`` with ``HEADLESSKEY_INSTANCE=/path/to/instance``, or
``headlesskey-agent serve --instance DIR``.
"""

from __future__ import annotations

import os
import typing as t
from pathlib import Path

from flask import Flask
from flask import jsonify

from . import config as config_module
from .errors import ConfigError
from .extension import HeadlessKey
from .extension import security_headers

SITE_FILE = "site.toml"


def load_config(instance: str | os.PathLike[str]) -> dict[str, t.Any]:
    """``site.toml`` of the instance, then ``HEADLESSKEY_*`` from the environment on top."""
    path = Path(instance) / SITE_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run `headlesskey-agent init --instance {instance}`)")
    values = config_module.load_toml(path)
    values.update(config_module.from_environ(os.environ))
    return values


def create_app(
    instance: str | os.PathLike[str] | None = None,
    overrides: t.Mapping[str, t.Any] | None = None,
) -> Flask:
    """Build the standalone app for an instance folder (default: ``$HEADLESSKEY_INSTANCE``)."""
    instance = instance or config_module.environ_instance()
    if not instance:
        raise ConfigError("HEADLESSKEY_INSTANCE: not set (the instance folder of the site)")
    instance_path = str(Path(instance).resolve())
    app = Flask("agent.standalone", instance_path=instance_path, instance_relative_config=True)
    app.config.update(load_config(instance_path))
    # Migrations run once in `init`/`serve`/`db upgrade`, not in every worker.
    app.config["HEADLESSKEY_AUTO_MIGRATE"] = False
    if overrides:
        app.config.update(overrides)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    HeadlessKey(app)
    # The API's own headers come from the extension; these cover the rest (index, 404s).
    app.after_request(security_headers)

    @app.get("/")
    def index() -> t.Any:
        settings = app.extensions["headlesskey"].settings
        return jsonify(
            {
                "name": settings.site_name,
                "api": settings.prefix,
                "openapi": f"{settings.prefix}/openapi.json",
                "jwks": "/.well-known/jwks.json",
            }
        )

    return app
