"""Review: ``ClerkBackend`` with a custom ``AUTH_USER_MODEL``. An e-mail login (``USERNAME_FIELD = "email"``) had the
default ``USER_FIELDS`` overwrite the lookup key with the address, so every request after the first found nobody and
created the user again (IntegrityError, a 500); a model without ``AbstractUser``'s fields (``first_name``,
``is_staff``...) failed every Clerk-session request (FieldError). Each model runs in a Django process of its own
(``AUTH_USER_MODEL`` is fixed once Django is set up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

_MODELS = {
    "emailusers": """
        from django.contrib.auth.models import AbstractBaseUser, BaseUserManager, PermissionsMixin
        from django.db import models

        class User(AbstractBaseUser, PermissionsMixin):  # Django docs' "e-mail as the login" model
            email = models.EmailField(max_length=255, unique=True)
            clerk_id = models.CharField(max_length=64, unique=True, null=True)
            first_name = models.CharField(max_length=150, blank=True)
            last_name = models.CharField(max_length=150, blank=True)
            is_active = models.BooleanField(default=True)
            is_staff = models.BooleanField(default=False)
            USERNAME_FIELD = "email"
            objects = BaseUserManager()
    """,
    "slimusers": """
        from django.contrib.auth.models import AbstractBaseUser, BaseUserManager
        from django.db import models

        class User(AbstractBaseUser):  # none of AbstractUser's names or flags
            username = models.CharField(max_length=150, unique=True)
            email = models.EmailField(blank=True)
            is_active = models.BooleanField(default=True)
            USERNAME_FIELD = "username"
            objects = BaseUserManager()
    """,
    "noactive": """
        from django.contrib.auth.models import AbstractBaseUser, BaseUserManager, PermissionsMixin
        from django.db import models

        class User(AbstractBaseUser, PermissionsMixin):  # is_active: AbstractBaseUser's class attribute (True)
            username = models.CharField(max_length=150, unique=True)
            email = models.EmailField(blank=True)
            USERNAME_FIELD = "username"
            objects = BaseUserManager()

            @property
            def is_staff(self):
                return self.is_superuser
    """,
}

_SCRIPT = """
import json, sys
from dataclasses import replace

import django
from django.conf import settings

app, clerk_sync = sys.argv[1], json.loads(sys.argv[2])
settings.configure(
    SECRET_KEY="x" * 50, USE_TZ=True,
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", app, "clerk_sync.integrations.django"],
    AUTH_USER_MODEL=f"{app}.User",
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": sys.argv[3]}},
    AUTHENTICATION_BACKENDS=["clerk_sync.integrations.django.backends.ClerkBackend"],
    CLERK_SYNC={"CLERK_WEBHOOK_SIGNING_SECRET": "whsec_" + "a" * 32, **clerk_sync},
)
django.setup()
from django.contrib.auth import get_user_model
from django.core.management import call_command

from clerk_sync import migrations
from clerk_sync.integrations.django.backends import (ClerkBackend, _cleared_row, refresh_django_users,
                                                     sync_django_user)
from clerk_sync.integrations.django.checks import check_settings
from clerk_sync.integrations.django.runtime import get_clerk_sync

call_command("migrate", run_syncdb=True, verbosity=0)
store = get_clerk_sync().store
migrations.upgrade(store.engine)
out = {"checks": [m.id for m in check_settings()]}
row = replace(_cleared_row("user_2abc"), email="ada@example.com", first_name="Ada", deleted_at=None, role="admin")
users = []
for email in ("ada@example.com", "ada@example.com", "ada@new.example.com"):
    try:
        user = sync_django_user(replace(row, email=email))
        users.append([user.pk, user.email])
    except Exception as exc:
        users.append(type(exc).__name__)
out["users"] = users
out["count"] = get_user_model().objects.count()
pk = get_user_model().objects.get().pk
import dataclasses
from clerk_sync.tables import users as table
banned = dataclasses.asdict(replace(row, email="ada@new.example.com", banned=True))
with store.engine.begin() as conn:
    conn.execute(table.insert().values({k: v for k, v in banned.items() if k != "id"}))
out["refresh"] = refresh_django_users()[0]
out["active"] = get_user_model().objects.get(pk=pk).is_active
out["get_user"] = ClerkBackend().get_user(pk) is not None
if app == "emailusers":  # a user of the app's own (no Clerk id, no usable password: a social login's): not Clerk's
    local = get_user_model().objects.create(email="local@example.com", password="!unusable")
    out["local_user"] = ClerkBackend().get_user(local.pk) is not None
    refused = []  # a unique address held by another Django user: refused, said, anonymous (not a 500)
    for clerk_id, email in (("user_2new", "ada@new.example.com"), ("user_2p1", ""), ("user_2p2", "")):
        try:
            refused.append(sync_django_user(replace(row, clerk_id=clerk_id, email=email)) is None)
        except Exception as exc:
            refused.append(type(exc).__name__)
    out["refused"] = refused
if app == "noactive":  # deleted (a login session's next request), erased by the command, erased then pruned
    from io import StringIO
    from clerk_sync.retention import Retention

    def outcome(call):
        try:
            return call()
        except Exception as exc:
            return [type(exc).__name__, getattr(exc, "returncode", None)]

    bob = replace(row, clerk_id="user_2bob", email="bob@example.com", role="user")
    sync_django_user(bob)
    with store.engine.begin() as conn:
        conn.execute(table.update().where(table.c.clerk_id == row.clerk_id).values(banned=False,
                                                                                   deleted_at=_cleared_row("x").deleted_at))
        conn.execute(table.insert().values({k: v for k, v in dataclasses.asdict(bob).items() if k != "id"}))
    out["deleted_get_user"] = outcome(lambda: ClerkBackend().get_user(pk))
    out["erase"] = outcome(lambda: call_command("clerk_sync", "erase", row.clerk_id, "--skip-checks", stdout=StringIO()))
    Retention(store).erase_user(bob.clerk_id)  # clerk-sync's own erasure: prune clears the Django user's copy
    out["prune"] = outcome(lambda: call_command("clerk_sync", "prune", "--skip-checks", stdout=StringIO()))
    out["emails"] = sorted(get_user_model().objects.values_list("email", flat=True))
print(json.dumps(out))
"""


def _run(tmp_path: Path, app: str, **clerk_sync: Any) -> dict[str, Any]:
    (tmp_path / app).mkdir()
    (tmp_path / app / "__init__.py").write_text("")
    (tmp_path / app / "models.py").write_text(textwrap.dedent(_MODELS[app]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}  # (the clerk_sync imported here)
    env = {k: v for k, v in env.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, app, json.dumps(clerk_sync), str(tmp_path / "db.sqlite3")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_an_email_login_model_with_clerk_id_field_keeps_one_user_with_the_address(tmp_path: Path) -> None:
    """``CLERK_ID_FIELD`` names the field holding the Clerk id: one user, found again on every request, whose
    e-mail follows Clerk's, deactivated by a ban (``prune``'s refresh)."""
    out = _run(tmp_path, "emailusers", CLERK_ID_FIELD="clerk_id")
    assert "clerk_sync.E008" not in out["checks"]
    pk = out["users"][0][0]
    assert out["users"] == [[pk, "ada@example.com"], [pk, "ada@example.com"], [pk, "ada@new.example.com"]]
    assert out["count"] == 1
    assert (out["refresh"], out["active"], out["get_user"]) == (1, False, False)
    assert out["local_user"]  # (no Clerk id held: a login session the backend does not judge)
    # Final review: the address of the banned (deactivated) user, and a second user without an address (``""``
    # in the unique e-mail column) raised IntegrityError, a 500 on every request: refused and said now.
    assert out["refused"] == [True, False, True]


@pytest.mark.slow
def test_an_email_login_model_without_clerk_id_field_is_a_check_error_and_never_creates_twice(tmp_path: Path) -> None:
    """Without ``CLERK_ID_FIELD`` the check names the conflict; requests no longer fail (IntegrityError): the key
    is never overwritten by the copied fields."""
    out = _run(tmp_path, "emailusers")
    assert "clerk_sync.E008" in out["checks"]
    assert all(isinstance(u, list) for u in out["users"]), out["users"]
    assert out["count"] == 1


@pytest.mark.slow
def test_a_model_without_abstractusers_fields_copies_the_fields_it_has(tmp_path: Path) -> None:
    out = _run(tmp_path, "slimusers")
    assert "clerk_sync.E008" not in out["checks"]
    pk = out["users"][0][0]
    assert out["users"] == [[pk, "ada@example.com"], [pk, "ada@example.com"], [pk, "ada@new.example.com"]]
    assert (out["count"], out["refresh"], out["active"], out["get_user"]) == (1, 1, False, False)


@pytest.mark.slow
def test_a_model_without_an_is_active_field_is_deactivated_and_erased_by_the_fields_it_has(tmp_path: Path) -> None:
    """Fixed: a model without an ``is_active`` field (``AbstractBaseUser``'s class attribute, as Django's docs
    allow) or with ``is_staff`` as a property had the flag named in ``save(update_fields=...)``: ValueError, a 500
    on every request of a deleted Clerk user's Django login session, ``erase`` failing after clerk-sync's own
    erasure committed and ``prune`` exiting 1 on every run. Only the stored flags are cleared now."""
    out = _run(tmp_path, "noactive")
    assert (out["refresh"], out["active"], out["get_user"]) == (1, True, False)  # a ban: is_superuser cleared
    # the deleted user's login session refused (not a 500), then erase and prune done (exit 0)
    assert (out["deleted_get_user"], out["erase"], out["prune"]) == (None, None, None)
    assert out["emails"] == ["", ""]  # both Django users' copies cleared


@pytest.mark.slow
def test_clerk_id_field_naming_no_field_or_a_copied_one_is_a_check_error(tmp_path: Path) -> None:
    assert "clerk_sync.E008" in _run(tmp_path, "slimusers", CLERK_ID_FIELD="email")["checks"]


def renaming_user_fields(row: Any) -> dict[str, Any]:
    """A USER_FIELDS that would overwrite the lookup key (``username``) and names a field ``User`` does not have."""
    return {"username": row.email, "email": row.email, "nickname": row.first_name}


def test_a_user_fields_of_the_apps_own_never_overwrites_the_key_and_skips_unknown_fields(
        client_world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from django.contrib.auth import get_user_model
    from django.test import override_settings
    from structlog.testing import capture_logs

    from clerk_sync.integrations.django import backends
    from clerk_sync.integrations.django.backends import _cleared_row, sync_django_user
    from clerk_sync.integrations.django.runtime import reset_clerk_sync
    from tests.django.conftest import emulator_settings

    monkeypatch.setattr(backends, "_unknown_fields_logged", set())  # (logged once a process)
    row = replace(_cleared_row("user_2key"), email="ada@example.com", first_name="Ada", deleted_at=None)
    fields = {**emulator_settings(client_world.clerk),
              "USER_FIELDS": "tests.django.test_custom_user_models.renaming_user_fields"}
    with override_settings(CLERK_SYNC=fields), capture_logs() as logs:
        reset_clerk_sync()
        first, again = sync_django_user(row), sync_django_user(row)
    assert first.pk == again.pk and (again.username, again.email) == ("user_2key", "ada@example.com")
    assert get_user_model().objects.filter(username="user_2key").count() == 1
    assert [e["fields"] for e in logs if e["event"] == "django_user_field_unknown"] == [["nickname"]]
