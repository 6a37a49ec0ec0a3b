"""``clerk-sync worker`` (the hook dispatcher as its own process) and ``clerk-sync hooks list|retry|purge``.

Hooks are Python code, so the commands that run them take ``--hooks module:attribute``: a list of
:class:`~clerk_sync.changes.Hook`, or a function returning one (called once, with no arguments).
Listing, retrying and purging dead jobs need only the database.
"""

from __future__ import annotations

import importlib
import signal
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console

from clerk_sync.changes import Hook
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.mapping import SchemaMapping
from clerk_sync.outbox import delete_jobs, list_jobs, retry_jobs
from clerk_sync.store import Store

__all__ = ["HOOKS_HELP", "MAPPING_HELP", "hooks_app", "load_hooks", "load_mapping", "worker"]

HOOKS_HELP = "Your hooks, as module:attribute (a list of Hook, or a function returning one)."
MAPPING_HELP = "Your tables' mapping, as module:attribute (a SchemaMapping, or a function returning one)."
hooks_app = typer.Typer(help="Inspect and repair the after-commit hook queue (dead jobs).", no_args_is_help=True)


def _load(option: str, spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{option} {spec!r}: expected module:attribute, e.g. myapp.clerk:VALUE")
    try:
        value: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{option} {spec!r}: {exc} (is the module on PYTHONPATH?)") from None
    return value() if callable(value) and not isinstance(value, SchemaMapping) else value


def load_hooks(spec: str) -> list[Hook]:
    """Import ``module:attribute`` and return its hooks; every mistake is a :class:`ConfigError`."""
    value = _load("--hooks", spec)
    if not isinstance(value, Sequence) or not value or not all(isinstance(h, Hook) for h in value):
        raise ConfigError(f"--hooks {spec!r} must be a non-empty list of clerk_sync.changes.Hook")
    return list(value)


def load_mapping(spec: str | None) -> SchemaMapping | None:
    """Import ``module:attribute`` and return its :class:`SchemaMapping` (None when ``spec`` is None)."""
    if spec is None:
        return None
    value = _load("--mapping", spec)
    if not isinstance(value, SchemaMapping):
        raise ConfigError(f"--mapping {spec!r} must be a clerk_sync.mapping.SchemaMapping")
    return value


def worker(
    hooks: Annotated[str, typer.Option(help=HOOKS_HELP)],
    once: Annotated[bool, typer.Option("--once", help="Run the due jobs, then exit.")] = False,
    poll: Annotated[float, typer.Option(help="Seconds between polls of an empty queue.")] = 1.0,
    batch: Annotated[int, typer.Option(
        min=1, help="The most jobs one claim takes (fewer while handlers are slow: a tenth of the lease's worth)."),
    ] = 500,
    lease: Annotated[float, typer.Option(help="Seconds a claim lasts (longer than a batch of handlers).")] = 60.0,
    vacuum_every: Annotated[int, typer.Option(
        min=0, help="PostgreSQL: VACUUM the outbox after so many finished jobs (0: leave it to autovacuum).")] = 1000,
) -> None:
    """Run after-commit hooks from the outbox (DATABASE_URL); run several for more throughput."""
    from clerk_sync.hooks import Dispatcher

    store = Store.from_url(Settings.from_env().sqlalchemy_url(), hooks=load_hooks(hooks))
    dispatcher = Dispatcher(store, batch=batch, lease_s=lease, poll_s=poll, vacuum_every=vacuum_every)
    if once:
        count = dispatcher.drain()
        store.dispose()
        Console(stderr=True).print(f"ran {count} hook jobs")
        return
    signal.signal(signal.SIGTERM, lambda *_: dispatcher.stop(timeout_s=0))
    Console(stderr=True).print(f"clerk-sync worker: hooks {[h.name for h in store.hooks]}")
    try:
        dispatcher.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        store.dispose()


def _store() -> Store:
    return Store.from_url(Settings.from_env().sqlalchemy_url())


def _ids(ids: list[int] | None, all_: bool, verb: str) -> list[int] | None:
    if not ids and not all_:
        raise ConfigError(f"name the dead jobs to {verb} (ids from `clerk-sync hooks list`), or pass --all")
    return None if all_ else ids


@hooks_app.command("list")
def list_command(
    status: Annotated[str, typer.Option(help="dead, pending or running.")] = "dead",
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
) -> None:
    """List queued hook jobs (dead ones by default), tab-separated: id, hook, type, Clerk id, attempts, error."""
    store = _store()
    with store.connect() as conn:
        jobs = list_jobs(conn, status=status, limit=limit)
    store.dispose()
    for job in jobs:
        typer.echo(f"{job.id}\t{job.hook}\t{job.change.type}\t{job.change.clerk_id}\tattempts={job.attempts}"
                   f"\t{job.last_error or ''}")
    Console(stderr=True).print(f"{len(jobs)} {status} job(s)")


@hooks_app.command("retry")
def retry_command(
    ids: Annotated[list[int] | None, typer.Argument(help="Job ids.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead job.")] = False,
) -> None:
    """Queue dead jobs again, with a fresh attempt budget."""
    store = _store()
    with store.transaction() as writer:
        count = retry_jobs(writer.conn, datetime.now(UTC), _ids(ids, all_, "retry"))
    store.dispose()
    typer.echo(f"{count} dead job(s) queued again")


@hooks_app.command("purge")
def purge_command(
    ids: Annotated[list[int] | None, typer.Argument(help="Job ids.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead job.")] = False,
) -> None:
    """Delete dead jobs (their changes will not be handled)."""
    store = _store()
    with store.transaction() as writer:
        count = delete_jobs(writer.conn, _ids(ids, all_, "purge"))
    store.dispose()
    typer.echo(f"{count} dead job(s) purged")
