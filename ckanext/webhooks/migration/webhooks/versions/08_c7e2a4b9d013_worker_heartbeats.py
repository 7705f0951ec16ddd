"""Worker heartbeats, for ``ckan webhooks health`` and the listener election.

``webhooks_worker``: one row per worker (its Celery node name), its host and
process id, when it started, its last heartbeat (written every
``ckanext.webhooks.heartbeat_seconds`` by its listener thread) and whether it
is the one worker that listens for new events (the elected listener), and
how many fan-out tasks its listener has published since it started.

Revision ID: c7e2a4b9d013
Revises: b5d1f0a2c6e4
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "c7e2a4b9d013"
down_revision = "b5d1f0a2c6e4"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "webhooks_worker",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("listener", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("wakes", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade():
    op.drop_table("webhooks_worker")
