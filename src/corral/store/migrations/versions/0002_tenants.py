"""Tenants, API keys, sandbox metadata and owners; names unique per tenant.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("meta", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("owner", sa.String(160), nullable=True))
    op.create_index("ux_sandboxes_tenant_name", "sandboxes", ["tenant", "name"], unique=True)
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("max_sandboxes", sa.Integer, nullable=True),
        sa.Column("max_vcpus", sa.Float, nullable=True),
        sa.Column("max_memory", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("description", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_index("ux_sandboxes_tenant_name", "sandboxes")
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("owner")
        batch.drop_column("meta")
