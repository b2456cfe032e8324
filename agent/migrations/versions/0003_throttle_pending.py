"""brute-force counters: attempts in flight

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 00:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hk_throttle', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pending', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('pending_since', agent.models.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hk_throttle', schema=None) as batch_op:
        batch_op.drop_column('pending_since')
        batch_op.drop_column('pending')
