"""initial schema: users, sessions, refresh tokens, password resets

Revision ID: 0001
Revises: 
Create Date: 2026-11-27 23:46:04.641404
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hk_users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_login', sa.String(length=60), nullable=False),
    sa.Column('login_key', sa.String(length=60), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=False),
    sa.Column('email_key', sa.String(length=254), nullable=False),
    sa.Column('display_name', sa.String(length=250), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('roles', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('email_verified', sa.Boolean(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('password_changed_at', agent.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hk_users')),
    sa.UniqueConstraint('email_key', name=op.f('uq_hk_users_email_key')),
    sa.UniqueConstraint('login_key', name=op.f('uq_hk_users_login_key'))
    )
    op.create_table('hk_password_resets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('expires_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('used_at', agent.models.UTCDateTime(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['hk_users.id'],
                            name=op.f('fk_hk_password_resets_user_id_hk_users'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hk_password_resets'))
    )
    with op.batch_alter_table('hk_password_resets', schema=None) as batch_op:
        batch_op.create_index('ix_hk_password_resets_user_active', ['user_id', 'used_at'],
                              unique=False)

    op.create_table('hk_sessions',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('last_seen_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('expires_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('revoked_at', agent.models.UTCDateTime(), nullable=True),
    sa.Column('revoke_reason', sa.String(length=32), nullable=True),
    sa.Column('ip', sa.String(length=64), nullable=False),
    sa.Column('user_agent', sa.String(length=512), nullable=False),
    sa.Column('device', sa.String(length=128), nullable=False),
    sa.Column('access_jti', sa.String(length=64), nullable=False),
    sa.Column('access_iat', sa.Integer(), nullable=False),
    sa.Column('access_exp', sa.Integer(), nullable=False),
    sa.Column('prev_access_jti', sa.String(length=64), nullable=True),
    sa.Column('rotated_at', agent.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['hk_users.id'],
                            name=op.f('fk_hk_sessions_user_id_hk_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hk_sessions'))
    )
    with op.batch_alter_table('hk_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hk_sessions_user_id'), ['user_id'], unique=False)

    op.create_table('hk_refresh_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('session_id', sa.String(length=32), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('expires_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('used_at', agent.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['session_id'], ['hk_sessions.id'],
                            name=op.f('fk_hk_refresh_tokens_session_id_hk_sessions'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hk_refresh_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_hk_refresh_tokens_token_hash'))
    )
    with op.batch_alter_table('hk_refresh_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hk_refresh_tokens_session_id'), ['session_id'],
                              unique=False)



def downgrade() -> None:
    with op.batch_alter_table('hk_refresh_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hk_refresh_tokens_session_id'))

    op.drop_table('hk_refresh_tokens')
    with op.batch_alter_table('hk_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hk_sessions_user_id'))

    op.drop_table('hk_sessions')
    with op.batch_alter_table('hk_password_resets', schema=None) as batch_op:
        batch_op.drop_index('ix_hk_password_resets_user_active')

    op.drop_table('hk_password_resets')
    op.drop_table('hk_users')
