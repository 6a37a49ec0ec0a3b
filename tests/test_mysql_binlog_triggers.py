"""MariaDB with binary logging on (RDS, Aurora, any replicated server): CREATE TRIGGER is refused (1419) to a role
without SUPER unless ``log_bin_trust_function_creators`` is on. The audit log's guards are triggers (migrations
0004, 0013, 0014, 0019), and MySQL cannot roll DDL back: the refusal must come before any step changes anything.

Before: `clerk-sync migrate` failed in 0004 with ``pending_role_changes`` created, so the next `migrate` (the
setting fixed) failed with "already exists"; `serve --migrate` retried it for ever; an upgrade through 0013 dropped
the audit log's update guard and could not create its successor.

A private MariaDB server (the machine's own binaries, a scratch data directory, ``--log-bin``) on a free port:
the shared server runs without binary logging, and it is a server setting."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.errors import ConfigError
from tests.conftest import _MYSQL_PROBLEM, MYSQL_URL, require_server

pytestmark = pytest.mark.mariadb

CLI = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def binlog_server() -> Iterator[str]:
    """A MariaDB server with binary logging on, a database ``test`` and a user ``app`` with every privilege on it
    (no SUPER): its root URL."""
    require_server("MariaDB", MYSQL_URL, _MYSQL_PROBLEM, "CLERK_SYNC_REQUIRE_MARIADB")
    server, install = shutil.which("mariadbd", path="/usr/sbin:/usr/bin"), shutil.which("mariadb-install-db")
    if server is None or install is None:
        if os.environ.get("CLERK_SYNC_REQUIRE_MARIADB") == "1":
            pytest.fail("mariadbd / mariadb-install-db not found (Debian's mariadb-server has them)")
        pytest.skip("mariadbd / mariadb-install-db not found")
    with tempfile.TemporaryDirectory(prefix="clerk-sync-binlog-") as tmp:
        data = Path(tmp) / "data"
        subprocess.run([install, "--no-defaults", "--user=root", f"--datadir={data}",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=120)
        port = _free_port()
        proc = subprocess.Popen([server, "--no-defaults", "--user=root", f"--datadir={data}", f"--port={port}",
                                 "--bind-address=127.0.0.1", f"--socket={tmp}/sock", f"--pid-file={tmp}/pid",
                                 f"--log-bin={data}/bin", "--server-id=1",
                                 "--innodb-force-primary-key=1"],  # (as managed servers may: a probe table had none)
                                stdout=subprocess.DEVNULL, stderr=(Path(tmp) / "server.log").open("w"))
        root = f"mysql+mysqldb://root@127.0.0.1:{port}/mysql"
        engine = sa.create_engine(root, isolation_level="AUTOCOMMIT")
        try:
            deadline = time.monotonic() + 60
            while True:  # until the server answers (it was just started)
                try:
                    with engine.connect() as conn:
                        # ours, not a server that took the port meanwhile (the port was free when asked)
                        assert conn.exec_driver_sql("SELECT @@datadir").scalar().rstrip("/") == str(data)
                        assert conn.exec_driver_sql("SELECT @@log_bin").scalar() == 1
                        for statement in ("CREATE DATABASE test CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
                                          "CREATE USER app@'127.0.0.1'", "GRANT ALL ON test.* TO app@'127.0.0.1'",
                                          # SUPER, and no DROP: what the steps need, and no more
                                          "CREATE USER owner@'127.0.0.1'", "GRANT SUPER ON *.* TO owner@'127.0.0.1'",
                                          "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, TRIGGER, "
                                          "REFERENCES, LOCK TABLES ON test.* TO owner@'127.0.0.1'"):
                            conn.exec_driver_sql(statement)
                    break
                except sa.exc.OperationalError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError((Path(tmp) / "server.log").read_text()[-3000:]) from None
                    time.sleep(0.2)
            yield root
        finally:
            engine.dispose()
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _admin(root: str, *statements: str) -> list[tuple[object, ...]]:
    engine = sa.create_engine(root, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            rows: list[tuple[object, ...]] = []
            for statement in statements:
                result = conn.exec_driver_sql(statement)
                if result.returns_rows:
                    rows = [tuple(row) for row in result]
            return rows
    finally:
        engine.dispose()


@pytest.fixture
def fresh(binlog_server: str) -> Iterator[str]:
    """An empty database ``test`` on the server, the setting off: the ``app`` user's URL."""
    _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 0", "DROP DATABASE IF EXISTS test",
           "CREATE DATABASE test CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    yield binlog_server.replace("root@", "app@").replace("/mysql", "/test")
    _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 0")


def _tables(root: str) -> list[str]:
    return sorted(str(row[0]) for row in _admin(root, "SHOW TABLES FROM test"))


def _triggers(root: str) -> list[str]:
    return sorted(str(row[0]) for row in _admin(
        root, "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = 'test'"))


def _run(*args: str, url: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    env |= {"DATABASE_URL": url, "CLERK_WEBHOOK_SECRET": SECRET}
    return subprocess.run([*CLI, *args], env=env, text=True, capture_output=True, timeout=timeout)


def _doctor_database_line(url: str) -> str:
    said = _run("doctor", url=url)
    return next(" ".join(line.split()) for line in said.stdout.splitlines() if "database:" in line)


def test_migrate_refused_before_any_step_then_runs_whole_once_the_server_trusts_trigger_creators(
        binlog_server: str, fresh: str) -> None:
    before = _doctor_database_line(fresh)  # doctor says it before anyone tries
    assert "run `clerk-sync migrate`" in before and "migrations 0004, 0013, 0014, 0019 create triggers" in before, before
    assert "log_bin_trust_function_creators=1" in before, before
    refused = _run("migrate", url=fresh)
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 2, said
    assert "log_bin_trust_function_creators=1" in said and "nothing was changed" in said, said
    assert "Traceback" not in said, said
    assert _tables(binlog_server) == []  # not pending_role_changes, not the version table, not the probe

    _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 1")
    trusted = _doctor_database_line(fresh)
    assert "run `clerk-sync migrate`" in trusted and "triggers" not in trusted, trusted
    done = _run("migrate", url=fresh)
    assert done.returncode == 0, done.stderr
    assert _triggers(binlog_server) == ["audit_log_no_delete", "audit_log_no_update"]
    assert "clerk_sync_trigger_probe" not in _tables(binlog_server)
    engine = sa.create_engine(fresh)
    try:
        assert migrations.is_current(engine)
        # A downgrade through 0019, 0014 and 0013 creates their predecessors' triggers again: refused before it
        # drops one.
        _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 0")
        with pytest.raises(ConfigError, match=r"migrations 0013, 0014, 0019 create"):
            migrations.downgrade(engine, "0012")
        assert migrations.is_current(engine)
        assert _triggers(binlog_server) == ["audit_log_no_delete", "audit_log_no_update"]
        _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 1")
        migrations.downgrade(engine, "0018")  # (0019's downgrade creates 0014's trigger again)
        _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 0")
        migrations.downgrade(engine, "0014")  # (0018 .. 0015 create none)
        assert migrations.current_revision(engine) == "0014"
    finally:
        engine.dispose()


def test_an_upgrade_through_the_audit_guards_keeps_the_old_guard_when_the_new_one_is_refused(
        binlog_server: str, fresh: str) -> None:
    """0013 drops audit_log_no_update and creates its successor: the drop went through, the create was refused,
    and the audit log took any UPDATE."""
    _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 1")
    engine = sa.create_engine(fresh)
    try:
        migrations.upgrade(engine, "0012")
        _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 0")
        with pytest.raises(ConfigError, match=r"migrations 0013, 0014, 0019 create"):
            migrations.upgrade(engine)
        assert migrations.current_revision(engine) == "0012"
        assert _triggers(binlog_server) == ["audit_log_no_delete", "audit_log_no_update"]
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO audit_log (action, actor_clerk_id, details, created_at) "
                                 "VALUES ('role.changed', 'user_1', '{}', NOW())")
        with pytest.raises(sa.exc.OperationalError, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql("UPDATE audit_log SET actor_clerk_id = 'user_2'")
        # A step with no trigger needs no trust: migrating to 0012 from here asks nothing.
        assert migrations.upgrade(engine, "0012").steps == ()
    finally:
        engine.dispose()


def test_serve_migrate_exits_2_saying_what_to_set_instead_of_retrying_for_ever(binlog_server: str,
                                                                                fresh: str) -> None:
    result = _run("serve", "--port", "0", "--migrate", url=fresh, timeout=90)
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, said[-3000:]
    assert "log_bin_trust_function_creators=1" in said and "migration_retry" not in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert _tables(binlog_server) == []


def test_a_step_refused_for_binary_logging_after_the_probe_is_no_outage_to_retry(binlog_server: str,
                                                                                  fresh: str) -> None:
    """The setting turned off between the probe and the step (or a step the probe does not know): `serve`'s start-up
    migration stops retrying and says what to set, as for the probe's refusal."""
    from clerk_sync.integrations.starlette import _refused
    from clerk_sync.migrations import MigrationError

    engine = sa.create_engine(fresh)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (id INT PRIMARY KEY)")
            with pytest.raises(sa.exc.OperationalError) as refused:
                conn.exec_driver_sql("CREATE TRIGGER t_guard BEFORE INSERT ON t FOR EACH ROW SET NEW.id = NEW.id")
    finally:
        engine.dispose()
    step = MigrationError(migrations._step_failure("0004", refused.value, "mariadb"), "0004")
    step.__cause__ = refused.value
    why = _refused(step)
    assert why is not None and "log_bin_trust_function_creators=1" in why, why
    other = MigrationError("migration 0004 failed: database timeout", "0004")
    other.__cause__ = sa.exc.OperationalError("x", {}, Exception(1205, "Lock wait timeout exceeded"))
    assert _refused(other) is None  # a lock wait that ran out is still retried


def test_a_role_with_super_and_no_drop_migrates_whole_and_the_probe_leaves_nothing(binlog_server: str,
                                                                                   fresh: str) -> None:
    """The probe once made a table and dropped it: a role without DROP (which no step needs) failed every migrate
    from then on, and a server requiring primary keys (this one does) refused the table."""
    done = _run("migrate", url=fresh.replace("app@", "owner@"))
    assert done.returncode == 0, done.stderr
    assert _triggers(binlog_server) == ["audit_log_no_delete", "audit_log_no_update"]
    assert not [t for t in _tables(binlog_server) if "probe" in t or "no_such" in t]


def test_a_database_a_newer_release_migrated_is_said_so_and_relative_downgrades_are_probed(binlog_server: str,
                                                                                           fresh: str) -> None:
    _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 1")
    engine = sa.create_engine(fresh)
    try:
        migrations.upgrade(engine, "0016")
        migrations.downgrade(engine, "-1")  # (Alembic reads -1 from the database's revision: 0015)
        assert migrations.current_revision(engine) == "0015"
        _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 0")
        with pytest.raises(ConfigError, match="the database refuses to create triggers"):
            migrations.downgrade(engine, "-2")  # 0015, 0014: 0014's downgrade creates 0013's trigger again
        assert migrations.current_revision(engine) == "0015"
        assert _triggers(binlog_server) == ["audit_log_no_delete", "audit_log_no_update"]
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '0099'")  # noqa: S608
        with pytest.raises(ConfigError, match="a newer clerk-sync migrated it"):
            migrations.upgrade(engine)
    finally:
        engine.dispose()


def test_the_steps_doctor_warns_of_follow_the_servers_variables(binlog_server: str, fresh: str) -> None:
    """``doctor``'s read (``SHOW VARIABLES``, which a server without wsrep answers too): the trigger steps on this
    binary-logging server while it does not trust creators, none once it does, none on the shared server."""
    app = sa.create_engine(fresh)
    try:
        with app.connect() as conn:
            assert migrations.untrusted_trigger_steps(conn, None, "heads") == ["0004", "0013", "0014", "0019"]
            _admin(binlog_server, "SET GLOBAL log_bin_trust_function_creators = 1")
            assert migrations.untrusted_trigger_steps(conn, None, "heads") == []
    finally:
        app.dispose()
    shared = sa.create_engine(MYSQL_URL)
    try:
        with shared.connect() as conn:
            assert conn.exec_driver_sql("SELECT @@log_bin").scalar() == 0, "the shared server logs binary now"
            assert migrations.untrusted_trigger_steps(conn, None, "heads") == []
    finally:
        shared.dispose()
