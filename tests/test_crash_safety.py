"""Crash safety: an acknowledged delivery is committed, an unacknowledged one leaves nothing behind.

* ``kill -9`` of ``clerk-sync serve`` mid-stream, with requests in flight: every acknowledged svix id
  is already in the inbox, no inbox row is left ``received``, and after a restart and a full
  re-delivery (Svix retries whatever it has no 2xx for) the rows equal the pure model.
* A transaction that fails after the inbox insert (the database refuses the row write) rolls the
  inbox row back too: ``StoreError`` from the processor, 503 + ``Retry-After`` over HTTP, and a
  later re-delivery of the same svix id applies.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.config import Settings
from clerk_sync.errors import StoreError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.starlette import create_app
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import organizations, users, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests._history import TERMINAL_STATUSES, Final, bodies, db_rows, inbox, model, random_history
from tests._procs import Server, Tally, deliver, post_all
from tests._server import running
from tests.conftest import PG_URL, SECRET

pytestmark = pytest.mark.slow


def _read(db_url: str, ns: str) -> tuple[Final, dict[str, list[str]], int]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            received = conn.execute(
                sa.select(sa.func.count()).select_from(webhook_events).where(webhook_events.c.status == "received")
            ).scalar_one()
            return db_rows(conn, ns), inbox(conn, f"msg_{ns}_"), received
    finally:
        engine.dispose()


def _post_until_killed(server: Server, stream: list[tuple[str, bytes]], kill_after: int,
                       senders: int = 8) -> tuple[Tally, int]:
    """Post from several threads without retrying; ``kill -9`` once ``kill_after`` deliveries are acked."""
    tally = Tally()
    queue = list(reversed(stream))
    queue_lock = threading.Lock()
    in_flight = [0]

    def worker(n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(timeout=10.0) as client:
            while True:
                with queue_lock:
                    if not queue:
                        return
                    svix_id, body = queue.pop()
                    in_flight[0] += 1
                deliver(client, [server.url], SECRET, svix_id, body, tally, rng, attempts=1)
                with queue_lock:
                    in_flight[0] -= 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(senders)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(tally.acked) < kill_after and time.monotonic() < deadline:
            time.sleep(0.001)
        with queue_lock:
            busy = in_flight[0]
        server.kill()
    finally:
        for t in threads:
            t.join()
    return tally, busy


def test_kill_9_mid_stream_then_redeliver(db_url: str, tmp_path: Path) -> None:
    history = random_history(random.Random(99), n_users=15, n_orgs=5, n_memberships=20, n_steps=160)
    ns = uuid.uuid4().hex[:10]
    stream = [(f"msg_{ns}_{i}", body) for i, body in enumerate(bodies(history, ns))]
    log = tmp_path / "serve.log"

    server = Server(db_url, SECRET, log=log)
    try:
        server.wait_ready()
        before, busy = _post_until_killed(server, stream, kill_after=len(stream) // 3)
    finally:
        server.stop()
    assert before.client_errors == []
    assert len(before.acked) >= len(stream) // 3
    assert before.gave_up, "the server was killed after the stream was done"
    assert busy > 0, "no request was in flight at the kill"

    # Acknowledged means committed; nothing half-done survives the crash.
    _, after_crash, received = _read(db_url, ns)
    assert received == 0
    assert set(before.acked) <= set(after_crash)
    assert all(statuses == [statuses[0]] and statuses[0] in TERMINAL_STATUSES for statuses in after_crash.values())

    server = Server(db_url, SECRET, log=log)
    try:
        server.wait_ready()
        again = post_all([server.url], SECRET, stream, threads=4, seed=1)
    finally:
        server.stop()
    assert again.client_errors == []
    assert again.gave_up == []
    fresh = sum(c for s, c in again.statuses.items() if s != "duplicate")
    assert fresh == len(stream) - len(after_crash)

    rows, final_inbox, received = _read(db_url, ns)
    assert rows == model(body for _, body in stream)
    assert received == 0
    assert sorted(final_inbox) == sorted(s for s, _ in stream)
    for svix_id, statuses in final_inbox.items():
        assert len(statuses) == 1, svix_id
        assert statuses[0] in TERMINAL_STATUSES, (svix_id, statuses)


def test_kill_9_in_the_middle_of_group_commit_batches_loses_no_acknowledged_delivery(
        db_url: str, tmp_path: Path) -> None:
    """32 senders keep the group committer's batches full (``serve`` answers a delivery only after its
    batch's COMMIT); ``kill -9`` lands while batches are being written: every acknowledged delivery is
    in the database, and no batch is left half-written."""
    history = random_history(random.Random(7), n_users=40, n_orgs=8, n_memberships=40, n_steps=600)
    ns = uuid.uuid4().hex[:10]
    stream = [(f"msg_{ns}_{i}", body) for i, body in enumerate(bodies(history, ns))]
    server = Server(db_url, SECRET, log=tmp_path / "serve.log")
    try:
        server.wait_ready()
        before, busy = _post_until_killed(server, stream, kill_after=len(stream) // 2, senders=32)
    finally:
        server.stop()
    assert before.client_errors == []
    assert before.gave_up, "the server was killed after the stream was done"
    assert busy > 1, "fewer than two requests were in flight at the kill"
    _, after_crash, received = _read(db_url, ns)
    assert received == 0
    missing = set(before.acked) - set(after_crash)
    assert not missing, f"acknowledged but not in the database: {sorted(missing)[:5]}"
    assert all(statuses == [statuses[0]] and statuses[0] in TERMINAL_STATUSES for statuses in after_crash.values())


# -- a fault between the inbox insert and the row write ------------------------------------------

@contextmanager
def _users_refuse_inserts(store: Store) -> Iterator[None]:
    """Make the database reject any insert into ``users`` (a trigger), then put things back."""
    install, remove = {
        "postgresql": (["CREATE FUNCTION refuse_users() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$ BEGIN RAISE EXCEPTION 'injected fault'; END $$",
                        "CREATE TRIGGER refuse_users BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION refuse_users()"],
                       ["DROP TRIGGER refuse_users ON users", "DROP FUNCTION refuse_users()"]),
        "sqlite": (["CREATE TRIGGER refuse_users BEFORE INSERT ON users BEGIN SELECT RAISE(ABORT, 'injected fault'); END"],
                   ["DROP TRIGGER refuse_users"]),
        "mysql": (["CREATE TRIGGER refuse_users BEFORE INSERT ON users FOR EACH ROW "
                   "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected fault'"],
                  ["DROP TRIGGER refuse_users"]),
    }[store.dialect]
    with store.engine.begin() as conn:
        for statement in install:
            conn.exec_driver_sql(statement)
    try:
        yield
    finally:
        with store.engine.begin() as conn:
            for statement in remove:
                conn.exec_driver_sql(statement)


def _counts(store: Store, svix_id: str, user_id: str) -> tuple[int, int]:
    with store.connect() as conn:
        inbox_rows = conn.execute(
            sa.select(sa.func.count()).select_from(webhook_events).where(webhook_events.c.svix_id == svix_id)
        ).scalar_one()
        user_rows = conn.execute(
            sa.select(sa.func.count()).select_from(users).where(users.c.clerk_id == user_id)
        ).scalar_one()
    return inbox_rows, user_rows


def test_failure_after_inbox_insert_writes_nothing(store: Store, verifier: WebhookVerifier) -> None:
    processor = WebhookProcessor(store, verifier)
    user_id, org_id = f"user_{uuid.uuid4().hex[:10]}", f"org_{uuid.uuid4().hex[:10]}"
    event = f.envelope("user.created", f.user(user_id, 1_700_000_000_500))

    with _users_refuse_inserts(store):
        with pytest.raises(StoreError, match="injected fault"):
            processor.process(*f.signed(event, "msg_fault_1"))
        assert _counts(store, "msg_fault_1", user_id) == (0, 0)

        settings = Settings.from_env({"DATABASE_URL": "sqlite://", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
        with running(create_app(settings, processor)) as url, httpx.Client(base_url=url) as client:
            headers, body = f.signed(event, "msg_fault_1")
            response = client.post("/webhooks/clerk", content=body, headers=headers)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"
            # Other tables still work: the fault is the users insert, not the connection.
            headers, body = f.signed(f.envelope("organization.created", f.organization(org_id, 5)), "msg_fault_org")
            assert client.post("/webhooks/clerk", content=body, headers=headers).json()["status"] == "applied"
        assert _counts(store, "msg_fault_1", user_id) == (0, 0)

    outcome = processor.process(*f.signed(event, "msg_fault_1"))
    assert outcome.status == "applied"
    assert _counts(store, "msg_fault_1", user_id) == (1, 1)
    with store.connect() as conn:
        status = conn.execute(
            sa.select(webhook_events.c.status).where(webhook_events.c.svix_id == "msg_fault_1")
        ).scalar_one()
        org_rows = conn.execute(
            sa.select(sa.func.count()).select_from(organizations).where(organizations.c.clerk_id == org_id)
        ).scalar_one()
    assert status == "applied"
    assert org_rows == 1


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_lock_timeout_is_transient(db_url: str, verifier: WebhookVerifier) -> None:
    """On PostgreSQL a lock timeout mid-transaction (another session holds ``users``) rolls back the inbox row."""
    assert db_url.startswith(PG_URL)
    store = Store.from_url(db_url + "%20-clock_timeout%3D300")
    holder = create_engine(db_url)
    processor = WebhookProcessor(store, verifier)
    user_id = f"user_{uuid.uuid4().hex[:10]}"
    event = f.envelope("user.created", f.user(user_id, 1_700_000_000_500))
    try:
        with holder.begin() as conn:
            conn.exec_driver_sql("LOCK TABLE users IN EXCLUSIVE MODE")
            with pytest.raises(StoreError, match=r"LockNotAvailable|lock timeout"):
                processor.process(*f.signed(event, "msg_lock_1"))
        assert _counts(store, "msg_lock_1", user_id) == (0, 0)
        assert processor.process(*f.signed(event, "msg_lock_1")).status == "applied"
        assert _counts(store, "msg_lock_1", user_id) == (1, 1)
    finally:
        holder.dispose()
        store.dispose()
