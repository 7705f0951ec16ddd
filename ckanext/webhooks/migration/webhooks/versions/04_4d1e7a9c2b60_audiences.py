"""Audiences: each delivery is rendered for its own reader.

* ``webhooks.token_id``: the API token a hook was bound through (its reader
  falls back to anonymous once the token is revoked).
* ``webhooks_rendering``: one row per (event, audience): the entity as that
  reader's ``package_show``/``resource_show`` returned it, or, while rendering
  fails, when to try again.
* ``webhooks_delivery.audience/topic/reason``: whose rendering a delivery
  carries, and the topic it is delivered as (a visibility change turns an
  update into a ``dataset/create`` or ``dataset/delete`` for some readers).
* ``webhooks_attempt.reason``: so a redelivery says the same.
* ``webhooks_event.fanout_attempts/set_aside``: an event whose fan-out keeps
  failing is set aside instead of heading every later batch.

Revision ID: 4d1e7a9c2b60
Revises: a4e2c8d1f7b3
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "4d1e7a9c2b60"
down_revision = "a4e2c8d1f7b3"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("webhooks", sa.Column("token_id", sa.Text, nullable=True))
    op.create_table(
        "webhooks_rendering",
        sa.Column("event_id", sa.Text,
                  sa.ForeignKey("webhooks_event.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("audience", sa.Text, primary_key=True),
        sa.Column("data", JSONB, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("due", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("webhooks_rendering_due_idx", "webhooks_rendering", ["due"],
                    postgresql_where=sa.text("due IS NOT NULL"))
    op.add_column("webhooks_delivery", sa.Column("audience", sa.Text, nullable=False,
                                                 server_default=""))
    op.add_column("webhooks_delivery", sa.Column("topic", sa.Text, nullable=True))
    op.add_column("webhooks_delivery", sa.Column("reason", sa.Text, nullable=True))
    op.add_column("webhooks_attempt", sa.Column("reason", sa.Text, nullable=True))
    op.add_column("webhooks_event", sa.Column("fanout_attempts", sa.Integer, nullable=False,
                                              server_default="0"))
    op.add_column("webhooks_event", sa.Column("set_aside", sa.DateTime(timezone=True),
                                              nullable=True))


def downgrade():
    op.drop_column("webhooks_event", "set_aside")
    op.drop_column("webhooks_event", "fanout_attempts")
    op.drop_column("webhooks_attempt", "reason")
    op.drop_column("webhooks_delivery", "reason")
    op.drop_column("webhooks_delivery", "topic")
    op.drop_column("webhooks_delivery", "audience")
    op.drop_index("webhooks_rendering_due_idx", table_name="webhooks_rendering")
    op.drop_table("webhooks_rendering")
    op.drop_column("webhooks", "token_id")
