"""What observing one delivery costs: metrics, the log line, the span; and process() end to end.

    .venv/bin/python bench/_observe_cost.py [--quick]      # a markdown table on stdout

bench/ingest.py runs it and adds the table to its BENCHMARKS.md section. Each tracing mode runs in its
own interpreter, so "not installed" really is an import that fails (``sys.modules`` blocks it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "not installed": "block",
    "API only (no provider)": "api",
    "SDK, recording (no exporter)": "sdk",
}


def _best_ns(fn: Callable[[], None], n: int, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def child(mode: str, n: int) -> dict[str, float]:
    """Runs inside the per-mode interpreter."""
    if mode == "block":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    import logging
    import os

    import structlog

    if mode == "sdk":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
    sys.path.insert(0, str(ROOT / "tests"))
    import factories
    from clerk_sync import tracing
    from clerk_sync.ingest import WebhookProcessor
    from clerk_sync.metrics import Metrics
    from clerk_sync.migrations import upgrade
    from clerk_sync.store import Store
    from clerk_sync.webhooks import WebhookVerifier

    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(  # what `serve --json-logs` does, written to /dev/null
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=devnull), cache_logger_on_first_use=True)
    log = structlog.get_logger("clerk_sync.webhook")
    metrics = Metrics()
    stamp = int(time.time() * 1000)
    result = {
        "metrics": _best_ns(lambda: metrics.observe("user.updated", "applied", 0.002, event_ms=stamp), n),
        "log line (INFO, JSON)": _best_ns(lambda: log.log(logging.INFO, "webhook", svix_id="msg_1",
                                                          event_type="user.updated", status="applied",
                                                          error=None, event_ms=stamp), n),
        "log line filtered (DEBUG)": _best_ns(lambda: log.log(logging.DEBUG, "webhook", svix_id="msg_1"), n),
        "span": _best_ns(lambda: tracing.delivery_span(time.time_ns(), "msg_1", "user.updated", "applied", None), n),
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.from_url(f"sqlite:///{tmp}/bench.db")
        upgrade(store.engine)
        processor = WebhookProcessor(store, WebhookVerifier([factories.SECRET]))
        deliveries = [factories.signed(factories.envelope("user.updated", factories.user(f"user_{i}", 10 + i)),
                                       f"msg_{i}") for i in range(max(200, n // 50))]
        start = time.perf_counter_ns()
        for headers, body in deliveries:
            processor.process(headers, body)
        result["process() on SQLite"] = (time.perf_counter_ns() - start) / len(deliveries)
        store.dispose()
    result["enabled"] = float(tracing.ENABLED)
    return result


def measure(quick: bool = False) -> str:
    """Run every mode in its own interpreter; a markdown table (microseconds per delivery)."""
    n = 5_000 if quick else 20_000
    rows: dict[str, dict[str, float]] = {}
    for label, mode in MODES.items():
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(n)], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
    parts = ["metrics", "log line (INFO, JSON)", "log line filtered (DEBUG)", "span", "process() on SQLite"]
    lines = ["Observing one delivery (µs, best of 3; `process()` = verify + parse + SQLite commit, for scale):", "",
             "| OpenTelemetry | " + " | ".join(parts) + " | metrics + log + span |",
             "|---|" + "---:|" * (len(parts) + 1)]
    for label, r in rows.items():
        total = r["metrics"] + r["log line (INFO, JSON)"] + r["span"]
        cells = " | ".join(f"{r[p] / 1000:.1f}" for p in parts)
        lines.append(f"| {label} | {cells} | {total / 1000:.1f} ({total / r['process() on SQLite']:.0%}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=sorted(set(MODES.values())))
    ap.add_argument("--n", type=int, default=20_000)
    cfg = ap.parse_args()
    if cfg.child:
        print(json.dumps(child(cfg.child, cfg.n)))
    else:
        print(measure(cfg.quick))


if __name__ == "__main__":
    main()
