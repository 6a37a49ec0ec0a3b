"""A Django app's own test run (``manage.py test`` in a process of its own) keeps clerk-sync in Django's test
database: its tables migrated there by ``ClerkSyncDiscoverRunner``, the ``DATABASE_URL`` of the environment (a
dj-database-url setup) left alone, no ``./clerk_sync.db``, and on PostgreSQL the test databases dropped at the
end (clerk-sync's pooled connections closed first). For an in-memory SQLite test database clerk-sync keeps a
temporary file of its own, never a local ``./clerk_sync.db``."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from clerk_sync.testing import EmulatorServer
from tests.conftest import _PG_PROBLEM, PG_URL, require_server

SRC = Path(__file__).resolve().parent.parent / "src"

SETTINGS = """
import os
import sqlalchemy as sa

def from_url(url):  # what dj-database-url makes of DATABASE_URL
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": u.database}
    return {"ENGINE": "django.db.backends.postgresql", "NAME": u.database, "USER": u.username or "",
            "PASSWORD": u.password or "", "HOST": u.host or "", "PORT": str(u.port or "")}

SECRET_KEY = "x"
ALLOWED_HOSTS = ["testserver"]
USE_TZ = True
ROOT_URLCONF = "proj.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
                  "clerk_sync.integrations.django", "app_tests"]
MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware",
              "django.middleware.csrf.CsrfViewMiddleware",
              "django.contrib.auth.middleware.AuthenticationMiddleware",
              "clerk_sync.integrations.django.middleware.ClerkMiddleware"]
AUTHENTICATION_BACKENDS = ["clerk_sync.integrations.django.backends.ClerkBackend"]
DATABASES = {"default": from_url(os.environ["DATABASE_URL"])}
if os.environ.get("TEST_DB_NAME"):
    DATABASES["default"]["TEST"] = {"NAME": os.environ["TEST_DB_NAME"]}
TEST_RUNNER = os.environ.get("TEST_RUNNER", "clerk_sync.integrations.django.testing.ClerkSyncDiscoverRunner")
CLERK_SYNC = {"CLERK_AUTHORIZED_PARTIES": ["http://localhost:3000"]}  # the rest from the environment
"""

URLS = """
from django.http import JsonResponse
from django.urls import path


def me(request):
    return JsonResponse({"email": request.user.email})


urlpatterns = [path("me", me)]
"""

TESTS = """
import os

from django.db import connection
from django.test import TestCase, TransactionTestCase

from clerk_sync.integrations.django.runtime import get_clerk_sync


class Signed(TestCase):
    def test_the_users_row_lands_in_the_test_database(self):
        answer = self.client.get("/me", HTTP_AUTHORIZATION="Bearer " + os.environ["TOKEN"])
        self.assertEqual(answer.status_code, 200, answer.content)
        self.assertEqual(answer.json(), {"email": "ada@example.com"})
        ours, djangos = get_clerk_sync().store.engine.url.database, connection.settings_dict["NAME"]
        print(f"\\nclerk-sync: {ours} django: {djangos}")
        self.assertEqual(ours, djangos)
        with connection.cursor() as cursor:  # Django's own connection sees clerk-sync's row
            cursor.execute("SELECT email FROM users WHERE clerk_id = %s", [os.environ["USER_ID"]])
            self.assertEqual(cursor.fetchall(), [("ada@example.com",)])


class Again(Signed):  # a second class: with --parallel 2 each worker runs one, on its own clone
    pass


class TwoUsers(TransactionTestCase):  # (on SQLite, the documented way to write after Django has in one test)
    def test_two_users_sign_in_one_after_the_other(self):
        for token, email in ((os.environ["TOKEN"], "ada@example.com"), (os.environ["TOKEN2"], "bob@example.com")):
            answer = self.client.get("/me", HTTP_AUTHORIZATION="Bearer " + token)
            self.assertEqual((answer.status_code, answer.json()), (200, {"email": email}))
"""


def _project(tmp_path: Path) -> Path:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "__init__.py").write_text("")
    (tmp_path / "proj" / "settings.py").write_text(textwrap.dedent(SETTINGS))
    (tmp_path / "proj" / "urls.py").write_text(textwrap.dedent(URLS))
    (tmp_path / "app_tests").mkdir()
    (tmp_path / "app_tests" / "__init__.py").write_text("")
    (tmp_path / "app_tests" / "tests.py").write_text(textwrap.dedent(TESTS))
    return tmp_path


@pytest.fixture
def clerk() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


def _run_tests(project: Path, clerk: EmulatorServer, database_url: str, *args: str,
               **env: str) -> subprocess.CompletedProcess[str]:
    """``django-admin test`` of the project, in the project's directory, its settings' DATABASES derived from
    ``DATABASE_URL`` (the "real" database); a signed-in user in Clerk only (their row arrives just in time)."""
    user, other = clerk.create_user(email="ada@example.com"), clerk.create_user(email="bob@example.com")
    keep = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k not in ("DATABASE_URL",)}
    path = [str(project), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []), str(SRC)]
    full = {**keep, "PYTHONPATH": os.pathsep.join(path), "DJANGO_SETTINGS_MODULE": "proj.settings",
            "DATABASE_URL": database_url, "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url,
            "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret, "TOKEN": clerk.mint_session_token(user["id"]),
            "TOKEN2": clerk.mint_session_token(other["id"]), "USER_ID": user["id"], **env}
    return subprocess.run([sys.executable, "-m", "django", "test", "app_tests", "--noinput", "-v", "2", *args],
                          cwd=project, env=full, capture_output=True, text=True, timeout=300, check=False)


def _tables(path: Path) -> list[str]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


def test_sqlite_clerk_syncs_tables_are_in_the_test_database_not_the_environments(
        tmp_path: Path, clerk: EmulatorServer) -> None:
    project = _project(tmp_path)
    real = project / "real.db"
    run = _run_tests(project, clerk, f"sqlite:///{real}", TEST_DB_NAME=str(project / "test_db.sqlite3"))
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert out.count(f"clerk-sync: {project / 'test_db.sqlite3'} django: {project / 'test_db.sqlite3'}") == 2, out
    assert not (project / "clerk_sync.db").exists()  # no stray local file
    assert "users" not in _tables(real)  # DATABASE_URL (the app's real database) never written
    assert not (project / "test_db.sqlite3").exists()  # Django destroyed its test database


MEMORY_TESTS = """
import os

from django.test import TestCase

from clerk_sync.integrations.django.runtime import get_clerk_sync


class Plain(TestCase):  # a test of the app that never touches Clerk
    def test_runs(self):
        self.assertEqual(1 + 1, 2)


class Signed(TestCase):
    def test_the_users_row_lands_in_clerk_syncs_temporary_database(self):
        answer = self.client.get("/me", HTTP_AUTHORIZATION="Bearer " + os.environ["TOKEN"])
        self.assertEqual((answer.status_code, answer.json()), (200, {"email": "ada@example.com"}))
        print(f"\\nclerk-sync: {get_clerk_sync().store.engine.url.database}")
"""


@pytest.mark.parametrize("runner", ["django.test.runner.DiscoverRunner",
                                    "clerk_sync.integrations.django.testing.ClerkSyncDiscoverRunner"])
def test_sqlite_in_memory_test_database_gets_a_temporary_file_of_clerk_syncs_own(
        tmp_path: Path, clerk: EmulatorServer, runner: str) -> None:
    """No TEST NAME: Django's test database is ``file:memorydb_default?mode=memory&cache=shared``, which
    clerk-sync's connections cannot share. It used to be replaced by ``./clerk_sync.db`` without a word (kept
    between runs); refusing it (a first fix) stopped every such project's test run at the system check, tests
    that never touch Clerk included (review). clerk-sync now keeps a temporary file of its own, migrated at
    once, removed at the end."""
    project = _project(tmp_path)
    (project / "app_tests" / "tests.py").write_text(textwrap.dedent(MEMORY_TESTS))
    run = _run_tests(project, clerk, f"sqlite:///{project / 'real.db'}", TEST_RUNNER=runner)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "Ran 2 tests" in out, out
    used = Path(next(line for line in out.splitlines() if line.startswith("clerk-sync: ")).split(": ", 1)[1])
    assert used.name == "clerk_sync.db" and used.parent.name.startswith("clerk-sync-test-"), used
    assert not used.parent.exists()  # removed when the run ended
    assert not (project / "clerk_sync.db").exists()
    assert "users" not in _tables(project / "real.db")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (the app's "real" one); dropped afterwards with any test_ copies."""
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    name = f"cs_real_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.connect() as conn:
            left = conn.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE :n"),
                                {"n": f"%{name}%"}).scalars().all()
            for db in left:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("parallel", [[], ["--parallel", "2"]], ids=["serial", "parallel"])
def test_postgres_test_database_has_clerk_syncs_tables_and_is_dropped(
        tmp_path: Path, clerk: EmulatorServer, pg_database: str, parallel: list[str]) -> None:
    project = _project(tmp_path)
    real_url = sa.engine.make_url(PG_URL).set(database=pg_database).render_as_string(hide_password=False)
    run = _run_tests(project, clerk, real_url, *parallel)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "being accessed by other users" not in out
    if parallel:  # each worker on its own clone, clerk-sync too
        assert {f"clerk-sync: test_{pg_database}_{n} django: test_{pg_database}_{n}" for n in (1, 2)} <= \
            {line.strip() for line in out.splitlines()}, out
    else:
        assert out.count(f"clerk-sync: test_{pg_database} django: test_{pg_database}") == 2, out
    admin = sa.create_engine(PG_URL)
    try:
        with admin.connect() as conn:
            left = conn.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE :n"),
                                {"n": f"test_{pg_database}%"}).scalars().all()
        assert left == []  # the test databases (and clones) were dropped
    finally:
        admin.dispose()
    real = sa.create_engine(real_url)
    try:
        assert "users" not in sa.inspect(real).get_table_names()  # DATABASE_URL never written
    finally:
        real.dispose()
    assert not (project / "clerk_sync.db").exists()
