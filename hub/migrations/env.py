"""Alembic environment of the hub: runs on the engine handed over by :func:`hub.db.upgrade`."""

from __future__ import annotations

from alembic import context

from hub.db import VERSION_TABLE
from hub.models import Base

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
