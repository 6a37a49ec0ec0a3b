"""Retention and erasure of personal data: the inbox, tombstones, and data-subject requests.

**Inbox.** A delivery's payload holds the user's e-mails, names, metadata (``private_metadata``
included) and the client's IP. After ``redact_after`` the payloads of applied, skipped and ignored
deliveries are reduced to ids, types and versions (:func:`redact_payload`): the ``svix_id`` column
still catches a retried delivery, and ordering lives in the contract tables' ``clerk_updated_at``, so
neither needs the rest; their ``last_error`` becomes ``(redacted)`` (an app's error message may quote the
person). After ``delete_after`` those rows are deleted. ``failed`` deliveries are kept whole until
replayed (or removed by hand): their payload is what a replay needs (one about a user deleted or erased
already is stored redacted: ``ingest``), except ``event_attributes`` (the requester's IP address and user
agent, which no replay reads), dropped after ``redact_after``. One about a user deleted since (its id read
trimmed: :func:`_about_gone_user`) is redacted as the tombstone's columns are cleared. A failed delivery a
redaction reaches (that, or an erasure's) is settled ``skipped`` in the same statement, as a replay would settle
it: nothing is left to apply, or for doctor and the failed-backlog alert to ask a replay of.

**Dead hook jobs.** A job queued that long ago (``created_at``) and left ``dead`` is redacted the same way
after ``redact_after`` (:func:`~clerk_sync.outbox.redact_jobs`: ids and version kept, the change's values
and the handler's error message dropped), and deleted after ``delete_after``. Pending and running jobs are
left whole: their handlers have yet to see the change.

**Tombstones.** ``user.deleted`` keeps the row with ``deleted_at`` set: that row is what makes a late
``user.created`` a no-op (``engine.decide``: a tombstone is terminal). After ``clear_tombstones_after``
its personal columns are cleared; by default the row itself (ids, version, ``deleted_at``) stays for
good. With ``delete_tombstones_after`` the rows of users, organizations and memberships deleted that
long ago are hard-deleted, and what stops a late or replayed ``user.created`` from bringing one back
is then a row of ``clerk_sync_erased``: the SHA-256 of "entity:clerk_id", which every guarded insert
consults (``store._NOT_ERASED``). It is not salted (every replica must compute it alike): whoever holds
a candidate Clerk id can tell it was erased here, which says nothing more about the person. A pass writes
the digests; a row goes only on a pass that finds its digest committed at least ``digest_settle`` before
(15 min: a later pass), so no insert can still be reading from before it
(:meth:`Retention._erase_tombstones` says why). A row an app's table still refers to by a foreign key stays
(cleared; logged, with what to change).

**Audit IPs.** The audit log is kept for good (migration 0013's triggers refuse deletes). Its ``ip`` column
is personal data of whoever acted: with ``audit_ip_clear_after`` (unset by default: a deleted admin's IPs
are evidence an incident review may need) prune clears it on the rows written that long ago.

**Erasure** (:meth:`Retention.erase_user`): tombstones the user now (memberships too), which waits for a
delivery in flight for them, then clears the row and redacts every stored payload and ``last_error`` that
mentions the user's id or e-mail addresses (the row's, their stored events', their memberships' identifier;
read after that wait: an address just written is searched too; one
a live user holds now, given to them by Clerk once this person's account was deleted, is theirs too: not searched
for, and named in ``mentioned_elsewhere``),
clears the ``ip`` of the audit rows the user made (or made impersonating someone) and redacts the ``details``
of those that name them (:func:`_redacted_details`: the Clerk ids stay, pseudonymous, for accountability;
migration 0013's triggers allow that redaction and still refuse any other change), and writes an audit row,
in one transaction, with no statement time limit (it searches the whole inbox and audit log). On PostgreSQL and
MySQL/MariaDB what the deliveries in flight stored is redacted after (:meth:`Retention._settle`), audited as
``user.erasure_settled`` (``"settled": false`` when that wait failed; no such row: not checked).
The deletion goes to the store's mapped tables and hooks, also when the user was deleted before (an
erasure run again with them: idempotent).

Several replicas may prune at once: each batch is one short transaction over at most ``batch`` rows,
picked with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, and every statement is idempotent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection

from clerk_sync._db_errors import is_lock_wait_timeout, is_row_referenced, is_transient, store_error
from clerk_sync._limits import CLERK_ID_CHARS, PRUNE_BATCH_MAX
from clerk_sync._mentions import Mentions
from clerk_sync._time import as_utc, aware, utcnow
from clerk_sync.auth.audit import AuditEntry, readable_details, record_audit
from clerk_sync.changes import Change
from clerk_sync.config import Settings
from clerk_sync.engine import DeliveryStatus, Entity, Tombstone, user_named
from clerk_sync.errors import StoreError, UnknownUser
from clerk_sync.events import Envelope
from clerk_sync.mapping import folded_like, unicode_lower, without_statement_bound
from clerk_sync.metrics import Metrics
from clerk_sync.outbox import FIELDS, REDACTED_MARK, Outbox, delete_jobs, redact_jobs, stored_text
from clerk_sync.store import Store, Writer, dialect_family, erased_digest, is_erased
from clerk_sync.tables import (
    audit_log,
    erased,
    hook_jobs,
    organization_memberships,
    organizations,
    pending_role_changes,
    users,
    webhook_events,
)

__all__ = ["ErasureReport", "PruneReport", "Retention", "RetentionPolicy", "UnknownUser", "redact_payload",
           "settle_if_stored_redacted"]

log = structlog.get_logger("clerk_sync.retention")

_DONE = (DeliveryStatus.APPLIED, DeliveryStatus.SKIPPED, DeliveryStatus.IGNORED)
# What a redacted payload keeps: enough to tell what the delivery was, nothing about the person.
_ENVELOPE_KEEP = ("type", "object", "timestamp", "instance_id")
_DATA_KEEP = ("id", "object", "deleted", "created_at", "updated_at", "user_id", "organization_id",
              "expire_at", "status")
_NESTED_ID = ("organization", "public_user_data", "payer")
_NESTED_KEEP = ("id", "user_id", "organization_id")  # (a payer's: the user or the organization that pays)
# A redacted delivery's ``last_error``: the reasons may quote the person (an app's error message), and with the
# payload reduced to ids there is nothing left to replay or fix.
_REDACTED_ERROR = "(redacted)"
# A ``failed`` delivery's once its payload is redacted: no fix can make it apply, so it is settled ``skipped`` as
# ``replay`` would settle it (``ingest._REDACTED_NOT_REPLAYED``), not left to fail doctor and the failed-backlog
# alert with advice (fix the cause, replay) that cannot apply. Not ``ignored``: that is ``clerk-sync dismiss``'s
# status, an operator's audited decision with a reason.
_SETTLED_ERROR = ("(redacted) skipped: its payload was redacted (an erasure, or retention once its user was deleted) "
                  "to ids and versions while it was failed: nothing is left to apply or replay")
# The ``last_error`` values a redaction writes: nothing in them can name anyone
_WRITTEN_ERRORS = (_REDACTED_ERROR, _SETTLED_ERROR)
# What an erasure leaves in the user's queued role changes (closed: never pushed).
_ERASED_PENDING = "the user was erased: not pushed"
# Personal columns and their cleared values (NOT NULL JSON columns get an empty value).
_CLEARED: dict[sa.Table, dict[str, Any]] = {
    users: {"email": None, "email_addresses": [], "first_name": None, "last_name": None, "username": None,
            "image_url": None, "public_metadata": {}, "private_metadata": {}, "unsafe_metadata": {},
            "last_sign_in_at": None},
    organizations: {"name": None, "slug": None, "image_url": None, "public_metadata": {}, "private_metadata": {}},
}


# What a tombstone kept by an app's foreign key needs (logged once a pass, with the database's reason).
_KEPT_FIX = ("an app's table refers to these tombstones by a foreign key: they stay, cleared, and their digests are "
             "written (nothing comes back); declare that key ON DELETE CASCADE or SET NULL to have them deleted, "
             "or unset CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS")
# The contract tables whose tombstones ``delete_tombstones_after`` hard-deletes.
_ERASABLE: dict[Entity, sa.Table] = {Entity.USER: users, Entity.ORGANIZATION: organizations,
                                     Entity.MEMBERSHIP: organization_memberships}
# How long a digest is committed, at least, before its row is hard-deleted: far longer than a writer's read can
# live (a statement, or two and the pause between them: seconds under DatabaseTimeouts' bounds).
_DIGEST_SETTLE = timedelta(minutes=15)


def redact_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload without personal data: envelope type/timestamp, object ids and versions only."""
    out: dict[str, Any] = {k: payload[k] for k in _ENVELOPE_KEEP if k in payload}
    data = payload.get("data")
    if isinstance(data, Mapping):
        kept = {k: data[k] for k in _DATA_KEEP if k in data}
        for key in _NESTED_ID:
            nested = data.get(key)
            if isinstance(nested, Mapping):
                kept[key] = {k: nested[k] for k in _NESTED_KEEP if k in nested}
        out["data"] = kept
    out["redacted"] = True
    return out


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long personal data stays; build it from settings with :meth:`from_settings`."""

    redact_after: timedelta = timedelta(days=30)
    delete_after: timedelta = timedelta(days=90)
    clear_tombstones_after: timedelta = timedelta(0)
    batch: int = 500
    delete_tombstones_after: timedelta | None = None  # None: tombstones stay (cleared) for good
    audit_ip_clear_after: timedelta | None = None  # None: the audit log's IPs stay (an erasure clears its user's)
    digest_settle: timedelta = _DIGEST_SETTLE  # a digest committed this long before its row goes

    def __post_init__(self) -> None:
        if self.delete_after < self.redact_after:
            raise ValueError("delete_after must not be shorter than redact_after")
        if not 1 <= self.batch <= PRUNE_BATCH_MAX:
            raise ValueError(f"batch must be 1 to {PRUNE_BATCH_MAX:,} (a batch's ids go in one statement: "
                             "PostgreSQL takes 65,535 parameters)")
        if self.delete_tombstones_after is not None and self.delete_tombstones_after < self.clear_tombstones_after:
            raise ValueError("delete_tombstones_after must not be shorter than clear_tombstones_after")
        if self.digest_settle <= timedelta(0):
            raise ValueError("digest_settle must be positive: a row goes once no insert can read from before its "
                             "digest")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        hard, ips = settings.tombstone_delete_after_days, settings.audit_ip_clear_after_days
        # What a writer's read can outlive, bounded: two statements and the pause between them, four times over
        # (0, unbounded, leaves the default standing).
        span = 2 * settings.db_statement_timeout_s + settings.db_idle_in_transaction_timeout_s
        return cls(timedelta(days=settings.inbox_redact_after_days), timedelta(days=settings.inbox_delete_after_days),
                   timedelta(days=settings.tombstone_clear_after_days), settings.prune_batch,
                   None if hard is None else timedelta(days=hard),
                   digest_settle=max(_DIGEST_SETTLE, timedelta(seconds=4 * span)),
                   audit_ip_clear_after=None if ips is None else timedelta(days=ips))


@dataclass(frozen=True, slots=True)
class PruneReport:
    """Rows a prune pass redacted, deleted, cleared and erased (would have, for a dry run); ``redacted`` and
    ``deleted`` count inbox rows and dead hook jobs."""

    redacted: int
    deleted: int
    cleared: int
    dry_run: bool
    erased: int = 0  # tombstone rows hard-deleted (``delete_tombstones_after``)
    audit_ips: int = 0  # audit rows whose ``ip`` was cleared (``audit_ip_clear_after``)
    settling: int = 0  # due ones whose digests are younger than ``digest_settle``: a later pass deletes them

    def summary(self) -> str:
        """The one line every face's ``prune`` command prints."""
        would = self.dry_run
        later = f" ({self.settling} more on a later pass, once their digests settle)" if self.settling else ""
        return (f"{'would redact' if would else 'redacted'} {self.redacted} payload(s), "
                f"{'would delete' if would else 'deleted'} {self.deleted} delivery row(s), "
                f"{'would clear' if would else 'cleared'} {self.cleared} tombstone(s), "
                f"{'would erase' if would else 'erased'} {self.erased} tombstone row(s){later}"
                + (f", {'would clear' if would else 'cleared'} {self.audit_ips} audit IP(s)" if self.audit_ips else ""))


@dataclass(frozen=True, slots=True)
class ErasureReport:
    """What ``erase_user`` changed: the user row (tombstoned/cleared) and the payloads it redacted;
    ``mapped_refused``: what the app's mapped table would not clear (also in the audit row);
    ``audit_rows_redacted``: audit rows whose ``ip`` it cleared or whose ``details`` it redacted;
    ``mentioned_elsewhere``: other users' and organizations' rows whose metadata, name or slug still holds
    the person's e-mail address or phone number (``"organizations org_1: private_metadata"``), live users who
    hold one of the person's addresses now (Clerk freed it with the account; ``"users user_2: email (a live
    user holds this address now: ...)"``: that address was not searched for, the person's id was), and the
    organizations the person created, whose name or slug may be theirs (``"organizations org_2: created by
    them (name, slug)"``), which the erasure does not change: they are someone else's data, or the
    organization's, mirrored from Clerk (review and edit them there)."""

    clerk_id: str
    row_existed: bool
    payloads_redacted: int
    mapped_refused: tuple[str, ...] = ()
    audit_rows_redacted: int = 0
    mentioned_elsewhere: tuple[str, ...] = ()

    def elsewhere_advice(self) -> str | None:
        """The line every face's erase command prints when other records still hold the person's address, or
        organizations they created may be named after them."""
        if not self.mentioned_elsewhere:
            return None
        more = " (and maybe more)" if len(self.mentioned_elsewhere) >= _ELSEWHERE_MAX else ""
        reused = ("" if not any(entry.endswith(_HOLDS_NOW) for entry in self.mentioned_elsewhere) else
                  ". An address a live user holds now (Clerk gave it to them once this person's account was "
                  "deleted) is theirs: not searched for, so a stored delivery, hook job or audit row naming only "
                  "that address (not this person's id) was left whole; review those by hand, and leave that user's "
                  "own data as it is")
        return (f"other records still hold this person's e-mail address or phone number, or were created by them "
                f"(an organization's name or slug may be theirs){more}: "
                f"{'; '.join(self.mentioned_elsewhere)}. They are mirrored from Clerk: edit them there (Dashboard "
                f"or API), and the next event or reconcile mirrors the change here{reused}")


# An erasure waits this long for the inbox writes in flight to end (see Retention._settle), then searches the
# rows received since it began, less a margin for the clocks of the replicas that stamped them.
_SETTLE_WAIT_S = 10
_SETTLE_MARGIN = timedelta(hours=1)


class Retention:
    """Prunes the inbox and tombstones per ``policy``; erases one user on request."""

    def __init__(self, store: Store, policy: RetentionPolicy | None = None, *, metrics: Metrics | None = None,
                 now: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.policy = policy or RetentionPolicy()
        self.metrics = metrics
        self._now = utcnow if now is None else (lambda: as_utc(now()))  # a naive clock is UTC, as everywhere

    # -- prune ----------------------------------------------------------------------------------
    def prune(self, *, dry_run: bool = False) -> PruneReport:
        """One pass over everything due; safe to run on several replicas at once."""
        now = self._now()
        p = self.policy
        redact_cut, delete_cut, clear_cut = now - p.redact_after, now - p.delete_after, now - p.clear_tombstones_after
        erase_cut = None if p.delete_tombstones_after is None else now - p.delete_tombstones_after
        if dry_run:
            ips_cut = None if p.audit_ip_clear_after is None else now - p.audit_ip_clear_after
            return self._count(redact_cut, delete_cut, clear_cut, erase_cut, now - p.digest_settle, ips_cut)
        report = PruneReport(
            redacted=self._drain(lambda w: self._redact_batch(w, redact_cut))
            + self._drain(lambda w: self._redact_jobs_batch(w, redact_cut))
            + self._redact_failed_of_gone(clear_cut) + self._strip_failed_requests(redact_cut),
            deleted=self._drain(lambda w: self._delete_batch(w, delete_cut))
            + self._drain(lambda w: self._delete_jobs_batch(w, delete_cut)),
            cleared=sum(self._drain(functools.partial(self._clear_batch, table=t, cutoff=clear_cut))
                        for t in _CLEARED),
            dry_run=False,
        )
        if erase_cut is not None:  # (after the clearing: a row a foreign key keeps stays cleared)
            erased = [self._erase_tombstones(e, erase_cut, now - p.digest_settle) for e in _ERASABLE]
            report = dataclasses.replace(report, erased=sum(n for n, _ in erased), settling=sum(n for _, n in erased))
        if p.audit_ip_clear_after is not None:
            cut = now - p.audit_ip_clear_after
            report = dataclasses.replace(report, audit_ips=self._clear_ips(cut))
        if self.metrics is not None:
            for action in ("redacted", "deleted", "cleared", "erased", "audit_ips"):
                self.metrics.pruned.labels(action=action).inc(getattr(report, action))
        return report

    def _drain(self, batch: Callable[[Writer], int]) -> int:
        """Run ``batch`` in its own short transaction until it finds less than a full batch."""
        total = 0
        while True:
            with self.store.transaction() as writer:
                n = batch(writer)
            total += n
            if n < self.policy.batch:
                return total

    def _pick(self, query: sa.Select[Any]) -> sa.Select[Any]:
        # SKIP LOCKED: replicas pruning together take disjoint batches (ignored on SQLite: one writer).
        return query.limit(self.policy.batch).with_for_update(skip_locked=True)

    def _redactable(self, cutoff: datetime) -> list[sa.ColumnElement[bool]]:
        e = webhook_events
        return [e.c.redacted_at.is_(None), e.c.received_at < cutoff, e.c.status.in_(_DONE)]

    def _deletable(self, cutoff: datetime) -> list[sa.ColumnElement[bool]]:
        e = webhook_events
        return [e.c.status.in_(_DONE), e.c.received_at < cutoff]

    def _redact_batch(self, writer: Writer, cutoff: datetime) -> int:
        e = webhook_events
        rows = writer.conn.execute(self._pick(sa.select(e.c.id, _PAYLOAD).where(*self._redactable(cutoff)))).all()
        _store_redacted(writer, [(row.id, row.payload) for row in rows])
        return len(rows)

    def _redact_failed_of_gone(self, cutoff: datetime, *, dry_run: bool = False,
                               settling: list[datetime] | None = None) -> int:
        """Failed deliveries are kept, whole, until replayed; one about a user deleted before ``cutoff`` (the
        tombstones' clearing time) or hard-deleted since can never be applied, so its payload is redacted as
        the tombstone's columns are cleared, and it is settled ``skipped``, as a replay would settle it (its
        ``last_error``: :data:`_SETTLED_ERROR`; :func:`_store_redacted`): nothing is left for doctor or the
        failed-backlog alert to ask a fix and a replay for. A failed delivery whose payload was redacted
        already (stored so on arrival, or by an earlier release) is settled too. Who a payload is about is
        inside its JSON: the failed backlog is read a batch at a time, in id order. Returns the payloads
        redacted (the ones settled without a redaction are logged, not counted). ``settling`` (a dry run's) gets
        the ``received_at`` of every delivery settled: the pass deletes those as old as ``delete_after`` next."""
        e = webhook_events
        due = sa.select(e.c.id, _PAYLOAD, e.c.redacted_at, e.c.received_at).where(
            e.c.status == DeliveryStatus.FAILED)
        settled: list[int] = []

        def redact(conn: Connection, writer: Writer | None, rows: Sequence[Any]) -> int:
            whole = [row for row in rows if row.redacted_at is None]
            gone = [row for row in whole if _about_gone_user(conn, row.payload, cutoff)]
            before = [row for row in rows if row.redacted_at is not None]
            if writer is not None:
                _store_redacted(writer, [(row.id, row.payload) for row in gone])
                _settle_redacted_failed(writer, [row.id for row in before])
            settled.extend(row.id for row in before)
            if settling is not None:
                settling.extend(row.received_at for row in (*gone, *before))
            return len(gone)

        redacted = self._walk(due, e.c.id, redact, dry_run=dry_run)
        if settled and not dry_run:
            log.info("failed_deliveries_settled", deliveries=len(settled),
                     why="payload redacted before: nothing to replay, stored skipped")
        return redacted

    def _strip_failed_requests(self, cutoff: datetime, *, dry_run: bool = False,
                               gone_cut: datetime | None = None) -> int:
        """A failed delivery is kept whole for its replay, but its ``event_attributes`` (the IP address and user
        agent of the request behind the event: the acting person's, who the event may not name, so no erasure
        finds them) are nothing a replay reads: dropped once the delivery is as old as ``redact_after``, as the
        applied ones' whole payloads are redacted then. Returns the payloads changed. A dry run (``gone_cut``:
        the tombstones' clearing time) leaves out those :meth:`_redact_failed_of_gone` counts, which the real
        pass redacts whole first."""
        e = webhook_events
        due = sa.select(e.c.id, _PAYLOAD).where(
            e.c.status == DeliveryStatus.FAILED, e.c.redacted_at.is_(None), e.c.received_at < cutoff,
            sa.cast(e.c.payload, sa.Text).contains('"event_attributes"'))
        stmt = e.update().where(e.c.id == sa.bindparam("row_id")).values(
            payload=sa.bindparam("new_payload", type_=e.c.payload.type))

        def strip(conn: Connection, writer: Writer | None, rows: Sequence[Any]) -> int:
            documents = [(row.id, dict(_as_dict(row.payload))) for row in rows]
            stripped = [{"row_id": i, "new_payload": {k: v for k, v in doc.items() if k != "event_attributes"}}
                        for i, doc in documents if "event_attributes" in doc
                        and (gone_cut is None or not _about_gone_user(conn, doc, gone_cut))]
            if stripped and writer is not None:
                conn.execute(stmt, stripped)
            return len(stripped)

        return self._walk(due, e.c.id, strip, dry_run=dry_run)

    def _clear_ips(self, cutoff: datetime) -> int:
        """Clear the ``ip`` of the audit rows written before ``cutoff``, a batch at a time in id order (a
        cursor: the log is kept for good, and each batch must not walk the rows cleared before it)."""
        a = audit_log

        def clear(conn: Connection, writer: Writer | None, rows: Sequence[Any]) -> int:
            if rows:  # (0013's triggers allow this one change of an audit row: ip to NULL)
                conn.execute(a.update().where(a.c.id.in_([row.id for row in rows])).values(ip=None))
            return len(rows)

        return self._walk(sa.select(a.c.id).where(*_audit_ips_due(cutoff)), a.c.id, clear)

    def _walk(self, query: sa.Select[Any], id_column: sa.ColumnElement[Any],
              handle: Callable[[Connection, Writer | None, Sequence[Any]], int], *, dry_run: bool = False) -> int:
        """Run ``handle`` over ``query``'s rows (each with an ``id``) a batch at a time, in id order, each
        batch in its own short transaction; a cursor, so no batch walks the rows the earlier ones passed over.
        Returns the sum of what ``handle`` returned. A dry run reads on a plain connection, locking nothing
        (``handle`` gets no writer): ``prune --dry-run`` works on a read-only replica or login, and does not
        make a replica's real pass skip the rows it counts."""
        total, after = 0, 0
        while True:
            ordered = query.where(id_column > after).order_by(id_column)
            if dry_run:
                with self.store.connect() as conn:
                    rows = conn.execute(ordered.limit(self.policy.batch)).all()
                    total += handle(conn, None, rows)
            else:
                with self.store.transaction() as writer:
                    rows = writer.conn.execute(self._pick(ordered)).all()
                    total += handle(writer.conn, writer, rows)
            if len(rows) < self.policy.batch:
                return total
            after = rows[-1].id

    def _delete_batch(self, writer: Writer, cutoff: datetime) -> int:
        e = webhook_events
        ids = list(writer.conn.execute(self._pick(sa.select(e.c.id).where(*self._deletable(cutoff)))).scalars())
        if ids:
            writer.conn.execute(e.delete().where(e.c.id.in_(ids)))
        return len(ids)

    def _redact_jobs_batch(self, writer: Writer, cutoff: datetime) -> int:
        query = sa.select(hook_jobs.c.id).where(*_redactable_jobs(cutoff))
        ids = list(writer.conn.execute(self._pick(query)).scalars())
        return redact_jobs(writer.conn, ids=ids) if ids else 0

    def _delete_jobs_batch(self, writer: Writer, cutoff: datetime) -> int:
        ids = list(writer.conn.execute(self._pick(sa.select(hook_jobs.c.id).where(*_deletable_jobs(cutoff)))).scalars())
        return delete_jobs(writer.conn, ids) if ids else 0

    def _clear_batch(self, writer: Writer, *, table: sa.Table, cutoff: datetime) -> int:
        query = sa.select(table.c.id).where(table.c.deleted_at.is_not(None), table.c.deleted_at < cutoff,
                                            _not_cleared(table))
        ids = list(writer.conn.execute(self._pick(query)).scalars())
        if ids and table is users:
            # Their addresses are forgotten now: an audit row quoting one (an app's note, an error message) is
            # redacted now too, as an erasure would; a later erasure request no longer knows what to look for.
            found = writer.conn.execute(sa.select(users.c.email, users.c.email_addresses).where(users.c.id.in_(ids)))
            emails = {address for row in found for address in _emails(row)}
            taken = {a for held in _live_holders(writer.conn, None, emails).values() for a in held}
            addresses = Mentions(a for a in emails if a.casefold() not in taken)  # (a live user's now: theirs)
            if addresses:
                _redact_audit_details(writer, addresses)
        if ids:
            writer.conn.execute(table.update().where(table.c.id.in_(ids)).values(**_CLEARED[table]))
        return len(ids)

    def _erase_tombstones(self, entity: Entity, cutoff: datetime, settled: datetime) -> tuple[int, int]:
        """Hard-delete the tombstones of ``entity`` older than ``cutoff``, a batch at a time in id order, in two
        phases: a pass writes a row's digest (committed), and the row goes only on a pass that finds the digest
        written before ``settled`` (``digest_settle`` ago: a later pass). Returns the rows this replica deleted and
        those left to a later pass; rows an app's table refers to stay (:meth:`_delete_tombstones`).

        Why a row waits for its digest to settle: a guarded insert (``store._NOT_ERASED``: ``INSERT .. SELECT ..
        WHERE NOT EXISTS`` the digest, then ``ON CONFLICT``) reads the digests on its snapshot, but meets the row
        it conflicts with as it is at that moment. Under READ COMMITTED (PostgreSQL's default; MariaDB's as the
        store sets it, where that read is a consistent read, no lock) the snapshot is the statement's: one taken
        before the digest committed, that reached the tombstone once its DELETE had committed (or had waited on
        its row lock, then went on), found neither, and inserted the user again, live. A row deleted once its
        digest is older than any writer's read can be leaves no such writer: it waits for nobody. A table lock
        around the DELETE would close the window on PostgreSQL too (``SHARE ROW EXCLUSIVE`` on ``users``), but it
        waits for every writer in flight and holds every new delivery behind it; InnoDB has no such lock inside
        a transaction (``LOCK TABLES`` commits, and blocks readers too). (Under REPEATABLE READ, InnoDB reads the
        digests of an ``INSERT .. SELECT`` with shared locks: no stale read there, the digest insert waits.)
        SQLite has one writer, so no window: the same phases run there, one behaviour everywhere.

        ``erased_at`` is the writing replica's clock (replicas' clocks agree to well within ``digest_settle``).
        A row a foreign key kept has its digest dated back to the row's deletion, which no pass writes (its
        digests come later than ``cutoff``): those are tried once a batch, not one at a time on every pass."""
        table, deleted, settling, held = _ERASABLE[entity], 0, 0, 0
        kept: list[str] = []  # why each row an app's table refers to stays
        due = _due_tombstones(table, cutoff)
        after: int | None = None  # past the rows kept or settling: the pass moves on
        while True:
            with self.store.transaction() as writer:
                rows = writer.conn.execute(self._pick(due if after is None else due.where(table.c.id > after))).all()
                written = _digests(writer.conn, entity, [row.clerk_id for row in rows])
                fresh = [row.clerk_id for row in rows if row.clerk_id not in written]
                _mark_erased(writer, entity, fresh)
                written |= dict.fromkeys(fresh, writer.now)
            ripe = [row for row in rows if _settled(written[row.clerk_id], settled)]
            settling += len(rows) - len(ripe)
            new = set(fresh)
            earlier = {row.id for row in ripe if row.clerk_id not in new  # its digest dated back: kept before
                       and aware(written[row.clerk_id]) <= aware(row.deleted_at)}
            first = [row for row in ripe if row.id not in earlier]
            deleted += self._delete_tombstones(entity, first, kept) if first else 0
            # Rows an earlier pass kept: one try for the batch, never one transaction a row on every pass
            # (an app whose orders refer to most deleted users would have its log and database busy with
            # them each hour).
            if earlier:
                try:
                    deleted += self._delete_rows(table, sorted(earlier))
                except StoreError as exc:
                    if not _referred_to(exc):
                        raise
                    held += len(earlier)
            if rows:
                after = rows[-1].id
            if len(rows) < self.policy.batch:
                if kept:
                    log.warning("tombstones_kept", table=table.name, rows=len(kept), reason=kept[0], fix=_KEPT_FIX)
                if held:
                    log.info("tombstones_still_kept", table=table.name, rows=held, fix=_KEPT_FIX)
                return deleted, settling

    def _delete_tombstones(self, entity: Entity, rows: list[Any], kept: list[str]) -> int:
        """Delete these tombstone rows; when a foreign key of an app's table refuses the batch, one at a time,
        each in a transaction of its own (a deferred key refuses only at COMMIT): a row still referred to stays
        (cleared, its digest dated back to its deletion: kept), its reason appended to ``kept``, and the others go."""
        table = _ERASABLE[entity]
        try:
            return self._delete_rows(table, [row.id for row in rows])
        except StoreError as exc:
            if not _referred_to(exc):
                raise
        deleted, refused = 0, []
        for row in rows:
            try:
                deleted += self._delete_rows(table, [row.id])
            except StoreError as exc:
                if not _referred_to(exc):
                    raise
                kept.append(str(exc))
                refused.append(row)
        if refused:
            with self.store.transaction() as writer:
                writer.conn.execute(erased.update().where(erased.c.digest == sa.bindparam("d")).values(
                    erased_at=sa.bindparam("at")), [{"d": erased_digest(entity, row.clerk_id), "at": row.deleted_at}
                                                    for row in refused])
        return deleted

    def _delete_rows(self, table: sa.Table, ids: list[int]) -> int:
        """How many it deleted: another replica may have picked the same rows once their digests committed."""
        with self.store.transaction() as writer:
            stmt = table.delete().where(table.c.id.in_(ids), table.c.deleted_at.is_not(None))
            return int(writer.conn.execute(stmt).rowcount)

    def _count(self, redact_cut: datetime, delete_cut: datetime, clear_cut: datetime,
               erase_cut: datetime | None, settled: datetime, ips_cut: datetime | None) -> PruneReport:
        def count(table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())

        settling: list[datetime] = []  # failed ones the pass settles skipped first: deleted too once old enough
        failed_of_gone = self._redact_failed_of_gone(clear_cut, dry_run=True, settling=settling) \
            + self._strip_failed_requests(redact_cut, dry_run=True, gone_cut=clear_cut)
        settled_deleted = sum(1 for received in settling if aware(received) < delete_cut)
        with self.store.connect() as conn:
            erasing = [self._count_tombstones(conn, e, erase_cut, settled) for e in _ERASABLE] \
                if erase_cut is not None else []
            return PruneReport(
                redacted=count(webhook_events, *self._redactable(redact_cut))
                + count(hook_jobs, *_redactable_jobs(redact_cut)) + failed_of_gone,
                deleted=count(webhook_events, *self._deletable(delete_cut))
                + count(hook_jobs, *_deletable_jobs(delete_cut)) + settled_deleted,
                cleared=sum(count(t, t.c.deleted_at.is_not(None), t.c.deleted_at < clear_cut, _not_cleared(t))
                            for t in _CLEARED),
                dry_run=True,
                erased=sum(n for n, _ in erasing),
                settling=sum(n for _, n in erasing),
                audit_ips=count(audit_log, *_audit_ips_due(ips_cut)) if ips_cut is not None else 0,
            )

    def _count_tombstones(self, conn: sa.Connection, entity: Entity, cutoff: datetime,
                          settled: datetime) -> tuple[int, int]:
        """What :meth:`_erase_tombstones` would do now: due rows whose digests were written before ``settled``
        would go, the others (a younger digest, or none yet: the pass would write it now, on the store's clock)
        would be settling. Rows an app's foreign key keeps are counted as going: only a DELETE would tell them."""
        table, ripe, settling, stamp = _ERASABLE[entity], 0, 0, self.store.now()
        due = _due_tombstones(table, cutoff).limit(self.policy.batch)
        after: int | None = None
        while True:
            rows = conn.execute(due if after is None else due.where(table.c.id > after)).all()
            written = _digests(conn, entity, [row.clerk_id for row in rows])
            n = sum(1 for row in rows if _settled(written.get(row.clerk_id, stamp), settled))
            ripe, settling = ripe + n, settling + len(rows) - n
            if len(rows) < self.policy.batch:
                return ripe, settling
            after = rows[-1].id

    def cleared_users(self, clerk_ids: list[str]) -> set[str]:
        """Which of ``clerk_ids`` clerk-sync keeps no personal data of any more: erased, or deleted with the
        tombstone cleared (``clear_tombstones_after``) or hard-deleted. A face that copied a user's data
        elsewhere (Django's ``auth_user``) clears its copy of these (``manage.py clerk_sync prune``)."""
        if not clerk_ids:
            return set()
        u = users
        with self.store.connect() as conn:
            cleared = u.c.deleted_at.is_not(None) & sa.not_(_not_cleared(u))
            rows: dict[str, bool] = dict(conn.execute(sa.select(u.c.clerk_id, cleared)
                                                      .where(u.c.clerk_id.in_(clerk_ids))).all())
            gone = [i for i in clerk_ids if i not in rows]
            erased_ids = set(_digests(conn, Entity.USER, gone))
        return {i for i, cleared in rows.items() if cleared} | erased_ids

    # -- erasure --------------------------------------------------------------------------------
    def erase_user(self, clerk_id: str, *, actor: str | None = None, reason: str | None = None,
                   allow_unknown: bool = False) -> ErasureReport:
        """Remove a user's personal data from every table and stored payload now; audited.

        The row stays as a cleared tombstone, so no later or replayed event brings the user back.
        An id never seen here (no row, no digest, no membership, no stored payload naming it) raises
        :class:`UnknownUser` and changes nothing: a typo would otherwise leave a permanent tombstone for
        nobody while the real user keeps their data. ``allow_unknown`` erases it anyway (a request before
        the first webhook).

        The ``user.erased`` audit row commits with the erasure (a process killed after it leaves no erasure
        unaudited). On PostgreSQL and MySQL/MariaDB, the redaction of what the deliveries in flight stored
        (:meth:`_settle`) writes a second row, ``user.erasure_settled`` (``payloads_redacted``, in its
        transaction, ``"settled": true``), or ``"settled": false`` when its wait failed (with the "run the
        erasure again" error): a ``user.erased`` row without one was not checked (its process killed in between).
        """
        if not could_be_user_id(clerk_id):
            raise ValueError(too_long_for_an_id(clerk_id)
                             or f"erase_user needs a Clerk user id (user_...), not {clerk_id!r}")
        began = self.store.now()
        try:
            report, mentions = self._erase_user(clerk_id, actor, reason, allow_unknown=allow_unknown)
        except StoreError as exc:
            if not is_transient(getattr(exc.__cause__, "orig", None)):
                raise
            raise StoreError(
                f"{exc}. If it runs out again (a delivery for this user in progress, a stuck replica), raise "
                "CLERK_SYNC_DB_LOCK_TIMEOUT_S or CLERK_SYNC_DB_IDLE_IN_TRANSACTION_TIMEOUT_S for this command (an "
                "erasure's statements have no time limit)") from exc
        if dialect_family(self.store.engine.dialect) == "sqlite":  # one writer: no delivery in flight
            return report

        def audited(writer: Writer, late: int, *, settled: bool = True) -> None:
            # always, so that an erasure without this row (its process killed during the wait) reads as unchecked
            record_audit(writer, AuditEntry("user.erasure_settled", actor, clerk_id,
                                            details={"payloads_redacted": late, "settled": settled}))

        try:
            late = self._settle(mentions, began - _SETTLE_MARGIN, audited)
        except StoreError as exc:
            self._audit_unsettled(clerk_id, lambda writer: audited(writer, 0, settled=False))  # (the wait failed)
            if is_lock_wait_timeout(getattr(exc.__cause__, "orig", None)):
                holder, then = _inbox_holders(self.store.engine), "in a minute"
                if holder is None:
                    holder = "a delivery in progress"
                elif holder.startswith("a VACUUM"):
                    then = "once it ends (pg_stat_progress_vacuum shows how far it is)"
                raise StoreError(
                    f"user {clerk_id} is erased, but {holder} held the inbox past {_SETTLE_WAIT_S} s, so what "
                    f"deliveries in progress store was not checked ({exc}): run the erasure again {then}") from exc
            grant = (" (the database user needs the LOCK TABLES privilege for this wait)"
                     if dialect_family(self.store.engine.dialect) == "mysql" else "")
            raise StoreError(
                f"user {clerk_id} is erased, but the wait for deliveries in progress failed ({exc}), so what they "
                f"store was not checked: run the erasure again{grant}") from exc
        return dataclasses.replace(report, payloads_redacted=report.payloads_redacted + late)

    def _audit_unsettled(self, clerk_id: str, audited: Callable[[Writer], None]) -> None:
        """The ``user.erasure_settled`` row of an erasure whose wait for the deliveries in flight failed, in a
        transaction of its own; a database that refuses it too is logged (the erasure's own error is what the
        caller raises)."""
        try:
            with self.store.transaction() as writer:
                audited(writer)
        except StoreError as exc:
            log.error("erasure_audit_not_written", clerk_id=clerk_id, error=str(exc),
                      fix="run the erasure again: it checks what deliveries in flight stored")

    def _settle(self, mentions: Mentions, since: datetime, audited: Callable[[Writer, int], None]) -> int:
        """Redact what deliveries in flight during the erasure stored whole, and write its audit row
        (``audited``, given the payloads this redacted) in the same transaction; returns the payloads redacted.

        A delivery that names the user without writing the user's row (``session.*``, ``email.created``) takes
        no lock the erasure's tombstone waits on: one whose inbox row went in (the user not gone yet, so whole)
        before the tombstone committed could commit after the erasure's search. So wait until every write in
        flight on the inbox has ended (PostgreSQL: a SHARE lock on ``webhook_events``, taken and released at
        once; MySQL/MariaDB: ``LOCK TABLES .. READ``, whose metadata lock waits for every open transaction that
        wrote it), then search the rows received since the erasure began again: any delivery after that sees
        the tombstone and stores its payload redacted. (SQLite: one writer, no delivery in flight: not called.)"""
        family = dialect_family(self.store.engine.dialect)
        try:
            if family == "postgresql":
                # A queued SHARE request holds every new inbox write behind it: asked for 50 ms at a time
                # (between tries, deliveries go on), until the bound.
                deadline = time.monotonic() + _SETTLE_WAIT_S
                while True:
                    try:
                        with self.store.engine.begin() as conn:
                            conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
                            conn.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
                            conn.exec_driver_sql("LOCK TABLE webhook_events IN SHARE MODE")
                        break
                    except sa.exc.DBAPIError as exc:
                        if not is_lock_wait_timeout(exc.orig) or time.monotonic() >= deadline:
                            raise
                        time.sleep(0.05)
            else:
                with self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.exec_driver_sql("SET @clerk_sync_mdl_wait = @@SESSION.lock_wait_timeout, "
                                         f"SESSION lock_wait_timeout = {_SETTLE_WAIT_S}")
                    try:
                        conn.exec_driver_sql("LOCK TABLES webhook_events READ")
                        conn.exec_driver_sql("UNLOCK TABLES")
                    finally:  # the pool's connection keeps the engine's bound, not the server's default
                        conn.exec_driver_sql("SET SESSION lock_wait_timeout = @clerk_sync_mdl_wait")
        except sa.exc.SQLAlchemyError as exc:
            raise store_error(exc) from exc
        with self.store.transaction() as writer, without_statement_bound(writer.conn):
            late = _redact_mentions(writer, mentions, since=since) + redact_jobs(writer.conn, mentions)
            audited(writer, late)
            return late

    def _erase_user(self, clerk_id: str, actor: str | None, reason: str | None, *,
                    allow_unknown: bool) -> tuple[ErasureReport, Mentions]:
        """The erasure's transaction, its ``user.erased`` audit row included."""
        with self.store.transaction() as writer, without_statement_bound(writer.conn):
            existed = writer.conn.execute(sa.select(users.c.id).where(users.c.clerk_id == clerk_id)).first() is not None
            if not (allow_unknown or existed or is_erased(writer.conn, Entity.USER, clerk_id)
                    or _user_events(writer, clerk_id)[0] or _mentioned(writer, clerk_id)):
                raise UnknownUser(f"no user {clerk_id!r} in this database (no row, no stored event): check the "
                                  "id; erase one never synced only with allow_unknown (CLI: --force)")
            if not writer.apply(Tombstone(Entity.USER, clerk_id, int(writer.now.timestamp() * 1000))) \
                    and writer.outbox is not None:
                _pass_deletion_on(writer, writer.outbox, clerk_id)
            # Read once the tombstone holds the user's lock: a delivery in flight (a new address) has committed.
            # The row's e-mails, and those its user events carried: once the user was deleted and pruned,
            # the row holds none, and a payload naming only the address (email.created) would stay.
            row = writer.conn.execute(
                sa.select(users.c.email, users.c.email_addresses).where(users.c.clerk_id == clerk_id)
            ).first()
            # An address a live user holds now (Clerk frees it with the account: someone signed up with it
            # again) names them too: not searched for (the user's own events carry their id), only reported.
            addresses = {*_emails(row), *_user_events(writer, clerk_id)[1], *_tied_to(writer, clerk_id)}
            holders = _live_holders(writer.conn, clerk_id, addresses)
            by_events = _holders_by_events(writer, clerk_id, addresses)
            taken = {address for found in (holders, by_events) for held in found.values() for address in held}
            mentions = Mentions({clerk_id, *(a for a in addresses
                                             if a.casefold() not in taken and a.strip() not in taken)})
            writer.conn.execute(users.update().where(users.c.clerk_id == clerk_id).values(**_CLEARED[users]))
            # A role change queued for them while Clerk was down is closed, not pushed later (`retry-pending`
            # would otherwise set it in Clerk, and audit it, for a user erased here).
            p = pending_role_changes
            writer.conn.execute(p.update().where(p.c.user_clerk_id == clerk_id, p.c.done_at.is_(None))
                                .values(done_at=writer.now, last_error=_ERASED_PENDING))
            created = _organizations_created_by(writer, clerk_id)  # (before the redaction: the payloads say it)
            redacted = _redact_mentions(writer, mentions)
            # Issue 11: the app's mapped table and queued hook jobs hold personal data too.
            redacted += redact_jobs(writer.conn, mentions)
            refused = (tuple(self.store.mapping.erase(writer.conn, Entity.USER, clerk_id))
                       if self.store.mapping is not None else ())
            audited = _redact_audit(writer, clerk_id, mentions)  # (before its own row: the reason stays as given)
            elsewhere = _mentioned_elsewhere(writer, clerk_id, mentions, created, holders, by_events)
            details: dict[str, Any] = {"payloads_redacted": redacted, "reason": reason}
            if refused:  # the erasure holds; what is left for the app to clear is on record
                details["mapped_refused"] = list(refused)
            if elsewhere:  # where (ids and columns, never the values) the address is still held
                details["mentioned_elsewhere"] = list(elsewhere)
            if audited:
                details["audit_rows_redacted"] = audited
            record_audit(writer, AuditEntry("user.erased", actor, clerk_id, details=details))
        return ErasureReport(clerk_id, existed, redacted, refused, audited, elsewhere), mentions


# Who holds ``webhook_events`` against an erasure's SHARE lock (PostgreSQL): the sessions holding a mode that
# conflicts with it, each with what it is, and whether it is a vacuum (autovacuum or a manual VACUUM).
_HOLDERS_SQL = """
SELECT l.pid, l.mode, a.backend_type = 'autovacuum worker' AS auto,
       EXISTS (SELECT 1 FROM pg_stat_progress_vacuum v WHERE v.pid = l.pid)
       OR a.backend_type = 'autovacuum worker' OR a.query ILIKE 'vacuum%' AS vacuum
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.relation = to_regclass('webhook_events') AND l.granted
  AND l.pid <> pg_backend_pid() AND l.mode IN ('RowExclusiveLock', 'ShareUpdateExclusiveLock',
  'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
ORDER BY l.pid
"""


def _inbox_holders(engine: sa.Engine) -> str | None:
    """What held ``webhook_events`` when an erasure's wait for it ran out, said for its error message, when
    it was not (only) deliveries being written: a VACUUM or autovacuum of the table (``SHARE UPDATE EXCLUSIVE``,
    held for its whole run: an autovacuum yields only to a lock request that waits ``deadlock_timeout``, and the
    erasure asks 50 ms at a time), or another session holding that mode or a stronger one. None when only
    writers held it, on MySQL/MariaDB and SQLite, or when the catalog could not be read (the wait's own error is
    what matters)."""
    if dialect_family(engine.dialect) != "postgresql":
        return None
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL statement_timeout = '2s'")
            rows = conn.execute(sa.text(_HOLDERS_SQL)).all()
    except sa.exc.SQLAlchemyError as exc:
        log.info("inbox_holders_not_read", error=str(store_error(exc)))
        return None
    vacuums = [row for row in rows if row.vacuum]
    if vacuums:
        kind = "autovacuum" if vacuums[0].auto else "VACUUM"
        return f"a VACUUM of webhook_events ({kind}, pid {vacuums[0].pid})"
    others = [row for row in rows if row.mode != "RowExclusiveLock"]
    if not others:
        return None
    return (f"a session holding webhook_events in {others[0].mode} (pid {others[0].pid}: a VACUUM or autovacuum, "
            "ANALYZE, CREATE INDEX CONCURRENTLY, an ALTER TABLE or a LOCK TABLE; see pg_stat_activity)")


def _pass_deletion_on(writer: Writer, outbox: Outbox, clerk_id: str) -> None:
    """The user was deleted before (Clerk's ``user.deleted``, an erasure run without the mapping or the hooks),
    so the tombstone changed nothing and told neither: the deletion goes to the app's mapped tables and the
    hooks now. The memberships deleted with the user go first, as they do on the deletion itself, with the
    version they had (ids only: a job repeats its idempotency key). The user's own change is the erasure's:
    versioned when it is erased, so its key is its own. With the deletion's version and key it repeated the
    ``user.deleted`` that hooks and forwarding receivers had already had (with the row's last values): one that
    deduplicates on the key, or ignores what is not newer than a deletion, dropped it and kept the values
    (review of the forwarding docs)."""
    u, m = users, organization_memberships
    row = writer.conn.execute(sa.select(u.c.clerk_updated_at, u.c.deleted_at).where(u.c.clerk_id == clerk_id)).first()
    if row is None or row.deleted_at is None:  # hard-deleted (its digest says nothing of when)
        outbox.record(Change(Entity.USER, clerk_id, "deleted", int(writer.now.timestamp() * 1000), {}))
        return
    columns = [m.c[name] for name in FIELDS[Entity.MEMBERSHIP]]
    members = writer.conn.execute(sa.select(*columns).where(m.c.user_clerk_id == clerk_id,
                                                             m.c.deleted_at == row.deleted_at)).all()
    # set-wise, as the deletion's own cascade (a user in thousands of organizations: a few statements)
    outbox.record_many([Change(Entity.MEMBERSHIP, values["clerk_id"], "deleted", row.clerk_updated_at, values)
                        for values in (dict(member._mapping) for member in members)])
    erased_at = max(int(writer.now.timestamp() * 1000), row.clerk_updated_at + 1)
    outbox.record(Change(Entity.USER, clerk_id, "deleted", erased_at, {}))


def _digests(conn: sa.Connection, entity: Entity, clerk_ids: list[str]) -> dict[str, datetime]:
    """The digests of ``clerk_ids`` recorded already, and when (a kept row's: its deletion): by Clerk id."""
    if not clerk_ids:
        return {}
    digests = {erased_digest(entity, i): i for i in clerk_ids}
    found = sa.select(erased.c.digest, erased.c.erased_at).where(erased.c.digest.in_(list(digests)))
    return {digests[digest]: at for digest, at in conn.execute(found)}


def _mark_erased(writer: Writer, entity: Entity, clerk_ids: list[str]) -> None:
    """Record the digests of ``clerk_ids`` (already recorded ones are left as they are)."""
    if not clerk_ids:
        return
    values = [{"digest": erased_digest(entity, i), "entity": entity.value, "erased_at": writer.now} for i in clerk_ids]
    family = dialect_family(writer.conn.dialect)
    if family == "mysql":
        mine = mysql.insert(erased)
        writer.conn.execute(mine.on_duplicate_key_update(digest=mine.inserted.digest), values)
    else:
        insert = postgresql.insert if family == "postgresql" else sqlite.insert
        writer.conn.execute(insert(erased).on_conflict_do_nothing(index_elements=["digest"]), values)


def _referred_to(exc: StoreError) -> bool:
    """A foreign key of an app's table refused the deletion (:func:`~clerk_sync._db_errors.is_row_referenced`)."""
    return is_row_referenced(getattr(exc.__cause__, "orig", None))


def _redactable_jobs(cutoff: datetime) -> list[sa.ColumnElement[bool]]:
    """Dead hook jobs queued before ``cutoff`` and not redacted yet (their payload has no ``redacted``)."""
    j = hook_jobs
    return [j.c.status == "dead", j.c.created_at < cutoff, REDACTED_MARK.is_(None)]


def _audit_ips_due(cutoff: datetime) -> list[sa.ColumnElement[bool]]:
    return [audit_log.c.ip.is_not(None), audit_log.c.created_at < cutoff]


def _deletable_jobs(cutoff: datetime) -> list[sa.ColumnElement[bool]]:
    return [hook_jobs.c.status == "dead", hook_jobs.c.created_at < cutoff]


def _emails(row: Any) -> set[str]:
    if row is None:
        return set()
    found = {row.email} if row.email else set()
    return found | {e for e in (row.email_addresses or []) if isinstance(e, str) and e}


def could_be_user_id(clerk_id: str) -> bool:
    """Not blank, no ``@`` (an e-mail address), no whitespace, no longer than a Clerk id
    (:func:`too_long_for_an_id`): erasing anything else tombstones nobody."""
    return bool(clerk_id) and "@" not in clerk_id and not any(c.isspace() for c in clerk_id) \
        and too_long_for_an_id(clerk_id) is None


def too_long_for_an_id(clerk_id: str) -> str | None:
    """Why ``clerk_id`` is no Clerk id when it is longer than any (the ``clerk_id`` columns hold
    ``CLERK_ID_CHARS``; PostgreSQL and MariaDB refused its tombstone with a database error, SQLite kept one for
    nobody), or None: every face's erase command says it so."""
    if len(clerk_id) <= CLERK_ID_CHARS:
        return None
    return (f"{clerk_id[:24]!r}... is {len(clerk_id)} characters long: not a Clerk user id (they have at most "
            f"{CLERK_ID_CHARS} characters); check that it was copied whole, and alone")


def _data_of(payload: Any) -> dict[str, Any] | None:
    """A stored payload's ``data`` object (read as stored text, :data:`_PAYLOAD`), or None (not JSON too)."""
    data = _as_dict(payload).get("data")
    return data if isinstance(data, dict) else None


def _mentioned(writer: Writer, clerk_id: str) -> bool:
    """Whether anything else shows the user was here: a membership row, or a stored payload that names the
    id where a user id goes (``data.user_id``, ``data.created_by``, ``data.public_user_data.user_id``,
    ``data.payer.user_id``: a session or membership event of a user whose own events never came, or were
    pruned). Compared exactly in Python: the text search alone would take an organization's id, or an id
    differing in case (SQLite's LIKE, a MariaDB ``_ci`` cast), for a user seen here."""
    m, e = organization_memberships, webhook_events
    if writer.conn.execute(sa.select(m.c.id).where(m.c.user_clerk_id == clerk_id).limit(1)).first() is not None:
        return True
    named = sa.select(_PAYLOAD).where(e.c.redacted_at.is_(None),
                                         # as a JSON string, quotes included: not "user_an" inside "user_ann"
                                         sa.cast(e.c.payload, sa.Text).contains(json.dumps(clerk_id), autoescape=True))
    result = writer.conn.execute(named.execution_options(yield_per=100))  # every candidate, to the first match
    try:
        for (payload,) in result:
            data = _data_of(payload)
            if data is not None and clerk_id in _user_ids_named(data):
                return True
    finally:
        result.close()
    return False


def _user_ids_named(data: dict[str, Any]) -> set[str]:
    found = [data.get("user_id"), data.get("created_by")]  # (an organization's creator)
    for parent in ("public_user_data", "payer"):
        inner = data.get(parent)
        if isinstance(inner, dict):
            found.append(inner.get("user_id"))
    return {value for value in found if isinstance(value, str)}  # (a list there: unhashable, and no id)


def _user_events(writer: Writer, clerk_id: str) -> tuple[bool, set[str]]:
    """Whether the user's own stored events (``user.*`` about ``clerk_id``, not redacted yet) exist, and
    the e-mail addresses and phone numbers they carry (an ``sms.created`` sent before sign-up completed
    names only the number)."""
    found: set[str] = set()
    seen = False
    for data in _own_user_events(writer, clerk_id):
        seen = True
        found.update(_addresses_of_user(data))
    return seen, found


def _own_user_events(writer: Writer, clerk_id: str) -> Iterator[dict[str, Any]]:
    """The data of the user's own stored ``user.*`` events not redacted yet (found by a text search, kept
    when ``data.id`` is theirs)."""
    e = webhook_events
    query = sa.select(_PAYLOAD).where(e.c.type.like("user.%"), e.c.redacted_at.is_(None),
                                         sa.cast(e.c.payload, sa.Text).contains(clerk_id, autoescape=True))
    for (payload,) in writer.conn.execute(query):
        data = _data_of(payload)
        if data is not None and data.get("id") == clerk_id:
            yield data


def _addresses_of_user(data: dict[str, Any]) -> list[str]:
    """The e-mail addresses and phone numbers a ``user.*`` event's data carries."""
    found = []
    for key, field in (("email_addresses", "email_address"), ("phone_numbers", "phone_number")):
        entries = data.get(key)  # (a signed event may carry anything here: stored as received, "cleaned")
        for entry in entries if isinstance(entries, list) else []:
            value = entry.get(field) if isinstance(entry, dict) else None
            if isinstance(value, str) and value.strip():
                found.append(value)
    return found


# Deliveries that tie an address or number to a user id: whose it is (the id) and what (the address).
_TYING = ("organizationMembership.%", "email.created", "sms.created", "organizationInvitation.accepted")


def _ties(event_type: str, data: dict[str, Any]) -> list[tuple[Any, Any]]:
    """``(user id, address or number)`` pairs one delivery ties (:data:`_TYING`): a membership's
    ``public_user_data.identifier`` (an address or an E.164 number; a username or wallet is not one: a short word
    would match other people's payloads), a mail's or text's recipient, an accepted invitation's invitee."""
    if event_type.startswith("organizationMembership."):
        member = data.get("public_user_data")
        if not isinstance(member, dict):
            return []
        value = member.get("identifier")
        if not (isinstance(value, str) and ("@" in value or _PHONE.fullmatch(value.strip()))):
            return []
        return [(member.get("user_id"), value)]
    field = {"email.created": "to_email_address", "sms.created": "to_phone_number",
             "organizationInvitation.accepted": "email_address"}.get(event_type)
    return [(data.get("user_id"), data.get(field))] if field else []


def _tied_to(writer: Writer, clerk_id: str) -> set[str]:
    """The e-mail addresses and phone numbers the user's stored deliveries other than ``user.*`` tie to them
    (:func:`_ties`): a member whose ``user.*`` events never came (synced before clerk-sync, or pruned) is known
    by address only there, and an invitation or ``email.created`` naming only that address stayed whole until
    its redaction by age; an address they were invited at is tied by the accepted invitation."""
    e = webhook_events
    query = sa.select(e.c.type, _PAYLOAD).where(
        sa.or_(*(e.c.type.like(t) for t in _TYING)), e.c.redacted_at.is_(None),
        sa.cast(e.c.payload, sa.Text).contains(clerk_id, autoescape=True))
    found: set[str] = set()
    for event_type, payload in writer.conn.execute(query):
        for owner, value in _ties(str(event_type), _data_of(payload) or {}):
            if owner == clerk_id and isinstance(value, str) and value.strip():
                found.add(value.strip())
    return found


def _holders_by_events(writer: Writer, clerk_id: str, addresses: Collection[str]) -> dict[str, set[str]]:
    """The live users other than ``clerk_id`` whose stored deliveries tie one of ``addresses`` to them now,
    with the ones each holds (e-mail addresses case-folded). Phone numbers are recycled and an address freed
    with an account is given again, to a user clerk-sync may know by deliveries only (no row holding it, or a
    number, which no row keeps): the erasure of the earlier holder must not redact the new one's data.

    Now: those their other deliveries tie (:func:`_ties`: a membership's identifier, a mail to them), and of
    their ``user.*`` events only the newest's (an older one that named the address says nothing of today:
    review; for a user with a row, only its numbers: the row says their e-mail addresses, :func:`_live_holders`).
    Live: not deleted, not erased."""
    def key(value: str) -> str:
        return value.strip().casefold() if "@" in value else value.strip()

    wanted = {key(a) for a in addresses if a and a.strip()}
    if not wanted:
        return {}
    e, lower = webhook_events, unicode_lower(writer.conn)
    query = sa.select(e.c.type, _PAYLOAD).where(
        sa.or_(e.c.type.like("user.%"), *(e.c.type.like(t) for t in _TYING)), e.c.redacted_at.is_(None),
        _may_name(lower, sa.cast(e.c.payload, sa.Text), Mentions(addresses)))
    tied: dict[str, set[str]] = {}  # by their other deliveries (:func:`_ties`)
    by_user_events: set[str] = set()  # named by a user.* event of theirs: judged by their newest
    for event_type, payload in writer.conn.execute(query):
        data = _data_of(payload) or {}
        user_event = str(event_type).startswith("user.")
        ties = ([(data.get("id"), value) for value in _addresses_of_user(data)] if user_event
                else _ties(str(event_type), data))
        for owner, value in ties:
            if isinstance(owner, str) and owner != clerk_id and isinstance(value, str) and key(value) in wanted:
                if user_event:
                    by_user_events.add(owner)
                else:
                    tied.setdefault(owner, set()).add(key(value))
    owners = sorted({*tied, *by_user_events})
    if not owners:
        return {}
    u = users
    rows = {row.clerk_id: row for row in writer.conn.execute(
        sa.select(u.c.clerk_id, u.c.deleted_at).where(u.c.clerk_id.in_(owners)))}
    found: dict[str, set[str]] = {}
    for owner in owners:
        if (owner in rows and rows[owner].deleted_at is not None) or (
                owner not in rows and is_erased(writer.conn, Entity.USER, owner)):
            continue
        held = set(tied.get(owner, ()))
        if owner in by_user_events:
            newest = {key(value) for value in _newest_addresses(writer, owner)} & wanted
            held |= {value for value in newest if owner not in rows or "@" not in value}  # (a row: its e-mails)
        if held:
            found[owner] = held
    return found


def _newest_addresses(writer: Writer, clerk_id: str) -> list[str]:
    """The e-mail addresses and numbers of the user's newest stored ``user.*`` event (by ``updated_at``)."""
    newest: tuple[float, list[str]] | None = None
    for data in _own_user_events(writer, clerk_id):
        at = data.get("updated_at")
        version = float(at) if isinstance(at, int | float) and not isinstance(at, bool) else float("-inf")
        if newest is None or version >= newest[0]:
            newest = (version, _addresses_of_user(data))
    return newest[1] if newest is not None else []


_PHONE = re.compile(r"\+[0-9]{6,15}")  # (E.164, as Clerk stores phone numbers)


def _redact_mentions(writer: Writer, mentions: Mentions, *, since: datetime | None = None) -> int:
    """Redact every stored payload (any status) that names the person: rows found by a text search, kept
    when their parsed payload names one of the needles as a whole (:class:`~clerk_sync._mentions.Mentions`).
    A ``last_error`` that names them is redacted too, also where the payload already was (an app's error
    message, a link refusal of an older release quoted the address); returns the payloads redacted.
    ``since``: only the rows received from then on."""
    e = webhook_events
    lower = unicode_lower(writer.conn)
    query = sa.select(e.c.id, _PAYLOAD, e.c.redacted_at, e.c.last_error).where(sa.or_(
        sa.and_(e.c.redacted_at.is_(None), _may_name(lower, sa.cast(e.c.payload, sa.Text), mentions)),
        sa.and_(e.c.last_error.is_not(None), e.c.last_error.not_in(_WRITTEN_ERRORS),
                _may_name(lower, e.c.last_error, mentions))))
    if since is not None:
        query = query.where(e.c.received_at >= since)
    payloads: list[tuple[int, Any]] = []
    errors: list[int] = []
    for row in writer.conn.execute(query):
        if row.redacted_at is None and mentions.in_document(_document_or_text(row.payload)):
            payloads.append((row.id, row.payload))
        elif mentions.in_text(row.last_error):
            errors.append(row.id)
    _store_redacted(writer, payloads)
    if errors:
        writer.conn.execute(e.update().where(e.c.id.in_(errors)).values(last_error=_REDACTED_ERROR))
    return len(payloads)


# Where another record may quote a person (a billing contact in an organization's metadata, a manager's address
# in a user's), and how many such places an erasure lists at most.
_ELSEWHERE: dict[sa.Table, tuple[str, ...]] = {
    users: ("public_metadata", "private_metadata", "unsafe_metadata"),
    organizations: ("name", "slug", "public_metadata", "private_metadata"),
}
_ELSEWHERE_MAX = 100


def _mentioned_elsewhere(writer: Writer, clerk_id: str, mentions: Mentions, created: Collection[str] = (),
                         holders: Mapping[str, Collection[str]] | None = None,
                         by_events: Mapping[str, Collection[str]] | None = None) -> tuple[str, ...]:
    """The other users' and organizations' columns that still hold the person's e-mail address or phone number
    (their Clerk id is left out: another record naming it is a pseudonymous reference, as a membership is), the
    live users of ``holders`` (:func:`_live_holders`: they hold one of the person's addresses now, which was
    not searched for), and the organizations of ``created`` (:func:`_organizations_created_by`) whose name or
    slug is set: an organization is often named after its creator ("Ada Lovelace's team", ``ada-lovelace``),
    and only a person can tell. Found by the same text search and exact test as the payloads; listed, not
    changed (see ErasureReport)."""
    contact = Mentions(n for n in mentions.needles if n != clerk_id)
    lower = unicode_lower(writer.conn)
    found: dict[tuple[str, str], list[str]] = {(users.name, holder): [_HOLDS_NOW] for holder in holders or {}}
    for holder, held in (by_events or {}).items():  # (:func:`_holders_by_events`: what the row does not say)
        if set(held) - set((holders or {}).get(holder, ())):
            found.setdefault((users.name, holder), []).append(_HOLDS_NOW_BY_EVENTS)
    for table, names in _ELSEWHERE.items() if contact else ():
        columns = [table.c[name] for name in names]
        query = sa.select(table.c.clerk_id, *columns).where(
            sa.or_(*(_may_name(lower, sa.cast(column, sa.Text), contact) for column in columns)))
        if table is users:
            query = query.where(users.c.clerk_id != clerk_id)
        for row in writer.conn.execute(query.order_by(table.c.id)):
            held = [name for name in names if contact.in_document(_json_value(row._mapping[name]))]
            if held:
                found[(table.name, row.clerk_id)] = [", ".join(held)]
            if len(found) >= _ELSEWHERE_MAX:
                return _listed(found)
    o = organizations
    named = sa.select(o.c.clerk_id, o.c.name, o.c.slug).where(o.c.clerk_id.in_(sorted(created)),
                                                              sa.or_(o.c.name.is_not(None), o.c.slug.is_not(None)))
    for row in writer.conn.execute(named.order_by(o.c.id)) if created else ():
        kept = ", ".join(name for name in ("name", "slug") if row._mapping[name] is not None)
        found.setdefault((o.name, row.clerk_id), []).append(f"created by them ({kept})")
        if len(found) >= _ELSEWHERE_MAX:
            break
    return _listed(found)


# What ``mentioned_elsewhere`` says of a live user who holds one of the person's addresses now.
_HOLDS_NOW = ("email (a live user holds this address now: it was not searched for, what names only it was "
              "left whole)")


_HOLDS_NOW_BY_EVENTS = ("stored deliveries (a live user's: they hold this address or number now: it was not "
                        "searched for, what names only it was left whole)")


def _live_holders(conn: Connection, clerk_id: str | None, addresses: Collection[str]) -> dict[str, set[str]]:
    """The live users (other than ``clerk_id``) that hold one of ``addresses`` now (``email`` or
    ``email_addresses``), with the ones each holds (case-folded). Clerk frees an address when its account is
    deleted: a payload, hook job or audit row naming it may be the new holder's, which an erasure of the old
    one must not redact (their pending jobs would get an empty change, their deliveries no replay)."""
    folded = {a.casefold() for a in addresses if a}
    if not folded:
        return {}
    u, lower = users, unicode_lower(conn)
    query = sa.select(u.c.clerk_id, u.c.email, u.c.email_addresses).where(
        u.c.deleted_at.is_(None), u.c.clerk_id != (clerk_id or ""),
        sa.or_(u.c.email.in_(sorted(addresses)), lower(u.c.email).in_(sorted(folded)),
               _may_name(lower, sa.cast(u.c.email_addresses, sa.Text), Mentions(addresses))))
    found: dict[str, set[str]] = {}
    for row in conn.execute(query.order_by(u.c.id)):
        held = {a.casefold() for a in _emails(row)} & folded
        if held:
            found[row.clerk_id] = held
    return found


def _listed(found: Mapping[tuple[str, str], list[str]]) -> tuple[str, ...]:
    return tuple(f"{table} {clerk_id}: {'; '.join(notes)}" for (table, clerk_id), notes in found.items())


def _organizations_created_by(writer: Writer, clerk_id: str) -> set[str]:
    """The organizations the user created, as the stored deliveries not redacted yet say it (an organization
    event's ``data.created_by``, a membership event's ``data.organization.created_by``): clerk-sync's tables do
    not keep the creator, so an organization whose events were all redacted (``redact_after``) or deleted is not
    found. Compared exactly in Python, as :func:`_mentioned` does. Read before the erasure redacts them."""
    e = webhook_events
    query = sa.select(e.c.type, _PAYLOAD).where(
        e.c.redacted_at.is_(None), e.c.type.like("organization%"),
        sa.cast(e.c.payload, sa.Text).contains(json.dumps(clerk_id), autoescape=True))
    found: set[str] = set()
    result = writer.conn.execute(query.execution_options(yield_per=100))
    try:
        for event_type, payload in result:
            data = _data_of(payload)
            org = data if data is not None and str(event_type).startswith("organization.") else \
                (data or {}).get("organization")
            if isinstance(org, dict) and org.get("created_by") == clerk_id and isinstance(org.get("id"), str):
                found.add(org["id"])
    finally:
        result.close()
    return found


def _json_value(value: Any) -> Any:
    """A JSON column's value parsed (SQLite may hand back text), a text column's as it is."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _may_name(lower: Any, text: Any, mentions: Mentions) -> sa.ColumnElement[bool]:
    """The text search that finds every row whose ``text`` may name the person (:meth:`Mentions.patterns`)."""
    return sa.or_(*(folded_like(lower, text, n) for n in mentions.patterns()))


def _redact_audit(writer: Writer, clerk_id: str, mentions: Mentions) -> int:
    """Clear the ``ip`` of the audit rows the user made, or made impersonating someone, and redact the
    ``details`` that name them (a reason or an error message quoting their address); returns the rows changed.
    The Clerk id columns stay: pseudonymous, they keep who did what on record."""
    a = audit_log
    theirs = sa.or_(a.c.actor_clerk_id == clerk_id, a.c.impersonator_clerk_id == clerk_id)
    query = sa.select(a.c.id, a.c.ip, a.c.actor_clerk_id, a.c.impersonator_clerk_id, a.c.details).where(sa.or_(
        sa.and_(a.c.ip.is_not(None), theirs),
        _may_name(unicode_lower(writer.conn), sa.cast(a.c.details, sa.Text), mentions)))
    ips: list[int] = []
    details: list[dict[str, Any]] = []
    for row in writer.conn.execute(query):
        if row.ip is not None and clerk_id in (row.actor_clerk_id, row.impersonator_clerk_id):
            ips.append(row.id)
        if mentions.in_document(_as_dict(row.details)):
            details.append({"row_id": row.id, "new_details": _redacted_details(_as_dict(row.details), mentions)})
    if ips:
        writer.conn.execute(a.update().where(a.c.id.in_(ips)).values(ip=None))
    _store_audit_details(writer, details)
    return len(set(ips) | {d["row_id"] for d in details})


def _redact_audit_details(writer: Writer, mentions: Mentions) -> int:
    """Redact the ``details`` of the audit rows that name ``mentions``; returns the rows changed."""
    a = audit_log
    query = sa.select(a.c.id, a.c.details).where(_may_name(unicode_lower(writer.conn), sa.cast(a.c.details, sa.Text),
                                                           mentions))
    details = [{"row_id": row.id, "new_details": _redacted_details(_as_dict(row.details), mentions)}
               for row in writer.conn.execute(query) if mentions.in_document(_as_dict(row.details))]
    _store_audit_details(writer, details)
    return len(details)


def _store_audit_details(writer: Writer, details: list[dict[str, Any]]) -> None:
    if details:
        a = audit_log
        writer.conn.execute(a.update().where(a.c.id == sa.bindparam("row_id")).values(
            details=sa.bindparam("new_details", type_=a.c.details.type)), details)


def _redacted_details(details: Mapping[str, Any], mentions: Mentions) -> dict[str, Any]:
    """An audit row's ``details`` without what names the person: the keys whose name and value do not, marked
    ``redacted``. The one form migration 0013's triggers let an UPDATE write: keys of the old object with
    their values unchanged, and the marker. A key that is not printable ASCII, or holds ``"`` or ``\\``, goes too:
    MySQL's JSON path names each key kept, as written (none of clerk-sync's own keys is such). Details the
    database cannot read (NaN, nesting MariaDB rejects: recorded by releases before ``record_audit`` refused
    them) become the marker alone, the one redaction migration 0019 lets an UPDATE write there."""
    if not readable_details(details):
        return {"redacted": True}
    kept = {k: v for k, v in details.items() if k != "redacted" and k.isascii() and k.isprintable()
            and '"' not in k and "\\" not in k and not mentions.in_text(k) and not mentions.in_document(v)}
    return {**kept, "redacted": True}


def _store_redacted(writer: Writer, rows: list[tuple[int, Any]]) -> None:
    """Store these payloads redacted, their ``last_error`` too; a ``failed`` one is settled ``skipped`` in the
    same statement (:data:`_SETTLED_ERROR`: nothing is left to replay)."""
    if not rows:
        return
    e = webhook_events
    failed = e.c.status == DeliveryStatus.FAILED.value
    # (status set last, in that order: MySQL's SET reads the columns assigned before it, as assigned)
    stmt = e.update().where(e.c.id == sa.bindparam("row_id")).ordered_values(
        (e.c.payload, sa.bindparam("new_payload", type_=e.c.payload.type)), (e.c.redacted_at, writer.now),
        (e.c.last_error, sa.case((failed, _SETTLED_ERROR), (e.c.last_error.is_not(None), _REDACTED_ERROR))),
        (e.c.applied_at, sa.case((failed, sa.literal(writer.now, e.c.applied_at.type)), else_=e.c.applied_at)),
        (e.c.status, sa.case((failed, DeliveryStatus.SKIPPED.value), else_=e.c.status)))
    writer.conn.execute(stmt, [{"row_id": i, "new_payload": redact_payload(_as_dict(p))} for i, p in rows])


def _settle_redacted_failed(writer: Writer, ids: list[int]) -> None:
    """Settle ``failed`` deliveries whose payloads were redacted before (on arrival, about a user deleted or
    erased already; by a release that left them failed) as :func:`_store_redacted` settles the ones it redacts."""
    if ids:
        e = webhook_events
        writer.conn.execute(e.update().where(e.c.id.in_(ids), e.c.status == DeliveryStatus.FAILED.value).values(
            status=DeliveryStatus.SKIPPED.value, last_error=_SETTLED_ERROR, applied_at=writer.now))


def settle_if_stored_redacted(writer: Writer, svix_id: str) -> bool:
    """Settle a delivery just stored ``failed`` if it was stored redacted (ingest: its user was deleted or
    erased before it came), as prune would on its next pass: a replay could only settle it, and left ``failed``
    it would fail doctor and raise the failed-backlog alert in between. Whether it was settled."""
    e = webhook_events
    done = writer.conn.execute(e.update().where(
        e.c.svix_id == svix_id, e.c.status == DeliveryStatus.FAILED.value, e.c.redacted_at.is_not(None)).values(
        status=DeliveryStatus.SKIPPED.value, last_error=_SETTLED_ERROR, applied_at=writer.now))
    return bool(done.rowcount)


def _about_gone_user(conn: sa.Connection, payload: Any, cutoff: datetime) -> bool:
    """Whether a stored delivery is about a user deleted before ``cutoff``, or hard-deleted (its digest).

    Its user is :func:`~clerk_sync.engine.user_named`'s, or, where that refuses an id padded with whitespace
    (``" user_1"``: never applied, on purpose), the id trimmed, for this decision only: such a delivery fails
    on every replay, and it is about that user all the same, so it is redacted once they are gone (it was kept
    whole for good). An id no trimming makes readable (not a string, too long) names nobody: kept whole."""
    raw = _as_dict(payload)
    data = raw.get("data")
    if not isinstance(data, dict) or not isinstance(raw.get("type"), str):
        return False
    person = user_named(Envelope(type=raw["type"], data=data, timestamp_ms=0, instance_id=None, raw=dict(raw))) \
        or user_named(Envelope(type=raw["type"], data=_trimmed(data), timestamp_ms=0, instance_id=None, raw={}))
    if person is None:
        return False
    deleted_at: datetime | None = conn.execute(sa.select(users.c.deleted_at).where(users.c.clerk_id == person)).scalar()
    if deleted_at is not None:
        return aware(deleted_at) < cutoff
    return is_erased(conn, Entity.USER, person)


def _trimmed(value: Any) -> Any:
    """``value`` (a parsed JSON document) with every string stripped of surrounding whitespace."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return {k: _trimmed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trimmed(v) for v in value]
    return value


def _due_tombstones(table: sa.Table, cutoff: datetime) -> sa.Select[Any]:
    """The tombstones of ``table`` deleted before ``cutoff``, in id order: what a pass (or its dry run) erases."""
    return sa.select(table.c.id, table.c.clerk_id, table.c.deleted_at).where(
        table.c.deleted_at.is_not(None), table.c.deleted_at < cutoff).order_by(table.c.id)


def _settled(digest_written: datetime, settled: datetime) -> bool:
    """A digest written before ``settled`` (``digest_settle`` ago): no insert can still read from before it."""
    return aware(digest_written) < settled


#: An inbox payload as the text stored (parsed by :func:`_as_dict`, row by row): on MariaDB the column is text,
#: and one row that is not JSON (edited by hand) failed the fetch of its whole batch while parsed there, and so
#: every prune pass, every retention step after it, dry runs too.
_PAYLOAD = stored_text(webhook_events.c.payload).label("payload")


def _document_or_text(payload: Any) -> Any:
    """A stored payload parsed, or its text when it is not JSON (MariaDB keeps one edited by hand): an erasure
    searches that text for the person and redacts it whole (its parsed read failed the whole erasure)."""
    if isinstance(payload, str):
        try:
            return json.loads(payload)
        except ValueError:
            return payload
    return payload


def _as_dict(payload: Any) -> Mapping[str, Any]:
    """A stored payload's document; ``{}`` for one that is not a JSON object (not JSON at all: redacted whole)."""
    document = _document_or_text(payload)
    return document if isinstance(document, Mapping) else {}


def _not_cleared(table: sa.Table) -> sa.ColumnElement[bool]:
    """True while any personal column of ``table`` still holds something."""
    conditions: list[sa.ColumnElement[bool]] = []
    for name, empty in _CLEARED[table].items():
        column = table.c[name]
        if empty is None:
            conditions.append(column.is_not(None))
        else:
            conditions.append(sa.cast(column, sa.Text) != json.dumps(empty))
    return sa.or_(*conditions)
