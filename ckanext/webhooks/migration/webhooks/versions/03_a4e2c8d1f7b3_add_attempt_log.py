"""Add webhooks_attempt, the delivery log.

Revision ID: a4e2c8d1f7b3
Revises: 7c1d9e4b2a55
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "a4e2c8d1f7b3"
down_revision = "7c1d9e4b2a55"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "webhooks_attempt",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("hook_id", sa.Text,
                  sa.ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("response", sa.Text, nullable=True),
    )
    op.create_index("webhooks_attempt_hook_idx", "webhooks_attempt", ["hook_id", "at"])
    op.create_index("webhooks_attempt_at_idx", "webhooks_attempt", ["at"])


def downgrade():
    op.drop_table("webhooks_attempt")
