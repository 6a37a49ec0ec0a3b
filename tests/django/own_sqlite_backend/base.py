"""Django's SQLite backend under another module name, as a project's own backend (or django-prometheus's) is."""

from __future__ import annotations

from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteDatabaseWrapper

__all__ = ["DatabaseWrapper"]


class DatabaseWrapper(SQLiteDatabaseWrapper):
    """Nothing changed: only its module is not one of Django's."""
