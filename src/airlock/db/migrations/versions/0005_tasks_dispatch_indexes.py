"""ix_tasks_ready and ix_tasks_volunteer_job (PostgreSQL): a work request reads the ready tasks and the
volunteer's own tasks of a job by index, not every task ever run (PostgreSQL's planner did, without them)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 16:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

READY = sa.text("state = 'ready'")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":  # SQLite's planner needs neither
        return
    op.create_index("ix_tasks_ready", "tasks", ["id"], postgresql_where=READY)
    op.create_index("ix_tasks_volunteer_job", "tasks", ["volunteer_id", "job_id"])


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_tasks_volunteer_job", table_name="tasks")
    op.drop_index("ix_tasks_ready", table_name="tasks")
