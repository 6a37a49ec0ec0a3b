"""The audit log: one append-only row per privileged action (promotion, impersonation, reveals...).

Rows are written inside the caller's transaction, so the action and its record commit together;
database triggers (migrations 0004, 0013) refuse deletes of ``audit_log``, and every update but an
erasure's redaction (``ip`` cleared, ``details`` reduced: ``retention._redact_audit``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clerk_sync.store import Writer
from clerk_sync.tables import audit_log

__all__ = ["AuditEntry", "record_audit"]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One privileged action; ``impersonator`` is set when an admin acted as someone else."""

    action: str
    actor: str | None
    target: str | None = None
    impersonator: str | None = None
    details: Mapping[str, Any] | None = None
    ip: str | None = None


def record_audit(writer: Writer, entry: AuditEntry) -> None:
    """Append to ``audit_log`` inside the caller's transaction (rows are never deleted; only an erasure redacts)."""
    if not entry.action:
        raise ValueError("audit entries need an action")
    writer.conn.execute(
        audit_log.insert().values(
            action=entry.action, actor_clerk_id=entry.actor, target_clerk_id=entry.target,
            impersonator_clerk_id=entry.impersonator, details=dict(entry.details or {}),
            ip=entry.ip, created_at=writer.now,
        )
    )
