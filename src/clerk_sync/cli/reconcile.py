"""``clerk-sync reconcile`` on the terminal: a Rich progress bar, the diff of a dry run, the summary.

The reconciling itself lives in :mod:`clerk_sync.reconcile`; this module only presents it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clerk_sync.changes import Hook
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.cli._args import parse_since
from clerk_sync.mapping import SchemaMapping
from clerk_sync.reconcile import Change, Reconciler, ReconcileReport
from clerk_sync.store import Store

__all__ = ["reconcile_command"]  # (unread_objects: for the faces' commands, not the API)

_DIFF_LINES = 200
_MARKS = {"create": "[green]+[/]", "update": "[yellow]~[/]", "delete": "[red]-[/]"}


def unread_objects(report: ReconcileReport) -> str | None:
    """Why a run must exit 1 on every face (their rows were not repaired: a scheduled run must not look
    fine), or None."""
    failed = report.total("failed")
    if not failed:
        return None
    return (f"{failed} Clerk object(s) could not be read (the summary's failed column says of which table): Clerk "
            "listed them in a shape this version refuses (an id or updated_at missing or malformed), so their rows "
            "were left as they were. Upgrade clerk-sync, or report it")


def reconcile_command(settings: Any, *, since: str | None, dry_run: bool, console: Any,
                      hooks: Sequence[Hook] = (), mapping: SchemaMapping | None = None,
                      allow_mass_delete: bool = False, store: Store | None = None) -> ReconcileReport:
    """``clerk-sync reconcile``: a Rich progress bar on ``console`` (stderr), the diff (dry run) and the
    summary on stdout. ``hooks`` fire for the repairs (``--with-hooks``). ``store``: an app's own (Flask's
    ``ClerkSync(app, store=...)``, its mapping and hooks; left open), else one from ``settings``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    out = Console()

    own = store is None
    if store is None:
        store = Store.from_settings(settings, hooks=hooks, mapping=mapping)
    shown = [0]

    def show(change: Change) -> None:
        shown[0] += 1
        if shown[0] <= _DIFF_LINES:
            extra = f" ({', '.join(change.fields)})" if change.fields else ""
            out.print(f"{_MARKS[change.action]} {change.entity.value} {change.clerk_id}{extra}")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with ClerkClient.from_settings(settings) as clerk, RichProgress(*columns, console=console) as bar:
            reconciler = Reconciler(store, clerk, progress=_RichProgress(bar), on_change=show, with_hooks=bool(hooks),
                                    allow_mass_delete=allow_mass_delete, instance_id=settings.instance_id)
            report = reconciler.run(since=parse_since(since), dry_run=dry_run)
    finally:
        if own:
            store.dispose()
    if shown[0] > _DIFF_LINES:
        out.print(f"... and {shown[0] - _DIFF_LINES} more changes")
    out.print(_summary_table(report))
    return report


class _RichProgress:
    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._tasks: dict[str, Any] = {}

    def start(self, phase: str, total: int | None, completed: int) -> None:
        if phase in self._tasks:  # the listing outgrew its total (see Progress): the same bar, a new total
            self._bar.update(self._tasks[phase], total=total, completed=completed)
        else:
            self._tasks[phase] = self._bar.add_task(phase, total=total, completed=completed)

    def advance(self, phase: str, n: int) -> None:
        self._bar.advance(self._tasks[phase], n)


def _summary_table(report: ReconcileReport) -> Any:
    from rich.table import Table

    title = "reconcile (dry run: nothing written)" if report.dry_run else f"reconcile run {report.run_id}"
    if report.resumed:
        title += " (resumed)"
    table = Table(title=title)
    for name in ("table", "created", "updated", "deleted", "unchanged", "failed"):
        table.add_column(name, justify="left" if name == "table" else "right")
    for entity, counts in report.counts.items():
        deleted = str(counts.deleted) if entity in report.swept else "not checked"
        table.add_row(entity, str(counts.created), str(counts.updated), deleted, str(counts.unchanged),
                      str(counts.failed))
    table.caption = _caption(report)
    return table


def _caption(report: ReconcileReport) -> str:
    """The run's Clerk requests and time; a resumed run's say they count its interrupted processes too (they
    are the run's, as stored in ``reconcile_runs``), and what this process took."""
    said = f"{report.requests} Clerk requests ({report.rate_limited} answered 429), {report.duration_s:.1f}s"
    if not report.resumed:
        return said
    return (f"{said} in all, counting the interrupted run's {report.requests_before} requests and "
            f"{report.duration_before_s:.1f}s; this process: {report.requests - report.requests_before} requests, "
            f"{report.duration_s - report.duration_before_s:.1f}s")
