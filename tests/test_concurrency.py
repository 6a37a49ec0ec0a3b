"""Concurrent replicas on one PostgreSQL schema (or MariaDB database) converge, over real HTTP and real processes.

Three ``clerk-sync serve`` subprocesses share one schema. Four poster processes each send the whole
signed history (~300 events over 40 users, 10 organizations, 60 memberships, with updates and
deletes) plus a quarter re-delivered, three requests at a time, retrying 5xx and connection errors
like Svix. Two posters send the very same order (one svix id reaches two replicas at once); the other
two shuffle on their own (different svix ids race for the same rows). The result must be exactly
the pure model of the in-order history, with one inbox row per svix id, and exactly one "fresh"
(non-duplicate) acknowledgement per svix id.

A second, in-process test aims many threads at the one race the database cannot order by itself:
a membership upsert against its user's or organization's delete (the cascade).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from clerk_sync.errors import StoreError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import organization_memberships
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests._history import TERMINAL_STATUSES, bodies, db_rows, inbox, model, random_history
from tests._procs import Server, spawn_poster
from tests.conftest import SECRET

REPLICAS = 3
POSTERS = 4
THREADS_PER_POSTER = 3

pytestmark = [pytest.mark.slow]
# The stores with many writers (SQLite has one).
SERVERS = [pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("mariadb", marks=pytest.mark.mariadb)]


def _log_tail(paths: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in paths if p.exists())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("db_url", SERVERS, indirect=True)
def test_replicas_converge_under_concurrent_duplicated_delivery(db_url: str, tmp_path: Path) -> None:
    rng = random.Random(20240611)
    history = random_history(rng, n_users=40, n_orgs=10, n_memberships=60, n_steps=340, p_delete=0.1)
    ns = uuid.uuid4().hex[:10]
    stream = [(f"msg_{ns}_{i}", body.decode()) for i, body in enumerate(bodies(history, ns))]
    assert 250 <= len(stream) <= 350
    assert sum(ev.op == "deleted" for ev in history) >= 10

    logs = [tmp_path / f"serve{i}.log" for i in range(REPLICAS)]
    servers = [Server(db_url, SECRET, log=log) for log in logs]
    posters = []
    try:
        for server in servers:
            server.wait_ready()
        urls = [server.url for server in servers]
        for k in range(POSTERS):
            # Posters 0 and 1 send the very same order (the same svix id hits two replicas at once);
            # the others shuffle on their own (different svix ids race for the same rows).
            if k != 1:
                mine = stream + rng.sample(stream, len(stream) // 4)
                rng.shuffle(mine)
            job = tmp_path / f"poster{k}.json"
            job.write_text(json.dumps({
                "urls": urls, "secret": SECRET, "seed": k, "threads": THREADS_PER_POSTER,
                "deliveries": [{"svix_id": s, "body": b} for s, b in mine],
            }))
            posters.append(spawn_poster(job))
        tallies = []
        for proc in posters:
            out, _ = proc.communicate(timeout=150)
            assert proc.returncode == 0, _log_tail(logs)
            tallies.append(json.loads(out))
    finally:
        for proc in posters:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for server in servers:
            server.stop()

    for tally in tallies:
        assert tally["client_errors"] == [], _log_tail(logs)
        assert tally["gave_up"] == [], f"5xx / connection errors left unretried\n{_log_tail(logs)}"
    statuses: dict[str, int] = {}
    for tally in tallies:
        for status, count in tally["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    assert sum(statuses.values()) == POSTERS * (len(stream) + len(stream) // 4)
    # Exactly one delivery per svix id did the work; every other copy was a duplicate.
    assert sum(c for s, c in statuses.items() if s != "duplicate") == len(stream), statuses

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            got = db_rows(conn, ns)
            rows_by_id = inbox(conn, f"msg_{ns}_")
            live = conn.execute(sa.text("SELECT count(*) FROM webhook_events WHERE status = 'received'")).scalar()
    finally:
        engine.dispose()
    assert got == model(b.encode() for _, b in stream)
    assert sorted(rows_by_id) == sorted(s for s, _ in stream)
    for svix_id, row_statuses in rows_by_id.items():
        assert len(row_statuses) == 1, svix_id
        assert row_statuses[0] in TERMINAL_STATUSES, (svix_id, row_statuses)
    assert live == 0


@pytest.mark.parametrize("db_url", SERVERS, indirect=True)
def test_membership_racing_its_parents_delete_is_deleted(db_url: str, store: Store, verifier: WebhookVerifier) -> None:
    """The cascade under contention: a membership upsert racing its user's (or org's) delete ends deleted.

    Without serialising the two (advisory locks), READ COMMITTED lets each transaction miss the
    other's uncommitted row: the membership check sees no deleted parent, the cascade sees no
    membership, and a live membership of a deleted user survives.
    """
    processor = WebhookProcessor(store, verifier)
    ns = uuid.uuid4().hex[:10]
    pairs = 120
    parents = [(f"user_{ns}_{i}", f"org_{ns}_{i}") for i in range(pairs)]
    for user_id, org_id in parents:
        processor.process(*f.signed(f.envelope("user.created", f.user(user_id, 1000)), f"msg_{ns}_cu_{user_id}"))
        processor.process(*f.signed(f.envelope("organization.created", f.organization(org_id, 1000)),
                                    f"msg_{ns}_co_{org_id}"))
    racing = []
    for i, (user_id, org_id) in enumerate(parents):
        gone_kind, gone_id = ("user", user_id) if i % 2 else ("organization", org_id)
        racing.append(f.envelope("organizationMembership.created",
                                 f.membership(f"orgmem_{ns}_{i}", org_id, user_id, 2000)))
        racing.append(f.envelope(f"{gone_kind}.deleted", f.deleted(gone_kind, gone_id), 3000))
    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(
            lambda n: _process_retrying(processor, f.signed(racing[n], f"msg_{ns}_race_{n}")), range(len(racing))
        ))
    assert all(o in ("applied", "skipped") for o in outcomes), outcomes
    with store.connect() as conn:
        live = conn.execute(
            sa.select(organization_memberships.c.clerk_id).where(
                organization_memberships.c.clerk_id.like(f"orgmem_{ns}_%"),
                organization_memberships.c.deleted_at.is_(None),
            )
        ).scalars().all()
    assert live == []


def _process_retrying(processor: WebhookProcessor, delivery: tuple[dict[str, str], bytes]) -> str:
    for _ in range(50):
        try:
            return processor.process(*delivery).status
        except StoreError:  # a deadlock or serialisation failure: Svix would retry
            time.sleep(0.01)
    raise AssertionError("still failing after 50 attempts")
