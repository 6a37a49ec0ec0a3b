"""Node.js forwarding walkthrough (finding 6): on a fresh database ``serve --hooks`` logged ``hook dispatch: database
unavailable ... the schema is not current: run clerk-sync's migrations`` while serve was migrating it itself (its
dispatcher thread polled ``hook_jobs`` before the start-up's migration had created it). The dispatcher now starts
once serve's migration is done: no such line, and the hooks still run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from clerk_sync import migrations
from clerk_sync.cli._serve import DispatchWhenMigrated
from tests import _hook_worker
from tests import factories as f
from tests._server import free_port, running, wait_for_http
from tests.conftest import pg_schema
from tests.test_hooks import B

ROOT = Path(__file__).resolve().parent.parent
# this checkout's code (after any PYTHONPATH given: a run against another tree of the package)
PATHS = os.pathsep.join([*filter(None, [os.environ.get("PYTHONPATH")]), str(ROOT / "src"), str(ROOT)])
_WARNING = "hook dispatch: database unavailable"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, never-migrated database (the test hooks' own tables only)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
        engine = sa.create_engine(url)
        _hook_worker.meta.create_all(engine)
        engine.dispose()
        yield url
        return
    with pg_schema("t_fresh_") as url:
        engine = sa.create_engine(url)
        _hook_worker.meta.create_all(engine)
        engine.dispose()
        yield url


def test_serve_hooks_on_a_fresh_database_migrates_without_telling_to_migrate_and_runs_the_hooks(
        fresh_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": fresh_url, "CLERK_WEBHOOK_SIGNING_SECRET": f.SECRET, "PYTHONPATH": PATHS,
           "CLERK_SYNC_LOG_LEVEL": "INFO"}
    log = tmp_path / "serve.log"
    engine = sa.create_engine(fresh_url)
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", "from clerk_sync.cli import main; main()", "serve", "--port",
                                 str(port), "--hooks", "tests._hook_worker:hooks"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
            headers, body = f.signed(f.envelope("user.created", f.user("user_1", B + 1000)), "msg_fresh_1")
            answer = httpx.post(f"http://127.0.0.1:{port}/webhooks/clerk", content=body, headers=headers)
            assert answer.status_code == 200, answer.text
            deadline = time.monotonic() + 30  # the dispatcher polls every second: wait for the outcome
            effects: list[str] = []
            while not effects and time.monotonic() < deadline:
                with engine.connect() as conn:
                    effects = list(conn.execute(sa.select(_hook_worker.effects.c.key)).scalars())
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            engine.dispose()
    said = log.read_text()
    assert "migrations_current" in said, said  # serve migrated the fresh database itself
    assert _WARNING not in said, said  # and told nobody to migrate it meanwhile
    assert effects == [f"user.created:user_1:{B + 1000}"], said  # the hooks run


class _Dispatcher:
    def __init__(self) -> None:
        self.said: list[str] = []

    def start(self) -> None:
        self.said.append("start")

    def stop(self, timeout_s: float = 30.0) -> None:  # (as Dispatcher.stop: serve bounds the wait)
        self.said.append("stop")


@pytest.mark.parametrize("migrate", [True, False], ids=["migrate", "no-migrate"])
def test_the_dispatcher_waits_for_a_migration_still_retried_and_starts_once_it_ran(tmp_path: Path,
                                                                                  migrate: bool) -> None:
    """The start-up's first migration attempt failed (the database was down): the app starts, the migration is
    retried behind it, and the dispatcher starts once the schema is current (at once with ``--no-migrate``: the
    schema is then the deploy's, and a warning about it the right one)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'later.db'}")
    dispatcher = _Dispatcher()
    gate = DispatchWhenMigrated(dispatcher, engine, migrate=migrate, poll_s=0.02)  # type: ignore[arg-type]
    app = Starlette()
    gate.attach(app)
    with running(app, lifespan="on"):
        time.sleep(0.2)
        before = list(dispatcher.said)
        migrations.upgrade(engine)  # the migration's retry, behind the running app
        deadline = time.monotonic() + 10
        while not dispatcher.said and time.monotonic() < deadline:
            time.sleep(0.02)
    gate.stop()
    engine.dispose()
    assert before == ([] if migrate else ["start"])
    assert dispatcher.said == ["start", "stop"]


def test_a_dispatcher_still_waiting_when_serve_stops_is_never_started(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'never.db'}")
    dispatcher = _Dispatcher()
    gate = DispatchWhenMigrated(dispatcher, engine, migrate=True, poll_s=0.02)  # type: ignore[arg-type]
    app = Starlette()
    gate.attach(app)
    with running(app, lifespan="on"):
        time.sleep(0.1)
    gate.stop()
    engine.dispose()
    assert dispatcher.said == ["stop"]


def test_the_start_up_does_not_wait_for_a_database_that_does_not_answer(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the gate asked whether the schema was current inside the app's start-up, so a database that did
    not answer held the start-up (and the port's opening) for another connect timeout after the migration's
    own first attempt. It asks from its waiting thread."""
    import threading

    answer = threading.Event()

    def is_current(engine: object) -> bool:
        answer.wait(30)  # a connect that hangs until the test lets it answer
        return True

    monkeypatch.setattr(migrations, "is_current", is_current)
    dispatcher = _Dispatcher()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'slow.db'}")
    gate = DispatchWhenMigrated(dispatcher, engine, migrate=True, poll_s=0.02)  # type: ignore[arg-type]
    app = Starlette()
    gate.attach(app)
    started = threading.Event()

    def serve() -> None:
        with running(app, lifespan="on"):
            started.set()
            answer.wait(30)
            deadline = time.monotonic() + 10
            while not dispatcher.said and time.monotonic() < deadline:
                time.sleep(0.02)

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert started.wait(10), "the app's start-up waited for the database"
        assert dispatcher.said == []  # not started before the schema is known to be current
    finally:
        answer.set()
        server.join(30)
    gate.stop()
    engine.dispose()
    assert dispatcher.said == ["start", "stop"]
