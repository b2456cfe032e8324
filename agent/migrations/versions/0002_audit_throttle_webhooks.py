"""audit log, brute-force counters, webhook outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 00:00:34.324341
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hk_audit',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('event', sa.String(length=48), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('login', sa.String(length=254), nullable=False),
    sa.Column('session_id', sa.String(length=32), nullable=True),
    sa.Column('ip', sa.String(length=64), nullable=False),
    sa.Column('user_agent', sa.String(length=512), nullable=False),
    sa.Column('device', sa.String(length=128), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hk_audit'))
    )
    with op.batch_alter_table('hk_audit', schema=None) as batch_op:
        batch_op.create_index('ix_hk_audit_created', ['created_at'], unique=False)
        batch_op.create_index('ix_hk_audit_event', ['event', 'id'], unique=False)
        batch_op.create_index('ix_hk_audit_ip', ['ip', 'id'], unique=False)
        batch_op.create_index('ix_hk_audit_user', ['user_id', 'id'], unique=False)

    op.create_table('hk_throttle',
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('window_start', agent.models.UTCDateTime(), nullable=False),
    sa.Column('locked_until', agent.models.UTCDateTime(), nullable=True),
    sa.Column('lock_count', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_hk_throttle'))
    )
    op.create_table('hk_webhook_outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.String(length=40), nullable=False),
    sa.Column('endpoint', sa.String(length=64), nullable=False),
    sa.Column('event', sa.String(length=48), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('claimed_until', agent.models.UTCDateTime(), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.String(length=200), nullable=False),
    sa.Column('delivered_at', agent.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hk_webhook_outbox')),
    sa.UniqueConstraint('message_id', name=op.f('uq_hk_webhook_outbox_message_id'))
    )
    with op.batch_alter_table('hk_webhook_outbox', schema=None) as batch_op:
        batch_op.create_index('ix_hk_webhook_outbox_due', ['status', 'next_attempt_at'],
                              unique=False)

    op.create_table('hk_webhook_attempts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.Integer(), nullable=False),
    sa.Column('attempted_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.String(length=200), nullable=False),
    sa.Column('duration_ms', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['hk_webhook_outbox.id'],
                            name=op.f('fk_hk_webhook_attempts_message_id_hk_webhook_outbox'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hk_webhook_attempts'))
    )
    with op.batch_alter_table('hk_webhook_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hk_webhook_attempts_message_id'), ['message_id'],
                              unique=False)



def downgrade() -> None:
    with op.batch_alter_table('hk_webhook_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hk_webhook_attempts_message_id'))

    op.drop_table('hk_webhook_attempts')
    with op.batch_alter_table('hk_webhook_outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_hk_webhook_outbox_due')

    op.drop_table('hk_webhook_outbox')
    op.drop_table('hk_throttle')
    with op.batch_alter_table('hk_audit', schema=None) as batch_op:
        batch_op.drop_index('ix_hk_audit_user')
        batch_op.drop_index('ix_hk_audit_ip')
        batch_op.drop_index('ix_hk_audit_event')
        batch_op.drop_index('ix_hk_audit_created')

    op.drop_table('hk_audit')
