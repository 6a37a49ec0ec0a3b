"""Clerk Billing events an organization pays (``payer.organization_id``; Clerk leaves the payer's ``user_id``,
names empty then, per its webhooks spec's ``BillingPayerEventPayload``): their subject is the billed object as
for a user's, and once the organization is deleted they are stored, and reach their hooks, reduced, as the
events of a deleted user are (live, and replayed), the organization's id kept.

Clerk's own example payloads (tests/fixtures/clerk/examples) with the payer made an organization, through
``WebhookProcessor`` on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from clerk_sync.changes import Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.ingest import replay_deliveries
from clerk_sync.store import Store
from clerk_sync.tables import webhook_events
from tests import factories as f
from tests.test_event_hooks import Events, drain, example, send
from tests.test_hooks import B, deliver, hooked, jobs

ORG = "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S"
BILLING_EMAIL = "billing@acme-payer.example"
ORG_NAME = "Acme Payer Inc"


def org_payer(organization_id: str = ORG) -> dict[str, Any]:
    """The example's payer as Clerk sends an organization's: ``user_id`` and the names empty."""
    payer = example("subscriptionItem.active")["data"]["payer"]
    return payer | {"user_id": "", "first_name": "", "last_name": "", "email": BILLING_EMAIL,
                    "organization_id": organization_id, "organization_name": ORG_NAME}


def stored(store: Store, svix_id: str) -> dict[str, Any]:
    with store.connect() as conn:
        payload = conn.execute(sa.select(webhook_events.c.payload).where(webhook_events.c.svix_id == svix_id)).scalar()
    return json.loads(payload) if isinstance(payload, str) else dict(payload)


def test_an_organizations_billing_event_is_kept_whole_while_it_exists_and_reduced_once_deleted(db_url: str) -> None:
    handler = Events()
    store = hooked(db_url, Hook("plans", handler, on=["subscriptionItem.*", "paymentAttempt.*"]))
    deliver(store, f.envelope("organization.created", f.organization(ORG, B, name=ORG_NAME)))
    live = example("subscriptionItem.active", payer=org_payer())
    assert send(store, live, "msg_live") == "ignored"
    deliver(store, f.envelope("organization.deleted", f.deleted("organization", ORG)))
    assert send(store, example("subscriptionItem.ended", payer=org_payer()), "msg_late") == "ignored"
    attempt = example("paymentAttempt.updated")
    attempt["data"]["payer"] |= {"user_id": "", "organization_id": ORG, "email": BILLING_EMAIL}
    assert send(store, attempt, "msg_attempt") == "ignored"
    other = example("subscriptionItem.canceled", id="item_other", payer=org_payer("org_other"))
    assert send(store, other, "msg_other") == "ignored"  # another organization, not deleted: kept whole
    for svix_id in ("msg_late", "msg_attempt"):
        assert BILLING_EMAIL not in json.dumps(stored(store, svix_id))
        assert stored(store, svix_id)["data"]["payer"]["organization_id"] == ORG
    assert BILLING_EMAIL in json.dumps(stored(store, "msg_other"))
    assert not any(BILLING_EMAIL in json.dumps(j["payload"]) for j in jobs(store)
                   if j["idempotency_key"].endswith(("msg_late", "msg_attempt")))
    drain(Dispatcher(store))
    got = {e.svix_id: e for e in handler.seen}
    assert not got["msg_live"].redacted and got["msg_live"].data == live["data"]  # before the deletion: whole
    assert got["msg_live"].subject == "csub_item_2g7np7Hrk0SN6kj5EDMLDaKNL0S"  # the item, as for a user payer
    late = got["msg_late"]
    assert late.redacted and late.subject == "csub_item_2g7np7Hrk0SN6kj5EDMLDaKNL0S"
    assert late.data["payer"] == {"id": org_payer()["id"], "user_id": "", "organization_id": ORG}
    assert ORG_NAME not in json.dumps(late.data) and BILLING_EMAIL not in json.dumps(late.data)
    assert got["msg_attempt"].redacted and got["msg_attempt"].data["payer"]["organization_id"] == ORG
    assert not got["msg_other"].redacted and got["msg_other"].data["payer"]["email"] == BILLING_EMAIL
    store.dispose()


def test_a_replayed_event_of_an_organization_deleted_since_is_reduced_as_a_live_one(db_url: str) -> None:
    plain = hooked(db_url)  # no hook yet
    deliver(plain, f.envelope("organization.created", f.organization(ORG, B, name=ORG_NAME)))
    send(plain, example("subscriptionItem.active", payer=org_payer()), "msg_before")  # it exists: stored whole
    deliver(plain, f.envelope("organization.deleted", f.deleted("organization", ORG)))
    plain.dispose()
    handler = Events()
    store = hooked(db_url, Hook("plans", handler, on=["subscriptionItem.*"]))
    assert replay_deliveries(store, status="ignored", with_hooks=True).events == 1
    drain(Dispatcher(store))
    (replayed,) = handler.seen
    assert replayed.redacted and replayed.data["payer"]["organization_id"] == ORG
    assert BILLING_EMAIL not in json.dumps(replayed.data)
    assert BILLING_EMAIL not in json.dumps(stored(store, "msg_before"))  # and the inbox row, as a live one
    store.dispose()
