"""Upstream jobs: each job pulled from an upstream WMS (DIRAC) and how far its outcome went back

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 01:40:00
"""

import sqlalchemy as sa
from alembic import op

import airlock.db.schema

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upstream_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("upstream", sa.String(length=32), nullable=False),
        sa.Column("ref", sa.String(length=200), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="1", nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("owner_group", sa.String(length=200), nullable=True),
        sa.Column("description", sa.JSON(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("reported", sa.String(length=512), nullable=True),
        sa.Column("sandbox_ref", sa.String(length=1024), nullable=True),
        sa.Column("registered", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("heartbeat_at", airlock.db.schema.UTCDateTime(), nullable=True),
        sa.Column("created_at", airlock.db.schema.UTCDateTime(), nullable=False),
        sa.Column("updated_at", airlock.db.schema.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_upstream_jobs_batch_id_batches")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_upstream_jobs_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upstream_jobs")),
        sa.UniqueConstraint("upstream", "ref", "attempt", name="uq_upstream_jobs_ref"),
    )
    with op.batch_alter_table("upstream_jobs", schema=None) as batch_op:
        batch_op.create_index("ix_upstream_jobs_state", ["upstream", "state"], unique=False)
        batch_op.create_index("ix_upstream_jobs_job", ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("upstream_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_upstream_jobs_job")
        batch_op.drop_index("ix_upstream_jobs_state")
    op.drop_table("upstream_jobs")
