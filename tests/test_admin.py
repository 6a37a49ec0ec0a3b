"""Role promotion and impersonation against the emulator, with the audit trail."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import JWKSKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.auth.users import read_user
from clerk_sync.clerk_api import ClerkClient, RetryPolicy
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import AccessDenied, ClerkPaymentRequired, StoreError
from clerk_sync.events import user_record
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, pending_role_changes
from clerk_sync.testing import EmulatorServer


def synced_user(emu: EmulatorServer, store: Store, email: str, role: str = "user") -> str:
    user = emu.create_user(email, first_name="T", public_metadata={"role": role})
    with store.transaction() as w:
        w.apply(Upsert(Entity.USER, user_record(user)))
    return str(user["id"])


def audit_rows(store: Store) -> list[dict[str, Any]]:
    with store.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(audit_log).order_by(audit_log.c.id)).mappings()]


def test_admin_promotes_user_in_clerk_and_db_with_audit(emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    admin = synced_user(emu, store, "admin@example.com", role="admin")
    target = synced_user(emu, store, "bob@example.com")
    change = actions.promote(target, "admin", by=admin, ip="203.0.113.9")
    assert (change.status, change.previous_role) == ("applied", "user")
    assert emu.request("GET", f"/v1/users/{target}")["public_metadata"]["role"] == "admin"
    db = read_user(store, target)
    assert db is not None and db.role == "admin" and db.public_metadata["role"] == "admin"
    [row] = audit_rows(store)
    assert (row["action"], row["actor_clerk_id"], row["target_clerk_id"], row["ip"]) == ("role.changed", admin, target, "203.0.113.9")
    assert row["details"] == {"from": "user", "to": "admin"}


def test_non_admin_cannot_promote_and_the_refusal_is_audited(emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    mallory = synced_user(emu, store, "mallory@example.com")
    with pytest.raises(AccessDenied):
        actions.promote(mallory, "admin", by=mallory)
    assert emu.request("GET", f"/v1/users/{mallory}")["public_metadata"].get("role") == "user"
    assert [r["action"] for r in audit_rows(store)] == ["role.change.refused"]


def test_a_role_change_clerk_refuses_for_good_is_audited(emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    """Review finding: a promotion Clerk refused for good (no such user) left no audit row, while the same
    refusal of a queued change (``retry_pending``) and of an impersonation is audited."""
    from clerk_sync.errors import ClerkNotFound

    admin = synced_user(emu, store, "admin@example.com", role="admin")
    with pytest.raises(ClerkNotFound):
        actions.promote("user_nobody", "admin", by=admin, ip="203.0.113.9")
    [row] = audit_rows(store)
    assert (row["action"], row["actor_clerk_id"], row["target_clerk_id"], row["ip"]) == (
        "role.change_failed", admin, "user_nobody", "203.0.113.9")
    assert row["details"]["to"] == "admin" and row["details"]["from"] is None and row["details"]["error"]


def test_clerk_outage_records_pending_then_retry_converges(emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    target = synced_user(emu, store, "carol@example.com")
    emu.set_faults(outage=True)
    change = actions.promote(target, "admin", by=None)
    assert change.status == "pending"
    db = read_user(store, target)
    assert db is not None and db.role == "user"  # never ahead of Clerk
    assert actions.retry_pending() == {"applied": 0, "pending": 1, "failed": 0}
    emu.set_faults(outage=False)
    assert actions.retry_pending() == {"applied": 1, "pending": 0, "failed": 0}
    db = read_user(store, target)
    assert db is not None and db.role == "admin"
    assert emu.request("GET", f"/v1/users/{target}")["public_metadata"]["role"] == "admin"
    with store.connect() as conn:
        pending = conn.execute(sa.select(pending_role_changes)).mappings().one()
    assert pending["done_at"] is not None and pending["attempts"] == 3
    assert [r["action"] for r in audit_rows(store)] == ["role.change_pending", "role.changed"]


def test_impersonation_yields_an_act_session_and_is_audited(emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    admin = synced_user(emu, store, "root@example.com", role="admin")
    target = synced_user(emu, store, "dave@example.com")
    grant = actions.start_impersonation(admin, target, ip="198.51.100.7")
    assert grant.method == "actor_token" and grant.expires_in_s <= 300
    [row] = audit_rows(store)
    assert (row["action"], row["actor_clerk_id"], row["target_clerk_id"]) == ("impersonation.granted", admin, target)
    accepted = emu.request("POST", f"/_emulator/actor_tokens/{row['details']['grant_id']}/accept")
    with httpx.Client() as http:
        verifier = SessionVerifier(JWKSKeySource(f"{emu.api_url}/jwks", client=http,
                                                 headers={"Authorization": f"Bearer {emu.secret_key}"}), ClaimsValidator())
        auth = verifier.verify(accepted["jwt"])
    assert auth.user_id == target and auth.is_impersonated and auth.actor_id == admin


def test_non_admin_impersonation_is_refused_and_audited(emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    eve = synced_user(emu, store, "eve@example.com")
    target = synced_user(emu, store, "frank@example.com")
    with pytest.raises(AccessDenied):
        actions.start_impersonation(eve, target)
    assert [r["action"] for r in audit_rows(store)] == ["impersonation.refused"]


def test_audit_log_is_append_only(emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    eve = synced_user(emu, store, "eve2@example.com")
    with pytest.raises(AccessDenied):
        actions.promote(eve, "admin", by=eve)
    with pytest.raises(StoreError, match="append-only"), store.transaction() as w:
        w.conn.execute(audit_log.update().values(action="nothing.happened"))
    with pytest.raises(StoreError, match="append-only"), store.transaction() as w:
        w.conn.execute(audit_log.delete())
    assert [r["action"] for r in audit_rows(store)] == ["role.change.refused"]


def test_impersonation_falls_back_to_a_sign_in_token(store: Store) -> None:
    """A plan without actor tokens left: Clerk answers ``POST /actor_tokens`` 402 (the emulator's
    ``actor_tokens_per_month``), which the real client raises as :class:`ClerkPaymentRequired` (review: a
    test double raised a 422 the client never does, and the 402 skipped the fallback and the audit)."""
    with EmulatorServer(actor_tokens_per_month=0, rate_limit_requests=1000) as plan, \
            ClerkClient(plan.secret_key, api_url=plan.url, retry=RetryPolicy(attempts=1, deadline_s=2)) as client:
        admin = synced_user(plan, store, "ops@example.com", role="admin")
        target = synced_user(plan, store, "gina@example.com")
        with pytest.raises(ClerkPaymentRequired, match="allows 0 impersonations a month"):
            AdminActions(store, client).start_impersonation(admin, target)  # no silent, unmarked session by default
        fallback = AdminActions(store, client, sign_in_token_fallback=True)
        grant = fallback.start_impersonation(admin, target, expires_in_s=3600)
        assert grant.method == "sign_in_token"
        assert grant.expires_in_s == 300  # capped at five minutes
        assert grant.token
        failed, granted = audit_rows(store)
        assert failed["action"] == "impersonation.failed" and "impersonations a month" in failed["details"]["error"]
        assert granted["details"]["method"] == "sign_in_token"


def test_a_stale_pending_change_never_overrides_a_newer_one(emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    target = synced_user(emu, store, "henry@example.com")
    emu.set_faults(outage=True)
    assert actions.promote(target, "admin", by=None).status == "pending"
    emu.set_faults(outage=False)
    assert actions.promote(target, "user", by=None).status == "applied"  # the newer decision
    assert actions.retry_pending() == {"applied": 0, "pending": 0, "failed": 0}
    assert emu.request("GET", f"/v1/users/{target}")["public_metadata"]["role"] == "user"
    db = read_user(store, target)
    assert db is not None
    assert db.role == "user"


def test_a_permanently_refused_pending_change_does_not_block_the_queue(
    emu: EmulatorServer, store: Store, actions: AdminActions
) -> None:
    gone = synced_user(emu, store, "ivy@example.com")
    kept = synced_user(emu, store, "jack@example.com")
    emu.set_faults(outage=True)
    actions.promote(gone, "admin", by=None)
    actions.promote(kept, "admin", by=None)
    emu.set_faults(outage=False)
    emu.request("DELETE", f"/v1/users/{gone}")
    assert actions.retry_pending() == {"applied": 1, "pending": 0, "failed": 1}
    assert emu.request("GET", f"/v1/users/{kept}")["public_metadata"]["role"] == "admin"
    assert "role.change_failed" in [r["action"] for r in audit_rows(store)]


def test_an_erased_users_queued_role_change_is_never_pushed(emu: EmulatorServer, store: Store,
                                                             actions: AdminActions) -> None:
    """Privacy review: a role change queued while Clerk was down stayed open through the user's erasure, and
    `retry-pending` then set it in Clerk and audited it (`role.changed`) for a user erased here."""
    from clerk_sync.retention import Retention

    target = synced_user(emu, store, "erin@example.com")
    emu.set_faults(outage=True)
    assert actions.promote(target, "admin", by=None).status == "pending"
    emu.set_faults(outage=False)
    Retention(store).erase_user(target)
    assert actions.retry_pending() == {"applied": 0, "pending": 0, "failed": 0}
    assert emu.request("GET", f"/v1/users/{target}")["public_metadata"].get("role") == "user"
    with store.connect() as conn:
        pending = conn.execute(sa.select(pending_role_changes)).mappings().one()
    assert pending["done_at"] is not None and pending["last_error"] == "the user was erased: not pushed"
    settled = [] if store.dialect == "sqlite" else ["user.erasure_settled"]  # (its wait for deliveries in flight)
    assert [r["action"] for r in audit_rows(store)] == ["role.change_pending", "user.erased", *settled]


def test_a_role_change_queued_for_a_user_deleted_since_is_closed_not_pushed(emu: EmulatorServer, store: Store,
                                                                            actions: AdminActions) -> None:
    """Review of the erasure fix: only the changes open when the erasure ran were closed; one queued for a user
    deleted (or erased) afterwards, or deleted by Clerk's own event, was still pushed by `retry-pending`."""
    from clerk_sync.engine import Tombstone

    target = synced_user(emu, store, "gil@example.com")
    emu.set_faults(outage=True)
    assert actions.promote(target, "admin", by=None).status == "pending"
    emu.set_faults(outage=False)
    with store.transaction() as w:  # Clerk's user.deleted, applied here (Clerk still answers for the user)
        w.apply(Tombstone(Entity.USER, target, 10**13))
    assert actions.retry_pending() == {"applied": 0, "pending": 0, "failed": 1}
    assert emu.request("GET", f"/v1/users/{target}")["public_metadata"].get("role") == "user"
    assert [r["action"] for r in audit_rows(store)] == ["role.change_pending", "role.change_refused"]
    assert "deleted or erased" in audit_rows(store)[-1]["details"]["reason"]
    assert actions.retry_pending() == {"applied": 0, "pending": 0, "failed": 0}  # closed: once


def test_a_queued_role_change_is_not_pushed_over_a_newer_state_from_clerk(emu: EmulatorServer, store: Store,
                                                                          actions: AdminActions) -> None:
    """Review: a promotion queued during an outage, then the role set in Clerk's Dashboard (incident response:
    the user's admin taken back there, its `user.updated` applied here): `retry-pending` pushed the stale role,
    in Clerk and here. A row written since the change was queued means Clerk holds a newer state: the change is
    closed unpushed, audited with the reason; asked again, it is applied (its audit row says from what)."""
    target = synced_user(emu, store, "hal@example.com")
    emu.set_faults(outage=True)
    assert actions.promote(target, "admin", by=None).status == "pending"
    emu.set_faults(outage=False)
    changed = emu.request("PATCH", f"/v1/users/{target}", json={"public_metadata": {"role": "user", "plan": "x"}})
    with store.transaction() as w:  # its user.updated, applied here
        w.apply(Upsert(Entity.USER, user_record(changed)))
    assert actions.retry_pending() == {"applied": 0, "pending": 0, "failed": 1}
    assert emu.request("GET", f"/v1/users/{target}")["public_metadata"]["role"] == "user"
    db = read_user(store, target)
    assert db is not None and db.role == "user"
    refused = audit_rows(store)[-1]
    assert refused["action"] == "role.change_refused", refused
    assert "changed in Clerk since it was queued (their role is user now)" in refused["details"]["reason"]
    assert actions.retry_pending() == {"applied": 0, "pending": 0, "failed": 0}  # closed: once
    emu.set_faults(outage=True)
    assert actions.promote(target, "admin", by=None).status == "pending"
    emu.set_faults(outage=False)
    assert actions.retry_pending() == {"applied": 1, "pending": 0, "failed": 0}  # nothing newer: pushed
    assert audit_rows(store)[-1]["details"] == {"from": "user", "to": "admin", "pending_id": 2}


def test_a_role_change_for_a_deleted_or_erased_user_is_refused_before_clerk(emu: EmulatorServer, store: Store,
                                                                           actions: AdminActions) -> None:
    """Review: `promote` (and the console's role change, which calls it) on a user deleted here set the role in
    Clerk (which may still hold an erased user), answered "applied", and audited `role.changed` for a change the
    database never made (its guarded upsert refused Clerk's answer). Refused first now, audited, 410."""
    from clerk_sync.engine import Tombstone
    from clerk_sync.errors import UserDeleted

    target = synced_user(emu, store, "ida@example.com")
    with store.transaction() as w:
        w.apply(Tombstone(Entity.USER, target, 10**13))
    with pytest.raises(UserDeleted, match=f"{target} was deleted or erased"):
        actions.promote(target, "admin", by=None)
    assert emu.request("GET", f"/v1/users/{target}")["public_metadata"].get("role") == "user"
    refused = audit_rows(store)[-1]
    assert refused["action"] == "role.change_refused" and refused["details"]["to"] == "admin", refused


def test_an_admin_asking_to_impersonate_themself_is_audited(emu: EmulatorServer, store: Store,
                                                            actions: AdminActions) -> None:
    """Refusals are audited, the docstring says: this one was not (review)."""
    admin = synced_user(emu, store, "jo@example.com", role="admin")
    with pytest.raises(AccessDenied, match="themself"):
        actions.start_impersonation(admin, admin)
    refused = audit_rows(store)[-1]
    assert (refused["action"], refused["actor_clerk_id"], refused["target_clerk_id"]) == (
        "impersonation.refused", admin, admin)
    assert refused["details"] == {"reason": "self"}


def test_two_retry_pending_runs_at_once_push_a_change_once(emu: EmulatorServer, store: Store,
                                                           actions: AdminActions) -> None:
    """Review: the cron overlapping `users promote --retry-pending` (or two hosts' crons) both pushed the same
    queued change, two calls to Clerk and two `role.changed` rows in the append-only log for one request. A run
    claims a change first (migration 0021); the other passes it over, counted still pending. Run B starts while
    run A is inside its call to Clerk (events, not timing)."""
    import threading

    target = synced_user(emu, store, "kim@example.com")
    emu.set_faults(outage=True)
    assert actions.promote(target, "admin", by=None).status == "pending"
    emu.set_faults(outage=False)
    in_push, release = threading.Event(), threading.Event()

    class Held:  # run A's Clerk: holds its push until run B has run
        def __getattr__(self, name: str) -> Any:
            return getattr(actions.clerk, name)

        def update_user_metadata(self, *args: Any, **kwargs: Any) -> Any:
            in_push.set()
            assert release.wait(30)
            return actions.clerk.update_user_metadata(*args, **kwargs)

    results: list[dict[str, int]] = []
    run_a = threading.Thread(target=lambda: results.append(AdminActions(store, Held()).retry_pending()))
    run_a.start()
    try:
        assert in_push.wait(30)
        assert actions.retry_pending() == {"applied": 0, "pending": 1, "failed": 0}  # B: A holds it
    finally:
        release.set()
        run_a.join(30)
    assert results == [{"applied": 1, "pending": 0, "failed": 0}]
    assert [r["action"] for r in audit_rows(store)] == ["role.change_pending", "role.changed"]
    assert actions.retry_pending() == {"applied": 0, "pending": 0, "failed": 0}  # closed, its claim let go


def test_a_queued_change_clerk_applied_before_its_answer_was_lost_is_pushed_not_refused(
        emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    """Review: a push that timed out after Clerk applied it is queued; Clerk's `user.updated` then writes the row
    with the role asked for. That is no newer state to protect: the change is pushed (it changes nothing) and
    audited `role.changed`, not refused."""
    target = synced_user(emu, store, "lee@example.com")
    emu.set_faults(outage=True)
    assert actions.promote(target, "admin", by=None).status == "pending"
    emu.set_faults(outage=False)
    applied = emu.request("PATCH", f"/v1/users/{target}", json={"public_metadata": {"role": "admin"}})
    with store.transaction() as w:  # its user.updated, applied here
        w.apply(Upsert(Entity.USER, user_record(applied)))
    assert actions.retry_pending() == {"applied": 1, "pending": 0, "failed": 0}
    assert [r["action"] for r in audit_rows(store)] == ["role.change_pending", "role.changed"]
