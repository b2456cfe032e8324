"""The hub's engine and Alembic migrations (own version table ``hub_alembic_version``)."""

from __future__ import annotations

import typing as t
from pathlib import Path

from sqlalchemy import Engine

from agent import db as agent_db
from agent.db import make_engine

if t.TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

__all__ = ["alembic_config", "make_engine", "upgrade"]

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "hub_alembic_version"
HEAD = "0006"  # the newest revision in MIGRATIONS (tests/agent/test_db.py checks it)


def alembic_config(engine: Engine) -> AlembicConfig:
    return agent_db.alembic_config(engine, MIGRATIONS)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the hub's schema to ``revision`` (idempotent)."""
    agent_db.upgrade(engine, revision, MIGRATIONS, head=HEAD, version_table=VERSION_TABLE)
