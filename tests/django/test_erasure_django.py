"""Privacy review: ``ClerkBackend`` copies a user's e-mail and names onto the Django user (``auth_user``), which
clerk-sync's erasure and retention never saw: the copy outlived ``clerk-sync users erase`` and every prune.
``manage.py clerk_sync erase`` and ``prune`` clear it."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.django.conftest import World, bearer


def _signed_in(world: World, email: str, **names: str) -> str:
    """A Clerk user whose Django user the backend created (one request of their session)."""
    clerk = world.clerk
    user = clerk.create_user(email, **names)
    clerk.wait_for_deliveries()
    assert world.app.get("/t/django-login-required", headers=bearer(clerk.mint_session_token(user["id"]))).json()[
        "email"] == email
    return str(user["id"])


def _copy(clerk_id: str) -> tuple[str, str, str, bool]:
    user = get_user_model().objects.get(username=clerk_id)
    return user.email, user.first_name, user.last_name, user.is_active


def test_manage_py_erase_clears_the_django_users_copy_and_leaves_others(client_world: World) -> None:
    ann = _signed_in(client_world, "ann@example.com", first_name="Ann", last_name="Lovelace")
    bob = _signed_in(client_world, "bob@example.com", first_name="Bob")
    assert _copy(ann) == ("ann@example.com", "Ann", "Lovelace", True)
    out = StringIO()
    call_command("clerk_sync", "erase", ann, "--reason", "ticket 7", stdout=out)
    assert "Django user: cleared" in out.getvalue() and "audited as user.erased" in out.getvalue()
    assert _copy(ann) == ("", "", "", False)
    assert _copy(bob) == ("bob@example.com", "Bob", "", True)
    call_command("clerk_sync", "erase", ann, stdout=out)  # again: idempotent, nothing left to clear
    assert "Django user: nothing to clear" in out.getvalue()


def test_manage_py_erase_never_touches_a_local_account(client_world: World) -> None:
    """A Django user with a usable password under a Clerk id is someone's local login (never linked)."""
    ann = _signed_in(client_world, "ann@example.com", first_name="Ann")
    get_user_model().objects.create_user(username="user_local_1", email="local@example.com", password="pw-12345678",
                                         first_name="Lo")
    call_command("clerk_sync", "erase", "user_local_1", "--force", stdout=StringIO())
    assert _copy("user_local_1") == ("local@example.com", "Lo", "", True)
    assert _copy(ann)[0] == "ann@example.com"


def test_manage_py_erase_refuses_an_unknown_id_and_an_email(client_world: World) -> None:
    with pytest.raises(CommandError, match="--force"):
        call_command("clerk_sync", "erase", "user_nobody", stdout=StringIO())
    with pytest.raises(CommandError, match=r"not 'ann@example\.com'"):
        call_command("clerk_sync", "erase", "ann@example.com", stdout=StringIO())


def test_manage_py_prune_clears_the_django_users_of_cleared_tombstones(client_world: World) -> None:
    """A user deleted in Clerk: the tombstone's personal columns are cleared by prune (after
    CLERK_SYNC_TOMBSTONE_CLEAR_AFTER_DAYS, 0 by default), and so is the Django user's copy; a live user's stays."""
    clerk = client_world.clerk
    ann = _signed_in(client_world, "ann@example.com", first_name="Ann", last_name="Lovelace")
    bob = _signed_in(client_world, "bob@example.com", first_name="Bob")
    clerk.request("DELETE", f"/v1/users/{ann}")
    clerk.wait_for_deliveries()
    assert _copy(ann)[:3] == ("ann@example.com", "Ann", "Lovelace")  # the tombstone holds them until prune
    out = StringIO()
    call_command("clerk_sync", "prune", "--dry-run", stdout=out)
    assert _copy(ann)[0] == "ann@example.com" and "Django users cleared" not in out.getvalue()
    call_command("clerk_sync", "prune", stdout=out)
    assert "Django users cleared: 1" in out.getvalue()
    assert _copy(ann) == ("", "", "", False)
    assert _copy(bob) == ("bob@example.com", "Bob", "", True)
    call_command("clerk_sync", "prune", stdout=out)
    assert "Django users cleared: 0" in out.getvalue()


def raising_user_fields(row: Any) -> dict[str, Any]:
    """A USER_FIELDS that fails for one user (a lookup of a value only some rows have)."""
    if row.clerk_id.endswith("_x"):
        raise KeyError(row.role)
    from clerk_sync.integrations.django.conf import default_user_fields

    return default_user_fields(row)


def test_one_django_user_that_cannot_be_cleared_does_not_stop_the_others(client_world: World) -> None:
    """Review: the first user a prune could not clear (a USER_FIELDS raising) stopped the pass there, every
    hour; the others are cleared, the failure is named and the command exits non-zero."""
    from django.test import override_settings

    from clerk_sync.integrations.django.runtime import get_clerk_sync
    from clerk_sync.retention import Retention
    from tests.django.conftest import emulator_settings

    clerk = client_world.clerk
    first = get_user_model().objects.create_user(username="user_x", email="x@example.com", first_name="X")
    first.set_unusable_password()  # linked (the backend's own), and read first (the lower pk)
    first.save()
    ann = _signed_in(client_world, "ann@example.com", first_name="Ann")
    Retention(get_clerk_sync().store).erase_user("user_x", allow_unknown=True)
    clerk.request("DELETE", f"/v1/users/{ann}")
    clerk.wait_for_deliveries()
    with override_settings(CLERK_SYNC={**emulator_settings(clerk),
                                       "USER_FIELDS": "tests.django.test_erasure_django.raising_user_fields"}), \
            pytest.raises(CommandError, match="could not be cleared"):
        call_command("clerk_sync", "prune", stdout=StringIO())
    assert _copy(ann) == ("", "", "", False)
    assert _copy("user_x")[0] == "x@example.com"


def colliding_user_fields(row: Any) -> dict[str, Any]:
    """A USER_FIELDS whose blank for one user the database refuses (a NOT NULL column; a username, the key the
    backend looks users up by, is never copied: it collided with another user's here before)."""
    from clerk_sync.integrations.django.conf import default_user_fields

    return {**default_user_fields(row), **({"date_joined": None} if row.clerk_id == "user_x" else {})}


def test_a_refused_save_inside_a_callers_transaction_does_not_doom_the_users_after_it(client_world: World) -> None:
    """Review: without a savepoint per user, the first refused save inside an outer transaction (a task's
    ``atomic``, ``ATOMIC_REQUESTS``) aborted it on PostgreSQL: every later user failed, the earlier ones
    rolled back."""
    from django.db import transaction
    from django.test import override_settings

    from clerk_sync.integrations.django.backends import forget_cleared_django_users
    from clerk_sync.integrations.django.runtime import get_clerk_sync
    from clerk_sync.retention import Retention
    from tests.django.conftest import emulator_settings

    clerk = client_world.clerk
    get_user_model().objects.create_user(username="taken", password="pw-12345678")
    first = get_user_model().objects.create_user(username="user_x", email="x@example.com")
    first.set_unusable_password()
    first.save()
    ann = _signed_in(client_world, "ann@example.com", first_name="Ann")
    Retention(get_clerk_sync().store).erase_user("user_x", allow_unknown=True)
    Retention(get_clerk_sync().store).erase_user(ann)
    with override_settings(CLERK_SYNC={**emulator_settings(clerk),
                                       "USER_FIELDS": "tests.django.test_erasure_django.colliding_user_fields"}), \
            transaction.atomic():
        changed, failed = forget_cleared_django_users()
    assert (changed, failed) == (1, [first.pk])
    assert _copy(ann) == ("", "", "", False) and _copy("user_x")[0] == "x@example.com"


def test_manage_py_erase_of_a_hard_deleted_tombstone_says_nothing_was_written(client_world: World) -> None:
    """DPO walkthrough, finding 4: it said "no row for it; tombstone written" while the digest kept any row out."""
    from tests.test_erase_message_after_hard_delete import hard_delete_tombstone

    hard_delete_tombstone(client_world.store, "user_gone")
    out = StringIO()
    call_command("clerk_sync", "erase", "user_gone", stdout=out)
    assert "tombstone written" not in out.getvalue(), out.getvalue()
    assert "user_gone: already erased" in out.getvalue() and "no row written" in out.getvalue(), out.getvalue()



def test_manage_py_prune_with_djangos_database_down_exits_3_in_one_line(db_url: str) -> None:
    """Review: clerk-sync's database up, Django's down (unreachable): prune ran its retention, then reading the
    Django users raised Django's OperationalError as a traceback, exit 1 ("work left undone"). One line now,
    exit 3 (retry later), naming Django's DATABASES."""
    from django.db import connections
    from django.test import override_settings

    from tests.django.conftest import emulator_settings, world_for

    with world_for(db_url, "test-client") as world, \
            override_settings(CLERK_SYNC=emulator_settings(world.clerk, DATABASE_URL=world.store.engine.url
                                                           .render_as_string(hide_password=False))):
        _signed_in(world, "ann@example.com", first_name="Ann")
        connections.close_all()
        default = connections.settings["default"]
        saved = dict(default)
        default.update({"NAME": "/nonexistent-dir/django.db"} if default["ENGINE"].endswith("sqlite3")
                       else {"HOST": "127.0.0.1", "PORT": "1"})
        try:
            with pytest.raises(CommandError) as refused:
                call_command("clerk_sync", "prune", stdout=StringIO())
        finally:
            connections.close_all()
            default.clear()
            default.update(saved)
    assert refused.value.returncode == 3, refused.value
    assert "Django's database: OperationalError" in str(refused.value), refused.value
    assert "check DATABASES['default']" in str(refused.value)
