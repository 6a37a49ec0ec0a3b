"""A table of clerk-sync's missing under a version that says migrated (a partial restore, a table dropped by hand).

Every delivery failed while ``/readyz`` said ready on SQLite and "database down" elsewhere, ``/metrics`` said
``clerk_sync_database_up 0`` (or, for a table its read does not touch, all well), and ``doctor`` said ok. Now all
three say the schema is not current and name the tables, with what to do: `clerk-sync migrate` adds nothing at
this version, so restore them."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.cli.doctor import run_checks, run_freshness
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.freshness import read_snapshot
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.store import Store
from tests import factories as f
from tests._server import running
from tests.test_cli import run
from tests.test_operations import Scrape
from tests.test_schema_behind_doctor_metrics_and_webhook import _render

RESTORE = "the schema's version says migrated, so `clerk-sync migrate` adds nothing: restore them from a backup"


def _drop(url: str, table: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        cascade = " CASCADE" if conn.dialect.name == "postgresql" else ""
        conn.exec_driver_sql(f"DROP TABLE {table}{cascade}")
    engine.dispose()


@pytest.mark.parametrize("table", ["revoked_sessions", "webhook_events"])
def test_readyz_and_metrics_name_the_missing_table(db_url: str, table: str) -> None:
    """``revoked_sessions``: a table the scrape's values do not read (it said all well); ``webhook_events``: one
    they do (it said the database was down)."""
    _drop(db_url, table)
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": f.SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    store = Store.from_url(db_url)
    try:
        with running(create_app(settings, build_processor(settings, store))) as url, \
                httpx.Client(base_url=url, timeout=30) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            body = ready.json()
            assert (body["database"], body["migrations_current"], body["tables_missing"]) == ("ok", False, [table])
            assert f"missing tables: {table}; {RESTORE}" in body["hint"], body
            scrape = Scrape(client.get("/metrics").text)
            assert scrape.get("clerk_sync_database_up") == 1, "the database answers: not the page for an outage"
            assert scrape.get("clerk_sync_schema_current") == 0
        assert read_snapshot(store).schema_current is False
    finally:
        store.dispose()


def test_doctor_fails_the_database_line_and_freshness_exits_2(db_url: str) -> None:
    _drop(db_url, "revoked_sessions")
    settings = Settings.from_env({"DATABASE_URL": db_url})
    database = {c.name: c for c in run_checks(settings)}["database"]
    assert database.status == "fail", database
    assert "migrations current" in database.detail and f"missing tables: revoked_sessions; {RESTORE}" \
        in database.detail, database.detail
    with pytest.raises(ConfigError, match="missing tables: revoked_sessions"):  # (exit 2: not an outage)
        run_freshness(settings)
    result = run("doctor", "--freshness", env={"DATABASE_URL": db_url})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "missing tables: revoked_sessions" in out, out


def test_every_table_there_reads_current_in_two_statements(db_url: str) -> None:
    """The check costs the scrape no round trip (the tables are named in its first statement) and says nothing
    on a whole schema."""
    store = Store.from_url(db_url)
    try:
        seen: list[str] = []
        sa.event.listen(store.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        assert read_snapshot(store).schema_current is True
        assert len([s for s in seen if s.lstrip().upper().startswith("SELECT")]) == 2, seen
        assert Scrape(_render(store)).get("clerk_sync_schema_current") == 1
        checks = {c.name: c for c in run_checks(Settings.from_env({"DATABASE_URL": db_url}))}
        assert checks["database"].status == "ok", checks["database"]
    finally:
        store.dispose()


@pytest.mark.parametrize("kind", [pytest.param("postgresql", marks=pytest.mark.postgres),
                                  pytest.param("mysql", marks=pytest.mark.mariadb)])
def test_a_table_the_role_may_not_read_is_a_grant_to_give_not_a_table_to_restore(kind: str) -> None:
    """Review: MySQL/MariaDB hide a table from a role with no privilege on it at all (the RUNBOOK's step of a new
    table to grant), which read as missing ("restore it from a backup") with the GRANT never said; and a table of
    the deliveries' the role may not read failed the scrape's first read on both, ``clerk_sync_database_up 0``."""
    from tests.test_least_privilege_roles import _service, granted

    with granted(kind) as roles:
        roles.as_owner(f"REVOKE ALL PRIVILEGES ON {'' if kind == 'postgresql' else f'`{roles.database}`.'}"
                       f"clerk_sync_erased FROM {roles.runtime}")
        with _service(roles) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json().get("privileges") == "missing", ready.text
            assert "tables_missing" not in ready.json() and "restore" not in ready.text, ready.text
            scrape = Scrape(client.get("/metrics").text)
            assert (scrape.get("clerk_sync_database_up"), scrape.get("clerk_sync_schema_current")) == (1, 1)
        database = {c.name: c for c in run_checks(Settings.from_env({"DATABASE_URL": roles.runtime_url}))}["database"]
        assert "missing tables" not in database.detail, database.detail
        # And a table gone besides: MySQL/MariaDB answer the privilege first (1142 before 1146), which read as
        # current (review of the fix)
        roles.as_owner("DROP TABLE revoked_sessions")
        runtime = Store.from_url(roles.runtime_url)
        try:
            assert read_snapshot(runtime).schema_current is False
        finally:
            runtime.dispose()
