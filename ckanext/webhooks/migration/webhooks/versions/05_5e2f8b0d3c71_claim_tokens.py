"""Claim tokens, and 64-bit delivery statistics.

* ``webhooks_delivery.claim_token``: set afresh by every claim and cleared when
  the outcome is recorded or the work handed back. A worker records outcomes
  and renews its lease only on rows that still carry its token, so a worker
  whose lease ran out can never overwrite the state another one now owns.
  The partial index serves the lease renewals and the recording (by token).
* ``webhooks.delivery_count`` and ``success_count`` become BIGINT: a busy hook
  passes 2^31 attempts in a few years.

Revision ID: 5e2f8b0d3c71
Revises: 4d1e7a9c2b60
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "5e2f8b0d3c71"
down_revision = "4d1e7a9c2b60"
branch_labels = None
depends_on = None

INT_MAX = 2 ** 31 - 1


def upgrade():
    op.add_column("webhooks_delivery", sa.Column("claim_token", sa.Text, nullable=True))
    op.create_index("webhooks_delivery_claim_idx", "webhooks_delivery", ["claim_token"],
                    postgresql_where=sa.text("claim_token IS NOT NULL"))
    for column in ("delivery_count", "success_count"):
        op.alter_column("webhooks", column, type_=sa.BigInteger, existing_type=sa.Integer,
                        existing_nullable=False, existing_server_default="0")


def downgrade():
    for column in ("delivery_count", "success_count"):  # counts beyond 2^31 are capped
        op.alter_column("webhooks", column, type_=sa.Integer, existing_type=sa.BigInteger,
                        existing_nullable=False, existing_server_default="0",
                        postgresql_using=f"LEAST({column}, {INT_MAX})::integer")
    op.drop_index("webhooks_delivery_claim_idx", table_name="webhooks_delivery")
    op.drop_column("webhooks_delivery", "claim_token")
