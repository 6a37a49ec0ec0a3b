"""The ``clerk-sync`` command line (Typer + Rich). Reads settings from the environment, once."""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from alembic.util.exc import CommandError
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import SQLAlchemyError

from clerk_sync import migrations
from clerk_sync._db_errors import is_pooler_misconfigured, is_transient
from clerk_sync._logging import configure_logging
from clerk_sync.cli._args import PortInUse, bind_error, refuse_undecodable
from clerk_sync.cli._database import existing_store, missing_sqlite_file
from clerk_sync.cli._serve import (
    STARTUP_FAILURE,
    DispatchWhenMigrated,
    bounded_http,
    could_not_start,
    serve_workers,
    shared_metrics,
    sigterm_unwinds,
    tell_startup_failure,
)
from clerk_sync.cli.hooks import HOOKS_HELP, MAPPING_HELP, hooks_app, load_hooks, load_mapping, migrate_mapping, worker
from clerk_sync.config import Settings
from clerk_sync.errors import (
    ClerkNotFound,
    ClerkSyncError,
    ClerkUnauthorized,
    ClerkUnavailable,
    ConfigError,
    RateLimited,
    ReconcileBusy,
    StoreDataError,
    StoreError,
)
from clerk_sync.store import Store

if TYPE_CHECKING:
    from clerk_sync.ingest import WebhookProcessor
    from clerk_sync.retention import ErasureReport

__all__ = ["EXIT_SETTINGS", "EXIT_UNAVAILABLE", "EXIT_UNDONE", "app", "erase_outcome", "exit_code", "main"]

#: The exit codes of every ``clerk-sync`` command (0: done). A command that ran and left something undone
#: (``replay`` with deliveries still failed, ``reconcile`` with objects it could not read, ``doctor`` with a
#: failed check, ``hooks retry`` naming ids that are no dead jobs).
EXIT_UNDONE = 1
#: A setting, an argument or the database's schema to fix (click's usage errors exit 2 too), or a SQLite file
#: that is corrupt (restore it) or read-only (make it writable): running the same command again as it is cannot help.
EXIT_SETTINGS = 2
#: Something the command needs is unavailable now: the database cannot be reached or a bounded wait on it ran
#: out, Clerk is down or its rate budget spent (``users promote`` recording a pending change), another
#: ``reconcile`` is running, the port to listen on is in use, the service could not start (``serve``: uvicorn's
#: code for a failed start-up, _serve.STARTUP_FAILURE). Retry later.
EXIT_UNAVAILABLE = 3
assert EXIT_UNAVAILABLE == STARTUP_FAILURE

app = typer.Typer(help="Keep your SQL database in sync with Clerk.", no_args_is_help=True)
app.add_typer(hooks_app, name="hooks")
app.command()(worker)
console = Console(stderr=True)


def _settings() -> Settings:
    return Settings.from_env()


@app.command()
def migrate(
    mapping: Annotated[str | None, typer.Option(help=MAPPING_HELP + " Adds its Clerk-id and delete columns.")] = None,
    backfill: Annotated[bool, typer.Option("--backfill", help="Also write the rows clerk-sync already holds "
                                                                "into the mapped tables (idempotent).")] = False,
) -> None:
    """Apply database migrations (DATABASE_URL)."""
    settings = _settings()
    schema = load_mapping(mapping)
    if backfill and schema is None:  # before any step: a deploy script's typo must not migrate half its intent
        raise ConfigError("--backfill needs --mapping module:attribute (the mapped tables to write); nothing was "
                          "migrated")
    store = Store.from_settings(settings)
    upgraded = migrations.upgrade(store.engine)
    console.print(f"[green]{upgraded.summary()}[/] on {_safe(settings)}", soft_wrap=True)  # (one line, piped too)
    refused = 0
    if schema is not None:
        migrated = migrate_mapping(store, schema, backfill=backfill, settings=settings)
        for line in migrated:
            console.print(line)
        refused = migrated.refused
    store.dispose()
    if refused:  # a deploy step or cron sees that the repair did not finish
        raise SystemExit(EXIT_UNDONE)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind (0 = any free port).", min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (PostgreSQL for more than 1).", min=1)] = 1,
    migrate_first: Annotated[bool, typer.Option(
        "--migrate/--no-migrate",
        help="Apply migrations in the background from start-up (retried while the database is down); "
             "--no-migrate when a deploy step runs `clerk-sync migrate` or this role may not change the schema.",
    )] = True,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines.")] = False,
    hooks: Annotated[str | None, typer.Option(help=HOOKS_HELP + " Dispatched by a thread.")] = None,
    mapping: Annotated[str | None, typer.Option(help=MAPPING_HELP)] = None,
    dispatch: Annotated[bool, typer.Option(
        "--dispatch/--no-dispatch",
        help="Run the --hooks' jobs in a thread of this process; --no-dispatch only queues them, for "
             "`clerk-sync worker` processes beside it (the webhook process then keeps its CPU for ingest).",
    )] = True,
    graceful_timeout: Annotated[int, typer.Option(
        "--graceful-timeout", envvar="CLERK_SYNC_GRACEFUL_TIMEOUT_S", min=0,
        help="Seconds a stop (SIGTERM, Ctrl-C) waits for requests in flight and the --hooks' running handler; "
             "then they are cut off (Svix retries the deliveries, the jobs run again), and 5 s later the "
             "process exits whatever still runs (not with --workers N: each worker's requests get the same "
             "bound, without that exit). Below Kubernetes' terminationGracePeriodSeconds (30) - 5.",
    )] = 25,
    limit_concurrency: Annotated[int, typer.Option(
        "--limit-concurrency", envvar="CLERK_SYNC_LIMIT_CONCURRENCY", min=2,
        help="Open connections (idle keep-alive ones too) or requests in progress at which a process answers new "
             "requests 503 (Svix retries): N - 1 connections at most, so at least 2. Bounds memory: each may hold "
             "up to CLERK_SYNC_MAX_BODY_BYTES of body.",
    )] = 1000,
    max_head_bytes: Annotated[int | None, typer.Option(
        "--max-head-bytes", min=1024, max=1024 * 1024, show_default=False,
        help="A request's head (request line and headers) larger than this is answered 431 and its connection "
             "closed. Default: CLERK_SYNC_MAX_HEAD_BYTES, 65536.",
    )] = None,
    head_timeout: Annotated[float | None, typer.Option(
        "--head-timeout", min=0.001, max=3600, show_default=False,
        help="Seconds a request's head may take from its first byte (reading paused behind a pipelined answer "
             "not counted): past it 408 and the connection closed. Default: CLERK_SYNC_HEAD_TIMEOUT_S, 10.",
    )] = None,
) -> None:
    """Run the webhook sync service: POST /webhooks/clerk, /healthz, /readyz, /metrics."""
    # One worker with PROMETHEUS_MULTIPROC_DIR set (prometheus_client is then in multiprocess mode) takes a
    # fresh directory inside it too: the files of earlier runs there would add their counts to this one's.
    if workers > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        with shared_metrics():
            _serve(host, port, workers, json_logs, hooks, mapping, migrate_first, dispatch, graceful_timeout,
                   limit_concurrency, (max_head_bytes, head_timeout))
        return
    _serve(host, port, workers, json_logs, hooks, mapping, migrate_first, dispatch, graceful_timeout, limit_concurrency,
           (max_head_bytes, head_timeout))


def _serve(host: str, port: int, workers: int, json_logs: bool, hooks: str | None, mapping: str | None,
           migrate_first: bool, dispatch: bool, graceful_timeout_s: int, limit_concurrency: int,
           head_limits: tuple[int | None, float | None] = (None, None)) -> None:
    from clerk_sync.integrations.starlette import build_processor

    settings = _settings()
    max_head_bytes, head_timeout_s = head_limits  # (the options, else the settings)
    settings = settings.model_copy(update={"max_head_bytes": max_head_bytes or settings.max_head_bytes,
                                           "head_timeout_s": head_timeout_s or settings.head_timeout_s})
    configure_logging(settings.log_level, json=json_logs)
    if (hooks or mapping) and workers > 1:
        raise ConfigError("--hooks/--mapping run in one process: use --workers 1 (and `clerk-sync worker` beside it)")
    if not migrate_first and (missing := missing_sqlite_file(settings)) is not None:
        # (not migrating, it would serve an empty file SQLite creates at a mistyped path: 503 "not migrated" for
        # ever, and `clerk-sync migrate` as told would fill a second database)
        raise ConfigError(missing)
    store = None
    if hooks or mapping:
        store = Store.from_settings(settings, hooks=load_hooks(hooks) if hooks else (),
                                    mapping=load_mapping(mapping))
    processor = build_processor(settings, store)  # fails here, once, on a missing/malformed secret
    # The database may be down: the service starts anyway and answers 503 until it is back (and
    # migrated), instead of exiting and leaving Svix's retries nowhere to land.
    if workers > 1:
        if settings.console_enabled:  # here, once: raised in each worker, uvicorn's supervisor would restart
            from clerk_sync.integrations.console import check_console_settings  # them for ever

            check_console_settings(settings)
        os.environ["CLERK_SYNC_MIGRATE_ON_START"] = "1" if migrate_first else "0"  # for the worker processes
        with _listen(host, port) as sock:
            _announce(settings, host, sock)
            serve_workers(host, port, workers, sock, json_logs=json_logs, graceful_timeout_s=graceful_timeout_s,
                          limit_concurrency=limit_concurrency, max_head_bytes=settings.max_head_bytes,
                          head_timeout_s=settings.head_timeout_s)
    else:
        _serve_one(settings, processor, host, port, migrate_first=migrate_first, dispatch=dispatch,
                   graceful_timeout_s=graceful_timeout_s, limit_concurrency=limit_concurrency)


#: How long past --graceful-timeout a stopping ``serve`` may take (the app's shutdown: the committer's queue
#: written, the dispatcher's stop) before it exits whatever still runs (a thread blocked on a silent database).
_EXIT_MARGIN_S = 5.0


def _exit_after(seconds: float, code: int, *, bound_s: float | None = None) -> None:
    """A daemon timer that ends the process with ``code`` if it still runs ``seconds`` from now: a thread
    that does not end (a request's worker thread blocked on a database peer gone silent; anyio's are not
    daemon threads) would otherwise hold the process after its shutdown, until a SIGKILL. ``bound_s``: the
    bound the message names (the first timer's, when an upgrade on MySQL/MariaDB put the exit off)."""
    import threading

    def fire() -> None:
        if migrations.upgrading():  # never in the middle of DDL (MySQL/MariaDB's is not transactional)
            _exit_after(1.0, code, bound_s=bound_s or seconds)
            return
        said = threading.Thread(daemon=True, target=lambda: console.print(
            f"[red]error:[/] the shutdown outlived {bound_s or seconds:g} s (a request, hook or database call that "
            "does not end: the log above may say which); exiting now. In-flight deliveries are retried by Svix, "
            "claimed hook jobs run again after their lease", soft_wrap=True))
        said.start()
        said.join(1.0)  # (a blocked stderr must not hold the exit either)
        os._exit(code)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def _serve_one(settings: Settings, processor: WebhookProcessor, host: str, port: int, *, migrate_first: bool,
               dispatch: bool, graceful_timeout_s: int = 25, limit_concurrency: int = 1000) -> None:
    import signal
    from types import FrameType

    import uvicorn

    from clerk_sync.hooks import Dispatcher
    from clerk_sync.integrations.starlette import create_app

    app = create_app(settings, processor, migrate=migrate_first)  # (checks the console's settings)
    why: list[str] = []
    tell_startup_failure(app, why.append)
    dispatcher = None
    if processor.store.hooks and dispatch:  # started with the app, once serve's own migration is done
        dispatcher = DispatchWhenMigrated(Dispatcher(processor.store, metrics=processor.metrics),
                                          processor.store.engine, migrate=migrate_first)
        dispatcher.attach(app)

    def stopping(code: int) -> None:
        """A stop begins (a signal, a refused migration): the dispatcher stops now, beside the requests' drain,
        within the same bound, and the watchdog exits ``code`` if a thread outlives it."""
        if dispatcher is not None:
            dispatcher.ask_stop(graceful_timeout_s)
        _exit_after(graceful_timeout_s + _EXIT_MARGIN_S, code)

    stopped_for: list[str] = []  # the refusal that stopped serve (what exits 2, whatever `refused` says later)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if stopped_for and sig == signal.SIGTERM:  # the refusal's stop is under way, bounded by its watchdog:
                return  # uvicorn would raise the signal again once drained (143, no refusal line) for its exit 2
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                stopping(128 + sig)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=graceful_timeout_s,
                                   http=bounded_http(settings.max_head_bytes, settings.head_timeout_s),
                                   limit_concurrency=limit_concurrency))
    migration = getattr(app.state, "clerk_sync_migration", None)
    if migration is not None:  # refused for good while serving (the database was down at start): stop, as at start

        def refused() -> None:
            stopped_for.append(migration.refused or "the start-up migration was refused (the log says why)")
            if not server.should_exit:  # (as a signal's stop: a worker thread that never ends cannot hold it)
                server.should_exit = True
                stopping(EXIT_SETTINGS)

        migration.on_refused = refused
    with _listen(host, port) as sock, sigterm_unwinds():
        _announce(settings, host, sock)
        try:
            server.run(sockets=[sock])  # our own access lines (ingest.py)
        except SystemExit:  # uvicorn's own exit when the app's start-up failed: ours below says why
            if server.started:
                raise
        finally:
            if dispatcher is not None or stopped_for:  # (the dispatcher: stopped by the app's shutdown already,
                # unless it never started; a refusal: its exit 2 and its line, below)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this short
            if dispatcher is not None:
                dispatcher.stop()
    refusal = stopped_for[0] if stopped_for else migration.refused if migration is not None else None
    if refusal is not None:  # a setting to fix (the role), not a wait: 2
        console.print(f"[red]error:[/] {escape(refusal)}", soft_wrap=True)
        raise SystemExit(EXIT_SETTINGS)
    if not server.started:  # the app's start-up failed (uvicorn logged the traceback): as uvicorn.run exits
        console.print(f"[red]error:[/] {escape(could_not_start(why[0] if why else None))}", soft_wrap=True)
        raise SystemExit(STARTUP_FAILURE)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before announcing anything, so "serving on" is true (and names the port 0 picked). IPPROTO_TCP:
    asyncio sets TCP_NODELAY only on such sockets, else each keep-alive response waits ~40 ms for a delayed
    ACK (Kludex/uvicorn#3149; measured in BENCHMARKS.md)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc}): pass another --host") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does (TIME_WAIT only)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        # In use: exit 3 (the service could not start, as _serve's failed start-up), else a setting to fix (2)
        raise bind_error(exc, f"cannot listen on {host}:{port}") from None
    sock.set_inheritable(True)  # serve --workers: the worker processes accept on it
    return sock


def _announce(settings: Settings, host: str, sock: socket.socket) -> None:
    # (an IPv6 address in brackets, as a URL writes it: "http://::1:8000" was no URL to paste)
    where = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    # one line, as a log pipeline reads it (rich wrapped it at 80 columns when stderr is no terminal)
    console.print(f"clerk-sync serving on {where}/webhooks/clerk ({_safe(settings)})", soft_wrap=True)
    if settings.console_enabled:
        console.print(f"operator console on {where}/console", soft_wrap=True)


def _replay_advice(mapping: str | None, with_hooks: str | None) -> str:
    """What to run instead of replaying deliveries that applied: the backfill for a mapped table (said as an
    "if" without --mapping: a replay for hooks alone has no mapped table to fill)."""
    backfill = "`clerk-sync migrate --mapping module:attribute --backfill` (idempotent)"
    if mapping is not None:
        return f"to write the rows clerk-sync holds into your mapped tables, run {backfill}; replay is for failed " \
               "deliveries"
    if with_hooks is not None:
        return ("a replay that changes nothing fires no hooks (they fire for what it applies); replay is for failed "
                f"deliveries (to fill an app table through a mapping, {backfill})")
    return f"replay is for failed deliveries; if you meant to fill your mapped tables (a mapping), run {backfill}"


@app.command()
def replay(
    status: Annotated[str, typer.Option(help="Replay deliveries with this status (one that is not failed keeps "
                                             "it when the replay changes nothing).")] = "failed",
    since: Annotated[str | None, typer.Option(help="Received at/after (ISO 8601, naive = UTC).")] = None,
    with_hooks: Annotated[str | None, typer.Option(help="Fire these hooks for what the replay applies, and, "
                                                        "with --status ignored, for the events of the types they "
                                                        "name (module:attribute); by default none fire.")] = None,
    mapping: Annotated[str | None, typer.Option(help=MAPPING_HELP)] = None,
) -> None:
    """Re-apply stored deliveries (after fixing what made them fail); exit 1 while some stay failed."""
    from clerk_sync.cli._args import STORED_STATUSES, parse_since
    from clerk_sync.engine import DeliveryStatus
    from clerk_sync.ingest import replay_deliveries

    if status not in STORED_STATUSES:
        raise typer.BadParameter(f"{status!r} is no stored status; one of {', '.join(STORED_STATUSES)}",
                                 param_hint="--status")
    settings = _settings()
    store = existing_store(settings, hooks=load_hooks(with_hooks, "--with-hooks") if with_hooks else (),
                           mapping=load_mapping(mapping))
    report = replay_deliveries(store, status=status, since=parse_since(since), with_hooks=bool(with_hooks))
    store.dispose()
    console.print(report.summary(), highlight=False)
    if report.left:  # not failed, and the replay changed nothing: kept as they were, not relabelled skipped
        console.print(f"{report.left_said}: left as they were (the rows hold these versions or newer, so a replay "
                      "changes nothing; their status is their history)", highlight=False)
        if status in (DeliveryStatus.APPLIED, DeliveryStatus.SKIPPED):
            console.print(_replay_advice(mapping, with_hooks), highlight=False)
    if still := report.by_status.get(DeliveryStatus.FAILED.value):  # a scheduled replay must not look fine
        failed = "still failed" if status == DeliveryStatus.FAILED else "failed"
        console.print(f"[red]{still} {failed}[/]: read webhook_events.last_error (or the console), fix the "
                      "cause, then replay again (one no fix can make apply: `clerk-sync dismiss SVIX_ID --reason ..`)",
                      soft_wrap=True)
        raise SystemExit(EXIT_UNDONE)


@app.command()
def dismiss(
    svix_ids: Annotated[list[str], typer.Argument(help="The failed deliveries' svix ids (msg_...).")],
    reason: Annotated[str, typer.Option(help="Why they can never apply: kept with them and audited.")],
) -> None:
    """Set aside failed deliveries that no fix can make apply (stored ignored, audited); exit 1 if some were
    not failed deliveries."""
    from clerk_sync.ingest import dismiss_failed

    if not reason.strip():
        raise typer.BadParameter("is blank: say why these deliveries can never apply", param_hint="--reason")
    store = existing_store(_settings())
    try:
        done = dismiss_failed(store, svix_ids, reason=reason)
    finally:
        store.dispose()
    console.print(f"dismissed {len(done)}: {escape(', '.join(done)) or 'none'}", highlight=False)
    if missed := [s for s in dict.fromkeys(svix_ids) if s not in done]:
        console.print(f"[yellow]not failed deliveries, left alone[/]: {escape(', '.join(missed))}")
        raise SystemExit(EXIT_UNDONE)


@app.command()
def emulate(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", min=0, max=65535)] = 4010,
    webhook_url: Annotated[str | None, typer.Option(help="Where to deliver webhooks.")] = None,
    seed: Annotated[int | None, typer.Option(help="Make fault injection deterministic.")] = None,
    time_scale: Annotated[float | None, typer.Option(help="Divide Svix retry delays by this (> 0; default "
                                                          "CLERK_EMULATOR_TIME_SCALE, else 1).")] = None,
    rate_limit: Annotated[int, typer.Option(help="Backend API requests allowed per 10 s per key (at least 1).",
                                            min=1)] = 100,
) -> None:
    """Run a local Clerk (Backend API subset, JWKS, session tokens, Svix-signed webhooks).

    Reads CLERK_SECRET_KEY (a test key, printed masked; unset: sk_test_emulator) and
    CLERK_WEBHOOK_SIGNING_SECRET (generated and printed when unset), and CLERK_EMULATOR_WEBHOOK_URL,
    CLERK_EMULATOR_TIME_SCALE and CLERK_EMULATOR_SEED; options win over them.
    """
    from clerk_sync.emulator import EmulatorConfig, serve
    from clerk_sync.emulator.app import CannotListen, check_secret_key

    if time_scale is not None and not time_scale > 0:  # it divides the retry delays
        raise typer.BadParameter("must be greater than 0", param_hint="'--time-scale'")
    overrides: dict[str, Any] = {"rate_limit_requests": rate_limit}
    if time_scale is not None:  # only when given: CLERK_EMULATOR_TIME_SCALE applies otherwise
        overrides["time_scale"] = time_scale
    if webhook_url:
        overrides["webhook_url"] = webhook_url
    if seed is not None:
        overrides["seed"] = seed
    try:  # the emulator imports nothing of clerk-sync, so its config errors are ValueErrors
        config = EmulatorConfig.from_env(None, **overrides)
        check_secret_key(config)  # a live key: refused before anything is bound or printed
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        serve(config, host, port)
    except CannotListen as exc:  # serve binds before printing anything: the port is busy or not ours
        # (its message says what and where, with its own advice: only the exit code is the CLI's)
        raise (PortInUse if exc.errno == errno.EADDRINUSE else ConfigError)(exc.strerror or str(exc)) from None


@app.command()
def dev(
    db: Annotated[Path, typer.Option(help="SQLite file for the demo (recreated; an existing file must be an "
                                          "earlier demo's).")] = Path("clerk_sync_dev.db"),
    port: Annotated[int, typer.Option(help="Sync service port (0 = any free port).", min=0, max=65535)] = 0,
    users: Annotated[int, typer.Option(min=2, help="Demo users to create (the demo renames one, deletes "
                                                   "another).")] = 12,
    orgs: Annotated[int, typer.Option(min=0, help="Demo organizations to create.")] = 3,
    once: Annotated[bool, typer.Option("--once", help="Exit after the report instead of serving.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete --db even if it is not an earlier demo's "
                                                        "database.")] = False,
) -> None:
    """Zero-config demo: local Clerk + sync service on SQLite, demo data, convergence report."""
    from clerk_sync.cli.dev import run_dev

    configure_logging("WARNING")
    report = run_dev(db, port=port, users_n=users, orgs_n=orgs, console=Console(), keep_running=not once,
                     force=force)
    if not report.converged:
        raise SystemExit(EXIT_UNDONE)


users_app = typer.Typer(help="Manage mirrored users (admin actions are audited).", no_args_is_help=True)
app.add_typer(users_app, name="users")


@users_app.command("promote")
def users_promote(
    email: Annotated[str, typer.Argument(help="Primary e-mail of the user, or their Clerk id (user_...).")],
    role: Annotated[str, typer.Option(help="Role to set in public_metadata.role.")] = "admin",
    retry_pending: Annotated[bool, typer.Option("--retry-pending", help="Also push earlier pending changes.")] = False,
) -> None:
    """Set a user's role in Clerk and the DB (CLERK_SECRET_KEY, DATABASE_URL); audited."""
    from clerk_sync.auth.admin import AdminActions, find_user_by_email, no_user_found
    from clerk_sync.clerk_api import ClerkClient

    if not role.strip():  # an empty role written to Clerk and the DB takes the user's role away, silently
        raise typer.BadParameter("is blank: pass the role to set, e.g. --role admin (--role user to demote)",
                                 param_hint="'--role'")
    settings = _settings()
    store = existing_store(settings)
    clerk_id = find_user_by_email(store, email)
    if clerk_id is None:
        console.print(f"[red]error:[/] {escape(no_user_found(email, 'clerk-sync reconcile'))}", soft_wrap=True)
        raise SystemExit(EXIT_UNDONE)
    with ClerkClient.from_settings(settings) as client:
        actions = AdminActions(store, client)
        if retry_pending:
            console.print(f"pending changes: {actions.retry_pending()}")
        change = actions.promote(clerk_id, role, by=None)
    colour = "green" if change.status == "applied" else "yellow"
    console.print(f"[{colour}]{change.status}[/]: {escape(email)} ({escape(clerk_id)}) "
                  f"{escape(str(change.previous_role))} -> {escape(role)}")
    if change.status == "pending":  # not done: a script must see it (as retry-pending's exit code 3)
        console.print(change.pending_advice("clerk-sync users retry-pending"))
        raise SystemExit(EXIT_UNAVAILABLE)


@app.command()
def prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what is due; change nothing.")] = False,
) -> None:
    """Apply retention: redact old inbox payloads, delete older rows, clear tombstones (serve also runs it).

    Ages come from CLERK_SYNC_INBOX_REDACT_AFTER_DAYS, CLERK_SYNC_INBOX_DELETE_AFTER_DAYS,
    CLERK_SYNC_TOMBSTONE_CLEAR_AFTER_DAYS, (opt-in, hard deletion) CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS and
    (opt-in) CLERK_SYNC_AUDIT_IP_CLEAR_AFTER_DAYS; failed deliveries are kept until replayed (their request's
    IP and user agent dropped after the redaction age).
    """
    from clerk_sync.retention import Retention, RetentionPolicy

    settings = _settings()
    store = existing_store(settings)
    try:
        report = Retention(store, RetentionPolicy.from_settings(settings)).prune(dry_run=dry_run)
    finally:
        store.dispose()
    typer.echo(report.summary())


@users_app.command("erase")
def users_erase(
    clerk_id: Annotated[str, typer.Argument(help="Clerk user id (user_...), not an e-mail address.")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit log, e.g. a ticket id.")] = None,
    actor: Annotated[str | None, typer.Option(help="Clerk id of the admin acting (audit log).")] = None,
    mapping: Annotated[str | None, typer.Option(help=MAPPING_HELP + " Its row's personal columns are cleared "
                                                     "too (the app's mapped tables are not known otherwise).")] = None,
    hooks: Annotated[str | None, typer.Option(help=HOOKS_HELP + " The hooks that want user.deleted get a job (run "
                                                 "by `serve` or `clerk-sync worker`), as for Clerk's own deletion, "
                                                 "which arrives after the erasure and changes nothing.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Erase an id this database has never seen (no row, no "
                                                        "stored event): a tombstone is written so its events never "
                                                        "land. Without it such an id (a typo?) is refused.")] = False,
    any_id: Annotated[bool, typer.Option("--any-id", help="Accept an id that does not start with user_ (Clerk's "
                                                          "user ids all do; an org_... id is refused without it).")
                      ] = False,
) -> None:
    """Erase a user's personal data from every table and stored payload now (data-subject request).

    The row stays as a tombstone with personal columns cleared, so no late event brings it back.
    Delete the user in Clerk too, or the next reconcile cannot restore them either (the tombstone
    is final) but Clerk still holds their data. Pass the mapping and the hooks as ``serve`` does: the
    deletion reaches them only from here. Run again with them, it passes the deletion on (idempotent).
    """
    from clerk_sync.retention import Retention, UnknownUser

    settings = _settings()
    store = existing_store(settings, hooks=load_hooks(hooks) if hooks else (), mapping=load_mapping(mapping))
    try:
        _check_user_id(store, clerk_id, any_id=any_id)
        report = Retention(store).erase_user(clerk_id, actor=actor, reason=reason, allow_unknown=force)
        found = erase_outcome(store, report)
    except UnknownUser:
        console.print(f"[red]error:[/] no user {escape(repr(clerk_id))} in this database (no row, no stored "
                      "event); nothing was changed. Check the id (Clerk Dashboard -> Users, or the users table's "
                      "clerk_id), or pass --force to tombstone a user never synced.", soft_wrap=True)
        raise SystemExit(EXIT_UNDONE) from None
    finally:
        store.dispose()
    typer.echo(f"{clerk_id}: {found}, {report.payloads_redacted} stored payload(s) redacted; audited as user.erased")
    if (advice := report.elsewhere_advice()) is not None:
        console.print(f"[yellow]warning:[/] {escape(advice)}", highlight=False)
    for refused in report.mapped_refused:
        console.print(f"[red]error:[/] {escape(str(refused))}: clear it in the app's table "
                      "(see `clerk-sync doctor --mapping`)", soft_wrap=True)
    if report.mapped_refused:  # clerk-sync's rows are erased, the request is not done: a script must see it
        raise SystemExit(EXIT_UNDONE)
    untold = [(what, option) for what, option, given in (
        ("the app's mapped tables were not touched", "--mapping module:attribute", mapping),
        ("no hook job was queued", "--hooks module:attribute", hooks)) if given is None]
    if untold:  # Clerk's user.deleted, arriving after the erasure, finds the tombstone and tells them nothing
        typer.echo(f"{' and '.join(what for what, _ in untold)}: if `serve` runs with "
                   f"{' or '.join(option for _, option in untold)}, run this again with the same (it is "
                   "idempotent: the deletion is passed on then)")


def erase_outcome(store: Store, report: ErasureReport) -> str:
    """What an erasure did to the user's row, as every face's erase command says it: ``erased`` (its row
    became a cleared tombstone), ``no row for it; tombstone written`` (an id known only from stored events or
    memberships, or ``--force``), or, for an id whose tombstone ``prune`` already hard-deleted
    (``CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS``), that nothing was written: its digest keeps any row out."""
    import sqlalchemy as sa

    from clerk_sync.tables import users

    if report.row_existed:
        return "erased"
    with store.connect() as conn:
        written = conn.execute(sa.select(users.c.id).where(users.c.clerk_id == report.clerk_id)).first()
    if written is not None:
        return "no row for it; tombstone written"
    return ("already erased (its row was deleted by prune; only the SHA-256 digest of its id is kept, which keeps "
            "any row out): no row written")


def _check_user_id(store: Store, clerk_id: str, *, any_id: bool) -> None:
    """Refuse what cannot be a Clerk user id (an e-mail, blanks, one longer than any, another object's id unless
    ``any_id``): erasing it would tombstone nobody."""
    from clerk_sync.auth.admin import find_user_by_email
    from clerk_sync.retention import could_be_user_id, too_long_for_an_id

    if could_be_user_id(clerk_id) and (any_id or clerk_id.startswith("user_")):
        return
    if "@" not in clerk_id and (too_long := too_long_for_an_id(clerk_id)) is not None:  # (an e-mail: found below)
        raise typer.BadParameter(too_long, param_hint="CLERK_ID")
    if could_be_user_id(clerk_id):
        raise typer.BadParameter(f"{clerk_id!r} is not a Clerk user id (they start with user_; this may be an "
                                 "organization's or another object's): pass the user's id, or --any-id if your "
                                 "users table holds ids of another form", param_hint="CLERK_ID")
    hint = "find it in the Clerk Dashboard (Users) or the users table's clerk_id"
    if "@" in clerk_id:
        found = find_user_by_email(store, clerk_id.strip())
        hint = f"the synced user with this e-mail is {found}" if found else f"no synced user has this e-mail; {hint}"
    raise typer.BadParameter(f"{clerk_id!r} is not a Clerk user id: pass the id (user_...); {hint}",
                             param_hint="CLERK_ID")


@app.command()
def reconcile(
    since: Annotated[str | None, typer.Option(help="Only users updated at/after this ISO time.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write nothing; print the diff.")] = False,
    with_hooks: Annotated[str | None, typer.Option(help="Fire these hooks for the repairs (module:attribute); "
                                                        "by default none fire.")] = None,
    mapping: Annotated[str | None, typer.Option(help=MAPPING_HELP)] = None,
    allow_mass_delete: Annotated[bool, typer.Option(
        "--allow-mass-delete", help="Delete even when Clerk no longer lists over a quarter of the rows.")] = False,
) -> None:
    """Re-read Clerk (users, organizations, memberships) and repair drift; resumes after a kill.

    Exit 1 when some of Clerk's objects could not be read (the summary's ``failed`` column).
    """
    from clerk_sync.cli.reconcile import reconcile_command, unread_objects

    hooks = load_hooks(with_hooks, "--with-hooks") if with_hooks else ()
    report = reconcile_command(_settings(), since=since, dry_run=dry_run, console=console, hooks=hooks,
                               mapping=load_mapping(mapping), allow_mass_delete=allow_mass_delete)
    if (unread := unread_objects(report)) is not None:
        console.print(f"[red]error:[/] {escape(unread)}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_UNDONE)


@users_app.command("retry-pending")
def users_retry_pending() -> None:
    """Push role changes recorded while Clerk was unreachable (run it from cron or a scheduler)."""
    from clerk_sync.auth.admin import AdminActions
    from clerk_sync.clerk_api import ClerkClient

    settings = _settings()
    store = existing_store(settings)
    with ClerkClient.from_settings(settings) as client:
        counts = AdminActions(store, client).retry_pending()
    store.dispose()
    console.print(f"pending role changes: {counts}")
    if counts["pending"]:
        raise SystemExit(EXIT_UNAVAILABLE)  # still waiting on Clerk: let the scheduler notice


@app.command()
def doctor(
    freshness: Annotated[bool, typer.Option("--freshness", help="Check sync freshness instead (for cron).")] = False,
    mapping: Annotated[str | None, typer.Option(help=MAPPING_HELP + " Checked against the live schema.")] = None,
) -> None:
    """Check the configuration end to end: settings, database, migrations, Clerk API, session keys.

    ``--freshness`` asks what the alert rules ask (newest delivery, failed backlog, last reconcile, hook jobs);
    exit code 1 when one fails.
    """
    from clerk_sync.cli.doctor import run_checks, run_freshness

    if freshness and mapping is not None:  # (it was ignored: exit 0 with a mapping never loaded)
        raise ConfigError("--freshness does not check a mapping: run `clerk-sync doctor --mapping ...` for it, and "
                          "`doctor --freshness` without --mapping")
    results = run_freshness(_settings()) if freshness else run_checks(_settings(), mapping=load_mapping(mapping))
    out = Console(soft_wrap=True)  # the report is the command's output: stdout, one line per check
    for check in results:
        mark = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}[check.status]
        out.print(f"{mark}  {escape(check.name)}: {escape(check.detail)}")
    if any(c.status == "fail" for c in results):
        raise SystemExit(EXIT_UNDONE)


def _safe(settings: Settings) -> str:
    """The database URL as the CLI prints it: its credentials masked, a ``?password=`` too (SQLAlchemy's own
    masking shows that one; a pod's log then held it)."""
    from clerk_sync._urls import masked_url

    return masked_url(settings.sqlalchemy_url())


# What to check when Clerk refuses a command's request (its message says what failed, this what to do)
_HINTS: dict[type[Exception], str] = {
    ClerkUnauthorized: ". Check CLERK_SECRET_KEY: it is missing, revoked, or the key of another instance "
                       "(Clerk Dashboard -> API keys); `clerk-sync doctor` checks it.",
    ClerkNotFound: ". Clerk has no such resource: deleted in Clerk since the last sync (`clerk-sync reconcile` "
                   "brings the database up to date), or CLERK_SECRET_KEY belongs to another instance.",
}


def main() -> None:
    """Console entry point: turn our errors into one readable line and the exit code :func:`exit_code` gives."""
    try:
        refuse_undecodable(sys.argv[1:])
        app()
    except (ClerkSyncError, SQLAlchemyError, CommandError) as exc:
        code = exit_code(exc)
        # ("clerk-sync[postgres]" is text, not markup: escaped; one line whatever the terminal, a pipe too)
        console.print(f"[red]error:[/] {escape(_error_line(exc, code))}", soft_wrap=True)
        raise SystemExit(code) from None


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that raised ``exc``: :data:`EXIT_UNAVAILABLE` (3) when what it needs may answer
    later (the database down or a lock wait run out, Clerk down or rate limited, another reconcile running, the
    port in use), else :data:`EXIT_SETTINGS` (2: a setting, the schema, a refusal to fix first). One table for
    every command, so a scheduler can tell "retry later" from "fix the configuration"."""
    if isinstance(exc, ConfigError):  # (whatever it was raised while handling)
        return EXIT_SETTINGS
    if isinstance(exc, PortInUse | ClerkUnavailable | RateLimited | ReconcileBusy):
        return EXIT_UNAVAILABLE
    database = _database_cause(exc)
    if database is not None:
        return EXIT_UNAVAILABLE if _database_unavailable(database) else EXIT_SETTINGS
    if isinstance(exc, StoreError) and not isinstance(exc, StoreDataError | migrations.MigrationError):
        return EXIT_UNAVAILABLE  # one of ours without the driver's cause (a lock another process held): transient
    return EXIT_SETTINGS


def _database_cause(exc: BaseException) -> SQLAlchemyError | None:
    """The database's exception in ``exc``'s chain (a StoreError names it in words; its cause is the driver's)."""
    seen: BaseException | None = exc
    for _ in range(16):  # (a chain is short; a cycle is not followed for ever)
        if seen is None:
            return None
        if isinstance(seen, SQLAlchemyError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# Server errors of a database that is there but refuses this login or has no such database: settings to fix.
# PostgreSQL says them at connection time without a SQLSTATE (psycopg), so by its message's words.
_PG_LOGIN_REFUSED = ("authentication failed", "does not exist", "pg_hba.conf", "password", "permission denied",
                     "SSL", "certificate",
                     # a DATABASE_URL option libpq or the server refuses (``sslmode=bogus``, ``options=-cbogus=1``):
                     # exit 2 with the setting to fix, not 3 "retry later" for ever (review)
                     "unrecognized configuration parameter", "invalid value for parameter")
_PG_OPTION_VALUE_REFUSED = re.compile(r"invalid \w+ value")  # libpq: "invalid sslmode value: ..." and the like
# MySQL/MariaDB client errors of a server that cannot be reached or went away (can't connect, unknown host, gone
# away, lost the connection, too many connections, shutting down) and the server's passing states (killed,
# out of resources); the bounded waits are is_transient's.
_MYSQL_UNAVAILABLE = frozenset({2002, 2003, 2005, 2006, 2013, 2055, 1040, 1053, 1317, 3169, 4031,
                                1021, 1037, 1038, 1041, 1114})
_SQLITE_UNAVAILABLE = ("unable to open database file", "database is locked", "disk I/O error",
                       "database or disk is full", "out of memory")
_PG_UNAVAILABLE_CLASSES = ("08", "40", "53", "57", "58")  # connection, rollback (serialization, deadlock),
# insufficient resources, operator intervention (shutdown, cancelled), system error


def _database_unavailable(exc: SQLAlchemyError) -> bool:
    """The database cannot be reached or did not answer in time, as opposed to refusing what was asked (a
    login, a missing table: the schema behind, a privilege, a value): retrying later may succeed."""
    import sqlalchemy as sa

    if isinstance(exc, sa.exc.TimeoutError | sa.exc.DisconnectionError):  # the pool's wait; a dropped connection
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    orig = exc.orig
    if is_pooler_misconfigured(orig):  # PgBouncer refusing the timeouts' startup parameter: a setting, not a wait
        return False
    if exc.connection_invalidated or is_transient(orig):
        return True
    module = type(orig).__module__
    if module.startswith("psycopg"):
        state = str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")
        if not state:  # at connection time: no server reached, or a FATAL refusal of the login
            return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) and not any(
                words in str(orig) for words in _PG_LOGIN_REFUSED) and not _PG_OPTION_VALUE_REFUSED.search(str(orig))
        return state.startswith(_PG_UNAVAILABLE_CLASSES)
    if module == "sqlite3":
        return str(orig).startswith(_SQLITE_UNAVAILABLE)
    args = getattr(orig, "args", ())
    errno_ = args[0] if args and isinstance(args[0], int) else None
    if errno_ is not None:  # MySQL/MariaDB drivers
        return errno_ in _MYSQL_UNAVAILABLE
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)  # another driver: by its class


def _error_line(exc: Exception, code: int) -> str:
    """The one line saying what failed and what to do."""
    if isinstance(exc, CommandError):  # Alembic's own refusal, should one come past migrations.upgrade
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"could not migrate: {first}; `clerk-sync doctor` shows the schema's state"
    if isinstance(exc, SQLAlchemyError):  # e.g. `migrate` with the database down: one line, not a traceback
        # (A failed migration step is migrations.MigrationError, a ClerkSyncError: it names the migration.)
        # Through store_error: a lock wait that ran out says so, where "check DATABASE_URL" would mislead.
        from clerk_sync._db_errors import store_error

        text = str(store_error(exc))
    else:
        text = str(exc) + _HINTS.get(type(exc), "")
    said = any(words in text for words in ("retry later", "the schema is not current", "DATABASE_URL", "again",
                                           "the SQLite file"))  # (_db_errors.sqlite_file_advice's)
    if _database_cause(exc) is not None and not said:  # what to do, too
        text += (". Check DATABASE_URL, and that the database is up: retry once it answers"
                 if code == EXIT_UNAVAILABLE else ". Check DATABASE_URL")
    return text
