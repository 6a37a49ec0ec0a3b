"""``doctor --freshness`` and the delivery's telemetry: a quiet install is not a
stale one, a stopped dispatcher or dead hook jobs fail the check, a newest delivery stamped in the future
says the clocks disagree, and a crash's message (which may quote the person) stays out of ``last_error``."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from clerk_sync.changes import Hook
from clerk_sync.engine import Entity, Upsert
from clerk_sync.events import user_record
from clerk_sync.freshness import MISSED_AFTER_S, check_freshness
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.metrics import DatabaseSnapshot
from clerk_sync.store import Store
from clerk_sync.tables import webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_cli import run

NOW = 1_000_000.0
LIMITS = {"max_delivery_age_s": None, "max_failed": 0, "max_reconcile_age_s": 2 * 86400}
CLEAN = {"created": 0, "updated": 0, "deleted": 0}
DRIFT = {"created": 1, "updated": 0, "deleted": 0}


def _checks(snap: DatabaseSnapshot, **limits: object) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.detail) for c in check_freshness(snap, now=NOW, **{**LIMITS, **limits})}  # type: ignore[arg-type]


def test_a_quiet_night_is_not_stale() -> None:
    """Fixed: the newest delivery older than 3600 s failed by default: a B2B app without sign-ups for two
    hours paged all night, where the alert rules deliberately do not."""
    quiet = DatabaseSnapshot(NOW - 8 * 3600, 0, NOW - 3600, CLEAN)
    assert {name: status for name, (status, _) in _checks(quiet).items()} == {
        "newest delivery": "ok", "failed deliveries": "ok", "last reconcile": "ok", "hook jobs": "ok"}
    # a reconcile that repaired a row in flight, the delivery arriving as it ran: still not an outage
    in_flight = DatabaseSnapshot(NOW - 8 * 3600, 0, NOW - 8 * 3600 + 5, DRIFT)
    assert _checks(in_flight)["newest delivery"][0] == "ok"
    # an app whose users change all day opts in to the plain age
    assert _checks(quiet, max_delivery_age_s=3600)["newest delivery"][0] == "fail"


def test_a_long_reconcile_that_repaired_a_change_in_flight_is_not_a_missed_delivery() -> None:
    """Review: measured from the run's end, a 45-minute reconcile that repaired a change whose delivery came
    one second after the run started failed (ClerkSyncNoDeliveriesWhileDrift paged): from its start now."""
    started = NOW - 3000
    long_run = DatabaseSnapshot(started + 1, 0, started + 2700, DRIFT, reconcile_last_started_at=started)
    assert _checks(long_run)["newest delivery"][0] == "ok"
    missed = DatabaseSnapshot(started - MISSED_AFTER_S - 60, 0, started + 2700, DRIFT, reconcile_last_started_at=started)
    status, detail = _checks(missed)["newest delivery"]
    assert status == "fail" and f"started {MISSED_AFTER_S + 60:.0f}s after it" in detail, detail


def test_deliveries_missed_while_reconcile_repairs_fail_as_the_alert_does() -> None:
    """ClerkSyncNoDeliveriesWhileDrift: the last reconcile repaired rows and finished more than 30 min after
    the newest delivery (a snapshot without the run's start, as a test's)."""
    missed = DatabaseSnapshot(NOW - 7200, 0, NOW - 7200 + MISSED_AFTER_S + 60, DRIFT)
    status, detail = _checks(missed)["newest delivery"]
    assert status == "fail" and "deliveries are missed" in detail and "Clerk Dashboard" in detail
    just_under = DatabaseSnapshot(NOW - 7200, 0, NOW - 7200 + MISSED_AFTER_S - 60, DRIFT)
    assert _checks(just_under)["newest delivery"][0] == "ok"


def test_a_delivery_stamped_in_the_future_says_the_clocks_disagree() -> None:
    """Fixed: the serving host's clock 2 h ahead made a dead endpoint read ``ok, -600s ago``."""
    ahead = DatabaseSnapshot(NOW + 600, 0, NOW - 60, CLEAN)
    status, detail = _checks(ahead, max_delivery_age_s=3600)["newest delivery"]
    assert status == "warn" and "600s in the future" in detail and "clock" in detail
    slightly = DatabaseSnapshot(NOW + 5, 0, NOW - 60, CLEAN)  # within the tolerance: ok, 0 s
    assert _checks(slightly)["newest delivery"] == ("ok", "0s ago")


@pytest.mark.parametrize(("jobs", "oldest", "want", "says"), [
    ({"pending": 3, "running": 0, "dead": 0}, NOW - 60, "ok", "3 pending, 0 running, 0 dead"),
    ({"pending": 5000, "running": 0, "dead": 0}, NOW - 6 * 3600, "fail", "is a dispatcher running"),
    ({"pending": 0, "running": 0, "dead": 40}, None, "fail", "clerk-sync hooks retry"),
    ({}, None, "ok", "0 pending, 0 running, 0 dead"),
], ids=["keeping-up", "no-dispatcher", "dead-jobs", "no-hooks"])
def test_hook_jobs_behind_or_dead_fail(jobs: dict[str, int], oldest: float | None, want: str, says: str) -> None:
    """Fixed: 5,000 due jobs waiting for six hours and 40 dead jobs read ok, ok, ok (exit 0): a cron user
    without Prometheus never learnt what ClerkSyncHooksBehind and ClerkSyncHookJobsDead say."""
    snap = DatabaseSnapshot(NOW - 10, 0, NOW - 60, CLEAN, hook_jobs=jobs, hook_oldest_pending_at=oldest)
    status, detail = _checks(snap)["hook jobs"]
    assert status == want and says in detail, detail


def test_doctor_freshness_fails_on_a_dispatcher_that_does_not_run(tmp_path: Path) -> None:
    """From the database, through the command a cron job runs: a due job older than the limit exits 1."""
    url = f"sqlite:///{tmp_path / 'hooks.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    store = Store.from_url(url, hooks=[Hook("mail", lambda change: None)])
    with store.transaction() as writer:
        writer.apply(Upsert(Entity.USER, user_record(f.user("user_h", 5))))
    store.dispose()
    env = {"DATABASE_URL": url}
    fresh = run("doctor", "--freshness", env=env)
    assert fresh.returncode == 0 and "hook jobs: 1 pending" in fresh.stdout, fresh.stdout + fresh.stderr
    stale = run("doctor", "--freshness", env={**env, "CLERK_SYNC_FRESHNESS_MAX_HOOK_WAIT_S": "0.001"})
    assert stale.returncode == 1 and "is a dispatcher running" in stale.stdout, stale.stdout + stale.stderr


def test_a_crash_on_the_apply_path_keeps_only_its_type(db_url: str, verifier: WebhookVerifier,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: ``apply raised KeyError: 'ann@example.com'`` went into ``last_error``, the delivery's log line
    and its span, which an erasure does not reach: app code's message may quote the person."""
    store = Store.from_url(db_url)
    processor = WebhookProcessor(store, verifier)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyError("ann@example.com")

    monkeypatch.setattr(processor, "apply_in", crash)
    headers, body = f.signed(f.envelope("user.created", f.user("user_c", 5)), "msg_crash")
    outcome = processor.process(headers, body)
    with store.connect() as conn:
        error = conn.execute(sa.select(webhook_events.c.last_error)
                             .where(webhook_events.c.svix_id == "msg_crash")).scalar_one()
    store.dispose()
    assert outcome.status == "failed" and outcome.error == error
    assert "KeyError" in error and "ann@" not in error, error


def test_a_blank_delivery_age_limit_is_unset() -> None:
    """Fixed: unset is how the age check is turned off, and ``VAR=`` (a template's empty value) was a
    settings error for every command."""
    from clerk_sync.config import Settings

    assert Settings.from_env({"CLERK_SYNC_FRESHNESS_MAX_DELIVERY_AGE_S": " "}).freshness_max_delivery_age_s is None
    assert Settings.from_env({"CLERK_SYNC_FRESHNESS_MAX_DELIVERY_AGE_S": "600"}).freshness_max_delivery_age_s == 600
