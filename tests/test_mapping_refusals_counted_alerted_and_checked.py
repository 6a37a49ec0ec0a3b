"""Rows the app's mapped table refuses are seen: counted, alerted on, and failed by ``doctor --freshness``.

Fixed (adopter walkthrough, 2026-12-05): a mapped ``accounts`` table whose ``id`` gets no default on
PostgreSQL and MariaDB (the README's snippet) refused every new user's row. By design the change still
applied to clerk-sync's tables and the delivery answered 200 ``applied``; the only trace was a WARNING log
line ``mapped_row_refused``: no series in ``/metrics``, ``doctor --freshness`` all ok (exit 0), no alert. Now
``clerk_sync_mapped_rows_refused_total{table, entity, reason}`` counts them (once the refusing transaction
commits), ClerkSyncMappedRowsRefused fires on any in 15 minutes, and ``doctor --freshness`` fails on one
received in the last hour (a warning for the rest of a day), naming the delivery and what to run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from clerk_sync.config import Settings
from clerk_sync.engine import Entity, Upsert
from clerk_sync.events import user_record
from clerk_sync.freshness import check_freshness
from clerk_sync.ingest import replay_deliveries
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.mapping import MappedTable, SchemaMapping
from clerk_sync.metrics import DatabaseSnapshot, Metrics
from clerk_sync.tables import users, webhook_events
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET
from tests.test_cli import run
from tests.test_mapping import _with_app_table
from tests.test_telemetry_alerts_metrics_and_spans import ALERTS, _fires, _run_rule_tests, _series

ROOT = Path(__file__).resolve().parent.parent
SERIES = "clerk_sync_mapped_rows_refused_total"
NOW = 1_000_000.0
LIMITS: dict[str, Any] = {"max_delivery_age_s": None, "max_failed": 0, "max_reconcile_age_s": 2 * 86400}


def _accounts(name: str) -> tuple[sa.Table, SchemaMapping]:
    """The app's table with a NOT NULL column of its own the mapping does not fill (no default): every new
    user's row is refused, on every store (the README snippet's ``id`` did that on PostgreSQL and MariaDB)."""
    table = sa.Table(name, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(320)),
                     sa.Column("plan", sa.String(16), nullable=False))
    return table, SchemaMapping(users=MappedTable(name, "clerk_user_id", {"email": "email"}))


def _refused(text: str, table: str, *, reason: str = "constraint", entity: str = "users") -> float:
    """The counter's value for ``table`` in one exposition text (0: no sample)."""
    want = {"table": table, "entity": entity, "reason": reason}
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == SERIES and s.labels == want)


def _counted(table: str, **labels: str) -> float:
    """What a fresh Metrics instance of this process shows (every instance registers the process's counter)."""
    return _refused(Metrics().render().decode(), table, **labels)


def _settings(db_url: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                              "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})


# -- 1. the real webhook path: counted in /metrics, failed by doctor --freshness --------------------------------

def test_a_refused_row_is_counted_on_metrics_and_fails_doctor_freshness(db_url: str) -> None:
    """A signed user.created through ``serve``'s app: 200 ``applied``, no row in the app's table, and now the
    refusal shows on ``/metrics`` (table, entity, reason) and in ``doctor --freshness`` (exit 1), which names
    the delivery, the database's words and what to run."""
    table, mapping = _accounts("mr_accounts")
    store, engine = _with_app_table(db_url, table, mapping)
    settings = _settings(db_url)
    processor = build_processor(settings, store)
    app = create_app(settings, processor)
    env = {"DATABASE_URL": db_url}
    try:
        before = run("doctor", "--freshness", env=env)
        assert before.returncode == 0, before.stdout + before.stderr
        with running(app) as url, httpx.Client(base_url=url) as client:
            start = _refused(client.get("/metrics").text, "mr_accounts")
            headers, body = f.signed(f.envelope("user.created", f.user("user_mr1", 1000, email="mr1@example.com")),
                                     "msg_mr1")
            answer = client.post("/webhooks/clerk", content=body, headers=headers)
            assert answer.status_code == 200 and answer.json()["status"] == "applied", answer.text
            scraped = client.get("/metrics").text
        assert _refused(scraped, "mr_accounts") == start + 1, scraped
        with engine.connect() as conn:  # (the refusal is real: clerk-sync has the user, the app's table not)
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 0
        with store.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM users WHERE clerk_id = 'user_mr1'")).scalar_one() == 1

        found = run("doctor", "--freshness", env=env)
        out = found.stdout
        assert found.returncode == 1, out + found.stderr
        (line,) = [x for x in out.splitlines() if "mapped rows:" in x]
        assert line.startswith("FAIL"), out
        assert "1 delivery in the last 24h" in line and "(msg_mr1: mr_accounts refused user.created for user_mr1" in line, line
        assert "plan" in line, line  # the database's own words name the column
        assert "clerk-sync doctor --mapping" in line and "--backfill" in line, line
        assert "mr1@example.com" not in line  # the database's first line: never the values
    finally:
        store.dispose()
        engine.dispose()


def test_a_refusal_counts_once_when_its_transaction_commits(db_url: str) -> None:
    """A unit of work rolled back after the refusal (a batch split up, a retry after a transient failure)
    counts nothing; written again and committed, it counts once."""
    table, mapping = _accounts("mr_once")
    store, engine = _with_app_table(db_url, table, mapping)
    upsert = Upsert(Entity.USER, user_record(f.user("user_once", 1000, email="once@example.com")))
    start = _counted("mr_once")
    seen: list[str] = []

    def refused_then_rolled_back() -> None:
        with store.transaction() as writer:
            writer.apply(upsert)
            seen.extend(writer.refused)
            raise RuntimeError("rolled back after the refusal")

    try:
        with pytest.raises(RuntimeError):
            refused_then_rolled_back()
        assert len(seen) == 1, "the app's table should have refused the row"
        assert _counted("mr_once") == start
        refused = store.run(lambda writer: (writer.apply(upsert), list(writer.refused))[1])
        assert len(refused) == 1
        assert _counted("mr_once") == start + 1
    finally:
        store.dispose()
        engine.dispose()


def test_workers_counts_are_summed_in_multiprocess_mode(tmp_path: Path) -> None:
    """``serve --workers N``: the count is kept in the refusing worker's file under
    ``PROMETHEUS_MULTIPROC_DIR``, and a scrape that reaches another worker shows it (summed)."""
    url = f"sqlite:///{tmp_path / 'mp.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    table, mapping = _accounts("mr_mp")
    _, engine = _with_app_table(url, table, mapping)
    engine.dispose()
    shared = tmp_path / "metrics"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared), "MP_URL": url}
    worker = textwrap.dedent("""
        import os
        from clerk_sync.ingest import WebhookProcessor
        from clerk_sync.metrics import Metrics
        from clerk_sync.store import Store
        from clerk_sync.webhooks import WebhookVerifier
        from tests import factories as f
        from tests.test_mapping_refusals_counted_alerted_and_checked import _accounts
        store = Store.from_url(os.environ["MP_URL"], mapping=_accounts("mr_mp")[1])
        processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]), metrics=Metrics())
        event = f.envelope("user.created", f.user("user_mp", 1000, email="mp@example.com"))
        print(processor.process(*f.signed(event, "msg_mp")).status)
        store.dispose()
    """)
    scrape = "from clerk_sync.metrics import Metrics; print(Metrics().render().decode())"
    done = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "applied", done.stdout + done.stderr
    other = subprocess.run([sys.executable, "-c", scrape], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=120, check=False)
    assert other.returncode == 0, other.stderr
    assert _refused(other.stdout, "mr_mp") == 1, other.stdout


# -- 2. the freshness check (pure) --------------------------------------------------------------------------

def _snap() -> DatabaseSnapshot:
    return DatabaseSnapshot(NOW - 10, 0, NOW - 60, {"created": 0, "updated": 0, "deleted": 0})


def test_the_check_fails_on_a_recent_refusal_warns_for_a_day_and_is_only_added_when_read() -> None:
    from clerk_sync.freshness import REFUSALS_FAIL_S, REFUSALS_WINDOW_S, MappedRefusals

    since = NOW - REFUSALS_WINDOW_S
    long_error = "the app's table refused the change (accounts refused user.created for user_1: " + "x" * 2000

    def check(found: MappedRefusals) -> tuple[str, str]:
        (c,) = [c for c in check_freshness(_snap(), now=NOW, refusals=found, **LIMITS) if c.name == "mapped rows"]
        return c.status, c.detail

    status, detail = check(MappedRefusals(since, 0))
    assert status == "ok" and "none refused" in detail and "24h" in detail
    status, detail = check(MappedRefusals(since, 3, NOW - 120, "msg_r", long_error))
    assert status == "fail" and "3 deliveries" in detail and "120s ago" in detail and "msg_r" in detail
    assert "doctor --mapping" in detail and "--backfill" in detail and len(detail) < 1000, detail
    assert "(msg_r: accounts refused user.created for user_1: xxx" in detail and "x..." in detail, detail
    status, detail = check(MappedRefusals(since, 1, NOW - REFUSALS_FAIL_S - 60, "msg_old", "refused"))
    assert status == "warn" and "msg_old" in detail
    # the console and older callers pass none: the four lines they had
    assert len(check_freshness(_snap(), now=NOW, **LIMITS)) == 4


# -- 3. the alert rule (promtool) ------------------------------------------------------------------------------

def _refusals(job: str, values: str, instance: int = 1) -> dict[str, str]:
    return _series(SERIES, job, values, instance, table="accounts", entity="users", reason="constraint")


def _fired(job: str) -> dict[str, Any]:
    fires = _fires("ClerkSyncMappedRowsRefused", job)
    return {**fires, "exp_labels": {**fires["exp_labels"], "table": "accounts"}}


def test_the_alert_fires_on_a_first_refusal_and_on_a_growing_count_per_install(tmp_path: Path) -> None:
    """A process's first refusal makes its series appear at 1 (increase() alone never saw it); a count that
    grows fires; a count flat for 15 min does not. Per install and table: prod (two replicas, one with old
    refusals) stays quiet while staging's first refusal fires, and then prod's replica that keeps refusing."""
    tests = [{
        "interval": "1m",
        "input_series": [
            _refusals("prod", "2x90", 1),  # refused rows long ago, none since
            _refusals("prod", "0x40 1 2 3x50", 2),  # the series is there (0) and grows at 41m..43m
            _refusals("staging", "_x20 1x70"),  # its first refusal at 20m: the series appears at 1
        ],
        "alert_rule_test": [
            {"eval_time": "18m", "alertname": "ClerkSyncMappedRowsRefused", "exp_alerts": []},
            {"eval_time": "25m", "alertname": "ClerkSyncMappedRowsRefused", "exp_alerts": [_fired("staging")]},
            {"eval_time": "38m", "alertname": "ClerkSyncMappedRowsRefused", "exp_alerts": []},
            {"eval_time": "45m", "alertname": "ClerkSyncMappedRowsRefused", "exp_alerts": [_fired("prod")]},
            {"eval_time": "60m", "alertname": "ClerkSyncMappedRowsRefused", "exp_alerts": []},
        ],
    }]
    result = _run_rule_tests(tmp_path, ALERTS, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_runbook_says_where_to_look() -> None:
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    section = runbook.split("## ClerkSyncMappedRowsRefused", 1)[1].split("\n## ", 1)[0]
    for needed in ("doctor --mapping", "doctor --freshness", "last_error", "--backfill", "mapped_row_refused",
                   SERIES, "AUTO_INCREMENT", "IDENTITY"):
        assert needed in section, needed
    assert "ClerkSyncMappedRowsRefused" in ALERTS.read_text()


def test_a_refusal_in_a_transaction_whose_commit_is_refused_is_not_counted(tmp_path: Path) -> None:
    """Review: the count listened to SQLAlchemy's ``commit`` event, which comes before the COMMIT. On SQLite a
    DEFERRABLE INITIALLY DEFERRED key (Django's default) refuses a unit of work only at its COMMIT: its mapped
    refusals were counted though nothing was written. They count once the COMMIT succeeded."""
    from clerk_sync import migrations
    from clerk_sync.events import parse_envelope
    from clerk_sync.ingest import apply_envelope
    from clerk_sync.mapping import HardDelete
    from clerk_sync.metrics import MAPPED_ROWS_REFUSED
    from clerk_sync.store import Store

    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE profiles (clerk_user_id varchar(64) UNIQUE, "
                             "email text CHECK (email NOT LIKE 'bad%'), deleted_at timestamp)")
        conn.exec_driver_sql("CREATE TABLE posts (id integer PRIMARY KEY, author varchar(64) "
                             "REFERENCES profiles (clerk_user_id) DEFERRABLE INITIALLY DEFERRED)")
    engine.dispose()
    store = Store.from_url(url, mapping=SchemaMapping(users=MappedTable(
        "profiles", "clerk_user_id", {"email": "email"}, on_delete=HardDelete())))
    migrations.upgrade(store.engine)
    store.run(lambda w: apply_envelope(w, parse_envelope(f.body_of(
        f.envelope("user.created", f.user("user_1", 1_800_000_001_000, email="a@example.com"))))))
    with store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO posts (author) VALUES ('user_1')")  # the app's row points at user_1

    def total() -> float:
        return sum(s.value for m in MAPPED_ROWS_REFUSED.collect() for s in m.samples
                   if s.name.endswith("_total") and s.labels.get("table") == "profiles")

    before = total()

    def work(writer: Any) -> None:  # a refusal at its statement (the CHECK), then a delete refused at COMMIT
        for event in (f.envelope("user.created", f.user("user_2", 1_800_000_002_000, email="bad@example.com")),
                      f.envelope("user.deleted", {"id": "user_1", "deleted": True, "object": "user"})):
            apply_envelope(writer, parse_envelope(f.body_of(event)))

    with pytest.raises(Exception):  # noqa: B017,PT011  (the unit of work is refused: the delivery is retried)
        store.run(work)
    store.dispose()
    assert total() == before


_FIXED_MAPPING = """
from clerk_sync.mapping import Column, MappedTable, SchemaMapping
MAPPING = SchemaMapping(users=MappedTable("mr_fixed", "clerk_user_id",
                                          {"email": "email", "plan": Column(compute=lambda v: "free")}))
"""


def test_a_backfill_that_writes_every_row_clears_the_refusals_before_it(db_url: str, tmp_path: Path) -> None:
    """Walkthrough finding (2026-12-05): ``doctor --freshness`` kept failing "mapped rows" for an hour after the
    table was fixed and backfilled (and warned for a day), so the cron alert went on after the repair. A
    backfill that refused no row records when it started (audited ``mapping.backfilled``): refusals received
    before it are repaired. One received after it fails the check again; a backfill that still refuses rows
    clears nothing."""
    table, mapping = _accounts("mr_fixed")
    store, engine = _with_app_table(db_url, table, mapping)
    processor = build_processor(_settings(db_url), store)
    env = {"DATABASE_URL": db_url, "PYTHONPATH": str(tmp_path)}
    (tmp_path / "broken_map.py").write_text(
        "from clerk_sync.mapping import MappedTable, SchemaMapping\n"
        "MAPPING = SchemaMapping(users=MappedTable('mr_fixed', 'clerk_user_id', {'email': 'email'}))\n")
    (tmp_path / "fixed_map.py").write_text(_FIXED_MAPPING)

    def mapped_line() -> str:
        found = run("doctor", "--freshness", env=env)
        (line,) = [x for x in found.stdout.splitlines() if "mapped rows:" in x]
        return line

    try:
        outcome = processor.process(*f.signed(f.envelope("user.created", f.user("user_fx1", 1000)), "msg_fx1"))
        assert outcome.status == "applied"
        assert mapped_line().startswith("FAIL"), "the refusal fails the check"
        still = run("migrate", "--mapping", "broken_map:MAPPING", "--backfill", env=env)  # not fixed yet
        assert still.returncode == 1, still.stdout + still.stderr
        assert mapped_line().startswith("FAIL"), "a backfill that refused rows repaired nothing"

        fixed = run("migrate", "--mapping", "fixed_map:MAPPING", "--backfill", env=env)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        with engine.connect() as conn:
            assert conn.execute(sa.select(table.c.plan).where(table.c.clerk_user_id == "user_fx1")).scalar() == "free"
        line = mapped_line()
        assert line.startswith("ok") and "since the backfill of" in line, line

        # Review: a delivery received before the backfill, replayed after it, whose row is refused again (the
        # service still runs the broken mapping) is a refusal after the backfill, by its replay's time.
        with store.transaction() as writer:  # (stored failed before the backfill, its row never written)
            writer.conn.execute(webhook_events.update().where(webhook_events.c.svix_id == "msg_fx1")
                                .values(status="failed", last_error="failed before the fix"))
            writer.conn.execute(users.delete().where(users.c.clerk_id == "user_fx1"))
            writer.conn.execute(table.delete())
        assert mapped_line().startswith("ok")
        replay_deliveries(store)
        line = mapped_line()
        assert line.startswith("FAIL") and "msg_fx1" in line, line

        outcome = processor.process(*f.signed(f.envelope("user.created", f.user("user_fx2", 1000)), "msg_fx2"))
        assert outcome.status == "applied"  # (the service still runs the broken mapping: refused again)
        line = mapped_line()
        assert line.startswith("FAIL") and "2 deliveries since the backfill of" in line and "msg_fx2" in line, line
    finally:
        store.dispose()
        engine.dispose()
