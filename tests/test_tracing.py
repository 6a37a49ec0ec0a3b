"""Optional OpenTelemetry tracing: a span per delivery, per Clerk API call and per reconcile page; a
no-op when the package is absent."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clerk_sync import tracing
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import clerk_client

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider() -> TracerProvider:
    """The process-wide provider (OpenTelemetry allows setting it once), recording in memory."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    created = TracerProvider()
    created.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(created)
    return created


@pytest.fixture
def spans(provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


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
    failed = named(spans, "clerk_sync.delivery")[-1]
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert failed.end_time is not None and failed.start_time is not None and failed.end_time >= failed.start_time


def test_spans_for_clerk_calls_and_reconcile_pages(store: Store, emu: EmulatorServer,
                                                   spans: InMemorySpanExporter) -> None:
    user_id = emu.create_user("t@example.com")["id"]
    with clerk_client(emu) as clerk:
        clerk.get_user(user_id)
        Reconciler(store, clerk).run()
    (call,) = named(spans, "clerk_api GET /users/{id}")
    assert (call.attributes or {})["url.template"] == "/users/{id}"
    pages = named(spans, "reconcile.page")
    assert {(p.attributes or {})["clerk_sync.entity"] for p in pages} >= {"users"}


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
