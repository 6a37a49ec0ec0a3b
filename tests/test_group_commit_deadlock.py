"""Concurrent group-commit batches that touch the same users in opposite orders must not deadlock.

Found by bench/ingest.py on MariaDB: every ``group_commit_isolated reason=OperationalError`` in the
service cells was an InnoDB deadlock (``Innodb_deadlocks`` rose by as many: 232 of 233 in one run,
57-67 per 256-sender cell), and twice a delivery then written alone deadlocked again and was answered
503. ``SHOW ENGINE INNODB STATUS`` shows two batch transactions, each holding one user's row in
``uq_users_clerk_id`` (taken by its ``INSERT .. ON DUPLICATE KEY UPDATE``) and waiting for the other's:
on MySQL/MariaDB the committer writes a batch one delivery at a time, in arrival order, so two
batches with the same two users in opposite orders wait on each other; InnoDB rolls one back (1213,
"Deadlock found when trying to get lock; try restarting transaction"), the delivery that hit it is
set aside (written alone) and its batch-mates are written again.

The barrier makes the interleaving certain (each batch has applied its first delivery before either
applies its second); it gives up after a second, so a committer that takes the batch's rows in one
order (e.g. sorted by key), where the other batch waits instead, passes instead of hanging.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from clerk_sync.events import parse_envelope
from clerk_sync.ingest import Outcome, WebhookProcessor
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f


def _delivery(svix_id: str, user_id: str, version: int) -> tuple[str, Any]:
    return svix_id, parse_envelope(f.body_of(f.envelope("user.updated", f.user(user_id, version))))


@pytest.mark.parametrize("db_url", ["mariadb"], indirect=True)
def test_batches_with_the_same_users_in_opposite_orders_both_commit_whole(
        store: Store, verifier: WebhookVerifier) -> None:
    processor = WebhookProcessor(store, verifier)
    committer = GroupCommitter(processor)
    committer.write([_delivery("msg_a0", "user_a", 1), _delivery("msg_b0", "user_b", 1)])

    barrier = threading.Barrier(2)
    applied = threading.local()
    apply_in = processor.apply_in

    def apply_then_meet(*args: Any) -> Any:
        outcome = apply_in(*args)
        if not getattr(applied, "first", False):
            applied.first = True
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=1.0)
        return outcome

    processor.apply_in = apply_then_meet  # type: ignore[method-assign]
    batches = [[_delivery("msg_a1", "user_a", 2), _delivery("msg_b1", "user_b", 2)],
               [_delivery("msg_b2", "user_b", 3), _delivery("msg_a2", "user_a", 3)]]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(committer.write, batches))

    statuses = [[r.status if isinstance(r, Outcome) else r for r in batch] for batch in results]
    assert all(isinstance(r, Outcome) for batch in results for r in batch), (
        f"a delivery was set aside (ALONE) by a deadlock between the two batches: {statuses}")
    assert committer.batches == 3
