"""Privileged actions: role promotion (DB + Clerk metadata) and impersonation, each audited.

Clerk is the source of truth for ``public_metadata.role``: a promotion writes Clerk first and then
stores Clerk's answer through the same guarded upsert as webhooks, so the two never disagree. If
Clerk is unreachable the change is recorded in ``pending_role_changes`` (and audited as pending);
:meth:`AdminActions.retry_pending` pushes it later. The DB role never changes ahead of Clerk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa

from clerk_sync._limits import ROLE_CHARS, show
from clerk_sync._time import as_utc, utcnow
from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.auth.users import AuthUser, load_user, read_user, standing_error
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import (
    AccessDenied,
    AmbiguousUser,
    ClerkAPIError,
    ClerkNotFound,
    ClerkPaymentRequired,
    ClerkUnauthorized,
    ClerkValidationError,
    InvalidRole,
    RateLimited,
    UserDeleted,
    UserLocked,
)
from clerk_sync.errors import ClerkUnavailable as _ClerkUnavailable
from clerk_sync.events import user_record
from clerk_sync.store import Store, Writer, is_erased
from clerk_sync.tables import pending_role_changes, users

__all__ = ["ADMIN_ROLE", "AdminActions", "ClerkAdminAPI", "Impersonation", "RoleChange", "check_role"]

ADMIN_ROLE = "admin"
MAX_IMPERSONATION_S = 300
# How long the impersonated session itself may last (Clerk's own default, asked for explicitly): the
# token above only bounds how long the link can be redeemed.
IMPERSONATION_SESSION_S = 1800
# The longest impersonated session start_impersonation asks for (session_max_s): Clerk's API spec says only
# "integer" (POST /actor_tokens session_max_duration_in_seconds, default 1800) and sets no maximum, so an app
# endpoint forwarding the value could mint an impersonation of any length. One hour: twice Clerk's default.
MAX_IMPERSONATION_SESSION_S = 3600
_RETRYABLE = (_ClerkUnavailable, RateLimited)


def _check_session_max_s(session_max_s: object) -> None:
    """Refuse an impersonated session's length that is not 1 to MAX_IMPERSONATION_SESSION_S whole seconds."""
    if (not isinstance(session_max_s, int) or isinstance(session_max_s, bool)
            or not 1 <= session_max_s <= MAX_IMPERSONATION_SESSION_S):
        raise ValueError(f"session_max_s (how long the impersonated session may last) must be a whole number of "
                         f"seconds from 1 to {MAX_IMPERSONATION_SESSION_S} (MAX_IMPERSONATION_SESSION_S), not "
                         f"{show(session_max_s)}")


class ClerkAdminAPI(Protocol):
    """The Clerk calls admin actions need (``clerk_api.ClerkClient`` provides them)."""

    def update_user_metadata(
        self, user_id: str, *, public_metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]: ...

    def create_actor_token(self, user_id: str, actor: dict[str, Any], *, expires_in_seconds: int | None = None,
                           session_max_duration_in_seconds: int | None = None) -> dict[str, Any]: ...

    def create_sign_in_token(self, user_id: str, *, expires_in_seconds: int | None = None) -> dict[str, Any]: ...

    def get_user(self, user_id: str) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class RoleChange:
    """Outcome of :meth:`AdminActions.promote`: ``applied`` or ``pending`` (Clerk unreachable: ``error``
    says why; the database keeps the previous role until :meth:`AdminActions.retry_pending` reaches Clerk)."""

    user_clerk_id: str
    role: str
    status: str
    previous_role: str | None
    error: str | None = None

    def pending_advice(self, retry_command: str) -> str:
        """What a command line says of a pending change: why, and what pushes it (``retry_command``)."""
        kept = f"the role {self.previous_role!r}" if self.previous_role is not None else "no role"
        return (f"Clerk was not reached ({self.error}); the change is recorded and the database keeps {kept} "
                f"until it reaches Clerk: run `{retry_command}` (from cron, say) once Clerk answers")


@dataclass(frozen=True, slots=True)
class Impersonation:
    """A short-lived way in as ``target``: an actor token (``act`` in the session) or a sign-in token."""

    target: str
    actor: str
    method: str
    token: str
    url: str | None
    expires_in_s: int


def check_role(role: object) -> None:
    """Raise :class:`InvalidRole` unless ``role`` is a string the users table holds as given (1 to
    ``ROLE_CHARS`` characters, no whitespace around it, no control character)."""
    if not isinstance(role, str):
        raise InvalidRole(f"a role is a string, not {type(role).__name__}")
    if not role.strip():
        raise InvalidRole("the role is blank: pass the role to set, e.g. 'admin' ('user' to demote)")
    if len(role) > ROLE_CHARS:
        raise InvalidRole(f"the role is {len(role)} characters, more than the {ROLE_CHARS} the users table holds")
    if role != role.strip() or any(not ch.isprintable() for ch in role):
        raise InvalidRole(f"the role {show(role)} has whitespace around it or a control character: pass it "
                          "as the app checks it")


_PUSH_CLAIM = timedelta(minutes=5)  # how long a retry-pending run holds a change it pushes (past Clerk's deadline)


class AdminActions:
    """Promotion and impersonation with their audit trail."""

    def __init__(self, store: Store, clerk: ClerkAdminAPI, *, sign_in_token_fallback: bool = False,
                 impersonator_roles: frozenset[str] | None = frozenset({ADMIN_ROLE}),
                 wall: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        # UTC clock: a fetched user's lockout end (Clerk's answer time + its remaining seconds), and whether an
        # admin's lock still holds (Clerk's lockout expires by itself)
        self._wall = wall
        self.clerk = clerk
        self.sign_in_token_fallback = sign_in_token_fallback
        # Roles that may impersonate (``CLERK_IMPERSONATOR_ROLES``, as the Authenticator's): nobody holding
        # one may be impersonated, nor an admin, or an admin could act with a peer's powers under their name.
        self.impersonator_roles = impersonator_roles

    # -- roles -----------------------------------------------------------------------------------
    def promote(self, target: str, role: str, *, by: str | None, ip: str | None = None,
                audit_details: Mapping[str, Any] | None = None) -> RoleChange:
        """Set ``public_metadata.role`` in Clerk and the DB; ``by`` must be an admin (None = CLI operator).
        A role this database could not hold as given is refused first (:class:`InvalidRole`): Clerk would
        store it, and the webhook would then apply the least-privileged role in its place. ``audit_details``: added
        to the audit rows' details (the console's ``{"via": "console", "as": ...}``: where the change came from,
        ``by`` being None for the CLI and the console's operator token alike)."""
        extra = dict(audit_details or {})
        if by is not None:  # first: a non-admin's attempt is refused and audited whatever the role
            self._require_admin(by, action="role.change", target=target, ip=ip)
        check_role(role)
        with self.store.connect() as conn:
            before = load_user(conn, target)
            gone = _refusal_of_target(conn, target, before)
        previous = before.role if before else None
        if gone is not None:  # (Clerk may still hold an erased user: the role would be set there, and audited as
            # a change the database never made, its guarded upsert refusing the answer)
            with self.store.transaction() as w:
                record_audit(w, AuditEntry("role.change_refused", by, target,
                                           details={**extra, "from": previous, "to": role, "reason": gone}, ip=ip))
            raise UserDeleted(f"{target} {gone.removeprefix('the user ')}")
        try:
            clerk_user = self.clerk.update_user_metadata(target, public_metadata={"role": role})
        except _RETRYABLE as exc:
            self._record_pending(target, role, by, ip, previous, str(exc), extra)
            return RoleChange(target, role, "pending", previous, str(exc))
        except ClerkUnauthorized:
            raise  # our secret key refused: says nothing of this change (as retry_pending)
        except ClerkAPIError as exc:  # refused for good (no such user, a value refused): the attempt audited,
            with self.store.transaction() as w:  # as a queued change refused later is, and a failed impersonation
                record_audit(w, AuditEntry("role.change_failed", by, target,
                                           details={**extra, "from": previous, "to": role, "error": str(exc)}, ip=ip))
            raise
        entry = AuditEntry("role.changed", by, target, details={**extra, "from": previous, "to": role}, ip=ip)
        self._store_clerk_user(clerk_user, entry)
        return RoleChange(target, role, "applied", previous)

    def retry_pending(self) -> dict[str, int]:
        """Push pending role changes to Clerk, the newest per user only (older ones are superseded).

        Returns counts by outcome: applied, pending (Clerk still unreachable), failed (Clerk refused
        it for good, e.g. the user was deleted: recorded and audited, so it does not block the queue).
        Clerk refusing the key itself (:class:`~clerk_sync.errors.ClerkUnauthorized`) stops the run and
        raises, every change left queued: it says nothing of the changes.
        """
        p = pending_role_changes
        with self.store.connect() as conn:
            rows = conn.execute(sa.select(p).where(p.c.done_at.is_(None)).order_by(p.c.id.desc())).mappings().all()
        newest: dict[str, Any] = {}
        for row in rows:
            newest.setdefault(row["user_clerk_id"], row)
        counts = {"applied": 0, "pending": 0, "failed": 0}
        # Who may still ask is judged once, before any change is pushed: pushed in turn, an admin demoted by
        # an earlier change in the queue would lose their own (a compromised admin's "demote A" queued before
        # A's "demote them" must not win the race).
        refusals = {row["id"]: self._requester_refusal(row["requested_by"]) for row in newest.values()}
        for row in reversed(list(newest.values())):
            claim = self._claim_push(row["id"])
            if claim != "taken":  # another run pushes it now (theirs to apply and audit), or it was closed since
                counts["pending"] += claim == "held"
                continue
            try:
                self._push_pending(row, refusals[row["id"]], counts)
            finally:
                self._unclaim_push(row["id"])
        return counts

    def _claim_push(self, pending_id: int) -> str:
        """Take the open change ``pending_id`` for this run's push (``"taken"``), unless another run holds it
        (``"held"``: two runs at once pushed it twice and audited it twice, review) or it was closed since
        (``"closed"``); a claim a run that died left expires."""
        p = pending_role_changes
        with self.store.transaction() as w:
            taken = w.conn.execute(p.update().where(
                p.c.id == pending_id, p.c.done_at.is_(None),
                sa.or_(p.c.pushing_until.is_(None), p.c.pushing_until < w.now)).values(
                pushing_until=w.now + _PUSH_CLAIM)).rowcount
            if taken:
                return "taken"
            done = w.conn.execute(sa.select(p.c.done_at).where(p.c.id == pending_id)).scalar_one_or_none()
        return "held" if done is None else "closed"

    def _unclaim_push(self, pending_id: int) -> None:
        p = pending_role_changes
        with self.store.transaction() as w:
            w.conn.execute(p.update().where(p.c.id == pending_id).values(pushing_until=None))

    def _push_pending(self, row: Any, refusal: str | None, counts: dict[str, int]) -> None:
        """One claimed change of :meth:`retry_pending`: refused, closed, pushed, or left queued; counted."""
        p = pending_role_changes
        if refusal is not None:  # an admin's request is theirs while they are one: not after a demotion
            self._refuse_pending(row, refusal)
            counts["failed"] += 1
            return
        gone = self._target_gone(row["id"], row["user_clerk_id"], queued_at=row["created_at"], wanted=row["role"])
        if gone is not None:  # closed meanwhile (an erasure), its user deleted or erased, or changed in Clerk,
            # since it was queued
            if gone:
                self._refuse_pending(row, gone)
                counts["failed"] += 1
            return
        try:
            patch = {"role": row["role"]}
            clerk_user = self.clerk.update_user_metadata(row["user_clerk_id"], public_metadata=patch)
        except _RETRYABLE as exc:
            with self.store.transaction() as w:
                w.conn.execute(p.update().where(p.c.id == row["id"])
                               .values(attempts=p.c.attempts + 1, last_error=str(exc)))
            counts["pending"] += 1
            return
        except ClerkUnauthorized:
            raise  # a wrong or rotated CLERK_SECRET_KEY refuses every change alike: close none of them
        except ClerkAPIError as exc:
            with self.store.transaction() as w:
                self._close_pending(w, row["user_clerk_id"], error=str(exc))
                record_audit(w, AuditEntry("role.change_failed", row["requested_by"], row["user_clerk_id"],
                                           details={"to": row["role"], "error": str(exc)}))
            counts["failed"] += 1
            return
        previous = read_user(self.store, row["user_clerk_id"])
        entry = AuditEntry("role.changed", row["requested_by"], row["user_clerk_id"],
                           details={"from": previous.role if previous else None, "to": row["role"],
                                    "pending_id": row["id"]})
        self._store_clerk_user(clerk_user, entry)
        counts["applied"] += 1

    def _refuse_pending(self, row: Any, reason: str) -> None:
        """Close the user's pending changes unpushed and audit why (``role.change_refused``)."""
        with self.store.transaction() as w:
            self._close_pending(w, row["user_clerk_id"], error=reason)
            record_audit(w, AuditEntry("role.change_refused", row["requested_by"], row["user_clerk_id"],
                                       details={"to": row["role"], "reason": reason, "pending_id": row["id"]}))

    def _target_gone(self, pending_id: int, target: str, *, queued_at: datetime | None = None,
                     wanted: str | None = None) -> str | None:
        """Read just before the push: ``""`` when the change was closed meanwhile (an erasure closes its user's),
        a reason when its user has been deleted or erased (Clerk may still hold an erased user: the push would
        set the role there and audit it), or their row written since ``queued_at`` (a webhook, reconcile or JIT
        sync brought a newer state from Clerk: a role set in the Dashboard during the outage, a compromised
        admin's role taken back there, would be undone by the push), else None."""
        p = pending_role_changes
        with self.store.connect() as conn:
            if conn.execute(sa.select(p.c.done_at).where(p.c.id == pending_id)).scalar_one_or_none() is not None:
                return ""
            return _refusal_of_target(conn, target, load_user(conn, target), since=queued_at, wanted=wanted)

    def _requester_refusal(self, requested_by: str | None) -> str | None:
        """Why a queued change may no longer be pushed: its admin was demoted, banned or deleted since
        asking (None = the CLI operator, or still an admin)."""
        if requested_by is None:
            return None
        user = read_user(self.store, requested_by)
        refusal = None if user is None else standing_error(user, self._now_ms())
        # (locked: a temporary lockout after failed sign-ins, not a judgement on the admin)
        if user is None or user.role != ADMIN_ROLE or (refusal is not None and not isinstance(refusal, UserLocked)):
            return (f"{requested_by}, who asked for it, is no longer an admin in good standing: not pushed "
                    "(ask again as an admin, or from the CLI)")
        return None

    def _now_ms(self) -> int:
        return int(as_utc(self._wall()).timestamp() * 1000)  # (a naive clock is UTC, not the host's zone)

    def _store_clerk_user(self, clerk_user: dict[str, Any], entry: AuditEntry) -> None:
        """Store Clerk's answer, audit it, and close the user's pending changes: they are older
        than what Clerk now holds, so pushing them later would undo this change."""
        record = user_record(clerk_user, fetched_ms=self._now_ms())  # just answered: a lockout's time base
        with self.store.transaction() as w:
            w.apply(Upsert(Entity.USER, record))
            record_audit(w, entry)
            self._close_pending(w, str(clerk_user["id"]), error=None)

    @staticmethod
    def _close_pending(w: Writer, user_clerk_id: str, *, error: str | None) -> None:
        p = pending_role_changes
        w.conn.execute(p.update().where(p.c.user_clerk_id == user_clerk_id, p.c.done_at.is_(None))
                       .values(done_at=w.now, attempts=p.c.attempts + 1, last_error=error))

    def _record_pending(self, target: str, role: str, by: str | None, ip: str | None, previous: str | None,
                        error: str, extra: Mapping[str, Any]) -> None:
        with self.store.transaction() as w:
            w.conn.execute(pending_role_changes.insert().values(
                user_clerk_id=target, role=role, requested_by=by, attempts=1, last_error=error, created_at=w.now))
            record_audit(w, AuditEntry("role.change_pending", by, target,
                                       details={**extra, "from": previous, "to": role, "error": error}, ip=ip))

    # -- impersonation ---------------------------------------------------------------------------
    def start_impersonation(self, admin: str, target: str, *, ip: str | None = None,
                            expires_in_s: int = MAX_IMPERSONATION_S,
                            session_max_s: int = IMPERSONATION_SESSION_S) -> Impersonation:
        """Ask Clerk for an actor token (redeemable ≤ 5 min, its session lasting ``session_max_s``). Non-admins
        are refused, and refusals are audited. The session ends sooner if the admin stops being one
        (:class:`~clerk_sync.auth.authenticator.Authenticator` checks the actor on every request).

        With ``sign_in_token_fallback`` (off by default), a refused actor token falls back to a sign-in
        token. Its session is an ordinary session of the target: no ``act`` claim, so the impersonation
        guards and per-request audit cannot see it. Only the grant itself is audited.

        ``session_max_s`` is a whole number of seconds from 1 to :data:`MAX_IMPERSONATION_SESSION_S` (an hour);
        another value raises ``ValueError`` naming the bound before anything is read or asked of Clerk.
        """
        _check_session_max_s(session_max_s)
        self._require_admin(admin, action="impersonation", target=target, ip=ip)
        if admin == target:  # (refusals are audited: this one too)
            with self.store.transaction() as w:
                record_audit(w, AuditEntry("impersonation.refused", admin, target, details={"reason": "self"}, ip=ip))
            raise AccessDenied("an admin cannot impersonate themself")
        self._require_unprivileged_target(admin, target, ip)
        ttl = max(1, min(expires_in_s, MAX_IMPERSONATION_S))
        try:
            grant = self.clerk.create_actor_token(target, {"sub": admin}, expires_in_seconds=ttl,
                                                  session_max_duration_in_seconds=session_max_s)
            method = "actor_token"
        except (ClerkValidationError, ClerkNotFound, ClerkPaymentRequired) as exc:
            # 402: the plan has no actor tokens left (5 a month on free plans); 404: no such user, for which a
            # sign-in token fails too
            if not self.sign_in_token_fallback or isinstance(exc, ClerkNotFound):
                entry = AuditEntry("impersonation.failed", admin, target, details={"error": str(exc)}, ip=ip)
                with self.store.transaction() as w:
                    record_audit(w, entry)
                raise
            grant = self.clerk.create_sign_in_token(target, expires_in_seconds=ttl)
            method = "sign_in_token"
        result = Impersonation(target, admin, method, str(grant.get("token", "")), grant.get("url"), ttl)
        with self.store.transaction() as w:
            details = {"method": method, "expires_in_s": ttl, "grant_id": grant.get("id")}
            if method == "actor_token":
                details["session_max_s"] = session_max_s
            record_audit(w, AuditEntry("impersonation.granted", admin, target, details=details, ip=ip))
        return result

    def _require_unprivileged_target(self, admin: str, target: str, ip: str | None) -> None:
        """Refuse (audited) a target who is an admin or holds a role that may impersonate. A target with no row
        here yet is judged by its role in Clerk: a JIT sync would hand the session that role."""
        user = read_user(self.store, target)
        role: object
        if user is not None:
            role = user.role
        else:
            try:
                metadata = self.clerk.get_user(target).get("public_metadata")
            except ClerkAPIError as exc:
                with self.store.transaction() as w:
                    record_audit(w, AuditEntry("impersonation.failed", admin, target, details={"error": str(exc)},
                                               ip=ip))
                raise
            role = metadata.get("role") if isinstance(metadata, dict) else None
            role = role if isinstance(role, str) else None  # as a JIT sync reads it: no role, the least privilege
        if role not in {ADMIN_ROLE} | set(self.impersonator_roles or ()):
            return
        reason = f"the target holds the role {show(role)}, which may administer or impersonate"
        with self.store.transaction() as w:
            record_audit(w, AuditEntry("impersonation.refused", admin, target, details={"reason": reason}, ip=ip))
        raise AccessDenied(f"cannot impersonate {target}: {reason} (acting as them would use their powers under "
                           "their name); demote the user first if you must act as them, or ask them directly")

    def _require_admin(self, clerk_id: str, *, action: str, target: str, ip: str | None) -> AuthUser:
        user = read_user(self.store, clerk_id)
        if user is None or user.role != ADMIN_ROLE or standing_error(user, self._now_ms()) is not None:
            with self.store.transaction() as w:
                record_audit(w, AuditEntry(f"{action}.refused", clerk_id, target,
                                           details={"reason": "not an admin"}, ip=ip))
            raise AccessDenied(f"{action} requires the {ADMIN_ROLE!r} role")
        return user


def no_user_found(email: str, reconcile: str) -> str:
    """What a face says when :func:`find_user_by_email` found no one (``reconcile``: its reconcile command)."""
    named = "id" if email.startswith("user_") and "@" not in email else "primary e-mail"
    return (f"no live synced user with the {named} {email!r}: not synced yet (run `{reconcile}`), or deleted (a "
            "deleted or erased user takes no role)")


def find_user_by_email(store: Store, email: str) -> str | None:
    """The Clerk id of the live user with this primary e-mail (for the CLI), None if there is none; a Clerk
    user id (``user_...``) names its live user directly. Several live users can share an address for a while
    (it moved to another user, whose update came first): :class:`AmbiguousUser` lists them instead of picking
    one, since promoting the wrong person is worse than asking."""
    u = users
    named = (u.c.clerk_id == email.strip() if email.startswith("user_") and "@" not in email
             else sa.func.lower(u.c.email) == email.strip().lower())
    with store.connect() as conn:
        found = list(conn.execute(sa.select(u.c.clerk_id).where(named, u.c.deleted_at.is_(None))
                                  .order_by(u.c.clerk_id).limit(10)).scalars())
    if len(found) > 1:
        raise AmbiguousUser(f"{len(found)} live users have the primary e-mail {email!r} ({', '.join(found)}): an "
                            "address that moved to another user whose update came first, or rows from another "
                            "Clerk instance; nothing was changed: pass the Clerk id of the one you mean instead")
    return found[0] if found else None


def _refusal_of_target(conn: sa.Connection, target: str, user: AuthUser | None, *,
                       since: datetime | None = None, wanted: str | None = None) -> str | None:
    """Why a role may not be set on ``target`` (``user``: its row, read on ``conn``) now: deleted or erased, or
    (``since``: a queued change) their row written after it was queued, unless it holds the ``wanted`` role already
    (a push that timed out after Clerk applied it: its webhook wrote the row; pushed again, it changes nothing);
    None when it may."""
    if (user is not None and user.is_deleted) or (user is None and is_erased(conn, Entity.USER, target)):
        return f"the user was deleted or erased{' since it was queued' if since is not None else ''}: not pushed"
    if since is not None and user is not None and user.role != wanted:
        written = conn.execute(sa.select(users.c.updated_at).where(users.c.clerk_id == target)).scalar_one_or_none()
        if written is not None and as_utc(written) > as_utc(since):
            return (f"the user changed in Clerk since it was queued (their role is {user.role} now): not pushed, "
                    "so a newer change made there is not undone; ask again if it still stands")
    return None
