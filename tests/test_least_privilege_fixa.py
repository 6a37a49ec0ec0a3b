"""Review of the least-privilege fixes (223e1cb, revA): a delivery while the start-up migration is pending or refused
says what pending() says, not "the database is unavailable"; `serve --migrate` stopped for a refusal exits 2 even if
a /readyz poll reads the schema healed during the drain, and with the shutdown watchdog armed; /readyz says a
privilege refusal is one; the slow-probe line is not said of the previous probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from clerk_sync.config import Settings
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.starlette import StartupMigration, build_processor, create_app
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET


def _embedded(tmp_path: Path) -> tuple[Any, WebhookProcessor]:
    url = f"sqlite:///{tmp_path / 'fixa.db'}"
    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    processor = build_processor(settings, Store(create_engine(url)))
    return create_app(settings, processor, migrate=True), processor


@pytest.mark.parametrize("refused", [False, True])
def test_a_delivery_while_the_migration_is_pending_or_refused_says_so_not_database_unavailable(
        tmp_path: Path, refused: bool) -> None:
    """Every delivery was answered 503 store_unavailable "the database is unavailable" (Svix's attempt log, which
    the operator reads in Clerk's Dashboard) while /readyz said the migration was refused; and counted as a
    database error. Now: migration_pending, with pending()'s text (no driver text), Retry-After, not counted."""
    app, processor = _embedded(tmp_path)  # (no lifespan: the migration is not attempted)
    migration: StartupMigration = app.state.clerk_sync_migration
    if refused:
        migration.refused = migration.error = "serve --migrate: refused (psycopg InsufficientPrivilege: host db1)"
        migration._for_privilege = True
    try:
        headers, body = f.signed(f.envelope("user.created", f.user("user_fixa1", 5)), "msg_fixa1")
        with (structlog.testing.capture_logs() as logs, running(app) as base,
              httpx.Client(base_url=base, timeout=30) as client):
            answer = client.post("/webhooks/clerk", content=body, headers={**headers, "content-type": "application/json"})
    finally:
        processor.store.dispose()
    said = answer.json()
    assert answer.status_code == 503 and said["error"] == "migration_pending", answer.text
    assert said["message"] == migration.pending() and "unavailable" not in said["message"], said
    assert "host db1" not in answer.text and answer.headers["retry-after"], answer.text
    if refused:
        assert "run `clerk-sync migrate` as the tables' owner" in said["message"], said
    assert not [e for e in logs if e["event"] == "webhook_store_error"], logs
    assert processor.metrics.db_errors.labels(operation="webhook")._value.get() == 0
    assert processor.metrics.unavailable._value.get() == 0


def test_an_apps_own_not_ready_stays_an_outage_its_text_kept_out_of_the_answer(tmp_path: Path) -> None:
    """``webhook_endpoint(not_ready=...)`` is public: an app's own reason (a failover naming its host) was answered
    ``migration_pending`` with that text in the body, Svix's attempt log, and counted nowhere (review of 3be2afb).
    Only the start-up migration's gate answers migration_pending."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from clerk_sync.integrations.starlette import webhook_endpoint

    url = f"sqlite:///{tmp_path / 'own.db'}"
    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    processor = build_processor(settings, Store(create_engine(url)))
    endpoint = webhook_endpoint(processor, not_ready=lambda: "failover of db-primary.internal:5432")
    app = Starlette(routes=[Route("/webhooks/clerk", endpoint, methods=["POST"])])
    try:
        headers, body = f.signed(f.envelope("user.created", f.user("user_fixa_own", 5)), "msg_fixa_own")
        with running(app) as base, httpx.Client(base_url=base, timeout=30) as client:
            answer = client.post("/webhooks/clerk", content=body, headers={**headers, "content-type": "application/json"})
    finally:
        processor.store.dispose()
    assert answer.status_code == 503 and answer.json()["error"] == "store_unavailable", answer.text
    assert "db-primary" not in answer.text, answer.text
    assert processor.metrics.unavailable._value.get() == 1


def _serve_refused_then_healed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[float, int]],
                                                                                         pytest.ExceptionInfo[Any]]:
    """`serve --migrate` in this process, its server replaced by one that runs the migration's retries (refused
    for a privilege while serving), then heals it as a /readyz poll during the drain would (the owner's migrate,
    or another release's, landed meanwhile), then returns as uvicorn does once drained. The exit watchdogs armed."""
    import importlib

    import uvicorn

    main = importlib.import_module("clerk_sync.cli.main")
    from clerk_sync.errors import ConfigError

    armed: list[tuple[float, int]] = []
    monkeypatch.setattr(main, "_exit_after", lambda seconds, code: armed.append((seconds, code)))

    async def refused(self: StartupMigration) -> bool:
        self.refused = self.error = "serve --migrate: refused for a privilege (for the test)"
        self._for_privilege = True
        raise ConfigError(self.refused)

    monkeypatch.setattr(StartupMigration, "attempt", refused)

    def run(self: Any, sockets: Any = None) -> None:
        import anyio

        self.started = True
        migration: StartupMigration = self.config.app.state.clerk_sync_migration
        migration._first = 0.01
        anyio.run(migration.retry)  # refused: on_refused is called
        assert self.should_exit
        migration.healed()  # a /readyz poll served during the drain read the schema current

    monkeypatch.setattr(uvicorn.Server, "run", run)
    url = f"sqlite:///{tmp_path / 'fixa_serve.db'}"
    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    processor = build_processor(settings, Store(create_engine(url)))
    try:
        with pytest.raises(SystemExit) as stopped:
            main._serve_one(settings, processor, "127.0.0.1", 0, migrate_first=True, dispatch=False,
                            graceful_timeout_s=7)
    finally:
        processor.store.dispose()
    return armed, stopped


def test_serve_stopped_for_a_refusal_exits_2_even_if_a_readyz_poll_heals_it_during_the_drain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """healed() from a /readyz poll during the drain cleared `refused`, and serve, stopped for the refusal, returned
    exit 0 with no error line (systemd's Restart=on-failure and deploy scripts read a clean stop)."""
    _, stopped = _serve_refused_then_healed(tmp_path, monkeypatch)
    assert stopped.value.code == 2, stopped.value.code
    assert "refused for a privilege (for the test)" in capsys.readouterr().err


def test_serve_stopped_for_a_refusal_arms_the_shutdown_watchdog_as_a_signal_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal set should_exit only: no watchdog, so a request's worker thread that never ends (a hung
    privileges probe, a statement blocked on a silent peer; anyio's are not daemon threads) held the process at
    the interpreter's exit for ever. Now armed as a signal's stop is: --graceful-timeout + margin, exit 2."""
    armed, stopped = _serve_refused_then_healed(tmp_path, monkeypatch)
    assert stopped.value.code == 2, stopped.value.code
    assert armed == [(7 + 5.0, 2)], armed


@pytest.mark.parametrize("refused_by", ["schema_state", "probe"])
def test_readyz_says_a_read_refused_for_a_privilege_is_one_not_the_database_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused_by: str) -> None:
    """The runtime role without SELECT on clerk_sync_alembic_version (doctor lists it), or a probe's read refused:
    /readyz said {"database": "down", "error": "the database did not answer"} and logged readyz_database_down, for
    ever, while deliveries worked: the operator hunted an outage. Now: reached, privileges missing, doctor's hint."""
    from clerk_sync import migrations
    from clerk_sync._db_errors import store_error
    from clerk_sync.integrations.starlette import _RolePrivileges
    from tests.test_least_privilege_followups import _privilege_refusal

    app, processor = _embedded(tmp_path)
    migrations.upgrade(processor.store.engine)
    app.state.clerk_sync_migration.done = True

    def refuse(*_: Any, **__: Any) -> Any:
        if refused_by == "probe":
            raise store_error(_privilege_refusal())
        raise _privilege_refusal()

    if refused_by == "probe":
        monkeypatch.setattr(_RolePrivileges, "missing", refuse)
    else:
        monkeypatch.setattr(migrations, "schema_state", refuse)
    try:
        with (structlog.testing.capture_logs() as logs, running(app) as base,
              httpx.Client(base_url=base, timeout=30) as client):
            ready = client.get("/readyz")
    finally:
        processor.store.dispose()
    said = ready.json()
    assert ready.status_code == 503 and said["database"] == "ok" and said["privileges"] == "missing", ready.text
    assert "clerk-sync doctor" in said["hint"] and "accounts" not in ready.text, ready.text
    events = [e["event"] for e in logs]
    assert "readyz_read_refused" in events and "readyz_database_down" not in events, events


@pytest.mark.postgres
def test_readyz_as_a_runtime_role_that_may_not_read_the_schema_version_says_privileges_missing() -> None:
    from clerk_sync import migrations
    from tests.test_least_privilege_roles import _service, granted

    with granted("postgresql") as roles:
        roles.as_owner(f"REVOKE SELECT ON {migrations.VERSION_TABLE} FROM {roles.runtime}")  # noqa: S608 - our own names
        with _service(roles) as client:
            ready = client.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.json()["database"] == "ok" and ready.json()["privileges"] == "missing", ready.text


def _poll_meeting_a_probe_just_begun_says_nothing_slow(privileges: Any) -> None:
    privileges._asking.acquire()  # poll A: the lock taken, its probe's start not recorded yet
    try:
        with structlog.testing.capture_logs() as logs:
            answer = privileges.missing(False)  # poll B
    finally:
        privileges._asking.release()
    assert answer == ([], []), answer  # the last verdict, at once
    assert not [e for e in logs if e["event"] == "readyz_privilege_probe_slow"], logs


def test_a_poll_that_meets_a_probe_not_yet_started_says_nothing_slow() -> None:
    """The verdict a TTL old, two polls at once: A takes the lock, B fails the non-blocking acquire before A
    recorded its probe's start, reads the previous probe's (61 s ago) and logged readyz_privilege_probe_slow
    probe_running_s=61, "check the database and its locks": the false alarm 6ad5057 meant to remove."""
    from types import SimpleNamespace

    from clerk_sync.integrations.starlette import _RolePrivileges

    now = [1000.0]
    privileges = _RolePrivileges(SimpleNamespace(engine=SimpleNamespace(dialect=SimpleNamespace(name="postgresql"))),
                                 ttl_s=60.0)  # type: ignore[arg-type]
    privileges.clock = lambda: now[0]  # type: ignore[method-assign]
    privileges._verdicts[False] = (now[0], [], [])  # the previous probe, begun and answered at 1000
    privileges._probe_started = now[0]
    now[0] += 61.0
    _poll_meeting_a_probe_just_begun_says_nothing_slow(privileges)


def test_the_refusal_names_both_ways_to_start_without_migrating_not_serve_only() -> None:
    """An app embedding create_app(migrate=True) (or CLERK_SYNC_MIGRATE_ON_START=1) under its own server was told
    "serve --migrate: ... then `serve --no-migrate`": a command it does not run."""
    from clerk_sync.integrations.starlette import _refused
    from tests.test_least_privilege_followups import _privilege_refusal

    said = _refused(_privilege_refusal())
    assert said is not None and not said.startswith("serve --migrate"), said
    assert said.startswith("the start-up migration: ") and "CLERK_SYNC_MIGRATE_ON_START=0" in said, said
    assert "`serve --no-migrate`" in said and "`clerk-sync migrate` as the role that owns the tables" in said, said


def test_a_poll_after_a_failed_probe_says_nothing_slow() -> None:
    """A probe failed (the database down at 1061): its start stayed recorded, newer than the verdict (1000), so a
    poll meeting the next probe before it recorded its own start read "running since 1061" and logged
    readyz_privilege_probe_slow probe_running_s=61 for a probe just begun."""
    from types import SimpleNamespace

    from clerk_sync.errors import StoreError
    from clerk_sync.integrations.starlette import _RolePrivileges

    def down() -> Any:
        raise StoreError("database error: OperationalError: connection refused")

    now = [1000.0]
    store = SimpleNamespace(engine=SimpleNamespace(dialect=SimpleNamespace(name="postgresql")), connect=down)
    privileges = _RolePrivileges(store, ttl_s=60.0)  # type: ignore[arg-type]
    privileges.clock = lambda: now[0]  # type: ignore[method-assign]
    privileges._verdicts[False] = (now[0], [], [])  # the previous probe, begun and answered at 1000
    now[0] += 61.0
    with pytest.raises(StoreError):
        privileges.missing(False)  # the verdict old: probed again, and the database is down
    now[0] += 61.0
    privileges._asking.acquire()  # poll A: the next probe, its start not recorded yet
    try:
        with structlog.testing.capture_logs() as logs, pytest.raises(StoreError):
            privileges.missing(False)  # poll B: the last probe's answer (down), not the verdict from before it
    finally:
        privileges._asking.release()
    assert not [e for e in logs if e["event"] == "readyz_privilege_probe_slow"], logs


def test_a_poll_meeting_the_probe_after_a_failed_one_says_the_failure_not_the_verdict_before_it() -> None:
    """A failover made the database a standby: the probe failed read-only, and a poll meeting the next probe answered
    the verdict from before the failover (granted: /readyz 200 from a read-only database), every two polls at once."""
    from types import SimpleNamespace

    from clerk_sync.errors import StoreError
    from clerk_sync.integrations.starlette import _RolePrivileges

    read_only = StoreError("database error: ReadOnlySqlTransaction: cannot execute INSERT in a read-only transaction")
    answers: list[Any] = [read_only]

    def connect() -> Any:
        raise answers[0]

    now = [1000.0]
    store = SimpleNamespace(engine=SimpleNamespace(dialect=SimpleNamespace(name="postgresql")), connect=connect)
    privileges = _RolePrivileges(store, ttl_s=60.0)  # type: ignore[arg-type]
    privileges.clock = lambda: now[0]  # type: ignore[method-assign]
    privileges._verdicts[False] = (now[0], [], [])  # granted, before the failover
    now[0] += 61.0
    with pytest.raises(StoreError) as first:
        privileges.missing(False)  # the probe: read-only
    assert first.value is read_only
    privileges._asking.acquire()  # poll A: the next probe under way
    try:
        with pytest.raises(StoreError) as met:
            privileges.missing(False)  # poll B
    finally:
        privileges._asking.release()
    assert met.value is read_only
