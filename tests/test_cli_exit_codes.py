"""One exit-code table for every ``clerk-sync`` command: 2 is a setting (or argument, or schema) to fix, 3 is
something the command needs that is unavailable now (retry later), 1 is work left undone.

Walkthrough finding (2026-12-05, section 8): ``replay``, ``prune``, ``migrate``, ``hooks list``, ``reconcile``
and ``users erase`` exited 2 with the database down, the code of a settings error, so a cron wrapper could not
tell "fix the configuration" from "retry later"; ``serve`` exited 2 on a port in use although a start-up failure
exits 3; ``reconcile`` exited 2 with Clerk unreachable while ``users promote`` exits 3 for the same.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.errors import (
    ClerkNotFound,
    ClerkUnauthorized,
    ClerkUnavailable,
    ConfigError,
    RateLimited,
    ReconcileBusy,
    StoreDataError,
    StoreError,
)
from clerk_sync.testing import EmulatorServer
from tests.conftest import SECRET

CLI = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]
EXIT_SETTINGS, EXIT_UNAVAILABLE = 2, 3  # as documented (README's Commands table)

# One command of each family that reads or writes the database (users promote and reconcile reach Clerk too).
COMMANDS = [
    ("replay", "--status", "applied"),
    ("prune",),
    ("migrate",),
    ("hooks", "list"),
    ("worker", "--hooks", "tests._hook_worker:hooks", "--once"),
    ("reconcile", "--dry-run"),
    ("users", "erase", "user_gone", "--force"),
    ("users", "promote", "ann@example.com"),
]
DOWN = {
    "closed-port": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
}
MARIADB_DOWN = "mysql+mysqldb://root@127.0.0.1:1/nowhere"


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    full.update({"CLERK_SECRET_KEY": "sk_test_x", "CLERK_API_URL": "http://127.0.0.1:1",
                 "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, **env})
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full, timeout=120, check=False,
                          cwd=Path(__file__).parent.parent)


def said(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("url", list(DOWN.values()), ids=list(DOWN))
def test_a_database_that_cannot_be_reached_exits_3(command: tuple[str, ...], url: str, emulator: EmulatorServer) -> None:
    result = run(*command, env={"DATABASE_URL": url, "CLERK_API_URL": emulator.url,
                                "CLERK_SECRET_KEY": emulator.secret_key})
    assert result.returncode == EXIT_UNAVAILABLE, said(result)
    assert "Check DATABASE_URL, and that the database is up" in said(result) and "Traceback" not in said(result)


@pytest.mark.parametrize("command", [("migrate",), ("replay",)], ids=" ".join)
def test_a_mariadb_that_cannot_be_reached_exits_3(command: tuple[str, ...]) -> None:
    result = run(*command, env={"DATABASE_URL": MARIADB_DOWN})
    assert result.returncode == EXIT_UNAVAILABLE and "Can't connect" in said(result), said(result)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_settings_error_exits_2(command: tuple[str, ...], tmp_path: Path) -> None:
    result = run(*command, env={"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "CLERK_SYNC_MAX_BODY_BYTES": "lots"})
    assert result.returncode == EXIT_SETTINGS and "CLERK_SYNC_MAX_BODY_BYTES" in said(result), said(result)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_sqlite_file_in_a_directory_that_does_not_exist_exits_2(command: tuple[str, ...]) -> None:
    """A typo in the path, not a database that is down: sqlite3 says only "unable to open database file", which
    read as "retry later" (exit 3) until 2026-12-05."""
    result = run(*command, env={"DATABASE_URL": "sqlite:////nonexistent-clerk-sync-dir/x.db"})
    assert result.returncode == EXIT_SETTINGS, said(result)
    assert "its directory /nonexistent-clerk-sync-dir does not exist" in said(result), said(result)
    assert "mkdir -p /nonexistent-clerk-sync-dir" in said(result) and "Traceback" not in said(result)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///file:uri-clerk-sync-test.db?uri=true",
                                 "sqlite:///relative-clerk-sync-test.db"])
def test_in_memory_and_existing_directories_are_not_refused(url: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from clerk_sync.store import create_engine

    monkeypatch.chdir(tmp_path)  # (the relative file lands here)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select 1")).scalar() == 1
    engine.dispose()


@pytest.mark.postgres
def test_a_database_that_refuses_the_login_or_has_no_such_database_exits_2() -> None:
    """The server answers, and refuses what DATABASE_URL names: a setting to fix, not a wait."""
    from tests.conftest import PG_URL

    url = sa.make_url(PG_URL)
    for wrong in (url.set(database="clerk_sync_no_such_db"), url.set(username="clerk_sync_no_such_role")):
        result = run("hooks", "list", env={"DATABASE_URL": wrong.render_as_string(hide_password=False)})
        assert result.returncode == EXIT_SETTINGS and "does not exist" in said(result), said(result)


def test_a_schema_behind_exits_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'behind.db'}"
    sa.create_engine(url).connect().close()  # an empty database: migrate was not run
    result = run("hooks", "list", env={"DATABASE_URL": url})
    assert result.returncode == EXIT_SETTINGS and "the schema is not current" in said(result), said(result)


def test_clerk_unreachable_exits_3_as_users_promote_does(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    result = run("reconcile", env={"DATABASE_URL": url})  # (CLERK_API_URL: a closed port)
    assert result.returncode == EXIT_UNAVAILABLE and "could not connect" in said(result), said(result)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize("command", [("serve",), ("serve", "--workers", "2"), ("emulate",)], ids=" ".join)
def test_a_port_in_use_exits_3(command: tuple[str, ...], taken_port: int, tmp_path: Path) -> None:
    result = run(*command, "--port", str(taken_port), env={"DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"})
    assert result.returncode == EXIT_UNAVAILABLE and f"127.0.0.1:{taken_port}" in said(result), said(result)
    assert "serving on" not in said(result)


def test_a_worker_metrics_port_in_use_exits_3(taken_port: int, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    result = run("worker", "--hooks", "tests._hook_worker:hooks", "--metrics-port", str(taken_port),
                 env={"DATABASE_URL": url})
    assert result.returncode == EXIT_UNAVAILABLE and "choose a free port" in said(result), said(result)


def _driver_error(url: str) -> sa.exc.SQLAlchemyError:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table"))
    except sa.exc.SQLAlchemyError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("no error")


def test_the_table(tmp_path: Path) -> None:
    """``exit_code`` by kind of failure, the database's through a StoreError's cause as through its own."""
    from clerk_sync.cli.main import exit_code

    down = _driver_error(DOWN["closed-port"])
    missing_table = _driver_error(f"sqlite:///{tmp_path / 'empty.db'}")
    for exc, code in [(down, 3), (missing_table, 2), (_driver_error("sqlite:////nonexistent-clerk-sync-dir/x.db"), 3),  # (the driver's
                      # own "unable to open": create_engine refuses a missing directory before it, as a setting)
                      (_driver_error(MARIADB_DOWN), 3),
                      (ClerkUnavailable("down"), 3), (RateLimited("spent"), 3), (ReconcileBusy("running"), 3),
                      (ClerkUnauthorized("key"), 2), (ClerkNotFound("gone"), 2), (ConfigError("x"), 2),
                      (StoreDataError("value refused"), 2), (StoreError("another process held the lock"), 3),
                      (migrations.MigrationError("could not migrate: two heads"), 2)]:
        assert exit_code(exc) == code, (exc, code)
    for cause, code in [(down, 3), (missing_table, 2)]:
        assert exit_code(_wrapped(cause)) == code, (cause, code)


def _wrapped(cause: sa.exc.SQLAlchemyError) -> StoreError:
    """``cause`` as the store raises it: a StoreError in words, the driver's error its cause."""
    from clerk_sync._db_errors import store_error

    try:
        raise store_error(cause) from cause
    except StoreError as exc:
        return exc


def test_a_lock_wait_that_ran_out_exits_3(db_url: str) -> None:
    """A bounded wait for a lock another connection holds (PostgreSQL 55P03, MariaDB 1205, SQLite "database is
    locked"): the database is there and busy, so retry later, not a setting to fix."""
    from clerk_sync.cli.main import exit_code

    sqlite = db_url.startswith("sqlite")
    holder = sa.create_engine(db_url)
    waiter = sa.create_engine(db_url, connect_args={"timeout": 0.1} if sqlite else {})
    try:
        with holder.begin() as conn:
            conn.execute(sa.text("CREATE TABLE lock_probe (id INTEGER PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO lock_probe VALUES (1)"))
        with holder.begin() as held:
            held.execute(sa.text("UPDATE lock_probe SET id = 1 WHERE id = 1"))
            with waiter.begin() as conn:
                if db_url.startswith("postgresql"):
                    conn.execute(sa.text("SET LOCAL lock_timeout = '100ms'"))
                elif not sqlite:
                    conn.execute(sa.text("SET SESSION innodb_lock_wait_timeout = 1"))
                with pytest.raises(sa.exc.SQLAlchemyError) as raised:
                    conn.execute(sa.text("UPDATE lock_probe SET id = 1 WHERE id = 1"))
        assert exit_code(raised.value) == EXIT_UNAVAILABLE, raised.value
    finally:
        with holder.begin() as conn:
            conn.execute(sa.text("DROP TABLE lock_probe"))
        waiter.dispose()
        holder.dispose()
