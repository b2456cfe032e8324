"""audit log read in time order: each filter's index ends with (created_at, id)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 17:00:00

The activity log pages newest first by (created_at, id). Ordered by id alone, a filter on a
past time window made PostgreSQL walk the primary key back through every newer row.
"""

from __future__ import annotations

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

BEFORE = {
    'ix_hk_audit_created': ['created_at'],
    'ix_hk_audit_event': ['event', 'id'],
    'ix_hk_audit_ip': ['ip', 'id'],
    'ix_hk_audit_user': ['user_id', 'id'],
}
AFTER = {
    'ix_hk_audit_created': ['created_at', 'id'],
    'ix_hk_audit_event': ['event', 'created_at', 'id'],
    'ix_hk_audit_ip': ['ip', 'created_at', 'id'],
    'ix_hk_audit_user': ['user_id', 'created_at', 'id'],
}


def _replace(indexes: dict[str, list[str]]) -> None:
    for name, columns in indexes.items():
        op.drop_index(name, table_name='hk_audit')
        op.create_index(name, 'hk_audit', columns, unique=False)


def upgrade() -> None:
    _replace(AFTER)


def downgrade() -> None:
    _replace(BEFORE)
