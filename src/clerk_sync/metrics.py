"""Prometheus metrics, one registry per service instance (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """Events by type and status, and webhook handling latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "clerk_sync_webhook_events",
            "Webhook deliveries by event type and outcome.",
            ["type", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "clerk_sync_webhook_seconds",
            "Time to verify, store and apply one delivery.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

    def observe(self, event_type: str, status: str, seconds: float) -> None:
        self.events.labels(type=event_type, status=status).inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
