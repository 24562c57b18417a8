"""external runs: scalar_metrics for any other scalar a script logs, the heartbeat of a run's client, and step
columns an external script may leave out (progress, lr, times) made nullable

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Columns the built-in trainer always writes but an external script may not know (its rows then hold NULL).
OPTIONAL = [('epoch', sa.Float()), ('samples', sa.Integer()), ('tokens', sa.Integer()), ('lr', sa.Float()),
            ('wall_time', sa.Float()), ('step_time', sa.Float())]


def upgrade() -> None:
    op.create_table('scalar_metrics',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('value', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ),
    sa.PrimaryKeyConstraint('run_id', 'key', 'step'),
    sqlite_with_rowid=False
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_seconds', sa.Float(), nullable=True))
    # SQLite cannot drop NOT NULL in place: batch mode copies the table, which must stay WITHOUT ROWID.
    with op.batch_alter_table('step_metrics', schema=None, table_kwargs={'sqlite_with_rowid': False}) as batch_op:
        for name, type_ in OPTIONAL:
            batch_op.alter_column(name, existing_type=type_, nullable=True)


def downgrade() -> None:
    op.execute('DELETE FROM step_metrics WHERE ' + ' OR '.join(f'{name} IS NULL' for name, _ in OPTIONAL))
    with op.batch_alter_table('step_metrics', schema=None, table_kwargs={'sqlite_with_rowid': False}) as batch_op:
        for name, type_ in OPTIONAL:
            batch_op.alter_column(name, existing_type=type_, nullable=False)
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_seconds')
        batch_op.drop_column('heartbeat_at')
    op.drop_table('scalar_metrics')
