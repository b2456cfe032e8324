"""site policies: versioned settings per member site, what each agent applied, redeliveries

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models  # UTCDateTime lives there

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hub_site_policies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('created_by', sa.String(length=120), nullable=False),
    sa.Column('note', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['site_id'], ['hub_sites.id'],
                            name=op.f('fk_hub_site_policies_site_id_hub_sites'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_site_policies')),
    sa.UniqueConstraint('site_id', 'version', name=op.f('uq_hub_site_policies_site_id'))
    )
    op.create_index(op.f('ix_hub_site_policies_site_id'), 'hub_site_policies', ['site_id'])
    op.create_table('hub_webhook_redeliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.String(length=64), nullable=False),
    sa.Column('requested_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('requested_by', sa.String(length=120), nullable=False),
    sa.Column('expires_at', agent.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['site_id'], ['hub_sites.id'],
                            name=op.f('fk_hub_webhook_redeliveries_site_id_hub_sites'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_webhook_redeliveries'))
    )
    op.create_index(op.f('ix_hub_webhook_redeliveries_site_id'), 'hub_webhook_redeliveries',
                    ['site_id'])
    op.create_index(op.f('ix_hub_webhook_redeliveries_expires_at'), 'hub_webhook_redeliveries',
                    ['expires_at'])
    with op.batch_alter_table('hub_site_health') as batch:
        batch.add_column(sa.Column('policy_version', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('pinned', sa.JSON(), nullable=False, server_default='[]'))
        batch.add_column(sa.Column('policy_error', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('webhook_log', sa.JSON(), nullable=False,
                                   server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('hub_site_health') as batch:
        batch.drop_column('webhook_log')
        batch.drop_column('policy_error')
        batch.drop_column('pinned')
        batch.drop_column('policy_version')
    op.drop_index(op.f('ix_hub_webhook_redeliveries_expires_at'), 'hub_webhook_redeliveries')
    op.drop_index(op.f('ix_hub_webhook_redeliveries_site_id'), 'hub_webhook_redeliveries')
    op.drop_table('hub_webhook_redeliveries')
    op.drop_index(op.f('ix_hub_site_policies_site_id'), 'hub_site_policies')
    op.drop_table('hub_site_policies')
