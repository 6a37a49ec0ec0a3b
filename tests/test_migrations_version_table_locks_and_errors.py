"""The migrations: clerk-sync's own version table beside an app's Alembic (and the one-time move of
an existing install out of ``alembic_version``), MySQL's migration lock held until the last version bump
committed, "current" that a newer release's schema does not fail, and a failed step named with its cause."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from clerk_sync import migrations
from clerk_sync._db_errors import store_error
from clerk_sync.config import DatabaseTimeouts, Settings
from clerk_sync.errors import ConfigError
from clerk_sync.store import create_engine
from tests.conftest import _PG_PROBLEM, PG_URL, SECRET, mysql_database, pg_schema_url, require_server

OURS = "clerk_sync_alembic_version"
LEGACY = "alembic_version"
CLERK_TABLES = {"users", "organizations", "organization_memberships", "webhook_events", "audit_log", "hook_jobs"}
HEAD = migrations.head_revision()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no clerk-sync tables) on each store."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'app.db'}"
    elif request.param == "mariadb":
        with mysql_database() as url:
            yield url
    else:
        require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
        schema = f"t_{uuid.uuid4().hex[:12]}"
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        try:
            yield pg_schema_url(schema)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own (as tests.test_cli.run)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"} | env
    return subprocess.run([sys.executable, "-c", "from clerk_sync.cli import main; main()", *args],
                          capture_output=True, text=True, env=full, timeout=120, check=False)


def _rows(engine: sa.Engine, table: str) -> list[str] | None:
    """The revisions in a version table, None when there is no such table."""
    if not sa.inspect(engine).has_table(table):
        return None
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(sa.table(table, sa.column("version_num")).c.version_num)).scalars())


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def _app_alembic(tmp_path: Path, url: str, revision: str) -> Config:
    """The app's own Alembic (or Flask-Migrate) on the same database: one revision creating ``accounts``,
    its revision in Alembic's default ``alembic_version``."""
    where = tmp_path / f"app_migrations_{revision}"
    (where / "versions").mkdir(parents=True)
    (where / "env.py").write_text(textwrap.dedent("""
        import sqlalchemy as sa
        from alembic import context

        engine = sa.create_engine(context.config.attributes["url"])
        with engine.begin() as connection:
            context.configure(connection=connection)
            context.run_migrations()
        engine.dispose()
    """))
    (where / "versions" / f"{revision}_accounts.py").write_text(textwrap.dedent(f"""
        import sqlalchemy as sa
        from alembic import op

        revision = {revision!r}
        down_revision = None
        branch_labels = None
        depends_on = None


        def upgrade():
            op.create_table("accounts", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String(50)))


        def downgrade():
            op.drop_table("accounts")
    """))
    cfg = Config()
    cfg.set_main_option("script_location", str(where))
    cfg.attributes["url"] = url
    return cfg


def _as_a_release_before_the_fix(engine: sa.Engine, at: str) -> None:
    """A database an earlier clerk-sync migrated to ``at``: its revision in ``alembic_version``."""
    migrations.upgrade(engine, at)
    if not sa.inspect(engine).has_table(OURS):  # (the code before the fix wrote alembic_version itself)
        return
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {LEGACY} (version_num VARCHAR(32) NOT NULL, "
                             "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))")
        conn.execute(sa.table(LEGACY, sa.column("version_num")).insert().values(version_num=at))
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {OURS}")


def _set_revision(engine: sa.Engine, revision: str) -> None:
    """Where clerk-sync keeps its revision (alembic_version before the fix)."""
    table = getattr(migrations, "VERSION_TABLE", LEGACY)
    with engine.begin() as conn:
        conn.execute(sa.table(table, sa.column("version_num")).update().values(version_num=revision))


# -- 1. clerk-sync's own version table ---------------------------------------------------------------------


@pytest.mark.parametrize("app_revision", ["a1b2c3d4e5f6", "0005", "0014"])
def test_an_apps_own_alembic_version_is_left_alone_and_clerk_sync_migrates_fully(
        empty_url: str, tmp_path: Path, app_revision: str) -> None:
    """Fixed: with the app's Alembic first, `migrate` said "a newer clerk-sync migrated it"; at an app revision
    named like one of ours ('0005'), clerk-sync ran its 0006 onwards against the app's tables."""
    app = _app_alembic(tmp_path, empty_url, app_revision)
    command.upgrade(app, "head")
    engine = create_engine(empty_url)
    try:
        migrations.upgrade(engine)
        assert _rows(engine, OURS) == [HEAD]
        assert _rows(engine, LEGACY) == [app_revision]  # the app's, untouched
        assert CLERK_TABLES | {"accounts"} <= _tables(engine)
        assert migrations.current_revision(engine) == HEAD and migrations.is_current(engine)
        command.downgrade(app, "base")  # the app's Alembic keeps its own history
        command.upgrade(app, "head")
        assert _rows(engine, LEGACY) == [app_revision] and _rows(engine, OURS) == [HEAD]
        migrations.upgrade(engine)  # idempotent beside it
    finally:
        engine.dispose()


def test_the_apps_alembic_runs_after_clerk_sync_migrated(empty_url: str, tmp_path: Path) -> None:
    """Fixed: clerk-sync first, the app's `alembic upgrade head` failed "Can't locate revision '0014'"."""
    engine = create_engine(empty_url)
    try:
        migrations.upgrade(engine)
        command.upgrade(_app_alembic(tmp_path, empty_url, "a1b2c3d4e5f6"), "head")
        assert _rows(engine, LEGACY) == ["a1b2c3d4e5f6"] and _rows(engine, OURS) == [HEAD]
        assert "accounts" in _tables(engine) and migrations.is_current(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("at", ["0014", "0007"])
def test_an_existing_install_moves_into_its_own_version_table_without_running_migrations_again(
        empty_url: str, at: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = create_engine(empty_url)
    try:
        _as_a_release_before_the_fix(engine, at)
        assert migrations.current_revision(engine) == at  # read where it is, before `migrate` moves it
        with caplog.at_level(logging.INFO, logger="alembic.runtime.migration"):
            migrations.upgrade(engine)
        ran = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Running upgrade")]
        assert ran and ran[0].startswith(f"Running upgrade {at} -> "), ran  # from where it was, once
        assert _rows(engine, OURS) == [HEAD]
        assert _rows(engine, LEGACY) == [at]  # kept for the old release's replicas (see below)
        assert _tables(engine) >= CLERK_TABLES and migrations.is_current(engine)
    finally:
        engine.dispose()


def test_tables_without_a_revision_to_go_by_are_refused_saying_what_to_record(empty_url: str) -> None:
    """Fixed: an ``alembic_version`` of several rows (the app's Alembic ran clerk-sync's scripts
    as a branch) is not adopted, and the upgrade started from 0001 and failed on a table that exists, at every
    start. It is refused now, naming the rows and the one to record; nothing is written."""
    engine = create_engine(empty_url)
    try:
        _as_a_release_before_the_fix(engine, "0014")
        with engine.begin() as conn:
            conn.execute(sa.table(LEGACY, sa.column("version_num")).insert().values(version_num="app_head"))
        with pytest.raises(ConfigError, match=r"alembic_version holds \['0014', 'app_head'\].*INSERT INTO "
                                              r"clerk_sync_alembic_version"):
            migrations.upgrade(engine)
        assert sorted(_rows(engine, LEGACY)) == ["0014", "app_head"] and OURS not in _tables(engine)
        with engine.begin() as conn:  # what the message says to do
            conn.execute(sa.text(f"CREATE TABLE {OURS} (version_num VARCHAR(32) PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO clerk_sync_alembic_version VALUES ('0014')"))
            conn.execute(sa.text("DELETE FROM alembic_version WHERE version_num = '0014'"))
        migrations.upgrade(engine)
        assert _rows(engine, OURS) == [HEAD] and _rows(engine, LEGACY) == ["app_head"]
    finally:
        engine.dispose()


_MIGRATE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from clerk_sync import migrations
from clerk_sync.store import create_engine
engine = create_engine(sys.argv[1])
migrations.upgrade(engine)
print(migrations.current_revision(engine))
"""


def _migrate_at_once(url: str, n: int) -> list[str]:
    """``n`` processes migrating ``url`` at once (replicas starting together); what each ran, in its log."""
    procs = [subprocess.Popen([sys.executable, "-c", _MIGRATE, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    logs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0 and out.strip() == HEAD, err[-2000:]
        logs.append(err)
    ran = [line for log in logs for line in log.splitlines() if line.startswith("Running upgrade")]
    assert len(ran) == len(set(ran)), ran  # each migration by one of them
    return ran


def test_concurrent_starts_adopt_once_and_serialize(empty_url: str) -> None:
    engine = create_engine(empty_url)
    try:
        _as_a_release_before_the_fix(engine, "0013")
        ran = _migrate_at_once(empty_url, 3)
        assert ran[0].startswith("Running upgrade 0013 -> 0014")
        assert _rows(engine, OURS) == [HEAD] and _rows(engine, LEGACY) == ["0013"]
    finally:
        engine.dispose()


def _old_release_start_up_migration(tmp_path: Path, engine: sa.Engine, head: str) -> None:
    """What a replica of clerk-sync 0.2.0 or earlier runs at start (its env.py, as at 7fac1f2): Alembic's
    upgrade to its head with the revision in Alembic's default ``alembic_version``; our scripts, which are its
    (0001 to its head did not change)."""
    where = tmp_path / "old_release_migrations"
    where.mkdir()
    (where / "versions").symlink_to(Path(migrations.__file__).parent / "versions")
    (where / "env.py").write_text(textwrap.dedent("""
        from alembic import context
        from clerk_sync.tables import metadata

        with context.config.attributes["engine"].begin() as connection:
            context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
            context.run_migrations()
    """))
    cfg = Config()
    cfg.set_main_option("script_location", str(where))
    cfg.attributes["engine"] = engine
    command.upgrade(cfg, head)


def _old_release_revision(engine: sa.Engine) -> str | None:
    """What a replica of clerk-sync 0.2.0 or earlier reads for /readyz (ready only at its head exactly)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_the_old_releases_replicas_keep_their_revision_through_the_upgrade(
        empty_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Fixed (rolling-upgrade walkthrough): the first `migrate` of this release moved the revision out of
    ``alembic_version`` and dropped it: every replica of the release being upgraded from (0.2.0 and earlier) read
    no revision the moment it committed (/readyz 503 on all of them at once: no backend until the new replicas
    were up), and one restarted meanwhile ran 0001 again at start (``relation "users" already exists``, exit 2).
    The row stays where they read it; this release reads its own table only, and a second `migrate` is a no-op."""
    engine = create_engine(empty_url)
    try:
        _as_a_release_before_the_fix(engine, "0005")
        assert _old_release_revision(engine) == "0005"
        done = migrations.upgrade(engine)
        assert done.start == "0005" and done.steps and done.steps[-1] == HEAD
        assert _rows(engine, OURS) == [HEAD] and _rows(engine, LEGACY) == ["0005"]
        assert _old_release_revision(engine) == "0005"  # the old replicas stay ready
        with caplog.at_level(logging.INFO, logger="alembic.runtime.migration"):
            _old_release_start_up_migration(tmp_path, engine, "0005")  # one restarted: nothing to run
            again = migrations.upgrade(engine)  # this release's: adopts nothing, runs nothing
        assert not [r for r in caplog.records if r.getMessage().startswith("Running upgrade")]
        assert again == migrations.Upgraded(HEAD, ())
        assert _rows(engine, OURS) == [HEAD] and _rows(engine, LEGACY) == ["0005"]
        assert migrations.current_revision(engine) == HEAD and migrations.schema_state(engine) == ("current", HEAD)
    finally:
        engine.dispose()


def test_doctor_says_how_to_remove_the_old_releases_row_and_stops_once_it_is_gone(empty_url: str) -> None:
    from clerk_sync.cli.doctor import _database

    engine = create_engine(empty_url)
    settings = Settings.from_env({"DATABASE_URL": empty_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    try:
        _as_a_release_before_the_fix(engine, "0005")
        migrations.upgrade(engine)
        status, detail = _database(settings)
        assert status == "warn", detail
        assert detail.startswith(f"reachable, migrations current ({HEAD}); alembic_version still holds '0005'")
        delete = "DELETE FROM alembic_version WHERE version_num = '0005'"
        assert delete in detail and "DROP TABLE alembic_version" in detail and "no replica" in detail
        with engine.begin() as conn:  # what it says, once no old replica runs
            conn.exec_driver_sql(delete)
            conn.exec_driver_sql("DROP TABLE alembic_version")
        assert _database(settings) == ("ok", f"reachable, migrations current ({HEAD})")
        assert migrations.upgrade(engine) == migrations.Upgraded(HEAD, ())
    finally:
        engine.dispose()


def test_doctor_does_not_warn_about_an_apps_own_alembic_version(empty_url: str, tmp_path: Path) -> None:
    engine = create_engine(empty_url)
    settings = Settings.from_env({"DATABASE_URL": empty_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    try:
        migrations.upgrade(engine)
        command.upgrade(_app_alembic(tmp_path, empty_url, "a1b2c3d4e5f6"), "head")
        from clerk_sync.cli.doctor import _database

        assert _database(settings) == ("ok", f"reachable, migrations current ({HEAD})")
    finally:
        engine.dispose()


# -- 2. MySQL/MariaDB: the lock is released after the commit -----------------------------------------------


@pytest.mark.mariadb
def test_the_mysql_migration_lock_is_released_once_the_last_version_bump_committed() -> None:
    """Fixed: RELEASE_LOCK ran inside the migration's transaction, before its final version bump committed:
    a replica waiting for the lock read the previous revision and ran the last migration again ("Online
    migration expected to match one row"). What another connection reads at the release is the head."""
    with mysql_database() as url:
        engine, observer = create_engine(url), create_engine(url)
        seen: list[str | None] = []

        @sa.event.listens_for(engine, "before_cursor_execute")
        def at_release(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            if "RELEASE_LOCK" in statement:
                seen.append(migrations.current_revision(observer))

        try:
            migrations.upgrade(engine)
        finally:
            engine.dispose()
            observer.dispose()
        assert seen == [HEAD]


@pytest.mark.mariadb
def test_concurrent_migrates_of_a_fresh_mariadb_database_all_succeed() -> None:
    for _ in range(3):
        with mysql_database() as url:
            ran = _migrate_at_once(url, 4)
            assert ran[0].startswith("Running upgrade  -> 0001")


def _two_heads(path: Path) -> str:
    """A version table Alembic refuses (two revisions of one line of history): its CommandError."""
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    table = getattr(migrations, "VERSION_TABLE", LEGACY)
    with engine.begin() as conn:
        conn.execute(sa.table(table, sa.column("version_num")).insert().values(version_num="0013"))
        if table != LEGACY:  # the code before the fix reads alembic_version
            conn.exec_driver_sql(f"CREATE TABLE {LEGACY} (version_num VARCHAR(32) PRIMARY KEY)")
            conn.execute(sa.table(LEGACY, sa.column("version_num")).insert(), [{"version_num": "0013"},
                                                                               {"version_num": "0014"}])
    engine.dispose()
    return url


def test_an_alembic_refusal_at_start_up_is_one_line_and_retried(tmp_path: Path) -> None:
    """Fixed: StartupMigration.attempt caught only SQLAlchemyError: Alembic's CommandError ended the start
    with a traceback. It is one line in migration_retry's log, tried again; `migrate` says it in one line."""
    from clerk_sync.integrations.starlette import StartupMigration

    engine = create_engine(_two_heads(tmp_path / "two.db"))
    migration = StartupMigration(engine)
    try:
        assert anyio.run(migration.attempt) is False
    finally:
        engine.dispose()
    assert migration.error is not None and "\n" not in migration.error
    assert "could not migrate" in migration.error and "more than one head" in migration.error, migration.error
    result = run("migrate", env={"DATABASE_URL": str(engine.url)})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "Traceback" not in out, out
    assert "error: could not migrate:" in out and "more than one head" in out


# -- 3. a schema newer than this release is ready -------------------------------------------------------


def _migrated(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ready.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    return url


def test_readyz_stays_ready_on_a_newer_schema_and_not_on_an_older_one(tmp_path: Path) -> None:
    """Fixed: during a rolling deploy the old pods failed readiness the moment the newer release migrated,
    with the hint "run clerk-sync migrate"."""
    from clerk_sync.integrations.starlette import create_app

    url = _migrated(tmp_path)
    engine = create_engine(url)
    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    app = create_app(settings)

    async def readyz() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
            return await client.get("/readyz")

    assert anyio.run(readyz).json() == {"database": "ok", "migrations_current": True}
    _set_revision(engine, "0099_a_newer_release")
    newer = anyio.run(readyz)
    assert newer.status_code == 200, newer.text
    assert newer.json() == {"database": "ok", "migrations_current": True, "migrations": "newer than this release"}
    _set_revision(engine, "0007")  # behind: not ready, as before
    behind = anyio.run(readyz)
    assert behind.status_code == 503 and behind.json()["migrations_current"] is False
    assert behind.json()["hint"] == "run `clerk-sync migrate`"
    engine.dispose()


def test_doctor_warns_on_a_newer_schema_and_fails_on_an_older_one(tmp_path: Path) -> None:
    from clerk_sync.cli.doctor import _database

    url = _migrated(tmp_path)
    engine = create_engine(url)
    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    assert _database(settings) == ("ok", f"reachable, migrations current ({HEAD})")
    _set_revision(engine, "0099_a_newer_release")
    status, detail = _database(settings)
    assert status == "warn", detail
    assert "newer than this release" in detail and "a newer clerk-sync migrated it" in detail
    assert "run `clerk-sync migrate`" not in detail
    _set_revision(engine, "0007")
    assert _database(settings) == ("fail", f"schema at 0007, code expects {HEAD}: run `clerk-sync migrate`")
    engine.dispose()


def test_the_console_says_the_schema_is_newer_than_this_release(tmp_path: Path) -> None:
    from clerk_sync.integrations.console._pages import _database
    from clerk_sync.store import Store

    store = Store.from_url(_migrated(tmp_path))
    console: Any = SimpleNamespace(store=store)
    try:
        assert _database(console) == {"ok": True, "detail": "migrations current"}
        _set_revision(store.engine, "0099_a_newer_release")
        newer = _database(console)
        assert newer["ok"] is True and newer["detail"].startswith("schema newer than this release"), newer
        _set_revision(store.engine, "0007")
        assert _database(console) == {"ok": False, "detail": "migrations behind: run `clerk-sync migrate`"}
    finally:
        store.dispose()


# -- 4. a failed migration names itself and its cause ----------------------------------------------------


def test_a_failed_step_is_named_with_its_cause_and_what_was_kept(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        migrations.downgrade(engine, "0006")
        with engine.begin() as conn:  # what 0009 creates, there already
            conn.exec_driver_sql("CREATE TABLE hook_jobs (id INTEGER)")
        with pytest.raises(migrations.MigrationError) as failed:
            migrations.upgrade(engine)
        message = str(failed.value)
        assert message.startswith("migration 0009 failed: database error: "), message
        assert "hook_jobs" in message and "already exists" in message and "DATABASE_URL" not in message
        assert failed.value.revision == "0009"
        if engine.dialect.name in ("mysql", "mariadb"):  # DDL commits as it goes
            assert "the migrations before it stay applied" in message
            assert migrations.current_revision(engine) == "0008_console"
        else:
            assert "nothing was applied (the upgrade is one transaction)" in message
            assert migrations.current_revision(engine) == "0006"
        assert message.endswith("fix the cause, then run `clerk-sync migrate` again")
    finally:
        engine.dispose()


def test_migrate_says_which_migration_failed(tmp_path: Path) -> None:
    """Fixed: every database error during `migrate` was "database error (...): ... Check DATABASE_URL.",
    without the migration or what to do."""
    url = f"sqlite:///{tmp_path / 'step.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine, "0008_console")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE hook_jobs (id INTEGER)")
    engine.dispose()
    result = run("migrate", env={"DATABASE_URL": url})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "Traceback" not in out, out
    assert "error: migration 0009 failed: database error: OperationalError: table hook_jobs already exists" in out
    assert "Check DATABASE_URL" not in out and "run `clerk-sync migrate` again" in out


@pytest.mark.postgres
def test_a_lock_wait_that_ran_out_in_a_migration_says_so(tmp_path: Path) -> None:
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = pg_schema_url(schema)
    engine = create_engine(url, timeouts=DatabaseTimeouts(lock_s=0.3))
    blocker = sa.create_engine(url)
    try:
        migrations.upgrade(engine, "0006")
        with blocker.connect() as reader:  # live traffic reading the inbox: 0007's ALTER TABLE waits for it
            reader.exec_driver_sql("SELECT count(*) FROM webhook_events").scalar()
            with pytest.raises(migrations.MigrationError) as failed:
                migrations.upgrade(engine)
            reader.rollback()
        message = str(failed.value)
        assert message.startswith("migration 0007 failed: database timeout: waited longer than lock_timeout for a "
                                  "lock held by another connection"), message
        assert "another connection held a lock it needs" in message and "DATABASE_URL" not in message
        assert migrations.current_revision(engine) == "0006"
    finally:
        engine.dispose()
        blocker.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_a_missing_column_says_the_schema_is_not_current(db_url: str) -> None:
    """Fixed: a missing table said "the schema is not current: run clerk-sync's migrations", a missing
    column (a release whose migration adds one) only the driver's message."""
    engine = create_engine(db_url)
    statements = ["SELECT not_there FROM users", "INSERT INTO users (not_there) VALUES (1)",
                  "UPDATE users SET not_there = 1"]
    try:
        for statement in statements:
            with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as raised:
                conn.exec_driver_sql(statement)
            message = str(store_error(raised.value))
            assert "the schema is not current: run clerk-sync's migrations" in message, (statement, message)
    finally:
        engine.dispose()
