"""hub registry: sites, secrets, keys, admins, nonces, events

Revision ID: 0001
Revises: 
Create Date: 2026-11-28 00:13:23.722660
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import agent.models  # UTCDateTime lives there

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hub_admins',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=60), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('locked_until', agent.models.UTCDateTime(), nullable=True),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('last_login_at', agent.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_admins')),
    sa.UniqueConstraint('username', name=op.f('uq_hub_admins_username'))
    )
    op.create_table('hub_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('source', sa.String(length=8), nullable=False),
    sa.Column('site_key', sa.String(length=64), nullable=True),
    sa.Column('remote_id', sa.String(length=64), nullable=True),
    sa.Column('event', sa.String(length=48), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=120), nullable=False),
    sa.Column('ip', sa.String(length=64), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_events')),
    sa.UniqueConstraint('site_key', 'remote_id', name=op.f('uq_hub_events_site_key'))
    )
    with op.batch_alter_table('hub_events', schema=None) as batch_op:
        batch_op.create_index('ix_hub_events_created', ['created_at'], unique=False)
        batch_op.create_index('ix_hub_events_event', ['event', 'id'], unique=False)
        batch_op.create_index('ix_hub_events_site', ['site_key', 'id'], unique=False)

    op.create_table('hub_job_runs',
    sa.Column('job', sa.String(length=64), nullable=False),
    sa.Column('last_run_at', agent.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('job', name=op.f('pk_hub_job_runs'))
    )
    op.create_table('hub_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kid', sa.String(length=128), nullable=False),
    sa.Column('alg', sa.String(length=16), nullable=False),
    sa.Column('private_ciphertext', sa.LargeBinary(), nullable=False),
    sa.Column('jwk', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('retire_after', agent.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_keys')),
    sa.UniqueConstraint('kid', name=op.f('uq_hub_keys_kid'))
    )
    op.create_table('hub_nonces',
    sa.Column('site_key', sa.String(length=64), nullable=False),
    sa.Column('nonce', sa.String(length=64), nullable=False),
    sa.Column('seen_at', agent.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('site_key', 'nonce', name=op.f('pk_hub_nonces'))
    )
    with op.batch_alter_table('hub_nonces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_nonces_seen_at'), ['seen_at'], unique=False)

    op.create_table('hub_settings',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.JSON(), nullable=False),
    sa.Column('updated_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('updated_by', sa.String(length=60), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_hub_settings'))
    )
    op.create_table('hub_sites',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_key', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=120), nullable=False),
    sa.Column('base_url', sa.String(length=2048), nullable=False),
    sa.Column('issuer', sa.String(length=2048), nullable=False),
    sa.Column('allowed_origins', sa.JSON(), nullable=False),
    sa.Column('redirect_uris', sa.JSON(), nullable=False),
    sa.Column('contact', sa.String(length=254), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('updated_at', agent.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_sites')),
    sa.UniqueConstraint('name', name=op.f('uq_hub_sites_name')),
    sa.UniqueConstraint('site_key', name=op.f('uq_hub_sites_site_key'))
    )
    op.create_table('hub_site_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('kid', sa.String(length=128), nullable=False),
    sa.Column('alg', sa.String(length=16), nullable=False),
    sa.Column('jwk', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('retired_at', agent.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['site_id'], ['hub_sites.id'],
                            name=op.f('fk_hub_site_keys_site_id_hub_sites'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_site_keys')),
    sa.UniqueConstraint('kid', name=op.f('uq_hub_site_keys_kid'))
    )
    with op.batch_alter_table('hub_site_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_site_keys_site_id'), ['site_id'], unique=False)

    op.create_table('hub_site_secrets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', agent.models.UTCDateTime(), nullable=False),
    sa.Column('expires_at', agent.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['site_id'], ['hub_sites.id'],
                            name=op.f('fk_hub_site_secrets_site_id_hub_sites'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_site_secrets')),
    sa.UniqueConstraint('site_id', 'version', name=op.f('uq_hub_site_secrets_site_id'))
    )
    with op.batch_alter_table('hub_site_secrets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_site_secrets_site_id'), ['site_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('hub_site_secrets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_site_secrets_site_id'))

    op.drop_table('hub_site_secrets')
    with op.batch_alter_table('hub_site_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_site_keys_site_id'))

    op.drop_table('hub_site_keys')
    op.drop_table('hub_sites')
    op.drop_table('hub_settings')
    with op.batch_alter_table('hub_nonces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_nonces_seen_at'))

    op.drop_table('hub_nonces')
    op.drop_table('hub_keys')
    op.drop_table('hub_job_runs')
    with op.batch_alter_table('hub_events', schema=None) as batch_op:
        batch_op.drop_index('ix_hub_events_site')
        batch_op.drop_index('ix_hub_events_event')
        batch_op.drop_index('ix_hub_events_created')

    op.drop_table('hub_events')
    op.drop_table('hub_admins')
