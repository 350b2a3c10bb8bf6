"""The pool claim's index: (pool, tenant, state, created_at, id) replaces (pool).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_sandboxes_pool", "sandboxes")
    op.create_index(
        "ix_sandboxes_pool_claim", "sandboxes", ["pool", "tenant", "state", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_sandboxes_pool_claim", "sandboxes")
    op.create_index("ix_sandboxes_pool", "sandboxes", ["pool"])
