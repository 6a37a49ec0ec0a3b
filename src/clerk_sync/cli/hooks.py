"""``clerk-sync worker`` (the hook dispatcher as its own process) and ``clerk-sync hooks list|retry|purge``.

Hooks are Python code, so the commands that run them take ``--hooks module:attribute``: a list of
:class:`~clerk_sync.changes.Hook`, or a function returning one (called once, with no arguments).
Listing, retrying and purging dead jobs need only the database; ``retry`` and ``purge`` name the ids that
are not dead jobs and exit with 1, and ``retry`` names the jobs whose entity has changed since.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import sqlalchemy as sa
import structlog
import typer
from rich.console import Console
from sqlalchemy.engine import Connection

from clerk_sync._time import aware
from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.changes import Change, Event, Hook
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.cli._database import existing_store
from clerk_sync.config import Settings
from clerk_sync.engine import Entity
from clerk_sync.errors import ConfigError, EventShapeError
from clerk_sync.events import user_record
from clerk_sync.freshness import BACKFILLED
from clerk_sync.mapping import LinkLookup, SchemaMapping
from clerk_sync.outbox import RAW_PAYLOAD, delete_jobs, list_jobs, parsed_payload, retry_jobs
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs, organization_memberships, organizations, users

if TYPE_CHECKING:
    from clerk_sync.metrics import Metrics

__all__ = ["HOOKS_HELP", "MAPPING_HELP", "MappingMigrated", "hooks_app", "load_hooks", "load_mapping",
           "migrate_mapping", "worker"]

log = structlog.get_logger("clerk_sync.cli")
HOOKS_HELP = "Your hooks, as module:attribute (a list of Hook, or a function returning one)."
MAPPING_HELP = "Your tables' mapping, as module:attribute (a SchemaMapping, or a function returning one)."
hooks_app = typer.Typer(help="Inspect and repair the after-commit hook queue (dead jobs).", no_args_is_help=True)


@dataclass(frozen=True, slots=True)
class MappingMigrated:
    """What :func:`migrate_mapping` did: the lines to print (iterating gives them), and how many rows the
    backfill could not write whole (``refused``: refused, or written without the columns the user sets in Clerk
    that the app's table refused; the commands exit 1, work left undone, as ``replay`` does)."""

    lines: list[str]
    refused: int = 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines)


def migrate_mapping(store: Store, schema: SchemaMapping, *, backfill: bool = False,
                    settings: Settings | None = None) -> MappingMigrated:
    """``migrate``'s part past clerk-sync's own tables, one for every face's command (``clerk-sync migrate
    --mapping``, ``flask clerk-sync migrate``, ``manage.py clerk_sync migrate``): what the mapped tables need
    (:func:`~clerk_sync.mapping.migrate_schema`), then with ``backfill`` the rows clerk-sync holds written into
    them, a page per transaction (:meth:`~clerk_sync.mapping.SchemaMapping.backfill`). Returns the lines to print.
    ``refused`` counts the rows the backfill could not write (each logged as ``backfill_row_refused``).
    A mapping that links existing rows asks Clerk (``settings``' secret key, rate limited) what links each user
    not written yet (:func:`clerk_link_lookup`); without a key such users are refused, and linked by their
    next event.

    On PostgreSQL the Clerk-id column's unique index is built CONCURRENTLY, after the columns are committed:
    the app's table takes writes all along. A build that fails (duplicate Clerk ids, the lock bound) drops
    the INVALID index it left and raises; one left by an interrupted run is dropped and built again. MariaDB
    (InnoDB builds it online) and SQLite build it in the columns' transaction."""
    from clerk_sync.mapping import build_unique_indexes_concurrently, migrate_schema

    concurrently = store.engine.dialect.name == "postgresql"
    with store.engine.begin() as conn:
        done = migrate_schema(conn, schema, unique_indexes=not concurrently)
    if concurrently:
        done += build_unique_indexes_concurrently(store.engine, schema)
    lines = [f"mapping: {line}" for line in done or ["mapped tables already have what the mapping needs"]]
    refused = 0
    if backfill:
        links = Entity.USER in schema.tables and schema.tables[Entity.USER].links
        key = settings.clerk_secret_key if settings is not None else None
        if links and key is None:
            lines.append("mapping: no CLERK_SECRET_KEY: users an existing row may be theirs are not written (counted "
                         "refused) and are linked by their next event; set it to link them now")
        clerk = ClerkClient.from_settings(settings) if links and settings is not None and key is not None else None
        started = time.time()
        try:
            counts = schema.backfill(store, lookup=None if clerk is None else clerk_link_lookup(clerk))
        finally:
            if clerk is not None:
                clerk.close()
        lines.append(f"mapping: backfilled {counts or 'nothing'}")
        refused, kept_back = counts.get("refused", 0), counts.get("kept_back", 0)
        if kept_back:  # written, but the user's own values for some columns are not: not yet repaired (freshness)
            lines.append(f"mapping: {kept_back} row(s) written without the columns the user sets in Clerk, which the "
                         "app's table refused (the warnings above name the table and columns): widen or relax "
                         "those columns, then run the backfill again")
        if not refused and not kept_back:  # every row written whole: the refusals received before it started are
            # repaired (freshness)
            with store.transaction() as writer:
                record_audit(writer, AuditEntry(BACKFILLED, None, details={"started_at": started,
                                                                           "counts": dict(counts)}))
        if refused:
            lines.append(f"mapping: {refused} row(s) refused, not written (the warnings above, backfill_row_refused, "
                         "say why: an ambiguous link, the table's own constraint, a compute that raised); fix what "
                         "they name, then run the backfill again (it is idempotent)")
        refused += kept_back
    return MappingMigrated(lines, refused)


def clerk_link_lookup(clerk: ClerkClient) -> LinkLookup:
    """What links users (e-mail, its verification, external id), read from Clerk's user list 100 ids a call."""
    def lookup(ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(ids, 100):
            for data in clerk.list_users(limit=len(chunk), order_by=None, user_ids=chunk):
                try:
                    record = user_record(data)
                except EventShapeError:  # left out: the backfill refuses it (LinkUnverified), as reconcile skips it
                    log.warning("backfill_lookup_unreadable", clerk_id=str(data.get("id"))[:64])
                    continue
                found[record.clerk_id] = {"email": record.email, "email_verified": record.email_verified,
                                          "external_id": record.external_id}
        return found
    return lookup


def _load(option: str, spec: str, fits: Callable[[Any], bool], wanted: str) -> tuple[Any, bool]:
    """The value ``spec`` names (a function's result), and whether it was called. ``fits`` tells the values the
    option takes (suggested when the attribute is not there), ``wanted`` says them."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{option} {spec!r}: expected module:attribute, e.g. myapp.clerk:VALUE")
    try:
        module = _import(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and f"{module_name}.".startswith(f"{exc.name}."):  # itself or a parent package
            raise ConfigError(f"{option} {spec!r}: no module named {exc.name!r} in the current directory "
                              f"({os.getcwd()}) or on PYTHONPATH (run from the project's directory, or set "
                              "PYTHONPATH)") from None
        raise _failed(option, spec, "importing it", exc, _IMPORT_ADVICE) from None
    except Exception as exc:  # its own code failed (a SyntaxError, a KeyError on os.environ, a dependency)
        raise _failed(option, spec, "importing it", exc, _IMPORT_ADVICE) from None
    try:
        value: Any = getattr(module, attr)
    except AttributeError:
        found = sorted(name for name, held in vars(module).items() if not name.startswith("_") and fits(held))
        hint = (f"; it has {', '.join(f'{module_name}:{name}' for name in found)}" if found else
                f"; {option} takes {wanted}")
        raise ConfigError(f"{option} {spec!r}: module {module_name!r} has no attribute {attr!r}{hint}") from None
    if not callable(value) or isinstance(value, SchemaMapping):
        return value, False
    if needed := _required_parameters(value):
        advice = _handler_advice(option, module_name, attr) if not inspect.isclass(value) else ""
        raise ConfigError(f"{option} {spec!r}: {attr} needs arguments ({', '.join(needed)}), and {option} calls "
                          f"a function with none: it takes {wanted}{advice}")
    try:
        return value(), True
    except Exception as exc:
        raise _failed(option, spec, f"calling {attr}()", exc, "fix the function, or what it needs") from None


def _required_parameters(function: Callable[..., Any], *, all_: bool = False) -> list[str]:
    """The parameters ``function`` cannot be called without (``all_``: every parameter it takes; none known: a
    builtin without a signature)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if all_ or (p.default is p.empty and p.kind not in (p.VAR_POSITIONAL,
                                                                                          p.VAR_KEYWORD))]


def _handler_advice(option: str, module_name: str, attr: str) -> str:
    """For ``--hooks`` naming a handler (a function of a change) rather than the hooks list."""
    if option not in ("--hooks", "--with-hooks"):
        return ""
    return (f"; that looks like a handler: wrap it in a Hook, in a list (HOOKS = [Hook(\"{attr}\", {attr}, "
            f"on=[\"user.created\"])]), and point {option} at the list ({module_name}:HOOKS)")


def _import(module_name: str) -> Any:
    """Import ``module_name``; one not found is looked for in the current directory too, as ``python -m``,
    uvicorn and gunicorn do (an installed console script has only its own directory on ``sys.path``, so
    ``clerk-sync serve --hooks myapp.hooks:HOOKS`` run from the project failed without ``PYTHONPATH=.``).
    The directory goes last, so a module of the project never shadows an installed one."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}.") or cwd in sys.path:
            raise
        sys.path.append(cwd)
        importlib.invalidate_caches()
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as again:
            if again.name == exc.name:  # not there either: leave sys.path as it was
                sys.path.remove(cwd)
            raise


_IMPORT_ADVICE = "fix the module, or what it needs at import: an environment variable, an installed package"


def _failed(option: str, spec: str, doing: str, exc: Exception, advice: str) -> ConfigError:
    """The exception's type and first line (what the module's author needs), without its traceback."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return ConfigError(f"{option} {spec!r}: {doing} raised {type(exc).__name__}: {first} ({advice})")


def _hooks_list(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and bool(value)
            and all(isinstance(h, Hook) for h in value))


_HOOKS_WANTED = "a list of clerk_sync.changes.Hook, or a function returning one"


def load_hooks(spec: str, option: str = "--hooks") -> list[Hook]:
    """Import ``module:attribute`` and return its hooks; every mistake is a :class:`ConfigError` naming
    ``option`` (``replay`` and ``reconcile`` take theirs as ``--with-hooks``)."""
    value, called = _load(option, spec, _hooks_list, _HOOKS_WANTED)
    if not _hooks_list(value):
        module_name, _, attr = spec.partition(":")
        if isinstance(value, Hook):
            why = f": {attr} is one Hook; put it in a list ([{attr}])"
        elif called:  # a handler whose change parameter has a default, or a factory that forgot its return
            function = getattr(importlib.import_module(module_name), attr)
            handler = not inspect.isclass(function) and _required_parameters(function, all_=True)
            advice = _handler_advice(option, module_name, attr) if handler else "; make it return the list"
            why = f": calling {attr}() returned {_shown(value)}{advice}"
        else:
            why = f", not {_shown(value)}"
        raise ConfigError(f"{option} {spec!r} must be a non-empty list of clerk_sync.changes.Hook (or a function "
                          f"returning one){why}")
    return list(value)


def _shown(value: Any) -> str:
    """What a loaded value is, briefly: ``None``, ``[]``, or its type."""
    return repr(value) if value is None or (isinstance(value, Sequence | dict) and not value) else \
        f"a {type(value).__name__}"


def load_mapping(spec: str | None) -> SchemaMapping | None:
    """Import ``module:attribute`` and return its :class:`SchemaMapping` (None when ``spec`` is None)."""
    if spec is None:
        return None
    value, _ = _load("--mapping", spec, lambda held: isinstance(held, SchemaMapping),
                     "a clerk_sync.mapping.SchemaMapping, or a function returning one")
    if not isinstance(value, SchemaMapping):
        raise ConfigError(f"--mapping {spec!r} must be a clerk_sync.mapping.SchemaMapping")
    return value


_DAY_S = 86400.0  # the longest --poll and --lease: longer overflows a wait (1e300) or breaks the heartbeat (inf)
_MAX_JOB_ID = 2**63 - 1  # the outbox's ids are 64-bit: a larger one overflowed in the driver or the database


def _poll_seconds(value: float) -> float:
    if not 0 <= value <= _DAY_S:  # NaN too
        raise typer.BadParameter(f"must be from 0 to {_DAY_S:g} seconds (a day), not {value}")
    return value


def _lease_seconds(value: float) -> float:
    if not 0 < value <= _DAY_S:  # NaN too
        raise typer.BadParameter(f"must be more than 0 and at most {_DAY_S:g} seconds (a day), not {value}")
    return value


def _job_ids(ids: list[int] | None) -> list[int] | None:
    wrong = [i for i in ids or () if not 1 <= i <= _MAX_JOB_ID]
    if wrong:
        raise typer.BadParameter(f"job ids are from 1 to {_MAX_JOB_ID} (the first column of `clerk-sync hooks "
                                 f"list`), not {', '.join(map(str, wrong))}")
    return ids


def worker(
    hooks: Annotated[str, typer.Option(help=HOOKS_HELP)],
    once: Annotated[bool, typer.Option("--once", help="Run the due jobs, then exit (a run past its hook's "
                                       "timeout_s is waited for up to a lease; exit 1 if a job died or one "
                                       "still runs).")] = False,
    poll: Annotated[float, typer.Option(
        callback=_poll_seconds, help="Seconds between polls of an empty queue (0 to 86400: a day).")] = 1.0,
    batch: Annotated[int, typer.Option(
        min=1, help="The most jobs one claim takes (fewer while handlers are slow: a tenth of the lease's worth)."),
    ] = 500,
    lease: Annotated[float, typer.Option(
        callback=_lease_seconds, help="Seconds a claim lasts (a heartbeat extends it every third of it; more than 0, "
        "at most 86400: a day).")] = 60.0,
    vacuum_every: Annotated[int, typer.Option(
        min=0, help="PostgreSQL: VACUUM the outbox after so many finished jobs (0: leave it to autovacuum).")] = 1000,
    max_overdue: Annotated[int, typer.Option(
        min=1, help="The most runs of one hook past its timeout_s left running (their jobs stay claimed): a "
        "hook at it has no new job claimed until one of its runs ends; the other hooks' jobs go on.")] = 4,
    metrics_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Serve this worker's hook series (clerk_sync_hook_runs_total, _seconds, "
        "_overdue_total, clerk_sync_hook_overdue_running) at http://HOST:PORT/metrics.")] = None,
    metrics_host: Annotated[str, typer.Option(help="The address --metrics-port listens on.")] = "127.0.0.1",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines.")] = False,
) -> None:
    """Run after-commit hooks from the outbox (DATABASE_URL); run several for more throughput."""
    from clerk_sync._logging import configure_logging
    from clerk_sync.metrics import Metrics

    settings = Settings.from_env()
    # serve's set-up: CLERK_SYNC_LOG_LEVEL, logfmt (JSON with --json-logs) on stderr; without it the worker
    # logged with structlog's defaults, every level, on stdout (a warning a second while the database was down)
    configure_logging(settings.log_level, json=json_logs)
    # An existing database only: a worker never migrates, so a SQLite path it would create (a typo, another
    # directory) was an empty second database it polled for ever, "no such table" a line every few seconds
    store = existing_store(settings, hooks=load_hooks(hooks))
    with _own_metrics_dir():
        if once:
            _run_once(store, batch=batch, lease_s=lease, poll_s=poll, vacuum_every=vacuum_every,
                      max_overdue=max_overdue)
            return
        _run_forever(store, Metrics(), batch=batch, lease_s=lease, poll_s=poll, vacuum_every=vacuum_every,
                     max_overdue=max_overdue, metrics_port=metrics_port, metrics_host=metrics_host)


@contextlib.contextmanager
def _own_metrics_dir() -> Iterator[None]:
    """With PROMETHEUS_MULTIPROC_DIR set (prometheus_client keeps every value in a file there), the worker
    takes what ``serve`` takes: a fresh directory inside it, made if missing (it crashed on a missing one), and
    removed when it stops (its files were left in the operator's directory, added to every later run's)."""
    from clerk_sync.metrics import _multiprocess

    if not _multiprocess():
        yield
        return
    from clerk_sync.cli._serve import shared_metrics

    with shared_metrics():
        yield


def _run_forever(store: Store, metrics: Metrics, *, metrics_port: int | None, metrics_host: str,
                 **options: Any) -> None:
    from clerk_sync.hooks import Dispatcher

    if metrics_port is not None:  # prometheus_client's own server, in a daemon thread
        from prometheus_client import start_http_server

        try:
            start_http_server(metrics_port, metrics_host, registry=metrics.registry)
        except OSError as exc:
            from clerk_sync.cli._args import PortInUse

            error = PortInUse if exc.errno == errno.EADDRINUSE else ConfigError  # in use: exit 3, as serve's port
            raise error(f"--metrics-port {metrics_port} on {metrics_host}: {exc.strerror or exc}; choose a "
                        "free port (each worker on a host needs its own)") from exc
    dispatcher = Dispatcher(store, metrics=metrics, **options)
    signal.signal(signal.SIGTERM, lambda *_: dispatcher.stop(timeout_s=0))
    from clerk_sync._urls import masked_url

    Console(stderr=True).print(f"clerk-sync worker: hooks {[h.name for h in store.hooks]} on "
                               f"{masked_url(store.engine.url.render_as_string(hide_password=False))}", soft_wrap=True)
    try:
        dispatcher.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        store.dispose()


def _run_once(store: Store, **options: Any) -> None:
    """``worker --once``: run the due jobs and say how each ended; exit 1 when one died (a cron run must
    not look fine while jobs wait for a person in ``hooks list``; one a claim marked dead unrun counts), or
    when a run past its hook's ``timeout_s`` still runs after a lease's wait (its job runs again once the
    lease ends)."""
    from clerk_sync.hooks import Dispatcher
    from clerk_sync.metrics import Metrics

    metrics = Metrics()  # this run's own registry: the outcomes of these jobs only
    try:
        dispatcher = Dispatcher(store, metrics=metrics, **options)
        # A run past its hook's timeout_s (overdue) is waited for, up to a lease in all, and its outcome
        # recorded; then what it held back is run (its entity's later jobs, the claims max_overdue stopped)
        count, overdue = dispatcher.drain(), 0
        deadline = time.monotonic() + options["lease_s"]  # (from here: a long backlog's drain is not the wait)
        while dispatcher.overdue and not overdue and time.monotonic() < deadline:
            overdue = dispatcher.settle(max(0.0, deadline - time.monotonic()))
            if not overdue:
                count += dispatcher.drain()
        overdue = dispatcher.settle(0.0)  # (the lease's time spent: what ended is recorded, the rest said)
    finally:
        store.dispose()
    ended = {outcome: 0 for outcome in ("ok", "retry", "dead", "lost")}
    for metric in metrics.hook_runs.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                ended[sample.labels["outcome"]] = ended.get(sample.labels["outcome"], 0) + int(sample.value)
    unrun = dispatcher.dead_at_claim  # (counted dead in the metrics too)
    Console(stderr=True).print(f"ran {count} hook jobs: {ended['ok']} ok, {ended['retry']} failed (queued again "
                               f"after a backoff), {ended['dead'] - unrun} dead, {ended['lost']} lost their lease"
                               + (f"; {unrun} more marked dead unrun (lease expired on their last attempt, or a "
                                  "payload that cannot be read)" if unrun else ""))
    if overdue:
        waited = f"{options['lease_s']:g} s"
        Console(stderr=True).print(
            f"[red]{overdue} handler run(s) past their hook's timeout_s still running after {waited}[/] (a "
            "lease): left unrecorded, their jobs run again once the lease ends; give the handlers' network calls "
            "a timeout")
    if ended["dead"]:
        Console(stderr=True).print(f"[red]{ended['dead']} job(s) died[/]: `clerk-sync hooks list` shows why; fix "
                                   "the cause, then `clerk-sync hooks retry ID...` (or `--all`)")
    if overdue or ended["dead"]:
        raise typer.Exit(1)


def _store() -> Store:
    return existing_store(Settings.from_env())


def _ids(ids: list[int] | None, all_: bool, verb: str) -> list[int] | None:
    if not ids and not all_:
        also = " (or --hook NAME: a removed hook's jobs)" if verb == "purge" else ""
        raise ConfigError(f"name the dead jobs to {verb} (ids from `clerk-sync hooks list`), or pass --all{also}")
    if ids and all_:  # which one was meant? --all used to win silently
        raise ConfigError(f"pass job ids or --all, not both: `hooks {verb} --all` {verb}s every dead job")
    return None if all_ else ids


@hooks_app.command("list")
def list_command(
    status: Annotated[Literal["dead", "pending", "running"], typer.Option(help="dead, pending or running.")] = "dead",
    limit: Annotated[int, typer.Option(min=1, max=_MAX_JOB_ID, help="At most this many.")] = 50,
) -> None:
    """List queued hook jobs (dead ones by default), tab-separated: id, hook, type, Clerk id, attempts, error,
    idempotency key (what a receiver got as ``webhook-id``, ``message_id`` or the stream's ``idempotency_key``),
    and for a pending job ``next=`` when its next attempt is due (UTC; empty for the others).

    Backslash, tab, newline and carriage return within a field are written \\\\, \\t, \\n and \\r;
    other control characters \\xNN (an escape sequence in an error is shown, not acted on by a terminal).
    """
    store = _store()
    with store.connect() as conn:
        jobs = list_jobs(conn, status=status, limit=limit)
        due_at = _next_attempts(conn, [job.id for job in jobs]) if status == "pending" else {}
        waiting = _due_by_hook(conn, store.now()) if status == "pending" else []
    store.dispose()
    for job in jobs:  # one line per job, fields never holding a tab or newline (`cut -f1` gives the ids)
        # (new columns go at the end: scripts cut the first six by position)
        at = due_at.get(job.id)
        about = job.change.subject if isinstance(job.change, Event) else job.change.clerk_id
        fields = (job.hook, job.change.type, about, f"attempts={job.attempts}", job.last_error or "",
                  job.change.idempotency_key, f"next={at:%Y-%m-%dT%H:%M:%SZ}" if at is not None else "")
        typer.echo("\t".join([str(job.id), *map(_one_field, fields)]))
    Console(stderr=True).print(f"{len(jobs)} {status} job(s)")
    if waiting:
        due = ", ".join(f"{hook!r} {count} (the oldest waiting {waited:.0f}s)" for hook, count, waited in waiting)
        Console(stderr=True, highlight=False).print(
            f"due now, by hook: {due}. A dispatcher claims only the jobs of the hooks it has: is a hook whose "
            "jobs wait in no running worker's --hooks (nor serve's)? If so, deploy it there, or, if it was removed or "
            "renamed, `clerk-sync hooks purge --hook NAME` (its changes will not be handled). Nor does it claim "
            "the jobs of a hook with max_overdue runs hanging past its timeout_s (`hooks list --status running`; "
            "its log says 'hook runs overdue at max_overdue')", soft_wrap=True)


def _next_attempts(conn: Connection, ids: list[int]) -> dict[int, datetime]:
    """When each of these jobs is next due (its ``available_at``, in UTC)."""
    found: dict[int, datetime] = {}
    for start in range(0, len(ids), 500):  # (a --limit in the thousands: bounded IN lists)
        query = sa.select(hook_jobs.c.id, hook_jobs.c.available_at).where(hook_jobs.c.id.in_(ids[start:start + 500]))
        found.update((job_id, aware(at).astimezone(UTC)) for job_id, at in conn.execute(query))
    return found


def _due_by_hook(conn: Connection, now: datetime) -> list[tuple[str, int, float]]:
    """The due pending jobs by hook: how many, and how long the oldest has waited (as ``doctor --freshness``
    counts it, since it was queued), the longest wait first."""
    j = hook_jobs
    query = (sa.select(j.c.hook, sa.func.count(), sa.func.min(j.c.created_at))
             .where(j.c.status == "pending", j.c.available_at <= now).group_by(j.c.hook))
    rows = [(hook, int(count), max(0.0, (now - aware(oldest)).total_seconds()))
            for hook, count, oldest in conn.execute(query)]
    return sorted(rows, key=lambda row: -row[2])


def _one_field(text: str) -> str:
    """Backslash, newline, carriage return and tab as backslash escapes (\\\\, \\n, \\r, \\t), every other
    control character (C0, DEL, C1) as \\xNN: a receiver's answer or a handler's message in a job's last error
    reaches the terminal as text, never as an escape sequence it acts on (a title, colours, a cleared screen)."""
    return text.translate(_FIELD_ESCAPES)


_FIELD_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


@hooks_app.command("retry")
def retry_command(
    ids: Annotated[list[int] | None, typer.Argument(callback=_job_ids, help="Job ids.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead job.")] = False,
) -> None:
    """Queue dead jobs again, with a fresh attempt budget.

    A job whose entity has changed since (a newer version applied, or queued) is named on stderr: its
    handler will get the older change after newer ones, out of order.
    """
    wanted = _ids(ids, all_, "retry")
    store = _store()
    with store.connect() as conn:
        refused = _not_dead(conn, wanted)
    count, stale = _retry_dead(store, wanted, datetime.now(UTC), page=_RETRY_PAGE)
    store.dispose()
    for line in stale:
        typer.echo(line, err=True)
    typer.echo(f"{count} dead job(s) queued again")
    _refuse(refused)


_RETRY_PAGE = 500  # dead jobs queued again per transaction


def _retry_dead(store: Store, ids: list[int] | None, now: datetime, *,
                page: int = _RETRY_PAGE) -> tuple[int, list[str]]:
    """Queue the dead jobs ``ids`` (None: all) again, ``page`` at a time in id order, one transaction each:
    a backlog of dead jobs is neither read into memory nor locked at once. Returns how many were queued,
    and the out-of-order warnings (each page's are read before it is queued, as a single retry's were).
    Pages go in id order, so each entity's jobs are queued again in their order. All of them: those dead when
    it began, up to the highest id then (a job queued again goes to the tail under a new id; a worker that ran
    and lost it again meanwhile, a receiver still answering 410, made it dead past that id, and paging on would
    queue it again and again)."""
    count, stale, after = 0, list[str](), 0
    wanted = None if ids is None else sorted(set(ids))
    up_to: int | None = None
    if wanted is None:
        with store.connect() as conn:
            up_to = conn.execute(sa.select(sa.func.max(hook_jobs.c.id)).where(hook_jobs.c.status == "dead")).scalar()
        if up_to is None:
            return count, stale
    while True:
        with store.transaction() as writer:
            chunk = _next_page(writer.conn, wanted, after, page, up_to=up_to)
            if not chunk:
                return count, stale
            stale += _out_of_order(writer.conn, chunk)
            count += retry_jobs(writer.conn, now, chunk)
        after = chunk[-1]


def _next_page(conn: Connection, wanted: list[int] | None, after: int, page: int, *,
               up_to: int | None = None) -> list[int]:
    """The next ``page`` ids after ``after``: of ``wanted`` (sorted), or of the dead jobs (to ``up_to``)."""
    if wanted is not None:
        return [i for i in wanted if i > after][:page]
    j = hook_jobs
    query = sa.select(j.c.id).where(j.c.status == "dead", j.c.id > after)
    if up_to is not None:
        query = query.where(j.c.id <= up_to)
    query = query.order_by(j.c.id).limit(page)
    return list(conn.execute(query).scalars())


@hooks_app.command("purge")
def purge_command(
    ids: Annotated[list[int] | None, typer.Argument(callback=_job_ids, help="Job ids.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead job.")] = False,
    hook: Annotated[str | None, typer.Option(
        help="Every job of this hook that is not running, pending ones too: a hook removed or renamed, whose "
             "jobs no dispatcher claims.")] = None,
) -> None:
    """Delete dead jobs (their changes will not be handled); with --hook, a removed hook's waiting jobs too."""
    if hook is not None:
        if ids or all_:
            raise ConfigError("pass --hook alone: it purges that hook's dead and pending jobs; job ids or --all "
                              "purge dead jobs of any hook")
        _purge_hook(hook)
        return
    wanted = _ids(ids, all_, "purge")
    store = _store()
    with store.transaction() as writer:
        refused = _not_dead(writer.conn, wanted)
        count = delete_jobs(writer.conn, wanted)
    store.dispose()
    typer.echo(f"{count} dead job(s) purged")
    _refuse(refused)


def _purge_hook(hook: str) -> None:
    """``hooks purge --hook NAME``: the hook's dead and pending jobs; one running is named (a dispatcher has the
    hook, so it was not removed everywhere) and left, exit 1."""
    store = _store()
    now = store.now()
    with store.transaction() as writer:
        count = delete_jobs(writer.conn, hook=hook, now=now)  # with those whose dispatcher died mid-run
        running = writer.conn.execute(sa.select(sa.func.count()).select_from(hook_jobs).where(
            hook_jobs.c.hook == hook, hook_jobs.c.status == "running")).scalar_one()
        others = [] if count or running else list(writer.conn.execute(
            sa.select(hook_jobs.c.hook).distinct().order_by(hook_jobs.c.hook).limit(20)).scalars())
    store.dispose()
    typer.echo(f"{count} job(s) of hook {hook!r} purged")
    if not count and not running:  # a typo purges nothing, silently: say so (exit 1, as an id not found)
        names = ", ".join(repr(name) for name in others) or "none"
        _refuse([f"no job of hook {hook!r} is queued (the hooks with jobs: {names}): check the name (it is the "
                 "Hook's name, case-sensitive); nothing purged"])
    if running:
        _refuse([f"{running} job(s) of hook {hook!r} running, left as they are: a dispatcher still has this hook "
                 "(a worker or serve not redeployed yet?)"])


def _not_dead(conn: Connection, ids: list[int] | None) -> list[str]:
    """What is wrong with each of ``ids`` that is not a dead job (nothing for ``--all``)."""
    if not ids:
        return []
    j, found = hook_jobs, dict[int, str]()
    for chunk in _chunks(sorted(set(ids))):
        rows = conn.execute(sa.select(j.c.id, j.c.status).where(j.c.id.in_(chunk)))
        found.update({row.id: row.status for row in rows})
    return [f"job {i}: not found" if i not in found else f"job {i}: {found[i]}, not dead (left as it is)"
            for i in dict.fromkeys(ids) if found.get(i) != "dead"]


def _refuse(problems: list[str]) -> None:
    for line in problems:
        typer.echo(line, err=True)
    if problems:
        raise typer.Exit(1)


_ENTITY_TABLES = {Entity.USER: users, Entity.ORGANIZATION: organizations, Entity.MEMBERSHIP: organization_memberships}


def _out_of_order(conn: Connection, ids: list[int] | None) -> list[str]:
    """A warning for each dead job of ``ids`` (None: all) older than its entity's version in the entity's
    table (applied since: a job of it may have run) or in an unfinished job of the same hook and entity."""
    j = hook_jobs
    query = sa.select(j.c.id, j.c.entity_key, RAW_PAYLOAD).where(j.c.status == "dead").order_by(j.c.id)
    rows = list(conn.execute(query)) if ids is None else [
        row for chunk in _chunks(sorted(set(ids))) for row in conn.execute(query.where(j.c.id.in_(chunk)))]
    # (an Event's jobs run in the order their deliveries came: no version to compare; a payload that is not a
    # change this release reads dies again unrun)
    dead = [(row.id, row.entity_key, change) for row in rows if (change := _change(row.payload)) is not None]
    queued = _queued_versions(conn, {key for _, key, _ in dead})
    applied = _applied_versions(conn, [change for _, _, change in dead])
    return [f"warning: job {job_id} ({change.type} of {change.clerk_id}, version {change.version}) is older than "
            f"version {newer}, applied or queued since: it will reach the handler out of order"
            for job_id, key, change in dead
            if (newer := max(queued.get(key, 0), applied.get((change.entity, change.clerk_id), 0))) > change.version]


def _queued_versions(conn: Connection, keys: set[str]) -> dict[str, int]:
    """The newest version of each entity key's (hook, entity, Clerk id) unfinished jobs."""
    j, newest = hook_jobs, dict[str, int]()
    for chunk in _chunks(sorted(keys)):
        query = sa.select(j.c.entity_key, RAW_PAYLOAD).where(j.c.entity_key.in_(chunk), j.c.status != "dead")
        for key, payload in conn.execute(query):
            if (change := _change(payload)) is not None:
                newest[key] = max(newest.get(key, 0), change.version)
    return newest


def _change(payload: object) -> Change | None:
    """A job's change; None for an event's, and for a payload this release cannot read (its claim marks it
    dead, saying why)."""
    try:
        document = parsed_payload(payload)
        is_change = isinstance(document, dict) and "event" not in document and "entity" in document
        return Change.from_json(document) if is_change else None
    except Exception:  # whatever a payload holds: its job has no version to compare
        return None


def _applied_versions(conn: Connection, changes: list[Change]) -> dict[tuple[Entity, str], int]:
    """The version of each changed entity in its table (absent: none, or hard-deleted)."""
    versions: dict[tuple[Entity, str], int] = {}
    for entity, table in _ENTITY_TABLES.items():
        for chunk in _chunks(sorted({change.clerk_id for change in changes if change.entity is entity})):
            query = sa.select(table.c.clerk_id, table.c.clerk_updated_at).where(table.c.clerk_id.in_(chunk))
            versions.update({(entity, clerk_id): version for clerk_id, version in conn.execute(query)})
    return versions


def _chunks(items: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    """``items`` a few hundred at a time, for ``IN`` lists."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
