"""Group commit: concurrent deliveries share one transaction and one COMMIT.

The ASGI endpoint verifies and parses on the event loop, then hands the delivery to
:class:`GroupCommitter`, which passes the deliveries of one turn of the loop to its writer threads
together. A writer drains whatever is waiting (up to ``max_batch``), writes every delivery in one
transaction, commits once, and only then answers each of them: a 2xx still means committed, and a
crash before the COMMIT loses only unanswered deliveries.

A delivery the batch cannot take does not fail its batch-mates. When one statement fails, the
transaction is rolled back, that delivery leaves the batch (:data:`ALONE`: the endpoint runs it in
its own transaction, as before group commit, where a refused value is stored ``failed`` and a lock
held elsewhere waits out ``lock_timeout``), with it, when it waited out a lock, every other delivery
of the batch about the same entity, and the rest is written again. The batch waits for a lock at most
``lock_wait_s`` on PostgreSQL (``SET LOCAL lock_timeout``) and two seconds on MySQL/MariaDB, so an
entity held by a stuck replica costs its batch-mates that long, once. Only a failure of the
connection or of the COMMIT fails the whole batch: every delivery in it answers 503 and nothing was
acknowledged (on PostgreSQL a pipelined batch whose COMMIT is refused is first written again one
statement at a time, and answers 503 when that COMMIT is refused too; on SQLite a COMMIT refused by
a deferred foreign key of the app's mapped tables names no delivery: each goes alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import sqlalchemy as sa
import structlog

from clerk_sync._db_errors import is_lock_wait_timeout, is_transient
from clerk_sync.engine import DeliveryPlan, DeliveryStatus, Entity, Tombstone, Upsert, plan_delivery, touches
from clerk_sync.errors import StoreError, database_message
from clerk_sync.events import Envelope
from clerk_sync.ingest import Outcome, WebhookProcessor, _plan, event_locks
from clerk_sync.mapping import RefusedAtCommit
from clerk_sync.outbox import HeldJobsNotWritten
from clerk_sync.store import Writer, _lock_id

__all__ = ["ALONE", "GroupCommitter"]

log = structlog.get_logger("clerk_sync.http")


class _Alone:
    def __repr__(self) -> str:
        return "ALONE"


_MYSQL_BATCH_LOCK_WAIT_S = 2  # a MySQL/MariaDB batch's wait for a lock (see _mysql_batch_bound)
ALONE: Final = _Alone()  # "apply this delivery in its own transaction" (see the module docstring)
Result = Outcome | StoreError | _Alone


@dataclass(slots=True)
class _Job:
    svix_id: str
    envelope: Envelope
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Result] = field(repr=False)


class _Isolate(Exception):
    """Job ``index`` of the batch failed: roll back, take it out, write the rest again."""

    def __init__(self, index: int, cause: Exception) -> None:
        super().__init__(index)
        self.index, self.cause = index, cause


class _EachAlone(Exception):
    """The batch cannot say which delivery's entity is held (MySQL's lock pass): every delivery goes alone."""


class GroupCommitter:
    """One writer thread applying queued deliveries in batches (started on first use)."""

    def __init__(self, processor: WebhookProcessor, *, max_batch: int = 64, lock_wait_s: float = 0.05,
                 writers: int | None = None) -> None:
        self.processor = processor
        self.max_batch = max_batch
        self._lock_wait_ms = max(1, int(lock_wait_s * 1000))
        self._pg = processor.store.engine.dialect.name == "postgresql"
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        # Per event loop: what it submitted since its last hand-off (see submit)
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        # PostgreSQL: while one batch waits for its COMMIT (the WAL flush), others are written (4 measured
        # best on 2 cores, see BENCHMARKS.md).
        # MySQL/MariaDB alike; SQLite has one writer anyway.
        self._writers = writers or (1 if processor.store.dialect == "sqlite" else 4)
        self._threads: list[threading.Thread] = []
        self._start = threading.Lock()
        self.batches = 0  # committed batches and the deliveries in them (tests, benchmarks)
        self.committed = 0
        self.retried = 0  # batches the pipeline failed, written again one statement at a time
        self.waiting = 0  # submitted, not answered yet

    async def submit(self, svix_id: str, envelope: Envelope) -> Outcome | _Alone:
        """Queue a verified delivery; returns its outcome once its batch has committed, or
        :data:`ALONE`. Raises :class:`StoreError` when the batch could not commit."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        job = _Job(svix_id, envelope, loop, loop.create_future())
        self.waiting += 1
        # Handed to the writers once per turn of the loop, with the deliveries parsed in the same turn:
        # one queue put (one writer woken, one GIL hand-off) for all of them instead of one per delivery.
        pending = self._pending.get(loop)
        if pending is None:
            loop.call_soon(self._hand_off, loop)
            pending = self._pending[loop] = []
        pending.append(job)
        try:
            result = await job.future
        finally:
            self.waiting -= 1
        if isinstance(result, StoreError):
            raise result
        return result

    def _hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = self._pending.pop(loop, [])
        for start in range(0, len(jobs), self.max_batch):  # no list longer than a batch
            self._queue.put(jobs[start:start + self.max_batch])

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the writer thread."""
        threads, self._threads = self._threads, []
        for loop in list(self._pending):  # submitted but not handed off yet: before the stop signals
            self._hand_off(loop)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout)

    # -- the writer thread -----------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if not self._threads:
            with self._start:
                if not self._threads:
                    threads = [threading.Thread(target=self._run, name=f"clerk-sync-committer-{n}", daemon=True)
                               for n in range(self._writers)]
                    for thread in threads:
                        thread.start()
                    self._threads = threads

    def _run(self) -> None:
        carry: list[_Job] | None = None  # taken from the queue, too many for the last batch: the next one
        while True:
            jobs = carry if carry is not None else self._queue.get()
            carry = None
            if jobs is None:
                return
            batch = list(jobs)
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # another thread's stop signal, or ours: after this batch
                    break
                if len(batch) + len(more) > self.max_batch:
                    carry = more
                    break
                batch += more
            try:
                results = self.write([(job.svix_id, job.envelope) for job in batch])
            except Exception as exc:  # a bug must not leave requests waiting forever
                log.exception("group_commit_crashed")
                results = [StoreError(f"internal error while writing: {type(exc).__name__}")] * len(batch)
            _answer(batch, results)

    def write(self, batch: Sequence[tuple[str, Envelope]]) -> list[Result]:
        """Write ``batch`` (svix id, parsed event) in one transaction; one result per delivery, in order."""
        results: list[Result | None] = [None] * len(batch)
        pending = list(range(len(batch)))
        pipelined = True
        while pending:
            try:
                outcomes = self._attempt([batch[i] for i in pending], pipelined=pipelined)
            except _Isolate as failed:
                if failed.index < 0:  # the pipeline failed somewhere: again, one statement at a time
                    pipelined = False
                    self.retried += 1
                    continue
                index = pending.pop(failed.index)
                cause = failed.cause.orig if isinstance(failed.cause, sa.exc.DBAPIError) else failed.cause
                # Held elsewhere: the batch's other deliveries of that entity would each wait the bound too
                held = _same_entity(batch, index, pending) if is_lock_wait_timeout(cause) else []
                for i in [index, *held]:
                    results[i] = ALONE
                pending = [i for i in pending if i not in held]
                log.info("group_commit_isolated", svix_id=batch[index][0], reason=type(cause).__name__,
                         same_entity=len(held))
                continue
            except (_EachAlone, RefusedAtCommit, HeldJobsNotWritten) as cause:  # (SQLite: a deferred key, the
                # batch's job rows name no delivery)
                for index in pending:
                    results[index] = ALONE
                log.info("group_commit_each_alone", deliveries=len(pending), reason=str(cause))
                break
            except StoreError as exc:  # the connection or the COMMIT failed: nothing in the batch holds
                for index in pending:
                    results[index] = exc
                break
            for index, outcome in zip(pending, outcomes, strict=True):
                results[index] = outcome
            self.batches += 1
            self.committed += len(pending)
            break
        return [r if r is not None else StoreError("not written") for r in results]

    def _attempt(self, jobs: list[tuple[str, Envelope]], *, pipelined: bool) -> list[Outcome]:
        processor = self.processor
        with processor.store.transaction() as writer:
            if pipelined and writer.pipelines:
                return self._pipelined(writer, jobs)
            if self._pg:
                writer.conn.exec_driver_sql(f"SET LOCAL lock_timeout = {self._lock_wait_ms}")
                writer.check_at_once()
                _pg_batch_locks(writer, jobs)
            mysql = processor.store.dialect == "mysql"
            if writer.outbox is not None:
                writer.outbox.defer_jobs()  # (SQLite: the batch's hook jobs in one statement, below)
            with _mysql_batch_bound(writer, jobs) if mysql else contextlib.nullcontext():
                outcomes: list[Outcome] = []
                for position, (svix_id, envelope) in enumerate(jobs):
                    try:
                        outcomes.append(processor.apply_in(writer, svix_id, envelope))
                    except HeldJobsNotWritten:  # rows of earlier deliveries too: none to name (each alone)
                        raise
                    except Exception as exc:  # any failure of one delivery: it goes alone, its batch-mates commit
                        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
                            raise  # the connection is gone: fail the batch (StoreError)
                        raise _Isolate(position, exc) from exc
            if writer.outbox is not None:
                writer.outbox.write_jobs()  # (refused: HeldJobsNotWritten, each alone)
            return outcomes

    def _pipelined(self, writer: Writer, jobs: list[tuple[str, Envelope]]) -> list[Outcome]:
        """The batch in two round trips: BEGIN, the lock bound and every upsert in one psycopg pipeline
        (their results come back on a flush; mapped rows and hook jobs are parts of the upserts' statements),
        then COMMIT with the pipeline's sync. Deliveries the pipeline cannot take (deletions, ignored
        types) and the redaction of late events for tombstones run after it, one by one, before the COMMIT.

        psycopg would sync after its own BEGIN (one more round trip, as would a nested pipeline): the
        driver connection is in autocommit for the batch and the transaction is ours, BEGIN (with the
        connection's isolation level) to COMMIT, whose result is checked before anyone is answered: a
        2xx still means committed. The connection goes back to the pool as it came, or is invalidated."""
        import psycopg  # writer.pipelines: the connection is psycopg's

        raw: Any = writer.conn.connection.driver_connection
        if raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise _Isolate(-1, RuntimeError("connection not idle at the start of a batch"))
        was = raw.autocommit
        raw.autocommit = True
        try:
            outcomes = self._in_own_transaction(writer, raw, jobs)
        except BaseException:
            _rollback(raw)
            raise
        finally:
            try:
                raw.autocommit = was
            except psycopg.Error:  # not idle (a failed ROLLBACK) or broken: never hand it out again
                writer.conn.invalidate()
        return outcomes

    def _in_own_transaction(self, writer: Writer, raw: Any, jobs: list[tuple[str, Envelope]]) -> list[Outcome]:
        import psycopg

        processor = self.processor
        try:
            with raw.pipeline():
                raw.execute(_begin_sql(raw))
                raw.execute(f"SET LOCAL lock_timeout = {self._lock_wait_ms}")
                if writer.checks_at_once:
                    raw.execute(writer.CHECK_AT_ONCE)
                    if writer.outbox is not None:
                        writer.outbox.checked_at_once = True  # (else Outbox.project would send it again)
                done = processor.pipelined_in(writer, jobs)
                rest = bool(writer.deleted_with_parent) or any(
                    outcome is None or outcome.status == DeliveryStatus.SKIPPED for outcome in done)
                # sent with the jobs; its result read by the pipeline's closing sync
                commit = None if rest else raw.execute("COMMIT")
            if rest:  # after the pipeline: one statement at a time, then COMMIT
                for i, outcome in enumerate(done):
                    if outcome is not None:  # a skipped late event for a tombstone
                        processor.forget_if_deleted(writer, outcome, jobs[i][1])
                done = [outcome or processor.apply_in(writer, *jobs[i]) for i, outcome in enumerate(done)]
                commit = raw.execute("COMMIT")
            status = commit.statusmessage if commit is not None else None
            if status != "COMMIT":  # PostgreSQL answers ROLLBACK to the COMMIT of a failed transaction
                raise _Isolate(-1, RuntimeError(f"the batch's COMMIT answered {status}"))
            return cast(list[Outcome], done)  # every None was replaced by apply_in's outcome
        except sa.exc.SQLAlchemyError as exc:
            if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
                raise  # the connection is gone: fail the batch (StoreError)
            raise _Isolate(-1, exc) from exc
        except psycopg.Error as exc:
            closed = bool(raw.closed)
            wrapped = sa.exc.DBAPIError.instance("pipeline", None, exc, psycopg.Error, connection_invalidated=closed)
            if closed:
                raise wrapped from exc
            raise _Isolate(-1, wrapped) from exc
        except _Isolate:
            raise
        except Exception as exc:  # not the database's: find the delivery one statement at a time
            raise _Isolate(-1, exc) from exc


def _pg_batch_locks(writer: Writer, jobs: list[tuple[str, Envelope]]) -> None:
    """PostgreSQL, the batch one delivery at a time: every lock its deliveries take, first, in one sorted pass
    (:meth:`Writer.lock_batch`); each apply sorts only its own, so taking them delivery by delivery could
    hold one that another writer needs while waiting for one it has (a deadlock). The intents are planned as
    ``apply_in`` plans them (a membership event repaired with its stored parents takes their locks).

    One held elsewhere past the batch's lock bound: the pass is rolled back to its savepoint, the first key
    held is found without waiting (``pg_try_advisory_xact_lock``, in the same order), and the first delivery
    that takes it is isolated (:class:`_Isolate`): it and its entity's deliveries go alone, the rest retry."""
    conn = writer.conn
    keys: list[list[str]] = []
    try:
        keys = [_locks(writer, svix_id, envelope, _plan(writer, envelope)) for svix_id, envelope in jobs]
        with conn.begin_nested():
            writer.lock([k for ks in keys for k in ks])  # (Writer.lock_batch, with the keys kept for below)
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated:
            raise  # the connection is gone: fail the batch (StoreError)
        if not is_lock_wait_timeout(exc.orig):  # (a deadlock, a statement bound): each delivery alone, as
            raise _EachAlone(database_message(exc.orig or exc)) from exc  # one failing it would have gone
        for key in sorted({k for ks in keys for k in ks}, key=_lock_id):
            if not conn.execute(_TRY_LOCK, {"key": _lock_id(key)}).scalar_one():
                raise _Isolate(next(n for n, ks in enumerate(keys) if key in ks), exc) from exc
        # Released meanwhile (a short batch committed): each delivery alone, as on MySQL/MariaDB
        raise _EachAlone(database_message(exc.orig or exc)) from exc


def _locks(writer: Writer, svix_id: str, envelope: Envelope, planned: DeliveryPlan) -> list[str]:
    """The locks one delivery of a batch takes: its apply's, or its unmirrored event's subject's
    (:func:`~clerk_sync.ingest.event_locks`), taken by ``queue_event`` too (again: held already)."""
    if isinstance(planned.intent, Upsert | Tombstone):
        return writer.locks_of(planned.intent)
    return event_locks(writer, svix_id, envelope) if planned.status == DeliveryStatus.IGNORED else []


_TRY_LOCK = sa.text("SELECT pg_try_advisory_xact_lock(:key)").bindparams(sa.bindparam("key", type_=sa.BigInteger))


@contextlib.contextmanager
def _mysql_batch_bound(writer: Writer, jobs: list[tuple[str, Envelope]]) -> Iterator[None]:
    """MySQL/MariaDB: the batch waits for a lock at most two seconds, in its lock pass and in its writes, as
    PostgreSQL's batch waits lock_wait_s (alone, only the held delivery waits the configured bound, 5 s by
    default, and 503s). The pass takes the lock rows of every entity of the batch in one sorted pass (no
    deadlock between batches); one held by another transaction sends every delivery alone. A row held
    without its lock row (a lone user's upsert takes none) times out its delivery's write instead, and
    :meth:`GroupCommitter.write` sets that entity's deliveries aside. The bound is restored before the
    COMMIT, which waits for no row lock."""
    # InnoDB counts whole seconds, and one would split batches that merely queue behind a slow one
    # (test_group_commit_deadlock).
    conn = writer.conn
    conn.exec_driver_sql("SET @clerk_sync_lock_wait = @@SESSION.innodb_lock_wait_timeout, "
                         f"SESSION innodb_lock_wait_timeout = {_MYSQL_BATCH_LOCK_WAIT_S}")
    try:
        try:
            plans = [(svix_id, envelope, plan_delivery(envelope)) for svix_id, envelope in jobs]
            writer.lock_entities([p.intent for _, _, p in plans], [k for svix_id, envelope, p in plans
                                                                   if p.status == DeliveryStatus.IGNORED
                                                                   for k in event_locks(writer, svix_id, envelope)])
        except sa.exc.DBAPIError as exc:
            # A lock wait, or a deadlock InnoDB broke (a batch that inserted a new lock row rolled back while two
            # waited on it: one is its victim): each delivery alone, as on PostgreSQL, not the batch failed
            if not exc.connection_invalidated and is_transient(exc.orig):
                raise _EachAlone(database_message(exc.orig or exc)) from exc
            raise
        yield
    except BaseException:
        if not conn.invalidated:  # best effort: a failing restore must not hide why the batch failed
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                conn.exec_driver_sql(_RESTORE_LOCK_WAIT)
        raise
    conn.exec_driver_sql(_RESTORE_LOCK_WAIT)


_RESTORE_LOCK_WAIT = "SET SESSION innodb_lock_wait_timeout = @clerk_sync_lock_wait"


def _same_entity(batch: Sequence[tuple[str, Envelope]], index: int, pending: list[int]) -> list[int]:
    """The deliveries of ``pending`` that touch a row delivery ``index`` touches (its user, organization or
    membership, see :func:`~clerk_sync.engine.touches`)."""
    def rows(envelope: Envelope) -> frozenset[tuple[Entity, str]]:
        intent = plan_delivery(envelope).intent
        return frozenset() if intent is None else touches(intent)

    held = rows(batch[index][1])
    return [i for i in pending if held & rows(batch[i][1])]


def _begin_sql(raw: Any) -> str:
    """The BEGIN psycopg would send itself: the connection's isolation level, read-only, deferrable."""
    parts = ["BEGIN"]
    if raw.isolation_level is not None:
        parts.append("ISOLATION LEVEL " + raw.isolation_level.name.replace("_", " "))
    if raw.read_only is not None:
        parts.append("READ ONLY" if raw.read_only else "READ WRITE")
    if raw.deferrable is not None:
        parts.append("DEFERRABLE" if raw.deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


def _rollback(raw: Any) -> None:
    """End whatever the batch left open on the server (nothing when the COMMIT went through)."""
    import psycopg

    with contextlib.suppress(psycopg.Error):
        if not raw.closed and raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raw.execute("ROLLBACK")


def _answer(batch: list[_Job], results: list[Result]) -> None:
    """Resolve every future of the batch with one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Result], Result]]] = {}
    for job, result in zip(batch, results, strict=True):
        by_loop.setdefault(job.loop, []).append((job.future, result))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop (shutdown): nobody is waiting any more
            loop.call_soon_threadsafe(_resolve, pairs)


def _resolve(pairs: list[tuple[asyncio.Future[Result], Result]]) -> None:
    for future, result in pairs:
        if not future.done():
            future.set_result(result)
