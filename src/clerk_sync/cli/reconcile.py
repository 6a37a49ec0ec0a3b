"""``clerk-sync reconcile`` on the terminal: a Rich progress bar, the rows changed (a dry run: the rows it would
change), the summary.

The reconciling itself lives in :mod:`clerk_sync.reconcile`; this module only presents it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog

from clerk_sync._logging import configure_logging
from clerk_sync.changes import Hook
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.cli._args import parse_since
from clerk_sync.cli._database import existing_store
from clerk_sync.mapping import SchemaMapping
from clerk_sync.reconcile import Change, Reconciler, ReconcileReport
from clerk_sync.store import Store

__all__ = ["reconcile_command"]  # (unread_objects: for the faces' commands, not the API)

# Lines printed per kind of change. A first import creates every row (thousands of "+ users user_..." lines
# that say nothing the summary's count does not, and would bury the rest), so creations get a few lines;
# updates and deletions are the drift an operator came to review, so they get more, each kind its own budget
# (a flood of one never hides another). The rest is counted ("... and N more"), and a real run logs every change.
_SHOWN = {"create": 20, "update": 200, "delete": 200}
_MARKS = {"create": "[green]+[/]", "update": "[yellow]~[/]", "delete": "[red]-[/]"}
_PAST = {"create": "created", "update": "updated", "delete": "deleted"}


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
    """``clerk-sync reconcile``: a Rich progress bar on ``console`` (stderr); the rows changed (a dry run: would
    change; see :data:`_SHOWN`) and the summary on stdout, once the bar is gone (printed during it, in a
    terminal, they went to the bar's stderr). ``hooks`` fire for the repairs (``--with-hooks``). ``store``: an
    app's own (Flask's ``ClerkSync(app, store=...)``, its mapping and hooks; left open), else one from
    ``settings``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    out = Console()

    own = store is None
    if store is None:
        store = existing_store(settings, hooks=hooks, mapping=mapping)
    diff = _Diff()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with (_logging(settings), ClerkClient.from_settings(settings) as clerk,
              RichProgress(*columns, console=console) as bar):
            reconciler = Reconciler(store, clerk, progress=_RichProgress(bar), on_change=diff.add,
                                    with_hooks=bool(hooks), allow_mass_delete=allow_mass_delete,
                                    instance_id=settings.instance_id)
            report = reconciler.run(since=parse_since(since), dry_run=dry_run)
    finally:
        if own:
            store.dispose()
        # a failed run's repairs too: they are committed; "each is in the log" only where INFO lines are written
        diff.print(out, logged=not dry_run and (structlog.is_configured() or _info_logged(settings)))
    out.print(_summary_table(report))
    return report


class _Diff:
    """The changes to print: the first ones of each kind (:data:`_SHOWN`), the others counted."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.seen = dict.fromkeys(_SHOWN, 0)

    def add(self, change: Change) -> None:
        self.seen[change.action] += 1
        if self.seen[change.action] <= _SHOWN[change.action]:
            extra = f" ({', '.join(change.fields)})" if change.fields else ""  # field names, never values
            self.lines.append(f"{_MARKS[change.action]} {change.entity.value} {change.clerk_id}{extra}")

    def print(self, out: Any, *, logged: bool) -> None:
        for line in self.lines:
            out.print(line, highlight=False)
        more = [f"{n - _SHOWN[action]} more {_PAST[action]}" for action, n in self.seen.items() if n > _SHOWN[action]]
        if more:
            where = " (each is in the log: reconcile_change)" if logged else ""
            out.print(f"... and {', '.join(more)}{where}", highlight=False)


class _Stderr:
    """``sys.stderr`` as it is when written to: inside the progress bar, in a terminal, Rich's stand-in, which
    prints the line above the bar (the stream itself, taken when logging is set up, tore the bar apart)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _info_logged(settings: Any) -> bool:
    """Whether the command's own log set-up (:func:`_logging`) writes INFO lines (``reconcile_change``). An
    app's own structlog set-up is its to filter: the command cannot tell, and assumes it does."""
    return str(getattr(settings, "log_level", "INFO")).upper() in ("DEBUG", "INFO")


@contextmanager
def _logging(settings: Any) -> Iterator[None]:
    """Log lines (a real run's ``reconcile_change``, one per change) on stderr at ``CLERK_SYNC_LOG_LEVEL``, for
    the command, unless the process set up structlog itself (a Flask or Django app: its format, its place).
    structlog's defaults print every level on stdout, among the diff and the summary."""
    if structlog.is_configured():
        yield
        return
    configure_logging(settings.log_level)
    # uncached: a logger bound now would keep this set-up after the command (a test run, an app's shell)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
                        cache_logger_on_first_use=False)
    try:
        yield
    finally:
        structlog.reset_defaults()


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
        updated = str(counts.updated) + (f" (+{counts.lockouts_ended} lockouts ended)" if counts.lockouts_ended else "")
        table.add_row(entity, str(counts.created), updated, deleted, str(counts.unchanged), str(counts.failed))
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
