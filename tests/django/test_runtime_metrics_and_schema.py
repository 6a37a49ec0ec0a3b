"""The Django runtime's parts count in one registry (the processor's metrics: Clerk API calls, the breaker,
JIT fetches), and a schema that is not current says which database to migrate."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.test import RequestFactory, override_settings

from clerk_sync.errors import StoreError
from clerk_sync.integrations.django.request import clerk_request
from clerk_sync.integrations.django.runtime import get_clerk_sync
from clerk_sync.testing import EmulatorServer
from tests.django.conftest import django_database, emulator_settings


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample of a rendered Prometheus series (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_clerk_api_calls_the_breaker_and_jit_fetches_count_in_the_processors_metrics(db_url: str) -> None:
    """The Clerk clients and JIT users were built without ``metrics=``: none of Clerk's calls, 429s, the
    breaker or JIT fetches reached the registry the app scrapes (``processor.metrics``)."""
    with EmulatorServer() as clerk, django_database(db_url), override_settings(CLERK_SYNC=emulator_settings(clerk)):
        _count_in_the_processors_metrics(clerk)


def _count_in_the_processors_metrics(clerk: EmulatorServer) -> None:
    runtime = get_clerk_sync()  # (no webhooks delivered: each user is fetched just in time)
    first, second = clerk.create_user(email="a@example.com"), clerk.create_user(email="b@example.com")
    assert runtime.jit is not None  # built before the processor: still its registry
    runtime.jit.get_auth_user(first["id"])
    runtime.jit.get_auth_user(second["id"])
    text = runtime.processor.metrics.render().decode()
    assert _sample(text, "clerk_sync_jit_fetches_total", outcome="stored") == 2
    calls = set(re.findall(r'clerk_sync_clerk_api_requests_total\{endpoint="([^"]*)",status="200"', text))
    assert sum(_sample(text, "clerk_sync_clerk_api_requests_total", endpoint=e, status="200") for e in calls) >= 2
    assert runtime.aclerk is not None and runtime.clerk is not None
    assert runtime.aclerk.breaker is runtime.clerk.breaker  # (the async client counts in the same registry)
    assert "clerk_sync_clerk_api_circuit_open 0.0" in text  # the breaker, read at scrape time


def test_a_missing_table_names_the_database_to_migrate(tmp_path: Path) -> None:
    """Django's tables but not clerk-sync's (``manage.py clerk_sync migrate`` not run on it): the error said
    "run clerk-sync's migrations on this database" without saying which one (under the test runner, not the
    one settings.py names)."""
    path = tmp_path / "app.db"
    with EmulatorServer() as clerk, django_database(f"sqlite:///{path}"), \
            override_settings(CLERK_SYNC=emulator_settings(clerk)):
        user = clerk.create_user(email="a@example.com")
        request = RequestFactory().get("/t/me", HTTP_AUTHORIZATION="Bearer " + clerk.mint_session_token(user["id"]))
        error = clerk_request(request).error
        assert isinstance(error, StoreError)
        assert "the schema is not current" in str(error) and f"clerk-sync's database is sqlite:///{path}" in str(error)
        with pytest.raises(CommandError, match=rf"schema is not current.*clerk-sync's database is sqlite:///{path}"):
            call_command("clerk_sync", "replay")


def test_the_named_database_hides_its_password() -> None:
    from clerk_sync.integrations.django.runtime import naming_database

    behind = StoreError("database error: ...; the schema is not current: run clerk-sync's migrations")
    named = naming_database(behind, "postgresql+psycopg://me:s3cret@db:5432/test_app")
    assert named is behind and "s3cret" not in str(named)
    assert str(named).endswith("clerk-sync's database is postgresql+psycopg://***@db:5432/test_app")
    assert str(naming_database(named, "sqlite:///other.db")) == str(named)  # named once
    down = StoreError("database error: OperationalError: connection refused")
    assert str(naming_database(down, "sqlite:///x.db")) == "database error: OperationalError: connection refused"


def test_under_djangos_test_environment_the_test_database_wins_over_the_environments_database_url(
        tmp_path: Path) -> None:
    """dj-database-url: ``DATABASES`` comes from ``DATABASE_URL`` and Django's tests run on ``test_<name>``, but the
    variable won over Django's database, so clerk-sync wrote to the real one during the tests. Only an explicit
    ``CLERK_SYNC['DATABASE_URL']`` moves it now; outside tests the environment still wins."""
    from django.test.utils import setup_test_environment, teardown_test_environment

    from clerk_sync.integrations.django.conf import clerk_settings

    env = {"DATABASE_URL": "postgresql+psycopg://me:pw@db/app"}
    test_db = tmp_path / "test_app.db"
    with django_database(f"sqlite:///{test_db}"):
        assert clerk_settings(env).database_url == env["DATABASE_URL"]  # (no test environment)
        setup_test_environment()
        try:
            assert clerk_settings(env).database_url == f"sqlite:///{test_db}"
            with override_settings(CLERK_SYNC={"DATABASE_URL": "sqlite:///chosen.db"}):
                assert clerk_settings(env).database_url == "sqlite:///chosen.db"
        finally:
            teardown_test_environment()


def test_the_processors_metrics_carry_the_databases_freshness_series(db_url: str) -> None:
    """What ``serve`` exposes on ``/metrics`` (database up, schema current, hook jobs), read at scrape time: an
    app rendering ``processor.metrics`` had none of them, so ClerkSyncDatabaseDown and the schema alerts could
    never fire for a Django app receiving its own webhooks."""
    with EmulatorServer() as clerk, django_database(db_url), override_settings(CLERK_SYNC=emulator_settings(clerk)):
        text = get_clerk_sync().processor.metrics.render().decode()
    assert _sample(text, "clerk_sync_database_up") == 1
    assert _sample(text, "clerk_sync_schema_current") == 1
    assert "clerk_sync_hook_jobs" in text


def test_a_command_argument_that_is_not_utf8_is_a_command_error_exit_2(db_url: str) -> None:
    """Review: ``manage.py clerk_sync promote $'j\\xfcrgen@...'`` was a driver's UnicodeEncodeError traceback."""
    with EmulatorServer() as clerk, django_database(db_url), override_settings(CLERK_SYNC=emulator_settings(clerk)), \
            pytest.raises(CommandError, match="is not valid UTF-8") as refused:
        call_command("clerk_sync", "promote", "j\udcfcrgen@example.com")
    assert refused.value.returncode == 2
