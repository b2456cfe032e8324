"""Blueprint "console": the server-rendered admin console (built in hub/console/views.py)."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register the console (a no-op until its views exist)."""
    try:
        from . import views
    except ImportError:
        return
    views.init_app(app)
