"""The audit log: one append-only row per privileged action (promotion, impersonation, reveals...).

Rows are written inside the caller's transaction, so the action and its record commit together;
database triggers (migrations 0004, 0013) refuse deletes of ``audit_log``, and every update but an
erasure's redaction (``ip`` cleared, ``details`` reduced: ``retention._redact_audit``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clerk_sync._limits import CLERK_ID_CHARS, show
from clerk_sync.store import Writer
from clerk_sync.tables import audit_log

__all__ = ["AuditEntry", "record_audit"]

# How deep ``details`` may nest (the object itself is level 1). MariaDB's JSON_VALID, which the audit trigger
# asks of every redaction, is false from 32 levels on: a deeper row could never be redacted there.
_MAX_DETAILS_DEPTH = 30


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
    details = dict(entry.details or {})
    _check_details(details)
    # An id no Clerk id column holds (a failed delivery's over-long ``data.id``, which the console reveals and
    # replays; a token's over-long ``act.sub``): kept, cut short, in the details. Stored in its column it failed
    # the action on PostgreSQL and MariaDB (503, retried in vain: one such delivery blocked every "replay all
    # failed" after it).
    ids = {name: _fitted(value, name, details) for name, value in
           (("actor", entry.actor), ("target", entry.target), ("impersonator", entry.impersonator))}
    writer.conn.execute(
        audit_log.insert().values(
            action=entry.action, actor_clerk_id=ids["actor"], target_clerk_id=ids["target"],
            impersonator_clerk_id=ids["impersonator"], details=details,
            ip=entry.ip, created_at=writer.now,
        )
    )


def _fitted(clerk_id: str | None, name: str, details: dict[str, Any]) -> str | None:
    """``clerk_id`` if its column holds it; else None, and ``details[name]`` holds it cut short."""
    if clerk_id is None or len(clerk_id) <= CLERK_ID_CHARS:
        return clerk_id
    details.setdefault(name, show(clerk_id, 200))
    return None


def _check_details(details: dict[str, Any]) -> None:
    """Refuse what one store would keep and another refuse: NaN and infinities (no JSON; PostgreSQL refuses
    them, SQLite and MariaDB stored text that every later erasure of the people named failed to read) and
    nesting MariaDB's JSON_VALID rejects (its audit trigger then refused every redaction of the row)."""
    if _depth(details) > _MAX_DETAILS_DEPTH:  # (first: json.dumps recurses)
        raise ValueError(f"audit details nest deeper than {_MAX_DETAILS_DEPTH} levels")
    if not _finite(details):
        raise ValueError("audit details cannot hold NaN or infinite numbers (they are not JSON)")


def readable_details(details: Mapping[str, Any]) -> bool:
    """Whether every store reads ``details`` as JSON (what :func:`record_audit` lets through)."""
    return _depth(details) <= _MAX_DETAILS_DEPTH and _finite(details)


def _finite(details: Mapping[str, Any]) -> bool:
    try:
        json.dumps(details, allow_nan=False)
    except ValueError:
        return False
    return True


def _depth(value: Any) -> int:
    """How many containers deep ``value`` nests (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, list | tuple) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest
