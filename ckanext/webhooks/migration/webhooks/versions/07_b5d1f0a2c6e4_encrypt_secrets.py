"""Signing secrets encrypted at rest (see ``ckanext/webhooks/crypto.py``).

Every ``webhooks.secret`` and ``previous_secret`` still in clear (``whsec_...``)
is encrypted with the first configured key (``ckanext.webhooks.secret_keys``,
or the key derived from CKAN's ``SECRET_KEY``). The downgrade decrypts them.

Revision ID: b5d1f0a2c6e4
Revises: 8a3c5e7f1b92
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "b5d1f0a2c6e4"
down_revision = "8a3c5e7f1b92"
branch_labels = None
depends_on = None


def _convert(column: str, convert, clear: bool) -> None:
    conn = op.get_bind()
    condition = "LIKE 'whsec\\_%'" if clear else "NOT LIKE 'whsec\\_%'"
    rows = conn.execute(sa.text(
        f"SELECT id, {column} FROM webhooks WHERE {column} {condition}")).all()
    for hook_id, value in rows:
        conn.execute(sa.text(f"UPDATE webhooks SET {column} = :v WHERE id = :id"),
                     {"v": convert(value), "id": hook_id})


def upgrade():
    from ckanext.webhooks import crypto
    for column in ("secret", "previous_secret"):
        _convert(column, crypto.seal, clear=True)


def downgrade():
    from ckanext.webhooks import crypto
    for column in ("secret", "previous_secret"):
        _convert(column, crypto.unseal, clear=False)
