"""Prometheus metrics, one registry per service instance (no process-global state).

Under ``serve --workers N`` each worker is a process of its own and a scrape reaches one of them:
``serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before the workers start, prometheus_client
then keeps every value in a per-process file there, and :meth:`Metrics.render` sums them across workers
(``MultiProcessCollector``), so a counter never appears to go back (a "reset" to Prometheus).

The series answer "is sync fresh and healthy?" (alert rules: ``docs/alerts.yml``). Everything here is
pure bookkeeping on prometheus_client objects: values that live in the database (newest delivery,
failed backlog, last reconcile) come from a ``probe`` callable the caller injects
(:meth:`Metrics.watch_database`), read at scrape time and cached for ``ttl_s``.

Label sets are bounded: ``type`` is a known Clerk event type or ``"other"``, ``endpoint`` a path
template (``/users/{id}``), ``status`` an outcome or an HTTP status code, ``hook`` a hook's name (set
in code), ``table`` an app table the mapping names, ``reason`` one of :data:`MAPPED_REFUSAL_REASONS` (the
console's sign-in failures: ``wrong_token`` or ``throttled``, ``via`` ``form`` or ``bearer``), ``code`` of a
refused session one of :data:`AUTH_REFUSAL_CODES` (the refusal's stable error code, else ``"other"``).

The authentication series (:meth:`Metrics.authenticated`, :meth:`Metrics.auth_refused`, :meth:`Metrics.jwks_fetched`)
are counted in the process that verifies session tokens, the app's: pass the app's ``Metrics`` (the processor's,
as for the Clerk client and JIT) to :class:`~clerk_sync.auth.authenticator.Authenticator`; the Flask extension and
the Django app do. Every registry has them at 0 from the start, so an alert's ratio has both sides.

One series is the process's rather than an instance's: :data:`MAPPED_ROWS_REFUSED`, the rows the app's
mapped tables refused. They are refused deep in the write path (:meth:`clerk_sync.outbox.Outbox.project`, under
whichever store wrote: a delivery, reconcile, an admin action), which knows no service instance, so every
:class:`Metrics` registers the one counter (its ``/metrics`` shows this process's count; in multiprocess
mode the count is in the worker's file and summed like any other).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from clerk_sync import errors
from clerk_sync.engine import HANDLED_EVENT_TYPES, DeliveryStatus

log = structlog.get_logger("clerk_sync.metrics")
_REFRESH_S = 1.0  # multiprocess mode: how often a worker writes its watched gauges (breaker, budget)
# The refresher writes under this lock, and a fork waits for it: a child forked while the thread was inside
# prometheus_client's multiprocess lock would inherit it held, and hang on its first metric.
_WRITING = threading.Lock()
os.register_at_fork(before=_WRITING.acquire, after_in_parent=_WRITING.release, after_in_child=_WRITING.release)


def _refresh(ref: weakref.ReferenceType[Metrics], closed: threading.Event) -> None:
    """The multiprocess refresher's loop: until stopped, or until its Metrics is collected."""
    while not closed.wait(_REFRESH_S):
        metrics = ref()
        if metrics is None:
            return
        metrics._write_watched()
        del metrics  # (not held across the wait)


def _restart_in_child(ref: weakref.ReferenceType[Metrics]) -> None:
    metrics = ref()
    if metrics is not None:
        metrics._forked()


def _multiprocess() -> bool:
    """prometheus_client keeps values in PROMETHEUS_MULTIPROC_DIR's files (chosen when it was imported)."""
    return bool(values.ValueClass._multiprocess)

__all__ = ["CONTENT_TYPE_LATEST", "KNOWN_EVENT_TYPES", "DatabaseSnapshot", "Metrics", "event_type_label"]

# Every webhook event type Clerk documents: its webhooks spec's 45 (the examples in tests/fixtures/clerk), and
# those it lists elsewhere (its JS SDK's ``subscriptionItem.created``, the ``invitation.*`` of application
# invitations: tests/fixtures/clerk/event-types-outside-spec.json). Anything else is counted as "other", so a
# sender cannot grow the label set.
KNOWN_EVENT_TYPES = HANDLED_EVENT_TYPES | frozenset({
    "email.created", "sms.created", "session.created", "session.pending",
    "organizationDomain.created", "organizationDomain.updated", "organizationDomain.deleted",
    "organizationInvitation.created", "organizationInvitation.accepted", "organizationInvitation.revoked",
    "role.created", "role.updated", "role.deleted", "permission.created", "permission.updated",
    "permission.deleted", "waitlistEntry.created", "waitlistEntry.updated",
    "paymentAttempt.created", "paymentAttempt.updated", "subscription.created", "subscription.updated",
    "subscription.active", "subscription.pastDue", "subscriptionItem.updated", "subscriptionItem.active",
    "subscriptionItem.canceled", "subscriptionItem.upcoming", "subscriptionItem.ended",
    "subscriptionItem.abandoned", "subscriptionItem.incomplete", "subscriptionItem.pastDue",
    "subscriptionItem.freeTrialEnding", "subscriptionItem.created",
    "invitation.created", "invitation.accepted", "invitation.revoked",
})
_APPLIED = frozenset({DeliveryStatus.APPLIED, DeliveryStatus.SKIPPED})
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Event time -> applied: seconds for a live delivery, hours for a Svix retry after an outage.
_HOOK_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 60.0)  # a local write .. a slow API
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)


#: Why an app's mapped table refused a row (the ``reason`` label; the delivery's ``last_error`` has the words):
#: ``constraint`` its own constraint (a NOT NULL column the mapping does not fill, a UNIQUE value another row
#: holds, a key still referring to the value), ``link`` an ambiguous or unverifiable link to an existing row,
#: ``parent`` the rows it refers to arrived but the table refused theirs, ``database`` another error the
#: database raised for the row (an app trigger's, a value its column refuses), ``value`` a value the column's
#: type cannot take or the mapping's compute raised, ``rolled_back`` the table rolled the whole transaction
#: back (or, on SQLite, refused it at COMMIT): the unit of work was written again without the app's tables.
MAPPED_REFUSAL_REASONS = ("constraint", "link", "parent", "database", "value", "rolled_back")

#: The rows the app's mapped tables refused (the change itself applied to clerk-sync's tables), by table,
#: entity (``users``, ``organizations``, ``organization_memberships``) and reason. The process's: see the
#: module's docstring. Counted when the transaction that recorded the refusal commits, so a unit of work
#: rolled back and written again (a batch split, a retry) counts once.
MAPPED_ROWS_REFUSED = Counter("clerk_sync_mapped_rows_refused",
                              "Rows the app's mapped tables refused, by table, entity and reason: the change "
                              "applied to clerk-sync's tables only (the delivery's last_error says why).",
                              ["table", "entity", "reason"], registry=None)


#: The ``code`` label of ``clerk_sync_auth_refused_total``: the stable code of each refusal the authenticator raises
#: (:mod:`clerk_sync.errors`), and ``"other"`` for any other error. ``token_missing`` is not among them: a request
#: without a session is an anonymous one (a public page's visitor), counted in neither series.
AUTH_REFUSAL_CODES = (*(error.code for error in (
    errors.TokenMalformed, errors.TokenAlgorithmNotAllowed, errors.TokenSignatureInvalid,
    errors.TokenKeyUnknown, errors.TokenKeysUnavailable,  # JWKS: a kid no key held has, or no key at all (503)
    errors.TokenExpired, errors.TokenNotYetValid, errors.TokenIssuedInFuture,  # the clock's codes
    errors.TokenIssuerInvalid, errors.TokenAuthorizedPartyInvalid, errors.TokenClaimMissing, errors.TokenError,
    errors.SessionRevoked, errors.SessionPending,
    errors.SessionUserBanned, errors.UserLocked, errors.UserDeprovisioned, errors.ImpersonationEnded,  # blocked
    errors.CrossSiteRequest, errors.AccessDenied, errors.StoreError,  # (StoreError: the deny list unreadable, 503)
)), "other")

#: The ``outcome`` label of ``clerk_sync_jwks_fetches_total``: ``ok`` (keys read), ``empty`` (a JWKS with no RSA
#: signing key), ``invalid`` (200 but not JSON), ``refused`` (a 3xx or 4xx: the URL or the secret key is wrong),
#: ``unavailable`` (a 5xx), ``unreachable`` (no answer: connection, timeout, a request that could not be sent).
JWKS_FETCH_OUTCOMES = ("ok", "empty", "invalid", "refused", "unavailable", "unreachable")


def mapped_rows_refused(table: str, entity: str, reason: str, n: int = 1) -> None:
    """Count ``n`` rows ``table`` refused (``reason``: one of :data:`MAPPED_REFUSAL_REASONS`). Never raises:
    it is called as the refusing transaction commits."""
    try:
        MAPPED_ROWS_REFUSED.labels(table=table, entity=entity,
                                   reason=reason if reason in MAPPED_REFUSAL_REASONS else "database").inc(n)
    except Exception:  # a metric must never fail a write
        log.debug("metrics_refusal_count_failed", exc_info=True)


def event_type_label(event_type: str) -> str:
    """The ``type`` label: the event type when it is a known one, else ``"other"``."""
    return event_type if event_type in KNOWN_EVENT_TYPES else "other"


@dataclass(frozen=True, slots=True)
class DatabaseSnapshot:
    """What the database says about freshness, read at scrape time (``None``: nothing yet)."""

    newest_delivery_at: float | None  # unix seconds, the newest delivery applied/skipped/ignored
    failed_backlog: int
    reconcile_last_success_at: float | None  # unix seconds
    reconcile_last_drift: dict[str, int] = field(default_factory=dict)  # created/updated/deleted
    hook_jobs: dict[str, int] = field(default_factory=dict)  # the outbox by status: pending, running, dead
    hook_oldest_pending_at: float | None = None  # unix seconds, when the oldest due pending job was queued
    hook_oldest_pending_hook: str | None = None  # that job's hook (a dispatcher claims only its own hooks' jobs)
    # the schema has what this release needs (at its migrations' head, or newer): /readyz's migrations_current;
    # None: not read (the series is left out)
    schema_current: bool | None = None
    # False: the database answered but lacks the tables the other values are read from (a schema older than the
    # hooks outbox, an empty database being restored): only database_up and schema_current are exported
    tables_read: bool = True
    # unix seconds, when the last completed reconcile run started: drift it found was missed before then (a change
    # it repaired in flight has its delivery after the start, however long the run took)
    reconcile_last_started_at: float | None = None


class _DatabaseCollector(Collector):
    """Series read from the database, cached for ``ttl_s`` so a scrape storm costs one query.

    A failed read is cached too, and only one scrape reads at a time: the others answer with the last
    result at once. Otherwise a database that accepts connections but does not answer makes concurrent
    scrapes (two Prometheus servers) wait out the connect timeout one after the other, past the scrape
    timeout, and ``clerk_sync_database_up`` goes absent instead of 0."""

    def __init__(self, probe: Callable[[], DatabaseSnapshot], ttl_s: float, clock: Callable[[], float],
                 on_error: Callable[[], None]) -> None:
        self._probe, self._ttl_s, self._clock, self._on_error = probe, ttl_s, clock, on_error
        self._lock = threading.Lock()
        self._read_at: float | None = None  # when the last read (or failure) happened
        self._cached: DatabaseSnapshot | None = None  # its result (None: it failed)

    def snapshot(self) -> DatabaseSnapshot | None:
        now = self._clock()
        if self._read_at is not None and now - self._read_at < self._ttl_s:
            return self._cached
        first = self._read_at is None
        # The first read waits for one in progress (there is nothing to answer with yet); later ones don't.
        if not self._lock.acquire(blocking=first):
            return self._cached
        try:
            now = self._clock()
            if self._read_at is not None and now - self._read_at < self._ttl_s:
                return self._cached  # read by the scrape this one waited for
            try:
                self._cached = self._probe()
            except Exception:  # the database is down: say so, keep /metrics answering
                self._cached = None
                self._on_error()
            self._read_at = self._clock()
            return self._cached
        finally:
            self._lock.release()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        up = GaugeMetricFamily("clerk_sync_database_up", "1 when the last scrape-time database read worked.")
        up.add_metric([], 0.0 if snap is None else 1.0)
        yield up
        if snap is None:
            return
        if snap.schema_current is not None:
            schema = GaugeMetricFamily("clerk_sync_schema_current",
                                       "1 when the database's schema has what this release needs (its migrations' "
                                       "head, or newer); 0 while `clerk-sync migrate` is due (deliveries answer 503).")
            schema.add_metric([], 1.0 if snap.schema_current else 0.0)
            yield schema
        if not snap.tables_read:
            return
        backlog = GaugeMetricFamily("clerk_sync_failed_deliveries", "Deliveries stored as failed (replay them).")
        backlog.add_metric([], float(snap.failed_backlog))
        yield backlog
        # 0 when nothing was ever delivered: an absent series would keep the "no deliveries while drift"
        # alert silent on exactly the install whose endpoint never worked.
        newest = GaugeMetricFamily("clerk_sync_newest_delivery_timestamp_seconds",
                                   "When the newest delivery that was applied, skipped or ignored arrived "
                                   "(0: none yet).")
        newest.add_metric([], snap.newest_delivery_at or 0.0)
        yield newest
        if snap.reconcile_last_success_at is not None:
            last = GaugeMetricFamily("clerk_sync_reconcile_last_success_timestamp_seconds",
                                     "When the last completed reconcile run finished.")
            last.add_metric([], snap.reconcile_last_success_at)
            yield last
            if snap.reconcile_last_started_at is not None:
                started = GaugeMetricFamily("clerk_sync_reconcile_last_started_timestamp_seconds",
                                            "When the last completed reconcile run started.")
                started.add_metric([], snap.reconcile_last_started_at)
                yield started
            drift = GaugeMetricFamily("clerk_sync_reconcile_last_drift",
                                      "Rows the last completed reconcile run repaired, by action.", labels=["action"])
            for action in ("created", "updated", "deleted"):
                drift.add_metric([action], float(snap.reconcile_last_drift.get(action, 0)))
            yield drift
        yield from _hook_backlog(snap)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # values need the database: never read them at registration


def _hook_backlog(snap: DatabaseSnapshot) -> Iterator[Metric]:
    """The hooks outbox: jobs by status (dead ones wait for ``clerk-sync hooks retry|purge``), and the
    oldest pending one (a dispatcher that stopped, or cannot keep up)."""
    jobs = GaugeMetricFamily("clerk_sync_hook_jobs", "Queued hook jobs by status (pending, running, dead).",
                             labels=["status"])
    for status in ("pending", "running", "dead"):
        jobs.add_metric([status], float(snap.hook_jobs.get(status, 0)))
    yield jobs
    if snap.hook_oldest_pending_at is not None:
        oldest = GaugeMetricFamily("clerk_sync_hook_oldest_pending_timestamp_seconds",
                                   "When the oldest due hook job (pending, not waiting on a retry "
                                   "backoff) was queued.")
        oldest.add_metric([], snap.hook_oldest_pending_at)
        yield oldest


class Metrics:
    """All of clerk-sync's series, on this instance's own registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._clock = clock
        r = self.registry
        self.events = Counter("clerk_sync_webhook_events", "Webhook deliveries by event type and outcome.",
                              ["type", "status"], registry=r)
        self.latency = Histogram("clerk_sync_webhook_seconds", "Time to verify, store and apply one delivery.",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.apply_lag = Histogram("clerk_sync_apply_lag_seconds",
                                   "Applied-at minus the event's own timestamp, for applied or skipped deliveries.",
                                   buckets=_LAG_BUCKETS, registry=r)
        self.refused = Counter("clerk_sync_webhook_refused", "Deliveries refused with a 4xx (nothing written).",
                               ["code"], registry=r)
        self.unavailable = Counter("clerk_sync_webhook_unavailable",
                                   "Deliveries answered 503 (database unavailable); Svix retries them.", registry=r)
        self.parent_not_there = Counter(
            "clerk_sync_webhook_parent_not_there", "Deliveries answered 503 because a row they refer to in the "
            "app's mapped tables (a membership's organization or user) has not arrived yet; Svix retries them, "
            "not a database failure.", registry=r)
        self.db_errors = Counter("clerk_sync_db_errors", "Database errors by operation.", ["operation"], registry=r)
        self.jit = Counter("clerk_sync_jit_fetches", "Just-in-time user fetches from Clerk by outcome "
                           "('throttled': none made, that user was fetched within the refresh interval).",
                           ["outcome"], registry=r)
        self.api_requests = Counter("clerk_sync_clerk_api_requests",
                                    "Clerk Backend API requests by endpoint template and HTTP status ('error': none).",
                                    ["endpoint", "status"], registry=r)
        self.api_rate_limited = Counter("clerk_sync_clerk_api_rate_limited",
                                        "Clerk Backend API answers 429 Too Many Requests.", ["endpoint"], registry=r)
        # Across workers (multiprocess mode): open in any live worker; the local budgets add up.
        self.breaker_open = Gauge("clerk_sync_clerk_api_circuit_open",
                                  "1 while the Clerk API circuit breaker refuses calls (0 again once its reset "
                                  "time has passed: the next call goes through as a probe).", registry=r,
                                  multiprocess_mode="livemax")
        # Made when a client with a local budget is watched (watch_clerk_client): until then, and with a shared
        # (Redis) budget, the series has no sample rather than a 0 that reads as an exhausted budget.
        self.budget_tokens: Gauge | None = None
        self._read_at_scrape: list[tuple[Gauge, Callable[[], float]]] = []
        self._refresher: threading.Thread | None = None
        self._closed = threading.Event()
        self.reconcile_runs = Counter("clerk_sync_reconcile_runs", "Reconcile runs by result.", ["result"],
                                      registry=r)
        self.reconcile_drift = Counter("clerk_sync_reconcile_drift",
                                       "Drift reconcile repaired, by table and action (not dry runs).",
                                       ["entity", "action"], registry=r)
        self.pruned = Counter("clerk_sync_pruned_rows", "Rows retention redacted, deleted, cleared or erased "
                              "(audit_ips: audit rows whose IP it cleared).",
                              ["action"], registry=r)
        self.hook_runs = Counter("clerk_sync_hook_runs",
                                 "Hook handler runs by hook and outcome (ok, retry, dead, lost); dead also counts "
                                 "the jobs a claim marked dead unrun (lease expired on their last attempt, or an "
                                 "unreadable payload).",
                                 ["hook", "outcome"], registry=r)
        self.hook_seconds = Histogram("clerk_sync_hook_seconds", "Time one hook handler run took, by hook.",
                                      ["hook"], buckets=_HOOK_BUCKETS, registry=r)
        self.hook_overdue = Counter("clerk_sync_hook_overdue",
                                    "Hook handler runs that outlived their hook's timeout_s (the run's outcome "
                                    "is counted in clerk_sync_hook_runs when it ends).", ["hook"], registry=r)
        self.hook_overdue_running = Gauge(
            "clerk_sync_hook_overdue_running", "Hook handler runs past their hook's timeout_s still running now (or "
            "ended, their outcome not yet recorded), by hook: their jobs stay claimed.", ["hook"], registry=r,
            multiprocess_mode="livesum")
        self.console_sign_in_failures = Counter(
            "clerk_sync_console_sign_in_failures", "Operator console sign-ins refused, by how they came (form, "
            "bearer, link: a sign-in link's token) and reason (wrong_token: a wrong operator token or a forged "
            "session token; throttled: answered 429 without checking, too many wrong ones from that address).",
            ["via", "reason"], registry=r)
        self.auth_authenticated = Counter(
            "clerk_sync_auth_authenticated", "Requests whose session token verified and whose user is not blocked "
            "(counted once a request, in the app's process, by every face).", registry=r)
        self.auth_refusals = Counter(
            "clerk_sync_auth_refused", "Requests whose session was refused, by the refusal's code (token_expired, "
            "token_not_active_yet, token_iat_in_the_future: this host's clock?; token_key_unknown: the JWKS; "
            "session_revoked, session_user_banned, user_locked...; a public page serves them as anonymous).",
            ["code"], registry=r)
        self.jwks_fetches = Counter("clerk_sync_jwks_fetches", "JWKS fetches by outcome (ok, empty, invalid, refused, "
                                    "unavailable, unreachable).", ["outcome"], registry=r)
        # Bound now, so each series exists at 0 (an alert's ratio has both sides) and the per-request cost is one inc.
        self._auth_refused_children = {code: self.auth_refusals.labels(code=code) for code in AUTH_REFUSAL_CODES}
        self._jwks_children = {outcome: self.jwks_fetches.labels(outcome=outcome) for outcome in JWKS_FETCH_OUTCOMES}
        r.register(MAPPED_ROWS_REFUSED)  # (the process's: see the module's docstring)
        self.mapped_refused = MAPPED_ROWS_REFUSED
        self._database: _DatabaseCollector | None = None
        # Labelled children of the per-delivery and per-job series, by label values: ``labels()`` costs a
        # lock and a dict lookup by joined strings on every call (~2 µs, twice per delivery or job).
        self._event_children: dict[tuple[str, str], Any] = {}
        self._hook_children: dict[tuple[str, str], tuple[Any, Any]] = {}

    # -- webhook path ---------------------------------------------------------------------------
    def observe(self, event_type: str, status: str, seconds: float, *, event_ms: int | None = None) -> None:
        """One delivery's outcome; ``event_ms`` (the envelope timestamp) feeds the apply-lag histogram."""
        key = (event_type_label(event_type), status)  # bounded: known types and "other"
        child = self._event_children.get(key)
        if child is None:
            child = self._event_children[key] = self.events.labels(type=key[0], status=status)
        child.inc()
        self.latency.observe(seconds)
        if event_ms is not None and status in _APPLIED:
            self.apply_lag.observe(max(0.0, self._clock() - event_ms / 1000.0))

    # -- hooks (the dispatcher calls this; see clerk_sync.hooks) ----------------------------------
    def hook_ran(self, hook: str, outcome: str, seconds: float) -> None:
        """One handler run: ``outcome`` is ok, retry (failed, queued again), dead (failed for good) or lost
        (failed after its lease ran out: another dispatcher has the job)."""
        children = self._hook_children.get((hook, outcome))
        if children is None:
            children = self._hook_children[(hook, outcome)] = (self.hook_runs.labels(hook=hook, outcome=outcome),
                                                                self.hook_seconds.labels(hook=hook))
        children[0].inc()
        children[1].observe(seconds)

    def hook_dead_unrun(self, hook: str) -> None:
        """A job of ``hook`` a claim marked dead instead of running it (lease expired on its last attempt, or a
        payload that cannot be read): counted as a dead run, with no duration."""
        self.hook_runs.labels(hook=hook, outcome="dead").inc()

    def hook_went_overdue(self, hook: str) -> None:
        """A handler run outlived its hook's ``timeout_s``: its dispatcher went on without it."""
        self.hook_overdue.labels(hook=hook).inc()

    def hook_overdue_now(self, hook: str, delta: int) -> None:
        """``delta`` runs of ``hook`` went overdue (1) or were recorded once ended (-1): the gauge of those
        overdue now, summed over a process's dispatchers."""
        self.hook_overdue_running.labels(hook=hook).inc(delta)

    # -- authentication (the authenticator and the JWKS key source call these; see clerk_sync.auth) -------
    def authenticated(self) -> None:
        """One request whose session was accepted."""
        self.auth_authenticated.inc()

    def auth_refused(self, code: str) -> None:
        """One request whose session was refused, with the error's ``code`` (``"other"`` when not a known one)."""
        children = self._auth_refused_children
        (children.get(code) or children["other"]).inc()

    def jwks_fetched(self, outcome: str) -> None:
        """One JWKS fetch ended with ``outcome`` (one of :data:`JWKS_FETCH_OUTCOMES`)."""
        self._jwks_children[outcome].inc()

    # -- Clerk API (the hook the client calls; see clerk_api) ----------------------------------
    def api_call(self, endpoint: str, status: int | None) -> None:
        self.api_requests.labels(endpoint=endpoint, status=str(status) if status is not None else "error").inc()
        if status == 429:
            self.api_rate_limited.labels(endpoint=endpoint).inc()

    def watch_clerk_client(self, *, breaker_open: Callable[[], bool],
                           budget_tokens: Callable[[], float] | None = None) -> None:
        """Read the breaker (``breaker_open``: whether it refuses calls now) and the budget, when local, at
        scrape time; the last client watched wins. Without a local budget the budget series has no sample
        (outside multiprocess mode, whose files cannot drop one, a later client without one removes it)."""
        read: list[tuple[Gauge, Callable[[], float]]] = [(self.breaker_open, lambda: 1.0 if breaker_open() else 0.0)]
        if budget_tokens is not None:
            read.append((self._budget_gauge(), budget_tokens))
        elif self.budget_tokens is not None and not _multiprocess():
            self.registry.unregister(self.budget_tokens)
            self.budget_tokens = None
        for gauge, fn in read:
            gauge.set_function(fn)
        self._read_at_scrape = read
        if _multiprocess() and self._refresher is None:
            # Multiprocess mode reads every worker's file, not functions: each worker writes its own values
            # every second (a scrape reaches one worker; at scrape time only that one's would be current).
            self._start_refresher()
            # A fork (gunicorn --preload builds the app, and this client, before forking its workers) keeps no
            # thread: each child starts its own, or its gauges would stay as the parent last wrote them.
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _restart_in_child(ref))

    def _budget_gauge(self) -> Gauge:
        if self.budget_tokens is None:
            self.budget_tokens = Gauge("clerk_sync_clerk_api_budget_tokens",
                                       "Requests the local Clerk API budget allows right now.", registry=None,
                                       multiprocess_mode="livesum")
            self.registry.register(self.budget_tokens)
        return self.budget_tokens

    def _start_refresher(self) -> None:
        # The thread holds this object weakly: an app dropped without stop() (a test suite's many app factories)
        # is collected, its store and connections with it, and the thread ends at its next tick (review).
        self._refresher = threading.Thread(target=_refresh, args=(weakref.ref(self), self._closed),
                                           name="clerk-sync-metrics", daemon=True)
        self._refresher.start()

    def _forked(self) -> None:
        """In a forked child: a refresher of its own (not one the parent's close() had stopped)."""
        if self._refresher is not None and not self._closed.is_set():
            self._closed = threading.Event()  # (the parent's may hold the dead thread's waiter)
            self._start_refresher()


    def _write_watched(self) -> None:
        for gauge, fn in self._read_at_scrape:
            try:
                value = fn()  # read outside the lock: a fork never waits on the breaker's or budget's own locks
                with _WRITING:
                    gauge.set(value)
            except Exception:  # a metric must never take a worker down
                log.debug("metrics_refresh_failed", exc_info=True)

    def stop(self) -> None:
        """An app torn down (``ClerkSyncState.close()``, its Clerk client closed): the thread writing its
        gauges stops; this process's values stay in the multiprocess files (other apps of it write there)."""
        self._closed.set()

    def close(self) -> None:
        """A worker that ends (``serve --workers``): its live gauges leave the sums, its thread stops."""
        self.stop()
        if _multiprocess():
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    # -- reconcile ------------------------------------------------------------------------------
    def reconciled(self, result: str, drift: dict[str, dict[str, int]]) -> None:
        """A finished run: ``drift`` maps table -> {created, updated, deleted}."""
        self.reconcile_runs.labels(result=result).inc()
        for entity, counts in drift.items():
            for action, n in counts.items():
                if n:
                    self.reconcile_drift.labels(entity=entity, action=action).inc(n)

    # -- database-backed series -----------------------------------------------------------------
    def watch_database(self, probe: Callable[[], DatabaseSnapshot], *, ttl_s: float = 5.0,
                       clock: Callable[[], float] = time.monotonic) -> None:
        """Expose ``probe()``'s snapshot at scrape time (cached ``ttl_s``); a second call replaces the first."""
        if self._database is not None:
            self.registry.unregister(self._database)
        self._database = _DatabaseCollector(probe, ttl_s, clock,
                                            lambda: self.db_errors.labels(operation="metrics").inc())
        self.registry.register(self._database)

    def render(self) -> bytes:
        """The exposition text; with ``PROMETHEUS_MULTIPROC_DIR`` set, every worker's values summed."""
        if not _multiprocess():
            return generate_latest(self.registry)
        self._write_watched()
        _forget_dead_workers()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if self._database is not None:  # read from the database: the same in every worker
            registry.register(self._database)
        return generate_latest(registry)


def _forget_dead_workers() -> None:
    """Take the live gauges of workers that died without :meth:`Metrics.close` (SIGKILL: uvicorn's
    supervisor after a missed health ping, the OOM killer) out of the sums: otherwise a dead worker's
    last breaker state (an open breaker pages) and its budget stay in every scrape until a restart."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:  # gauge_livemax_<pid>.db, gauge_livesum_<pid>.db
        if not name.startswith("gauge_live") or not name.endswith(".db"):
            continue
        pid_text = name[:-3].rpartition("_")[2]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):  # another worker removed it first
            multiprocess.mark_process_dead(int(pid_text), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user
        return True
    return True
