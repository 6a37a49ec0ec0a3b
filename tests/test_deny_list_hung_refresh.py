"""The deny list while its refresh hangs (review finding): one thread refreshes, the others served the previous
snapshot, however old, for as long as the refresh waited. A database (or a pooler in front of it) that holds the
connection and never answers kept every session revoked, and every user banned, since then accepted on every
replica so reading, for the whole hang. The previous snapshot is served while the refresh has run less than
``hung_after_s``; past it, a request waits ``wait_s`` for the refresh, then is refused (StoreError: 503). A
refresh that is only slow (the first load, a full reload after an idle spell) is waited for, never refused."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from clerk_sync.auth.authenticator import DenyList
from clerk_sync.errors import StoreError
from clerk_sync.store import Store
from clerk_sync.tables import revoked_sessions
from tests._proxy import TcpProxy


class Clock:
    def __init__(self) -> None:
        self.at = 1000.0

    def __call__(self) -> float:
        return self.at


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_hung_refresh_is_not_covered_by_the_old_snapshot_past_hung_after(db_url: str, store: Store) -> None:
    proxy = TcpProxy(("127.0.0.1", sa.make_url(db_url).port or 5432))
    via = Store.from_url(str(sa.make_url(db_url).set(port=proxy.port).render_as_string(hide_password=False)))
    clock = Clock()
    deny = DenyList(via, refresh_s=1.0, now=clock)  # hung_after_s 10 s, wait_s 5 s: the defaults
    try:
        assert deny.is_revoked("sess_revoked") is False  # first load
        proxy.silent.set()  # the reader's database path hangs: sockets open, nothing answered
        with store.transaction() as writer:  # another replica's webhook receiver revokes the session
            writer.conn.execute(revoked_sessions.insert().values(
                session_id="sess_revoked", user_clerk_id="user_1", reason="revoked", revoked_at=datetime.now(UTC),
                expire_at=None))
        clock.at += 1.5  # due: the next check refreshes, and hangs
        refreshing = threading.Thread(target=deny.is_revoked, args=("sess_revoked",), daemon=True)
        refreshing.start()
        while not deny._lock.locked():  # (white box: until that refresh holds the list's lock)
            time.sleep(0.01)
        assert deny.is_revoked("sess_revoked") is False  # served while the refresh runs
        clock.at += 9.0
        assert deny.is_revoked("sess_revoked") is False  # 9 s into it: still served
        clock.at += 1.0  # 10 s: the refresh hangs
        started = time.monotonic()
        with pytest.raises(StoreError, match="deny list"):
            deny.is_revoked("sess_revoked")
        assert time.monotonic() - started >= 5.0  # it waited wait_s for the refresh first
        assert refreshing.is_alive()
        proxy.silent.clear()  # the database answers again
        refreshing.join(30)
        clock.at += 1.5
        assert deny.is_revoked("sess_revoked") is True
    finally:
        proxy.close()
        via.dispose()


def test_a_refresh_that_answers_in_time_is_waited_for_not_refused(store: Store) -> None:
    """Past ``max_stale_s``, a request whose refresh another thread finishes within ``wait_s`` gets the fresh
    list, no refusal (the common case: a slow full reload)."""
    clock = Clock()
    deny = DenyList(store, refresh_s=1.0, now=clock)
    assert deny.is_revoked("sess_x") is False
    with store.transaction() as writer:
        writer.conn.execute(revoked_sessions.insert().values(session_id="sess_x", user_clerk_id="user_1", reason="revoked",
                                                             revoked_at=datetime.now(UTC), expire_at=None))
    clock.at += 60
    assert deny.is_revoked("sess_x") is True


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_concurrent_first_loads_and_a_slow_reload_after_an_idle_spell_are_waited_for(db_url: str) -> None:
    """Whole-change review finding on the first version of the bound: a first load under concurrency (a new
    replica's first requests) or a full reload after an idle spell that took more than 5 s answered 503 to all
    but the refreshing request, the database answering all along. Slow is waited for; only hung is refused."""
    proxy = TcpProxy(("127.0.0.1", sa.make_url(db_url).port or 5432))
    via = Store.from_url(str(sa.make_url(db_url).set(port=proxy.port).render_as_string(hide_password=False)))
    clock = Clock()
    deny = DenyList(via, refresh_s=1.0, now=clock)
    answers: list[object] = []

    def check() -> None:
        try:
            answers.append(deny.is_revoked("sess_1"))
        except StoreError as exc:  # (what the first version answered)
            answers.append(exc)

    try:
        for idle in (0.0, 900.0):  # the first load; then, after 15 idle minutes, a full reload
            clock.at += idle
            answers.clear()
            proxy.silent.set()  # slow: held for a while, then answered
            threads = [threading.Thread(target=check, daemon=True) for _ in range(3)]
            for thread in threads:
                thread.start()
            while not deny._lock.locked():  # (white box: a refresh is under way)
                time.sleep(0.01)
            time.sleep(0.5)
            proxy.silent.clear()
            for thread in threads:
                thread.join(30)
            assert answers == [False, False, False]
    finally:
        proxy.close()
        via.dispose()
