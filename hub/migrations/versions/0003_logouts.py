"""logout everywhere: hub_logouts, published in the directory for 24 hours

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models  # UTCDateTime lives there

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hub_logouts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('site_key', sa.String(length=64), nullable=False),
    sa.Column('issuer', sa.String(length=2048), nullable=False),
    sa.Column('subject', sa.String(length=255), nullable=False),
    sa.Column('expires_at', agent.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_logouts'))
    )
    with op.batch_alter_table('hub_logouts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_logouts_expires_at'), ['expires_at'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('hub_logouts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_logouts_expires_at'))
    op.drop_table('hub_logouts')
