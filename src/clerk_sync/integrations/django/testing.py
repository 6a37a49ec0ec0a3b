"""Testing a Django app that uses clerk-sync: its tables in Django's test database, and that database dropped.

Set ``TEST_RUNNER = "clerk_sync.integrations.django.testing.ClerkSyncDiscoverRunner"`` (or mix
:class:`ClerkSyncTestRunnerMixin` into your own runner, before Django's). While the test databases are set up
the runner

* migrates clerk-sync's tables into the test database as Django migrates its own (so ``--parallel`` clones
  and ``--keepdb`` keep them too): no ``manage.py clerk_sync migrate`` in ``setUpClass``;
* closes clerk-sync's connections before the test databases are cloned and before they are destroyed, so
  PostgreSQL can drop them (else "database ... is being accessed by other users" at teardown leaves
  ``test_<name>`` behind and the next run asks to delete it).

Under Django's test environment clerk-sync follows the test database Django's ``default`` connection uses,
even when ``DATABASE_URL`` is set in the environment (see :mod:`.conf`); ``CLERK_SYNC['DATABASE_URL']``, set
explicitly, still wins (point it at a test database of its own in your test settings then). SQLite: Django's
test database is in memory unless ``DATABASES['default']['TEST']['NAME']`` names a file, and clerk-sync's
connections cannot share an in-memory database: name one, ``'TEST': {'NAME': BASE_DIR / 'test_db.sqlite3'}``.

clerk-sync writes through connections of its own, so its rows are not rolled back with a ``TestCase``'s
transaction (nor flushed by a ``TransactionTestCase``): clear what a test needs cleared. On SQLite, where one
connection at a time may write, a ``TestCase`` holds Django's write lock from its first write to its end, so
clerk-sync cannot write after it in the same test (a second user's just-in-time row, a webhook): it waits
for the lock, then answers 503. Use ``TransactionTestCase`` for such tests on SQLite (PostgreSQL has no such
limit).

pytest-django: the same two steps as a fixture in your ``conftest.py``::

    @pytest.fixture(scope="session")
    def django_db_setup(django_db_setup, django_db_blocker):
        with django_db_blocker.unblock():
            migrate_test_database()
        yield
        reset_clerk_sync()  # before pytest-django destroys the test database
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DEFAULT_DB_ALIAS
from django.db.models.signals import post_migrate
from django.test.runner import DiscoverRunner

from clerk_sync.integrations.django.runtime import reset_clerk_sync

__all__ = ["ClerkSyncDiscoverRunner", "ClerkSyncTestRunnerMixin", "migrate_test_database"]


def migrate_test_database() -> None:
    """Apply clerk-sync's migrations (and ``CLERK_SYNC['MAPPING']``'s columns) to the database it uses now,
    as ``manage.py clerk_sync migrate`` does, then close the connections that took (the test database can then
    be cloned or dropped)."""
    from django.core.management import call_command

    reset_clerk_sync()  # (built before the test database was set up: it would still name the other one)
    try:
        call_command("clerk_sync", "migrate", verbosity=0, stdout=io.StringIO())  # (as quiet as Django's)
    finally:
        reset_clerk_sync()


@contextmanager
def _migrating_with_django() -> Iterator[None]:
    """While Django migrates a test database: clerk-sync's tables into ``default``'s too, as its own are."""
    def migrated(*, app_config: Any, using: str = DEFAULT_DB_ALIAS, **_: Any) -> None:
        if app_config.label == "clerk_sync" and using == DEFAULT_DB_ALIAS:  # (post_migrate: once per app)
            migrate_test_database()

    post_migrate.connect(migrated, dispatch_uid="clerk_sync.testing.migrate_test_database", weak=False)
    try:
        yield
    finally:
        post_migrate.disconnect(dispatch_uid="clerk_sync.testing.migrate_test_database")


class ClerkSyncTestRunnerMixin:
    """For a ``DiscoverRunner`` subclass (list it first): clerk-sync's tables migrated into the test database,
    and its connections closed before the test databases are destroyed (see the module's docstring)."""

    def setup_databases(self, **kwargs: Any) -> Any:
        with _migrating_with_django():  # (no test database made, as for SimpleTestCase alone: nothing migrated)
            old_config = super().setup_databases(**kwargs)  # type: ignore[misc]
        reset_clerk_sync()  # nothing open when --parallel forks its workers (each builds on its clone)
        return old_config

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        reset_clerk_sync()  # PostgreSQL refuses to drop a database another session is connected to
        super().teardown_databases(old_config, **kwargs)  # type: ignore[misc]


class ClerkSyncDiscoverRunner(ClerkSyncTestRunnerMixin, DiscoverRunner):
    """Django's ``DiscoverRunner`` with :class:`ClerkSyncTestRunnerMixin`:
    ``TEST_RUNNER = "clerk_sync.integrations.django.testing.ClerkSyncDiscoverRunner"``."""
