"""Reconcile from the console: one run at a time in a background thread, polled by the page.

A dry run lists what is missing (``create``), stale (``update``) and to delete; "apply" then runs a
real reconcile, which re-reads Clerk rather than replaying the dry run's diff (Clerk may have moved
on since). Both go through :class:`~clerk_sync.reconcile.Reconciler`, so they spend the shared rate
budget like ``clerk-sync reconcile`` does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.errors import ReconcileBusy
from clerk_sync.metrics import Metrics
from clerk_sync.reconcile import Change, Reconciler, ReconcileReport
from clerk_sync.store import Store

__all__ = ["MAX_CHANGES_SHOWN", "DriftJob"]

MAX_CHANGES_SHOWN = 500
_KINDS = {"create": "missing", "update": "stale", "delete": "to_delete"}


class DriftJob:
    """The state of the latest console reconcile; :meth:`snapshot` is what the page polls."""

    def __init__(self, store: Store, clerk: ClerkClient, *, now: Callable[[], datetime],
                 metrics: Metrics | None = None, instance_id: str | None = None) -> None:
        self.store = store
        self.clerk = clerk
        self.instance_id = instance_id  # CLERK_INSTANCE_ID: the instance the key must belong to (Reconciler)
        self._now = now
        self.metrics = metrics  # the console's runs count in clerk_sync_reconcile_* as the CLI's do
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._state: dict[str, Any] = {"status": "idle"}

    def start(self, *, dry_run: bool, actor: str | None, ip: str | None,
              audit_details: Mapping[str, Any] | None = None) -> None:
        """Start a run in the background (ReconcileBusy while one is running). ``audit_details``: added to the
        applied run's audit row (the console's ``via``/``as``)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise ReconcileBusy("a console reconcile is already running; wait for it to finish")
            self._state = {"status": "running", "dry_run": dry_run, "started_at": self._now().isoformat(),
                           "actor": actor, "phases": {}, "changes": [], "counts": {k: 0 for k in _KINDS.values()}}
            self._thread = threading.Thread(target=self._run, args=(dry_run, actor, ip, dict(audit_details or {})),
                                            name="console-reconcile", daemon=True)
            self._thread.start()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            state = dict(self._state)
            state["phases"] = {k: dict(v) for k, v in state.get("phases", {}).items()}
            state["changes"] = list(state.get("changes", []))
            state["counts"] = dict(state.get("counts", {}))
            return state

    def wait(self, timeout: float) -> bool:
        """Block until the current run ends (for tests and scripts); True when none is running."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    # -- the worker thread -------------------------------------------------------------------------
    def _run(self, dry_run: bool, actor: str | None, ip: str | None, audit_details: dict[str, Any]) -> None:
        reconciler = Reconciler(self.store, self.clerk, progress=_Progress(self), on_change=self._change,
                                metrics=self.metrics, instance_id=self.instance_id)
        try:
            report = reconciler.run(dry_run=dry_run)
        except Exception as exc:
            self._update(status="failed", error=f"{type(exc).__name__}: {exc}", finished_at=self._now().isoformat())
            return
        if not dry_run:
            with self.store.transaction() as w:
                record_audit(w, AuditEntry("console.reconcile.applied", actor, None,
                                           details={**audit_details, **_summary(report)}, ip=ip))
        self._update(status="done", report=_summary(report), finished_at=self._now().isoformat())

    def _update(self, **values: Any) -> None:
        with self._lock:
            self._state.update(values)

    def _change(self, change: Change) -> None:
        kind = _KINDS[change.action]
        with self._lock:
            self._state["counts"][kind] += 1
            if len(self._state["changes"]) < MAX_CHANGES_SHOWN:
                self._state["changes"].append({"kind": kind, "entity": change.entity.value,
                                               "clerk_id": change.clerk_id, "fields": list(change.fields)})

    def _phase(self, phase: str, total: int | None, completed: int) -> None:
        with self._lock:
            self._state["phases"][phase] = {"total": total, "done": completed}
            self._state["phase"] = phase

    def _advance(self, phase: str, n: int) -> None:
        with self._lock:
            self._state["phases"].setdefault(phase, {"total": None, "done": 0})["done"] += n


class _Progress:
    """:class:`clerk_sync.reconcile.Progress` feeding the job's state."""

    def __init__(self, job: DriftJob) -> None:
        self.job = job

    def start(self, phase: str, total: int | None, completed: int) -> None:
        self.job._phase(phase, total, completed)

    def advance(self, phase: str, n: int) -> None:
        self.job._advance(phase, n)


def _summary(report: ReconcileReport) -> dict[str, Any]:
    return {"run_id": report.run_id, "dry_run": report.dry_run, "requests": report.requests,
            "rate_limited": report.rate_limited, "duration_s": round(report.duration_s, 2),
            "counts": {k: asdict(v) for k, v in report.counts.items()}}
