"""Jobs of one unmirrored event's subject are numbered in commit order (review).

Per-subject order rests on job ids following commits; users and organizations get that from their writers'
locks, an unmirrored event took none. Of two deliveries about one subscription item in flight at once, the later
one's job committed first and ran; the earlier one's, committed next, was then the subject's first unfinished job
and a second dispatcher ran it beside the first, finishing last (``active`` after ``canceled`` downstream). The
delivery queuing an event's jobs now holds its subject's lock to COMMIT: the second waits for the first.

The first delivery is held inside its transaction, after its job row is written, by a trigger that waits for a
lock this test holds (PostgreSQL: an advisory lock; MariaDB: a named lock)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.changes import Event, Hook
from clerk_sync.events import Envelope, parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.outbox import claim
from clerk_sync.store import Store, Writer, _lock_id
from clerk_sync.tables import hook_jobs
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f

HELD = 4242  # the lock the trigger waits for (PostgreSQL: advisory key; MariaDB: its name's suffix)

_TRIGGER = {
    "postgresql": [
        "CREATE FUNCTION cs_hold_first() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.type = 'subscriptionItem.active' THEN PERFORM pg_advisory_lock({HELD}); "
        f"PERFORM pg_advisory_unlock({HELD}); END IF; RETURN NEW; END $$",
        "CREATE TRIGGER cs_hold_first AFTER INSERT ON hook_jobs FOR EACH ROW EXECUTE FUNCTION cs_hold_first()"],
    "mysql": [
        "CREATE TRIGGER cs_hold_first AFTER INSERT ON hook_jobs FOR EACH ROW BEGIN "
        f"IF NEW.type = 'subscriptionItem.active' THEN DO GET_LOCK(CONCAT(DATABASE(), '_{HELD}'), 120); "
        f"DO RELEASE_LOCK(CONCAT(DATABASE(), '_{HELD}')); END IF; END"],
}
_HOLD = {"postgresql": f"SELECT pg_advisory_lock({HELD})", "mysql": f"DO GET_LOCK(CONCAT(DATABASE(), '_{HELD}'), 0)"}
_RELEASE = {"postgresql": f"SELECT pg_advisory_unlock({HELD})", "mysql": f"DO RELEASE_LOCK(CONCAT(DATABASE(), '_{HELD}'))"}
# Someone waits for the held lock (the first delivery, in its trigger); someone waits for another lock (the second
# delivery, for the first one's subject lock)
_AT_THE_TRIGGER = {
    "postgresql": "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = (SELECT oid "  # noqa: S608
                  f"FROM pg_database WHERE datname = current_database()) AND objid = {HELD}",
    "mysql": "SELECT count(*) FROM information_schema.PROCESSLIST WHERE db = DATABASE() AND state = 'User lock'"}
_SUBJECT = _lock_id("event:subscriptionItem:subi_1")
_WAITING = {
    # (the second delivery's wait for the subject's lock itself: another test's wait in the database is not it)
    "postgresql": "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = "  # noqa: S608
                  f"(SELECT oid FROM pg_database WHERE datname = current_database()) AND classid::bigint = "
                  f"{(_SUBJECT >> 32) & 0xFFFFFFFF} AND objid::bigint = {_SUBJECT & 0xFFFFFFFF}",
    # (MariaDB names no waiter for a lock row another transaction inserted: the statement taking it, running)
    "mysql": "SELECT count(*) FROM information_schema.PROCESSLIST WHERE db = DATABASE() AND command = 'Query' "
             "AND info LIKE 'INSERT INTO clerk_sync_locks%%'"}


def _until(conn: sa.Connection, sql: str, stop: Callable[[], bool], what: str) -> bool:
    """Polls ``sql`` until it counts someone (True) or ``stop()`` says the awaited thing cannot come (False)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = conn.exec_driver_sql(sql).scalar_one()
        conn.rollback()  # (a fresh look each time)
        if found:
            return True
        if stop():
            return False
        time.sleep(0.02)  # a pause between looks, not a bound on anything
    raise AssertionError(f"{what}: not within 60 s")


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_a_later_delivery_about_the_same_subject_waits_for_the_one_in_flight(db_url: str) -> None:
    seen: list[Event] = []
    store = Store.from_url(db_url, hooks=[Hook("billing", seen.append, on=["subscriptionItem.*"])])
    dialect = "postgresql" if store.engine.dialect.name == "postgresql" else "mysql"
    admin = sa.create_engine(db_url)
    with admin.begin() as conn:
        for statement in _TRIGGER[dialect]:
            conn.exec_driver_sql(statement)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    outcomes: dict[str, Any] = {}

    def deliver(event_type: str, svix_id: str, at: int) -> None:
        data = {"id": "subi_1", "object": "commerce_subscription_item", "status": event_type.split(".")[1]}
        headers, body = f.signed(f.envelope(event_type, data, at), svix_id)
        outcomes[svix_id] = processor.process(headers, body).status

    first = threading.Thread(target=deliver, args=("subscriptionItem.active", "msg_first", 1_000))
    second = threading.Thread(target=deliver, args=("subscriptionItem.canceled", "msg_second", 2_000))
    try:
        with admin.connect() as holder, admin.connect() as look:
            holder.exec_driver_sql(_HOLD[dialect])
            holder.commit()
            try:
                first.start()
                assert _until(look, _AT_THE_TRIGGER[dialect], lambda: not first.is_alive(),
                              "the first delivery reaching its trigger"), outcomes
                second.start()
                waited = _until(look, _WAITING[dialect], lambda: not second.is_alive(), "the second one waiting")
                assert waited, "the second delivery committed while the first, about the same subject, was in flight"
            finally:
                holder.exec_driver_sql(_RELEASE[dialect])
                holder.commit()
        first.join(timeout=60)
        second.join(timeout=60)
        assert outcomes == {"msg_first": "ignored", "msg_second": "ignored"}
        with store.connect() as conn:
            jobs = conn.execute(sa.select(hook_jobs.c.id, hook_jobs.c.idempotency_key).order_by(hook_jobs.c.id)).all()
        assert [key for _, key in jobs] == ["subscriptionItem.active:msg_first", "subscriptionItem.canceled:msg_second"]
        with store.transaction() as w:  # the subject's first job is claimed first, and alone
            claimed = claim(w.conn, store.now(), lease=timedelta(seconds=60), limit=10, max_attempts=5,
                            hooks=["billing"])
        assert [job.id for job in claimed] == [jobs[0].id], claimed
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER cs_hold_first" + (" ON hook_jobs" if dialect == "postgresql" else ""))
        admin.dispose()
        store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_pipelined_batch_takes_its_events_subject_locks_in_its_one_pass(db_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The group committer's pipelined batch (PostgreSQL, psycopg) takes every lock in one sorted pass: its
    events' subjects too. They were taken one by one afterwards, in delivery order, by each event's queuing: two
    batches naming two subjects in opposite orders waited on each other until the batch's lock bound sent every
    delivery alone (review)."""
    store = Store.from_url(db_url, hooks=[Hook("billing", print, on=["subscriptionItem.*"])])
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
    passes: list[list[str]] = []
    piped = Writer.record_and_upsert_many

    def recording(self: Writer, items: Any, **options: Any) -> Any:
        passes.append(sorted(options.get("then_keys", ())))
        return piped(self, items, **options)

    monkeypatch.setattr(Writer, "record_and_upsert_many", recording)

    def delivery(subject: str, svix_id: str) -> tuple[str, Envelope]:
        _, body = f.signed(f.envelope("subscriptionItem.active", {"id": subject, "object": "x"}, 1_000), svix_id)
        return svix_id, parse_envelope(body.decode())

    try:
        results = committer.write([delivery("subi_2", "msg_p2"), delivery("subi_1", "msg_p1")])
        assert [getattr(r, "status", r) for r in results] == ["ignored", "ignored"], results
        assert passes == [["event:subscriptionItem:subi_1", "event:subscriptionItem:subi_2"]], passes
        assert committer.retried == 0
    finally:
        store.dispose()
