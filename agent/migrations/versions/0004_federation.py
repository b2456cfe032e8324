"""federation: hub cache, used assertions, identity links

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 00:46:58.729011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hk_federation_cache',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('body', sa.JSON(), nullable=False),
    sa.Column('etag', sa.String(length=128), nullable=False),
    sa.Column('fetched_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('attempted_at', agent.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_hk_federation_cache'))
    )
    op.create_table('hk_sso_used',
    sa.Column('issuer', sa.String(length=255), nullable=False),
    sa.Column('jti', sa.String(length=64), nullable=False),
    sa.Column('expires_at', agent.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('issuer', 'jti', name=op.f('pk_hk_sso_used'))
    )
    with op.batch_alter_table('hk_sso_used', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hk_sso_used_expires_at'), ['expires_at'], unique=False)

    op.create_table('hk_identity_links',
    sa.Column('issuer', sa.String(length=255), nullable=False),
    sa.Column('subject', sa.String(length=255), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['hk_users.id'],
                            name=op.f('fk_hk_identity_links_user_id_hk_users'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('issuer', 'subject', name=op.f('pk_hk_identity_links'))
    )
    with op.batch_alter_table('hk_identity_links', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hk_identity_links_user_id'), ['user_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('hk_identity_links', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hk_identity_links_user_id'))

    op.drop_table('hk_identity_links')
    with op.batch_alter_table('hk_sso_used', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hk_sso_used_expires_at'))

    op.drop_table('hk_sso_used')
    op.drop_table('hk_federation_cache')
