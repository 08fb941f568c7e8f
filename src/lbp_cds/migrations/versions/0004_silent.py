"""Mark the cards of rules run silently: evaluated and recorded, never shown.

A site switches a new rule on after a silent period (``LBP_CDS_SILENT_RULES``): its cards are
kept with ``silent`` true so that ``lbp-cds burden`` can say how often it would have fired,
apart from the cards clinicians saw. Cards issued before this revision were all shown (false).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("issued_cards") as batch:
        # A server default: rows already there, and rows an older replica still inserts during
        # a rolling update (it does not know the column), are shown cards.
        batch.add_column(sa.Column("silent", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("issued_cards") as batch:
        batch.drop_column("silent")
