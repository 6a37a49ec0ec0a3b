"""The ``type`` label of ``clerk_sync_webhook_events_total`` names every webhook event type Clerk documents, each
its own, and nothing else: the set is derived here from Clerk's vendored data (the webhooks spec's
``x-webhooks``, its example payloads, the types Clerk lists outside the spec), so a type Clerk adds is a change
to the fixtures, then to ``KNOWN_EVENT_TYPES``. A signed type outside it is ``"other"``: a sender cannot grow the
label set (one series per type it makes up)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import yaml

from clerk_sync.ingest import WebhookProcessor
from clerk_sync.metrics import KNOWN_EVENT_TYPES, Metrics, event_type_label
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import CLERK_FIXTURES
from tests.test_operations import Scrape


def documented_event_types() -> set[str]:
    """Every event type in Clerk's webhooks spec, its examples, and the list of those documented outside it."""
    spec = yaml.safe_load((CLERK_FIXTURES / "openapi" / "webhooks" / "2025-04-15.yml").read_text())
    in_spec = set(spec["x-webhooks"])
    examples = {p.stem for p in (CLERK_FIXTURES / "examples").glob("*.json")}
    outside = set(json.loads((CLERK_FIXTURES / "event-types-outside-spec.json").read_text())["types"])
    assert len(in_spec) == 45 and examples == in_spec and not outside & in_spec  # the fixtures read as expected
    return in_spec | outside


DOCUMENTED = sorted(documented_event_types())


@pytest.mark.parametrize("event_type", DOCUMENTED, ids=DOCUMENTED)
def test_every_documented_event_type_has_its_own_label(event_type: str) -> None:
    assert event_type_label(event_type) == event_type


def test_the_label_set_is_the_documented_types_and_other_only() -> None:
    assert set(KNOWN_EVENT_TYPES) == set(DOCUMENTED)  # nothing undocumented: each series is one Clerk sends
    for made_up in ("subscriptionItem.resumed", "invitation.Created", "user.created ", "x" * 200, ""):
        assert event_type_label(made_up) == "other"


def _event(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"object": "event", "type": event_type, "timestamp": 1_800_000_000_000,
            "instance_id": "ins_2g7np7Hrk0SN6kj5EDMLDaKNL0S", "data": data}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # (the label is the metrics', not the store's)
def test_signed_deliveries_are_counted_by_their_type_and_made_up_types_under_other(store: Store) -> None:
    metrics = Metrics()
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]), metrics=metrics)
    item = json.loads((CLERK_FIXTURES / "examples" / "subscriptionItem.active.json").read_text())["data"]
    sent = [_event("subscriptionItem.created", item),  # the JS SDK's, not in the spec
            _event("invitation.accepted", {"object": "invitation", "id": "inv_1", "status": "accepted",
                                           "email_address": "ann@example.com"}),
            *(_event(f"subscriptionItem.{uuid.uuid4().hex}", item) for _ in range(3))]  # signed, made up
    for event in sent:
        headers, body = f.signed(event, f"msg_{uuid.uuid4().hex}")
        assert processor.process(headers, body).status == "ignored"
    scrape = Scrape(metrics.render().decode())
    counted = {dict(labels)["type"]: value for (name, labels), value in scrape.samples.items()
               if name == "clerk_sync_webhook_events_total"}
    assert counted == {"subscriptionItem.created": 1, "invitation.accepted": 1, "other": 3}
