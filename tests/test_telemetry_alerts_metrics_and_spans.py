"""The operations telemetry: the alert rules per install (``job``), the Flask face's Clerk client
and JIT counted in the processor's metrics, the circuit series once the breaker lets a probe through, the
worker's own multiprocess directory, Clerk API spans as OpenTelemetry HTTP client spans, the budget series
without a local budget, and where ``svix_id`` is bound to log lines."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import uvicorn
import yaml
from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from clerk_sync._logging import configure_logging
from clerk_sync.clerk_api import AsyncClerkClient, CircuitBreaker, ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import Block, LocalBudget, RateLimit, Reservation
from clerk_sync.config import Settings
from clerk_sync.errors import ClerkNotFound, ClerkUnavailable
from clerk_sync.integrations.flask import ClerkSync, clerk_login_required, clerk_state, current_user
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.metrics import Metrics
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests.conftest import SECRET, FakeClock

# (No helpers from tests/_server.py or other test modules: this file also runs against the source before
# these fixes, to show each test fails there.)
ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "alerts.yml"
CLI = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]


def samples(text: str | bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """One exposition, parsed: values by (sample name, labels)."""
    text = text.decode() if isinstance(text, bytes) else text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def named(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in found.items() if sample == name}


# -- 1. alert rules: one install's failure is not hidden by another's health, and says which install ---------

def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CLERK_SYNC_REQUIRE_PROMTOOL") == "1":  # .ci/run installs it and sets this
            pytest.fail("promtool is missing: apt-get install -y prometheus")
        pytest.skip("promtool is missing (apt-get install -y prometheus)")
    return found


def _rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}


def _series(name: str, job: str, values: str, instance: int = 1, **labels: str) -> dict[str, str]:
    shown = ",".join(f'{k}="{v}"' for k, v in {"job": job, "instance": f"{job}-{instance}", **labels}.items())
    return {"series": f"{name}{{{shown}}}", "values": values}


def _fires(alert: str, job: str) -> dict[str, Any]:
    """An alert of ``alert`` for the install ``job``: its rule's labels plus ``job``, its annotations."""
    rule = _rules()[alert]
    assert not any("{{" in text for text in rule["annotations"].values()), alert  # (templated: not compared here)
    return {"exp_labels": {**rule["labels"], "job": job}, "exp_annotations": rule["annotations"]}


def _run_rule_tests(tmp_path: Path, rules_file: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}))
    return subprocess.run([_promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=120,
                          check=False)


def _two_installs() -> list[dict[str, Any]]:
    """prod (two replicas) and staging scraped by one Prometheus: staging's endpoint is dead, its database
    unreachable, its Clerk circuit open, its reconcile never ran; prod is healthy throughout."""
    never_ran = [_series("clerk_sync_database_up", job, "1x3000") for job in ("prod", "staging")]  # 50 h
    never_ran.append(_series("clerk_sync_reconcile_last_success_timestamp_seconds", "prod", "0+60x3000"))
    return [
        {  # staging's endpoint died: its last reconcile repaired rows an hour after its newest delivery
            "interval": "1m",
            "input_series": [
                *(_series("clerk_sync_reconcile_last_started_timestamp_seconds", "prod", "10000x30", i) for i in (1, 2)),
                *(_series("clerk_sync_newest_delivery_timestamp_seconds", "prod", "9900x30", i) for i in (1, 2)),
                _series("clerk_sync_reconcile_last_drift", "prod", "0x30", action="created"),
                _series("clerk_sync_reconcile_last_started_timestamp_seconds", "staging", "10000x30"),
                _series("clerk_sync_newest_delivery_timestamp_seconds", "staging", "6000x30"),
                _series("clerk_sync_reconcile_last_drift", "staging", "4x30", action="created"),
                # (review) a 45-minute run that repaired a change whose delivery came a second after it started:
                # it finished long after the newest delivery, and that is no outage
                _series("clerk_sync_reconcile_last_started_timestamp_seconds", "bulk", "10000x30"),
                _series("clerk_sync_reconcile_last_success_timestamp_seconds", "bulk", "12700x30"),
                _series("clerk_sync_newest_delivery_timestamp_seconds", "bulk", "10001x30"),
                _series("clerk_sync_reconcile_last_drift", "bulk", "1x30", action="updated"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "ClerkSyncNoDeliveriesWhileDrift", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "ClerkSyncNoDeliveriesWhileDrift",
                 "exp_alerts": [_fires("ClerkSyncNoDeliveriesWhileDrift", "staging")]},
            ],
        },
        {  # per-install gauges: the alert names the install, not "some install"
            "interval": "1m",
            "input_series": [
                _series("clerk_sync_database_up", "prod", "1x30"),
                _series("clerk_sync_database_up", "staging", "0x30"),
                _series("clerk_sync_clerk_api_circuit_open", "prod", "0x30"),
                _series("clerk_sync_clerk_api_circuit_open", "staging", "1x30"),
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "ClerkSyncDatabaseDown",
                 "exp_alerts": [_fires("ClerkSyncDatabaseDown", "staging")]},
                {"eval_time": "10m", "alertname": "ClerkSyncClerkCircuitOpen",
                 "exp_alerts": [_fires("ClerkSyncClerkCircuitOpen", "staging")]},
            ],
        },
        {  # staging's database was restored from a dump of an older revision: up, but its schema behind
            "interval": "1m",
            "input_series": [
                *(_series("clerk_sync_schema_current", "prod", "1x30", i) for i in (1, 2)),
                _series("clerk_sync_database_up", "staging", "1x30"),
                _series("clerk_sync_schema_current", "staging", "0x30"),
            ],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "ClerkSyncSchemaNotCurrent", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "ClerkSyncSchemaNotCurrent",
                 "exp_alerts": [_fires("ClerkSyncSchemaNotCurrent", "staging")]},
                {"eval_time": "10m", "alertname": "ClerkSyncDatabaseDown", "exp_alerts": []},
            ],
        },
        {  # staging's endpoint does not subscribe organization events: its memberships wait for ever; prod
            # saw one membership before its organization, applied at the retry 5 s later
            "interval": "1m",
            "input_series": [
                _series("clerk_sync_webhook_parent_not_there_total", "prod", "0 1 1x120"),
                _series("clerk_sync_webhook_parent_not_there_total", "staging", "0+2x120"),
            ],
            "alert_rule_test": [
                {"eval_time": "50m", "alertname": "ClerkSyncParentsNotArriving", "exp_alerts": []},
                {"eval_time": "90m", "alertname": "ClerkSyncParentsNotArriving",
                 "exp_alerts": [_fires("ClerkSyncParentsNotArriving", "staging")]},
            ],
        },
        {  # staging never ran reconcile; prod's runs must not keep that quiet (absent() saw prod's series)
            "interval": "1m",
            "input_series": never_ran,
            "alert_rule_test": [
                {"eval_time": "47h", "alertname": "ClerkSyncReconcileNeverRan", "exp_alerts": []},
                {"eval_time": "49h", "alertname": "ClerkSyncReconcileNeverRan",
                 "exp_alerts": [_fires("ClerkSyncReconcileNeverRan", "staging")]},
            ],
        },
    ]


def test_a_dead_staging_endpoint_fires_while_prod_is_healthy_and_the_alert_names_staging(tmp_path: Path) -> None:
    """Fixed: every expression aggregated across everything one Prometheus scrapes (``max(...)``,
    ``and on()``, ``absent(...)``), so prod's fresh deliveries hid staging's dead endpoint, and an alert that
    did fire carried no ``job``. They aggregate ``by (job)`` now (``promtool test rules``)."""
    result = _run_rule_tests(tmp_path, ALERTS, _two_installs())
    assert result.returncode == 0, result.stdout + result.stderr


def _fires_for_hook(alert: str, job: str, hook: str) -> dict[str, Any]:
    rule = _rules()[alert]
    shown = {k: v.replace("{{ $labels.hook }}", hook) for k, v in rule["annotations"].items()}
    return {"exp_labels": {**rule["labels"], "job": job, "hook": hook}, "exp_annotations": shown}


def test_a_hook_failing_its_runs_for_15_minutes_fires_before_its_jobs_die_and_stays_firing_across_its_backoff(
        tmp_path: Path) -> None:
    """Fixed: a downstream outage raised no alert for about 4 hours. The failing jobs wait on their backoff, not
    due, so ClerkSyncHooksBehind (the oldest *due* job) never saw them, and ClerkSyncHookJobsDead fires only once
    they die. ClerkSyncHookRetries fires on the share of a hook's runs that end in a retry, per install and hook:
    staging's crm fails every run from minute 10 (prod's mail, 1 run in 11 a retry, and staging's healthy mail do
    not fire); a quiet hook whose one job's retries come an hour apart keeps it firing between them, and it ends
    within the hour after the hook recovered."""
    alert = "ClerkSyncHookRetries"
    cases = [
        {
            "interval": "1m",
            "input_series": [
                _series("clerk_sync_hook_runs_total", "prod", "0+10x120", hook="mail", outcome="ok"),
                _series("clerk_sync_hook_runs_total", "prod", "0+1x120", hook="mail", outcome="retry"),
                _series("clerk_sync_hook_runs_total", "staging", "0+5x120", hook="mail", outcome="ok"),
                _series("clerk_sync_hook_runs_total", "staging", "0+5x10 50x110", hook="crm", outcome="ok"),
                _series("clerk_sync_hook_runs_total", "staging", "0x10 0+6x110", hook="crm", outcome="retry"),
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": alert, "exp_alerts": []},  # failing, not yet for 15 min
                {"eval_time": "40m", "alertname": alert, "exp_alerts": [_fires_for_hook(alert, "staging", "crm")]},
                {"eval_time": "110m", "alertname": alert, "exp_alerts": [_fires_for_hook(alert, "staging", "crm")]},
            ],
        },
        {  # one job of a quiet hook: retries every minute for 30 min, then at the backoff's hour; back at 170m
            "interval": "1m",
            "input_series": [
                _series("clerk_sync_hook_runs_total", "staging", "1+1x30 31x59 32x59 33x59 33x200", hook="sms",
                        outcome="retry"),
                _series("clerk_sync_hook_runs_total", "staging", "_x169 0+2x200", hook="sms", outcome="ok"),
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": alert, "exp_alerts": []},
                {"eval_time": "20m", "alertname": alert, "exp_alerts": [_fires_for_hook(alert, "staging", "sms")]},
                {"eval_time": "80m", "alertname": alert, "exp_alerts": [_fires_for_hook(alert, "staging", "sms")]},
                {"eval_time": "140m", "alertname": alert, "exp_alerts": [_fires_for_hook(alert, "staging", "sms")]},
                {"eval_time": "240m", "alertname": alert, "exp_alerts": []},
            ],
        },
    ]
    result = _run_rule_tests(tmp_path, ALERTS, cases)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_run_hanging_past_its_timeout_for_30_minutes_fires_for_its_hook_and_install(tmp_path: Path) -> None:
    """ClerkSyncHookRunsOverdue: staging's crm has a run overdue for good on one replica (the other replica's
    series at 0); prod's mail has runs overdue for a few minutes at a time, which is not a hang."""
    alert = "ClerkSyncHookRunsOverdue"
    cases = [{
        "interval": "1m",
        "input_series": [
            _series("clerk_sync_hook_overdue_running", "staging", "0x5 1x100", 1, hook="crm"),
            _series("clerk_sync_hook_overdue_running", "staging", "0x105", 2, hook="crm"),
            _series("clerk_sync_hook_overdue_running", "prod", "0 1 1 0 0 2 0 0 1 0x96", hook="mail"),
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": alert, "exp_alerts": []},
            {"eval_time": "40m", "alertname": alert, "exp_alerts": [_fires_for_hook(alert, "staging", "crm")]},
        ],
    }]
    result = _run_rule_tests(tmp_path, ALERTS, cases)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_check_and_their_header_says_which_label_is_an_install() -> None:
    checked = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True,
                             timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    header = ALERTS.read_text().split("groups:", 1)[0]
    assert "`job` label" in header and "replace" in header  # which label is an install, and how to change it
    # (that each expression aggregates by job: tests/test_operations.py, beside the series it may name)


# -- 2. Flask: the Clerk client and JIT count in the processor's metrics ------------------------------------

def build_app(config: dict[str, Any]) -> Flask:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = config
    ClerkSync(app, revocation_refresh_s=0)

    @app.get("/me")
    @clerk_login_required
    def me() -> dict[str, Any]:
        return {"email": current_user.email}

    return app


def emulator_config(clerk: EmulatorServer, db_url: str) -> dict[str, Any]:
    return {"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
            "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url, "CLERK_ISSUER": clerk.url}


def test_flask_counts_its_clerk_calls_budget_and_jit_fetches_in_the_processors_metrics(
        emu: EmulatorServer, sqlite_url: str) -> None:
    """Fixed: ``ClerkSync`` built its ClerkClient and JitUsers without ``metrics=``, so the README's
    "Metrics in your own app" (``processor.metrics.render()``) never showed a Clerk call, a 429, the breaker,
    the budget or a JIT fetch of a Flask app."""
    app = build_app(emulator_config(emu, sqlite_url))
    state = clerk_state(app)
    try:
        user = emu.create_user("jit@example.com")  # no webhook: the first request fetches it (JIT)
        token = emu.session_token(emu.create_session(user["id"])["id"])
        with app.test_client() as client:
            answer = client.get("/me", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.get_data(as_text=True)
        assert state.processor is not None
        found = samples(state.processor.metrics.render())
    finally:
        state.close()
    assert named(found, "clerk_sync_jit_fetches_total") == {frozenset({("outcome", "stored")}): 1.0}
    calls = named(found, "clerk_sync_clerk_api_requests_total")
    assert calls.get(frozenset({("endpoint", "/users/{id}"), ("status", "200")})) == 1.0, calls
    assert named(found, "clerk_sync_clerk_api_circuit_open") == {frozenset(): 0.0}
    assert named(found, "clerk_sync_clerk_api_budget_tokens")[frozenset()] > 0  # the client's budget is watched


# -- 3. the circuit series reads 1 only while the breaker refuses calls --------------------------------------

def test_the_circuit_series_reads_0_once_reset_s_passed_with_no_call_by_the_breakers_clock() -> None:
    """Fixed: ``clerk_sync_clerk_api_circuit_open`` stayed 1 after ``reset_s`` with no call (the breaker
    lets the next call through as a probe then), so the page-severity alert fired all night on a quiet app."""
    clock = FakeClock(100.0)
    breaker = CircuitBreaker(threshold=2, reset_s=30.0, clock=clock)
    metrics = Metrics()
    clerk = ClerkClient("sk_test_x", breaker=breaker, metrics=metrics, budget=LocalBudget(RateLimit(100, 1.0)))

    def circuit() -> float:
        return samples(metrics.render())[("clerk_sync_clerk_api_circuit_open", frozenset())]

    try:
        breaker.failure()
        assert circuit() == 0  # one failure: still closed
        breaker.failure()
        assert circuit() == 1 and breaker.check() is not None  # open: calls are refused
        clock.t = 129.9
        assert circuit() == 1
        clock.t = 130.0  # reset_s passed, nobody called: the next call goes through
        assert circuit() == 0 and breaker.is_open  # (tripped, half-open: not refusing)
        assert breaker.check() is None  # that call is the probe; the others wait for it
        assert circuit() == 1 and breaker.check() is not None
        breaker.failure()  # the probe failed: open again, from now
        clock.t = 159.9
        assert circuit() == 1
        clock.t = 160.0
        assert circuit() == 0
        assert breaker.check() is None
        breaker.success()  # the probe worked: closed
        assert circuit() == 0 and not breaker.is_open
    finally:
        clerk.close()
    help_line = next(line for line in metrics.render().decode().splitlines()
                     if line.startswith("# HELP clerk_sync_clerk_api_circuit_open"))
    assert "refuses calls" in help_line


# -- 4. clerk-sync worker under PROMETHEUS_MULTIPROC_DIR ----------------------------------------------------

def _worker_project(tmp_path: Path, prom: Path) -> dict[str, str]:
    """A migrated SQLite database and a hooks module beside it: the CLI's environment, with ``prom`` as
    PROMETHEUS_MULTIPROC_DIR."""
    (tmp_path / "tel_hooks.py").write_text(textwrap.dedent('''
        from clerk_sync.changes import Hook

        HOOKS = [Hook("noop", lambda change: None, on=["user.created"])]
    '''))
    path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}", "PYTHONPATH": path,
           "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    assert run("migrate", env=env).returncode == 0
    return {**env, "PROMETHEUS_MULTIPROC_DIR": str(prom)}


def _without_prometheus_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CLERK_", "PROMETHEUS_")) and k.lower() != "prometheus_multiproc_dir"
            and k != "DATABASE_URL"}


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**_without_prometheus_env(), **env}, capture_output=True, text=True,
                          timeout=120, check=False)


def test_worker_with_a_missing_multiproc_dir_makes_it_and_leaves_it_empty(tmp_path: Path) -> None:
    """Fixed: ``clerk-sync worker`` with PROMETHEUS_MULTIPROC_DIR naming a directory that does not
    exist crashed (FileNotFoundError). It takes serve's way: a fresh directory inside it, made if missing,
    removed at exit."""
    prom = tmp_path / "prom" / "missing"
    env = _worker_project(tmp_path, prom)
    result = run("worker", "--once", "--hooks", "tel_hooks:HOOKS", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ran 0 hook jobs" in result.stderr
    assert "Traceback" not in result.stderr
    assert prom.is_dir() and list(prom.iterdir()) == []


def test_worker_writes_its_files_in_a_fresh_directory_and_removes_it_when_stopped(tmp_path: Path) -> None:
    """Fixed: the worker wrote its ``.db`` files straight into the operator's directory and never
    removed them (the next run's counts, or a serve sharing the directory, summed them with its own)."""
    prom = tmp_path / "prom"
    prom.mkdir()
    env = _worker_project(tmp_path, prom)
    proc = subprocess.Popen([*CLI, "worker", "--hooks", "tel_hooks:HOOKS", "--poll", "0.05"],
                            env={**_without_prometheus_env(), **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        said = ""
        while "clerk-sync worker: hooks" not in said:  # ready: its metrics made, its SIGTERM handler set
            line = proc.stderr.readline()
            assert line, said  # (it exited)
            said += line
        files = list(prom.rglob("*.db"))
        assert files
        assert all(file.parent.parent == prom and file.parent.name.startswith("clerk-sync-metrics-")
                   for file in files), files
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert list(prom.iterdir()) == []


# -- 5. Clerk API spans: OpenTelemetry HTTP client spans ----------------------------------------------------

def _clerk_api(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> ClerkClient:
    options.setdefault("retry", RetryPolicy(attempts=2, backoff_s=0.0, deadline_s=5.0))
    return ClerkClient("sk_test_x", transport=httpx.MockTransport(handler),
                       budget=LocalBudget(RateLimit(1000, 1.0)), **options)


def _answer(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/users/user_1":
        return httpx.Response(200, json={"object": "user", "id": "user_1"})
    if request.url.path == "/v1/users/user_down":
        raise httpx.ConnectError("connection refused", request=request)
    return httpx.Response(404, json={"errors": [{"message": "not found", "code": "resource_not_found"}]})


def _only(exporter: InMemorySpanExporter) -> ReadableSpan:
    (only,) = exporter.get_finished_spans()
    exporter.clear()
    return only


def test_clerk_api_spans_are_http_client_spans_with_status_server_and_error_type(
        spans: InMemorySpanExporter) -> None:
    """Fixed: the spans were INTERNAL, named ``clerk_api GET /users/{id}``, without the answer's
    status, the server or the error. Now kind CLIENT, ``{method} {url.template}``, and OpenTelemetry's HTTP
    client attributes."""
    server = {"server.address": "api.clerk.com", "server.port": 443}  # CLERK_API_URL's default, https
    with _clerk_api(_answer) as clerk:
        clerk.get_user("user_1")
        ok = _only(spans)
        assert (ok.name, ok.kind) == ("GET /users/{id}", trace.SpanKind.CLIENT)
        assert dict(ok.attributes or {}) == {"http.request.method": "GET", "url.template": "/users/{id}", **server,
                                             "http.response.status_code": 200}
        assert ok.status.status_code is not trace.StatusCode.ERROR

        with pytest.raises(ClerkNotFound):
            clerk.get_user("user_gone")
        missing = _only(spans)
        assert (missing.attributes or {})["http.response.status_code"] == 404
        assert (missing.attributes or {})["error.type"] == "404"
        assert missing.status.status_code is trace.StatusCode.ERROR

        with pytest.raises(ClerkUnavailable):
            clerk.get_user("user_down")  # never answered, sent twice
        down = dict(_only(spans).attributes or {})
        assert "http.response.status_code" not in down
        assert (down["error.type"], down["http.request.resend_count"]) == ("httpx.ConnectError", 1)

    breaker = CircuitBreaker(threshold=1, reset_s=60.0, clock=FakeClock())
    breaker.failure()
    with _clerk_api(_answer, api_url="http://127.0.0.1:8123", breaker=breaker) as clerk:
        with pytest.raises(ClerkUnavailable):
            clerk.get_user("user_1")  # refused by the open circuit: nothing sent
        refused = dict(_only(spans).attributes or {})
    assert (refused["server.address"], refused["server.port"]) == ("127.0.0.1", 8123)
    assert refused["error.type"] == "clerk_sync.errors.ClerkUnavailable"
    assert "http.response.status_code" not in refused


@pytest.mark.anyio
async def test_async_clerk_api_spans_are_http_client_spans(spans: InMemorySpanExporter) -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        return _answer(request)

    async with AsyncClerkClient("sk_test_x", transport=httpx.MockTransport(answer),
                                budget=LocalBudget(RateLimit(1000, 1.0))) as clerk:
        await clerk.get_user("user_1")
        ok = _only(spans)
        with pytest.raises(ClerkNotFound):
            await clerk.get_user("user_gone")
        missing = _only(spans)
    assert (ok.name, ok.kind) == ("GET /users/{id}", trace.SpanKind.CLIENT)
    assert (ok.attributes or {})["http.response.status_code"] == 200
    assert (missing.name, (missing.attributes or {})["error.type"]) == ("GET /users/{id}", "404")


# -- 6. the budget series without a local budget; where svix_id is bound -------------------------------------

class _SharedBudget:
    """A budget kept elsewhere (as Redis's): it has no ``available()`` to read at scrape time."""

    def __init__(self) -> None:
        self._local = LocalBudget(RateLimit(100, 1.0))

    def reserve(self, max_wait: float) -> Reservation:
        return self._local.reserve(max_wait)

    def penalize(self, seconds: float) -> None:
        self._local.penalize(seconds)

    def blocked(self) -> Block:
        return self._local.blocked()

    async def areserve(self, max_wait: float) -> Reservation:
        return self._local.reserve(max_wait)

    async def apenalize(self, seconds: float) -> None:
        self._local.penalize(seconds)

    async def ablocked(self) -> Block:
        return self._local.blocked()


def test_the_budget_series_has_no_sample_while_no_local_budget_is_watched() -> None:
    """Fixed: ``clerk_sync_clerk_api_budget_tokens`` read 0.0 (an exhausted budget) in a process
    that watched no client, or only one with a shared budget."""

    def budget() -> dict[frozenset[tuple[str, str]], float]:
        return named(samples(metrics.render()), "clerk_sync_clerk_api_budget_tokens")

    metrics = Metrics()
    assert budget() == {}
    with ClerkClient("sk_test_x", budget=_SharedBudget(), metrics=metrics):
        assert budget() == {}
    with ClerkClient("sk_test_x", budget=LocalBudget(RateLimit(100, 1.0)), metrics=metrics):
        assert list(budget()) == [frozenset()] and budget()[frozenset()] > 0
    with ClerkClient("sk_test_x", budget=_SharedBudget(), metrics=metrics):  # the last client watched wins
        assert budget() == {}


@contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a loopback port, in a thread, while the block runs."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_svix_id_is_bound_to_log_lines_by_flask_but_not_by_serve_as_the_logging_docstring_says(
        sqlite_url: str) -> None:
    """Fixed: ``configure_logging`` said ``svix_id`` is bound per delivery via contextvars, but only
    the Flask and Django views bind it; ``serve`` (Starlette, FastAPI) does not. The docstring says so now."""
    doc = " ".join((configure_logging.__doc__ or "").split())
    assert "only by the Flask and Django webhook views" in doc
    assert "``serve`` and the Starlette/FastAPI endpoint bind nothing" in doc
    seen: list[dict[str, Any]] = []

    def recording(processor: Any) -> None:
        verify = processor.verify_and_parse

        def verify_and_parse(headers: Any, body: bytes) -> Any:
            seen.append(structlog.contextvars.get_contextvars())
            return verify(headers, body)

        processor.verify_and_parse = verify_and_parse

    app = build_app({"DATABASE_URL": sqlite_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    state = clerk_state(app)
    assert state.processor is not None
    recording(state.processor)
    headers, body = f.signed(f.envelope("user.created", f.user("user_flask", 1)), "msg_flask")
    try:
        with app.test_client() as client:
            assert client.post("/webhooks/clerk", data=body, headers=headers).status_code == 200
    finally:
        state.close()
    settings = Settings.from_env({"DATABASE_URL": sqlite_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    processor = build_processor(settings)
    recording(processor)
    headers, body = f.signed(f.envelope("user.created", f.user("user_serve", 1)), "msg_serve")
    try:
        with running(create_app(settings, processor)) as url, httpx.Client(base_url=url) as http:
            assert http.post("/webhooks/clerk", content=body, headers=headers).status_code == 200
    finally:
        processor.store.dispose()
    assert [bound.get("svix_id") for bound in seen] == ["msg_flask", None]


def test_the_headers_command_moves_every_aggregation_to_the_other_label(tmp_path: Path) -> None:
    """The header's ``sed`` for installs that share a job matched ``(job)`` and ``(job, le)`` only: five rules
    (``by (job, hook)``, ``by (job, table)``, ``by (job, instance)``) kept lumping prod and staging together and
    carried no ``env`` (docs review). Run as printed on a copy: no aggregation or join is by ``job`` any more,
    each is by ``env`` instead, and the rules still check."""
    header = ALERTS.read_text().split("groups:", 1)[0]
    command = re.search(r"`(sed -i -E '[^']+' alerts\.yml)`", header)
    assert command is not None, header
    copy = tmp_path / "alerts.yml"
    copy.write_text(ALERTS.read_text())
    subprocess.run(shlex.split(command.group(1)), cwd=tmp_path, check=True, timeout=30)
    clause = re.compile(r"\b(?:by|on) ?\((\w+)")

    def firsts(text: str) -> list[str]:  # the first label of every by (...) / on(...) of the expressions
        return [m.group(1) for line in text.splitlines() if not line.lstrip().startswith("#")
                for m in clause.finditer(line)]

    before, after = firsts(ALERTS.read_text()), firsts(copy.read_text())
    assert before and set(before) == {"job"}
    assert after == ["env"] * len(before)
    checked = subprocess.run([_promtool(), "check", "rules", str(copy)], capture_output=True, text=True, timeout=60,
                             check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
