"""logout everywhere across chains of links: hub_logouts.origin_id

A site that applied a logout of a linked identity passes it on for its own user, naming the
logout it came from; the chain keeps the first logout's id and time.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hub_logouts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('origin_id', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hub_logouts', schema=None) as batch_op:
        batch_op.drop_column('origin_id')
