"""``clerk-sync serve``'s process side: uvicorn's multi-worker supervisor made to exit like one worker does
(3 with one line when the service cannot start, as ``main`` exits 3 for a port in use: ``main.EXIT_UNAVAILABLE``;
2 when a worker's migration was refused for good, as ``main.EXIT_SETTINGS``; 1 when workers keep dying), and a
start-up failure told as one line instead of uvicorn's traceback, and the fresh multiprocess metrics directory
``serve`` and ``worker`` count in. Apart from ``main`` because it reaches into uvicorn's supervisor
(``Multiprocess.keep_subprocess_alive``), which no public API lets us change."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from clerk_sync.errors import ClerkSyncError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from clerk_sync.hooks import Dispatcher

__all__ = ["STARTUP_FAILURE", "DispatchWhenMigrated", "bounded_http", "could_not_start", "serve_workers",
           "shared_metrics", "sigterm_unwinds", "tell_startup_failure"]

console = Console(stderr=True)

STARTUP_FAILURE = 3  # uvicorn's exit code for an app that could not start (uvicorn.config.STARTUP_FAILURE)
_REFUSED = 2  # a worker whose migration the database refused for good (main.EXIT_SETTINGS, as --workers 1 exits)
_REPORT_ENV = "CLERK_SYNC_STARTUP_REPORT"  # serve --workers: the file a worker writes why it could not start to
_JSON_LOGS_ENV = "CLERK_SYNC_SERVE_JSON_LOGS"  # serve --workers --json-logs, for the workers' own log set-up
_STARTUP_GRACE_S = 60.0  # a worker's time to answer its first health check (its process starts first)
_STARTING_CHECK_S = 0.2  # the health check's wait for a worker in its grace
_UNSTARTED = 2  # workers of a slot in a row that never answered within the grace: serve ends
_DEATHS, _DEATHS_WINDOW_S = 3, 60.0  # a worker (slot) that died this often this recently is not started again


def serve_workers(host: str, port: int, workers: int, sock: socket.socket, *, json_logs: bool = False,
                  graceful_timeout_s: int | None = None, limit_concurrency: int | None = None,
                  max_head_bytes: int = 64 * 1024, head_timeout_s: float = 10.0) -> None:
    """uvicorn's multi-worker mode on ``sock`` (bound by ``main._listen``, with IPPROTO_TCP). Exits like
    ``--workers 1`` when the service cannot run: 3 with one line when a worker could not start (uvicorn's
    own supervisor stopped, then returned as from a clean stop: exit 0, review), 1 when workers keep dying
    (restarted for ever before). A worker that dies now and then is replaced, as uvicorn does."""
    import tempfile

    import uvicorn

    with tempfile.TemporaryDirectory(prefix="clerk-sync-serve-") as reports:
        report = os.environ[_REPORT_ENV] = os.path.join(reports, "startup-failure")  # the workers inherit it
        os.environ[_JSON_LOGS_ENV] = "1" if json_logs else ""
        config = uvicorn.Config("clerk_sync.cli._serve:_worker_app", factory=True, host=host,
                                port=port, workers=workers, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=graceful_timeout_s,
                                http=bounded_http(max_head_bytes, head_timeout_s),
                                limit_concurrency=limit_concurrency)  # (each worker's own)
        supervisor = _supervisor(config, sock)
        try:
            supervisor.run()
        finally:
            os.environ.pop(_REPORT_ENV, None)
            os.environ.pop(_JSON_LOGS_ENV, None)
        if supervisor.failure is not None:
            code, line = supervisor.failure
            if code == STARTUP_FAILURE:
                line = could_not_start(_first_report(report), workers=True)
            elif code == _REFUSED:  # the refusal's own line (what to run, as whom), at start or while serving
                line = _first_report(report) or f"a worker process {line}"
            console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
            raise SystemExit(code)


def bounded_http(max_head_bytes: int, head_timeout_s: float) -> Any:
    """uvicorn's ``http=`` for ``serve``: httptools with a bound on each request's head (:mod:`._uvicorn_limits`:
    ``CLERK_SYNC_MAX_HEAD_BYTES``, ``CLERK_SYNC_HEAD_TIMEOUT_S``), or, without httptools, uvicorn's h11, whose own
    limit on an incomplete head (16 KiB) applies."""
    try:
        from clerk_sync.cli._uvicorn_limits import bounded_httptools
    except ImportError:
        return "auto"
    return bounded_httptools(max_head_bytes, head_timeout_s)


def _supervisor(config: Any, sock: socket.socket) -> Any:
    """uvicorn's ``Multiprocess``, with what it does when a worker ends (``keep_subprocess_alive``) replaced."""
    import time

    from uvicorn.supervisors import Multiprocess
    from uvicorn.supervisors.multiprocess import Process

    class Supervisor(Multiprocess):
        def __init__(self) -> None:
            super().__init__(config, sockets=[sock])
            self.failure: tuple[int, str] | None = None  # (exit code, the line saying why) once it gave up
            self._deaths: dict[int, list[float]] = {}  # per worker slot: when its processes died
            self._starting: dict[int, float] = {}  # per worker slot: when its process was started, until it answers
            self._unstarted: dict[int, int] = {}  # per worker slot: replacements in a row killed before answering

        def init_processes(self) -> None:
            """The first workers start within the same grace as a replacement: CI (a loaded box) had one of
            them still importing after the check's 5 s, killed as hung, and that death counted towards the
            three that end serve (two kills of its workers later, serve ended with 1)."""
            super().init_processes()
            started = time.monotonic()
            self._starting = dict.fromkeys(range(len(self.processes)), started)

        def keep_subprocess_alive(self) -> None:
            if self.should_exit.is_set():
                return
            healthcheck = getattr(self.config, "timeout_worker_healthcheck", 5)
            for idx, process in enumerate(self.processes):
                starting = idx in self._starting
                if process.is_alive(timeout=_STARTING_CHECK_S if starting else healthcheck):
                    self._starting.pop(idx, None)
                    self._unstarted.pop(idx, None)
                    continue
                unstarted = starting and process.process.is_alive()  # (not one that died while starting)
                if unstarted and self._within_grace(idx):
                    continue
                process.kill()  # hung: not answering the health check
                process.join()
                self.failure = self._given_up(idx, process.exitcode, unstarted=unstarted)
                if self.failure is not None:
                    self.should_exit.set()
                    return
                replacement = Process(self.config, self.sockets)
                replacement.start()
                self.processes[idx] = replacement
                self._starting[idx] = time.monotonic()

        def _within_grace(self, idx: int) -> bool:
            """A replacement answers no health check until its process has started (spawned, the main module
            and the app's configuration imported again): on a loaded machine that took longer than the check's
            5 s, and uvicorn's supervisor killed it as hung, which counted towards ending serve (a busy box lost
            its service after one kill of its workers). While its process lives it is given :data:`_STARTUP_GRACE_S`
            to answer once, asked with a short check (a long one would hold up the loop and signals)."""
            return time.monotonic() - self._starting[idx] < _STARTUP_GRACE_S

        def _given_up(self, idx: int, exitcode: int | None, *, unstarted: bool) -> tuple[int, str] | None:
            ended = _ended(exitcode)
            if exitcode in (STARTUP_FAILURE, _REFUSED):
                return exitcode, ended
            if unstarted:  # (its deaths are a grace apart: the window below would never see three)
                self._unstarted[idx] = self._unstarted.get(idx, 0) + 1
                if self._unstarted[idx] >= _UNSTARTED:
                    return 1, (f"{_UNSTARTED} worker processes in a row did not answer within {_STARTUP_GRACE_S:g} s "
                               "of starting, so serve stopped rather than restart them for ever: the log above may "
                               "say why; a machine too loaded to start a process in that time, or run with "
                               "--workers 1 to see it in one process")
            deaths = self._deaths.setdefault(idx, [])
            now = time.monotonic()
            deaths[:] = [t for t in deaths if now - t < _DEATHS_WINDOW_S] + [now]
            if len(deaths) < _DEATHS:
                console.print(f"serve: a worker process {ended}; starting another")
                return None
            return 1, (f"a worker process died {len(deaths)} times within {_DEATHS_WINDOW_S:g} s (the last time it "
                       f"{ended}), so serve stopped rather than restart it for ever: the log above says why (a "
                       "kill by the kernel's out-of-memory killer leaves no line there: check the memory limit), "
                       "or run with --workers 1 to see it in one process")

    return Supervisor()


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _worker_app() -> Any:
    """``serve --workers``' app factory, run in each worker: ``app_from_env``, and a start-up that fails
    writes why to the supervisor's report file and ends the worker as uvicorn's failed start (exit 3),
    which the supervisor does not restart (an exception here was a crash, restarted for ever)."""
    from clerk_sync._logging import configure_logging
    from clerk_sync.config import Settings
    from clerk_sync.integrations.starlette import app_from_env

    path = os.environ.get(_REPORT_ENV)

    def report(line: str) -> None:
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(line + "\n")

    try:
        # A spawned worker starts with structlog's defaults: the level and format `serve` was given, as
        # `--workers 1` has them (a DEBUG line per delivery on stdout, plain text under --json-logs, before)
        configure_logging(Settings.from_env().log_level, json=bool(os.environ.get(_JSON_LOGS_ENV)))
        app = app_from_env()
    except Exception as exc:
        if not isinstance(exc, ClerkSyncError):
            import traceback

            traceback.print_exc()
        report(_one_line(exc))
        raise SystemExit(STARTUP_FAILURE) from None
    migration = getattr(app.state, "clerk_sync_migration", None)

    def tell(line: str) -> None:
        if migration is not None and migration.refused is not None:  # refused at start: exit 2 as --workers 1
            refused()
        report(line)

    def refused() -> None:  # (nothing to lose: every delivery was answered 503 until migrated)
        report(migration.refused if migration is not None and migration.refused else "the migration was refused")
        os._exit(_REFUSED)  # the supervisor stops the others, says the report's line and exits 2

    tell_startup_failure(app, tell)
    if migration is not None:  # refused for good while serving (the database was down at start): as at start
        migration.on_refused = refused
    return app


def tell_startup_failure(app: Any, tell: Callable[[str], None]) -> None:
    """Wrap ``app``'s lifespan: an exception before it started serving is told to ``tell`` as one line
    (uvicorn logs it as a traceback, and a traceback is not what to do). Ours (a :class:`ClerkSyncError`: its
    message says what to do) is told without the traceback; anything else keeps it (a bug's, to report)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> Any:
        started = False
        try:
            async with inner(app_) as state:
                started = True
                yield state
        except BaseException as exc:
            if not started:
                tell(_one_line(exc))
                if all(isinstance(leaf, ClerkSyncError) for leaf in _leaves(exc)):  # (a bug beside it: kept)
                    _drop_next_traceback(type(_first(exc)).__name__)
            raise

    app.router.lifespan_context = lifespan


class DispatchWhenMigrated:
    """``serve --hooks``'s dispatcher thread, started once the app's start-up has run and, with ``--migrate``,
    once the schema is current: on a fresh database it would otherwise poll ``hook_jobs`` before serve's own
    migration created it, and log "hook dispatch: database unavailable ... run clerk-sync's migrations" while
    serve was doing just that. While the migration is retried (the database down), the migration's own
    ``migration_retry`` lines say why and the dispatcher waits without a word; once it runs, a database that
    goes down is its to report. Without ``--migrate`` it starts with the app (the schema is the deploy's to
    migrate: a warning saying so is then the right one)."""

    def __init__(self, dispatcher: Dispatcher, engine: Engine, *, migrate: bool, poll_s: float = 0.25) -> None:
        self.dispatcher = dispatcher
        self.engine = engine
        self.migrate = migrate
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._waiter: threading.Thread | None = None
        self._deadline: float | None = None  # time.monotonic() by which a stop asked (SIGTERM) is waited for
        self._stopped = False  # stop() ran (once is enough: the app's shutdown, then serve's finally)

    def attach(self, app: Any) -> None:
        """Wrap ``app``'s lifespan: the dispatcher starts (or starts waiting) once the app has started. ``/readyz``
        then asks the dispatcher's privileges too (``app.state.clerk_sync_dispatches``)."""
        inner = app.router.lifespan_context
        app.state.clerk_sync_dispatches = True

        @contextlib.asynccontextmanager
        async def lifespan(app_: Any) -> Any:
            async with inner(app_) as state:
                if not self.migrate:
                    self.dispatcher.start()
                else:  # asked from a thread, not here: a database that cannot be reached would hold the
                    # start-up (and the port's opening) for another connect timeout (review)
                    self._waiter = threading.Thread(target=self._wait, name="clerk-sync-hooks-wait", daemon=True)
                    self._waiter.start()
                try:
                    yield state
                finally:  # the app's shutdown (in-flight requests answered): the dispatcher stops before the
                    # store's committer closes, and before uvicorn re-raises a SIGTERM that ends the process
                    from anyio import to_thread

                    await to_thread.run_sync(self.stop)

        app.router.lifespan_context = lifespan

    def ask_stop(self, wait_s: float) -> None:
        """Ask the dispatcher to stop (from a signal handler: nothing waits here), the running job let finish
        and the batch's jobs not started given back; :meth:`stop` then waits at most ``wait_s`` from now."""
        import time

        if self._deadline is None:
            self._deadline = time.monotonic() + wait_s
        self._stop.set()
        self.dispatcher.stop(timeout_s=0)

    def _migrated(self) -> bool:
        from alembic.util.exc import CommandError
        from sqlalchemy.exc import SQLAlchemyError

        from clerk_sync import migrations
        from clerk_sync.errors import StoreError

        try:
            return migrations.is_current(self.engine)
        except (SQLAlchemyError, StoreError, CommandError):  # down, or mid-migration: the migration reports it
            return False

    def _wait(self) -> None:
        while not self._stop.is_set():
            if self._migrated():
                if not self._stop.is_set():
                    self.dispatcher.start()
                return
            self._stop.wait(self.poll_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop waiting, and the dispatcher if it started: its running job finishes, the batch's jobs not
        started are given back. Waits at most ``timeout_s``, or what is left of :meth:`ask_stop`'s wait."""
        import time

        if self._stopped:  # (the app's shutdown stopped it; serve's own finally asks again: nothing more)
            return
        self._stopped = True
        self._stop.set()
        if self._deadline is not None:
            timeout_s = max(0.0, self._deadline - time.monotonic())
        if self._waiter is not None:
            self._waiter.join(timeout_s)
        self.dispatcher.stop(timeout_s=timeout_s if self._deadline is None else
                             max(0.0, self._deadline - time.monotonic()))


def _drop_next_traceback(name: str) -> None:
    """Starlette hands uvicorn a start-up failure as its formatted traceback, which uvicorn logs at ERROR: the next
    such record of ``uvicorn.error`` naming the exception's type ``name`` is dropped, "Application startup failed.
    Exiting." kept. The filter goes with either record (uvicorn logs the second after the first)."""
    import logging

    target = logging.getLogger("uvicorn.error")

    def once(record: logging.LogRecord) -> bool:
        said = record.getMessage()
        if said.startswith("Application startup failed"):
            target.removeFilter(once)
        elif record.levelno >= logging.ERROR and "Traceback (most recent call last)" in said and name in said:
            target.removeFilter(once)
            return False
        return True

    target.addFilter(once)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions a task group's (``ExceptionGroup``, nested) holds, or ``exc``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _first(exc: BaseException) -> BaseException:
    """The first exception of a task group's (``ExceptionGroup``), or ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _one_line(exc: BaseException) -> str:
    """An exception as one line: the first of a task group's (``ExceptionGroup``), ours by its message."""
    exc = _first(exc)
    text = " ".join(str(exc).split())
    return text if isinstance(exc, ClerkSyncError) and text else f"{type(exc).__name__}: {text}"


def _first_report(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as reports:
            return reports.readline().strip() or None
    except OSError:
        return None


def could_not_start(why: str | None, *, workers: bool = False) -> str:
    who = "a worker process of the service" if workers else "the service"
    if why is None:
        return (f"{who} could not start (the log above says why); `clerk-sync doctor` checks the settings, "
                "the database and its migrations")
    return f"{who} could not start: {why}"


@contextlib.contextmanager
def shared_metrics() -> Iterator[None]:
    """``serve --workers``: each worker counts in its own process; with one PROMETHEUS_MULTIPROC_DIR
    /metrics sums them (clerk_sync.metrics). Fresh each run (inside the operator's directory, if set, made
    if missing): files left by an earlier run would add its counts to this one's. Set before anything
    imports prometheus_client, which reads it once (the parent's own files land here too), removed after."""
    import shutil
    import tempfile

    parent = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    metrics_dir = tempfile.mkdtemp(prefix="clerk-sync-metrics-", dir=parent)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # uvicorn re-raises SIGTERM once its graceful shutdown is done; with the default action the process
    # would die there, before this block's cleanup. As _Terminated the directory is removed on the way
    # out, and then the process ends by SIGTERM all the same (what a supervisor expects of a clean stop).
    sigterm_default = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if sigterm_default:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
        shutil.rmtree(metrics_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # (not reached: the signal ends the process)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if sigterm_default:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """uvicorn re-raises a SIGTERM once its graceful shutdown is done; with the default action the process
    died there, before its caller's ``finally`` blocks (``serve --hooks``: the dispatcher's stop, so its
    handler was cut off and its claimed jobs held for their lease), unless PROMETHEUS_MULTIPROC_DIR had made
    :func:`shared_metrics` set its own handler. Here too the signal unwinds as :class:`_Terminated`, and the
    process then ends by SIGTERM all the same. A handler set already (``shared_metrics``') is left alone."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # (not reached: the signal ends the process)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Terminated(BaseException):
    """SIGTERM arrived (see shared_metrics); a BaseException, so no ``except Exception`` swallows it."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise _Terminated
