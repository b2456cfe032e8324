"""keys: signing keys and the hub secret, stored for every worker and rotated

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hk_keys',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('kid', sa.String(length=128), nullable=False),
    sa.Column('alg', sa.String(length=8), nullable=False),
    sa.Column('material', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('active_from', agent.models.UTCDateTime(), nullable=True),
    sa.Column('rotated_at', agent.models.UTCDateTime(), nullable=True),
    sa.Column('retire_at', agent.models.UTCDateTime(), nullable=True),
    sa.Column('hub_status', sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hk_keys')),
    sa.UniqueConstraint('purpose', 'kid', name=op.f('uq_hk_keys_purpose'))
    )


def downgrade() -> None:
    op.drop_table('hk_keys')
