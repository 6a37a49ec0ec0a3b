"""``manage.py clerk_sync erase`` refuses an id longer than any Clerk id, saying so, before it writes anything
(it stored a tombstone for nobody on SQLite, and failed with a database error on PostgreSQL and MariaDB)."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from clerk_sync._limits import CLERK_ID_CHARS
from tests.django.conftest import World


def test_manage_py_erase_refuses_an_over_long_id(client_world: World) -> None:
    with pytest.raises(CommandError, match=f"not a Clerk user id \\(they have at most {CLERK_ID_CHARS} characters"):
        call_command("clerk_sync", "erase", "user_" + "x" * CLERK_ID_CHARS, "--force", stdout=StringIO())
