"""BOINC project: the volunteer's BOINC password hash, input MD5s, when a result abort was sent

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 19:00:00
"""

import sqlalchemy as sa
from alembic import op

import airlock.db.schema

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("volunteers") as batch:
        batch.add_column(sa.Column("boinc_passwd_hash", sa.String(length=256), nullable=True))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("md5", sa.String(length=32), nullable=True))
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("abort_sent_at", airlock.db.schema.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("abort_sent_at")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("md5")
    with op.batch_alter_table("volunteers") as batch:
        batch.drop_column("boinc_passwd_hash")
