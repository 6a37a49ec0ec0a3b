"""Erasing a user whose e-mail address a live user holds now leaves that user's data whole.

Clerk frees an address when its account is deleted, and anyone may sign up with it again. An erasure of the
old account searches the stored deliveries, hook jobs and audit details for the person's id and addresses: an
address another live user holds now names that user too, so it is not searched for (the old user's own events
carry their id, and are redacted by it), and the report names where it is held (``mentioned_elsewhere``).
On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.changes import Hook
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, hook_jobs, users, webhook_events
from tests import factories as f
from tests.test_hooks import B, deliver, hooked

OLD, NEW = "user_old_holder", "user_new_holder"
ADDRESS = "shared.addr@example.com"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def inbox(store: Store) -> dict[str, tuple[bool, str]]:
    """Each stored delivery by the user it is about: (redacted, payload as text)."""
    with store.connect() as conn:
        rows = conn.execute(sa.select(webhook_events.c.type, webhook_events.c.redacted_at,
                                      webhook_events.c.payload).order_by(webhook_events.c.id)).all()
    found: dict[str, tuple[bool, str]] = {}
    for event_type, redacted_at, payload in rows:
        data = json.loads(_text(payload))["data"]
        found[f"{event_type} {data['id']}"] = (redacted_at is not None, _text(payload))
    return found


def job_payloads(store: Store) -> dict[str, str]:
    """Each hook job's payload as text, by its Clerk id and kind."""
    with store.connect() as conn:
        rows = conn.execute(sa.select(hook_jobs.c.payload, hook_jobs.c.status)).all()
    found: dict[str, str] = {}
    for payload, status in rows:
        document = json.loads(_text(payload))
        assert status == "pending"
        found[f"{document['clerk_id']} {document['kind']}"] = _text(payload)
    return found


def _new_user(held_as: str) -> dict[str, Any]:
    if held_as == "primary":
        return f.user(NEW, B + 200, email=ADDRESS, first_name="Bea")
    data = f.user(NEW, B + 200, email="bea@example.com", first_name="Bea")  # the address as a second one
    data["email_addresses"].append({"id": "idn_second", "object": "email_address", "email_address": ADDRESS,
                                    "linked_to": [], "verification": None})
    return data


@pytest.mark.parametrize("held_as", ["primary", "secondary"])
def test_erasing_an_addresss_previous_holder_leaves_its_live_holders_data_whole(db_url: str, held_as: str) -> None:
    store = hooked(db_url, Hook("crm", lambda _: None))
    assert deliver(store, f.envelope("user.created", f.user(OLD, B, email=ADDRESS)),
                   f.envelope("user.deleted", f.deleted("user", OLD))) == ["applied", "applied"]
    assert deliver(store, f.envelope("user.created", _new_user(held_as))) == ["applied"]
    with store.connect() as conn:
        new_row = conn.execute(sa.select(users).where(users.c.clerk_id == NEW)).mappings().one()
    jobs_before, events_before = job_payloads(store), inbox(store)

    report = Retention(store).erase_user(OLD, reason="DSR")

    events = inbox(store)
    assert events[f"user.created {NEW}"] == events_before[f"user.created {NEW}"]  # not redacted: replayable
    assert not events[f"user.created {NEW}"][0]
    assert ADDRESS in events[f"user.created {NEW}"][1]
    assert events[f"user.created {OLD}"][0] and events[f"user.deleted {OLD}"][0]
    assert ADDRESS not in events[f"user.created {OLD}"][1]
    jobs = job_payloads(store)
    assert jobs[f"{NEW} created"] == jobs_before[f"{NEW} created"]  # the welcome mail still gets its values
    assert ADDRESS in jobs[f"{NEW} created"]
    assert ADDRESS not in jobs[f"{OLD} created"] and json.loads(jobs[f"{OLD} created"])["redacted"]
    with store.connect() as conn:
        assert conn.execute(sa.select(users).where(users.c.clerk_id == NEW)).mappings().one() == new_row
    held = [entry for entry in report.mentioned_elsewhere if entry.startswith(f"users {NEW}:")]
    assert len(held) == 1 and "holds this address now" in held[0], report.mentioned_elsewhere
    advice = report.elsewhere_advice()
    assert advice is not None and NEW in advice and "not searched" in advice
    assert ADDRESS not in advice  # (ids and columns, never the values)
    store.dispose()


def test_an_address_only_a_deleted_user_holds_now_is_still_searched(db_url: str) -> None:
    """The address went to a user deleted since: nobody live holds it, so what names it is redacted."""
    store = hooked(db_url, Hook("crm", lambda _: None))
    assert deliver(store, f.envelope("user.created", f.user(OLD, B, email=ADDRESS)),
                   f.envelope("user.deleted", f.deleted("user", OLD)),
                   f.envelope("user.created", _new_user("primary")),
                   f.envelope("user.deleted", f.deleted("user", NEW))) == ["applied"] * 4
    report = Retention(store).erase_user(OLD, reason="DSR")
    assert inbox(store)[f"user.created {NEW}"][0]  # names the address: redacted, as before
    assert not [entry for entry in report.mentioned_elsewhere if entry.startswith(f"users {NEW}:")]
    store.dispose()


def audit_details(store: Store, action: str) -> dict[str, Any]:
    with store.connect() as conn:
        details = conn.execute(sa.select(audit_log.c.details).where(audit_log.c.action == action)).scalar_one()
    return dict(json.loads(_text(details)))


@pytest.mark.parametrize("by", ["erasure", "prune"])
def test_an_audit_row_naming_the_live_holders_address_stays_whole(db_url: str, by: str) -> None:
    """Erasing the old user, or prune clearing their tombstone (which forgets the address, so redacts the audit
    rows naming it), leaves the details of an audit row about the address's live holder whole."""
    store = hooked(db_url)
    assert deliver(store, f.envelope("user.created", f.user(OLD, B, email=ADDRESS)),
                   f.envelope("user.deleted", f.deleted("user", OLD)),
                   f.envelope("user.created", _new_user("primary"))) == ["applied"] * 3
    with store.transaction() as writer:
        record_audit(writer, AuditEntry("user.promoted", "user_admin", NEW, details={"email": ADDRESS}))
    if by == "erasure":
        Retention(store).erase_user(OLD, reason="DSR")
    else:
        assert Retention(store).prune().cleared == 1
    assert audit_details(store, "user.promoted") == {"email": ADDRESS}
    store.dispose()
