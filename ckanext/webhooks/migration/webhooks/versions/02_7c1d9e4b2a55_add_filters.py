"""Add the dataset, organization and group filters of a hook.

Revision ID: 7c1d9e4b2a55
Revises: 3b6f2a1c9d10
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "7c1d9e4b2a55"
down_revision = "3b6f2a1c9d10"
branch_labels = None
depends_on = None

UNIQUE = ("CREATE UNIQUE INDEX webhooks_subscription_key ON webhooks (topic, address, "
          "coalesce(dataset_id, ''), coalesce(organization_id, ''), coalesce(group_id, ''))")


def upgrade():
    for column in ("dataset_id", "organization_id", "group_id"):
        op.add_column("webhooks", sa.Column(column, sa.Text, nullable=True))
    # One subscription per topic, address and filters (the same address may
    # follow two datasets).
    op.drop_constraint("webhooks_topic_address_key", "webhooks", type_="unique")
    op.execute(UNIQUE)


def downgrade():
    op.execute("DROP INDEX webhooks_subscription_key")
    op.execute("DELETE FROM webhooks WHERE dataset_id IS NOT NULL "
               "OR organization_id IS NOT NULL OR group_id IS NOT NULL")
    op.create_unique_constraint("webhooks_topic_address_key", "webhooks", ["topic", "address"])
    for column in ("group_id", "organization_id", "dataset_id"):
        op.drop_column("webhooks", column)
