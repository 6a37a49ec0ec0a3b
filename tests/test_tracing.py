"""Optional OpenTelemetry tracing: a span per delivery, per Clerk API call and per reconcile page; a
no-op when the package is absent."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clerk_sync import tracing
from clerk_sync.config import Settings
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store
from clerk_sync.tables import webhook_events
from clerk_sync.testing import EmulatorServer
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET, clerk_client


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_a_span_per_delivery_with_its_outcome(store: Store, verifier: WebhookVerifier,
                                              spans: InMemorySpanExporter) -> None:
    processor = WebhookProcessor(store, verifier)
    for svix_id, event in (("msg_t1", f.envelope("user.created", f.user("user_t", 1))),
                           ("msg_t1", f.envelope("user.created", f.user("user_t", 1))),
                           ("msg_t2", f.envelope("user.created", {"object": "user"}))):
        headers, body = f.signed(event, svix_id)
        processor.process(headers, body)
    found = [(s.attributes or {}) for s in named(spans, "clerk_sync.delivery")]
    assert [(a["clerk_sync.svix_id"], a["clerk_sync.outcome"]) for a in found] == [
        ("msg_t1", "applied"), ("msg_t1", "duplicate"), ("msg_t2", "failed")]
    assert all(a["clerk_sync.event_type"] == "user.created" for a in found)
    assert {type(a["clerk_sync.outcome"]) for a in found} == {str}  # plain strings, as exporters expect
    failed = named(spans, "clerk_sync.delivery")[-1]
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert failed.end_time is not None and failed.start_time is not None and failed.end_time >= failed.start_time


def test_spans_for_clerk_calls_and_reconcile_pages(store: Store, emu: EmulatorServer,
                                                   spans: InMemorySpanExporter) -> None:
    user_id = emu.create_user("t@example.com")["id"]
    with clerk_client(emu) as clerk:
        clerk.get_user(user_id)
        Reconciler(store, clerk).run()
    (call,) = named(spans, "GET /users/{id}")  # OpenTelemetry's HTTP client span: "{method} {url.template}"
    assert call.kind is trace.SpanKind.CLIENT
    assert (call.attributes or {})["url.template"] == "/users/{id}"
    pages = named(spans, "reconcile.page")
    assert {(p.attributes or {})["clerk_sync.entity"] for p in pages} >= {"users"}
    # one trace per run (review: each page and API call was a trace of its own): the pages, and the Clerk calls
    # made by the prefetching threads too, are in the run's trace
    (run,) = named(spans, "reconcile.run")
    assert run.context is not None and (run.attributes or {})["clerk_sync.dry_run"] is False
    listed = [s for s in spans.get_finished_spans() if s.name.startswith("GET /users") and s is not call]
    assert listed and pages
    assert {s.context.trace_id for s in [*pages, *listed] if s.context is not None} == {run.context.trace_id}


def test_without_opentelemetry_tracing_is_a_no_op(tmp_path: object) -> None:
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"  # as if the extra were not installed
        "from clerk_sync import tracing\n"
        "assert not tracing.ENABLED\n"
        "with tracing.span('x', {'a': 1}) as s: assert s is None\n"
        "tracing.delivery_span(0, 'msg', 'user.created', 'applied', None)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert tracing.ENABLED  # and here, with the extra, it is on


class _Raising(SpanProcessor):
    """An app's span processor with a bug (the SDK's multi-processor does not catch what on_end raises)."""

    armed = False

    def on_end(self, span: ReadableSpan) -> None:
        if _Raising.armed:
            raise RuntimeError("telemetry backend hiccup")


@pytest.fixture
def raising_spans(provider: TracerProvider) -> Iterator[None]:
    if not getattr(provider, "_clerk_sync_raising", False):  # (processors cannot be removed: added once)
        provider.add_span_processor(_Raising())
        provider._clerk_sync_raising = True  # type: ignore[attr-defined]
    _Raising.armed = True
    try:
        yield
    finally:
        _Raising.armed = False


@pytest.mark.parametrize("group_commit", ["1", "0"])
def test_telemetry_that_raises_never_fails_a_committed_delivery(db_url: str, group_commit: str,
                                                                raising_spans: None) -> None:
    """The delivery is committed before its span ends: its answer is 200 (a 500 would make Svix resend
    an applied delivery for days), and a forged one still gets its 401 when the metrics raise."""
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0", "CLERK_SYNC_GROUP_COMMIT": group_commit})
    processor = build_processor(settings)
    app = create_app(settings, processor)
    headers, body = f.signed(f.envelope("user.created", f.user("user_obs", 1)), "msg_obs")
    try:
        with running(app) as url, httpx.Client(base_url=url) as client:
            answer = client.post("/webhooks/clerk", content=body, headers=headers)
            processor.metrics.refused = None  # type: ignore[assignment]  (.labels() raises AttributeError)
            forged = client.post("/webhooks/clerk", content=body, headers={**headers, "svix-signature": "v1,AAAA"})
        with processor.store.engine.connect() as conn:
            stored = conn.execute(sa.select(webhook_events.c.status)
                                  .where(webhook_events.c.svix_id == "msg_obs")).scalar()
    finally:
        processor.store.dispose()
    assert (answer.status_code, answer.json()["status"], stored) == (200, "applied", "applied")
    assert forged.status_code == 401
