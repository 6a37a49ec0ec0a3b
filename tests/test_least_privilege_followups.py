"""Least-privilege database roles, follow-ups: a delivery refused for a missing GRANT is answered as that (not "the
database is unavailable"); the hook dispatcher's log line names the GRANT; a hung privileges probe holds no other
/readyz poll; `serve --migrate` as a runtime role on a schema behind exits at once; MariaDB's doctor sees the grants a
role received through a MariaDB role.

The database tests make their own roles (users) and database (tests/test_least_privilege_roles.py's helpers)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
import structlog

from clerk_sync import migrations
from clerk_sync._db_errors import store_error
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError, StoreError, StorePrivilegeMissing
from clerk_sync.hooks import Dispatcher
from clerk_sync.integrations import http as error_table
from clerk_sync.integrations.starlette import StartupMigration, _RolePrivileges, build_processor, create_app
from clerk_sync.migrations import _privileges
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests import test_least_privilege_roles
from tests._grants_app import HOOKS
from tests._server import free_port, running, unreachable_engine
from tests.conftest import SECRET
from tests.test_cli import CLI, run
from tests.test_least_privilege_roles import (
    APP,
    Roles,
    _deliver,
    _env,
    _mariadb,
    _postgres,
    _privileges_line,
    _service,
    documented_grants,
)

roles = test_least_privilege_roles.roles  # the shared fixture (owner and runtime roles, grants), found by name


class _Refused(Exception):
    """A driver's refusal for a privilege, as psycopg raises it (SQLSTATE 42501)."""

    sqlstate = "42501"


def _privilege_refusal() -> sa.exc.DBAPIError:
    return sa.exc.ProgrammingError("UPDATE accounts SET role=%(role)s", {}, _Refused(
        "permission denied for table accounts"))


# -- 1. the answer names the privilege problem, and no more -----------------------------------------------------

def test_a_privilege_refusal_is_its_own_error_answered_503_without_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was a StoreError answered "the database is unavailable: retry later": an operator looking at Svix's attempt
    log went looking for an outage. 503 still (Svix retries, nothing lost), its own code, what to do, no names."""
    monkeypatch.setattr(error_table, "_logged", {})
    error = store_error(_privilege_refusal())
    with structlog.testing.capture_logs() as logs:
        answer = error_table.error_response(error)
    assert isinstance(error, StorePrivilegeMissing) and isinstance(error, StoreError)
    assert answer.status == 503 and answer.headers["Retry-After"] == "5", answer
    assert answer.body["error"] == "store_privilege_missing", answer.body
    message = answer.body["message"]
    assert "lacks a privilege" in message and "`clerk-sync doctor`" in message and "GRANT" in message, message
    assert "unavailable" not in message and "accounts" not in message and "permission denied" not in message, message
    said = next(e for e in logs if e["event"] == "answered_privilege_missing")
    assert "accounts" in said["cause"] and "prints the GRANT statements" in said["cause"], said


def test_a_delivery_refused_for_a_grant_says_so_and_applies_once_granted(roles: Roles) -> None:
    accounts = "accounts" if roles.kind == "postgresql" else f"`{roles.database}`.accounts"
    roles.as_owner(f"REVOKE UPDATE (role) ON {accounts} FROM {roles.runtime}")
    created = f.envelope("user.created", f.user("user_grfu1", 5, role="admin"))
    with _service(roles) as client:
        refused = _deliver(client, "msg_grfu1", created)
        roles.as_owner(f"GRANT UPDATE (role) ON {accounts} TO {roles.runtime}")
        retried = _deliver(client, "msg_grfu1", created)
    body = refused.json()
    assert refused.status_code == 503 and body["error"] == "store_privilege_missing", refused.text
    assert "lacks a privilege" in body["message"] and "unavailable" not in body["message"], body
    assert roles.runtime.split("'")[1 if roles.kind == "mysql" else 0] not in body["message"], body
    assert retried.status_code == 200 and retried.json()["status"] == "applied", retried.text


# -- 2. the dispatcher's log line ----------------------------------------------------------------------------------

def test_the_dispatchers_log_line_names_the_missing_grant(roles: Roles) -> None:
    table = "hook_jobs" if roles.kind == "postgresql" else f"`{roles.database}`.hook_jobs"
    roles.as_owner(f"REVOKE DELETE ON {table} FROM {roles.runtime}")
    store = Store(create_engine(roles.runtime_url), hooks=HOOKS)
    dispatcher = Dispatcher(store, poll_s=0.05)
    try:
        with structlog.testing.capture_logs() as logs:
            dispatcher.start()
            try:
                for _ in range(600):  # its first turn, at once; bounded, not a threshold
                    if any(e["event"].startswith("hook dispatch") for e in logs):
                        break
                    threading.Event().wait(0.05)
            finally:
                dispatcher.stop()
    finally:
        store.dispose()
    said = next(e for e in logs if e["event"].startswith("hook dispatch"))
    assert "lacks a privilege" in said["event"] and "database unavailable" not in said["event"], said
    assert f"GRANT DELETE ON {table.replace('`', '')} TO {roles.runtime};" in said["error"], said
    assert "check DATABASE_URL" not in said["error"], said


# -- 3. a hung privileges probe ------------------------------------------------------------------------------------

@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_hung_privileges_probe_holds_no_other_readyz_poll(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe that does not come back (a hung catalog read) held every later /readyz poll on its lock, for ever.
    Past ``wait_s`` a poll answers the last verdict (granted: 200), or, with none yet, "privileges": "unknown"
    (503); one log line for the hung probe. The hung probe is held until the test lets it go: no race."""
    now = [1000.0]
    monkeypatch.setattr(_RolePrivileges, "clock", staticmethod(lambda: now[0]))
    monkeypatch.setattr(_RolePrivileges, "wait_s", 0.2)
    entered, release = threading.Event(), threading.Event()
    probes: list[object] = []

    def probe(conn: sa.Connection, mapping: object = None, who: object = None) -> _privileges.Missing:
        probes.append(who)
        if len(probes) > 1:  # the second and later probes hang until let go
            entered.set()
            release.wait(timeout=60)
        return _privileges.Missing()

    monkeypatch.setattr(_privileges, "missing_privileges", probe)
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    store = Store(create_engine(db_url))
    app = create_app(settings, build_processor(settings, store))
    hung: list[httpx.Response] = []
    try:
        with running(app) as url, httpx.Client(base_url=url, timeout=20) as client, \
                structlog.testing.capture_logs() as logs:
            first = client.get("/readyz")  # granted, kept a minute
            now[0] += 61
            poller = threading.Thread(target=lambda: hung.append(client.get("/readyz")))
            poller.start()
            try:
                assert entered.wait(timeout=20)
                behind = client.get("/readyz")  # the last verdict
                app.state.clerk_sync_dispatches = True  # another verdict, never asked: unknown
                unknown = client.get("/readyz")
            finally:
                release.set()
                poller.join()
    finally:
        store.dispose()
    assert first.status_code == 200 and behind.status_code == 200, (first.text, behind.text)
    assert unknown.status_code == 503 and unknown.json()["privileges"] == "unknown", unknown.text
    assert "readyz_privilege_probe_slow" in unknown.json()["hint"], unknown.text
    assert [r.status_code for r in hung] == [200]
    assert [e["event"] for e in logs].count("readyz_privilege_probe_slow") == 1, logs


# -- 4. serve --migrate as the runtime role ------------------------------------------------------------------------

def _behind_for_the_runtime_role(made: Roles) -> None:
    """PostgreSQL: the schema a release behind (0018 alters hook_jobs), the runtime role granted rows only."""
    engine = create_engine(made.owner_url)
    try:
        migrations.upgrade(engine, "0017")
    finally:
        engine.dispose()
    made.as_owner(f"GRANT CONNECT ON DATABASE {made.database} TO {made.runtime}",
                  f"GRANT USAGE ON SCHEMA public TO {made.runtime}",
                  f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {made.runtime}")


@pytest.mark.postgres
def test_serve_migrate_as_the_runtime_role_exits_at_once_saying_to_migrate_as_the_owner() -> None:
    """It retried the migration for ever ("migration_retry ... must be owner"), the service answering 503."""
    with _postgres() as made:
        _behind_for_the_runtime_role(made)
        proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--migrate"], env=_cli_env(_env(made)), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"serve --migrate kept running: {err[-2000:]}")
    said = " ".join(err.split())
    assert proc.returncode == 2, said
    assert "must be owner" in said and "run `clerk-sync migrate` as the role that owns them" in said, said


@pytest.mark.postgres
def test_a_migration_refused_while_serving_stops_the_retries(tmp_path: Path) -> None:
    """The database came back after the start, and refused the migration for a privilege: no more retries; the
    service's own on_refused (serve: stop, exit 2) is called; pending() no longer says "retrying"."""
    with _postgres() as made:
        _behind_for_the_runtime_role(made)
        engine = create_engine(made.runtime_url)
        migration = StartupMigration(engine, first_delay_s=0)
        called: list[bool] = []
        migration.on_refused = lambda: called.append(True)

        async def main() -> None:
            with anyio.fail_after(60):
                await migration.retry()

        try:
            anyio.run(main)
        finally:
            engine.dispose()
    assert called == [True] and migration.attempts == 1, (called, migration.attempts)
    assert migration.refused is not None and "as the role that owns them" in migration.refused, migration.refused
    assert "retrying" not in (migration.pending() or ""), migration.pending()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_database_merely_down_is_still_retried(db_url: str, tmp_path: Path) -> None:
    engine = unreachable_engine(db_url, tmp_path)
    migration = StartupMigration(engine)
    try:
        attempted = anyio.run(migration.attempt)
    finally:
        engine.dispose()
    assert attempted is False and migration.refused is None and migration.error, migration.error
    assert "retrying in the background" in (migration.pending() or "")


def test_a_refusal_for_good_is_a_config_error_at_start() -> None:
    """(the first attempt, before serving: the start fails with the line saying what to run)"""
    from clerk_sync.integrations.starlette import _refused

    said = _refused(_privilege_refusal())
    assert said is not None and "`clerk-sync migrate` as the role that owns the tables" in said, said
    assert _refused(sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))) is None
    assert _refused(ConfigError("newer")) == "newer"


# -- 5. MariaDB: grants through a role -----------------------------------------------------------------------------

def test_a_grant_lines_database_wildcards() -> None:
    match = _privileges._database_matches
    assert match("grants\\_ab", "grants_ab") and not match("grants\\_ab", "grantsXab")
    assert match("grants_ab", "grantsXab") and match("grants%", "grants_anything") and not match("app", "app2")
    line = _privileges._GRANT_LINE.match("GRANT SELECT (a, b), CREATE TEMPORARY TABLES, LOCK TABLES ON `x``y`.* "
                                         "TO `r`")
    assert line is not None and (line["database"], line["table"]) == ("`x``y`", "*")
    assert _privileges._GRANT_LINE.match("GRANT `grants_role` TO `u`@`%`") is None


@pytest.mark.mariadb
def test_mariadb_doctor_sees_temporary_and_lock_tables_granted_through_a_role() -> None:
    """information_schema shows a user's own grants only: CREATE TEMPORARY TABLES and LOCK TABLES granted to a role
    the runtime user has (its default role) were said missing (a warning and GRANTs to run that change nothing)."""
    with _mariadb() as made:
        migrated = run("migrate", "--mapping", f"{APP}:MAPPING", env={"DATABASE_URL": made.owner_url})
        assert migrated.returncode == 0, migrated.stderr
        role = f"grfu_role_{made.database[-10:]}"
        database_wide = f"ON `{made.database}`.*"
        made.as_owner(*(g for g in documented_grants(made) if database_wide not in g.replace("\n", " ")))
        admin = sa.create_engine(made.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE ROLE {role}")
                conn.exec_driver_sql(f"GRANT CREATE TEMPORARY TABLES, LOCK TABLES {database_wide} TO {role}")
                runtime = made.runtime.replace("%", "%%")  # (mysqlclient formats each statement with %)
                conn.exec_driver_sql(f"GRANT {role} TO {runtime}")
                conn.exec_driver_sql(f"SET DEFAULT ROLE {role} FOR {runtime}")
            doctor = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(made))
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
            admin.dispose()
    line = " ".join(_privileges_line(doctor.stdout).split())
    assert line.startswith("ok"), doctor.stdout


def _cli_env(env: dict[str, str]) -> dict[str, Any]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    return full | env


def _forward(listener: socket.socket, target: tuple[str, int]) -> None:
    """Accept on ``listener`` and pass bytes both ways to ``target`` (the database, once the test lets it be reached)."""
    while True:
        try:
            client, _ = listener.accept()
        except OSError:  # closed: the test is over
            return
        server = socket.create_connection(target)
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.mark.postgres
def test_serve_migrate_refused_once_the_database_is_back_exits_too() -> None:
    """The database down at start (its port closed: migration_retry), then reached (the test opens the port once the
    retry is logged): the migration refused for a privilege stops serve with exit 2, as at start."""
    with _postgres() as made:
        _behind_for_the_runtime_role(made)
        port = free_port()
        url = sa.engine.make_url(made.runtime_url).set(host="127.0.0.1", port=port)
        database = sa.engine.make_url(made.runtime_url)
        env = _cli_env(_env(made) | {"DATABASE_URL": url.render_as_string(hide_password=False)})
        proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--migrate"], env=env, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        listener = socket.socket()
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "migration_retry" in line:
                    break
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen()
            threading.Thread(target=_forward, args=(listener, (database.host or "127.0.0.1", database.port or 5432)),
                             daemon=True).start()
            try:
                _, err = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"serve --migrate kept running: {err[-2000:]}")
        finally:
            listener.close()
    said = " ".join(err.split())
    assert proc.returncode == 2, said
    assert "migration_refused" in said and "run `clerk-sync migrate` as the role that owns them" in said, said
