"""The schema of release 0.1.0: issued cards, feedback, the JWT replay cache.

Release 0.1.0 created these tables without Alembic (``metadata.create_all``). A database it made
has them but no ``alembic_version``: this revision then adopts the tables it finds, as they are,
and creates only the missing ones.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "issued_cards" not in existing:
        op.create_table(
            "issued_cards",
            sa.Column("card_uuid", sa.String(64), primary_key=True),
            sa.Column("service_id", sa.String(128), nullable=False),
            sa.Column("rule_id", sa.String(64), nullable=False),
            sa.Column("indicator", sa.String(16), nullable=False),
            sa.Column("hook_instance", sa.String(128), nullable=False),
            sa.Column("suggestion_uuids", sa.Text, nullable=False),
            sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        )
        op.create_index("ix_issued_cards_rule_id", "issued_cards", ["rule_id"])
    if "feedback" not in existing:
        op.create_table(
            "feedback",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("dedupe_key", sa.String(64), nullable=False, unique=True),
            sa.Column("card_uuid", sa.String(64), nullable=False),
            sa.Column("outcome", sa.String(16), nullable=False),
            sa.Column("accepted_suggestions", sa.Text, nullable=False),
            sa.Column("override_system", sa.String(256)),
            sa.Column("override_code", sa.String(128)),
            sa.Column("override_display", sa.String(256)),
            sa.Column("has_comment", sa.Boolean, nullable=False),
            sa.Column("outcome_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        )
        op.create_index("ix_feedback_card_uuid", "feedback", ["card_uuid"])
    if "jwt_replay" not in existing:
        op.create_table(
            "jwt_replay",
            sa.Column("key_hash", sa.String(64), primary_key=True),
            sa.Column("expires_at", sa.Float, nullable=False),
        )
        op.create_index("ix_jwt_replay_expires_at", "jwt_replay", ["expires_at"])


def downgrade() -> None:
    for table in ("jwt_replay", "feedback", "issued_cards"):
        op.drop_table(table)
