"""Create the webhooks, webhooks_event and webhooks_delivery tables.

Revision ID: 3b6f2a1c9d10
Revises:
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "3b6f2a1c9d10"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade():
    op.create_table(
        "webhooks",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("secret", sa.Text, nullable=True),
        sa.Column("user_id", sa.Text, nullable=True),
        sa.Column("created", TZ, nullable=False),
        sa.Column("delivery_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("success_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_delivery", TZ, nullable=True),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("consecutive_4xx", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failing_since", TZ, nullable=True),
        sa.UniqueConstraint("topic", "address", name="webhooks_topic_address_key"),
    )
    op.create_index("webhooks_host_idx", "webhooks", ["host"])
    # Statistics are updated after every delivery: room on each page lets
    # PostgreSQL update rows in place (HOT), without touching the indexes.
    op.execute("ALTER TABLE webhooks SET (fillfactor = 50)")
    op.create_table(
        "webhooks_event",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("object_id", sa.Text, nullable=False),
        sa.Column("package_id", sa.Text, nullable=True),
        sa.Column("created", TZ, nullable=False),
        sa.Column("snapshot", JSONB, nullable=True),
        sa.Column("data", JSONB, nullable=True),
        sa.Column("fanned_out", TZ, nullable=True),
    )
    op.create_index("webhooks_event_pending_idx", "webhooks_event", ["created"],
                    postgresql_where=sa.text("fanned_out IS NULL"))
    # Workers LISTEN on this channel: PostgreSQL notifies them when a writer's
    # transaction that recorded events commits (and never if it rolls back),
    # so the web process itself never talks to the broker.
    op.execute("""
        CREATE OR REPLACE FUNCTION webhooks_event_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('ckanext_webhooks_events', '');
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER webhooks_event_notify AFTER INSERT ON webhooks_event
        FOR EACH STATEMENT EXECUTE FUNCTION webhooks_event_notify()
    """)
    op.create_table(
        "webhooks_delivery",
        sa.Column("event_id", sa.Text,
                  sa.ForeignKey("webhooks_event.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("hook_id", sa.Text,
                  sa.ForeignKey("webhooks.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("due", TZ, nullable=False),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index("webhooks_delivery_due_idx", "webhooks_delivery", ["due"])
    op.create_index("webhooks_delivery_hook_idx", "webhooks_delivery", ["hook_id"])


def downgrade():
    op.drop_table("webhooks_delivery")
    op.execute("DROP TRIGGER IF EXISTS webhooks_event_notify ON webhooks_event")
    op.drop_table("webhooks_event")
    op.execute("DROP FUNCTION IF EXISTS webhooks_event_notify()")
    op.drop_table("webhooks")
