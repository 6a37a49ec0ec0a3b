"""Drift repair: re-read Clerk (users, organizations, memberships) and make our tables match.

Each listing is paged (500 per request, ``+created_at`` so new objects append) within the shared rate
budget. Users are paged by cursor (``starting_after``: the last id of the page before), as Clerk
recommends, since a deep ``offset`` "gets progressively slower and eventually times out" there: the
next page is requested while this one is written. Organizations and memberships have no cursor in
Clerk's API and are paged by offset, a few pages in flight so the budget, not latency, sets the pace.
Every page is one transaction: the changed rows are upserted under the webhook path's guard (newer
``updated_at`` wins, tombstones are final), the listed ids are staged in ``reconcile_seen``, and the
run's cursor (the offset, and for users the last id) moves on — so a killed run resumes at the page it
had not committed (within ``resume_within_s``, 6 hours: past it, the run is abandoned and the next lists afresh).

Deletions: rows Clerk did not list are *candidates*; before tombstoning (which is final) each batch is
confirmed with Clerk by id (``GET /users?user_id=...``, memberships by their users through
``GET /organizations/{id}/memberships?user_id=...``), because an object deleted mid-run shifts later
offsets and could hide a live object from a listing (one we hold, hidden so, is repaired from that answer
instead). An offset page whose ``total_count`` fell since the page before is preceded by the objects that
many places before it, read again, so one we lack is not skipped (a deletion and a creation between the same
two pages cancel in the count: the next run finds what that hid).
``--since`` lists only users updated since then (``-updated_at``), so it repairs updates but cannot find
user deletions; organizations and memberships are always listed in full.

``dry_run`` writes nothing (ids are staged in a TEMPORARY table). Every run reports each change it makes
(a dry run: would make) to ``on_change`` once its page is committed, and logs it (``reconcile_change``: the
entity, id and changed field names, never a field's value: they are personal data), at INFO for a real
run and DEBUG for a dry run, which changes nothing.

A listing that does not advance (a page of ids already seen, offsets past its ``total_count``, more
than ``max_pages`` pages) fails the run with a :class:`~clerk_sync.errors.ClerkAPIError`: paging on
would never end, and a sweep after it would delete on the word of a broken listing.
"""

from __future__ import annotations

import contextvars
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, NoReturn, Protocol, TypeVar, cast

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import mysql, postgresql, sqlite

from clerk_sync._db_errors import POOLER_ADVICE, is_schema_behind
from clerk_sync._time import as_utc, aware, utcnow
from clerk_sync.changes import BOOKKEEPING
from clerk_sync.clerk_api import JSON, ClerkClient
from clerk_sync.engine import Action, Entity, Record, RowState, Tombstone, Upsert, decide
from clerk_sync.errors import (
    ClerkAPIError,
    ClerkNotFound,
    ConfigError,
    EventShapeError,
    ReconcileBusy,
    StoreError,
)
from clerk_sync.events import MembershipRecord, UserRecord, membership_record, organization_record, user_record
from clerk_sync.metrics import Metrics
from clerk_sync.store import TRANSACTION_POOLER_INFO, Store, Writer, dialect_family, erased_digest
from clerk_sync.tables import (
    MYSQL_TABLE,
    RECONCILE_ATTEMPT_STARTED,
    erased,
    organization_memberships,
    organizations,
    reconcile_runs,
    reconcile_seen,
    seen_columns,
    users,
    webhook_events,
)
from clerk_sync.tracing import span

__all__ = ["Change", "Counts", "Progress", "ReconcileReport", "Reconciler"]

log = structlog.get_logger("clerk_sync.reconcile")

PAGE = 500
MAX_PAGES = 20_000  # per listing: 10 million objects at 500 a page
_RECENT_PAGES = 8  # a page must bring an id none of these brought (bounded: a listing may hold millions)
_VERIFY_BATCH = 100  # Clerk accepts up to 100 values per id filter
_DRY_IDLE_S = 300  # a dry run's one transaction through a transaction pooler: its idle bound (_dry_staging)
_LISTINGS = (Entity.USER, Entity.ORGANIZATION, Entity.MEMBERSHIP)
_PHASES = ("users", "organizations", "organization_memberships", "sweep", "done")
_TABLES = {Entity.USER: users, Entity.ORGANIZATION: organizations, Entity.MEMBERSHIP: organization_memberships}
_BUILD: dict[Entity, Callable[[JSON], Record]] = {
    Entity.USER: user_record, Entity.ORGANIZATION: organization_record, Entity.MEMBERSHIP: membership_record,
}
_RESUMABLE = ("running", "interrupted", "failed")
RESUME_WITHIN_S = 6 * 3600.0  # an unfinished run silent longer is abandoned, not resumed (Reconciler)
_CLAIM_LOCK = "reconcile_runs:claim"  # Writer.lock: one invocation at a time reads and claims the runs


class _MassDeleteRefused(ConfigError):
    """The sweep's guard (see :class:`Reconciler`): a ConfigError to callers; its run is not resumed."""


@dataclass
class Counts:
    """What a run did to one table."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    failed: int = 0
    # Stored locks Clerk lists ended (it sends no webhook then, nor bumps updated_at): tidied, not drift. In
    # ``updated`` they read as repairs, i.e. missed deliveries: clerk_sync_reconcile_last_drift and doctor
    # --freshness paged ClerkSyncNoDeliveriesWhileDrift on a healthy install (review).
    lockouts_ended: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """One line of the diff: ``create``/``update``/``delete`` of a row (``fields`` that differ, for updates)."""

    entity: Entity
    action: str
    clerk_id: str
    fields: tuple[str, ...] = ()


@dataclass
class ReconcileReport:
    """The summary printed at the end and stored in ``reconcile_runs`` (not for dry runs)."""

    run_id: int | None
    dry_run: bool
    since: datetime | None
    resumed: bool
    counts: dict[str, Counts] = field(default_factory=lambda: {e.value: Counts() for e in _LISTINGS})
    swept: list[str] = field(default_factory=list)
    requests: int = 0  # (these three count the earlier processes of a resumed run too)
    rate_limited: int = 0
    duration_s: float = 0.0
    requests_before: int = 0  # of ``requests`` and ``duration_s``: the interrupted processes' share
    duration_before_s: float = 0.0

    def total(self, name: str) -> int:
        return sum(int(getattr(c, name)) for c in self.counts.values())


class Progress(Protocol):
    """Where a run reports progress (the CLI draws a Rich bar).

    ``start`` is called again for a phase whose listing outgrew the total it started with (users created
    during the run): the new total, and the count so far; an implementation updates that phase's bar."""

    def start(self, phase: str, total: int | None, completed: int) -> None: ...

    def advance(self, phase: str, n: int) -> None: ...


class _NoProgress:
    def start(self, phase: str, total: int | None, completed: int) -> None:
        pass

    def advance(self, phase: str, n: int) -> None:
        pass


Anchor = tuple[str, int | None]  # a users cursor: the last listed user's id and creation time (ms)
# What Clerk may answer a cursor naming a deleted user, rather than an empty page
_CURSOR_REFUSALS = frozenset({400, 404, 422})
# The instance_id of Clerk's example payloads (its docs, its OpenAPI, the Dashboard's "Send Example"): no instance's
_EXAMPLE_INSTANCES = ("ins_2g7np7Hrk0SN6kj5EDMLDaKNL0S", "ins_123")


@dataclass
class _Run:
    report: ReconcileReport
    phase: str
    cursor: int
    seen: sa.Table
    conn: sa.Connection | None = None  # dry runs: the one connection holding the TEMPORARY table
    whole: bool = False  # a dry run through a transaction pooler: conn's one transaction spans the run
    base_requests: int = 0
    base_duration: float = 0.0
    base_rate_limited: int = 0
    started: float = field(default_factory=time.monotonic)
    stats_start: int = 0
    limited_start: int = 0
    beat_at: datetime | None = None  # the last heartbeat written between checkpoints (_keep_alive)
    heartbeat: datetime | None = None  # the store's time of our last heartbeat: the run is still ours (_beat)
    after: Anchor | None = None  # the users listing's cursor: the last user of its last committed page
    instance_id: str | None = None  # the Clerk instance the key belongs to (recorded in the run's details)
    # A resumed run: when this attempt started (recorded in its details): the freshness checks measure missed
    # deliveries from it, not from the first attempt's start up to RESUME_WITHIN_S before (review)
    attempt_started_at: datetime | None = None
    # A dry run's deletions by entity: the memberships of a user or organization it would delete go with them
    # (the cascade), so its membership sweep leaves them out, as the real run finds them deleted already.
    dry_deleted: dict[Entity, set[str]] = field(default_factory=dict)

    @property
    def id(self) -> int:
        return self.report.run_id or 0


_T = TypeVar("_T")


def _in_context(pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> Future[_T]:
    """``pool.submit(fn, *args)`` in a copy of this thread's context: the prefetching thread's Clerk calls are
    children of the run's span, as the calls made here are (OpenTelemetry's context is a contextvar)."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


class Reconciler:
    """Pages through Clerk and repairs our tables; see the module docstring for the guarantees.

    ``prefetch`` pages are requested concurrently (the budget still spaces them); ``stale_after_s`` is
    how old a ``running`` run's heartbeat must be before another invocation may take it over;
    ``resume_within_s``, how recent an unfinished run's last progress must be for the next run to resume it
    (older, its listings are stale: resumed, the phases it had done would not be read again, so whatever
    Clerk created meanwhile there would be missed by a run reported completed; it is abandoned instead).
    ``max_pages`` bounds each listing, whatever the server says.

    A run that finds more than a quarter of the live rows of an entity missing from Clerk's listing (and
    at least :data:`MASS_DELETE_FLOOR` of them) stops before deleting any: that is what a key of another
    Clerk instance (development keys against the production database) looks like, and a tombstone is
    final, so no later event could bring those users back. ``allow_mass_delete=True`` (``clerk-sync
    reconcile --allow-mass-delete``) is for the day it is real; a dry run lists them either way.
    """

    def __init__(
        self,
        store: Store,
        clerk: ClerkClient,
        *,
        page_size: int = PAGE,
        prefetch: int = 4,
        stale_after_s: float = 60.0,
        resume_within_s: float = RESUME_WITHIN_S,
        progress: Progress | None = None,
        on_change: Callable[[Change], None] | None = None,
        now: Callable[[], datetime] = utcnow,
        with_hooks: bool = False,
        metrics: Metrics | None = None,
        max_pages: int = MAX_PAGES,
        allow_mass_delete: bool = False,
        instance_id: str | None = None,
    ) -> None:
        self.store = store if with_hooks else store.without_hooks()  # repairs fire hooks only if asked
        self.clerk = clerk
        self.page_size = page_size
        self.prefetch = max(1, prefetch)
        self.stale_after_s = stale_after_s
        self.resume_within_s = resume_within_s
        self.progress: Progress = progress or _NoProgress()
        self.on_change = on_change or (lambda change: None)
        self._now = now
        self.metrics = metrics  # clerk_sync_reconcile_runs_total{result}, clerk_sync_reconcile_drift_total
        self.max_pages = max_pages
        self.allow_mass_delete = allow_mass_delete
        self.instance_id = instance_id  # the instance this database mirrors (CLERK_INSTANCE_ID), if set

    def run(self, *, since: datetime | None = None, dry_run: bool = False) -> ReconcileReport:
        """One reconcile pass, resuming an unfinished run with the same ``since`` if there is one."""
        since = as_utc(since) if since is not None else None  # SQLite keeps a time's clock reading, not its offset
        # one trace per run: its pages and Clerk calls (the prefetching threads' too) are its children
        with span("reconcile.run", {"clerk_sync.dry_run": dry_run}):
            return self._run(since, dry_run)

    def _run(self, since: datetime | None, dry_run: bool) -> ReconcileReport:
        try:
            instance = self._check_instance()
        except Exception:  # (Clerk down, a key refused, another instance's key: a failed run all the same,
            if self.metrics is not None:  # counted, or a scheduled run failing there never moved the series)
                self.metrics.reconciled("failed", {})
            raise
        with self._begin(since, dry_run) as run:
            run.instance_id = instance
            try:
                self._phases(run)
            except BaseException as exc:
                self._fail(run, exc)
                self._observe("failed", run.report)
                raise
            self._finish(run)
            self._observe("dry_run" if dry_run else "completed", run.report)
            return run.report

    def _check_instance(self) -> str | None:
        """The Clerk instance the key belongs to, checked against the one this database mirrors before anything
        is written: ``instance_id`` (CLERK_INSTANCE_ID), else the newest stored delivery's ``instance_id``, else
        the one an earlier run recorded. A key of another instance (a development key against the production
        database) would otherwise import that instance's users, page by page, until the mass-delete guard stopped
        the run at its end, the imported rows kept. None when Clerk does not say (the endpoint refused: the check
        is skipped, the mass-delete guard still stands)."""
        try:
            found = self.clerk.get_instance().get("id")
        except ClerkAPIError as exc:
            if exc.status not in (403, 404):  # (down, rate limited past the retries, a key refused: the run
                raise  # would fail on its first page anyway; said now)
            # an API without the endpoint, a key without the permission: not a verdict on the instance
            log.warning("reconcile_instance_unchecked", status=exc.status, error=str(exc))
            return None
        if not isinstance(found, str) or not found:
            return None
        mismatch = instance_mismatch(self.store, found, self.instance_id)
        if mismatch is not None:
            problem, advice = mismatch
            raise ConfigError(f"{problem}: nothing was written. {advice}")
        return found

    def _observe(self, result: str, report: ReconcileReport) -> None:
        if self.metrics is not None:
            # A dry run's would-be repairs are not drift repaired: counted, every preview of the console's drift
            # page added the same rows again (its run still counts in reconcile_runs_total{result="dry_run"}).
            drift = {} if report.dry_run else {name: {"created": c.created, "updated": c.updated,
                                                      "deleted": c.deleted} for name, c in report.counts.items()}
            self.metrics.reconciled(result, drift)

    # -- run bookkeeping --------------------------------------------------------------------
    @contextmanager
    def _begin(self, since: datetime | None, dry_run: bool) -> Iterator[_Run]:
        if dry_run:
            with self._dry_staging() as (conn, seen, whole):
                yield self._start(_Run(ReconcileReport(None, True, since, False), "users", 0, seen, conn, whole))
            return
        with self.store.transaction() as writer:
            run = self._claim(writer, since)
        yield self._start(run)

    def _start(self, run: _Run) -> _Run:
        run.stats_start, run.limited_start = self.clerk.stats.requests, self.clerk.stats.rate_limited
        return run

    def _claim(self, writer: Writer, since: datetime | None) -> _Run:
        """Resume the latest unfinished run with the same ``since``, or start a new one.

        Under a lock: two invocations started together both read "no live run" and both ran (review)."""
        now = writer.now
        writer.lock([_CLAIM_LOCK])
        row = writer.conn.execute(
            sa.select(reconcile_runs).where(reconcile_runs.c.status.in_(_RESUMABLE))
            .order_by(reconcile_runs.c.id.desc()).limit(1)
        ).mappings().first()
        if row is not None:
            heartbeat = aware(row["heartbeat_at"])
            assert heartbeat is not None
            age = (now - heartbeat).total_seconds()
            if row["status"] == "running" and age < self.stale_after_s:
                raise ReconcileBusy(
                    f"reconcile run {row['id']} is running (last progress {age:.0f}s ago); if it was killed, "
                    f"run again in {max(1, round(self.stale_after_s - age))}s: a run silent for "
                    f"{self.stale_after_s:g}s is taken over and resumed where it stopped")
            if aware(row["since"]) == since and age < self.resume_within_s:
                writer.conn.execute(reconcile_runs.update().where(reconcile_runs.c.id == row["id"])
                                    .values(status="running", heartbeat_at=now, error=None))
                report = ReconcileReport(row["id"], False, since, True, _load_counts(row["details"]),
                                         requests_before=row["requests"], duration_before_s=row["duration_s"])
                return _Run(report, row["phase"], row["cursor"], reconcile_seen, after=_load_after(row["details"]),
                            base_requests=row["requests"], base_duration=row["duration_s"], heartbeat=now,
                            base_rate_limited=_load_rate_limited(row["details"]), attempt_started_at=now)
            writer.conn.execute(reconcile_runs.update().where(reconcile_runs.c.id == row["id"])
                                .values(status="abandoned", finished_at=now))
            writer.conn.execute(reconcile_seen.delete().where(reconcile_seen.c.run_id == row["id"]))
        inserted = writer.conn.execute(  # the new id without RETURNING, which MySQL lacks
            reconcile_runs.insert().values(status="running", since=since, phase=_PHASES[0], cursor=0,
                                           details={}, started_at=now, heartbeat_at=now))
        run_id = int(cast("sa.Row[Any]", inserted.inserted_primary_key)[0])
        return _Run(ReconcileReport(run_id, False, since, False), _PHASES[0], 0, reconcile_seen, heartbeat=now)

    def _checkpoint(self, writer: Writer, run: _Run, **values: Any) -> None:
        """Persist the cursor and counts in the caller's transaction (nothing for dry runs)."""
        self._tally(run)
        if run.report.dry_run:
            return
        report = run.report
        self._beat(writer, run, phase=run.phase, cursor=run.cursor, requests=report.requests,
                   duration_s=report.duration_s, details=_dump_counts(report, run.after, run.instance_id,
                                                                     run.attempt_started_at),
                   **{name: report.total(name) for name in ("created", "updated", "deleted", "unchanged")},
                   **values)

    def _beat(self, writer: Writer, run: _Run, **values: Any) -> None:
        """Write the heartbeat (and ``values``) if the run is still ours: a run silent for ``stale_after_s``
        is taken over by the next invocation, whose heartbeat is later than any of ours. The one that
        stalled then stops here, rather than writing into the run the other one now works on (review)."""
        owned = reconcile_runs.c.heartbeat_at <= run.heartbeat
        result = writer.conn.execute(reconcile_runs.update().where(reconcile_runs.c.id == run.id, owned)
                                     .values(heartbeat_at=writer.now, **values))
        if result.rowcount != 1:
            raise ReconcileBusy(f"reconcile run {run.id} was taken over by another invocation: this one wrote no "
                                f"progress for {self.stale_after_s:g}s (stale_after_s) and stops; the other goes "
                                "on from the last checkpoint")
        run.heartbeat = writer.now

    def _tally(self, run: _Run) -> None:
        report = run.report
        report.requests = run.base_requests + self.clerk.stats.requests - run.stats_start
        report.rate_limited = run.base_rate_limited + self.clerk.stats.rate_limited - run.limited_start
        report.duration_s = run.base_duration + time.monotonic() - run.started

    def _finish(self, run: _Run) -> None:
        run.phase, run.cursor, run.after = "done", 0, None
        if run.report.dry_run:
            self._tally(run)
            return
        with self.store.transaction() as writer:
            self._checkpoint(writer, run, status="completed", finished_at=writer.now)
            writer.conn.execute(reconcile_seen.delete().where(reconcile_seen.c.run_id == run.id))

    def _fail(self, run: _Run, exc: BaseException) -> None:
        if run.report.dry_run:
            return
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        # A refused sweep is not resumed: its listings may come from the wrong instance's key, and resuming
        # would read them again after the key is fixed. The next run lists Clerk afresh.
        abandoned = isinstance(exc, _MassDeleteRefused)
        try:
            with self.store.transaction() as writer:
                self._checkpoint(writer, run, status="abandoned" if abandoned else status,
                                 error=f"{type(exc).__name__}: {exc}"[:2000],
                                 **({"finished_at": writer.now} if abandoned else {}))
                if abandoned:
                    writer.conn.execute(reconcile_seen.delete().where(reconcile_seen.c.run_id == run.id))
        except Exception:  # noqa: S110 - the original error matters more; the run stays resumable
            pass

    @contextmanager
    def _dry_staging(self) -> Iterator[tuple[sa.Connection, sa.Table, bool]]:
        """A TEMPORARY copy of ``reconcile_seen`` on one connection: a dry run writes nothing durable.

        Through a pooler in transaction mode (``CLERK_SYNC_DB_TRANSACTION_POOLER``) a connection keeps its server
        connection for one transaction only, and the table lived on another one by the next page: there the whole
        dry run is one transaction, rolled back at its end (the table with it; it reads, and holds no row lock).
        Its idle bound is raised for it alone: the transaction waits on Clerk between pages (the role's 15 s
        would end it at a rate limit's pause), still bounded should the client hang."""
        seen = sa.Table("reconcile_seen_dry", sa.MetaData(), *seen_columns(), prefixes=["TEMPORARY"],
                        **MYSQL_TABLE)  # (MySQL: binary collation, else user_2aBc and user_2abc are one id)
        with self.store.engine.connect() as conn:
            try:
                if conn.connection.info.get(TRANSACTION_POOLER_INFO):
                    with conn.begin() as whole:
                        conn.exec_driver_sql(f"SET LOCAL idle_in_transaction_session_timeout = '{_DRY_IDLE_S}s'")
                        seen.create(conn)
                        yield conn, seen, True
                        whole.rollback()
                    return
                with conn.begin():
                    seen.create(conn)
                try:
                    yield conn, seen, False
                except BaseException:
                    with suppress(sa.exc.SQLAlchemyError), conn.begin():  # (the run's error is the one to tell)
                        seen.drop(conn)
                    raise
                with conn.begin():
                    seen.drop(conn)
            except sa.exc.DBAPIError as exc:
                if is_schema_behind(exc.orig) and seen.name in str(exc.orig):  # (not a migration to run)
                    why = (f"its transactions ran on other server connections. {POOLER_ADVICE}"
                           if conn.dialect.name == "postgresql"
                           else "its connection was replaced mid-run: run it again")
                    raise StoreError(
                        f"database error: the dry run's TEMPORARY table {seen.name} is gone from its connection: "
                        f"{why}") from exc
                raise

    @contextmanager
    def _unit(self, run: _Run) -> Iterator[tuple[sa.Connection, Writer | None]]:
        """One page's transaction: the store's writer, or the dry run's own connection (no writer)."""
        if run.conn is None:
            with self.store.transaction() as writer:
                yield writer.conn, writer
        elif run.whole:  # (the run's one transaction: see _dry_staging)
            yield run.conn, None
        else:
            with run.conn.begin():
                yield run.conn, None

    # -- phases -----------------------------------------------------------------------------
    def _phases(self, run: _Run) -> None:
        for phase in _PHASES[_PHASES.index(run.phase):]:
            if phase != run.phase:
                run.phase, run.cursor, run.after = phase, 0, None
            if phase == "sweep":
                self._sweep_all(run)
            elif phase != "done":
                self._listing(run, Entity(phase))

    def _listing(self, run: _Run, entity: Entity) -> None:
        since_ms = int(run.report.since.timestamp() * 1000) if run.report.since else None
        by_update = entity is Entity.USER and since_ms is not None
        by_cursor = entity is Entity.USER and not by_update
        total = self.clerk.count_users() if by_cursor else None
        self.progress.start(entity.value, total, run.cursor)
        advance = _Advance(f"/{entity.value}", self.page_size, self.max_pages, moving=by_update)
        if by_cursor:  # (a run saved before cursors has none: from the first page)
            pages = self._user_pages(run.after, run.cursor if run.after is not None else 0, advance)
        else:
            # A resumed offset listing starts a page before its cursor: objects deleted in Clerk while the run
            # was down, before the cursor, moved the next ones below it, out of every page (one we lack was
            # never created, the run "completed"); the page before holds them (read again: guarded upserts)
            # as long as fewer than a page went (review).
            start = max(0, run.cursor - self.page_size) if run.report.resumed else run.cursor
            pages = ((offset, items, None) for offset, items in
                     self._pages(self._fetcher(entity), start, None, advance, sequential=by_update,
                                 overlap=_overlap(self.page_size) if by_update else 0))
        done = run.cursor
        for offset, items, after in pages:
            older = [by_update and _older(d, since_ms) for d in items]
            fresh = [d for d, old in zip(items, older, strict=True) if not old]
            counts = run.report.counts[entity.value]
            before = counts.unchanged
            self._apply_page(run, entity, fresh, offset + len(items), after)
            if offset < done:  # the page before a resumed cursor, read again: its rows were counted then
                counts.unchanged = before
                continue
            done += len(items)
            if total is not None and done > total:  # users created since the count (or listed twice after a
                total = done  # deleted cursor): the bar's total grows with them, never "2951/2949"
                self.progress.start(entity.value, total, done - len(items))
            self.progress.advance(entity.value, len(items))
            if any(older):
                break  # ordered by -updated_at: the rest is older than --since

    def _fetcher(self, entity: Entity) -> Callable[[int], tuple[list[JSON], int | None]]:
        """Offset pages: organizations, memberships, and users by ``-updated_at`` (``--since``; no cursor
        there: Clerk takes ``starting_after`` with the ``created_at`` orderings only)."""
        size = self.page_size
        if entity is Entity.USER:
            return lambda offset: (self.clerk.list_users(limit=size, offset=offset, order_by="-updated_at"), None)
        if entity is Entity.ORGANIZATION:
            def orgs(offset: int) -> tuple[list[JSON], int | None]:
                page = self.clerk.list_organizations(limit=size, offset=offset, order_by="+created_at")
                return page.data, page.total_count
            return orgs

        def members(offset: int) -> tuple[list[JSON], int | None]:
            page = self.clerk.list_all_organization_memberships(limit=size, offset=offset, order_by="+created_at")
            return page.data, page.total_count
        return members

    def _user_pages(self, anchor: Anchor | None, position: int,
                    advance: _Advance) -> Iterator[tuple[int, list[JSON], Anchor | None]]:
        """Users by cursor, after ``anchor`` (None: from the first): (position, page, its last user), the
        next page requested while the caller writes this one; ends at a short page.

        A cursor names a user, who may be deleted in Clerk between two pages (or before a resume): Clerk
        then answers an empty page or refuses the cursor, which would end the listing early and leave every
        later user unread. So an empty or refused page after an anchor is believed only once Clerk confirms
        the anchor is still listed (one request, at the end of a listing that ends on a full page); if it
        is gone, the listing goes on after the last user of the page before that Clerk still lists (a few
        users listed twice: harmless), else from the anchor's creation time, else from the first page."""
        size = self.page_size
        since: int | None = None  # created_at_after (ms), once no user near a deleted anchor was left
        before: list[Anchor] = []  # the users of the page that ended at ``anchor``, in order

        def fetch(after: str | None) -> list[JSON]:
            return self.clerk.list_users(limit=size, order_by="+created_at", starting_after=after,
                                         created_at_after=since)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconcile") as pool:
            future = _in_context(pool, fetch, anchor[0] if anchor else None)
            try:
                while True:
                    refused: ClerkAPIError | None = None
                    try:
                        items = future.result()
                    except ClerkAPIError as exc:
                        if anchor is None or exc.status not in _CURSOR_REFUSALS:
                            raise
                        items, refused = [], exc
                    if anchor is not None and not items:  # (a page with users after the anchor found it)
                        alive = self._listed([anchor[0], *(a[0] for a in before[-(_VERIFY_BATCH - 1):])])
                        if anchor[0] not in alive:  # deleted since its page: go on from a user still listed
                            lost, anchor = anchor, next((a for a in reversed(before) if a[0] in alive), None)
                            if anchor is None:
                                since = _lost_at(before or [lost])
                                advance.recent.clear()  # (users sharing a creation time are listed again)
                            before = []
                            future = _in_context(pool, fetch, anchor[0] if anchor else None)
                            continue
                    if refused is not None:
                        raise refused
                    page = _users_of(items)
                    last = page[-1] if page else anchor
                    if len(items) < size:
                        yield position, items, last
                        return
                    advance.check(position, items, None)
                    if last is None:
                        advance.stop("a full page with no user id to page on from")
                    future = _in_context(pool, fetch, last[0])
                    yield position, items, last
                    position, anchor, before = position + len(items), last, page
            finally:
                future.cancel()

    def _listed(self, user_ids: list[str]) -> set[str]:
        """Which of ``user_ids`` (at most 100) Clerk still lists."""
        found = self.clerk.list_users(limit=len(user_ids), order_by=None, user_ids=user_ids)
        return {str(u.get("id")) for u in found if isinstance(u, dict)}

    def _pages(self, fetch: Callable[[int], tuple[list[JSON], int | None]], start: int, total: int | None,
               advance: _Advance, *, sequential: bool, overlap: int = 0) -> Iterator[tuple[int, list[JSON]]]:
        """Pages in offset order with up to ``prefetch`` requests in flight; ends at a short page, and
        raises when the listing does not advance (:class:`_Advance`).

        Offsets below the known total are fetched ahead; past it, one page at a time (objects created
        during the run still get listed). ``overlap`` (a sequential listing with no ``total_count`` to tell a
        deletion by: users by ``-updated_at``): each page starts that many objects before the page before
        ended, so that as many deleted in Clerk between two pages (the next ones moving up, the first of
        the next page out of every page: review) are still read; the objects the page before had are
        passed over (yielded from the offset after them).
        """
        size = self.page_size
        horizon = total
        pending: deque[tuple[int, Future[tuple[list[JSON], int | None]]]] = deque()
        next_offset = start
        last_total: int | None = None  # the total_count the page before reported
        seen: set[Any] = set()  # (overlap: the ids of the page before)
        with ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="reconcile") as pool:
            try:
                while True:
                    window = 1 if sequential or horizon is None else self.prefetch
                    while len(pending) < window and (not pending if horizon is None else next_offset < horizon):
                        pending.append((next_offset, _in_context(pool, fetch, next_offset)))
                        next_offset += size - overlap
                    if not pending:
                        return
                    offset, future = pending.popleft()
                    items, reported = future.result()
                    if reported is not None:
                        if last_total is not None and reported < last_total:
                            yield from self._shifted(fetch, offset, last_total - reported)
                        last_total = reported
                    full = len(items) >= size
                    if full:
                        advance.check(offset, items, reported)
                        horizon = max(reported or 0, horizon or 0, offset + size + 1)
                    if overlap:
                        before, seen = seen, {_id_of(d) for d in items}
                        items = [d for i, d in enumerate(items) if i >= overlap or _id_of(d) not in before]
                        if before:
                            # What is new here follows the page before, however many a deletion moved up: from
                            # offset + the objects it had, the page read as one "read again" (its offset below
                            # the run's count), dropping its counts and passing over the --since stop (review)
                            offset += overlap
                    yield offset, items
                    if not full:
                        return
            finally:
                for _, future in pending:
                    future.cancel()

    def _shifted(self, fetch: Callable[[int], tuple[list[JSON], int | None]], offset: int,
                 gone: int) -> Iterator[tuple[int, list[JSON]]]:
        """The ``gone`` objects before ``offset`` again: the listing's total fell by ``gone`` since the page
        before, so objects deleted in Clerk meanwhile may have moved the next ones below this offset, out of
        every page (a live object we lack would never be created: the sweep confirms only rows we hold). If
        the deletions were after it instead, these are objects listed twice (harmless: guarded upserts)."""
        for at in range(max(0, offset - gone), offset, self.page_size):
            items, _ = fetch(at)
            yield at, items[:offset - at]
    def _apply_page(self, run: _Run, entity: Entity, items: list[JSON], next_cursor: int,
                    after: Anchor | None = None) -> None:
        with span("reconcile.page", {"clerk_sync.entity": entity.value, "clerk_sync.items": len(items),
                                     "clerk_sync.cursor": next_cursor}):
            self._apply_items(run, entity, items, next_cursor, after)

    def _apply_items(self, run: _Run, entity: Entity, items: list[JSON], next_cursor: int,
                     after: Anchor | None = None) -> None:
        records, failed = _records(entity, items)
        counts = run.report.counts[entity.value]
        counts.failed += failed
        with self._unit(run) as (conn, writer):
            current = _current(conn, entity, records)
            now_ms = int(as_utc(writer.now if writer is not None else self._now()).timestamp() * 1000)
            ended = _ended_lockouts(conn, records, now_ms) if entity is Entity.USER else []
            changed: list[Record] = []
            changes: list[Change] = []  # reported once the page is committed
            for record in records:
                action = decide(current.get(record.clerk_id), Upsert(entity, record))
                if action is Action.INSERT:
                    counts.created += 1
                elif action is Action.UPDATE:
                    counts.updated += 1
                else:
                    counts.unchanged += record.clerk_id not in ended  # (an ended lockout: counted below)
                    continue
                changed.append(record)
            _stage(conn, run.seen, run.id, entity, [r.clerk_id for r in records])
            if writer is None:
                changes += _diff(conn, entity, changed, current)
                counts.lockouts_ended += len(ended)
                changes += [_unlocked(clerk_id) for clerk_id in ended]
            else:
                by_id = {r.clerk_id: r for r in records if isinstance(r, UserRecord)}
                # Every lock the page's writes take, in one sorted pass before any (the ended lockouts' and the
                # changed rows' together: taken one write after another, out of the one order every writer
                # keeps, they would deadlock against a webhook batch holding some of them).
                changed.sort(key=lambda record: record.clerk_id)  # (rows written in the order their locks were taken)
                writer.lock_page(entity, [*(by_id[c] for c in ended), *changed])
                changes += _diff(conn, entity, changed, current)  # (the rows as they are before the writes)
                unlocked = [clerk_id for clerk_id in sorted(ended) if writer.end_lockout(by_id[clerk_id])]
                counts.lockouts_ended += len(unlocked)
                counts.unchanged += len(ended) - len(unlocked)  # (a webhook won the race)
                changes += [_unlocked(clerk_id) for clerk_id in unlocked]
                _upsert_many(writer, entity, changed)
                run.cursor, run.after = next_cursor, after
                self._checkpoint(writer, run)
        self._report(run, changes)

    def _report(self, run: _Run, changes: list[Change]) -> None:
        """Each change of a committed page (a dry run's: of a page read) to ``on_change``, and to the log: the
        entity, id and field names only, never a value (a name, an e-mail address: personal data). A real run's
        at INFO, the record of which rows it repaired (``reconcile_runs`` keeps counts); a dry run's at DEBUG,
        as it changed nothing (its caller shows the diff)."""
        emit = log.debug if run.report.dry_run else log.info
        for change in changes:
            emit("reconcile_change", run_id=run.report.run_id, dry_run=run.report.dry_run,
                 entity=change.entity.value, action=change.action, clerk_id=change.clerk_id,
                 **({"fields": ",".join(change.fields)} if change.fields else {}))
            self.on_change(change)

    # -- deletions --------------------------------------------------------------------------
    def _sweep_all(self, run: _Run) -> None:
        self._analyze_seen(run)
        # (users not after a --since run: a partial listing says nothing about deletions)
        swept = [e for e in _LISTINGS if not (e is Entity.USER and run.report.since is not None)]
        if not run.report.dry_run and not self.allow_mass_delete:
            # Users and organizations judged before either is swept: the organizations' refusal came after the
            # users' sweep had tombstoned some (final), and said "Nothing was deleted" (review). Memberships are
            # judged at their sweep, after the cascades of the deletions before it.
            for entity in swept:
                if entity is not Entity.MEMBERSHIP:
                    self._refuse_mass_delete(run, entity)
        for entity in swept:
            self.progress.start(f"{entity.value} deletions", None, 0)
            self._sweep(run, entity)
            run.report.swept.append(entity.value)

    def _analyze_seen(self, run: _Run) -> None:
        """PostgreSQL's statistics of the staged ids, fresh before the sweep joins them against the live rows.

        The run's ids are new rows (a new ``run_id``; a dry run's TEMPORARY table, which autovacuum never
        analyses): estimated at a row or so, the anti-join became a nested loop over every staged id for every
        live row, 20,000 x 20,000 comparisons past the statement timeout, failing again on every resumed run
        (a walkthrough with large organizations). A role that does not own the table gets PostgreSQL's warning,
        not an error: the sweep then runs on the statistics autovacuum left."""
        with self._unit(run) as (conn, _):
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"ANALYZE {conn.dialect.identifier_preparer.format_table(run.seen)}")

    def _sweep(self, run: _Run, entity: Entity) -> None:
        table = _TABLES[entity]
        listed = _listed(run, entity)
        extra = [table.c.organization_clerk_id, table.c.user_clerk_id] if entity is Entity.MEMBERSHIP else []
        if entity is Entity.MEMBERSHIP and not run.report.dry_run and not self.allow_mass_delete:
            self._refuse_mass_delete(run, entity)
        after = ""
        while True:
            query = (sa.select(table.c.clerk_id, *extra)
                     .where(table.c.deleted_at.is_(None), table.c.clerk_id > after, ~listed)
                     .order_by(table.c.clerk_id).limit(_VERIFY_BATCH))
            with self._unit(run) as (conn, _):
                candidates = [tuple(row) for row in conn.execute(query)]
            if not candidates:
                return
            after = candidates[-1][0]
            if entity is Entity.MEMBERSHIP and run.dry_deleted:
                orgs, people = (run.dry_deleted.get(Entity.ORGANIZATION, set()),
                                run.dry_deleted.get(Entity.USER, set()))
                candidates = [c for c in candidates if c[1] not in orgs and c[2] not in people]
                if not candidates:
                    continue
            gone, live = self._confirm_gone(run, entity, candidates)
            if live:  # live but not listed: a deletion mid-run shifted the offsets past them (review)
                self._apply_items(run, entity, live, run.cursor, run.after)
            self._tombstone(run, entity, gone)
            self.progress.advance(f"{entity.value} deletions", len(candidates))

    def _refuse_mass_delete(self, run: _Run, entity: Entity) -> None:
        """Stop before the sweep when Clerk did not list a large share of the live rows (see the class)."""
        table, listed = _TABLES[entity], _listed(run, entity)
        live = sa.select(sa.func.count()).select_from(table).where(table.c.deleted_at.is_(None))
        with self._unit(run) as (conn, _):
            total = conn.execute(live).scalar_one()
            missing = conn.execute(live.where(~listed)).scalar_one()
        if missing >= MASS_DELETE_FLOOR and missing > MASS_DELETE_SHARE * total:
            made = run.report.total("deleted")
            kept = ("Nothing was deleted (the repairs so far are kept)." if not made else
                    f"Nothing more was deleted: the {made} deletion(s) this run made before (each confirmed with "
                    "Clerk by id) and its repairs are kept.")
            raise _MassDeleteRefused(
                f"reconcile would delete {missing} of {total} {entity.value} ({missing / total:.0%}) that Clerk did "
                f"not list: is CLERK_SECRET_KEY the key of the Clerk instance this database mirrors? {kept} "
                "`reconcile --dry-run` lists them (`clerk-sync`, "
                "`manage.py clerk_sync` or `flask clerk-sync`); `--allow-mass-delete` deletes them if they really "
                "are gone")

    def _confirm_gone(self, run: _Run, entity: Entity,
                      candidates: Sequence[tuple[Any, ...]]) -> tuple[list[str], list[JSON]]:
        """The candidate ids Clerk confirms are gone (tombstones are final: never guess), and Clerk's
        objects for the candidates it still has (their drift is repaired from them)."""
        ids = [c[0] for c in candidates]
        if entity is Entity.USER:
            found = self.clerk.list_users(limit=_VERIFY_BATCH, order_by=None, user_ids=ids)
            _only_asked("/users?user_id=...", {_id_of(u) for u in found}, ids)
        elif entity is Entity.ORGANIZATION:
            found = self.clerk.list_organizations(limit=_VERIFY_BATCH, order_by=None, org_ids=ids).data
            _only_asked("/organizations?organization_id=...", {_id_of(o) for o in found}, ids)
        else:
            by_org: dict[str, set[str]] = {}
            for _, org_id, user_id in candidates:
                by_org.setdefault(org_id, set()).add(user_id)
            found = []
            for org_id, user_ids in sorted(by_org.items()):
                self._keep_alive(run)  # a call per organization: a batch can outlast stale_after_s
                found += self._memberships(org_id, sorted(user_ids))
        present, asked = {_id_of(o) for o in found}, set(ids)
        return [i for i in ids if i not in present], [o for o in found if _id_of(o) in asked]

    def _keep_alive(self, run: _Run) -> None:
        """The run's heartbeat, written between two Clerk calls of one long step (a batch's membership checks
        call Clerk once per organization: minutes at a development instance's rate limit) at most every
        quarter of ``stale_after_s``: the checkpoints alone left it stale, and another invocation took the
        run over while this one still worked."""
        if run.report.dry_run:
            return
        now = self._now()
        if run.beat_at is not None and (now - run.beat_at).total_seconds() < self.stale_after_s / 4:
            return
        with self.store.transaction() as writer:
            self._beat(writer, run)
        run.beat_at = now

    def _memberships(self, org_id: str, user_ids: list[str]) -> list[JSON]:
        """The organization's memberships of these users, asked for by user: paging its whole listing
        instead let a removal between two pages hide a live membership, tombstoned for good."""
        path = f"/organizations/{org_id}/memberships?user_id=..."
        found: list[JSON] = []
        for start in range(0, len(user_ids), _VERIFY_BATCH):
            asked = user_ids[start:start + _VERIFY_BATCH]  # a user has one membership per organization
            try:
                page = self.clerk.list_organization_memberships(org_id, limit=_VERIFY_BATCH, user_ids=asked)
            except ClerkNotFound:
                return []  # the organization itself is gone
            _only_asked(path, {_member_of(m) for m in page.data}, [org_id])
            _only_asked(path, {_member_user(m) for m in page.data}, asked)
            found += page.data
        return found

    def _tombstone(self, run: _Run, entity: Entity, gone: list[str]) -> None:
        counts = run.report.counts[entity.value]
        version = int(as_utc(self._now()).timestamp() * 1000)  # the injected clock (naive: UTC), as for heartbeats
        deleted: list[Change] = []
        with self._unit(run) as (_, writer):
            if writer is not None:  # their locks in one sorted pass (apply by apply: out of the one order)
                writer.lock_batch([Tombstone(entity, clerk_id, version) for clerk_id in gone])
            for clerk_id in gone:
                if writer is None:
                    run.dry_deleted.setdefault(entity, set()).add(clerk_id)
                elif not writer.apply(Tombstone(entity, clerk_id, version)):
                    continue
                deleted.append(Change(entity, "delete", clerk_id))
            counts.deleted += len(deleted)
            if writer is not None:
                self._checkpoint(writer, run)
        self._report(run, deleted)


def _diff(conn: sa.Connection, entity: Entity, changed: list[Record], current: dict[str, RowState]) -> list[Change]:
    """The changes ``changed`` make to the stored rows: a create, or an update with the names of the fields
    that differ (names only: the values are personal data)."""
    updated = [r.clerk_id for r in changed if r.clerk_id in current]
    table = _TABLES[entity]
    rows = {}
    if updated:
        rows = {row["clerk_id"]: row for row in conn.execute(sa.select(table).where(table.c.clerk_id.in_(updated)))
                .mappings()}
    changes = []
    for record in changed:
        row = rows.get(record.clerk_id)
        if row is None:
            changes.append(Change(entity, "create", record.clerk_id))
            continue
        diff = tuple(k for k, v in asdict(record).items()
                     if k not in BOOKKEEPING and k in row and row[k] != v)  # external_id: no column
        changes.append(Change(entity, "update", record.clerk_id, diff))
    return changes


def _unlocked(clerk_id: str) -> Change:
    """A lockout that ended by itself, repaired (see :func:`_ended_lockouts`)."""
    return Change(Entity.USER, "update", clerk_id, ("locked", "locked_until"))


def _only_asked(path: str, answered: set[Any], asked: Sequence[str]) -> None:
    """Deletion is confirmed by asking Clerk for the candidates: an answer with objects that were not asked
    for (a stand-in or proxy that ignores the filter) would make every candidate look gone. Refused, as a
    listing that does not advance is: nothing is deleted on its word."""
    extra = answered.difference(asked)
    if extra:
        raise ClerkAPIError(f"GET {path}: answered {len(extra)} object(s) it was not asked for (e.g. "
                            f"{sorted(map(str, extra))[0]}): its filter is not applied; stopped, nothing is "
                            "deleted on its word (is CLERK_API_URL Clerk's API?)", method="GET", path=path)


def _id_of(item: Any) -> Any:
    """An object's id; None for an item that is not an object (an answer naming none of the ids asked)."""
    return item.get("id") if isinstance(item, dict) else None


def _member_of(membership: Any) -> Any:
    return _id_of(membership.get("organization")) if isinstance(membership, dict) else None


def _member_user(membership: Any) -> Any:
    user = membership.get("public_user_data") if isinstance(membership, dict) else None
    return user.get("user_id") if isinstance(user, dict) else None


MASS_DELETE_SHARE = 0.25  # of an entity's live rows (see Reconciler)
MASS_DELETE_FLOOR = 100  # below this many, a run deletes what Clerk confirms whatever the share


def _overlap(page_size: int) -> int:
    """How many objects a sequential offset listing's pages overlap by (:meth:`Reconciler._pages`): a tenth
    of a page (50 of the default 500: requests grow by a ninth); none for pages under 10."""
    return page_size // 10


class _Advance:
    """Refuses a listing that does not advance, before it pages forever: a full page bringing no id the
    last pages did not, an offset a page past the reported ``total_count``, or ``max_pages`` pages.

    Such a listing (a proxy or stand-in that ignores ``offset``) is broken: the run fails before its
    sweep, so nothing is deleted on its word, and stays resumable. ``moving``: a listing by ``-updated_at``,
    where users updated meanwhile move to its front and push rows already read to the next offsets: such pages
    are read past (the listing goes on), up to as many in a row as it remembers (more are not rows moving).
    """

    def __init__(self, path: str, size: int, max_pages: int, *, moving: bool = False) -> None:
        self.path, self.size, self.max_pages = path, size, max_pages
        self.pages = 0
        self.recent: deque[set[Any]] = deque(maxlen=_RECENT_PAGES)
        self.moving, self.repeats = moving, 0  # full pages in a row that brought no new id

    def check(self, offset: int, items: list[JSON], total: int | None) -> None:
        """Called for each full page (one that says there is more)."""
        self.pages += 1
        ids = {d.get("id") if isinstance(d, dict) else None for d in items}
        self.repeats = 0 if ids.difference(*self.recent) else self.repeats + 1
        if self.repeats and self.moving and self.repeats <= _RECENT_PAGES:
            log.info("reconcile_rows_moved", path=self.path, offset=offset)  # updated meanwhile: read on
        elif self.repeats:
            self.stop(f"the page at offset {offset} brings no id the pages before it did not"
                      + (f" (nor did the {_RECENT_PAGES} pages before it)" if self.moving else ""))
        if total is not None and offset >= total + self.size:
            self.stop(f"offset {offset} is a page past the total_count of {total} it reports")
        if self.pages >= self.max_pages:
            self.stop(f"{self.pages} full pages, the most one listing may take (Reconciler(max_pages=))")
        self.recent.append(ids)

    def stop(self, why: str) -> NoReturn:
        raise ClerkAPIError(f"GET {self.path}: the listing does not advance: {why}; stopped, nothing is "
                            f"deleted on its word (is CLERK_API_URL Clerk's API?)", method="GET", path=self.path)


def _ended_lockouts(conn: sa.Connection, records: list[Record], now_ms: int) -> list[str]:
    """Users stored locked whom Clerk lists unlocked at the same version, whose stored end is unknown, not its
    own (older than the version) or past: a lockout that ended by itself (Clerk bumps no ``updated_at`` then,
    so the guarded upsert skips them). Rows written before ``locked_until`` existed, or by a release without
    it, are repaired so (:meth:`~clerk_sync.store.Writer.end_lockout`); a believed end still ahead is left to
    end by itself."""
    unlocked = {r.clerk_id: r.clerk_updated_at for r in records if isinstance(r, UserRecord) and not r.locked}
    if not unlocked:
        return []
    query = sa.select(users.c.clerk_id, users.c.clerk_updated_at).where(
        users.c.clerk_id.in_(list(unlocked)), Writer.ended_lockouts(now_ms))
    return [clerk_id for clerk_id, version in conn.execute(query) if unlocked[clerk_id] == version]


def _records(entity: Entity, items: list[JSON]) -> tuple[list[Record], int]:
    """Build records, one per id (the newest if a shifted page listed one twice); count malformed ones.
    (A user's lock end is stamped by the writer's clock, when the page is written: see events.user_record.)"""
    build = _BUILD[entity]
    by_id: dict[str, Record] = {}
    failed = 0
    for data in items:
        try:
            if not isinstance(data, dict):  # (null, a string: a listing's item Clerk never sends)
                raise EventShapeError(f"a listed item is {type(data).__name__}, not an object")
            record = build(data)
        except EventShapeError:
            failed += 1
            continue
        known = by_id.get(record.clerk_id)
        if known is None or known.clerk_updated_at < record.clerk_updated_at:
            by_id[record.clerk_id] = record
    return list(by_id.values()), failed


def _older(data: Any, since_ms: int | None) -> bool:
    """Updated before ``since_ms``. An item without a readable ``updated_at`` is not: it is kept (and counted
    failed by :func:`_records`), and ends no listing early."""
    value = data.get("updated_at") if isinstance(data, dict) else None
    return (since_ms is not None and isinstance(value, int | float) and not isinstance(value, bool)
            and value < since_ms)


def _current(conn: sa.Connection, entity: Entity, records: list[Record]) -> dict[str, RowState]:
    if not records:
        return {}
    table = _TABLES[entity]
    query = sa.select(table.c.clerk_id, table.c.clerk_updated_at, table.c.deleted_at).where(
        table.c.clerk_id.in_([r.clerk_id for r in records]))
    found = {r.clerk_id: RowState(r.clerk_updated_at, r.deleted_at is not None) for r in conn.execute(query)}
    # A hard-deleted tombstone (retention, erasure) is a digest in clerk_sync_erased: still deleted for good, and
    # so is a membership of an erased user or organization. Without it, every run counted such an entity Clerk
    # still lists as "created" (the guarded insert refuses it) and reported a repair that never happened.
    digests: dict[str, list[str]] = {}
    for record in records:
        if record.clerk_id not in found:
            for digest in _erased_digests(entity, record):
                digests.setdefault(digest, []).append(record.clerk_id)
    if digests:
        gone = conn.execute(sa.select(erased.c.digest).where(erased.c.digest.in_(list(digests)))).scalars()
        found.update({clerk_id: RowState(0, True) for d in gone for clerk_id in digests[d]})
    return found


def _erased_digests(entity: Entity, record: Record) -> list[str]:
    """The digests that, in clerk_sync_erased, mean the record is gone for good (the guarded insert's own)."""
    if isinstance(record, MembershipRecord):
        return [erased_digest(entity, record.clerk_id), erased_digest(Entity.USER, record.user_clerk_id),
                erased_digest(Entity.ORGANIZATION, record.organization_clerk_id)]
    return [erased_digest(entity, record.clerk_id)]


def _stage(conn: sa.Connection, seen: sa.Table, run_id: int, entity: Entity, ids: list[str]) -> None:
    if ids:
        if dialect_family(conn.dialect) == "mysql":
            mine = mysql.insert(seen)
            stmt: Any = mine.on_duplicate_key_update(clerk_id=mine.inserted.clerk_id)
        else:
            stmt = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(seen)
            stmt = stmt.on_conflict_do_nothing()
        conn.execute(stmt, [{"run_id": run_id, "entity": entity.value, "clerk_id": i} for i in ids])


def _upsert_many(writer: Writer, entity: Entity, records: list[Record]) -> None:
    """A page through the webhook path's guarded upsert; memberships one by one through
    :meth:`Writer.apply`, for its deleted-parent cascade. The caller took the page's locks first
    (:meth:`Writer.lock_page`: in one sorted pass, where apply by apply would take them out of the one order)."""
    if entity is Entity.MEMBERSHIP or writer.outbox is not None:  # hooks need each row's before-state
        for record in records:
            writer.apply(Upsert(entity, record))
    else:
        writer.upsert_many(entity, records)


def _listed(run: _Run, entity: Entity) -> sa.Exists:
    """The rows of ``entity``'s table this run listed (staged in ``run.seen``): the sweep's candidates are the
    others."""
    table, seen = _TABLES[entity], run.seen
    return sa.exists().where(seen.c.run_id == run.id, seen.c.entity == entity.value,
                             seen.c.clerk_id == table.c.clerk_id)


def _dump_counts(report: ReconcileReport, after: Anchor | None = None, instance_id: str | None = None,
                 attempt_started_at: datetime | None = None) -> dict[str, Any]:
    cursor = {"after": after[0], "after_created_at": after[1]} if after is not None else {}
    instance = {"instance_id": instance_id} if instance_id else {}
    attempt = ({RECONCILE_ATTEMPT_STARTED: aware(attempt_started_at).isoformat()}
               if attempt_started_at is not None else {})
    return {"counts": {k: asdict(v) for k, v in report.counts.items()}, "swept": report.swept,
            "rate_limited": report.rate_limited, **cursor, **instance, **attempt}


def _load_after(details: Any) -> Anchor | None:
    details = details if isinstance(details, dict) else {}
    after, created = details.get("after"), details.get("after_created_at")
    if not isinstance(after, str):
        return None
    return after, created if isinstance(created, int) and not isinstance(created, bool) else None


def _users_of(items: list[JSON]) -> list[Anchor]:
    """A page's users as cursors (id, creation time), in order; a malformed item is passed over."""
    users: list[Anchor] = []
    for data in items:
        item_id = data.get("id") if isinstance(data, dict) else None
        if isinstance(item_id, str) and item_id:
            created = data.get("created_at")
            users.append((item_id, created if isinstance(created, int) and not isinstance(created, bool) else None))
    return users


def _lost_at(before: list[Anchor]) -> int | None:
    """Where to list from when no user of the last page is left: just before the earliest one's creation."""
    times = [created for _, created in before if created is not None]
    return min(times) - 1 if times else None


def _load_rate_limited(details: Any) -> int:
    found = details.get("rate_limited") if isinstance(details, dict) else None
    return found if isinstance(found, int) and not isinstance(found, bool) else 0


def _load_counts(details: Any) -> dict[str, Counts]:
    stored = details.get("counts", {}) if isinstance(details, dict) else {}
    return {e.value: Counts(**stored.get(e.value, {})) for e in _LISTINGS}


def instance_mismatch(store: Store, found: str, configured: str | None) -> tuple[str, str] | None:
    """What is wrong, and what to do, when the secret key's instance ``found`` is not the one this database
    mirrors (``configured``: CLERK_INSTANCE_ID, else :func:`mirrored_instance`); None when it is, or nothing
    says which one it mirrors. ``reconcile`` refuses to run on it; ``doctor`` fails on it."""
    expected, source = (configured, "CLERK_INSTANCE_ID") if configured is not None else mirrored_instance(store)
    if expected is None or expected == found:
        return None
    return (f"CLERK_SECRET_KEY is a key of the Clerk instance {found}, but this database mirrors {expected} "
            f"({source})", f"Use the secret key of {expected} (Clerk Dashboard -> API keys); if this database is "
            f"to mirror {found} from now on, set CLERK_INSTANCE_ID={found} (its webhooks too).")


def mirrored_instance(store: Store) -> tuple[str | None, str]:
    """The instance this database's own records name, and which record says so: its newest delivery's (Clerk's
    example payloads, which the Dashboard's "Send Example" delivers, name no real instance and are passed over),
    else an earlier run's."""
    e = webhook_events
    with store.connect() as conn:
        # among the newest deliveries only (an install whose deliveries carry none would scan them all)
        recent = (sa.select(e.c.id, e.c.instance_id, e.c.svix_id, e.c.received_at)
                  .order_by(e.c.received_at.desc(), e.c.id.desc()).limit(1000).subquery())
        newest = conn.execute(sa.select(recent.c.instance_id, recent.c.svix_id)
                              .where(recent.c.instance_id.is_not(None),
                                     recent.c.instance_id.not_in(_EXAMPLE_INSTANCES))
                              .order_by(recent.c.received_at.desc(), recent.c.id.desc()).limit(1)).first()
        if newest is not None:
            return str(newest.instance_id), (
                f"the instance_id of its newest webhook delivery, {newest.svix_id}; if that was a test event "
                f"sent from another instance, set CLERK_INSTANCE_ID to the instance this database mirrors")
        for details in conn.execute(sa.select(reconcile_runs.c.details).order_by(reconcile_runs.c.id.desc())
                                    .limit(20)).scalars():
            recorded = details.get("instance_id") if isinstance(details, dict) else None
            if isinstance(recorded, str) and recorded:
                return recorded, "the instance an earlier reconcile run listed"
    return None, ""
