"""The app of the least-privilege tests (tests/test_least_privilege_roles.py): README's ``accounts`` mapping, for
the CLI's ``--mapping tests._grants_app:MAPPING``, and the DDL of the app's own table (run as its owner)."""

from __future__ import annotations

from clerk_sync.changes import Change, Hook
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, SoftDelete

MAPPING = SchemaMapping(users=MappedTable(
    "accounts", "clerk_user_id",
    {"email": "email", "name": "full_name", "role": Column("public_metadata.role", default="member")},
    on_delete=SoftDelete("deleted_at"),
))

ACCOUNTS_DDL = {  # the app's own migration: an id the database numbers, a column the mapping never writes
    "postgresql": "CREATE TABLE accounts (id SERIAL PRIMARY KEY, email VARCHAR(320), name VARCHAR(255), "
                  "role VARCHAR(64), plan VARCHAR(32) NOT NULL DEFAULT 'free')",
    "mysql": "CREATE TABLE accounts (id INT AUTO_INCREMENT PRIMARY KEY, email VARCHAR(320), name VARCHAR(255), "
             "role VARCHAR(64), plan VARCHAR(32) NOT NULL DEFAULT 'free')",
}


def _noted(change: Change) -> None:
    """A hook with nothing to do: the outbox's rows are what the runtime role must be able to write."""


HOOKS = [Hook("grants-noted", _noted, on=["user.created"])]
