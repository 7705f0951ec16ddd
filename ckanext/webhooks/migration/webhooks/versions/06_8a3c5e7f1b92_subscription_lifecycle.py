"""Subscriptions as webhook users expect them: several topics, pause, rotation.

* ``webhooks.topics`` (text[]) replaces ``topic``: the topics a hook hears,
  with the wildcards ``dataset/*``, ``resource/*`` and ``*``. A GIN index
  serves the fan-out's ``topics && ...``. The unique index on (topic,
  address, filters) goes: overlapping topics are refused by the actions,
  under an advisory lock per address.
* ``active``, ``paused_at``, ``pause_reason``: a paused hook hears nothing
  and its pending deliveries are held (``due`` = infinity) until it resumes.
  ``pause_reason`` is NULL when its owner paused it, or says which rule
  paused it (deleted after ``ckanext.webhooks.pause_grace_days``).
* ``previous_secret``, ``previous_secret_until``: the secret replaced by a
  rotation, still signing beside the new one until then.
* ``site``: the registrable domain of the hook's host (or its IP address),
  which the per-site cap counts.

Revision ID: 8a3c5e7f1b92
Revises: 5e2f8b0d3c71
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision = "8a3c5e7f1b92"
down_revision = "5e2f8b0d3c71"
branch_labels = None
depends_on = None

UNIQUE = ("CREATE UNIQUE INDEX webhooks_subscription_key ON webhooks (topic, address, "
          "coalesce(dataset_id, ''), coalesce(organization_id, ''), coalesce(group_id, ''))")


def upgrade():
    op.add_column("webhooks", sa.Column("topics", ARRAY(sa.Text), nullable=True))
    op.execute("UPDATE webhooks SET topics = ARRAY[topic]")
    op.alter_column("webhooks", "topics", nullable=False)
    op.execute("DROP INDEX webhooks_subscription_key")
    op.drop_column("webhooks", "topic")
    op.create_index("webhooks_topics_idx", "webhooks", ["topics"], postgresql_using="gin")
    op.create_index("webhooks_address_idx", "webhooks", ["address"])
    op.add_column("webhooks", sa.Column("active", sa.Boolean, nullable=False,
                                        server_default=sa.true()))
    op.add_column("webhooks", sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("webhooks", sa.Column("pause_reason", sa.Text, nullable=True))
    op.add_column("webhooks", sa.Column("previous_secret", sa.Text, nullable=True))
    op.add_column("webhooks", sa.Column("previous_secret_until", sa.DateTime(timezone=True),
                                        nullable=True))
    from ckanext.webhooks.guard import site_of
    op.add_column("webhooks", sa.Column("site", sa.Text, nullable=True))
    conn = op.get_bind()
    for (host,) in conn.execute(sa.text("SELECT DISTINCT host FROM webhooks")).all():
        conn.execute(sa.text("UPDATE webhooks SET site = :site WHERE host = :host"),
                     {"site": site_of(host), "host": host})
    op.alter_column("webhooks", "site", nullable=False)
    op.create_index("webhooks_site_idx", "webhooks", ["site"])


def downgrade():
    op.drop_index("webhooks_site_idx", table_name="webhooks")
    op.drop_column("webhooks", "site")
    # A hook of several topics becomes one hook per topic would change ids:
    # it keeps its first topic. Held deliveries of paused hooks are due again.
    op.execute("UPDATE webhooks_delivery d SET due = now() FROM webhooks w "
               "WHERE w.id = d.hook_id AND NOT w.active")
    for column in ("previous_secret_until", "previous_secret", "pause_reason", "paused_at",
                   "active"):
        op.drop_column("webhooks", column)
    op.drop_index("webhooks_address_idx", table_name="webhooks")
    op.drop_index("webhooks_topics_idx", table_name="webhooks")
    op.add_column("webhooks", sa.Column("topic", sa.Text, nullable=True))
    op.execute("UPDATE webhooks SET topic = CASE WHEN topics[1] LIKE '%*' "
               "THEN 'dataset/update' ELSE topics[1] END")
    op.execute("DELETE FROM webhooks w USING webhooks o WHERE w.topic = o.topic "
               "AND w.address = o.address "
               "AND coalesce(w.dataset_id, '') = coalesce(o.dataset_id, '') "
               "AND coalesce(w.organization_id, '') = coalesce(o.organization_id, '') "
               "AND coalesce(w.group_id, '') = coalesce(o.group_id, '') AND w.id > o.id")
    op.alter_column("webhooks", "topic", nullable=False)
    op.execute(UNIQUE)
    op.drop_column("webhooks", "topics")
