"""Is sync fresh? The database's answer, for ``/metrics`` (read at scrape time) and ``doctor --freshness``.

Each read is a handful of index lookups: the newest delivery per outcome and the failed count use
``ix_webhook_events_status_received_at``; the last reconcile run uses ``reconcile_runs.status``.
``doctor --freshness`` also reads the deliveries of the last day whose row the app's mapped table refused
(:func:`read_refusals`, a range of ``ix_webhook_events_received_at``: not at scrape time, where
``clerk_sync_mapped_rows_refused_total`` counts them).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync._db_errors import is_insufficient_privilege, store_error
from clerk_sync._time import aware
from clerk_sync.engine import DeliveryStatus
from clerk_sync.metrics import DatabaseSnapshot
from clerk_sync.migrations._privileges import delivery_tables, missing_tables
from clerk_sync.outbox import REFUSAL_NOTE
from clerk_sync.store import Store
from clerk_sync.tables import RECONCILE_ATTEMPT_STARTED, audit_log, hook_jobs, reconcile_runs, webhook_events

__all__ = ["FreshnessCheck", "check_freshness", "database_probe", "read_initial_load", "read_snapshot"]

_DONE = (DeliveryStatus.APPLIED, DeliveryStatus.SKIPPED, DeliveryStatus.IGNORED)
_JOB_STATUSES = ("pending", "running", "dead")
_TABLES = delivery_tables()


def _stamp(value: datetime | None) -> float | None:
    return None if value is None else aware(value).timestamp()


def read_snapshot(store: Store) -> DatabaseSnapshot:
    """Two read-only round trips: newest delivery, failed backlog, hook jobs by status, the schema's revision
    (:data:`~clerk_sync.migrations.VERSION_TABLE`, for ``clerk_sync_schema_current``); the last completed
    reconcile run. Without a version table of clerk-sync's (a database an older release migrated, or none),
    the first is read again without it and the schema's state the way ``/readyz`` reads it; a table of the
    deliveries' missing (the catalog says which) is a schema not current whatever its version says."""
    e, r = webhook_events, reconcile_runs
    newest = [sa.select(sa.func.max(e.c.received_at)).where(e.c.status == s).scalar_subquery() for s in _DONE]
    failed = sa.select(sa.func.count()).select_from(e).where(e.c.status == DeliveryStatus.FAILED).scalar_subquery()
    last_id = sa.select(sa.func.max(r.c.id)).where(r.c.status == "completed").scalar_subquery()
    j = hook_jobs  # counted on ix_hook_jobs_status_available_at
    jobs = [sa.select(sa.func.count()).select_from(j).where(j.c.status == s).scalar_subquery() for s in _JOB_STATUSES]
    # due ones only: a job waiting on its retry backoff is a failing handler (hook_runs), not a stopped
    # dispatcher, which is what this series is for
    now = store.now()  # (one reading: the oldest due job and its hook are read against the same moment)
    # Due: pending past its backoff, or claimed by a dispatcher that died holding it (its lease run out: the
    # claim takes it again, as a pending one). Only the pending ones were counted: jobs a killed dispatcher held,
    # with none running since, were due for ever while the series and ClerkSyncHooksBehind said nothing (review).
    due = sa.or_(sa.and_(j.c.status == "pending", j.c.available_at <= now),
                 sa.and_(j.c.status == "running", j.c.lease_until < now))
    oldest = sa.select(sa.func.min(j.c.created_at)).where(due).scalar_subquery()
    # its hook: a job no running dispatcher has the hook of waits for ever
    oldest_hook = sa.select(j.c.hook).where(due).order_by(j.c.created_at, j.c.id).limit(1).scalar_subquery()
    # Every table the deliveries need named (planned, not read): one missing under a revision that says current (a
    # partial restore, a table dropped) fails this read, and is told from the schema behind below (review: read as
    # the database down or, for a table these values do not read, as current).
    there = [sa.exists(sa.select(sa.literal(1)).select_from(sa.table(t)).where(sa.false())) for t in _TABLES]
    values = (*newest, failed, *jobs, oldest, oldest_hook)
    v = _VERSIONS  # one row at any revision a release of ours leaves: a primary-key lookup, no round trip more
    revision = sa.select(sa.func.max(v.c.version_num)).scalar_subquery()
    revisions = sa.select(sa.func.count()).select_from(v).scalar_subquery()
    gone: list[str] = []  # tables missing, read when a privilege refused the first statement
    with store.connect() as conn:
        try:
            try:
                row: tuple[Any, ...] = tuple(conn.execute(sa.select(*values, revision, revisions, *there)).one())[:11]
            except sa.exc.DBAPIError as refused:
                if not is_insufficient_privilege(refused.orig):
                    raise
                # A table of the deliveries' this role may not read (the RUNBOOK's step of a new table to grant:
                # /readyz says what to grant): the values as before, not the database down (review)
                conn.rollback()
                row = tuple(conn.execute(sa.select(*values, revision, revisions)).one())
                # (MySQL/MariaDB answer the privilege before a table gone: the catalog, and its probe, say)
                gone = missing_tables(conn)
                conn.rollback()
        except sa.exc.SQLAlchemyError as exc:
            if not _behind(exc):  # down, a timeout: as without the version
                raise
            conn.rollback()  # (PostgreSQL: the failed statement ended the transaction)
            try:
                # no version table of clerk-sync's: the state as /readyz reads it, unless the catalog says a
                # table is missing
                row = (*conn.execute(sa.select(*values)).one(), None, 0)
                gone = missing_tables(conn)
                conn.rollback()
            except sa.exc.SQLAlchemyError as again:
                # Older still (no hook_jobs: before 0009) or empty (a restore under way): the database answers,
                # so it is up; what it lacks is the schema (review: this read as clerk_sync_database_up 0,
                # paging ClerkSyncDatabaseDown where ClerkSyncSchemaNotCurrent is the lead). A table missing
                # under a revision that says current (a partial restore, a table dropped) is the schema's too:
                # it read as the database down, and /readyz says which tables (review).
                if not _behind(again):
                    raise
                conn.rollback()
                current = _schema_current(store, None, 0)
                if current is None or (current and not missing_tables(conn)):
                    raise
                conn.rollback()
                return DatabaseSnapshot(None, 0, None, schema_current=False, tables_read=False)
        run = conn.execute(
            sa.select(r.c.started_at, r.c.finished_at, r.c.created, r.c.updated, r.c.deleted, r.c.details)
            .where(r.c.id == last_id)
        ).first()
        current = False if gone else _schema_current(store, row[9], int(row[10]))
    stamps = [s for s in (_stamp(v) for v in row[:3]) if s is not None]
    return DatabaseSnapshot(
        newest_delivery_at=max(stamps) if stamps else None,
        failed_backlog=int(row[3]),
        reconcile_last_success_at=_stamp(run.finished_at) if run is not None else None,
        reconcile_last_started_at=_attempt_started(run.started_at, run.details) if run is not None else None,
        reconcile_last_drift={"created": run.created, "updated": run.updated, "deleted": run.deleted} if run else {},
        hook_jobs={s: int(n) for s, n in zip(_JOB_STATUSES, row[4:7], strict=True)},
        hook_oldest_pending_at=_stamp(row[7]),
        hook_oldest_pending_hook=row[8],
        schema_current=current,
    )


def _attempt_started(started_at: datetime, details: Any) -> float | None:
    """When the run's last attempt started: a resumed run's own (its details), else the run's start. From the first
    attempt's, drift a run resumed hours later repaired was measured from before the outage began (review)."""
    attempt = details.get(RECONCILE_ATTEMPT_STARTED) if isinstance(details, dict) else None
    if isinstance(attempt, str):
        with suppress(ValueError):
            return aware(datetime.fromisoformat(attempt)).timestamp()
    return _stamp(started_at)


_VERSIONS = sa.table(migrations.VERSION_TABLE, sa.column("version_num", sa.String(32)))
_SCHEMA_BEHIND = "the schema is not current"  # (store_error's words for a missing table or column)


def _behind(exc: sa.exc.SQLAlchemyError) -> bool:
    return _SCHEMA_BEHIND in str(store_error(exc))


def _schema_current(store: Store, revision: str | None, revisions: int) -> bool | None:
    """``/readyz``'s ``migrations_current`` (at this release's head, or newer): from the revision read with the
    other values; otherwise (no version table, none or several revisions in it) from
    :func:`~clerk_sync.migrations.schema_state`, which also knows a revision an older release kept in
    ``alembic_version``. None when that read fails (the series is left out: not a guess)."""
    if revisions == 1 and revision is not None:
        return migrations.state_of((revision,))[0] != "behind"
    try:
        return migrations.is_current(store.engine)
    except Exception:  # (the values were read: the database answers; one more failure is not an outage)
        return None


def database_probe(store: Store) -> Callable[[], DatabaseSnapshot]:
    """The probe :meth:`~clerk_sync.metrics.Metrics.watch_database` calls at scrape time."""
    return lambda: read_snapshot(store)


#: ``doctor --freshness`` fails on a row the app's mapped table refused this recently (an hourly cron sees each;
#: ClerkSyncMappedRowsRefused fires for 15 min), and warns on one within :data:`REFUSALS_WINDOW_S`. By the
#: delivery's receipt: a ``replay`` of an older delivery that refuses its row again is counted in /metrics only.
REFUSALS_FAIL_S = 3600.0
#: The audit action of a ``migrate --backfill`` that wrote every row: refusals received before it started
#: are repaired, and no longer counted (``details["started_at"]``, unix seconds).
BACKFILLED = "mapping.backfilled"
REFUSALS_WINDOW_S = 86400.0
_NOTE_CHARS = 300  # of the newest refusal's last_error, in the check's line


@dataclass(frozen=True, slots=True)
class MappedRefusals:
    """The deliveries received since ``since`` (unix seconds) that applied while the app's mapped table
    refused their row (:meth:`~clerk_sync.outbox.Outbox.project`: their ``last_error`` says so)."""

    since: float
    count: int
    newest_at: float | None = None  # unix seconds, when the newest of them was received
    newest_svix_id: str | None = None
    newest_error: str | None = None  # its last_error (the database's first line: never the values)
    backfilled_at: float | None = None  # a clean backfill started then, within the window: counted from there


def read_refusals(store: Store, *, since: float) -> MappedRefusals:
    """Read-only statements over the deliveries received since ``since`` (``ix_webhook_events_received_at``);
    after a clean backfill (:data:`BACKFILLED`) within it, only those refused since it started (received, or
    replayed: ``applied_at``): the backfill wrote the rows refused before it."""
    e = webhook_events
    backfilled = _clean_backfill_started(store)
    since_backfill = backfilled if backfilled is not None and backfilled > since else None
    start = datetime.fromtimestamp(since, tz=UTC)
    refused = sa.and_(e.c.received_at >= start, e.c.last_error.like(f"%{REFUSAL_NOTE}%"))
    if since_backfill is not None:  # refused after it started: received since, or replayed since (applied_at)
        refused = sa.and_(refused, sa.func.coalesce(e.c.applied_at, e.c.received_at)
                          >= datetime.fromtimestamp(since_backfill, tz=UTC))
    with store.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(e).where(refused)).scalar_one()
        # (after a backfill, when it was refused: a replay's refusal is as new as its replay)
        at = e.c.received_at if since_backfill is None else sa.func.coalesce(e.c.applied_at, e.c.received_at)
        newest = conn.execute(sa.select(at.label("at"), e.c.svix_id, e.c.last_error).where(refused)
                              .order_by(at.desc(), e.c.id.desc()).limit(1)).first()
    if newest is None:
        return MappedRefusals(since, int(count), backfilled_at=since_backfill)
    return MappedRefusals(since, int(count), _stamp(newest.at), newest.svix_id, newest.last_error, since_backfill)


def read_initial_load(store: Store) -> int | None:
    """The id of the last completed reconcile run when it is the initial load (None otherwise): no run
    completed before it, and no delivery was stored before the load began, so nothing it wrote could have
    been delivered (day one: the users Clerk held before sync started). A handful of indexed reads.

    A run interrupted and resumed with the same ``since`` is one row, completed once, so it is still the
    first; one abandoned (resumed with another ``since``, or a refused sweep) never completed, and the load
    began with it: its ``started_at`` counts. With a delivery stored before the load began (the endpoint was
    live: a row it wrote may be a delivery missed), the run's repairs read as any run's."""
    r, e = reconcile_runs, webhook_events
    with store.connect() as conn:
        first, last = conn.execute(sa.select(sa.func.min(r.c.id), sa.func.max(r.c.id))
                                   .where(r.c.status == "completed")).one()
        if last is None or first != last:
            return None
        began = sa.select(sa.func.min(r.c.started_at)).where(r.c.id <= last).scalar_subquery()
        earlier = conn.execute(sa.select(e.c.id).where(e.c.received_at < began).limit(1)).first()
    return int(last) if earlier is None else None


def _clean_backfill_started(store: Store) -> float | None:
    """When the newest ``migrate --backfill`` that refused no row started (unix seconds), if any."""
    with store.connect() as conn:
        details = conn.execute(sa.select(audit_log.c.details).where(audit_log.c.action == BACKFILLED)
                               .order_by(audit_log.c.id.desc()).limit(1)).scalar()
    started = details.get("started_at") if isinstance(details, dict) else None
    return float(started) if isinstance(started, int | float) else None


@dataclass(frozen=True, slots=True)
class FreshnessCheck:
    """One line of ``doctor --freshness``: ``status`` is ok, warn or fail (fail: exit 1)."""

    name: str
    status: str
    detail: str


def check_freshness(snap: DatabaseSnapshot, *, now: float, max_delivery_age_s: float | None,
                    max_failed: int, max_reconcile_age_s: float,
                    max_hook_wait_s: float = 900.0, refusals: MappedRefusals | None = None,
                    initial_load: int | None = None) -> list[FreshnessCheck]:
    """The alert rules' questions, answered from one snapshot (pure: ``now`` is unix seconds).

    A quiet install is not a stale one: deliveries fail the check when the last reconcile repaired rows and
    started (its last attempt) more than :data:`MISSED_AFTER_S` after the newest delivery
    (ClerkSyncNoDeliveriesWhileDrift), or, only with ``max_delivery_age_s`` (an app whose users change all day),
    when the newest is older.
    With ``refusals`` (:func:`read_refusals`), a fifth line: rows the app's mapped tables refused
    (ClerkSyncMappedRowsRefused). ``initial_load`` (:func:`read_initial_load`) is the last run's id when it
    is the first completed one: the rows it created are the initial load, neither drift nor a sign of missed
    deliveries (rows it updated or deleted were there before it, written by deliveries: those are repairs)."""
    drift = _repaired(snap, initial_load)
    checks = [_deliveries(snap, now, max_delivery_age_s, drift), _backlog(snap, max_failed),
              _reconcile(snap, now, max_reconcile_age_s, initial_load, drift), _hooks(snap, now, max_hook_wait_s)]
    return checks if refusals is None else [*checks, _refusals(refusals, now)]


def _repaired(snap: DatabaseSnapshot, initial_load: int | None) -> int:
    """The last run's repairs: every row it changed, but for the initial load only those it updated or deleted
    (a load into an empty table only creates; a row it updated or deleted was written by a delivery)."""
    drift = snap.reconcile_last_drift
    return sum(count for change, count in drift.items() if initial_load is None or change != "created")


MISSED_AFTER_S = 1800.0  # as ClerkSyncNoDeliveriesWhileDrift: reconcile repaired rows this long after the newest
_SKEW_S = 60.0  # a newest delivery stamped further in the future than this: the clocks disagree
_ENDPOINT = "check the endpoint in the Clerk Dashboard (Webhooks -> your endpoint -> message attempts; disabled?)"


def _deliveries(snap: DatabaseSnapshot, now: float, max_age: float | None, drift: int) -> FreshnessCheck:
    name = "newest delivery"
    if snap.newest_delivery_at is None:
        if drift:  # what ClerkSyncNoDeliveriesWhileDrift pages for: reconcile repairs, nothing arrives
            return FreshnessCheck(name, "fail", f"no delivery stored yet, while the last reconcile repaired {drift} "
                                  f"row(s): {_ENDPOINT}")
        return FreshnessCheck(name, "warn", "no delivery stored yet: is the Clerk webhook endpoint configured?")
    age = now - snap.newest_delivery_at
    # From the run's start: a long run (a large instance, paced by the rate budget) that repaired a change in
    # flight, its delivery arriving as it ran, finished long after the newest delivery and failed (review)
    ran = snap.reconcile_last_started_at if snap.reconcile_last_started_at is not None else \
        snap.reconcile_last_success_at
    gap = None if ran is None else ran - snap.newest_delivery_at
    if drift and gap is not None and gap > MISSED_AFTER_S:
        return FreshnessCheck(name, "fail", f"{age:.0f}s ago, and the last reconcile, started {gap:.0f}s after it, "
                              f"repaired {drift} row(s): deliveries are missed; {_ENDPOINT}")
    if age < -_SKEW_S:  # stamped by the serving host's clock, read against this one's
        return FreshnessCheck(name, "warn", f"stamped {-age:.0f}s in the future: this host's clock and the serving "
                              "host's disagree (is NTP running on both?), so its age cannot be told")
    if max_age is not None and age > max_age:
        return FreshnessCheck(name, "fail", f"{age:.0f}s ago (limit {max_age:.0f}s): {_ENDPOINT}")
    return FreshnessCheck(name, "ok", f"{max(age, 0.0):.0f}s ago")


def _hooks(snap: DatabaseSnapshot, now: float, max_wait: float) -> FreshnessCheck:
    """ClerkSyncHooksBehind and ClerkSyncHookJobsDead: a dispatcher that stopped, a handler that gave up."""
    name = "hook jobs"
    jobs = snap.hook_jobs
    dead, pending, running = (jobs.get(s, 0) for s in ("dead", "pending", "running"))
    counts = f"{pending} pending, {running} running, {dead} dead"
    if dead:
        return FreshnessCheck(name, "fail", f"{counts}: an applied change did not reach its handler; `clerk-sync "
                              "hooks list` shows why, fix the cause, then `clerk-sync hooks retry ID...` (or "
                              "`hooks purge ID...`)")
    if snap.hook_oldest_pending_at is not None and now - snap.hook_oldest_pending_at > max_wait:
        waited = now - snap.hook_oldest_pending_at
        of = f" (hook {snap.hook_oldest_pending_hook!r})" if snap.hook_oldest_pending_hook else ""
        return FreshnessCheck(name, "fail", f"{counts}; the oldest due job{of} has waited {waited:.0f}s (limit "
                              f"{max_wait:.0f}s): is a dispatcher running with this hook (`serve` without "
                              "--no-dispatch, or `clerk-sync worker` whose --hooks list it)? A dispatcher claims only "
                              "its own hooks' jobs: deploy the hook, or for one removed or renamed `clerk-sync hooks "
                              "purge --hook NAME`; `hooks list --status pending` shows the due jobs by hook. A "
                              "handler that hangs holds its entity's later jobs too")
    return FreshnessCheck(name, "ok", counts)


def _refusals(found: MappedRefusals, now: float) -> FreshnessCheck:
    """ClerkSyncMappedRowsRefused: a change applied to clerk-sync's tables (answered 200 ``applied``) whose row
    the app's mapped table refused (a NOT NULL column the mapping does not fill, the app's own constraint,
    an ambiguous link): the app's table lacks the row, or holds an old one, until it is fixed and backfilled."""
    name = "mapped rows"
    window = (f"in the last {(now - found.since) / 3600:.0f}h" if found.backfilled_at is None else
              f"since the backfill of {datetime.fromtimestamp(found.backfilled_at, UTC):%Y-%m-%d %H:%M:%S} UTC, "
              "which wrote every row refused before it,")
    if not found.count or found.newest_at is None:
        return FreshnessCheck(name, "ok", f"none refused by the app's mapped tables {window.rstrip(',')}")
    age = max(now - found.newest_at, 0.0)
    shown = _refusal(found.newest_error or "")
    counted = f"{found.count} delivery" if found.count == 1 else f"{found.count} deliveries"
    detail = (f"{counted} {window} applied to clerk-sync's tables while the app's mapped table "
              f"refused the row; the newest {age:.0f}s ago ({found.newest_svix_id}: {shown}). "
              "`clerk-sync doctor --mapping mod:MAPPING` says what in the table does not fit the mapping and how to "
              "fix it; fix the table or the mapping, then `clerk-sync migrate --mapping "
              "mod:MAPPING --backfill` writes the missing rows")
    if age < REFUSALS_FAIL_S:
        return FreshnessCheck(name, "fail", detail)
    return FreshnessCheck(name, "warn", f"{detail} (a warning, not a failure, once the newest is "
                          f"{REFUSALS_FAIL_S:.0f}s old; it clears after a day, or once a backfill writes every row)")


def _refusal(error: str) -> str:
    """What the app's table said, out of a delivery's ``last_error`` (the note's own advice left out), cut short."""
    start = error.find(f"{REFUSAL_NOTE} (")
    if start >= 0:
        said = error[start + len(REFUSAL_NOTE) + 2:]
        end = said.find("); it is applied to clerk-sync's tables")
        error = said if end < 0 else said[:end]
    return error if len(error) <= _NOTE_CHARS else error[:_NOTE_CHARS - 3] + "..."


def _backlog(snap: DatabaseSnapshot, max_failed: int) -> FreshnessCheck:
    name = "failed deliveries"
    if snap.failed_backlog > max_failed:
        return FreshnessCheck(name, "fail", f"{snap.failed_backlog} stored as failed (limit {max_failed}): read "
                              "webhook_events.last_error, fix the cause, then `clerk-sync replay`")
    return FreshnessCheck(name, "ok", f"{snap.failed_backlog} failed")


def _reconcile(snap: DatabaseSnapshot, now: float, max_age: float, initial_load: int | None,
               drift: int) -> FreshnessCheck:
    name = "last reconcile"
    if snap.reconcile_last_success_at is None:
        return FreshnessCheck(name, "warn", "no completed `clerk-sync reconcile` run yet: schedule one (cron)")
    age = now - snap.reconcile_last_success_at
    did = f"repaired {drift} row(s)"
    if initial_load is not None:
        loaded = snap.reconcile_last_drift.get("created", 0)
        did = (f"initial load: {loaded} row(s) written by reconcile run {initial_load}, the first to complete"
               + (f"; {did} that were there before it" if drift else ""))
    detail = f"completed {age:.0f}s ago, {did} {snap.reconcile_last_drift}"
    if age > max_age:  # ClerkSyncReconcileStale: the safety net has stopped
        return FreshnessCheck(name, "fail", f"{detail}; older than {max_age:.0f}s: is the schedule running? "
                              "Run `clerk-sync reconcile` and check the cron job's log")
    if drift:
        return FreshnessCheck(name, "warn", f"{detail}: deliveries were missed; check the endpoint's attempts")
    return FreshnessCheck(name, "ok", detail)
