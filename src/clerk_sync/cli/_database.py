"""The database a command works on: refused, not created, when DATABASE_URL names a SQLite file that is not
there (SQLite creates an empty file on connect, so a mistyped path became a second, empty database)."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa

from clerk_sync.config import Settings
from clerk_sync.errors import ClerkSyncError, ConfigError
from clerk_sync.store import Store, sqlite_file

__all__ = ["existing_store", "missing_sqlite_file"]


def missing_sqlite_file(settings: Settings) -> str | None:
    """What to say when DATABASE_URL names a SQLite file that does not exist, or None. Said instead of opening it:
    SQLite would create an empty file there, and "run `clerk-sync migrate`" would then build a second, empty
    database at a mistyped path (a relative one resolves against the current directory)."""
    if not settings.database_url.startswith("sqlite"):
        return None
    try:
        path = sqlite_file(settings.sqlalchemy_url())
    except (ClerkSyncError, ValueError, sa.exc.ArgumentError):  # malformed: opening the store says so
        return None
    if path is None or os.path.exists(path):
        return None
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return None  # its directory missing too: the store says that (mkdir -p ...), and creates nothing either
    return (f"the SQLite file {os.path.abspath(path)} does not exist (nothing was created): on a new install run "
            "`clerk-sync migrate`, which creates it; otherwise fix DATABASE_URL (sqlite:///relative.db is relative "
            "to the current directory, sqlite:////absolute/path.db is not)")


def existing_store(settings: Settings, **options: Any) -> Store:
    """:meth:`Store.from_settings` for a command that reads or changes a database already there (``replay``,
    ``prune``, ``hooks list``, ...): a SQLite file that does not exist raises :class:`ConfigError` (exit 2)
    saying where it was looked for (``worker`` too: it never migrates; ``serve --no-migrate`` checks the same).
    ``migrate`` and ``serve`` open theirs as they did: they may be the first to reach a new install's file."""
    if (missing := missing_sqlite_file(settings)) is not None:
        raise ConfigError(missing)
    return Store.from_settings(settings, **options)
