"""HeadlessKey hub: the federation's site registry, JWKS and admin console.

Not built yet: the package exists so the distribution's layout and the ``headlesskey-hub``
command are in place. The agent works fully without a hub.
"""

from __future__ import annotations

import typing as t

from flask import Flask


def create_app(test_config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """Create the hub app (for now: a health endpoint only)."""
    app = Flask(__name__, instance_relative_config=True)
    if test_config:
        app.config.update(test_config)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
