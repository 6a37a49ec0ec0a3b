"""After-commit hooks: run the handlers of applied changes from the durable outbox.

Give the hooks to the store (``Store(engine, hooks=[Hook("welcome", send_welcome, on=["user.created"])])``):
every write through it queues one job per hook that wants the change, in the write's transaction
(:mod:`clerk_sync.outbox`). A :class:`Dispatcher` (a thread in ``serve``, or ``clerk-sync worker``)
claims due jobs, calls the handlers after the commit, retries failures with :class:`Backoff`, and
leaves a job ``dead`` after ``max_attempts``. Delivery is at least once: a worker killed mid-handler
means the handler runs again after the lease, with the same ``change.idempotency_key``.

A hook may also name Clerk event types clerk-sync does not mirror (``on=["subscriptionItem.active",
"paymentAttempt.*"]``): its handler then gets an :class:`Event` for each new delivery of one, queued in
the transaction that stores the delivery, with the same guarantees (see :class:`Hook`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from clerk_sync._time import utcnow
from clerk_sync.changes import Change, Event, Hook
from clerk_sync.errors import HookGaveUp, HookRetryLater, StoreDataError, StoreError, StorePrivilegeMissing
from clerk_sync.metrics import Metrics
from clerk_sync.outbox import Job, claim, extend, fail, finish_many, release
from clerk_sync.store import Store

__all__ = ["Backoff", "Change", "Dispatcher", "Event", "Hook", "HookGaveUp", "HookRetryLater"]

_Call = Callable[[Any], None]  # a hook's handler, called with its job's Change or Event

log = structlog.get_logger("clerk_sync.hooks")


_MAX_DELAY_S = 365 * 86400.0  # a retry further away than this is a dead job, not a delay
_CRASH_PAUSE_MAX_S = 60.0  # the longest pause of run_forever after turns that crashed in a row
_DOWN_PAUSE_MAX_S = 30.0  # the longest pause of run_forever between polls of a database that is unavailable


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry schedule of a failing job: ``base_s * 2**(attempt-1)`` capped at ``max_s``; dead after
    ``max_attempts``. The defaults (2 s doubling to the hour, 15 attempts) keep a failing job for about 4
    hours, so a downstream's outage of an hour or two (a mail provider, the app behind a forwarding sink)
    loses nothing; 10 attempts, before, gave up after 17 minutes."""

    max_attempts: int = 15
    base_s: float = 2.0
    max_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or not 0 <= self.base_s <= _MAX_DELAY_S or not 0 <= self.max_s <= _MAX_DELAY_S:
            # (a NaN fails both bounds; an infinite or huge max_s would overflow the datetime of the retry)
            raise ValueError(f"invalid backoff {self!r}: max_attempts >= 1, delays from 0 to {_MAX_DELAY_S:g} s "
                             "(a year)")

    def delay(self, attempts: int, *, asked_s: float = 0.0) -> timedelta:
        """The pause after ``attempts`` failed attempts; ``asked_s``: the receiver's own ``Retry-After``
        (:class:`~clerk_sync.errors.HookRetryLater`), waited for when longer, up to ``max_s``."""
        # the exponent capped: 2.0 ** 1025 overflows a float (a max_attempts in the thousands, "retry for
        # days"), and 2 ** 64 s is past any max_s already
        own = min(self.max_s, self.base_s * 2.0 ** min(max(0, attempts - 1), 64))
        return timedelta(seconds=max(own, min(asked_s, self.max_s)))


class Dispatcher:
    """Runs the store's hooks for queued jobs; safe to run in several processes at once.

    ``lease_s`` bounds how long a job stays claimed without news from its dispatcher: past it, another
    dispatcher may take the job over (that is how jobs of a killed worker resume). While a batch runs, a
    heartbeat thread extends, every ``heartbeat_s`` (default a third of the lease; 0: none; less than
    half the lease), the leases of the jobs it holds (the one running and those done but not yet
    finished), so a slow handler is not claimed twice. A job started late in its batch, with less of its
    claim's lease left than the next beat may be away, has its lease extended before its handler runs;
    jobs of the batch not started by 80 % of the lease are given back instead. ``now`` is the clock for
    due times and leases: the wall clock, as the store's (stored in the database, compared across
    dispatchers), so a step back (NTP correcting a clock that ran ahead) delays retries and the jobs queued
    before it by the step, and with them the later jobs of their entities, which wait in order; a killed
    worker's leases last longer by as much. ``poll_s`` is the pause of :meth:`start`'s thread when the
    queue is empty; ``vacuum_every`` how many finished jobs between two ``VACUUM``s of the outbox on
    PostgreSQL (0: leave it to autovacuum).

    ``batch`` is the most jobs one claim takes. A claim takes no more than its handlers are expected
    to run in a tenth of the lease (from the time the previous batches took a job; the first claim
    takes at most 10): fast handlers get large claims, whose statements and transactions cost less per
    job (in process, 100 → 500 jobs a claim: ~25 % less CPU a job), slow ones small claims, which are
    not given back half-run and leave the rest of the queue to other dispatchers.

    A handler still running after ``slow_handler_s`` (default 5 minutes; 0: never) is logged once, by the
    heartbeat: a handler that hangs keeps its job's lease until its process ends (a thread cannot be
    stopped from outside), so this line is how to find it. Without a ``timeout_s`` on its :class:`Hook`,
    the handler runs in the dispatcher's thread, which runs nothing else meanwhile. With one, the handler
    runs in a thread of its own and the dispatcher waits at most ``timeout_s`` for it; past that the run
    is *overdue*: the dispatcher goes on with other jobs, the job stays claimed (the heartbeat keeps its
    lease, across batches and polls, for as long as the run lasts: it never runs twice at once), later
    jobs of its entity wait, and the run's outcome is recorded at the first turn after it ended. At most
    ``max_overdue`` runs *of one hook* are overdue at once: a hook at that bound has no job claimed (nor
    started: one already claimed is given back) by this dispatcher until one of its runs ends, while the
    other hooks' jobs go on (a hook whose external API hangs stops itself, not every hook). :meth:`stop`
    does not wait for them; when the process ends, their leases expire and another dispatcher runs those
    jobs again (at least once).
    """

    def __init__(self, store: Store, *, backoff: Backoff | None = None, lease_s: float = 60.0, batch: int = 500,
                 poll_s: float = 1.0, now: Callable[[], datetime] = utcnow, metrics: Metrics | None = None,
                 heartbeat_s: float | None = None, vacuum_every: int = 1000, slow_handler_s: float = 300.0,
                 max_overdue: int = 4) -> None:
        if not store.hooks:
            raise ValueError("the store has no hooks: pass them as Store(engine, hooks=[Hook(...)])")
        if batch < 1:
            raise ValueError(f"batch must be at least 1 (the most jobs a claim takes), not {batch}")
        if not lease_s > 0:  # not `<= 0`: NaN too
            raise ValueError(f"lease_s must be more than 0 (seconds a claim lasts), not {lease_s}")
        if not poll_s >= 0:
            raise ValueError(f"poll_s must be 0 or more (seconds between polls of an empty queue), not {poll_s}")
        beat = lease_s / 3 if heartbeat_s is None else heartbeat_s
        if not 0 <= beat < lease_s / 2:
            raise ValueError(f"heartbeat_s must be 0 (no heartbeat) or more, and less than half of lease_s "
                             f"({lease_s / 2:g} s) so that a beat comes while a lease lasts, not {heartbeat_s}")
        self.store = store
        self.backoff = backoff or Backoff()
        self.lease = timedelta(seconds=lease_s)
        self.batch = batch
        self.poll_s = poll_s
        self._now = now
        self.metrics = metrics  # runs by hook and outcome, and their durations (clerk_sync_hook_*)
        self._handlers: dict[str, _Call] = {h.name: h.handler for h in store.hooks}
        # Claimed: only these hooks' jobs. A job of a hook this process lacks (a worker deployed with an older
        # list, a hook renamed) waits, pending, for a dispatcher that has it; none claims it to mark it dead.
        self._hook_names = tuple(self._handlers)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat_s = beat
        # a job whose lease ends sooner than this when it starts is extended first: the next beat may be a
        # whole heartbeat_s away, and the beat's statement needs time too (a tenth of the lease for it)
        self._late = timedelta(seconds=beat) + self.lease / 10
        self._held: dict[int, Job] = {}  # claimed by this dispatcher and not finished: their leases are kept
        self._held_lock = threading.Lock()
        self.vacuum_every = vacuum_every  # PostgreSQL: VACUUM the outbox after so many finished jobs
        self._since_vacuum = 0
        self._per_job_s: float | None = None  # how long a job of this dispatcher takes, lately (claim_limit)
        self._claimed_full = False  # the last claim took all it asked for: more may be due (run_forever)
        self._claim_killed = 0  # jobs the last claim marked dead instead of returning them (drain goes on)
        #: Jobs this dispatcher's claims marked dead without running them: lease expired on their last attempt
        #: (their worker died, or the handler outlived the lease), or a payload this release cannot read.
        #: Counted in ``clerk_sync_hook_runs_total{outcome="dead"}`` too.
        self.dead_at_claim = 0
        if not slow_handler_s >= 0:
            raise ValueError(f"slow_handler_s must be 0 (never warn) or more seconds, not {slow_handler_s}")
        self.slow_handler_s = slow_handler_s
        self._running: tuple[Job, datetime] | None = None  # the job whose handler runs now, since when
        self._warned: tuple[Job, datetime] | None = None  # the run (of _running) the slow-handler line was said of
        if not max_overdue >= 1:
            raise ValueError(f"max_overdue must be at least 1 (handler runs of one hook past its timeout_s "
                             f"this dispatcher may leave running), not {max_overdue}")
        self.max_overdue = max_overdue
        self._timeouts: dict[str, float | None] = {h.name: h.timeout_s for h in store.hooks}
        # Runs past their hook's timeout_s, by job id: their jobs stay claimed (the heartbeat extends them, as
        # _held's) until the run ends and a turn records its outcome (_reap). Changed by the dispatcher's
        # thread only, under _held_lock.
        self._overdue: dict[int, _Run] = {}
        self._bound_said: set[str] = set()  # the hooks the max_overdue line was said of since they reached it
        self._in_batch = False  # a batch runs (the heartbeat beats while one does, or a run is overdue)
        # The role may write the outbox (asked before the first claim, until it may: _check_outbox_privileges)
        self._outbox_granted = store.engine.dialect.name == "sqlite"
        self._beater: tuple[threading.Thread, threading.Event] | None = None  # the heartbeat thread, its stop

    @property
    def claim_limit(self) -> int:
        """How many jobs the next claim asks for: what the handlers run in a tenth of the lease at the pace
        of the previous batches, between 1 and ``batch`` (10 before any batch ran)."""
        if self._per_job_s is None:
            return min(self.batch, 10)
        budget = self.lease.total_seconds() / 10
        return max(1, min(self.batch, int(budget / self._per_job_s) if self._per_job_s > 0 else self.batch))

    def run_once(self) -> int:
        """Claim one batch, run it, record the outcomes; returns how many jobs were claimed.

        Jobs not started before 80 % of the lease has passed are given back rather than run late,
        when another dispatcher could already be taking them over.
        """
        return self._run_batch(stopped_before=self._stop.is_set())  # (a drain after stop(): its batches run)

    def _run_batch(self, *, stopped_before: bool) -> int:
        """:meth:`run_once`; a stop asked while it runs (not ``stopped_before``) gives back what it has not
        started. The loop passes False: a stop landing between its check and the claim ends this batch too."""
        self._reap()
        full = self._hooks_at_bound()
        hooks = tuple(name for name in self._hook_names if name not in full)
        self._claim_killed = 0
        if not hooks:  # every hook of this dispatcher is at max_overdue: nothing to claim until a run ends
            self._claimed_full = False
            return 0
        self._check_outbox_privileges()
        claimed_at = self._now()
        limit = self.claim_limit
        dead: list[tuple[int, str]] = []
        with self._bookkeeping() as conn:
            jobs = claim(conn, claimed_at, lease=self.lease, limit=limit, max_attempts=self.backoff.max_attempts,
                         hooks=hooks, dead=dead)
        if dead:
            self._died_at_claim(dead)
        self._claimed_full = len(jobs) + len(dead) >= limit  # (rows it marked dead took room in the claim)
        ran = started = 0  # jobs[started:] have not started: given back if the batch is abandoned
        done: list[tuple[Job, float]] = []  # the jobs that succeeded, and how long their handlers took
        finished = False
        interrupted: Job | None = None  # stopped mid-run: given back too (see _interruptible)
        given_back: set[int] = set()  # jobs of a hook that reached max_overdue in this batch, released already
        try:
            with self._heartbeat() if jobs else nullcontext():
                for n, job in enumerate(jobs):
                    # stop() asked (SIGTERM): the rest goes back now, due at once for another dispatcher, rather
                    # than run here past the stop's wait (a Kubernetes grace period) or held for the lease
                    # (a stop asked while this batch runs: a drain() or run_once() called after stop() runs its jobs)
                    stopping = self._stop.is_set() and not stopped_before
                    late = not stopping and self._now() >= claimed_at + self.lease * 0.8
                    if job.id in given_back:
                        started = n + 1
                        continue
                    # (no run overdue, the common case: no hook is at its bound, and nothing is looked up per job)
                    if (self._overdue and not stopping and not late
                            and job.hook in self._hooks_at_bound(jobs[n:])):
                        # a run of its hook went overdue in this batch, the hook at its bound: the batch's jobs
                        # of that hook not started are given back now, due at once (their claim's attempt not
                        # counted), while the other hooks' jobs go on
                        rest = [j for j in jobs[n:] if j.hook == job.hook]
                        with self.store.transaction() as writer:
                            release(writer.conn, rest)
                        given_back.update(j.id for j in rest)
                        started = n + 1
                        continue
                    if stopping or late:
                        with self.store.transaction() as writer:
                            release(writer.conn, [j for j in jobs[n:] if j.id not in given_back])
                        started = len(jobs)
                        if stopping:
                            log.info("hook dispatch stopping; the batch's jobs not started are given back",
                                     released=len(jobs) - n)
                        elif late:
                            log.warning("hook batch outlived 80 % of its lease; rest given back",
                                        released=len(jobs) - n)
                        break
                    if not self._hold(job, claimed_at + self.lease):
                        continue  # its claim was lost before it started: not run here
                    started, ran = n + 1, ran + 1
                    began = time.perf_counter()
                    try:
                        ok = self._run(job)
                    except BaseException as exc:
                        if self._stopping(exc) and self._interruptible(job):
                            interrupted = job
                        raise
                    if ok:
                        done.append((job, time.perf_counter() - began))
                    elif ok is False:
                        self._drop(job)  # its failure is recorded: no longer ours
                    # (None: overdue; the job moved from _held to _overdue)
                if done:  # one transaction for the batch's successes (a crash before it re-runs them: at least once)
                    finished = True  # (attempted: a failure of it is not retried below, its jobs maybe committed)
                    self._finish(done)
        except BaseException:  # a failure's bookkeeping raised, or a stop: the jobs not started are given back
            # now, not left claimed for a lease and charged an attempt
            self._give_back([j for j in jobs[started:] if j.id not in given_back], interrupted)
            raise
        finally:  # also when the bookkeeping failed (a database blip): the heartbeat must not keep them
            if done and not finished:  # a failure's or a lease's bookkeeping raised mid-batch: the jobs that
                # succeeded are finished all the same (best effort), or their handlers would run again
                try:
                    self._finish(done)
                except Exception:
                    log.warning("hook successes not recorded; they will run again", jobs=[j.id for j, _ in done],
                                exc_info=True)
            with self._held_lock:
                self._held.clear()
            if ran:  # the pace of this batch, claim to finish, for the size of the next claims
                per_job = max(0.0, (self._now() - claimed_at).total_seconds()) / ran
                self._per_job_s = per_job if self._per_job_s is None else (self._per_job_s + per_job) / 2
        return len(jobs)

    def _died_at_claim(self, dead: list[tuple[int, str]]) -> None:
        """Count the jobs a claim marked dead (committed with it) as dead runs: they wait in ``hooks list``
        for a person as a handler's dead job does, and ``worker --once`` must not exit 0 over them."""
        self._claim_killed = len(dead)
        self.dead_at_claim += len(dead)
        if self.metrics is not None:
            for _, hook in dead:
                self.metrics.hook_dead_unrun(hook)
        log.error("hook jobs marked dead when claimed (lease expired on their last attempt: worker killed, handler "
                  "slower than the lease, or clocks of the replicas apart; or a payload that cannot be read); "
                  "`clerk-sync hooks list` shows why", count=len(dead),
                  jobs=[job_id for job_id, _ in dead[:20]])  # (the first 20: one line, however many)

    def _check_outbox_privileges(self) -> None:
        """Raise :class:`StorePrivilegeMissing` (what to grant) while the database role may not update and delete
        ``hook_jobs``: a job claimed then would run, its end could not be recorded, and it would run again
        at every lease's end until someone granted it (a welcome mail a minute). Asked until granted."""
        if self._outbox_granted:
            return
        from clerk_sync._db_errors import store_error
        from clerk_sync.migrations._privileges import outbox_refusals

        try:
            with self.store.engine.connect() as conn:
                lacking, grant, refusal = outbox_refusals(conn)
        except sa.exc.SQLAlchemyError as exc:
            raise store_error(exc) from exc
        if refusal is not None:  # (the database's refusal as the cause: the CLI's exit 2, a setting to fix)
            raise StorePrivilegeMissing(
                f"the database role may not {', '.join(lacking)} hook_jobs, so no hook job is claimed (one would run "
                "and could not be recorded done, then run again at every lease's end): as the tables' owner, run "
                f"{grant} (RUNBOOK, \"Least-privilege database roles\"); claiming resumes once granted") from refusal
        self._outbox_granted = True

    def _give_back(self, jobs: list[Job], interrupted: Job | None = None) -> None:
        """Release the jobs not started (their claim's attempt not counted) and the one a stop interrupted
        (its attempt counted: its handler ran, partly)."""
        if interrupted is not None:  # release() takes the claim's attempt back: one more keeps it counted
            jobs = [dataclasses.replace(interrupted, attempts=interrupted.attempts + 1), *jobs]
        if not jobs:
            return
        try:
            with self._bookkeeping() as conn:
                release(conn, jobs)
        except Exception:
            log.warning("hook batch abandoned; its jobs not started run after their lease", jobs=[j.id for j in jobs],
                        exc_info=True)
        else:  # (interrupted: the job whose run the stop cut short, given back with them)
            said = {"interrupted": interrupted.id} if interrupted is not None else {}
            log.warning("hook batch abandoned; the jobs it had not started are given back", released=len(jobs),
                        **said)

    def _interruptible(self, job: Job) -> bool:
        """Whether a stop that came out of ``job``'s run may give the job back (due at once) rather than leave
        it claimed until its lease ends: not while its handler may still run (a ``timeout_s`` run's thread,
        kept in the overdue set), nor on its last attempt, where the lease's end marks it dead (a handler that
        raises ``KeyboardInterrupt`` itself, in the main thread, looks like Ctrl-C: it must not loop forever)."""
        with self._held_lock:
            running = job.id in self._overdue
        return not running and job.attempts < self.backoff.max_attempts

    def _finish(self, done: list[tuple[Job, float]]) -> None:
        """Delete the jobs that succeeded, then count each run: ``ok``, or ``lost`` when its claim was lost
        meanwhile (another dispatcher has the job and runs it again)."""
        with self._bookkeeping() as conn:
            lost = finish_many(conn, [job for job, _ in done])
        if lost:
            log.warning("hook claims lost (lease expired while running: raise lease_s; or a replica's clock ahead "
                        "of this one's by more than lease_s minus heartbeat_s took the jobs over: sync the clocks, "
                        "NTP)", jobs=lost)
        for job, seconds in done:
            self._ran(job, "lost" if job.id in lost else "ok", seconds)
        self._vacuum_now_and_then(len(done))

    def extend_leases(self) -> int:
        """Push the leases of the jobs this dispatcher holds to ``now + lease_s`` (the heartbeat calls it);
        returns how many were extended (fewer than held: a claim was lost, its lease had already expired)."""
        with self._held_lock:
            held = [*self._held.values(), *(run.job for run in self._overdue.values())]
        if not held:
            return 0
        with self.store.transaction() as writer:
            return extend(writer.conn, held, self._now() + self.lease)

    @contextmanager
    def _bookkeeping(self) -> Iterator[Connection]:
        """A transaction for claims and finishes. On PostgreSQL it does not wait for the WAL flush
        (``synchronous_commit = off``): one lost in a crash only means a job runs again, which at least
        once allows, and the webhook path's commits keep the disk to themselves."""
        with self.store.transaction() as writer:
            if writer.conn.dialect.name == "postgresql":
                writer.conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            yield writer.conn

    def _vacuum_now_and_then(self, finished: int) -> None:
        """PostgreSQL: ``VACUUM`` the outbox after every ``vacuum_every`` finished jobs (0: never).

        Each job is inserted, claimed and deleted, so between autovacuum runs (a minute apart by default,
        ~100k jobs at full ingest) the table is mostly dead rows, and every claim's scan visits them again:
        5 ms for a claim of 3 jobs among 20k dead rows, measured. Vacuuming a table of so few live rows
        takes milliseconds and, without truncation, blocks no writer; SKIP_LOCKED leaves it to another
        replica's dispatcher when one is at it. A role that does not own the table gets PostgreSQL's
        warning, no error."""
        if self.vacuum_every <= 0 or self.store.engine.dialect.name != "postgresql":
            return
        self._since_vacuum += finished
        if self._since_vacuum < self.vacuum_every:
            return
        self._since_vacuum = 0
        try:
            with self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                # TRUNCATE false: giving the emptied pages back to the file system takes a lock that waits
                # (up to 5 s) for every writer of the table and then blocks them
                conn.exec_driver_sql("VACUUM (SKIP_LOCKED, TRUNCATE false) hook_jobs")
        except sa.exc.SQLAlchemyError as exc:  # housekeeping: the next round tries again
            log.warning("hook outbox vacuum failed", error=str(exc).splitlines()[0])

    def _hold(self, job: Job, lease_until: datetime) -> bool:
        """Keep ``job``'s lease (``lease_until``, the claim's) from now on: the heartbeat extends it. Started
        late in its batch, when the lease ends before the next beat surely came, it is extended now, or
        another dispatcher could claim it while its handler runs. False: the claim was lost already."""
        with self._held_lock:
            self._held[job.id] = job
        now = self._now()
        if self.heartbeat_s <= 0 or lease_until - now >= self._late:
            return True
        with self.store.transaction() as writer:
            if extend(writer.conn, [job], now + self.lease):
                return True
        self._drop(job)
        log.warning("hook claim lost before its job started (lease expired); not run here", job=job.id)
        return False

    def _drop(self, job: Job) -> None:
        with self._held_lock:
            self._held.pop(job.id, None)

    @contextmanager
    def _heartbeat(self) -> Iterator[None]:
        """While the block (a batch) runs, and after it for as long as an overdue run lasts, :meth:`extend_leases`
        every ``heartbeat_s`` in a thread of its own (one a dispatcher)."""
        if self.heartbeat_s <= 0:
            yield
            return
        with self._held_lock:
            self._in_batch = True
            if self._beater is None:
                stop = threading.Event()
                thread = threading.Thread(target=self._beat, args=(stop,), name="clerk-sync-hooks-heartbeat",
                                          daemon=True)
                self._beater = (thread, stop)
                thread.start()
        try:
            yield
        finally:
            with self._held_lock:
                self._in_batch = False
                beater, keep = self._beater, bool(self._overdue)
                if not keep:
                    self._beater = None
            if beater is not None and not keep:  # nothing left to keep: it ends with the batch
                beater[1].set()
                beater[0].join()

    def _beat(self, stop: threading.Event) -> None:
        """The heartbeat thread: it ends when stopped, or at a beat after the batch when no overdue run is left
        unrecorded (one that ended keeps its lease until the dispatcher's next turn records it: its job, claimed
        still, must not run again elsewhere after it succeeded)."""
        while not stop.wait(self.heartbeat_s):
            try:
                self.extend_leases()
            except Exception:  # the database is away: the next beat tries again
                log.warning("hook lease heartbeat failed", exc_info=True)
            self.warn_if_slow()
            with self._held_lock:
                if not self._in_batch and not self._overdue:
                    if self._beater is not None and self._beater[1] is stop:
                        self._beater = None
                    return

    def _overdue_ended(self) -> bool:
        """Whether an overdue run has ended, its outcome not recorded yet."""
        with self._held_lock:
            return any(run.ended for run in self._overdue.values())

    def _went_overdue(self, run: _Run, timeout_s: float) -> None:
        """``run`` outlived its hook's ``timeout_s``: its job stays claimed (the heartbeat keeps its lease) while
        the dispatcher goes on; :meth:`_reap` records its outcome once it ends."""
        job = run.job
        self._keep_running(run)
        log.warning("hook handler past its timeout_s; its job stays claimed until the run ends, and this "
                    "dispatcher goes on with other jobs (give the handler's network calls a timeout)",
                    hook=job.hook, job=job.id, type=job.change.type, timeout_s=timeout_s,
                    overdue=len(self._overdue))
        if self.metrics is not None:
            self.metrics.hook_went_overdue(job.hook)

    def _keep_running(self, run: _Run) -> None:
        """Hold ``run``'s job in the overdue set while the run lasts (the heartbeat keeps its lease)."""
        with self._held_lock:
            self._held.pop(run.job.id, None)
            new = run.job.id not in self._overdue
            self._overdue[run.job.id] = run
        if new and self.metrics is not None:
            self.metrics.hook_overdue_now(run.job.hook, 1)

    def _reap(self) -> None:
        """Record the outcome of each overdue run that ended, as :meth:`_run` would have; a run leaves the
        overdue set once recorded (a database error leaves it to the next turn)."""
        with self._held_lock:
            ended = [run for run in self._overdue.values() if run.ended]
        succeeded = [run for run in ended if run.error is None]
        if succeeded:
            self._finish([(run.job, run.seconds) for run in succeeded])
            self._forget(succeeded)
        for run in ended:
            if run.error is not None:
                final = isinstance(run.error, HookGaveUp)
                self._ran(run.job, self._failed(run.job, run.error, final=final), run.seconds)
                self._forget([run])

    @property
    def overdue(self) -> int:
        """How many runs are overdue (past their hook's ``timeout_s``, their jobs still claimed)."""
        with self._held_lock:
            return len(self._overdue)

    def settle(self, wait_s: float) -> int:
        """Wait up to ``wait_s`` for the overdue runs to end (the heartbeat, when on, keeps their leases meanwhile)
        and record those that ended; returns how many still run. ``worker --once`` calls it before exiting:
        a run it left overdue would otherwise end unrecorded, its job claimed until the lease, then run again."""
        deadline = time.monotonic() + wait_s
        with self._held_lock:
            runs = list(self._overdue.values())
        for run in runs:
            run.wait(max(0.0, deadline - time.monotonic()))
        self._reap()
        with self._held_lock:
            return len(self._overdue)

    def _forget(self, runs: list[_Run]) -> None:
        with self._held_lock:
            for run in runs:
                del self._overdue[run.job.id]
        if self.metrics is not None:
            for run in runs:
                self.metrics.hook_overdue_now(run.job.hook, -1)

    def overdue_by_hook(self) -> dict[str, int]:
        """How many runs of each hook are overdue now (past its ``timeout_s``, their jobs still claimed; an
        ended run counts until a turn records it)."""
        with self._held_lock:
            runs = list(self._overdue.values())
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.job.hook] = counts.get(run.job.hook, 0) + 1
        return counts

    def _hooks_at_bound(self, batch: Sequence[Job] = ()) -> set[str]:
        """The hooks with ``max_overdue`` runs overdue: this dispatcher claims, and starts, none of their jobs
        until one of their runs ends; the other hooks' jobs go on. Said once a hook, each time it reaches it
        (with how many of ``batch``'s jobs, not started, it gives back)."""
        counts = self.overdue_by_hook()
        full = {hook for hook, n in counts.items() if n >= self.max_overdue}
        self._bound_said &= full  # a hook back under its bound is said again when it reaches it next
        for hook in sorted(full - self._bound_said):
            self._bound_said.add(hook)
            with self._held_lock:
                jobs = sorted(job_id for job_id, run in self._overdue.items() if run.job.hook == hook)
            others = [name for name in self._hook_names if name not in full]
            said: dict[str, Any] = {"released": n} if (n := sum(j.hook == hook for j in batch)) else {}
            log.warning("hook runs overdue at max_overdue: this dispatcher claims none of this hook's jobs until "
                        "one of its runs ends"
                        + (", and goes on with the other hooks' jobs" if others else " (it has no other hook)")
                        + " (give the handler's network calls a timeout, or raise the hook's timeout_s, or "
                        "clerk-sync worker --max-overdue)", hook=hook, max_overdue=self.max_overdue, jobs=jobs,
                        **said)
        return full

    def warn_if_slow(self) -> bool:
        """Log, once a run, a handler running for more than ``slow_handler_s`` (the heartbeat calls it): the
        one the dispatcher waits for, and each overdue run (past its hook's ``timeout_s``) still running;
        True when it logged."""
        if self.slow_handler_s <= 0:
            return False
        said = self._warn_overdue()
        running = self._running
        if running is None or self._warned is running:  # (a retry is a new run)
            return said
        job, since = running
        seconds = (self._now() - since).total_seconds()
        if seconds < self.slow_handler_s:
            return said
        self._warned = running
        log.warning("hook handler still running; this dispatcher runs nothing else meanwhile, and later jobs of "
                    "its entity wait (give the handler's network calls a timeout)", hook=job.hook, job=job.id,
                    type=job.change.type, running_s=round(seconds, 1))
        return True

    def _warn_overdue(self) -> bool:
        """The slow-handler line for the overdue runs still running after ``slow_handler_s``, once a run."""
        now = self._now()
        with self._held_lock:
            runs = [run for run in self._overdue.values() if not run.ended and not run.warned
                    and (now - run.since).total_seconds() >= self.slow_handler_s]
        for run in runs:
            run.warned = True
            log.warning("hook handler still running past its timeout_s; its job stays claimed and later jobs of its "
                        "entity wait until it ends (a thread cannot be stopped: restart this process, then the job "
                        "runs again after its lease; docs/RUNBOOK.md, ClerkSyncHookRunsOverdue)", hook=run.job.hook,
                        job=run.job.id, type=run.job.change.type, running_s=round((now - run.since).total_seconds(), 1))
        return bool(runs)

    def drain(self, max_batches: int = 1000) -> int:
        """Run batches until none is due (jobs waiting on a backoff stay queued); returns jobs claimed (not
        counting those a claim marked dead instead: :attr:`dead_at_claim`)."""
        total = 0
        for _ in range(max_batches):
            claimed = self.run_once()
            total += claimed
            if not claimed and not self._claim_killed:  # (a claim of dead rows only: more may be due behind them)
                break
        return total

    def _run(self, job: Job) -> bool | None:
        """Call the job's handler; True when it succeeded (counted once finished), False when it failed
        (recorded), None when it outlived its hook's ``timeout_s`` (overdue: :meth:`_went_overdue`)."""
        handler = self._handlers[job.hook]  # (claimed: one of this dispatcher's hooks, never another's)
        timeout_s = self._timeouts.get(job.hook)
        started = time.perf_counter()
        run: _Run | None = None
        try:
            self._running = (job, self._now())
            try:
                if timeout_s is None:
                    _call_handler(handler, job.change)
                else:
                    run = _Run(job, handler, self._running[1])
                    if not run.wait(timeout_s):
                        self._went_overdue(run, timeout_s)
                        return None
            finally:
                self._running = None
        except BaseException as exc:  # CancelledError, SystemExit, gevent's Timeout too: this job's failure
            if self._stopping(exc):
                if run is not None and not run.ended:  # Ctrl-C while waiting: the handler's thread runs on,
                    self._keep_running(run)  # so its job stays claimed, its lease kept, until the run ends
                raise
            return self._failure(job, exc, time.perf_counter() - started)
        if run is not None and run.error is not None:  # raised in the run's own thread: never a stop
            return self._failure(job, run.error, run.seconds)
        return True

    def _failure(self, job: Job, exc: BaseException, seconds: float) -> bool:
        """Record and count a failed run that took ``seconds`` (measured before the recording's writes)."""
        self._ran(job, self._failed(job, exc, final=isinstance(exc, HookGaveUp)), seconds)
        return False

    def _ran(self, job: Job, outcome: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.hook_ran(job.hook, outcome, seconds)

    def _stopping(self, exc: BaseException) -> bool:
        """Whether ``exc`` stops the dispatcher rather than failing a job or a turn: Ctrl-C, or an exit
        while :meth:`stop` was asked (a signal handler that stops, then exits). Python raises Ctrl-C's
        ``KeyboardInterrupt`` in the main thread only: one in another thread (``serve``'s dispatcher thread)
        was raised by a handler, and is that job's failure (a handler's own ``timeout_s`` thread's is too)."""
        if isinstance(exc, KeyboardInterrupt):
            return threading.current_thread() is threading.main_thread()
        return isinstance(exc, SystemExit) and self._stop.is_set()

    def _failed(self, job: Job, exc: BaseException, *, final: bool) -> str:
        """Record the failure: pending again after the backoff (``retry``), or ``dead``; ``lost`` when the
        claim was lost meanwhile (the lease ran out and another dispatcher has the job: its outcome is not
        this run's to record).

        The message goes to the job's ``last_error`` only (erasure redacts it there; it may quote the
        person, or the receiver's answer): the log names the exception's type, and an HTTP status."""
        dead = final or job.attempts >= self.backoff.max_attempts
        asked = exc.after_s if isinstance(exc, HookRetryLater) else 0.0
        retry_at = None if dead else self._now() + self.backoff.delay(job.attempts, asked_s=asked)
        try:
            recorded = self._record(job, _error_text(exc), retry_at)
        except (StoreDataError, ValueError):  # refused even cleaned (UnicodeError is a ValueError): the name alone
            recorded = self._record(job, type(exc).__name__, retry_at)
        said = {"hook": job.hook, "type": job.change.type, "job": job.id, "attempt": job.attempts,
                "error_type": type(exc).__name__}  # not "exception": structlog renders that key as a traceback
        if (status := _http_status(exc)) is not None:
            said["status"] = status
        if not recorded:
            log.warning("hook failed after its claim was lost (another dispatcher has the job)", **said)
            return "lost"
        log.warning("hook failed", **said, dead=dead, retry_at=retry_at.isoformat() if retry_at else None)
        return "dead" if dead else "retry"

    def _record(self, job: Job, error: str, retry_at: datetime | None) -> bool:
        with self.store.transaction() as writer:
            return fail(writer.conn, job, error, retry_at)

    # -- as a background thread (``serve``) --------------------------------------------------------
    def start(self) -> None:
        """Dispatch in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("dispatcher already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name="clerk-sync-hooks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the loop to stop after the running job (the batch's jobs not started are given back, due at once
        for another dispatcher), and wait for it (at most ``timeout_s``; 0: only ask, as a signal handler does,
        and a later call waits; overdue runs are not waited for: their jobs run again elsewhere once this
        process ended and their leases expired)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if not self._thread.is_alive():
                self._thread = None

    def _pause(self, in_a_row: int, cap: float) -> float:
        """The pause after ``in_a_row`` failed turns: from ``poll_s`` (at least 0.1 s), doubling, at most ``cap``."""
        return min(cap, max(self.poll_s, 0.1) * 2.0 ** min(in_a_row - 1, 16))

    def run_forever(self) -> None:
        """The worker loop: full batches back to back, otherwise a ``poll_s`` pause. While the database is
        unavailable, each failed turn is logged (with what to check) and followed by a pause that doubles, from
        ``poll_s`` (at least 0.1 s) up to 30 s (or ``poll_s``), back to ``poll_s`` once a turn succeeds (it polled at
        ``poll_s``: with ``--poll 0`` a hot loop of thousands of lines a second). A turn that crashes is
        logged and followed by a pause that doubles, from ``poll_s`` (at least 0.1 s) up to a minute, with
        each crash in a row; only Ctrl-C (a ``KeyboardInterrupt`` in the main thread: one a handler raises
        elsewhere is its job's failure), or an exit while :meth:`stop` was asked, ends the loop otherwise; the
        job it cut short is given back with those not started."""
        crashes = down = 0
        denied = False
        while not self._stop.is_set():
            pause = self.poll_s
            try:
                claimed = self._run_batch(stopped_before=False)
                crashes = 0
                if down:
                    log.info("hook dispatch: privilege granted; claiming again" if denied else
                             "hook dispatch: database available again", failed_turns=down)
                    down, denied = 0, False
            except StoreError as exc:
                down += 1
                denied = isinstance(exc, StorePrivilegeMissing)  # the last failed turn's: what its recovery says
                pause = self._pause(down, max(_DOWN_PAUSE_MAX_S, self.poll_s))
                if denied:  # a GRANT to run (its message has it), not an outage
                    log.warning("hook dispatch: the database role lacks a privilege; no job is claimed until it is "
                                "granted", error=str(exc), attempt=down, retry_in_s=round(pause, 3))
                else:
                    log.warning("hook dispatch: database unavailable", error=_with_advice(str(exc)), attempt=down,
                                retry_in_s=round(pause, 3))
                claimed = 0
            except BaseException as exc:  # a bug must not stop hooks for good while serve keeps answering 200
                if self._stopping(exc):
                    raise
                crashes += 1
                pause = self._pause(crashes, _CRASH_PAUSE_MAX_S)
                log.exception("hook dispatch crashed; retrying after a pause", pause_s=pause)
                claimed = 0
            if not ((claimed or self._claim_killed) and self._claimed_full):  # the queue had no more due: pause
                if not (down or crashes) and self._overdue_ended():  # (recorded within a second, not a --poll
                    pause = min(pause, _OVERDUE_CHECK_S)  # later; an outage's or a crash's backoff stands)
                self._stop.wait(pause)
        self._reap_at_stop()

    def _reap_at_stop(self) -> None:
        """Record the overdue runs that ended before the stop (best effort): unrecorded, their jobs stayed claimed
        until the lease ended, then ran again elsewhere, after they had succeeded."""
        try:
            self._reap()
        except Exception:
            log.warning("hook runs that ended could not be recorded at stop; their jobs run again after their lease",
                        exc_info=True)


_OVERDUE_CHECK_S = 1.0  # the longest idle wait while an overdue run that ended is unrecorded (run_forever)


def _call_handler(handler: _Call, item: Change | Event) -> None:
    """Run ``handler`` on ``item``; a TypeError (the job's failure, its last error) when it handed back an
    awaitable, whose work never ran (a handler object :class:`Hook` could not tell was async)."""
    result = cast("Callable[[Any], object]", handler)(item)  # (typed None; an async one hands back more)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # (no "never awaited" warning: the error says it)
        raise TypeError(f"the handler returned {type(result).__name__} (an async handler?), which the dispatcher "
                        "does not await, so its work did not run: hooks run in the dispatcher's thread; make it a "
                        "plain function (e.g. one calling asyncio.run)")


class _Run:
    """One run of a handler whose hook has a ``timeout_s``, in a daemon thread of its own (with the context
    variables of the dispatcher's thread, as an inline run has them). A thread cannot be stopped from
    outside: a run that outlives the timeout is left to end by itself."""

    def __init__(self, job: Job, handler: _Call, since: datetime) -> None:
        self.job = job
        self.since = since  # when it started, by the dispatcher's clock
        self.warned = False  # the slow-handler line was said of it
        self.error: BaseException | None = None  # what the handler raised
        self.seconds = 0.0  # how long the handler ran, once it ended
        self._ended = threading.Event()
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(self._call, handler), daemon=True,
                                  name=f"clerk-sync-hook-{job.hook}-{job.id}")
        thread.start()

    def _call(self, handler: _Call) -> None:
        started = time.perf_counter()
        try:
            _call_handler(handler, self.job.change)
        except BaseException as exc:  # the job's failure, recorded by the dispatcher's thread
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - started
            self._ended.set()

    def wait(self, timeout_s: float) -> bool:
        """Wait for the run to end, at most ``timeout_s``; whether it ended."""
        return self._ended.wait(min(timeout_s, threading.TIMEOUT_MAX))  # (a larger one overflows the lock's)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()


def _with_advice(error: str) -> str:
    """A database error with what to check, unless it says already (a lock wait that ran out: "retry later";
    a schema behind: "run clerk-sync's migrations", where "check DATABASE_URL" would mislead)."""
    if any(said in error for said in ("retry later", "the schema is not current", "DATABASE_URL", "Least-privilege")):
        return error
    return f"{error}; check DATABASE_URL, and that the database is up (retrying with backoff)"


def _error_text(exc: BaseException) -> str:
    """``Type: message`` for the job's last error (the type alone without a message); a ``__str__`` that
    raises must not lose the failure (the batch after it would be abandoned)."""
    try:
        message = str(exc)
    except Exception:
        message = "<exception str() failed>"  # as the traceback module says it
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status a failure carries, on itself or its cause: httpx's ``HTTPStatusError`` and requests'
    ``HTTPError`` hold the response (``raise_for_status()``), and :class:`~clerk_sync.hooks.sinks.StandardWebhookSink`
    raises from one."""
    try:
        found = [getattr(getattr(seen, "response", None), "status_code", None) for seen in (exc, exc.__cause__)]
    except Exception:  # a property of the handler's own exception that raises: no status, the failure recorded
        return None
    return next((status for status in found if isinstance(status, int)), None)
