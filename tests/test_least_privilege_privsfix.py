"""Review of the least-privilege follow-ups (6e6b17e, 89bc6da, 5ca0f45): a MariaDB 1044 at connect is no refused
migration; /readyz answers a verdict it has without waiting behind a hung probe; an embedding app whose migration was
refused heals once the owner migrates, and /readyz says it was refused; `serve --workers` exits 2 on a refusal as one
process does; the dispatcher's recovery line after a GRANT says so."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
import structlog

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.hooks import Dispatcher
from clerk_sync.integrations.starlette import StartupMigration, _refused, _RolePrivileges, build_processor, create_app
from clerk_sync.migrations import _privileges
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests import test_least_privilege_roles
from tests._grants_app import HOOKS
from tests._server import free_port, running
from tests.conftest import SECRET
from tests.test_cli import CLI
from tests.test_least_privilege_followups import _behind_for_the_runtime_role, _cli_env, _forward
from tests.test_least_privilege_roles import (
    Roles,
    _deliver,
    _env,
    _mariadb,
    _postgres,
)

roles = test_least_privilege_roles.roles  # the shared fixture (owner and runtime roles, grants), found by name


class _MySQLDenied(Exception):
    """mysqlclient's OperationalError for a database this user may not use (errno first)."""


def _connect_1044() -> sa.exc.OperationalError:
    return sa.exc.OperationalError(None, None, _MySQLDenied(
        1044, "Access denied for user 'u'@'%' to database 'typo_db'"))


# -- M1: a 1044 at connect is the database's name or this user's access, retried -----------------------------------

def test_a_1044_at_connect_is_no_refused_migration_but_one_in_a_statement_is() -> None:
    assert _refused(_connect_1044()) is None
    in_a_statement = sa.exc.OperationalError("CREATE TABLE t (id int)", {}, _MySQLDenied(
        1044, "Access denied for user 'u'@'%' to database 'db'"))
    said = _refused(in_a_statement)
    assert said is not None and "as the role that owns the tables" in said, said


@pytest.mark.mariadb
def test_mariadb_a_user_who_may_not_use_the_database_is_retried_not_refused() -> None:
    """serve --migrate exited 2 saying "migrate as the owner" for a misspelled database name or a user not yet
    granted the database (1044 at connect): neither is the migration's to refuse; a provisioning job's GRANT heals
    it, as PostgreSQL's missing CONNECT (retried)."""
    with _mariadb() as made:  # the runtime user: no grant on the database yet
        typo = sa.engine.make_url(made.runtime_url).set(database=made.database + "_typo")
        for url in (made.runtime_url, typo.render_as_string(hide_password=False)):
            engine = create_engine(url)
            migration = StartupMigration(engine)
            try:
                attempted = anyio.run(migration.attempt)
            finally:
                engine.dispose()
            assert attempted is False and migration.refused is None, (url, migration.refused)
            assert "1044" in (migration.error or ""), migration.error
            assert "retrying in the background" in (migration.pending() or ""), migration.pending()


# -- M3: a verdict at hand is answered at once behind a hung probe -------------------------------------------------

@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_readyz_answers_the_last_verdict_at_once_behind_a_hung_probe(db_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll behind a hung probe waited the whole wait_s (2 s: past Kubernetes' 1 s probe timeout, a worker thread
    held) before answering the verdict it had. wait_s is made a minute here: the poll must not wait on it at all."""
    now = [1000.0]
    monkeypatch.setattr(_RolePrivileges, "clock", staticmethod(lambda: now[0]))
    monkeypatch.setattr(_RolePrivileges, "wait_s", 60.0)
    entered, release = threading.Event(), threading.Event()
    probes: list[object] = []

    def probe(conn: sa.Connection, mapping: object = None, who: object = None) -> _privileges.Missing:
        probes.append(who)
        if len(probes) > 1:  # the second probe hangs until let go
            entered.set()
            release.wait(timeout=120)
        return _privileges.Missing()

    monkeypatch.setattr(_privileges, "missing_privileges", probe)
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    store = Store(create_engine(db_url))
    app = create_app(settings, build_processor(settings, store))
    answered: list[httpx.Response] = []
    behind_done = threading.Event()
    try:
        with running(app) as url, httpx.Client(base_url=url, timeout=90) as client:
            first = client.get("/readyz")  # granted, kept a minute
            now[0] += 61  # old: the next poll asks again
            hung = threading.Thread(target=client.get, args=("/readyz",))
            hung.start()
            try:
                assert entered.wait(timeout=30)

                def behind() -> None:
                    answered.append(client.get("/readyz"))
                    behind_done.set()

                with structlog.testing.capture_logs() as logs:
                    threading.Thread(target=behind, daemon=True).start()
                    at_once = behind_done.wait(timeout=20)  # (the hung probe still held: not what freed it)
                    said_at_once = [e["event"] for e in logs]
                    now[0] += 2  # the probe running 2 s: the next poll says so, once
                    answered.extend(client.get("/readyz") for _ in range(2))
                    said_later = [e["event"] for e in logs]
            finally:
                release.set()
                hung.join()
    finally:
        store.dispose()
    assert first.status_code == 200, first.text
    assert at_once, "the poll behind the hung probe waited on it instead of answering the last verdict"
    assert [r.status_code for r in answered] == [200, 200, 200], [r.text for r in answered]
    assert "readyz_privilege_probe_slow" not in said_at_once, said_at_once  # (review: a false alarm at 0 s)
    assert said_later.count("readyz_privilege_probe_slow") == 1, said_later


# -- M2: an embedding app refused while serving heals once the owner migrates ---------------------------------------

@contextmanager
def _reached_later(made: Roles) -> Iterator[tuple[str, Any]]:
    """The runtime role's URL through a loopback port closed until the test calls the second item (open)."""
    port = free_port()
    url = sa.engine.make_url(made.runtime_url).set(host="127.0.0.1", port=port)
    database = sa.engine.make_url(made.runtime_url)
    listener = socket.socket()

    def open_port() -> None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        threading.Thread(target=_forward, args=(listener, (database.host or "127.0.0.1", database.port or 5432)),
                         daemon=True).start()

    try:
        yield url.render_as_string(hide_password=False), open_port
    finally:
        listener.close()


def _until(what: Any, client: httpx.Client, path: str, tries: int = 600) -> httpx.Response:
    """Poll ``path`` until ``what(answer)``; bounded (a minute), not a threshold."""
    for _ in range(tries):
        answer = client.get(path)
        if what(answer):
            return answer
        threading.Event().wait(0.1)
    pytest.fail(f"{path} never got there: {answer.status_code} {answer.text}")


@pytest.mark.postgres
@pytest.mark.parametrize("owner_release", ["this", "newer"])
def test_an_embedded_app_refused_while_serving_says_so_and_heals_once_the_owner_migrates(
        monkeypatch: pytest.MonkeyPatch, owner_release: str) -> None:
    """create_app(migrate=True) with no on_refused, the database down at start, then refusing the migration for a
    privilege: the retries stopped for good, every delivery 503 until a restart even after the owner's `clerk-sync
    migrate`, and /readyz said "migrating in the background". Then (review) /readyz said ready while deliveries
    still waited for the next recheck, and an owner's migrate by a newer release (a schema this one runs on) was
    never taken: /readyz 200, every delivery 503, for ever. The recheck here is an hour: /readyz heals it."""
    monkeypatch.setattr(StartupMigration, "recheck_s", 3600.0, raising=False)  # (behaviour, not a name, fails)
    with _postgres() as made:
        _behind_for_the_runtime_role(made)
        with _reached_later(made) as (url, open_port):
            settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                          "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
            store = Store(create_engine(url))
            app = create_app(settings, build_processor(settings, store), migrate=True)
            created = f.envelope("user.created", f.user("user_psfx1", 5))
            try:
                with running(app, lifespan="on") as base, httpx.Client(base_url=base, timeout=30) as client:
                    open_port()
                    refused = _until(lambda r: "refused" in r.text, client, "/readyz")
                    delivery = _deliver(client, "msg_psfx1", created)
                    engine = create_engine(made.owner_url)
                    try:
                        migrations.upgrade(engine)  # the owner's `clerk-sync migrate`, and the RUNBOOK's grants
                    finally:
                        engine.dispose()
                    made.as_owner(  # (the tables the owner's migration made)
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {made.runtime}",
                        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {made.runtime}")
                    if owner_release == "newer":
                        made.as_owner(f"UPDATE {migrations.VERSION_TABLE} "  # noqa: S608 - our own table's name
                                      "SET version_num = '9999_from_a_newer_release'")
                    ready = _until(lambda r: r.status_code == 200, client, "/readyz")
                    applied = _deliver(client, "msg_psfx1", created)
            finally:
                store.dispose()
    assert refused.status_code == 503, refused.text
    hint = refused.json()["hint"]
    assert "run `clerk-sync migrate` as the tables' owner" in hint and "background" not in hint, hint
    assert delivery.status_code == 503, delivery.text
    assert ready.json()["migrations_current"] is True, ready.text
    assert applied.status_code == 200 and applied.json()["status"] == "applied", applied.text


# -- L3: serve --workers exits 2 on a refused migration, as one process does ----------------------------------------

@pytest.mark.postgres
def test_serve_workers_migrate_refused_at_start_exits_2_with_the_refusal() -> None:
    """It exited 3, "a worker process of the service could not start: ...", where `serve` alone exits 2."""
    with _postgres() as made:
        _behind_for_the_runtime_role(made)
        proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--migrate", "--workers", "2"],
                                env=_cli_env(_env(made)), text=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"serve --workers --migrate kept running: {err[-2000:]}")
    said = " ".join(err.split())
    assert proc.returncode == 2, said
    assert "error: the start-up migration:" in said and "as the role that owns them" in said, said
    assert "could not start" not in said, said


@pytest.mark.postgres
def test_serve_workers_migrate_refused_while_serving_exits_2_with_the_refusal() -> None:
    """The database down at start, then refusing: the worker that had been serving was "a worker process of the
    service could not start", exit 3."""
    with _postgres() as made:
        _behind_for_the_runtime_role(made)
        with _reached_later(made) as (url, open_port):
            env = _cli_env(_env(made) | {"DATABASE_URL": url})
            proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--migrate", "--workers", "2"], env=env, text=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            assert proc.stderr is not None
            seen = []
            for line in proc.stderr:
                seen.append(line)
                if "migration_retry" in line:
                    break
            open_port()
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"serve --workers --migrate kept running: {err[-2000:]}")
    said = " ".join((''.join(seen) + err).split())
    assert proc.returncode == 2, said[-3000:]
    assert "error: the start-up migration:" in said and "could not start" not in said, said[-3000:]


# -- L5: the dispatcher's recovery line after a GRANT ---------------------------------------------------------------

def test_the_dispatchers_recovery_after_a_grant_is_no_database_back(roles: Roles) -> None:
    table = "hook_jobs" if roles.kind == "postgresql" else f"`{roles.database}`.hook_jobs"
    roles.as_owner(f"REVOKE DELETE ON {table} FROM {roles.runtime}")
    store = Store(create_engine(roles.runtime_url), hooks=HOOKS)
    dispatcher = Dispatcher(store, poll_s=0.05)
    try:
        with structlog.testing.capture_logs() as logs:
            dispatcher.start()
            try:
                for _ in range(600):  # bounded, not a threshold
                    if any("lacks a privilege" in e["event"] for e in logs):
                        break
                    threading.Event().wait(0.05)
                roles.as_owner(f"GRANT DELETE ON {table} TO {roles.runtime}")
                for _ in range(1200):
                    if any(e["event"].startswith("hook dispatch") and "failed_turns" in e for e in logs):
                        break
                    threading.Event().wait(0.05)
            finally:
                dispatcher.stop()
    finally:
        store.dispose()
    back = [e for e in logs if "failed_turns" in e]
    assert [e["event"] for e in back] == ["hook dispatch: privilege granted; claiming again"], logs
