"""Operations: /metrics read over real HTTP moves with deliveries, failures, DB errors, Clerk 429s, the
breaker, JIT fetches and reconcile runs; the alert rules only name series a live scrape has."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
import structlog.testing
import yaml
from prometheus_client.parser import text_string_to_metric_families

from clerk_sync import migrations
from clerk_sync.auth.users import JitUsers
from clerk_sync.changes import Hook
from clerk_sync.clerk_api import CircuitBreaker, ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.config import Settings
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import ClerkUnavailable, ConfigError, RateLimited, UserDeleted
from clerk_sync.events import user_record
from clerk_sync.freshness import check_freshness, database_probe
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.metrics import DatabaseSnapshot, Metrics, event_type_label
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store, create_engine
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET, FakeClock, clerk_client

DOCS = Path(__file__).resolve().parent.parent / "docs"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One GET /metrics, parsed: sample values by (name, labels), and the families' types."""

    def __init__(self, text: str) -> None:
        self.samples: Samples = {}
        self.families: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str) -> bool:
        return any(key[0] == name for key in self.samples)


def scrape(client: httpx.Client) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def _settings(db_url: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                              "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})


@pytest.fixture
def service(db_url: str) -> Iterator[tuple[httpx.Client, WebhookProcessor]]:
    settings = _settings(db_url)
    processor = build_processor(settings)
    app = create_app(settings, processor)
    processor.metrics.watch_database(database_probe(processor.store), ttl_s=0)  # no cache: each scrape reads
    with running(app) as url, httpx.Client(base_url=url) as client:
        yield client, processor
    processor.store.dispose()


def post(client: httpx.Client, event: dict[str, Any], svix_id: str, **kw: Any) -> httpx.Response:
    headers, body = f.signed(event, svix_id, **kw)
    return client.post("/webhooks/clerk", content=body, headers=headers)


def test_delivery_series_move_with_outcomes(service: tuple[httpx.Client, WebhookProcessor]) -> None:
    client, _ = service
    before = scrape(client)
    assert before.get("clerk_sync_database_up") == 1.0
    assert before.get("clerk_sync_failed_deliveries") == 0.0
    assert before.get("clerk_sync_newest_delivery_timestamp_seconds") == 0.0  # none yet: 0, so the alert fires

    sent_ms = int(time.time() * 1000) - 3000  # the event happened 3 s before we apply it
    event = f.envelope("user.created", f.user("user_m1", 1), timestamp=sent_ms)
    assert post(client, event, "msg_m1").json()["status"] == "applied"
    assert post(client, event, "msg_m1").json()["status"] == "duplicate"
    assert post(client, f.envelope("user.created", {"object": "user"}), "msg_m2").json()["status"] == "failed"
    assert post(client, f.envelope("made.up", {"id": "x"}), "msg_m3").json()["status"] == "ignored"
    headers, body = f.signed(f.envelope("user.created", f.user("user_m4", 1)), "msg_m4", secret="whsec_" + "A" * 32)
    assert client.post("/webhooks/clerk", content=body, headers=headers).status_code in (400, 401)

    after = scrape(client)
    assert after.get("clerk_sync_webhook_events_total", type="user.created", status="applied") == 1
    assert after.get("clerk_sync_webhook_events_total", type="user.created", status="duplicate") == 1
    assert after.get("clerk_sync_webhook_events_total", type="user.created", status="failed") == 1
    assert after.get("clerk_sync_webhook_events_total", type="other", status="ignored") == 1  # bounded label
    assert after.get("clerk_sync_webhook_refused_total", code="webhook_signature_invalid") == 1
    assert after.get("clerk_sync_apply_lag_seconds_count") == 1
    assert after.get("clerk_sync_apply_lag_seconds_sum") >= 3.0
    assert after.get("clerk_sync_failed_deliveries") == 1
    newest = after.get("clerk_sync_newest_delivery_timestamp_seconds")
    assert abs(newest - time.time()) < 60


def test_database_errors_answer_503_and_are_counted(db_url: str, service: tuple[httpx.Client, WebhookProcessor]) -> None:
    client, _ = service
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE webhook_events RENAME TO webhook_events_away"))
    try:
        response = post(client, f.envelope("user.created", f.user("user_db", 1)), "msg_db")
        assert response.status_code == 503
        first = scrape(client)
        broken = scrape(client)  # a failed read is counted while the first scrape is being rendered
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE webhook_events_away RENAME TO webhook_events"))
        engine.dispose()
    assert broken.get("clerk_sync_webhook_unavailable_total") == 1
    assert broken.get("clerk_sync_db_errors_total", operation="webhook") == 1
    # The scrape-time read finds the table gone under a current version: the schema's, not an outage (the
    # database answers: ClerkSyncSchemaNotCurrent, not ClerkSyncDatabaseDown; test_schema_tables_missing)
    assert (first.get("clerk_sync_database_up"), first.get("clerk_sync_schema_current")) == (1, 0)
    assert (broken.get("clerk_sync_database_up"), broken.get("clerk_sync_schema_current")) == (1, 0)
    assert scrape(client).get("clerk_sync_schema_current") == 1


def _client(emu: EmulatorServer, metrics: Metrics, **options: Any) -> ClerkClient:
    return clerk_client(emu, metrics=metrics, retry=RetryPolicy(attempts=1, rate_limited_attempts=0, deadline_s=5),
                        **options)


def test_clerk_api_jit_and_reconcile_series(emu: EmulatorServer, service: tuple[httpx.Client, WebhookProcessor]) -> None:
    client, processor = service
    metrics, store = processor.metrics, processor.store
    first, second, third = (emu.create_user(f"u{i}@example.com")["id"] for i in range(3))
    with _client(emu, metrics, breaker=CircuitBreaker(threshold=1, reset_s=3600)) as clerk:
        users = JitUsers(store, clerk=clerk, metrics=metrics)
        users.get_auth_user(first)
        with pytest.raises(UserDeleted):
            users.get_auth_user("user_nobody")
        emu.set_faults(rate_limit_requests=1, rate_limit_window_s=3600)  # the requests above used it up
        with pytest.raises(RateLimited):
            users.get_auth_user(second)
        limited = scrape(client)
        emu.set_faults(rate_limit_requests=1000, rate_limit_window_s=1.0, outage=True)
        clerk.budget = LocalBudget(RateLimit(1000, 1.0))  # lift the 429 penalty: the outage is the breaker's
        with pytest.raises(ClerkUnavailable):
            users.get_auth_user(third)
        broken = scrape(client)
    assert limited.get("clerk_sync_jit_fetches_total", outcome="stored") == 1
    assert limited.get("clerk_sync_jit_fetches_total", outcome="not_found") == 1
    assert limited.get("clerk_sync_jit_fetches_total", outcome="rate_limited") == 1
    assert limited.get("clerk_sync_clerk_api_requests_total", endpoint="/users/{id}", status="200") == 1
    assert limited.get("clerk_sync_clerk_api_requests_total", endpoint="/users/{id}", status="404") == 1
    assert limited.get("clerk_sync_clerk_api_requests_total", endpoint="/users/{id}", status="429") == 1
    assert limited.get("clerk_sync_clerk_api_rate_limited_total", endpoint="/users/{id}") == 1
    assert limited.get("clerk_sync_clerk_api_budget_tokens") < 0  # penalised for Retry-After
    assert limited.get("clerk_sync_clerk_api_circuit_open") == 0
    assert broken.get("clerk_sync_jit_fetches_total", outcome="unavailable") == 1
    assert broken.get("clerk_sync_clerk_api_circuit_open") == 1
    assert broken.get("clerk_sync_clerk_api_budget_tokens") > 0  # the gauge reads the client's current budget

    emu.set_faults(outage=False)
    assert not scrape(client).has("clerk_sync_reconcile_last_success_timestamp_seconds")
    with clerk_client(emu, metrics=metrics) as clerk:
        Reconciler(store, clerk, metrics=metrics).run()
    after = scrape(client)
    assert after.get("clerk_sync_reconcile_runs_total", result="completed") == 1
    assert after.get("clerk_sync_reconcile_drift_total", entity="users", action="created") == 2  # second, third
    assert after.get("clerk_sync_reconcile_last_drift", action="created") == 2
    assert abs(after.get("clerk_sync_reconcile_last_success_timestamp_seconds") - time.time()) < 60
    assert after.get("clerk_sync_clerk_api_circuit_open") == 0  # the newest client is watched


def test_hook_series_move_with_the_outbox_and_the_dispatcher(db_url: str) -> None:
    """The outbox backlog by status (read from the database at scrape time) and the dispatcher's runs by
    hook and outcome, with their durations, as a live scrape of a hooked service shows them."""
    from datetime import UTC, datetime, timedelta

    from clerk_sync.changes import Change, Hook
    from clerk_sync.hooks import Backoff, Dispatcher
    from clerk_sync.store import Store

    def flaky(change: Change) -> None:
        if change.clerk_id == "user_bounce":
            raise RuntimeError("mail server down")

    clock = FakeClock()
    moment = [datetime.now(UTC)]
    settings = _settings(db_url)
    store = Store(create_engine(db_url), hooks=[Hook("welcome", flaky, on=["user.created"])], now=lambda: moment[0])
    processor = build_processor(settings, store)
    app = create_app(settings, processor)
    processor.metrics.watch_database(database_probe(store), ttl_s=0, clock=clock)
    dispatcher = Dispatcher(store, backoff=Backoff(max_attempts=2, base_s=10), metrics=processor.metrics,
                            now=lambda: moment[0])
    with running(app) as url, httpx.Client(base_url=url) as client:
        before = scrape(client)
        for user in ("user_ok", "user_bounce"):
            assert post(client, f.envelope("user.created", f.user(user, 1)), f"msg_{user}").status_code == 200
        queued = scrape(client)
        dispatcher.run_once()  # user_ok runs, user_bounce fails once (retry in 10 s)
        backing_off = scrape(client)
        moment[0] += timedelta(seconds=11)
        dispatcher.run_once()  # user_bounce fails again: dead
        after = scrape(client)
    store.dispose()
    assert before.get("clerk_sync_hook_jobs", status="pending") == 0
    assert not before.has("clerk_sync_hook_oldest_pending_timestamp_seconds")
    assert queued.get("clerk_sync_hook_jobs", status="pending") == 2
    assert abs(queued.get("clerk_sync_hook_oldest_pending_timestamp_seconds") - moment[0].timestamp()) < 60
    # review: a job waiting on its backoff is not a stopped dispatcher (the series is for that)
    assert backing_off.get("clerk_sync_hook_jobs", status="pending") == 1
    assert not backing_off.has("clerk_sync_hook_oldest_pending_timestamp_seconds")
    assert (after.get("clerk_sync_hook_jobs", status="pending"), after.get("clerk_sync_hook_jobs", status="dead")) \
        == (0, 1)
    runs = {o: after.get("clerk_sync_hook_runs_total", hook="welcome", outcome=o) for o in ("ok", "retry", "dead")}
    assert runs == {"ok": 1, "retry": 1, "dead": 1}
    assert after.get("clerk_sync_hook_seconds_count", hook="welcome") == 3
    assert after.families["clerk_sync_hook_jobs"] == "gauge"


def test_jobs_a_dead_dispatcher_held_count_as_due(db_url: str) -> None:
    """Review: only pending jobs were due. Jobs a dispatcher claimed, then died holding (OOM, SIGKILL, a worker not
    restarted), are claimed again only by a running dispatcher once their lease runs out; with none running they
    waited for ever while the oldest-due series, ClerkSyncHooksBehind and ``doctor --freshness`` said nothing."""
    from datetime import UTC, datetime, timedelta

    from clerk_sync._time import aware
    from clerk_sync.freshness import read_snapshot
    from clerk_sync.tables import hook_jobs

    moment = [datetime.now(UTC)]
    store = Store(create_engine(db_url), hooks=[Hook("welcome", lambda change: None)], now=lambda: moment[0])
    processor = build_processor(_settings(db_url), store)
    with running(create_app(_settings(db_url), processor)) as url, httpx.Client(base_url=url) as client:
        assert post(client, f.envelope("user.created", f.user("user_held", 1)), "msg_held").status_code == 200
    with store.transaction() as writer:  # as a dispatcher leaves it when killed inside its handler
        writer.conn.execute(hook_jobs.update().values(status="running", lease_until=moment[0] + timedelta(minutes=5)))
    assert read_snapshot(store).hook_oldest_pending_at is None  # its lease holds: a handler still running
    moment[0] += timedelta(hours=1)  # the lease long run out, no dispatcher took it again
    snap = read_snapshot(store)
    with store.connect() as conn:
        created = conn.execute(sa.select(hook_jobs.c.created_at)).scalar_one()
    assert snap.hook_jobs["running"] == 1 and snap.hook_oldest_pending_hook == "welcome"
    assert snap.hook_oldest_pending_at is not None and abs(snap.hook_oldest_pending_at - aware(created).timestamp()) < 1
    (hooks,) = [c for c in check_freshness(snap, now=moment[0].timestamp(), max_delivery_age_s=None, max_failed=0,
                                           max_reconcile_age_s=86400) if c.name == "hook jobs"]
    assert hooks.status == "fail" and "the oldest due job (hook 'welcome') has waited" in hooks.detail, hooks
    store.dispose()


def test_database_series_are_cached_between_scrapes() -> None:
    reads: list[int] = []
    clock = FakeClock()

    def probe() -> DatabaseSnapshot:
        reads.append(1)
        return DatabaseSnapshot(None, len(reads), None)

    metrics = Metrics()
    metrics.watch_database(probe, ttl_s=5, clock=clock)
    values = []
    for step in (0, 1, 5):
        clock.t += step
        values.append(Scrape(metrics.render().decode()).get("clerk_sync_failed_deliveries"))
    assert values == [1, 1, 2]


def test_event_type_label_is_bounded() -> None:
    assert event_type_label("user.created") == "user.created"
    assert event_type_label("session.created") == "session.created"
    assert event_type_label("x" * 200) == "other"


def test_freshness_checks() -> None:
    now = 1_000_000.0
    fresh = DatabaseSnapshot(now - 10, 0, now - 60, {"created": 0, "updated": 0, "deleted": 0})
    assert [c.status for c in check_freshness(fresh, now=now, max_delivery_age_s=600, max_failed=0,
                                              max_reconcile_age_s=3600)] == ["ok", "ok", "ok", "ok"]
    stale = DatabaseSnapshot(now - 7200, 3, now - 60, {"created": 2, "updated": 0, "deleted": 0})
    checks = check_freshness(stale, now=now, max_delivery_age_s=600, max_failed=0, max_reconcile_age_s=3600)
    assert [c.status for c in checks] == ["fail", "fail", "warn", "ok"]
    assert "clerk-sync replay" in checks[1].detail


# -- alert rules ------------------------------------------------------------------------------------
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DOCS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_name_only_live_series(emu: EmulatorServer, service: tuple[httpx.Client, WebhookProcessor]) -> None:
    client, processor = service
    assert post(client, f.envelope("user.created", f.user("user_alert", 1)), "msg_alert").status_code == 200
    hooked = Store(processor.store.engine, hooks=[Hook("alert", lambda change: None)])  # a due job: its series
    with hooked.transaction() as writer:
        writer.apply(Upsert(Entity.USER, user_record(f.user("user_hooked", 1))))
    with clerk_client(emu, metrics=processor.metrics) as clerk:
        Reconciler(processor.store, clerk, metrics=processor.metrics).run()
    live = scrape(client)
    exposed = {name + suffix for name, kind in live.families.items() for suffix in _SUFFIXES.get(kind, ("",))}
    rules = _alert_rules()
    runbook = (DOCS / "RUNBOOK.md").read_text()
    assert len(rules) >= 5
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"page", "ticket"}
        names = set(re.findall(r"\bclerk_sync_[a-z_]+", rule["expr"]))
        assert names, rule["alert"]
        assert names <= exposed, (rule["alert"], names - exposed)
        assert f"## {rule['alert']}" in runbook, f"RUNBOOK.md has no section for {rule['alert']}"
        # Per install (the `job` label): one Prometheus scraping prod and staging must not let one hide the
        # other (promtool's test of that: tests/test_telemetry_alerts_metrics_and_spans.py)
        expr = " ".join(rule["expr"].split())
        assert not re.search(r"\b(sum|max|min|avg|count|absent)\s*\(", expr), (rule["alert"], "ungrouped", expr)
        assert "on()" not in expr, (rule["alert"], expr)
        assert all(g.split(",")[0].strip() == "job" for g in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr)), expr
    needed = {"ClerkSyncNoDeliveriesWhileDrift", "ClerkSyncFailedBacklogGrowing", "ClerkSyncApplyLagHigh",
              "ClerkSyncHooksBehind",
              "ClerkSyncClerkRateLimited", "ClerkSyncClerkCircuitOpen", "ClerkSyncAuthClockSkew", "ClerkSyncAuthKeyUnknown"}
    assert needed <= {r["alert"] for r in rules}
    # the authentication series (the app's process: every registry has them at 0, serve's scrape too)
    assert {"clerk_sync_auth_authenticated_total", "clerk_sync_auth_refused_total",
            "clerk_sync_jwks_fetches_total"} <= exposed


def test_one_log_line_per_delivery_at_the_chosen_level(db_url: str) -> None:
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_DELIVERY_LOG_LEVEL": "debug"})
    processor = build_processor(settings)
    headers, body = f.signed(f.envelope("user.created", f.user("user_log", 1)), "msg_log")
    with structlog.testing.capture_logs() as lines:
        processor.process(headers, body)
    processor.store.dispose()
    (line,) = [entry for entry in lines if entry["event"] == "webhook"]
    assert line["log_level"] == "debug"
    assert (line["svix_id"], line["event_type"], line["status"]) == ("msg_log", "user.created", "applied")
    assert line["seconds"] > 0


def test_the_delivery_line_is_written_under_an_apps_generic_structlog_wrapper(db_url: str) -> None:
    """An app may configure structlog with the generic ``BoundLogger``, which has ``info()`` and friends but
    no ``log(level, ..)``: the line is written (``log(level, ..)`` raised there, after the commit)."""
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_DELIVERY_LOG_LEVEL": "info"})
    processor = build_processor(settings)
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.BoundLogger, cache_logger_on_first_use=False)
    try:
        with structlog.testing.capture_logs() as lines:
            outcome = processor.process(*f.signed(f.envelope("user.created", f.user("user_wrap", 1)), "msg_wrap"))
    finally:
        structlog.configure(**saved)
        processor.store.dispose()
    assert outcome.status == "applied"
    assert [line["svix_id"] for line in lines if line["event"] == "webhook"] == ["msg_wrap"]


def test_by_default_the_delivery_line_is_debug_a_failed_one_a_warning_and_a_summary_says_what_went_through(
        db_url: str) -> None:
    """serve's defaults: no INFO line per delivery (it cost ~10 % of the throughput); a failed delivery is
    said at WARNING whatever the level; an INFO line counts the outcomes at once for the first delivery
    (a test event is seen in the log), then at most once a minute (the injected clock)."""
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    assert (settings.delivery_log_level, settings.delivery_summary_s) == ("DEBUG", 60.0)
    clock = FakeClock()
    wired = build_processor(settings)
    processor = WebhookProcessor(wired.store, wired.verifier, log_level=settings.delivery_log_level,
                                 summary_s=settings.delivery_summary_s, clock=clock)
    unusable = {**f.user("user_sum_bad", 1), "id": "user_" + "x" * 80}  # signed, but no id a row can have: failed
    deliveries = [(f.envelope("user.created", f.user("user_sum", 1)), "msg_sum_1"),
                  (f.envelope("user.created", f.user("user_sum", 1)), "msg_sum_1"),  # a retry: duplicate
                  (f.envelope("user.updated", f.user("user_sum", 2)), "msg_sum_2"),
                  (f.envelope("user.created", unusable), "msg_sum_3")]
    with structlog.testing.capture_logs() as lines:
        for event, svix_id in deliveries:
            processor.process(*f.signed(event, svix_id))
        assert len([line for line in lines if line["event"] == "webhooks"]) == 1  # the first, then not in the minute
        clock.t += 61
        processor.process(*f.signed(f.envelope("user.updated", f.user("user_sum", 3)), "msg_sum_4"))
        clock.t += 30
        processor.process(*f.signed(f.envelope("user.updated", f.user("user_sum", 4)), "msg_sum_5"))
        clock.t += 29.9  # 59.9 s after the last summary: still none
        processor.process(*f.signed(f.envelope("user.updated", f.user("user_sum", 5)), "msg_sum_6"))
        clock.t += 5
        processor.flush_summary()  # serve stopping: the last seconds are said too, once
        processor.flush_summary()
    processor.store.dispose()
    per_delivery = [line for line in lines if line["event"] == "webhook"]
    assert [(line["svix_id"], line["status"], line["log_level"]) for line in per_delivery] == [
        ("msg_sum_1", "applied", "debug"), ("msg_sum_1", "duplicate", "debug"), ("msg_sum_2", "applied", "debug"),
        ("msg_sum_3", "failed", "warning"), ("msg_sum_4", "applied", "debug"), ("msg_sum_5", "applied", "debug"),
        ("msg_sum_6", "applied", "debug")]
    assert "Clerk ids have at most 64" in per_delivery[3]["error"]
    first, second, last = [line for line in lines if line["event"] == "webhooks"]
    assert first["log_level"] == second["log_level"] == last["log_level"] == "info"
    assert {k: last.get(k) for k in ("seconds", "deliveries", "applied", "failed")} == {
        "seconds": 64.9, "deliveries": 2, "applied": 2, "failed": None}
    assert {k: first.get(k) for k in ("seconds", "deliveries", "applied", "duplicate")} == {
        "seconds": 0.0, "deliveries": 1, "applied": 1, "duplicate": None}
    assert {k: second[k] for k in ("seconds", "deliveries", "applied", "duplicate", "failed")} == {
        "seconds": 61.0, "deliveries": 4, "applied": 2, "duplicate": 1, "failed": 1}


def test_the_summary_line_is_not_about_the_request_that_happens_to_log_it(db_url: str) -> None:
    """Flask and Django bind the delivery's svix_id to the request's logging context; the summary line
    counts many deliveries and must not carry the id of the one that logged it."""
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    processor = build_processor(settings)
    with (structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as lines,
          structlog.contextvars.bound_contextvars(service="billing"),  # the app's own, kept
          structlog.contextvars.bound_contextvars(svix_id="msg_ctx_1")):
        processor.process(*f.signed(f.envelope("user.created", f.user("user_ctx", 1)), "msg_ctx_1"))
        assert structlog.contextvars.get_contextvars()["svix_id"] == "msg_ctx_1"  # unbound for the line only
    processor.store.dispose()
    (summary,) = [line for line in lines if line["event"] == "webhooks"]
    (delivery,) = [line for line in lines if line["event"] == "webhook"]
    assert "svix_id" not in summary and summary["deliveries"] == 1 and summary["service"] == "billing"
    assert delivery["svix_id"] == "msg_ctx_1"


def test_serve_says_the_last_deliveries_when_it_stops(db_url: str) -> None:
    """The deliveries counted since the last summary line are said when the service stops, not lost."""
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    processor = build_processor(settings)
    with (structlog.testing.capture_logs() as lines,
          running(create_app(settings, processor), lifespan="on") as url, httpx.Client(base_url=url) as client):
        for n in range(3):
            headers, body = f.signed(f.envelope("user.created", f.user(f"user_stop_{n}", 1)), f"msg_stop_{n}")
            assert client.post("/webhooks/clerk", content=body, headers=headers).json()["status"] == "applied"
        assert [line["deliveries"] for line in lines if line["event"] == "webhooks"] == [1]  # the first, at once
    processor.store.dispose()
    assert [(line["deliveries"], line.get("applied")) for line in lines if line["event"] == "webhooks"] == [
        (1, 1), (2, 2)]


def test_an_unknown_log_level_is_named() -> None:
    with pytest.raises(ConfigError, match="CLERK_SYNC_DELIVERY_LOG_LEVEL"):
        Settings.from_env({"CLERK_SYNC_DELIVERY_LOG_LEVEL": "loud"})


def test_readme_metrics_snippet_runs(db_url: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_usage", Path(__file__).parent / "typing" / "readme_usage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SECRET_KEY": "sk_test_readme"})
    text = module.observe(settings).decode()
    assert "clerk_sync_database_up 1.0" in text
    assert "clerk_sync_clerk_api_circuit_open 0.0" in text


def test_the_delivery_that_never_arrives_is_caught(db_url: str, emu: EmulatorServer) -> None:
    """The public incident: Svix disabled the endpoint, the handler saw nothing. The freshness series,
    reconcile's drift and ``doctor --freshness`` still tell."""
    from clerk_sync.cli.doctor import run_freshness

    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": emu.webhook_secret,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0", "CLERK_SYNC_FRESHNESS_MAX_DELIVERY_AGE_S": "1800"})
    processor = build_processor(settings)
    app = create_app(settings, processor)
    processor.metrics.watch_database(database_probe(processor.store), ttl_s=0)
    with running(app) as url, httpx.Client(base_url=url) as client:
        emu.set_webhook_url(url + "/webhooks/clerk")
        emu.create_user("first@example.com")
        emu.wait_for_deliveries()
        emu.set_webhook_url(None)  # the endpoint is disabled: nothing arrives any more
        emu.create_user("second@example.com")
        with clerk_client(emu, metrics=processor.metrics) as clerk:
            Reconciler(processor.store, clerk, metrics=processor.metrics).run()
        live = scrape(client)
    processor.store.dispose()
    # ClerkSyncNoDeliveriesWhileDrift, evaluated half an hour later.
    later = time.time() + 2 * 1800
    assert later - live.get("clerk_sync_newest_delivery_timestamp_seconds") > 1800
    assert sum(live.get("clerk_sync_reconcile_last_drift", action=a) for a in ("created", "updated", "deleted")) == 1
    checks = {c.name: c for c in run_freshness(settings, now=lambda: later)}
    assert checks["newest delivery"].status == "fail"
    assert "Clerk Dashboard" in checks["newest delivery"].detail
    assert checks["last reconcile"].status == "warn" and "missed" in checks["last reconcile"].detail


def test_a_process_that_exits_says_the_deliveries_since_the_last_summary_line(tmp_path: Path) -> None:
    """WSGI servers (gunicorn, uWSGI) have no shutdown hook for the app: the counts are said at
    interpreter exit, from a real process that applies three deliveries and returns."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
        "from clerk_sync.config import Settings\n"
        "from clerk_sync.integrations.starlette import build_processor\n"
        "from clerk_sync.migrations import upgrade\n"
        "from tests import factories as f\n"
        f"settings = Settings.from_env({{'DATABASE_URL': {f'sqlite:///{tmp_path}/exit.db'!r}, "
        f"'CLERK_WEBHOOK_SIGNING_SECRET': {SECRET!r}}})\n"
        "processor = build_processor(settings)\n"
        "upgrade(processor.store.engine)\n"
        "for n in range(3):\n"
        "    processor.process(*f.signed(f.envelope('user.created', f.user(f'user_exit_{n}', 1)), f'msg_exit_{n}'))\n"
        "print('done', flush=True)\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    summaries = [line for line in run.stdout.splitlines() if "webhooks" in line and "deliveries=" in line]
    assert len(summaries) == 2, run.stdout  # the first delivery at once, the other two at exit
    assert "deliveries=1" in summaries[0] and "deliveries=2" in summaries[1] and "applied=2" in summaries[1]
    assert run.stdout.index("done") < run.stdout.index(summaries[1])


def test_the_services_console_counts_its_clerk_calls_in_the_services_metrics(
        tmp_path: Path, emulator: EmulatorServer) -> None:
    """Review finding: the console's Clerk client (drift, promotion) was built without the service's
    metrics, so in ``serve`` the breaker and budget series never moved and their alerts could not fire."""
    settings = Settings.from_env({
        "DATABASE_URL": f"sqlite:///{tmp_path}/c.db", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
        "CLERK_SYNC_PRUNE_INTERVAL_S": "0", "CLERK_SYNC_CONSOLE": "1", "CLERK_SYNC_CONSOLE_TOKEN": "op-token-0123456789",
        "CLERK_SECRET_KEY": "sk_test_console", "CLERK_API_URL": emulator.url})
    processor = build_processor(settings)
    migrations.upgrade(processor.store.engine)
    app = create_app(settings, processor)
    with running(app) as url, httpx.Client(base_url=url) as client:
        tokens = scrape(client).get("clerk_sync_clerk_api_budget_tokens")
        assert tokens > 0  # the console client's local budget, read at scrape time (0: nobody watched)
        response = client.post("/console/drift/run", data={"mode": "dry_run"},
                               headers={"Authorization": "Bearer op-token-0123456789"})
        assert response.status_code < 400, response.text[:300]
        deadline = time.monotonic() + 30  # (the drift job may still run; this only bounds a stuck test)
        while not (calls := sum(v for (name, _), v in scrape(client).samples.items()
                                if name == "clerk_sync_clerk_api_requests_total")):
            assert time.monotonic() < deadline, "no Clerk API call counted"
            time.sleep(0.05)
        assert calls > 0  # counted in the service's metrics (the budget refills too fast to compare)
    processor.store.dispose()
