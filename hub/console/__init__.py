"""Blueprint "console": the server-rendered admin console (built in hub/console/views.py)."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register the console: its blueprint, session cookie, CSRF protection and error pages."""
    from . import views

    views.init_app(app)
