"""fleet health: the last health report of each member site

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models  # UTCDateTime lives there

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hub_site_health',
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('reported_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('agent_version', sa.String(length=64), nullable=False),
    sa.Column('clock_skew_seconds', sa.Float(), nullable=False),
    sa.Column('key_fingerprint', sa.String(length=128), nullable=False),
    sa.Column('last_exchange_at', agent.models.UTCDateTime(), nullable=True),
    sa.Column('last_sync_at', agent.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['site_id'], ['hub_sites.id'],
                            name=op.f('fk_hub_site_health_site_id_hub_sites'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('site_id', name=op.f('pk_hub_site_health'))
    )


def downgrade() -> None:
    op.drop_table('hub_site_health')
