"""Migrations build exactly the tables the code declares, on SQLite and PostgreSQL, and reverse cleanly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from clerk_sync import migrations
from clerk_sync.store import create_engine
from clerk_sync.tables import metadata

# Expression indexes (migration 0008_console) live in the migration only: SQLAlchemy cannot reflect
# them on SQLite, nor compare them on PostgreSQL.
EXPRESSION_INDEXES = {"ix_webhook_events_data_id", "ix_webhook_events_data_user_id", "ix_webhook_events_data_org_id",
                      "ix_users_first_name_lower", "ix_users_last_name_lower", "ix_organizations_name_lower",
                      "ix_webhook_events_data_owner_id", "ix_users_email_lower"}  # (the last two: 0020)


# ... and on MySQL/MariaDB, the indexed virtual columns standing in for them (migration 0012).
CONSOLE_COLUMNS = {"data_id", "data_user_id", "data_org_id", "first_name_lower", "last_name_lower", "name_lower",
                   "data_owner_id", "email_lower"}


# ... and PostgreSQL's partial index for a dispatcher's claim (migration 0018; its predicate is not compared).
PARTIAL_INDEXES = {"ix_hook_jobs_hook_id_unfinished"}


def _compared(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    return not ((type_ == "index" and name in EXPRESSION_INDEXES | PARTIAL_INDEXES)
                or (type_ == "column" and name in CONSOLE_COLUMNS))


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
def test_migrated_schema_matches_the_tables(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _compared,
                                                         "version_table": migrations.VERSION_TABLE})
        diff = compare_metadata(context, metadata)
    assert diff == []
    assert migrations.is_current(engine)
    engine.dispose()


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
def test_expression_indexes_exist(db_url: str) -> None:
    engine = create_engine(db_url)
    inspector = sa.inspect(engine)
    names = {ix["name"] for t in ("webhook_events", "users", "organizations") for ix in inspector.get_indexes(t)}
    engine.dispose()
    if engine.dialect.name in ("postgresql", "mysql", "mariadb"):  # SQLite's reflection skips them (the filter)
        assert names >= EXPRESSION_INDEXES
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'").scalars()
            assert set(rows) >= EXPRESSION_INDEXES
    engine.dispose()


def test_downgrade_to_base_and_up_again(db_url: str) -> None:
    engine = create_engine(db_url)
    migrations.downgrade(engine, "base")
    names = set(sa.inspect(engine).get_table_names()) - {migrations.VERSION_TABLE}
    assert not names & {"users", "organizations", "webhook_events"}
    assert not migrations.is_current(engine)
    migrations.upgrade(engine)
    migrations.upgrade(engine)  # idempotent
    assert migrations.is_current(engine)
    assert {"users", "organizations", "organization_memberships", "webhook_events", "audit_log"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


@pytest.mark.parametrize("db_url", ["mariadb"], indirect=True)
def test_the_mysql_console_columns_migration_can_be_run_again_after_stopping_half_way(db_url: str) -> None:
    """MySQL DDL is not transactional: a 0012 stopped after some of its columns must not fail when re-run."""
    engine = create_engine(db_url)
    migrations.downgrade(engine, "0011")
    with engine.begin() as conn:  # what a run stopped after its first column left behind
        conn.exec_driver_sql("ALTER TABLE users ADD COLUMN first_name_lower VARCHAR(255) AS (lower(first_name)) VIRTUAL")
    migrations.upgrade(engine)
    assert migrations.is_current(engine)
    indexes = {ix["name"] for t in ("webhook_events", "users", "organizations") for ix in sa.inspect(engine).get_indexes(t)}
    assert indexes >= EXPRESSION_INDEXES
    engine.dispose()


def test_a_database_a_newer_release_migrated_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    """Review finding: `migrate` on a database at a revision this release does not know (a newer clerk-sync
    migrated it, then the deploy was rolled back) dumped alembic's traceback and exited 1."""
    from tests.test_cli import run

    url = f"sqlite:///{tmp_path / 'newer.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE clerk_sync_alembic_version SET version_num = '0099_from_the_future'"))
    engine.dispose()
    result = run("migrate", env={"DATABASE_URL": url})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "Traceback" not in out, out
    assert "the database is at migration '0099_from_the_future', which this clerk-sync does not know" in out
    assert f"(its newest is '{migrations.head_revision()}')" in out and "serve --no-migrate" in out


@pytest.mark.parametrize(("variables", "refused"), [
    ({"log_bin": "ON", "wsrep_on": "OFF", "log_bin_trust_function_creators": "OFF"}, True),
    # a Galera node emulates binary logging with log_bin off, and refuses just the same
    ({"log_bin": "OFF", "wsrep_on": "ON", "log_bin_trust_function_creators": "OFF"}, True),
    ({"log_bin": "ON", "log_bin_trust_function_creators": "OFF"}, True),  # MySQL: no wsrep_on at all
    ({"log_bin": "ON", "wsrep_on": "ON", "log_bin_trust_function_creators": "ON"}, False),
    ({"log_bin": "OFF", "wsrep_on": "OFF", "log_bin_trust_function_creators": "OFF"}, False),
    ({"log_bin": "OFF", "log_bin_trust_function_creators": "OFF"}, False),
])
def test_doctor_reads_a_galera_node_as_refusing_untrusted_triggers_like_binary_logging(
        variables: dict[str, str], refused: bool) -> None:
    assert migrations.refuses_untrusted_triggers(variables) is refused


@pytest.mark.parametrize("db_url", ["mariadb"], indirect=True)
def test_a_step_whose_ddl_finished_without_its_version_runs_again(db_url: str) -> None:
    """Review: MySQL/MariaDB finish an ALTER or CREATE INDEX their client was killed in (kill -9 of `migrate`
    during a long index build on the inbox): the version was never written, and the next `migrate` ran the step
    again, failing for good on the column or index it found (1060/1061), `serve` retrying it for ever. Steps
    0005-0008, 0016 and 0017 take only what is missing now (0012-0015, 0018-0021 did already). Simulated from
    an empty database: each step applied, its version set back to the one before, then run again. (PostgreSQL's
    and SQLite's DDL is transactional: a killed step leaves nothing.)"""
    engine = create_engine(db_url)
    migrations.downgrade(engine, "base")
    version = sa.table(migrations.VERSION_TABLE, sa.column("version_num", sa.String(32)))
    for step, before in (("0005", "0004"), ("0006", "0005"), ("0007", "0006"), ("0008_console", "0007"),
                         ("0016", "0015"), ("0017", "0016")):
        migrations.upgrade(engine, step)
        with engine.begin() as conn:
            conn.execute(version.update().values(version_num=before))
        migrations.upgrade(engine, step)  # (it raised MigrationError on MariaDB)
        assert migrations.current_revision(engine) == step
    migrations.upgrade(engine)
    assert migrations.schema_state(engine)[0] == "current"
    engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_inbox_payload_with_nan_from_0_2_0_does_not_stop_the_upgrade(db_url: str) -> None:
    """Review: release 0.2.0 parsed bodies with a plain json.loads, which takes NaN, and stored them so: to
    SQLite before 3.42 no JSON, and 0008's json_extract indexes over every row failed the upgrade every time.
    Such numbers are stored as null first; the rest of the payload as it was."""
    engine = create_engine(db_url)
    migrations.downgrade(engine, "base")
    migrations.upgrade(engine, "0007")
    payload = '{"type":"user.updated","data":{"id":"user_nan","unsafe_metadata":{"score":NaN,"top":-Infinity}}}'
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO webhook_events (svix_id, type, received_at, payload, status, attempts) "
                             "VALUES ('msg_nan', 'user.updated', '2026-01-01 00:00:00', ?, 'applied', 1)", (payload,))
    migrations.upgrade(engine)
    assert migrations.schema_state(engine)[0] == "current"
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT payload FROM webhook_events WHERE svix_id = 'msg_nan'").scalar_one()
    assert json.loads(stored) == {"type": "user.updated",
                                  "data": {"id": "user_nan", "unsafe_metadata": {"score": None, "top": None}}}
    engine.dispose()
