"""The SMART intake app's server-side sessions.

A browser that launched the intake app holds a random secret in a cookie; the row holds a hash of
it and the session (OAuth state, PKCE verifier, access token, unsaved answers) encrypted with a
key derived from it. The database alone gives neither a usable cookie nor a token. Rows live at
most as long as the session (``expires_at``) and are deleted by ``lbp-cds purge`` and on use.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "smart_sessions",
        sa.Column("sid", sa.String(32), primary_key=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("smart_sessions")
