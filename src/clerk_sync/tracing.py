"""Optional OpenTelemetry spans (``pip install 'clerk-sync[otel]'``); nothing at all when it is absent.

The package is looked for once, at import. Without it every helper here is a constant no-op; with it,
spans go to whatever tracer provider the application configured (none configured: the API's
non-recording spans, which cost about a microsecond).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

__all__ = ["ENABLED", "delivery_span", "span"]

try:
    from opentelemetry import trace as _trace
except ImportError:  # the extra is not installed
    _trace = None  # type: ignore[assignment]

ENABLED = _trace is not None
_NAME = "clerk_sync"
# Asked for once: get_tracer per delivery cost ~2 % of the service's interpreter time. Taken before the
# app sets its provider, it is the API's proxy, which forwards to that provider once it is set.
_TRACER: Any = _trace.get_tracer(_NAME) if _trace is not None else None
Attributes = Mapping[str, str | int | float | bool]


def span(name: str, attributes: Attributes | None = None, *, client: bool = False) -> AbstractContextManager[Any]:
    """A span around a block (Clerk API calls, reconcile pages), yielding it (``None`` without OpenTelemetry,
    when this is a no-op). ``client``: kind CLIENT, a call to another service (OpenTelemetry's HTTP client
    conventions); else INTERNAL. An exception leaving the block is recorded on it and sets its status ERROR."""
    if _trace is None:
        return nullcontext()
    return _span(name, attributes, client)


@contextmanager
def _span(name: str, attributes: Attributes | None, client: bool) -> Iterator[Any]:
    kind = _trace.SpanKind.CLIENT if client else _trace.SpanKind.INTERNAL
    with _TRACER.start_as_current_span(name, kind=kind, attributes=dict(attributes or {})) as current:
        yield current


def delivery_span(started_ns: int, svix_id: str, event_type: str, outcome: str, error: str | None) -> None:
    """Record the span of one delivery after the fact (``started_ns``: ``time.time_ns()`` at arrival).

    Recorded once the outcome is known, so the webhook path needs one call and no nesting.
    """
    if _trace is None:
        return
    # the outcome as a plain str: exporters see its value, not the enum
    attributes: dict[str, str] = {"clerk_sync.svix_id": svix_id, "clerk_sync.event_type": event_type,
                                  "clerk_sync.outcome": str(outcome)}
    if error:
        attributes["clerk_sync.error"] = error
    current = _TRACER.start_span("clerk_sync.delivery", attributes=attributes, start_time=started_ns)
    if outcome == "failed":
        current.set_status(_trace.Status(_trace.StatusCode.ERROR, error or "failed"))
    current.end(end_time=time.time_ns())
