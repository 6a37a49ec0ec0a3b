"""``reconcile`` makes one run at a time, also when two invocations start together or one stalls."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.clerk_api import ClerkClient
from clerk_sync.errors import ReconcileBusy
from clerk_sync.reconcile import Reconciler, ReconcileReport
from clerk_sync.store import Store
from clerk_sync.tables import reconcile_runs, users
from clerk_sync.testing import EmulatorServer
from tests.conftest import clerk_client


def _runs(store: Store) -> list[tuple[int, str]]:
    with store.connect() as conn:
        return [(r.id, r.status) for r in conn.execute(sa.select(reconcile_runs.c.id, reconcile_runs.c.status)
                                                       .order_by(reconcile_runs.c.id))]


def test_two_invocations_started_together_make_one_run(store: Store, emu: EmulatorServer) -> None:
    """Fixed: ``_claim`` read the runs and then inserted its own, with nothing in between to stop a second
    invocation (the CLI and the console's drift page, two cron hosts) doing the same: both saw no live run,
    both inserted one, and two runs paged and swept at once. The second waits for the first's claim now,
    sees its run live, and is refused (ReconcileBusy)."""
    if store.dialect == "sqlite":
        pytest.skip("SQLite has one writer (BEGIN IMMEDIATE): claims queue by themselves")
    emu.emulator.bulk_create_users(3)
    a_inserting, b_claiming = threading.Event(), threading.Event()

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        me = threading.current_thread().name
        if me == "B" and ("pg_advisory_xact_lock" in statement or "clerk_sync_locks" in statement):
            b_claiming.set()  # B queues behind A's claim (A goes on, so B gets its turn)
        if me == "A" and statement.startswith("INSERT INTO reconcile_runs"):
            a_inserting.set()
            b_claiming.wait(60)  # until B has read the runs too, or queues for A's claim

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread().name == "B" and "FROM reconcile_runs" in statement:
            b_claiming.set()  # B read the runs while A's new one was not committed

    outcomes: dict[str, ReconcileReport | BaseException] = {}

    def invoke(clerk: ClerkClient) -> None:
        try:
            outcomes[threading.current_thread().name] = Reconciler(store, clerk).run()
        except Exception as exc:
            outcomes[threading.current_thread().name] = exc

    sa.event.listen(store.engine, "before_cursor_execute", before)
    sa.event.listen(store.engine, "after_cursor_execute", after)
    with clerk_client(emu) as clerk_a, clerk_client(emu) as clerk_b:
        a = threading.Thread(target=invoke, args=(clerk_a,), name="A")
        a.start()
        assert a_inserting.wait(60)
        b = threading.Thread(target=invoke, args=(clerk_b,), name="B")
        b.start()
        a.join(120)
        b.join(120)
    assert isinstance(outcomes["A"], ReconcileReport), outcomes["A"]
    assert isinstance(outcomes["B"], ReconcileBusy), outcomes["B"]
    assert _runs(store) == [(outcomes["A"].run_id, "completed")]


def test_a_run_taken_over_while_it_stalled_stops_at_its_next_checkpoint(store: Store, emu: EmulatorServer) -> None:
    """Fixed: a run silent for ``stale_after_s`` (a paused process, a slow page) is taken over and resumed by
    the next invocation; the first one, once it woke, went on writing checkpoints into the same run, after
    the new owner had finished it (its staged ids deleted, so its own sweep saw every row as unlisted).
    It finds the run taken over at its next checkpoint now and stops, writing nothing more."""
    emu.emulator.bulk_create_users(120)
    taken_over: list[ReconcileReport] = []
    with clerk_client(emu) as stalled, clerk_client(emu) as other:
        real = stalled.list_users

        def stalls_then_lists(**kwargs: Any) -> Any:
            if not taken_over:  # meanwhile, another invocation finds the run stale and takes it over
                taken_over.append(Reconciler(store, other, page_size=50, stale_after_s=0).run())
            return real(**kwargs)

        stalled.list_users = stalls_then_lists  # type: ignore[method-assign]
        with pytest.raises(ReconcileBusy, match=r"reconcile run \d+ was taken over by another invocation"):
            Reconciler(store, stalled, page_size=50, prefetch=1).run()
    [report] = taken_over
    assert report.resumed and report.counts["users"].created == 120
    assert _runs(store) == [(report.run_id, "completed")]
    with store.connect() as conn:
        row = conn.execute(sa.select(reconcile_runs)).mappings().one()
        live = conn.execute(sa.select(sa.func.count()).select_from(users).where(users.c.deleted_at.is_(None)))
        assert live.scalar_one() == 120
    assert (row["phase"], row["cursor"], row["created"], row["error"]) == ("done", 0, 120, None)


def test_a_user_a_shifted_listing_skipped_is_still_repaired(store: Store, emu: EmulatorServer) -> None:
    """Fixed: the listing pages by offset, so a user deleted in Clerk mid-run (one already listed) moves
    every later user up by one: the user at the next page's first offset is never listed. The sweep asked
    Clerk about it and kept it (it is live) but threw the answer away, so its drift (a missed update) stayed
    while the run reported success. The sweep's answer repairs it now, under the same guarded upsert."""
    emu.emulator.bulk_create_users(120)
    with clerk_client(emu) as clerk:
        Reconciler(store, clerk, page_size=50).run()
        ordered = [u["id"] for u in emu.request("GET", "/v1/users", params={"limit": 500, "order_by": "+created_at"})]
        skipped, deleted = ordered[50], ordered[10]
        emu.request("PATCH", f"/v1/users/{skipped}", json={"first_name": "Grace"})  # its webhook was missed
        real = clerk.list_users

        def deleted_after_the_first_page(**kwargs: Any) -> Any:
            page = real(**kwargs)
            if kwargs.get("offset") == 0 and not kwargs.get("user_ids"):
                emu.request("DELETE", f"/v1/users/{deleted}")  # in Clerk, meanwhile: later offsets shift by one
            return page

        clerk.list_users = deleted_after_the_first_page  # type: ignore[method-assign]
        report = Reconciler(store, clerk, page_size=50, prefetch=1).run()
    with store.connect() as conn:
        name = conn.execute(sa.select(users.c.first_name).where(users.c.clerk_id == skipped)).scalar_one()
    assert name == "Grace"
    assert report.counts["users"].updated == 1 and report.counts["users"].deleted == 0
