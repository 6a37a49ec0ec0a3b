"""A reconcile run with a key of another Clerk instance writes nothing. Found by an adopter walkthrough (the
development key against the production database, the case the RUNBOOK warns about): the run imported the
other instance's users, organizations and memberships page by page (an admin among them, e-mails colliding
with real users') until the mass-delete guard stopped it at the end, the imported rows kept. Now the run asks
Clerk which instance the key belongs to (``GET /instance``) and compares it, before writing, with
``CLERK_INSTANCE_ID``, else the newest stored delivery's ``instance_id``, else an earlier run's. On SQLite,
PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from clerk_sync.errors import ClerkAPIError, ConfigError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store
from clerk_sync.tables import organization_memberships, organizations, reconcile_runs, users
from clerk_sync.testing import EmulatorServer
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import clerk_client

OURS, THEIRS = "ins_ours000000000000000000000", "ins_theirs0000000000000000000"


def _counts(store: Store) -> tuple[int, int, int]:
    with store.connect() as conn:
        return tuple(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()  # type: ignore[return-value]
                     for t in (users, organizations, organization_memberships))


@contextmanager
def _other_instance() -> Iterator[EmulatorServer]:
    with EmulatorServer(instance_id=THEIRS) as emu:
        ada = emu.create_user(email="ada@example.com")
        emu.create_organization("Theirs", created_by=ada["id"])
        emu.create_user(email="bob@example.com")
        yield emu


def test_a_key_of_another_instance_than_the_deliveries_writes_nothing(store: Store) -> None:
    event = f.envelope("user.created", f.user("user_ours", 1_800_000_000_000)) | {"instance_id": OURS}
    headers, body = f.signed(event, "msg_ours")
    assert WebhookProcessor(store, WebhookVerifier([f.SECRET])).process(headers, body).status == "applied"
    with _other_instance() as theirs, clerk_client(theirs) as clerk:
        for dry_run in (True, False):
            with pytest.raises(ConfigError, match=f"instance {THEIRS}.*mirrors {OURS}.*nothing was written"):
                Reconciler(store, clerk, page_size=50).run(dry_run=dry_run)
    assert _counts(store) == (1, 0, 0)  # only our own user


def test_the_setting_names_the_instance_and_lets_a_database_move_to_another(store: Store) -> None:
    with _other_instance() as theirs, clerk_client(theirs) as clerk:
        with pytest.raises(ConfigError, match="CLERK_INSTANCE_ID"):
            Reconciler(store, clerk, page_size=50, instance_id=OURS).run()
        assert _counts(store) == (0, 0, 0)
        report = Reconciler(store, clerk, page_size=50, instance_id=THEIRS).run()  # the operator says so
        assert report.counts["users"].created == 2


def test_an_earlier_run_names_the_instance_of_a_database_fed_by_reconcile_alone(store: Store) -> None:
    with EmulatorServer(instance_id=OURS) as ours, clerk_client(ours) as clerk:
        ours.create_user(email="ours@example.com")
        Reconciler(store, clerk, page_size=50).run()
    with store.connect() as conn:
        assert conn.execute(sa.select(reconcile_runs.c.details)).scalar_one()["instance_id"] == OURS
    with _other_instance() as theirs, clerk_client(theirs) as clerk, pytest.raises(ConfigError, match="earlier"):
        Reconciler(store, clerk, page_size=50).run()
    assert _counts(store) == (1, 0, 0)


def test_the_same_instance_reconciles_as_before(store: Store) -> None:
    with EmulatorServer(instance_id=OURS) as ours, clerk_client(ours) as clerk:
        ours.create_user(email="ours@example.com")
        event = f.envelope("user.created", f.user("user_x", 1_800_000_000_000)) | {"instance_id": OURS}
        headers, body = f.signed(event, "msg_x")
        WebhookProcessor(store, WebhookVerifier([f.SECRET])).process(headers, body)
        report = Reconciler(store, clerk, page_size=50).run()
    assert report.counts["users"].created == 1


@pytest.mark.parametrize(("status", "goes_on"), [(404, True), (403, True), (401, False), (429, False)])
def test_when_clerk_does_not_say_the_run_goes_on_and_when_it_refuses_the_run_stops(
        store: Store, emu: EmulatorServer, status: int, goes_on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An API without ``GET /instance`` (404) or a key without the permission (403) is not a verdict on the
    instance: the run goes on (the mass-delete guard still stands). A refused key (401) or a rate limit that
    outlasted the retries (429) would fail the first page anyway: the run stops there, writing nothing."""
    emu.create_user(email="ours@example.com")
    with clerk_client(emu) as clerk:
        def refused(**_: object) -> None:
            raise ClerkAPIError(f"GET /instance answered {status}", status=status, method="GET", path="/instance")

        monkeypatch.setattr(clerk, "get_instance", refused)
        reconciler = Reconciler(store, clerk, page_size=50, instance_id=OURS)
        if goes_on:
            assert reconciler.run().counts["users"].created == 1
        else:
            with pytest.raises(ClerkAPIError):
                reconciler.run()
            assert _counts(store) == (0, 0, 0)


EXAMPLE = "ins_2g7np7Hrk0SN6kj5EDMLDaKNL0S"  # Clerk's example payloads (the Dashboard's "Send Example")


def _deliver(store: Store, svix_id: str, instance_id: str) -> None:
    event = f.envelope("user.created", f.user(f"user_{svix_id}", 1_800_000_000_000)) | {"instance_id": instance_id}
    headers, body = f.signed(event, svix_id)
    assert WebhookProcessor(store, WebhookVerifier([f.SECRET])).process(headers, body).status == "applied"


def test_a_test_event_with_clerks_example_instance_does_not_name_the_instance(store: Store) -> None:
    """Review: one "Send Example" delivery (its instance_id is Clerk's example id) made every reconcile refuse
    the right key, with advice (use the key of the example instance) nobody can follow."""
    _deliver(store, "msg_example", EXAMPLE)
    with EmulatorServer(instance_id=OURS) as ours, clerk_client(ours) as clerk:
        ours.create_user(email="ours@example.com")
        report = Reconciler(store, clerk, page_size=50).run()
    assert report.counts["users"].created == 1


def test_a_newer_test_event_does_not_hide_the_instance_the_deliveries_name(store: Store) -> None:
    _deliver(store, "msg_ours", OURS)
    _deliver(store, "msg_example", EXAMPLE)
    with _other_instance() as theirs, clerk_client(theirs) as clerk, pytest.raises(
            ConfigError, match=f"mirrors {OURS} .*delivery, msg_ours; if that was a test event .*CLERK_INSTANCE_ID"):
        Reconciler(store, clerk, page_size=50).run()
    assert _counts(store) == (2, 0, 0)


def test_a_run_refused_at_the_instance_check_is_counted_failed(store: Store) -> None:
    """Review finding: the instance check ran before the run's bookkeeping, so a run refused there (another
    instance's key, Clerk down, a key revoked: every scheduled run) never moved
    ``clerk_sync_reconcile_runs_total{result="failed"}``; only the two-day staleness alerts would notice."""
    from clerk_sync.metrics import Metrics

    metrics = Metrics()
    with _other_instance() as theirs, clerk_client(theirs) as clerk:
        with pytest.raises(ConfigError, match="CLERK_INSTANCE_ID"):
            Reconciler(store, clerk, page_size=50, instance_id=OURS, metrics=metrics).run()
        theirs.set_faults(outage=True)
        with pytest.raises(ClerkAPIError):
            Reconciler(store, clerk, page_size=50, metrics=metrics).run()
    assert metrics.registry.get_sample_value("clerk_sync_reconcile_runs_total", {"result": "failed"}) == 2
    assert _counts(store) == (0, 0, 0)


def test_doctor_fails_a_key_of_another_instance_than_the_database_mirrors(db_url: str) -> None:
    """``doctor`` said "ok Clerk Backend API: reachable" for a development key against the production database,
    which every ``reconcile`` then refused (and JIT sync and promotions reached the other instance): it asks
    ``GET /instance`` and compares it as reconcile does now (CLI review). The same key with
    CLERK_INSTANCE_ID set to its instance, and a key of the mirrored instance, pass."""
    from clerk_sync.cli.doctor import run_checks
    from clerk_sync.config import Settings

    store = Store.from_url(db_url)
    event = f.envelope("user.created", f.user("user_ours", 1_800_000_000_000)) | {"instance_id": OURS}
    assert WebhookProcessor(store, WebhookVerifier([f.SECRET])).process(*f.signed(event, "msg_ours")).status == "applied"
    store.dispose()

    def clerk_line(emu: EmulatorServer, **extra: str) -> tuple[str, str]:
        settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": f.SECRET,
                                      "CLERK_SECRET_KEY": emu.secret_key, "CLERK_API_URL": emu.url, **extra})
        (check,) = [c for c in run_checks(settings) if c.name == "Clerk Backend API"]
        return check.status, check.detail

    with _other_instance() as theirs:
        status, detail = clerk_line(theirs)
        assert status == "fail", detail
        assert f"instance {THEIRS}, but this database mirrors {OURS}" in detail and "msg_ours" in detail, detail
        assert f"CLERK_INSTANCE_ID={THEIRS}" in detail and "reconcile" in detail, detail
        assert clerk_line(theirs, CLERK_INSTANCE_ID=THEIRS)[0] == "ok"
    with EmulatorServer(instance_id=OURS) as ours:
        status, detail = clerk_line(ours)
        assert status == "ok" and "reachable" in detail, detail

