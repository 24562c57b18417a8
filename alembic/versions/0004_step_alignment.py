"""per-step update_cos, grad_alignment and skipped (fp16), with their rollup columns

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rows written before this revision have no value of the new columns (NULL), which their rollups already
# say: a rollup column without values is NULL.
ROLLUP_COLUMNS = [
    ('update_cos_min', sa.Float()),
    ('update_cos_min_step', sa.Integer()),
    ('update_cos_max', sa.Float()),
    ('update_cos_max_step', sa.Integer()),
    ('grad_alignment_min', sa.Float()),
    ('grad_alignment_min_step', sa.Integer()),
    ('grad_alignment_max', sa.Float()),
    ('grad_alignment_max_step', sa.Integer()),
    ('skipped_min', sa.Float()),
    ('skipped_min_step', sa.Integer()),
    ('skipped_max', sa.Float()),
    ('skipped_max_step', sa.Integer()),
]


def upgrade() -> None:
    with op.batch_alter_table('step_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('update_cos', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('grad_alignment', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('skipped', sa.Integer(), nullable=True))
    with op.batch_alter_table('step_rollups', schema=None) as batch_op:
        for name, type_ in ROLLUP_COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('step_rollups', schema=None) as batch_op:
        for name, _ in reversed(ROLLUP_COLUMNS):
            batch_op.drop_column(name)
    with op.batch_alter_table('step_metrics', schema=None) as batch_op:
        batch_op.drop_column('skipped')
        batch_op.drop_column('grad_alignment')
        batch_op.drop_column('update_cos')
