"""job runs: one row per period of a scheduled job, claimed once across processes

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 03:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hk_job_runs',
    sa.Column('job', sa.String(length=64), nullable=False),
    sa.Column('slot', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('runner', sa.String(length=128), nullable=False),
    sa.Column('started_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('finished_at', agent.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('job', 'slot', name=op.f('pk_hk_job_runs'))
    )
    with op.batch_alter_table('hk_job_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hk_job_runs_started_at'), ['started_at'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('hk_job_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hk_job_runs_started_at'))
    op.drop_table('hk_job_runs')
