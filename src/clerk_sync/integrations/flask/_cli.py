"""``flask clerk-sync migrate|replay|reconcile|promote|retry-pending|prune``: the ``clerk-sync`` commands, with
the app's settings.

They do what ``cli/main.py`` does, but read the settings :class:`ClerkSync` built from ``app.config``
instead of the environment, so ``flask --app yourapp clerk-sync migrate`` needs no second configuration.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click
import sqlalchemy as sa
from alembic.util.exc import CommandError
from flask.cli import AppGroup
from rich.console import Console

from clerk_sync import migrations
from clerk_sync.cli._args import STORED_STATUSES, refuse_undecodable
from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import ClerkSyncError, ConfigError
from clerk_sync.integrations.flask._core import clerk_state

__all__ = ["clerk_sync_cli"]

P = ParamSpec("P")
R = TypeVar("R")


class _Failed(click.ClickException):
    """``Error: <line>`` on stderr and the exit code of ``clerk-sync``'s one table (click's default is 1)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]  # (click reads it from the instance)


def _readable(command: Callable[P, R]) -> Callable[P, R]:
    """Our errors, and the database's (``migrate`` with the database down), become one line (``Error: ...``)
    instead of a traceback, with what to do and ``clerk-sync``'s exit code (:func:`clerk_sync.cli.main.exit_code`):
    2 for a setting, an argument or the schema to fix, 3 when the database or Clerk is unavailable (retry later).
    A command that ran and left work undone exits 1 (its own ``ClickException``)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            refuse_undecodable([*args, *kwargs.values()])  # (not UTF-8: a driver's traceback later)
            return command(*args, **kwargs)
        except (ClerkSyncError, sa.exc.SQLAlchemyError, CommandError) as exc:
            from clerk_sync.cli.main import _error_line, exit_code  # (the CLI's one table, not a copy)

            code = exit_code(exc)
            raise _Failed(_error_line(exc, code), code) from None

    return wrapper


clerk_sync_cli = AppGroup("clerk-sync", help="clerk-sync commands, configured from this app's config.")


@clerk_sync_cli.command()
@click.option("--backfill", is_flag=True, help="Also write the rows clerk-sync already holds into the mapped "
                                               "tables (idempotent); needs a store with a mapping.")
@_readable
def migrate(backfill: bool) -> None:
    """Apply database migrations; with a mapping, also add what its tables need (Clerk-id and delete columns).

    The mapping is the one of the store passed as ClerkSync(app, store=...), which the webhook route writes
    through: this does what `clerk-sync migrate --mapping` (and --backfill) does, with the same migrate_schema."""
    from clerk_sync.cli.hooks import migrate_mapping

    store = clerk_state().store
    schema = store.mapping
    if backfill and schema is None:  # refused before anything is changed
        raise ConfigError("--backfill needs a mapping: pass ClerkSync(app, store=Store.from_settings(settings, "
                          "mapping=...))")
    click.echo(migrations.upgrade(store.engine).summary())  # what it applied, as `clerk-sync migrate` says
    if schema is None:
        return
    migrated = migrate_mapping(store, schema, backfill=backfill, settings=clerk_state().settings)
    for line in migrated:
        click.echo(line)
    if migrated.refused:  # exit 1: the backfill left rows unwritten (the last line says what to do)
        raise click.ClickException(f"{migrated.refused} row(s) refused by the mapped tables")


@clerk_sync_cli.command()
@click.option("--status", default="failed", show_default=True, type=click.Choice(STORED_STATUSES),  # a typo: exit 2
              help="Replay deliveries with this status.")
@click.option("--since", default=None, help="Received at/after (ISO 8601, naive = UTC).")
@click.option("--with-hooks", is_flag=True, help="Fire the store's hooks for what the replay applies; "
                                                 "by default none fire.")
@_readable
def replay(status: str, since: str | None, with_hooks: bool) -> None:
    """Re-apply stored deliveries (after fixing what made them fail); exit 1 while some stay failed."""
    from clerk_sync.cli._args import parse_since
    from clerk_sync.ingest import replay_deliveries

    report = replay_deliveries(clerk_state().store, status=status, since=parse_since(since), with_hooks=with_hooks)
    click.echo(report.summary())
    if report.left:  # not failed, and the replay changed nothing: kept as they were (their status is history)
        click.echo(f"{report.left_said}: left as they were")
    if still := report.by_status.get(DeliveryStatus.FAILED.value):  # a scheduled replay must not look fine
        raise click.ClickException(f"{still} still failed: read webhook_events.last_error, fix the cause, then "
                                   "replay again")


@clerk_sync_cli.command()
@click.option("--dry-run", is_flag=True, help="Count what is due; change nothing.")
@_readable
def prune(dry_run: bool) -> None:
    """Apply retention (redact old payloads, delete older rows, clear tombstones): run it from cron, hourly."""
    from clerk_sync.retention import Retention, RetentionPolicy

    state = clerk_state()
    report = Retention(state.store, RetentionPolicy.from_settings(state.settings)).prune(dry_run=dry_run)
    click.echo(report.summary())


@clerk_sync_cli.command()
@click.option("--since", default=None, help="Only users updated at/after this ISO time.")
@click.option("--dry-run", is_flag=True, help="Write nothing; print the diff.")
@click.option("--with-hooks", is_flag=True, help="Fire the store's hooks for the repairs; by default none fire.")
@click.option("--allow-mass-delete", is_flag=True,
              help="Delete even when Clerk no longer lists over a quarter of the rows.")
@_readable
def reconcile(since: str | None, dry_run: bool, with_hooks: bool, allow_mass_delete: bool) -> None:
    """Re-read Clerk (users, organizations, memberships) and repair drift; resumes after a kill. Exit 1 when
    some of Clerk's objects could not be read (the summary's ``failed`` column).

    The repairs go through the extension's store (``ClerkSync(app, store=...)``: its mapped tables, and its
    hooks with ``--with-hooks``)."""
    from clerk_sync.cli.reconcile import reconcile_command, unread_objects

    state = clerk_state()
    report = reconcile_command(state.settings, since=since, dry_run=dry_run, console=Console(stderr=True),
                               hooks=state.store.hooks if with_hooks else (), store=state.store,
                               allow_mass_delete=allow_mass_delete)
    if (unread := unread_objects(report)) is not None:
        raise click.ClickException(unread)


@clerk_sync_cli.command()
@click.argument("email")
@click.option("--role", default="admin", show_default=True, help="Role for public_metadata.role.")
@_readable
def promote(email: str, role: str) -> None:
    """Set a user's role in Clerk and the DB (needs CLERK_SECRET_KEY); audited."""
    from clerk_sync.auth.admin import find_user_by_email, no_user_found

    state = clerk_state()
    if state.admin is None:
        raise ConfigError("promote needs CLERK_SECRET_KEY (Clerk Dashboard -> API keys) in app.config")
    clerk_id = find_user_by_email(state.store, email)
    if clerk_id is None:
        raise click.ClickException(no_user_found(email, "flask clerk-sync reconcile"))
    change = state.admin.promote(clerk_id, role, by=None)
    click.echo(f"{change.status}: {email} ({clerk_id}) {change.previous_role} -> {role}")
    if change.status == "pending":  # not done: a script must see it
        click.echo(change.pending_advice("flask clerk-sync retry-pending"), err=True)
        raise SystemExit(3)


@clerk_sync_cli.command("retry-pending")
@_readable
def retry_pending() -> None:
    """Push role changes recorded while Clerk was unreachable (from cron); exit 3 while some still wait."""
    state = clerk_state()
    if state.admin is None:
        raise ConfigError("retry-pending needs CLERK_SECRET_KEY (Clerk Dashboard -> API keys) in app.config")
    counts = state.admin.retry_pending()
    click.echo(f"pending role changes: {counts}")
    if counts["pending"]:
        raise SystemExit(3)  # still waiting on Clerk: let the scheduler notice
