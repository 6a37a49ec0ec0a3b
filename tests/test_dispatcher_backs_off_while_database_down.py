"""Hooks adopter walkthrough: a worker whose database was down logged ``hook dispatch: database unavailable`` at
every poll, with no backoff (``--poll 0``: 8,551 lines in 2 s, a hot loop) and no word of what to check. The
dispatcher now waits longer after each failed turn (doubling from ``poll_s``, at least 0.1 s, up to 30 s),
back to ``poll_s`` once a turn succeeds, and each line says to check DATABASE_URL.

The pauses are recorded, not slept: the dispatcher's stop event (the wait it pauses on) is replaced by one
that notes each pause and returns at once. The database errors are real: a loopback port whose connections
are accepted and closed (PostgreSQL, MariaDB), a SQLite file whose directory was removed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog.testing

from clerk_sync import migrations
from clerk_sync.changes import Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.store import Store, create_engine
from tests.test_worker_logging_database_down import _refusing_database

_LINE = "hook dispatch: database unavailable"


class _Pauses(threading.Event):
    """The dispatcher's stop event: each wait is recorded and returns at once; ``turns`` waits, then stopped.
    ``after(n)`` runs before the n-th pause returns (0-based)."""

    def __init__(self, turns: int, after: Callable[[int], None] = lambda n: None) -> None:
        super().__init__()
        self.seen: list[float] = []
        self.turns, self.after = turns, after

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.after(len(self.seen))
        self.seen.append(timeout)
        if len(self.seen) >= self.turns:
            self.set()
        return self.is_set()


def _gone_sqlite(path: Path) -> Store:
    """A store over a SQLite file whose directory is removed once the engine is made (create_engine refuses a
    missing directory as a setting to fix): every connection then fails, as a database down."""
    path.parent.mkdir()
    store = Store(create_engine(f"sqlite:///{path}"), hooks=[Hook("noop", lambda change: None)])
    path.parent.rmdir()
    return store


def _down_store(db_url: str, port: int, tmp_path: Path) -> Store:
    url = sa.engine.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        return _gone_sqlite(tmp_path / "gone" / "clerk_sync.db")
    down = url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    return Store(create_engine(down), hooks=[Hook("noop", lambda change: None)])


def _run(store: Store, pauses: _Pauses, poll_s: float) -> list[dict[str, object]]:
    dispatcher = Dispatcher(store, poll_s=poll_s)
    dispatcher._stop = pauses  # the pauses recorded instead of slept
    with structlog.testing.capture_logs() as logs:
        dispatcher.run_forever()
    return logs


def test_a_worker_backs_off_while_the_database_is_down_and_says_what_to_check(db_url: str, tmp_path: Path) -> None:
    with _refusing_database() as (port, _):
        store = _down_store(db_url, port, tmp_path)
        pauses = _Pauses(turns=12)
        logs = _run(store, pauses, poll_s=0)
        store.dispose()
    assert pauses.seen == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]
    down = [line for line in logs if line["event"] == _LINE]
    assert [line["attempt"] for line in down] == list(range(1, 13)), logs
    assert [line["retry_in_s"] for line in down] == pauses.seen
    assert all("check DATABASE_URL, and that the database is up" in str(line["error"]) for line in down), down


def test_the_pause_is_poll_s_again_once_the_database_answers(tmp_path: Path) -> None:
    """The directory of the SQLite file made again, and migrated, during the third pause: the fourth turn
    succeeds, the pauses are ``poll_s`` from then on, and one line says the database is back."""
    path = tmp_path / "gone" / "clerk_sync.db"

    def repair(n: int) -> None:
        if n == 2:
            path.parent.mkdir()
            engine = create_engine(f"sqlite:///{path}")
            migrations.upgrade(engine)
            engine.dispose()

    store = _gone_sqlite(path)
    pauses = _Pauses(turns=5, after=repair)
    logs = _run(store, pauses, poll_s=0.05)
    store.dispose()
    assert pauses.seen == [0.1, 0.2, 0.4, 0.05, 0.05]
    assert [line["event"] for line in logs if "database" in str(line["event"])] == [
        _LINE, _LINE, _LINE, "hook dispatch: database available again"], logs


@pytest.mark.parametrize("poll_s", [60.0])
def test_a_long_poll_is_never_shortened_by_the_backoff(tmp_path: Path, poll_s: float) -> None:
    store = _gone_sqlite(tmp_path / "gone" / "clerk_sync.db")
    pauses = _Pauses(turns=3)
    _run(store, pauses, poll_s=poll_s)
    store.dispose()
    assert pauses.seen == [60.0, 60.0, 60.0]
