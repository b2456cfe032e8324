"""Alembic environment of the agent: runs on the engine handed over by :func:`agent.db.upgrade`."""

from __future__ import annotations

from alembic import context

from agent.db import VERSION_TABLE
from agent.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,  # SQLite can only alter tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()
