"""Every writer takes its per-entity locks in one order (their lock ids), on PostgreSQL: a backfill page
(``Writer.lock_records``) sorted them by key while piped delivery batches sort by id, so the two could each
hold a lock the other waited for (review of 2026-12-04b). A real PostgreSQL, two real sessions."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import NoReturn

import pytest
import sqlalchemy as sa

from clerk_sync.engine import DeliveryStatus, Entity
from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import ALONE, GroupCommitter, _Isolate
from clerk_sync.store import Store, _lock_id
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import PG_URL

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_store(db_url: str) -> Iterator[Store]:
    store = Store.from_url(db_url)
    yield store
    store.dispose()


def _inverted_pair() -> tuple[str, str]:
    """Two user keys whose order as strings is the reverse of their lock ids' order."""
    for a, b in itertools.pairwise(f"user:user_{i}" for i in itertools.count()):
        if (a < b) != (_lock_id(a) < _lock_id(b)):
            return a, b
    raise AssertionError("unreachable")


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # (MariaDB's lock rows were in id order already)
@pytest.mark.parametrize("how", ["records", "keys"])
def test_a_writer_never_holds_a_later_lock_while_it_waits_for_an_earlier_one(pg_store: Store, how: str) -> None:
    a, b = _inverted_pair()
    first, second = sorted((a, b), key=_lock_id)  # the order a piped batch takes them in
    errors: list[BaseException] = []
    admin = sa.create_engine(PG_URL)
    other = admin.connect()
    try:
        other.begin()
        other.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
        other.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id(first)})  # a batch, half-way

        def write() -> None:
            try:
                with pg_store.transaction() as writer:
                    if how == "records":  # a backfill page of these two users
                        writer.lock_records(*_as_records(a, b))
                    else:
                        writer.lock([a, b])
            except BaseException as exc:  # (reported below)
                errors.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        _until_waiting(admin, _lock_id(first))
        # The batch now takes its next lock: a writer that had taken ``second`` first holds it (a deadlock,
        # which PostgreSQL breaks by failing one of the two; here the lock_timeout would end it).
        other.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id(second)})
        other.commit()
        thread.join(30)
        assert not thread.is_alive() and errors == []
    finally:
        other.close()
        admin.dispose()


def _as_records(a: str, b: str) -> tuple[Entity, list[str]]:
    return Entity.USER, [key.removeprefix("user:") for key in (a, b)]


def _until_waiting(engine: sa.Engine, lock: int) -> None:
    """Until a session waits for the advisory lock ``lock`` (polled; the writer's thread gets there at once)."""
    objid, classid = lock & 0xFFFFFFFF, (lock >> 32) & 0xFFFFFFFF
    deadline = time.monotonic() + 30
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "  # (this one's)
                "AND classid::bigint = :classid AND objid::bigint = :objid"), {"classid": classid, "objid": objid}
            ).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError("the writer never waited for the first lock")


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
def test_a_batch_takes_its_deliveries_locks_in_one_order(pg_store: Store, pipelined: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: a group-commit batch took each delivery's locks as it applied it (deletions after the
    pipeline; every delivery when the batch goes one statement at a time, as under a linking mapping), so a
    batch deleting A then B held A's lock while it waited for B's, which a writer taking them in order (a
    backfill page, another batch) holds before it asks for A's: a deadlock."""
    a, b = _inverted_pair()
    late, early = sorted((a, b), key=_lock_id, reverse=True)  # the batch's first deletion has the later lock
    first, second = early, late
    processor = WebhookProcessor(pg_store, WebhookVerifier([f.SECRET]))
    committer = GroupCommitter(processor, lock_wait_s=10)  # (the other session's turn is not raced)
    if not pipelined:
        monkeypatch.setattr(type(committer), "_pipelined", _no_pipeline)
    for key in (late, early):  # the users exist
        committer.write([(f"msg_c_{key}", parse_envelope(f.body_of(f.envelope(
            "user.created", f.user(key.removeprefix("user:"), 10)))))])
    batch = [(f"msg_d_{key}", parse_envelope(f.body_of(f.envelope("user.deleted", f.deleted(
        "user", key.removeprefix("user:")))))) for key in (late, early)]
    results: list[object] = []
    retried = committer.retried
    admin = sa.create_engine(PG_URL)
    other = admin.connect()
    try:
        other.begin()
        other.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
        other.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id(first)})
        thread = threading.Thread(target=lambda: results.extend(committer.write(batch)))
        thread.start()
        _until_waiting(admin, _lock_id(first))
        other.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id(second)})
        other.commit()
        thread.join(30)
        assert not thread.is_alive()
        assert [getattr(r, "status", r) for r in results] == [DeliveryStatus.APPLIED] * 2
        # In one attempt (a deadlock PostgreSQL breaks by failing the batch is retried, and applies too)
        assert committer.retried - retried == (0 if pipelined else 1)
    finally:
        other.close()
        admin.dispose()


def _no_pipeline(self: GroupCommitter, writer: object, jobs: object) -> NoReturn:
    raise _Isolate(-1, RuntimeError("the test's batch goes one statement at a time"))


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
def test_a_lock_held_elsewhere_sends_only_its_entitys_deliveries_alone(pg_store: Store, pipelined: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of the fix above: the batch's one pass of locks, timing out on one user held elsewhere (a backfill
    page), sent every delivery alone; the held one is found without waiting, and only its entity's go alone."""
    processor = WebhookProcessor(pg_store, WebhookVerifier([f.SECRET]))
    committer = GroupCommitter(processor, lock_wait_s=0.2)  # (the lock stays held: nothing races it)
    if not pipelined:
        monkeypatch.setattr(type(committer), "_pipelined", _no_pipeline)
    names = ["user_held", "user_free1", "user_free2"]
    committer.write([(f"msg_c_{n}", parse_envelope(f.body_of(f.envelope("user.created", f.user(n, 10)))))
                     for n in names])
    batch = [(f"msg_d_{n}", parse_envelope(f.body_of(f.envelope("user.deleted", f.deleted("user", n)))))
             for n in names]
    admin = sa.create_engine(PG_URL)
    try:
        with admin.connect() as other:
            other.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id("user:user_held")})
            results = committer.write(batch)
            other.rollback()
    finally:
        admin.dispose()
    assert results[0] is ALONE
    assert [getattr(r, "status", r) for r in results[1:]] == [DeliveryStatus.APPLIED] * 2
