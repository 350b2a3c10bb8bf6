"""Warm pools, and per-sandbox pool membership and restart count.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("pool", sa.String(128), nullable=True))
        batch.add_column(sa.Column("restarts", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_sandboxes_pool", "sandboxes", ["pool"])
    op.create_table(
        "pools",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("template", sa.String(255), nullable=False),
        sa.Column("runtime", sa.String(64), nullable=True),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("target_size", sa.Integer, nullable=False),
        sa.Column("max_idle_seconds", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pools")
    op.drop_index("ix_sandboxes_pool", "sandboxes")
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("restarts")
        batch.drop_column("pool")
