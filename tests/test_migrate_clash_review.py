"""Review of the clash check (``migrate`` refusing when the app's tables hold clerk-sync's names), 2026-12-05:

1. PostgreSQL: the check listed every table on the ``search_path``, so ``search_path=clerk_sync,public`` (the app's
   schema kept reachable) took the app's ``public.users`` for a clash in clerk-sync's own, empty schema.
2. MariaDB: a first migration interrupted part-way (each CREATE TABLE commits at once) left clerk-sync's own
   ``users``; every retry blamed "a table users that clerk-sync did not create" and advised moving the app.
3. The advised rename of the app's table keeps its indexes' names: an app's ``ix_users_email`` (SQLAlchemy's
   default name) is the name clerk-sync's first migration gives its own; the check looked at tables only."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from clerk_sync import migrations
from clerk_sync.errors import ConfigError
from clerk_sync.store import create_engine
from tests.conftest import _PG_PROBLEM, PG_URL, mysql_database, require_server
from tests.test_cli import run


def _said(result: object) -> str:
    return " ".join((result.stdout + result.stderr).split())  # type: ignore[attr-defined]


def _app_users(engine: sa.Engine, schema: str | None = None) -> None:
    meta = sa.MetaData(schema=schema)
    sa.Table("users", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("email", sa.String(320), index=True))  # its index: ix_users_email, SQLAlchemy's default
    meta.create_all(engine)


@pytest.fixture
def pg_schemas() -> Iterator[tuple[str, str]]:
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    tag = uuid.uuid4().hex[:10]
    names = (f"cs_{tag}", f"app_{tag}")
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        yield names
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        admin.dispose()


@pytest.mark.postgres
def test_the_apps_schema_on_the_search_path_is_no_clash(pg_schemas: tuple[str, str]) -> None:
    ours, app = pg_schemas
    admin = sa.create_engine(PG_URL)
    _app_users(admin, app)
    admin.dispose()
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{ours}%2C{app}"
    result = run("migrate", env={"DATABASE_URL": url})
    assert result.returncode == 0, _said(result)
    engine = create_engine(url)
    try:
        assert "users" in sa.inspect(engine).get_table_names(schema=ours)  # clerk-sync's, in its own schema
        assert {c["name"] for c in sa.inspect(engine).get_columns("users", schema=app)} == {"id", "email"}
    finally:
        engine.dispose()


@pytest.mark.mariadb
def test_a_first_migration_interrupted_on_mariadb_is_said_so_and_retried_after_the_drop() -> None:
    with mysql_database() as url:
        engine = create_engine(url)
        try:
            def crash(conn: object, cursor: object, statement: str, *_: object) -> None:
                if "CREATE TABLE organization_memberships" in statement:
                    raise ConnectionError("the connection went away mid-migration")

            event.listen(engine, "before_cursor_execute", crash)
            with pytest.raises(Exception, match="went away"):
                migrations.upgrade(engine)
            event.remove(engine, "before_cursor_execute", crash)
            assert {"users", "organizations"} <= set(sa.inspect(engine).get_table_names())  # (DDL committed)
            with pytest.raises(ConfigError) as refused:
                migrations.upgrade(engine)
            said = str(refused.value)
            assert "clerk-sync's own tables users, organizations, empty, but no migration is recorded" in said, said
            assert "did not create" not in said and "DROP TABLE organizations; DROP TABLE users" in said, said
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP TABLE organizations")
                conn.exec_driver_sql("DROP TABLE users")
            migrations.upgrade(engine)
            assert migrations.is_current(engine)
        finally:
            engine.dispose()


@pytest.mark.mariadb
def test_an_apps_users_with_rows_is_still_a_clash_on_mariadb() -> None:
    """An app's table whose columns are a part of clerk-sync's (``id``, ``email``) and that has rows is the app's."""
    with mysql_database() as url:
        engine = create_engine(url)
        try:
            _app_users(engine)
            with engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO users (email) VALUES ('ada@example.com')")
            with pytest.raises(ConfigError, match="a table users that clerk-sync did not create"):
                migrations.upgrade(engine)
        finally:
            engine.dispose()


def test_a_renamed_tables_index_that_keeps_clerk_syncs_name_is_named_with_what_to_do(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(url)
    _app_users(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE users RENAME TO app_users")  # the advised fix, the index left as it was
    result = run("migrate", env={"DATABASE_URL": url})
    said = _said(result)
    assert result.returncode == 2, said
    assert "already has a table or index ix_users_email that clerk-sync did not create" in said, said
    assert "an index keeps its name when its table is renamed: rename ix_users_email too" in said, said
    with engine.begin() as conn:  # SQLite: drop it and create it again under another name
        conn.exec_driver_sql("DROP INDEX ix_users_email")
        conn.exec_driver_sql("CREATE INDEX ix_app_users_email ON app_users (email)")
    engine.dispose()
    again = run("migrate", env={"DATABASE_URL": url})
    assert again.returncode == 0, _said(again)


@pytest.mark.mariadb
@pytest.mark.parametrize(("table", "ddl"), [
    ("users", "CREATE TABLE users (id INT AUTO_INCREMENT PRIMARY KEY, email VARCHAR(320) NOT NULL UNIQUE, "
              "first_name VARCHAR(100), created_at DATETIME, updated_at DATETIME)"),
    ("organizations", "CREATE TABLE organizations (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100), "
                      "slug VARCHAR(100) UNIQUE, created_at DATETIME)"),
])
def test_an_apps_empty_table_of_clerk_syncs_column_names_is_never_to_be_dropped(table: str, ddl: str) -> None:
    """Second review: an app's new, empty ``users`` whose columns all have names clerk-sync's has too was taken for
    an interrupted migration's, and the operator told to DROP it. Without clerk-sync's unique key (``clerk_id``)
    it is the app's: the clash."""
    with mysql_database() as url:
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(ddl)
            with pytest.raises(ConfigError) as refused:
                migrations.upgrade(engine)
            said = str(refused.value)
            assert f"DROP TABLE {table}" not in said and "that clerk-sync did not create" in said, said
        finally:
            engine.dispose()


@pytest.mark.mariadb
def test_a_first_migration_interrupted_after_the_inbox_is_said_so_not_record_a_revision() -> None:
    """Second review: stopped after ``webhook_events`` (the inbox), the retry said "record the revision they are
    at", which would leave the rest of the first migration missing."""
    with mysql_database() as url:
        engine = create_engine(url)
        try:
            def crash(conn: object, cursor: object, statement: str, *_: object) -> None:
                if "CREATE TABLE audit_log" in statement:
                    raise ConnectionError("the connection went away mid-migration")

            event.listen(engine, "before_cursor_execute", crash)
            with pytest.raises(Exception, match="went away"):
                migrations.upgrade(engine)
            event.remove(engine, "before_cursor_execute", crash)
            with pytest.raises(ConfigError) as refused:
                migrations.upgrade(engine)
            said = str(refused.value)
            assert "was interrupted during its first migration" in said and "DROP TABLE webhook_events" in said, said
            assert "Record the revision" not in said
        finally:
            engine.dispose()
