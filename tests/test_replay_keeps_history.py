"""``replay --status applied|skipped|ignored`` leaves the history as it was.

Walkthrough finding (2026-12-05, section 6): ``clerk-sync replay --status applied`` rewrote every applied delivery
as ``skipped`` (a replay of an applied event is stale, and the replay recorded that), and counted an attempt on
each: the console's filters, the outcome metrics and an incident review lost which deliveries had applied. A
delivery that was not failed now keeps its status, error and attempts when its replay changes nothing; the CLI
says so and points to ``migrate --mapping .. --backfill`` for rebuilding a mapped table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import sqlalchemy as sa

from clerk_sync.ingest import WebhookProcessor, replay_deliveries
from clerk_sync.retention import redact_payload
from clerk_sync.store import Store
from clerk_sync.tables import users, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import SECRET

CLI = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]


def _deliver(store: Store) -> dict[str, str]:
    """Live deliveries of every stored outcome; returns svix id -> status."""
    processor = WebhookProcessor(store, WebhookVerifier([SECRET]), summary_s=0)
    sent = [(f.envelope("user.created", f.user("user_h1", 1)), "msg_h1"),
            (f.envelope("user.updated", f.user("user_h1", 2)), "msg_h2"),
            (f.envelope("user.updated", f.user("user_h1", 1, first_name="Old")), "msg_h3"),  # stale: skipped
            (f.envelope("user.created", f.user("user_h2", 1)), "msg_h4"),
            (f.envelope("brandNew.thing", {"id": "x"}), "msg_h5"),  # ignored
            (f.envelope("user.created", {**f.user("user_h3", 1), "id": "user_" + "x" * 80}), "msg_h6")]  # failed
    return {svix_id: str(processor.process(*f.signed(event, svix_id)).status) for event, svix_id in sent}


def _rows(store: Store) -> dict[str, tuple[Any, ...]]:
    e = webhook_events.c
    with store.connect() as conn:
        return {row.svix_id: (row.status, row.attempts, row.last_error, row.applied_at)
                for row in conn.execute(sa.select(e.svix_id, e.status, e.attempts, e.last_error, e.applied_at))}


def test_a_replay_of_deliveries_that_are_not_failed_keeps_their_status(store: Store) -> None:
    statuses = _deliver(store)
    assert statuses == {"msg_h1": "applied", "msg_h2": "applied", "msg_h3": "skipped", "msg_h4": "applied",
                        "msg_h5": "ignored", "msg_h6": "failed"}
    with store.transaction() as w:  # msg_h4's payload redacted by retention (ids and versions only)
        payload = w.conn.execute(sa.select(webhook_events.c.payload)
                                 .where(webhook_events.c.svix_id == "msg_h4")).scalar_one()
        w.conn.execute(webhook_events.update().where(webhook_events.c.svix_id == "msg_h4")
                       .values(payload=redact_payload(payload)))
    before = _rows(store)

    applied = replay_deliveries(store, status="applied")
    skipped = replay_deliveries(store, status="skipped")
    ignored = replay_deliveries(store, status="ignored")
    assert _rows(store) == before  # status, attempts, last_error and applied_at: as they were
    assert (applied.total, applied.by_status, applied.left) == (3, {"applied": 3}, {"applied": 3})
    assert (skipped.by_status, skipped.left) == ({"skipped": 1}, {"skipped": 1})
    assert (ignored.by_status, ignored.left) == ({"ignored": 1}, {"ignored": 1})

    failed = replay_deliveries(store)  # a failed one is replayed and recorded as before
    assert (failed.by_status, failed.left) == ({"failed": 1}, {})
    assert _rows(store)["msg_h6"][:2] == ("failed", before["msg_h6"][1] + 1)


def test_a_replay_that_applies_again_is_recorded(store: Store) -> None:
    """The row was removed by hand: the applied delivery's replay writes it again, and says so."""
    _deliver(store)
    with store.transaction() as w:
        w.conn.execute(users.delete().where(users.c.clerk_id == "user_h2"))
    before = _rows(store)
    report = replay_deliveries(store, status="applied")
    after = _rows(store)
    assert after["msg_h4"][:2] == ("applied", before["msg_h4"][1] + 1)
    assert {k: v for k, v in after.items() if k != "msg_h4"} == {k: v for k, v in before.items() if k != "msg_h4"}
    assert (report.by_status, report.left) == ({"applied": 3}, {"applied": 2})
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.first_name).where(users.c.clerk_id == "user_h2")).scalar_one() == "Ada"


def test_the_command_says_what_it_left_and_points_to_the_backfill(db_url: str) -> None:
    store = Store.from_url(db_url)
    _deliver(store)
    before = _rows(store)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    result = subprocess.run([*CLI, "replay", "--status", "applied"], capture_output=True, text=True,
                            env={**env, "DATABASE_URL": db_url}, timeout=120, check=False)
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, said
    assert "replayed 3 deliveries" in said and "3 already applied: left as they were" in said, said
    assert "clerk-sync migrate --mapping module:attribute --backfill" in said, said
    assert _rows(store) == before
    with store.connect() as conn:
        counts = dict(conn.execute(sa.select(webhook_events.c.status, sa.func.count())
                                   .group_by(webhook_events.c.status)).all())
    assert counts == {"applied": 3, "skipped": 1, "ignored": 1, "failed": 1}
    store.dispose()
