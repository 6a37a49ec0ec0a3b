"""``manage.py clerk_sync migrate|reconcile|replay|promote|retry-pending|prune|erase``: the ``clerk-sync`` commands,
with the settings read from ``settings.CLERK_SYNC`` (and its fallbacks) instead of the environment alone.

``erase`` and ``prune`` also clear what :class:`~clerk_sync.integrations.django.backends.ClerkBackend` copied
onto the Django user (``auth_user``'s e-mail and names), which ``clerk-sync users erase``/``prune`` cannot see.

``CLERK_SYNC["MAPPING"]`` and ``["HOOKS"]`` apply as they do to the webhook view: migrate adds what the mapped
tables need (``--backfill``: and writes the rows clerk-sync holds into them), replay, reconcile and promote write
the mapped tables, and promote queues the hooks. Replay and reconcile fire the hooks only
with ``--with-hooks`` (as ``clerk-sync replay/reconcile --with-hooks``): re-processing must not send the
welcome mail twice.

Django's common options (``--settings``, ``-v``, ``--traceback``...) go before or after the action. Exit codes
follow ``clerk-sync``'s (:func:`clerk_sync.cli.main.exit_code`): 1 when work was left undone (deliveries still
failed, objects not read), 2 for a setting or an argument to fix, 3 when the database or Clerk is unavailable
(retry later)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser, SystemCheckError
from django.db import InterfaceError, OperationalError

from clerk_sync import migrations
from clerk_sync._db_errors import store_error
from clerk_sync._urls import masked_url
from clerk_sync.cli._args import STORED_STATUSES, refuse_undecodable
from clerk_sync.cli.main import EXIT_SETTINGS, EXIT_UNAVAILABLE, EXIT_UNDONE, erase_outcome, exit_code
from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import ClerkSyncError, StoreError
from clerk_sync.integrations.django.conf import clerk_settings, django_options
from clerk_sync.integrations.django.runtime import naming_database

if TYPE_CHECKING:
    from clerk_sync.store import Store

__all__ = ["Command"]


def _common_options(parser: argparse.ArgumentParser) -> None:
    """Django's own options (``BaseCommand.create_parser``'s), accepted after the action too:
    ``manage.py clerk_sync migrate --settings=config.settings.prod``, as every other command takes them. Given
    there, they default to nothing (``SUPPRESS``), so one given before the action is not overwritten."""
    suppress = argparse.SUPPRESS
    parser.add_argument("-v", "--verbosity", type=int, choices=[0, 1, 2, 3], default=suppress,
                        help="Verbosity level; 0=minimal output, 1=normal output, 2=verbose output, 3=very verbose "
                             "output")
    parser.add_argument("--settings", default=suppress,
                        help="The Python path to a settings module, e.g. \"myproject.settings.main\".")
    parser.add_argument("--pythonpath", default=suppress,
                        help='A directory to add to the Python path, e.g. "/home/djangoprojects/myproject".')
    for flag, about in (("--traceback", "Raise on CommandError exceptions."),
                        ("--no-color", "Don't colorize the command output."),
                        ("--force-color", "Force colorization of the command output."),
                        ("--skip-checks", "Skip system checks.")):
        parser.add_argument(flag, action="store_true", default=suppress, help=about)


class Command(BaseCommand):
    help = "clerk-sync: migrate its tables, reconcile with Clerk, replay deliveries, promote, prune, erase a user."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        migrate = sub.add_parser("migrate", help="Apply clerk-sync's migrations to DATABASE_URL; with "
                                                 'CLERK_SYNC["MAPPING"], add its Clerk-id and delete columns.')
        migrate.add_argument("--backfill", action="store_true",
                             help="Also write the rows clerk-sync already holds into the mapped tables "
                                  "(idempotent).")
        reconcile = sub.add_parser("reconcile", help="Re-read Clerk and repair drift (resumes after a kill); exit 1 "
                                                     "when some of Clerk's objects could not be read.")
        reconcile.add_argument("--since", help="Only users updated at/after this ISO time.")
        reconcile.add_argument("--dry-run", action="store_true", help="Write nothing; print the diff.")
        reconcile.add_argument("--with-hooks", action="store_true",
                               help='Fire CLERK_SYNC["HOOKS"] for the repairs; by default none fire.')
        reconcile.add_argument("--allow-mass-delete", action="store_true",
                               help="Delete even when Clerk no longer lists over a quarter of the rows.")
        replay = sub.add_parser("replay", help="Re-apply stored deliveries (after fixing what made them fail); exit 1 "
                                               "while some stay failed.")
        replay.add_argument("--status", default="failed", choices=STORED_STATUSES,  # a typo replayed nothing, exit 0
                            help="Replay deliveries with this status.")
        replay.add_argument("--since", help="Received at/after (ISO 8601, naive = UTC).")
        replay.add_argument("--with-hooks", action="store_true",
                            help='Fire CLERK_SYNC["HOOKS"] for what the replay applies; by default none fire.')
        prune = sub.add_parser("prune", help="Apply retention (redact old payloads, delete older rows, clear "
                                             "tombstones): run it from cron, hourly.")
        prune.add_argument("--dry-run", action="store_true", help="Count what is due; change nothing.")
        erase = sub.add_parser("erase", help="Erase a user's personal data from every table and stored payload now, "
                                             "the Django user's copy included (data-subject request); audited.")
        erase.add_argument("clerk_id", help="Clerk user id (user_...), not an e-mail address.")
        erase.add_argument("--reason", help="Recorded in the audit log, e.g. a ticket id (name no one in it).")
        erase.add_argument("--actor", help="Clerk id of the admin acting (audit log).")
        erase.add_argument("--force", action="store_true",
                           help="Erase an id this database has never seen (a tombstone is written so its events "
                                "never land); without it such an id (a typo?) is refused.")
        erase.add_argument("--any-id", action="store_true",
                           help="Accept an id that does not start with user_ (a users table holding ids of "
                                "another form).")
        promote = sub.add_parser("promote", help="Set a user's role in Clerk and the DB; audited.")
        promote.add_argument("email", help="Primary email of the user.")
        promote.add_argument("--role", default="admin", help="Role to set in public_metadata.role.")
        sub.add_parser("retry-pending", help="Push role changes recorded while Clerk was unreachable (from cron); "
                                             "exit 3 while some still wait.")
        for action in sub.choices.values():
            _common_options(action)

    def execute(self, *args: Any, **options: Any) -> Any:
        """A system check's error (``SystemCheckError``, raised before ``handle``) exits 2, a setting to fix, as
        every other one: Django's default 1 reads as "work left undone" (deliveries still failed) to cron."""
        try:
            return super().execute(*args, **options)
        except SystemCheckError as exc:
            exc.returncode = EXIT_SETTINGS
            raise

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        """Exit codes as ``clerk-sync``'s (:func:`~clerk_sync.cli.main.exit_code`, the one table): 3 for the
        database or Clerk unavailable, 2 for a setting (or the schema) to fix, 1 for work left undone."""
        try:
            refuse_undecodable([*args, *options.values()])  # (not UTF-8: a driver's traceback later)
            getattr(self, f"_{action.replace('-', '_')}")(**options)
        except ImproperlyConfigured as exc:  # (CLERK_SYNC read: a setting to fix)
            raise CommandError(str(exc), returncode=EXIT_SETTINGS) from exc
        except StoreError as exc:  # a missing table: which database to migrate
            raise CommandError(str(naming_database(exc, clerk_settings().database_url)),
                               returncode=exit_code(exc)) from exc
        except ClerkSyncError as exc:
            raise CommandError(str(exc), returncode=exit_code(exc)) from exc
        except (OperationalError, InterfaceError) as exc:
            # Django's own database (prune's and erase's Django users): down, one line and exit 3 as clerk-sync's
            # (a traceback and 1, "work left undone", before: review); a fault for good stays Django's traceback
            from clerk_sync.integrations.django.backends import _django_outage

            outage = _django_outage(exc, "check DATABASES['default'] and that Django's database is up, then run it "
                                         "again (clerk-sync's own part is done and kept)")
            if outage is None:
                raise
            raise CommandError(str(outage), returncode=EXIT_UNAVAILABLE) from exc
        except sa.exc.SQLAlchemyError as exc:  # (migrate with the database down): one line, no SQL nor values
            raise CommandError(f"{store_error(exc)}; check CLERK_SYNC['DATABASE_URL'], else DATABASES['default'], "
                               f"and that the database is up ({masked_url(clerk_settings().database_url)})",
                               returncode=exit_code(exc)) from exc

    def _migrate(self, *, backfill: bool = False, **_: Any) -> None:
        """``clerk-sync migrate --mapping`` with ``CLERK_SYNC["MAPPING"]`` (the webhook view's): the same
        ``migrate_schema`` adds what the mapped tables need, ``--backfill`` the same ``SchemaMapping.backfill``."""
        from clerk_sync.cli.hooks import migrate_mapping
        from clerk_sync.store import Store

        settings, mapping = clerk_settings(), django_options().mapping
        if backfill and mapping is None:  # refused before anything is changed
            raise CommandError('--backfill needs CLERK_SYNC["MAPPING"]: the dotted path of your SchemaMapping',
                               returncode=EXIT_SETTINGS)
        store = Store.from_settings(settings)
        try:
            self.stdout.write(f"clerk-sync {migrations.upgrade(store.engine).summary()}")  # as `clerk-sync migrate`
            if mapping is None:
                return
            migrated = migrate_mapping(store, mapping, backfill=backfill, settings=settings)
            for line in migrated:
                self.stdout.write(line)
        finally:
            store.dispose()
        if migrated.refused:  # the backfill left rows unwritten (its last line says what to do): exit 1
            raise CommandError(f"{migrated.refused} row(s) refused by the mapped tables", returncode=EXIT_UNDONE)

    def _reconcile(self, *, since: str | None, dry_run: bool, with_hooks: bool, allow_mass_delete: bool = False,
                   **_: Any) -> None:
        from rich.console import Console

        from clerk_sync.cli.reconcile import reconcile_command, unread_objects

        options = django_options()
        report = reconcile_command(clerk_settings(), since=since, dry_run=dry_run, console=Console(stderr=True),
                                   hooks=options.hooks if with_hooks else (), mapping=options.mapping,
                                   allow_mass_delete=allow_mass_delete)
        self.stdout.write(f"reconcile {'dry run' if dry_run else 'run'} done: "
                          + ", ".join(f"{k} {v.created}+/{v.updated}~/{v.deleted}-" for k, v in report.counts.items()))
        if (unread := unread_objects(report)) is not None:
            raise CommandError(unread, returncode=EXIT_UNDONE)

    def _replay(self, *, status: str, since: str | None, with_hooks: bool, **_: Any) -> None:
        from clerk_sync.cli._args import parse_since
        from clerk_sync.ingest import replay_deliveries

        store = self._store()
        try:
            report = replay_deliveries(store, status=status, since=parse_since(since), with_hooks=with_hooks)
        finally:
            store.dispose()
        by_status = {str(status): n for status, n in report.by_status.items()}
        self.stdout.write(report.summary())
        if report.left:  # not failed, and the replay changed nothing: kept as they were (their status is history)
            self.stdout.write(f"{report.left_said}: left as they were")
        if still := by_status.get(DeliveryStatus.FAILED.value):  # a scheduled replay must not look fine
            raise CommandError(f"{still} still failed: read webhook_events.last_error (or the admin's webhook "
                               "deliveries), fix the cause, then replay again", returncode=EXIT_UNDONE)

    def _prune(self, *, dry_run: bool, **_: Any) -> None:
        from clerk_sync.integrations.django.backends import (
            forget_cleared_django_users,
            refresh_django_users,
            uses_clerk_backend,
        )
        from clerk_sync.retention import Retention, RetentionPolicy

        store = self._store()
        try:
            report = Retention(store, RetentionPolicy.from_settings(clerk_settings())).prune(dry_run=dry_run)
        finally:
            store.dispose()
        self.stdout.write(report.summary())
        if not dry_run and not uses_clerk_backend():
            # Only ClerkBackend's Django users, as the webhook view: an app's own users keyed by the Clerk id
            # (no password; a MAPPING onto auth_user) were made superusers by the role, or lost the staff the
            # app gave them, and their e-mail and names rewritten (review)
            self.stdout.write("Django users: left alone (AUTHENTICATION_BACKENDS lists no ClerkBackend)")
        elif not dry_run:  # the tombstones cleared now, and before: their Django users' copies go too
            changed, failed = forget_cleared_django_users()
            self.stdout.write(f"Django users cleared: {changed}")
            # ...and the Django users of users banned, deleted or demoted by deliveries another process applied
            # (`clerk-sync serve`, replay, reconcile): no longer active, staff or superuser in auth_user
            refreshed, unrefreshed = refresh_django_users()
            self.stdout.write(f"Django users brought in step: {refreshed}")
            if failed:
                raise CommandError(f"{len(failed)} Django user(s) could not be cleared (pk {failed[:20]}): see the "
                                   "django_user_forget_failed log lines", returncode=EXIT_UNDONE)
            if unrefreshed:
                raise CommandError(f"{len(unrefreshed)} Django user(s) could not be brought in step (pk "
                                   f"{unrefreshed[:20]}): see the django_user_refresh_failed log lines",
                                   returncode=EXIT_UNDONE)

    def _erase(self, *, clerk_id: str, reason: str | None, actor: str | None, force: bool, any_id: bool = False,
               **_: Any) -> None:
        """``clerk-sync users erase`` with ``CLERK_SYNC["MAPPING"]``/``["HOOKS"]``, then the Django user's copy."""
        from clerk_sync.integrations.django.backends import forget_django_user
        from clerk_sync.retention import Retention, UnknownUser, could_be_user_id, too_long_for_an_id

        if not could_be_user_id(clerk_id):
            raise CommandError(too_long_for_an_id(clerk_id) or f"erase needs a Clerk user id (user_...), not "
                               f"{clerk_id!r}", returncode=EXIT_SETTINGS)
        if not (any_id or clerk_id.startswith("user_")):
            # as `clerk-sync users erase`: an organization's id tombstoned as a user's, and (with --force) every
            # stored delivery naming it redacted, other members' failed ones settled for good (review)
            raise CommandError(f"{clerk_id!r} is not a Clerk user id (they start with user_; this may be an "
                               "organization's or another object's): pass the user's id, or --any-id if your users "
                               "table holds ids of another form; nothing was changed", returncode=EXIT_SETTINGS)
        store = self._store()
        try:
            report = Retention(store).erase_user(clerk_id, actor=actor, reason=reason, allow_unknown=force)
            found = erase_outcome(store, report)
        except UnknownUser as exc:  # (as `clerk-sync users erase` says it, and exits)
            raise CommandError(f"no user {clerk_id!r} in this database (no row, no stored event); nothing was "
                               "changed. Check the id (Clerk Dashboard -> Users, or the users table's clerk_id), or "
                               "pass --force to tombstone a user never synced.", returncode=EXIT_UNDONE) from exc
        finally:
            store.dispose()
        forgotten = forget_django_user(clerk_id)
        self.stdout.write(f"{clerk_id}: {found}, {report.payloads_redacted} stored payload(s) redacted; audited as "
                          f"user.erased; Django user: {'cleared' if forgotten else 'nothing to clear'}")
        if (advice := report.elsewhere_advice()) is not None:
            self.stderr.write(f"warning: {advice}")
        if report.mapped_refused:  # clerk-sync's rows are erased, the request is not done: a script must see it
            refused = "; ".join(f"{each}: clear it in the app's table" for each in report.mapped_refused)
            raise CommandError(refused, returncode=EXIT_UNDONE)

    def _promote(self, *, email: str, role: str, **_: Any) -> None:
        from clerk_sync.auth.admin import AdminActions, find_user_by_email, no_user_found
        from clerk_sync.clerk_api import ClerkClient

        settings = clerk_settings()
        store = self._store()
        try:
            clerk_id = find_user_by_email(store, email)
            if clerk_id is None:
                raise CommandError(no_user_found(email, "manage.py clerk_sync reconcile"), returncode=EXIT_UNDONE)
            with ClerkClient.from_settings(settings) as client:
                change = AdminActions(store, client).promote(clerk_id, role, by=None)
        finally:
            store.dispose()
        self.stdout.write(f"{change.status}: {email} ({clerk_id}) {change.previous_role} -> {role}")
        if change.status == "pending":  # not done: a script must see it
            raise CommandError(change.pending_advice("manage.py clerk_sync retry-pending"),
                               returncode=EXIT_UNAVAILABLE)

    def _retry_pending(self, **_: Any) -> None:
        from clerk_sync.auth.admin import AdminActions
        from clerk_sync.clerk_api import ClerkClient

        store = self._store()
        try:
            with ClerkClient.from_settings(clerk_settings()) as client:
                counts = AdminActions(store, client).retry_pending()
        finally:
            store.dispose()
        self.stdout.write(f"pending role changes: {counts}")
        if counts["pending"]:  # still waiting on Clerk: let the scheduler notice
            raise CommandError(f"{counts['pending']} role change(s) still wait for Clerk; run this again later",
                               returncode=EXIT_UNAVAILABLE)

    @staticmethod
    def _store() -> Store:
        """The store as the webhook view builds it: timeouts, ``HOOKS`` and ``MAPPING`` from the settings."""
        from clerk_sync.store import Store

        settings, options = clerk_settings(), django_options()
        return Store.from_settings(settings, hooks=options.hooks, mapping=options.mapping)
