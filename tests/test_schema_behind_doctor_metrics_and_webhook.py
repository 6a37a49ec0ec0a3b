"""Disaster-recovery walkthrough: a PostgreSQL dump of an older schema revision restored under running
replicas. Every delivery answered 503 (a column of a newer migration missing), ``/readyz`` said
``migrations_current: false``, plain ``doctor`` failed "schema at 0015, code expects 0017: run `clerk-sync
migrate`", but ``doctor --freshness`` said fresh (exit 0) and ``clerk_sync_database_up`` stayed 1: nothing a
cron or an alert rule reads said the schema was behind. Now ``doctor --freshness`` asks the schema's revision
first, as ``doctor`` does (exit 2, the same advice; a newer schema is a warning), and ``/metrics`` exposes
``clerk_sync_schema_current`` (alert ClerkSyncSchemaNotCurrent)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.cli.doctor import run_checks, run_freshness
from clerk_sync.config import Settings
from clerk_sync.freshness import database_probe, read_snapshot
from clerk_sync.metrics import Metrics
from clerk_sync.store import Store, create_engine
from tests.test_cli import run
from tests.test_operations import Scrape

OLDER = "0015"  # a dump of this revision restored (code at a later head: never hard-coded here)


@pytest.fixture
def behind_url(db_url: str) -> str:
    """``db_url`` migrated only to :data:`OLDER`: every table the freshness reads exist, a newer column not."""
    engine = create_engine(db_url)
    migrations.downgrade(engine, OLDER)
    assert migrations.schema_state(engine) == ("behind", OLDER)
    engine.dispose()
    return db_url


def _set_revision(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = :r"), {"r": revision})  # noqa: S608
    engine.dispose()


def test_freshness_on_a_schema_behind_fails_with_exit_2_and_doctors_advice(behind_url: str) -> None:
    """Fixed: exit 0 and every line ok (the tables it reads are all there at 0015)."""
    head = migrations.head_revision()
    advice = f"schema at {OLDER}, code expects {head}: run `clerk-sync migrate`"
    result = run("doctor", "--freshness", env={"DATABASE_URL": behind_url})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, out
    assert advice in out, out
    assert "retry" not in out, out
    # the same words as plain doctor's database line (one code path)
    database = {c.name: c for c in run_checks(Settings.from_env({"DATABASE_URL": behind_url}))}["database"]
    assert (database.status, database.detail) == ("fail", advice)


def test_freshness_on_a_schema_newer_than_this_release_warns_and_reads_on(db_url: str) -> None:
    """A newer release migrated it (a rolling deploy): this one runs on it, so freshness is read as usual,
    with doctor's warning line first (exit 0: warnings included)."""
    _set_revision(db_url, "9999")
    checks = run_freshness(Settings.from_env({"DATABASE_URL": db_url}))
    assert (checks[0].name, checks[0].status) == ("database", "warn"), checks
    assert "newer than this release" in checks[0].detail and "cannot go back" in checks[0].detail
    assert {c.name for c in checks[1:]} >= {"newest delivery", "failed deliveries", "last reconcile", "hook jobs"}
    result = run("doctor", "--freshness", env={"DATABASE_URL": db_url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "newer than this release" in " ".join(result.stdout.split())


def test_freshness_on_a_current_schema_adds_no_line(db_url: str) -> None:
    checks = run_freshness(Settings.from_env({"DATABASE_URL": db_url}))
    assert "database" not in {c.name for c in checks}
    assert run("doctor", "--freshness", env={"DATABASE_URL": db_url}).returncode == 0


# -- clerk_sync_schema_current: /readyz's migrations_current on /metrics, in the read's first round trip --------

def _statements(store: Store) -> list[str]:
    seen: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def test_schema_current_is_read_with_the_other_values_in_the_same_round_trips(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        seen = _statements(store)
        assert read_snapshot(store).schema_current is True
        selects = [sql for sql in seen if sql.lstrip().upper().startswith("SELECT")]
        assert len(selects) == 2, seen  # as before the series: no query per scrape more
        assert migrations.VERSION_TABLE in selects[0], selects[0]
        assert Scrape(_render(store)).get("clerk_sync_schema_current") == 1
    finally:
        store.dispose()


def test_schema_behind_reads_0_while_the_database_is_up(behind_url: str) -> None:
    """Fixed: clerk_sync_database_up 1 and nothing else said so (only the 503s, after 10 minutes)."""
    store = Store.from_url(behind_url)
    try:
        assert read_snapshot(store).schema_current is False
        scrape = Scrape(_render(store))
        assert scrape.get("clerk_sync_database_up") == 1 and scrape.get("clerk_sync_schema_current") == 0
    finally:
        store.dispose()


def test_schema_newer_than_this_release_reads_1(db_url: str) -> None:
    """As /readyz: a newer release migrated it (a rolling deploy), this one runs on it."""
    _set_revision(db_url, "9999")
    store = Store.from_url(db_url)
    try:
        assert read_snapshot(store).schema_current is True
    finally:
        store.dispose()


def test_without_clerk_syncs_version_table_the_values_are_read_and_the_schema_is_behind(db_url: str) -> None:
    """A database an older release migrated keeps the revision in ``alembic_version`` (moved at the next
    migrate): the combined read fails on the missing table, the values are read without it (database_up
    stays 1), and the schema's state as /readyz reads it (a legacy revision behind this release's head)."""
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {migrations.VERSION_TABLE}"))
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES (:r)"), {"r": OLDER})
    engine.dispose()
    store = Store.from_url(db_url)
    try:
        snap = read_snapshot(store)
        assert snap.schema_current is False and snap.failed_backlog == 0
        scrape = Scrape(_render(store))
        assert scrape.get("clerk_sync_database_up") == 1 and scrape.get("clerk_sync_schema_current") == 0
    finally:
        store.dispose()


def _render(store: Store) -> str:
    metrics = Metrics()
    metrics.watch_database(database_probe(store))
    return metrics.render().decode()


@pytest.mark.parametrize("older", ["0008_console", "base"], ids=["before-the-hooks-outbox", "empty"])
def test_a_database_older_than_the_hooks_outbox_or_empty_is_up_with_its_schema_behind(db_url: str, older: str) -> None:
    """Review finding: the second read (without the version table) reads the hooks outbox too, so a schema from
    before it (0009) or an empty database (a restore under way) failed it as well, and /metrics said
    ``clerk_sync_database_up 0``: ClerkSyncDatabaseDown paged ("check DATABASE_URL and the server") where
    ClerkSyncSchemaNotCurrent is the lead, as /readyz and doctor said. Now: up, schema 0, nothing else read."""
    engine = create_engine(db_url)
    migrations.downgrade(engine, older)
    engine.dispose()
    store = Store.from_url(db_url)
    try:
        snap = read_snapshot(store)
        assert (snap.schema_current, snap.tables_read) == (False, False)
        scrape = Scrape(_render(store))
        assert scrape.get("clerk_sync_database_up") == 1 and scrape.get("clerk_sync_schema_current") == 0
        assert not scrape.has("clerk_sync_failed_deliveries") and not scrape.has("clerk_sync_hook_jobs")
    finally:
        store.dispose()
