"""Counting reads the tests assert on: some go through the driver, past SQLAlchemy's events."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.store import Store

__all__ = ["membership_reads"]


@contextmanager
def membership_reads(store: Store | None = None, *, note: Callable[[], str] | None = None) -> Iterator[list[str]]:
    """Each read of ``organization_memberships`` (on ``store``'s engine; None: any), ``note()`` of each if given:
    the statements SQLAlchemy runs, and the standing reads (:meth:`Authenticator._membership`), which go through
    the driver, past SQLAlchemy's events."""
    seen_: list[str] = []
    real = Authenticator._membership

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "organization_memberships" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen_.append(note() if note is not None else statement)

    def counted(self: Authenticator, org_id: str, user_id: str) -> Any:
        if store is None or self.store is store:
            seen_.append(note() if note is not None else f"standing of {user_id} in {org_id}")
        return real(self, org_id, user_id)

    target: Any = sa.engine.Engine if store is None else store.engine
    sa.event.listen(target, "before_cursor_execute", record)
    setattr(Authenticator, "_membership", counted)  # noqa: B010 (a method replaced for the block)
    try:
        yield seen_
    finally:
        setattr(Authenticator, "_membership", real)  # noqa: B010
        sa.event.remove(target, "before_cursor_execute", record)
