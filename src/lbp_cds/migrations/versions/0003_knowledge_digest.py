"""Keep, with each issued card, the digest of the knowledge pack that issued it.

Feedback can then be read per knowledge version: how a rule's override rate moved after its
clinical content changed. Cards issued before this revision have none (NULL).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("issued_cards") as batch:
        batch.add_column(sa.Column("knowledge_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("issued_cards") as batch:
        batch.drop_column("knowledge_digest")
