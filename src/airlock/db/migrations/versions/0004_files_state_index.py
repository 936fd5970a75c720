"""ix_files_state led by state: files are found by task or job through the partial unique indexes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 06:00:00
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_files_state", table_name="files")
    op.create_index("ix_files_state", "files", ["state", "kind"])


def downgrade() -> None:
    op.drop_index("ix_files_state", table_name="files")
    op.create_index("ix_files_state", "files", ["kind", "state"])
