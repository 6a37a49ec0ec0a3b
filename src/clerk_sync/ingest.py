"""The webhook path, framework-free: verify -> parse -> one transaction (inbox row + apply).

``WebhookProcessor.process(headers, body)`` is what every integration calls. It raises
:class:`~clerk_sync.errors.WebhookError` subclasses for deliveries to refuse (nothing written) and
:class:`~clerk_sync.errors.StoreError` for transient database failures (answer 5xx: Svix retries).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
import structlog

from clerk_sync._limits import CLERK_ID_CHARS, show
from clerk_sync._time import as_utc
from clerk_sync.changes import Event
from clerk_sync.engine import (
    DeliveryPlan,
    DeliveryStatus,
    Entity,
    Tombstone,
    Upsert,
    delivery_reason,
    membership_parents,
    membership_to_repair,
    person_named,
    plan_delivery,
    touches,
    user_named,
)
from clerk_sync.errors import (
    ClerkSyncError,
    MigrationPending,
    ParentNotThere,
    PayloadError,
    PayloadTooLarge,
    StoreDataError,
    StoreError,
    WebhookError,
    WrongInstance,
)
from clerk_sync.events import Envelope, MembershipRecord, instance_mismatch, parse_envelope
from clerk_sync.metrics import Metrics
from clerk_sync.retention import redact_payload, settle_if_stored_redacted
from clerk_sync.store import OneStatement, Store, Writer
from clerk_sync.tables import webhook_events
from clerk_sync.tracing import delivery_span
from clerk_sync.webhooks import WebhookVerifier

__all__ = ["Outcome", "ReplayReport", "WebhookProcessor", "apply_envelope", "dismiss_failed", "replay_deliveries",
           "replay_one"]

log = structlog.get_logger("clerk_sync.webhook")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one delivery: applied, skipped (stale/no-op), ignored, failed or duplicate."""

    svix_id: str
    event_type: str
    status: DeliveryStatus
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """Counts of a ``replay`` run by resulting status (the status each delivery is stored with after it).

    ``left``: of those, the deliveries that were not ``failed`` and whose replay changed nothing (stale: the rows
    hold their version or a newer one; or their payload was redacted), by the status they kept. A replay never
    relabels them (an applied delivery replayed is stale, and recording ``skipped`` would rewrite the history the
    console's filters, the metrics and incident reviews read). ``events``: the deliveries (of types clerk-sync does
    not mirror, stored ``ignored`` or ``failed`` until now) that queued jobs for the hooks naming their types
    (``with_hooks`` only)."""

    total: int
    by_status: dict[str, int]
    left: dict[str, int] = field(default_factory=dict)
    events: int = 0

    def summary(self) -> str:
        """The commands' first line: ``replayed 3 deliveries: 2 applied, 1 failed`` (every face's)."""
        by_status = ", ".join(f"{n} {said!s}" for said, n in sorted(self.by_status.items()))
        events = f"; {self.events} queued for the hooks naming their event types" if self.events else ""
        return f"replayed {self.total} deliveries" + (f": {by_status}" if by_status else "") + events

    @property
    def left_said(self) -> str:
        """``left`` as the commands say it: ``2 already applied, 1 already skipped``."""
        return ", ".join(f"{n} already {kept}" for kept, n in sorted(self.left.items()))


class WebhookProcessor:
    """Verifies and applies Clerk deliveries; one instance per service, shared across requests."""

    def __init__(
        self,
        store: Store,
        verifier: WebhookVerifier,
        *,
        instance_id: str | None = None,
        max_body_bytes: int = 1024 * 1024,
        metrics: Metrics | None = None,
        log_level: str = "DEBUG",
        summary_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        refused_warning_s: float = 60.0,
    ) -> None:
        self.store = store
        self.verifier = verifier
        self.instance_id = instance_id
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics or Metrics()
        # The per-delivery line's level. DEBUG by default: at INFO the line cost ~10 % of the service's
        # throughput (BENCHMARKS.md, issue 13); the inbox keeps every delivery anyway, and the summary
        # line says at INFO what went through.
        self.log_level = logging.getLevelNamesMapping()[log_level.upper()]
        self._summary = _Summary(summary_s, clock) if summary_s > 0 else None
        # Refusals that may be an outage (a rotated secret refuses every delivery) at WARNING, rate limited:
        # a log at WARNING said nothing of them (their per-delivery line is INFO), a forged flood not a line each
        self._refusals = _RefusalWarnings(refused_warning_s, clock)

    def process(self, headers: Mapping[str, str], body: bytes) -> Outcome:
        """Verify, parse and apply one delivery in one transaction."""
        started, started_ns = time.perf_counter(), time.time_ns()
        svix_id, envelope = self.verify_and_parse(headers, body)
        outcome = self.apply_alone(svix_id, envelope)
        self.observe(envelope, outcome, started, started_ns)
        return outcome

    def verify_and_parse(self, headers: Mapping[str, str], body: bytes) -> tuple[str, Envelope]:
        """The checks that need no database (size, signature, shape, instance); raises WebhookError."""
        if len(body) > self.max_body_bytes:
            raise PayloadTooLarge(f"body is {len(body)} bytes, the limit is {self.max_body_bytes}")
        svix_id = self.verifier.verify(headers, body)
        envelope = parse_envelope(body, received_ms=self._received_ms)
        if self.instance_id and (other := instance_mismatch(envelope.raw, self.instance_id)) is not None:
            raise WrongInstance(f"event from instance {show(other)}, expected {self.instance_id!r} (CLERK_INSTANCE_ID)")
        return svix_id, envelope

    def _received_ms(self) -> int:
        return int(self.store.now().timestamp() * 1000)

    def apply_alone(self, svix_id: str, envelope: Envelope) -> Outcome:
        """Apply a verified delivery in its own transaction (a value the database refuses: stored failed)."""
        try:
            return self.store.run(lambda writer: self.apply_in(writer, svix_id, envelope))
        except StoreDataError as exc:
            return self._store_refused(svix_id, envelope, exc)
        except (ClerkSyncError, sa.exc.SQLAlchemyError):
            raise  # a transient failure: 503, Svix retries
        except Exception as exc:  # app code on the apply path (a mapping's compute hook) refused this event
            log.exception("apply_crashed", svix_id=svix_id, event_type=envelope.type)
            # Its type only: app code's message may quote the person's data (a KeyError names the missing
            # key), and last_error, the delivery's log line and its span outlive an erasure; the traceback
            # is in the apply_crashed line above
            return self._store_refused(svix_id, envelope, StoreDataError(
                f"apply raised {type(exc).__name__} (its traceback: the apply_crashed log line)"))

    def refused(self, exc: ClerkSyncError, claimed: str | None) -> None:
        """Log and count a delivery answered with an error (every framework's webhook endpoint): a refusal
        (4xx, nothing written) by its code, a database failure (503, Svix retries) as unavailable, a row of the
        app's tables waiting for its parent (503, Svix retries: :class:`~clerk_sync.errors.ParentNotThere`) apart.
        Never raises (the answer stays the refusal's, see :meth:`observe`)."""
        try:
            self._refused(exc, claimed)
        except Exception as failure:
            _telemetry_failed("refused", failure)

    def _refused(self, exc: ClerkSyncError, claimed: str | None) -> None:
        if isinstance(exc, WebhookError):
            # A refusal that may be an outage is said at WARNING, throttled (webhooks_refused): its line per
            # delivery is DEBUG, or a flood of forged requests wrote a line each at the default level (a soak
            # test). The id is the sender's: cut to a length a log line holds.
            emit = log.debug if exc.code in _REFUSAL_ADVICE else log.info
            emit("webhook_refused", svix_id=claimed if claimed is None or len(claimed) <= 100 else
                 f"{claimed[:100]}... ({len(claimed)} characters)", code=exc.code, reason=str(exc))
            self.metrics.refused.labels(code=exc.code).inc()
            if exc.code in _REFUSAL_ADVICE:
                self._refusals.count(exc.code, str(exc))
        elif isinstance(exc, ParentNotThere):  # an ordering Svix's retry heals, not a database failure
            log.info("webhook_parent_not_there", svix_id=claimed, reason=str(exc))
            self.metrics.parent_not_there.inc()
        elif isinstance(exc, MigrationPending):  # not a database failure: migration_retry/_refused say why
            log.debug("webhook_migration_pending", svix_id=claimed, reason=str(exc))
        elif isinstance(exc, StoreError):
            log.warning("webhook_store_error", svix_id=claimed, reason=str(exc))
            self.metrics.db_errors.labels(operation="webhook").inc()
            self.metrics.unavailable.inc()

    def observe(self, envelope: Envelope, outcome: Outcome, started: float, started_ns: int) -> None:
        """Metrics, the per-delivery log line and the trace span of a committed delivery. Never raises:
        the delivery is committed, so its answer is a 2xx whatever the app's telemetry does (a span
        processor or a log processor that raises would otherwise make Svix retry it)."""
        try:
            self._observe(envelope, outcome, started, started_ns)
        except Exception as exc:
            _telemetry_failed("observe", exc)

    def _observe(self, envelope: Envelope, outcome: Outcome, started: float, started_ns: int) -> None:
        seconds = time.perf_counter() - started
        self.metrics.observe(envelope.type, outcome.status, seconds, event_ms=envelope.timestamp_ms)
        failed = outcome.status == DeliveryStatus.FAILED  # stored for a replay after a fix: always said
        level = max(self.log_level, logging.WARNING) if failed else self.log_level
        # By the level's own method: structlog's generic BoundLogger has no log(level, ..) (it raised).
        getattr(log, _level_method(level))(
            "webhook", svix_id=outcome.svix_id, event_type=envelope.type, status=outcome.status,
            error=outcome.error, event_ms=envelope.timestamp_ms, seconds=round(seconds, 6))
        if self._summary is not None:
            self._summary.count(outcome.status)
        delivery_span(started_ns, outcome.svix_id, envelope.type, outcome.status, outcome.error)

    def flush_summary(self) -> None:
        """Log the summary line of the deliveries counted since the last one, and the refusals not said yet
        (``serve`` calls it when it stops, so the last seconds before a shutdown are said too)."""
        if self._summary is not None:
            self._summary.flush()
        self._refusals.flush()

    def _store_refused(self, svix_id: str, envelope: Envelope, exc: StoreDataError) -> Outcome:
        """The DB refused a value for good: keep the delivery as ``failed`` (replayable after a fix)
        instead of answering 503 forever. Every value is checked before it reaches the database
        (``clerk_sync._limits``), so this only happens when a table differs from ours (an app
        narrowed a column, added a constraint); the stored payload is always storable."""
        error = delivery_reason(str(exc), envelope.notes)
        person = user_named(envelope)
        with self.store.transaction() as writer:
            fresh = writer.record_delivery(
                svix_id, envelope.text, event_type=envelope.type,
                instance_id=envelope.instance_id, event_timestamp=envelope.timestamp_ms,
                status=DeliveryStatus.FAILED, error=error,
                unless_gone=None if person is None else (person, redact_payload(envelope.raw)),
            )
            if fresh and person is not None and settle_if_stored_redacted(writer, svix_id):
                return Outcome(svix_id, envelope.type, DeliveryStatus.SKIPPED, _SETTLED_ON_ARRIVAL)
        return Outcome(svix_id, envelope.type, DeliveryStatus.FAILED if fresh else DeliveryStatus.DUPLICATE, error)

    def apply_many_in(self, writer: Writer, deliveries: Sequence[tuple[str, Envelope]]) -> list[Outcome]:
        """:meth:`apply_in` for many deliveries in the caller's transaction; on PostgreSQL the upserts
        go to the database in one pipeline. A database error does not say which delivery caused it
        (run them one by one with :meth:`apply_in` to find out). As :meth:`apply_in`, a late event about a
        deleted or erased user is stored redacted (:meth:`forget_if_deleted`, for the pipelined ones too)."""
        done = self.pipelined_in(writer, deliveries)
        for i, outcome in enumerate(done):
            if outcome is not None:
                self.forget_if_deleted(writer, outcome, deliveries[i][1])
        return [outcome or self.apply_in(writer, *deliveries[i]) for i, outcome in enumerate(done)]

    def pipelined_in(self, writer: Writer, deliveries: Sequence[tuple[str, Envelope]]) -> list[Outcome | None]:
        """The part of :meth:`apply_many_in` that goes in one pipeline (PostgreSQL, psycopg: the
        upserts); None for the deliveries left to :meth:`apply_in`."""
        plans = [plan_delivery(envelope) for _, envelope in deliveries]
        # What the pipeline cannot take (deletions) runs after it: a later delivery that depends on a row
        # such a delivery writes runs after it too, in order (else a stale upsert would apply before the
        # deletion it follows, or a membership before its user's deletion).
        fast: list[int] = []
        after: set[tuple[Entity, str]] = set()
        parent_deleted = False  # a user or organization deletion before: it cascades to the memberships the
        # rows hold, whose parents a later membership event may name differently (touches() sees the new ones)
        for i, plan in enumerate(plans):
            intent = plan.intent
            if intent is None:
                continue
            follows = bool(after and touches(intent) & after) or (
                parent_deleted and isinstance(intent, Upsert) and intent.entity is Entity.MEMBERSHIP)
            if writer.one_statement(intent) and not follows:
                fast.append(i)
            elif isinstance(intent, Upsert | Tombstone):
                after.add((intent.entity, intent.clerk_id))
                parent_deleted = parent_deleted or (
                    isinstance(intent, Tombstone) and intent.entity is not Entity.MEMBERSHIP)
        outcomes: list[Outcome | None] = [None] * len(deliveries)
        # The locks of what apply_in writes after the pipeline are taken in its pass (one order for all)
        piped = set(fast)
        then = [plan.intent for i, plan in enumerate(plans) if i not in piped
                and isinstance(plan.intent, Upsert | Tombstone)]
        # and the subjects of the unmirrored events it queues jobs for (queue_event takes each again: held)
        events = [k for (svix_id, envelope), plan in zip(deliveries, plans, strict=True)
                  if plan.status == DeliveryStatus.IGNORED for k in event_locks(writer, svix_id, envelope)]
        if fast or ((then or events) and writer.pipelines):  # (no pipeline: each apply_in takes its own)
            items: list[OneStatement] = []
            for i in fast:
                svix_id, envelope = deliveries[i]
                items.append((svix_id, envelope.text, envelope.type, envelope.instance_id, envelope.timestamp_ms,
                              plans[i].reason, plans[i].intent))  # type: ignore[arg-type]
            for i, status in zip(fast, writer.record_and_upsert_many(items, then=then, then_keys=events),
                                 strict=True):
                svix_id, envelope = deliveries[i]
                outcomes[i] = Outcome(svix_id, envelope.type, status or DeliveryStatus.DUPLICATE, plans[i].reason)
        return outcomes

    def apply_in(self, writer: Writer, svix_id: str, envelope: Envelope) -> Outcome:
        """Inbox row + apply inside the caller's transaction (the group committer runs many in one).

        Plan first (pure), so the inbox row is written once with its expected outcome; only a
        stale upsert (skipped) needs a second statement."""
        planned = _plan(writer, envelope)
        error = planned.reason
        refused = len(writer.refused)
        if planned.intent is not None and writer.one_statement(planned.intent):
            combined = writer.record_and_upsert(
                svix_id, envelope.text, event_type=envelope.type, instance_id=envelope.instance_id,
                event_timestamp=envelope.timestamp_ms, error=error, intent=planned.intent,  # type: ignore[arg-type]
            )
            outcome = self._noting_refusals(writer, refused, Outcome(
                svix_id, envelope.type, combined or DeliveryStatus.DUPLICATE, error))
            self.forget_if_deleted(writer, outcome, envelope)
            return outcome
        person = (person_named(envelope) if planned.status in _NAMING_KEPT
                  else user_named(envelope) if planned.status == DeliveryStatus.FAILED else None)
        fresh = writer.record_delivery(  # naming a user: stored redacted if that user is gone, in this statement
            svix_id, envelope.text, event_type=envelope.type, instance_id=envelope.instance_id,
            event_timestamp=envelope.timestamp_ms, status=planned.status, error=error,
            unless_gone=None if person is None else (person, redact_payload(envelope.raw)),
        )
        if not fresh:
            return Outcome(svix_id, envelope.type, DeliveryStatus.DUPLICATE)
        paid_by = payer_organization(envelope) if person is None and planned.status in _NAMING_KEPT else None
        if paid_by is not None:  # an organization pays: stored redacted if it is gone, before its event is queued
            writer.forget_payload_if_deleted(svix_id, Entity.ORGANIZATION, paid_by, redact_payload(envelope.raw))
        if planned.status == DeliveryStatus.IGNORED and writer.outbox is not None:  # (no hooks: no outbox)
            queue_event(writer, svix_id, envelope, person or paid_by)
        if (planned.status == DeliveryStatus.FAILED and person is not None
                and settle_if_stored_redacted(writer, svix_id)):  # (about a user gone already: nothing to replay)
            return Outcome(svix_id, envelope.type, DeliveryStatus.SKIPPED, _SETTLED_ON_ARRIVAL)
        status = planned.status_after(writer.apply(planned.intent) if planned.intent else True)
        if status != planned.status:
            writer.finish_delivery(svix_id, status, error)
        outcome = self._noting_refusals(writer, refused, Outcome(svix_id, envelope.type, status, error))
        if person is None and paid_by is None:
            self.forget_if_deleted(writer, outcome, envelope)
        return outcome

    @staticmethod
    def _noting_refusals(writer: Writer, since: int, outcome: Outcome) -> Outcome:
        """The delivery applied, and an app's mapped table refused its row (:meth:`Outbox.project`): its
        inbox row says so in ``last_error`` (the console lists it), the status stays what it is."""
        if len(writer.refused) == since or outcome.status == DeliveryStatus.DUPLICATE:
            return outcome
        error = writer.refusals_noted(since, outcome.error)
        writer.finish_delivery(outcome.svix_id, outcome.status, error)
        return Outcome(outcome.svix_id, outcome.event_type, outcome.status, error)

    @staticmethod
    def forget_if_deleted(writer: Writer, outcome: Outcome, envelope: Envelope) -> None:
        """A skipped upsert whose row is a tombstone (a retry arriving after ``users erase``), a membership
        deleted on arrival because its user or organization is (its ``public_user_data`` names the person) or
        deleted late (skipped: the erasure or the parent's deletion already tombstoned it), or another event
        about a deleted or erased user (a session's, ``email.created``, ``sms.created``, a billing event's
        payer), or a billing event an organization deleted pays (:func:`payer_organization`): keep its ids and
        versions for dedup, not the personal data it carries."""
        skipped = outcome.status == DeliveryStatus.SKIPPED
        if outcome.status in _NAMING_KEPT and (person := person_named(envelope)) is not None:
            writer.forget_payload_if_deleted(outcome.svix_id, Entity.USER, person, redact_payload(envelope.raw))
            return
        if outcome.status in _NAMING_KEPT and (paid_by := payer_organization(envelope)) is not None:
            writer.forget_payload_if_deleted(outcome.svix_id, Entity.ORGANIZATION, paid_by,
                                             redact_payload(envelope.raw))
            return
        if not skipped and not writer.deleted_with_parent:
            return  # (the common case: no statement, no re-planning)
        intent = _plan(writer, envelope).intent  # (a repaired membership too)
        if isinstance(intent, Upsert) and (skipped or (
                intent.entity is Entity.MEMBERSHIP and intent.clerk_id in writer.deleted_with_parent)):
            record = intent.record  # a membership refused because its user or organization was erased: theirs
            parents = ([(Entity.USER, record.user_clerk_id), (Entity.ORGANIZATION, record.organization_clerk_id)]
                       if isinstance(record, MembershipRecord) else [])
            writer.forget_payload_if_deleted(outcome.svix_id, intent.entity, record.clerk_id,
                                             redact_payload(envelope.raw), parents=parents)
        elif (skipped and isinstance(intent, Tombstone) and intent.entity is Entity.MEMBERSHIP
              and (named := membership_parents(envelope.data))):
            # A late organizationMembership.deleted: the erasure (or the parent's deletion) already tombstoned
            # the membership, and its public_user_data still names the person. Redacted if a parent is gone.
            (entity, clerk_id), *parents = named
            writer.forget_payload_if_deleted(outcome.svix_id, entity, clerk_id, redact_payload(envelope.raw),
                                             parents=parents)


# Outcomes whose stored payload is kept, redacted when the user it names is gone (``person_named``). A failed one
# is kept for its replay, whole unless the user it is about (``user_named``) is gone: a replay of an event about a
# deleted user would change nothing (retention redacts those stored before the deletion). A duplicate is not stored.
_NAMING_KEPT = frozenset({DeliveryStatus.APPLIED, DeliveryStatus.SKIPPED, DeliveryStatus.IGNORED})
# A failing delivery about a user deleted or erased before it came: stored redacted and settled (the reason
# the caller and the log see; the row's last_error is retention's, which names nobody either).
_SETTLED_ON_ARRIVAL = "skipped: its user was deleted or erased before it came, so it was stored redacted and settled"
_telemetry_said: set[tuple[str, type]] = set()  # (where, exception type) already logged in full


def _telemetry_failed(where: str, exc: Exception) -> None:
    """Say, by the standard library's logging (structlog may be what failed), that the app's telemetry
    raised: in full the first time for each place and exception type, then at DEBUG (not a line per
    delivery)."""
    first = (where, type(exc)) not in _telemetry_said
    _telemetry_said.add((where, type(exc)))
    with contextlib.suppress(Exception):
        logging.getLogger("clerk_sync.webhook").log(
            logging.WARNING if first else logging.DEBUG,
            "metrics, log line or trace span of a delivery raised %s (the delivery's answer is unchanged; "
            "check the app's logging and OpenTelemetry processors)", type(exc).__name__, exc_info=first)


def _level_method(level: int) -> str:
    """The logger method of the highest standard level at or below ``level`` (NOTSET and custom low
    levels: debug)."""
    for at_least, name in ((logging.CRITICAL, "critical"), (logging.ERROR, "error"), (logging.WARNING, "warning"),
                           (logging.INFO, "info")):
        if level >= at_least:
            return name
    return "debug"


class _Summary:
    """Counts outcomes and logs them at INFO (``event=webhooks``, one field per status) at most once per
    ``every_s``: the line that says what went through while the per-delivery lines are below the log
    level. Logged by the delivery that finds the last line ``every_s`` old, or none yet (no timer thread):
    so the first delivery after start or after a quiet period (a test event sent from Clerk's dashboard)
    is said at once, and under load one line a period counts the rest."""

    def __init__(self, every_s: float, clock: Callable[[], float]) -> None:
        self.every_s, self._clock = every_s, clock
        self._lock = threading.Lock()  # the event loop and the thread pool both observe deliveries
        self._counts: dict[str, int] = {}
        self._last: float | None = None  # when the last line was logged
        _SUMMARIES.add(self)  # said at interpreter exit too (WSGI servers have no shutdown hook to call)

    def count(self, status: DeliveryStatus) -> None:
        with self._lock:
            now = self._clock()
            self._counts[status.value] = self._counts.get(status.value, 0) + 1
            last = self._last
            if last is not None and now - last < self.every_s:
                return
            counts, self._counts, self._last = self._counts, {}, now
        self._say(counts, now, last)

    def flush(self) -> None:
        """Log what was counted since the last line, if anything (at shutdown: the last seconds too)."""
        with self._lock:
            now = self._clock()
            counts, self._counts, last, self._last = self._counts, {}, self._last, now
        if counts:
            self._say(counts, now, last)

    @staticmethod
    def _say(counts: dict[str, int], now: float, last: float | None) -> None:
        def say() -> None:
            # The line is about many deliveries, not the request that happens to log it (Flask and Django
            # bind the delivery's svix_id to the request's logging context); the app's own bindings stay.
            structlog.contextvars.unbind_contextvars("svix_id")
            log.info("webhooks", seconds=round(now - last, 1) if last is not None else 0.0,
                     deliveries=sum(counts.values()), **dict(sorted(counts.items())))

        contextvars.copy_context().run(say)  # the unbinding stays in the copy


# The refusals said at WARNING (rate limited), with what to check: those a sender may be failing on for every
# delivery. Not webhook_headers_missing: a request without Svix's headers is no delivery (a scanner, a probe).
_REFUSAL_ADVICE = {
    "webhook_signature_invalid": "no CLERK_WEBHOOK_SIGNING_SECRET matches: a secret rotated in the Clerk Dashboard "
                                 "(set the new one; during a rotation list both), this host's clock off (NTP), or "
                                 "requests not from Clerk; when every delivery is refused it is an outage",
    "wrong_instance": "signed by another Clerk instance than CLERK_INSTANCE_ID: check the endpoint and the setting",
    "payload_too_large": "bodies over CLERK_SYNC_MAX_BODY_BYTES are refused (Svix retries, then gives up): raise it "
                         "(on MySQL/MariaDB below max_allowed_packet: `clerk-sync doctor` checks)",
    "payload_invalid": "signed bodies that are not a Clerk event envelope",
    "body_timeout": "bodies not in within CLERK_SYNC_WEBHOOK_READ_TIMEOUT_S of their headers (answered 408, nothing "
                    "written): no Svix attempt is that slow, so a client holding connections (block it at the proxy "
                    "or firewall), or a proxy streaming bodies over a slow link (buffer them)",
}


class _RefusalWarnings:
    """Refusals at WARNING (``event=webhooks_refused``, per code: how many, the last reason, what to check),
    rate limited per code: the first at once, then at most one line per ``every_s`` counting those since the
    last line (said by the refusal that finds the last line ``every_s`` old, or by :meth:`flush`; no timer
    thread). ``every_s`` 0: a line per refusal."""

    def __init__(self, every_s: float, clock: Callable[[], float]) -> None:
        self.every_s, self._clock = every_s, clock
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, str]] = {}  # code -> (refused since its last line, the last reason)
        self._last: dict[str, float] = {}  # code -> when its last line was logged
        _SUMMARIES.add(self)  # the count not said yet is said at interpreter exit too

    def count(self, code: str, reason: str) -> None:
        with self._lock:
            now = self._clock()
            self._counts[code] = (self._counts.get(code, (0, ""))[0] + 1, reason)
            last = self._last.get(code)
            if last is not None and now - last < self.every_s:
                return
            (refused, reason), self._last[code] = self._counts.pop(code), now
        self._say(code, refused, reason, now, last)

    def flush(self) -> None:
        """Say the refusals counted since each code's last line, if any."""
        with self._lock:
            now = self._clock()
            counts, self._counts = self._counts, {}
            lasts = {code: self._last.get(code) for code in counts}
            self._last.update(dict.fromkeys(counts, now))
        for code, (refused, reason) in sorted(counts.items()):
            self._say(code, refused, reason, now, lasts[code])

    @staticmethod
    def _say(code: str, refused: int, reason: str, now: float, last: float | None) -> None:
        def say() -> None:
            structlog.contextvars.unbind_contextvars("svix_id")  # about many deliveries (see _Summary._say)
            log.warning("webhooks_refused", code=code, refused=refused,
                        seconds=round(now - last, 1) if last is not None else 0.0, last_reason=reason,
                        check=_REFUSAL_ADVICE[code])

        contextvars.copy_context().run(say)


_SUMMARIES: weakref.WeakSet[_Summary | _RefusalWarnings] = weakref.WeakSet()


@atexit.register
def _flush_summaries() -> None:
    """The last seconds before a process exits are said too: ``serve`` flushes in its lifespan, but Flask
    and Django (gunicorn, uWSGI workers) only offer interpreter exit."""
    for summary in list(_SUMMARIES):
        with contextlib.suppress(Exception):  # at exit the log's stream may already be closed: nothing to tell
            summary.flush()


def dismiss_failed(store: Store, svix_ids: Sequence[str], *, reason: str, by: str | None = None) -> list[str]:
    """Set aside ``failed`` deliveries that no fix can make apply (a payload Clerk will never send otherwise: an id
    too long for any column, a membership event whose organization id is not an id at all): they are stored
    ``ignored``, ``last_error`` saying who dismissed them, why, and the error they had, and each is audited
    (``delivery.dismissed``). ``doctor --freshness``, the failed-deliveries alert and ``replay`` stop counting
    them, and retention treats them as the other ignored ones. Only ``failed`` deliveries change (a delivery that
    applied since, or an id that is no delivery, is left alone); returns the ids that did, in the order given.
    ``by``: the Clerk id of the admin who dismissed them (None from the command line)."""
    from clerk_sync.auth.audit import AuditEntry, record_audit  # (a sibling service: only this path needs it)

    if not reason.strip():
        raise ValueError("say why these deliveries are dismissed (reason=...): it is kept with them and audited")
    e = webhook_events
    done: list[str] = []
    with store.transaction() as writer:
        for svix_id in dict.fromkeys(svix_ids):
            before = writer.conn.execute(sa.select(e.c.last_error, e.c.type).where(
                e.c.svix_id == svix_id, e.c.status == DeliveryStatus.FAILED.value)).first()
            if before is None:
                continue
            said = f"{_DISMISSED}{by or 'an operator'}: {reason.strip()} (it had failed: {before.last_error or '-'})"
            writer.conn.execute(e.update().where(e.c.svix_id == svix_id, e.c.status == DeliveryStatus.FAILED.value)
                                .values(status=DeliveryStatus.IGNORED.value, last_error=said))
            record_audit(writer, AuditEntry("delivery.dismissed", by, svix_id,
                                            details={"reason": reason.strip(), "type": before.type}))
            done.append(svix_id)
    return done


_DISMISSED = "dismissed by "  # how a dismissed delivery's last_error begins (:func:`dismiss_failed`)


def _dismissed(status: str, last_error: str | None) -> bool:
    """A delivery :func:`dismiss_failed` set aside (stored ``ignored``, its note first in ``last_error``)."""
    return status == DeliveryStatus.IGNORED and str(last_error or "").startswith(_DISMISSED)


def replay_deliveries(
    store: Store, *, status: str = "failed", since: datetime | None = None, with_hooks: bool = False
) -> ReplayReport:
    """Re-apply stored deliveries (e.g. ``failed`` ones after a fix), one transaction each.

    Payloads were verified when received, so no secret is needed. The store's hooks fire only
    ``with_hooks``: re-processing must not send the welcome mail twice. A delivery that was not ``failed``
    keeps its status when the replay changes nothing (:func:`replay_one`), counted in ``left``.
    """
    store = store if with_hooks else store.without_hooks()
    query = sa.select(webhook_events.c.svix_id).where(webhook_events.c.status == status)
    if since is not None:
        query = query.where(webhook_events.c.received_at >= since)
    with store.connect() as conn:
        ids = list(conn.execute(query.order_by(webhook_events.c.id)).scalars())
    counts: dict[str, int] = {}
    left: dict[str, int] = {}
    events = 0
    for svix_id in ids:
        _, result, written, queued = _replay(store, svix_id, None, only_failed=False, events=with_hooks)
        counts[result] = counts.get(result, 0) + 1  # plain strings: reports print and compare as text
        if not written:
            left[result] = left.get(result, 0) + 1
        events += queued
    return ReplayReport(len(ids), counts, left, events)


def replay_delivery(store: Store, svix_id: str, *,
                    audit: Callable[[Writer, DeliveryStatus], None] | None = None) -> DeliveryStatus:
    """Re-apply one stored delivery in its own unit of work (:meth:`Store.run`: written again without the
    app's tables if one of them rolled it back), ``audit``'s row in the same transaction. Still refused by
    the database: kept ``failed`` with the reason (and audited so). ``replay`` replays through here, the
    console and the Django admin through :func:`replay_if_failed`. Returns the status it is stored with
    after (one that was not failed keeps its own when the replay changed nothing: :func:`replay_one`)."""
    return DeliveryStatus(_replay(store, svix_id, audit, only_failed=False, events=False)[1])


def replay_if_failed(store: Store, svix_id: str, *,
                     audit: Callable[[Writer, DeliveryStatus], None] | None = None) -> tuple[bool, str]:
    """:func:`replay_delivery` only if the delivery is still ``failed`` when its transaction reads it (the row
    locked; SQLite has one writer): a double click or a second operator leaves an applied delivery as it is,
    nothing written. Returns (replayed, status)."""
    replayed, status, _, _ = _replay(store, svix_id, audit, only_failed=True, events=False)
    return replayed, status


def _replay(store: Store, svix_id: str, audit: Callable[[Writer, DeliveryStatus], None] | None, *,
            only_failed: bool, events: bool) -> tuple[bool, str, bool, bool]:
    """(replayed, the status stored after, whether the replay wrote the delivery's outcome, whether it queued
    jobs for the hooks naming its event type). ``events``: :func:`_replay_in`'s."""
    def still_failed(writer: Writer) -> str | None:
        """None when the delivery may be replayed, else its status ("gone": deleted since it was listed, by the
        prune or another operator; it raised, and a console's bulk replay stopped there with a 503, review)."""
        if not only_failed:
            return None
        e = webhook_events.c
        status = writer.conn.execute(sa.select(e.status).where(e.svix_id == svix_id).with_for_update()).scalar()
        return None if status == DeliveryStatus.FAILED else "gone" if status is None else str(status)

    def work(writer: Writer) -> tuple[bool, str, bool, bool]:
        current = still_failed(writer)
        if current is not None:
            return False, current, False, False
        status, written, queued = _replay_in(writer, svix_id, events=events)
        if audit is not None:
            audit(writer, status)
        return True, str(status), written, queued

    try:
        return store.run(work)
    except StoreDataError as exc:
        with store.transaction() as writer:
            current = still_failed(writer)
            if current is not None:
                return False, current, False, False
            e = webhook_events.c
            stored = writer.conn.execute(sa.select(e.status, e.last_error).where(e.svix_id == svix_id)).first()
            if stored is not None and _dismissed(*stored):  # refused again: stays dismissed, as in _replay_in
                if audit is not None:
                    audit(writer, DeliveryStatus.IGNORED)
                return True, DeliveryStatus.IGNORED.value, False, False
            writer.finish_delivery(svix_id, DeliveryStatus.FAILED, str(exc), count_attempt=True)
            if audit is not None:
                audit(writer, DeliveryStatus.FAILED)
        return True, DeliveryStatus.FAILED.value, True, False


_REDACTED_NOT_REPLAYED = ("not replayed: its payload was redacted (retention or erasure) to ids and versions, "
                          "nothing left to apply")


def replay_one(writer: Writer, svix_id: str) -> DeliveryStatus:
    """Re-apply one stored delivery inside the caller's transaction (so an audit row can share it);
    returns the status it is stored with after. :func:`replay_deliveries` runs it once per delivery.

    A delivery that was not ``failed`` keeps its status, error and attempts when the replay changes nothing
    (skipped: the rows hold its version or a newer one; ignored; its payload redacted): an applied delivery
    replayed is always stale, and recording that as ``skipped`` would relabel the history (the console's
    filters, the outcome metrics, an incident review). One that applies again, or fails, is recorded so."""
    return _replay_in(writer, svix_id, events=False)[0]


# A replay with one of these outcomes changed no row: a delivery that was not failed is left as it was
_CHANGED_NOTHING = frozenset({DeliveryStatus.SKIPPED, DeliveryStatus.IGNORED})


def _replay_in(writer: Writer, svix_id: str, *, events: bool) -> tuple[DeliveryStatus, bool, bool]:
    """:func:`replay_one`, whether the delivery's outcome was written (False: left as it was), and whether jobs
    were queued for the hooks naming its event type (an unmirrored type, :func:`queue_event`; only when the
    writer has an outbox, i.e. the store's hooks).

    Those jobs are queued as a mirrored delivery's change jobs are: for a ``failed`` delivery that now applies
    (as ``ignored``: its event was never queued), and for one stored ``ignored`` already only when ``events``
    (``replay --status ignored --with-hooks``: a hook added later); a replay from the console, the Django admin
    or :func:`replay_delivery` never queues an event again. A delivery stored redacted (its payer gone, or
    prune) queues nothing: it is not replayed."""
    e = webhook_events.c
    payload, event_ms, received_at, stored, last_error = writer.conn.execute(
        sa.select(e.payload, e.event_timestamp, e.received_at, e.status, e.last_error).where(e.svix_id == svix_id)
    ).one()
    was_failed = stored == DeliveryStatus.FAILED
    # Dismissed (:func:`dismiss_failed`): tried again by ``replay --status ignored`` (as for a hook added later),
    # but one that fails again stays dismissed, its note kept. It went back to failed: the alert, doctor and every
    # later scheduled replay failed until someone dismissed it again (review).
    dismissed = _dismissed(stored, last_error)
    if isinstance(payload, dict) and payload.get("redacted") is True:  # ids and versions only (retention,
        # erasure): applied, it would blank the row's fields with a version that may be newer
        if not was_failed:  # nothing to apply, and it was applied, skipped or ignored on arrival: as it was
            return DeliveryStatus(stored), False, False
        writer.finish_delivery(svix_id, DeliveryStatus.SKIPPED, _REDACTED_NOT_REPLAYED, count_attempt=True)
        return DeliveryStatus.SKIPPED, True, False
    try:
        # As when it arrived: an envelope field that did not refuse it live does not now; a timestamp it lacked
        # is the one stored then (the time received), so a tombstone gets the same version again.
        envelope = parse_envelope(json.dumps(payload), received_ms=lambda: _stored_ms(event_ms, received_at))
    except PayloadError as exc:
        if dismissed:
            return DeliveryStatus.IGNORED, False, False
        writer.finish_delivery(svix_id, DeliveryStatus.FAILED, str(exc), count_attempt=True)
        return DeliveryStatus.FAILED, True, False
    refused = len(writer.refused)
    status, error = apply_envelope(writer, envelope)
    if dismissed and status == DeliveryStatus.FAILED:
        return DeliveryStatus.IGNORED, False, False
    # as a live delivery: about a deleted entity (a skipped update, a membership deleted on arrival), it
    # keeps no personal data; redacted before its event is queued, so the hooks get it reduced as live
    WebhookProcessor.forget_if_deleted(writer, Outcome(svix_id, envelope.type, status, error), envelope)
    queued = (status == DeliveryStatus.IGNORED and writer.outbox is not None and (was_failed or events)
              and queue_event(writer, svix_id, envelope, person_named(envelope) or payer_organization(envelope)))
    if not was_failed and status in _CHANGED_NOTHING and len(writer.refused) == refused:
        return DeliveryStatus(stored), False, queued
    writer.finish_delivery(svix_id, status, writer.refusals_noted(refused, error), count_attempt=True)
    return status, True, queued


def queue_event(writer: Writer, svix_id: str, envelope: Envelope, person: str | None) -> bool:
    """Queue a job for each hook naming this unmirrored delivery's type (:meth:`Hook.wants_event`), in the
    caller's transaction, which has just stored (or, replayed, read) the delivery: its data as the inbox keeps
    it (reduced to ids when ``person``, the user it names or the organization that pays, is gone: stored
    redacted). Whether any was queued."""
    names = writer.outbox.event_hooks(envelope.type) if writer.outbox is not None else ()
    if not names:
        return False
    assert writer.outbox is not None
    data, redacted = envelope.data, False
    if person is not None:
        e = webhook_events.c
        if writer.conn.execute(sa.select(e.redacted_at).where(e.svix_id == svix_id)).scalar() is not None:
            data, redacted = redact_payload(envelope.raw).get("data") or {}, True
    writer.lock(event_locks(writer, svix_id, envelope))
    writer.outbox.record_event(Event(envelope.type, svix_id, envelope.timestamp_ms, data, redacted), names)
    return True


def event_locks(writer: Writer, svix_id: str, envelope: Envelope) -> list[str]:
    """The lock a delivery queuing jobs for an unmirrored event takes for its subject (``data.id``), held to its
    COMMIT: jobs of one subject are then numbered in commit order, as the locks of users and organizations make
    theirs. Without it, of two deliveries about one subscription in flight at once, the later one's job committed
    first and ran; the earlier one's, committed next, was that subject's first unfinished job and ran beside it,
    finishing last (review). None when no hook names the type (nothing queued) or the subject is the delivery
    itself (no ``data.id``)."""
    if writer.outbox is None or not writer.outbox.event_hooks(envelope.type):
        return []
    event = Event(envelope.type, svix_id, envelope.timestamp_ms, envelope.data)
    return [] if event.subject == svix_id else [f"event:{event.key()}"]


def payer_organization(envelope: Envelope) -> str | None:
    """The organization a Clerk Billing event's payer is (``data.payer.organization_id``), when the payer is no
    user (Clerk leaves the payer's ``user_id`` and names empty then): once that organization is deleted, the
    event is stored, and reaches its hooks, reduced, as the events of a deleted user are."""
    payer = envelope.data.get("payer")
    if not isinstance(payer, Mapping) or payer.get("user_id"):
        return None
    org = payer.get("organization_id")
    return org if isinstance(org, str) and org and org == org.strip() and len(org) <= CLERK_ID_CHARS else None


def _stored_ms(event_ms: int | None, received_at: datetime) -> int:
    """The timestamp a delivery was applied with live; its receipt for a row stored without one."""
    return int(event_ms) if event_ms is not None else int(as_utc(received_at).timestamp() * 1000)


def apply_envelope(writer: Writer, envelope: Envelope) -> tuple[DeliveryStatus, str | None]:
    """Apply a parsed event inside the caller's transaction; returns (status, error or notes)."""
    planned = _plan(writer, envelope)
    return planned.status_after(writer.apply(planned.intent) if planned.intent else True), planned.reason


def _plan(writer: Writer, envelope: Envelope) -> DeliveryPlan:
    """:func:`plan_delivery`; a membership event failed by a malformed organization or user id is planned
    again with the ids its row holds here (:func:`~clerk_sync.engine.membership_to_repair`), so the role
    change it carries applies."""
    planned = plan_delivery(envelope)
    if planned.status == DeliveryStatus.FAILED and (membership := membership_to_repair(envelope)) is not None:
        stored = writer.membership_parents(membership)
        if stored is not None:
            return plan_delivery(envelope, stored_parents=stored)
    return planned
