"""Bookkeeping of ``clerk-sync reconcile`` (not contract tables): runs with their cursor, and seen ids.

Defined on :data:`clerk_sync.tables.metadata` (``tables`` imports this module), mirrored by migration 0003.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from clerk_sync.tables import PK, JSONType, Timestamp, metadata

__all__ = ["reconcile_runs", "reconcile_seen", "seen_columns"]

# One row per run: where it is (phase + offset), what it did so far, and a heartbeat so a second
# invocation can tell a live run from a killed one.
reconcile_runs = sa.Table(
    "reconcile_runs",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("since", Timestamp, nullable=True),
    sa.Column("phase", sa.String(32), nullable=False),
    sa.Column("cursor", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated", sa.Integer, nullable=False, server_default="0"),
    sa.Column("deleted", sa.Integer, nullable=False, server_default="0"),
    sa.Column("unchanged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("duration_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("details", JSONType, nullable=False, default=dict),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("heartbeat_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp, nullable=True),
)

# The Clerk ids a run has listed, per table: staged here rather than in memory so 10 M users cost
# no RAM and a resumed run still knows what it saw before the kill.
def seen_columns() -> list[sa.Column[Any]]:
    """Fresh columns of ``reconcile_seen`` (a dry run builds a TEMPORARY twin from them)."""
    return [
        sa.Column("run_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("entity", sa.String(32), primary_key=True),
        sa.Column("clerk_id", sa.String(64), primary_key=True),
    ]


reconcile_seen = sa.Table("reconcile_seen", metadata, *seen_columns())
