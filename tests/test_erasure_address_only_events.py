"""An erasure reaches the stored deliveries and hook jobs that hold the person's e-mail address and no user id:
``waitlistEntry.*`` (the address, and its invitation's), ``organizationInvitation.*`` (the invitee's address).

Found by the address the erasure knows (the user's row, their stored ``user.*`` events), in any case of its
letters; and, for a user deleted in Clerk whose tombstone prune has cleared (the address forgotten, a later
erasure cannot search for it), by prune as it clears the tombstone. Clerk's own example payloads
(tests/fixtures/clerk/examples), through ``WebhookProcessor``, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from clerk_sync.changes import Event, Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs, webhook_events
from tests import factories as f
from tests.test_event_hooks import example, send
from tests.test_hooks import B, deliver, hooked

USER = "user_waitlisted"
ADDRESS = "john.doe@example.com"  # the address in Clerk's waitlist examples
OTHER = "someone.else@example.com"


def crm_refuses(event: Event) -> None:
    """A handler whose error message quotes the address (kept in the job's last_error)."""
    raise RuntimeError(f"CRM refused {event.data.get('email_address')}")


def holding(store: Store, address: str) -> list[str]:
    """Where ``address`` (any case) is still stored: the inbox rows' svix ids and the hook jobs' keys."""
    found = []
    with store.connect() as conn:
        for svix_id, payload in conn.execute(sa.select(webhook_events.c.svix_id, webhook_events.c.payload)):
            text = payload if isinstance(payload, str) else json.dumps(payload)
            if address in text.lower():
                found.append(svix_id)
        for key, payload, error in conn.execute(sa.select(hook_jobs.c.idempotency_key, hook_jobs.c.payload,
                                                          hook_jobs.c.last_error)):
            text = (payload if isinstance(payload, str) else json.dumps(payload)) + (error or "")
            if address in text.lower():
                found.append(key)
    return sorted(found)


def waitlisted(address: str, entry: str) -> list[tuple[dict[str, Any], str]]:
    created = example("waitlistEntry.created", id=entry, email_address=address)
    updated = example("waitlistEntry.updated", id=entry, email_address=address)
    updated["data"]["invitation"]["email_address"] = address
    return [(created, f"msg_{entry}_created"), (updated, f"msg_{entry}_updated")]


def test_an_erasure_redacts_the_waitlist_and_invitation_events_and_jobs_holding_only_the_address(
        db_url: str) -> None:
    store = hooked(db_url, Hook("crm", crm_refuses, on=["waitlistEntry.*", "organizationInvitation.*"]))
    for event, svix_id in [*waitlisted("John.Doe@Example.COM", "wle_1"), *waitlisted(OTHER, "wle_2")]:
        assert send(store, event, svix_id) == "ignored"
    invited = example("organizationInvitation.created", email_address=ADDRESS)
    assert send(store, invited, "msg_invited") == "ignored"
    deliver(store, f.envelope("user.created", f.user(USER, B, email=ADDRESS)))  # signed up once invited
    Dispatcher(store).run_once()  # the handler fails: the jobs wait, their last error quoting the address
    assert holding(store, ADDRESS)
    report = Retention(store).erase_user(USER, reason="DSR")
    assert holding(store, ADDRESS) == []
    assert report.payloads_redacted >= 4  # the three events and the user's own
    assert len(holding(store, OTHER)) == 4  # another person's: their two deliveries and two jobs, whole
    store.dispose()
