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


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_manage_py_erase_refuses_an_id_that_is_not_a_users(client_world: World, force: bool) -> None:
    """Review: only the length was checked, so ``erase org_abc --force`` tombstoned the organization's id as a
    user's and redacted every stored delivery naming it (other members' failed ones settled, never replayed);
    ``clerk-sync users erase`` refuses it. ``--any-id`` is for a users table holding ids of another form."""
    from clerk_sync.tables import users

    with pytest.raises(CommandError, match=r"'org_abc' is not a Clerk user id \(they start with user_.*--any-id"):
        call_command("clerk_sync", "erase", "org_abc", *(["--force"] if force else []), stdout=StringIO())
    store = client_world.store
    with store.connect() as conn:
        assert conn.execute(users.select().where(users.c.clerk_id == "org_abc")).first() is None
    out = StringIO()
    call_command("clerk_sync", "erase", "legacy_7", "--force", "--any-id", stdout=out)
    assert out.getvalue().startswith("legacy_7: no row for it; tombstone written"), out.getvalue()
