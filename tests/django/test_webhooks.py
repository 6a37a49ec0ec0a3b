"""The Django webhook view against the standalone service: the same statuses and the same rows for
every example payload and every bad request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from django.test import Client, override_settings

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.integrations.django.runtime import get_clerk_sync
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import metadata, organization_memberships, organizations, users, webhook_events
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET
from tests.django.conftest import django_database
from tests.test_service import EXAMPLE_FILES, _bad_requests, example_as_sent

VOLATILE = {"id", "created_at", "updated_at", "received_at", "applied_at"}


@pytest.fixture
def django_view(db_url: str) -> Iterator[tuple[Client, Store]]:
    settings = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_INSTANCE_ID": f.INSTANCE}
    with django_database(db_url), override_settings(CLERK_SYNC=settings):
        yield Client(), get_clerk_sync().store


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[httpx.Client, Store]]:
    url = f"sqlite:///{tmp_path / 'service.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_INSTANCE_ID": f.INSTANCE})
    processor = build_processor(settings)
    with running(create_app(settings, processor)) as base, httpx.Client(base_url=base) as client:
        yield client, processor.store
    processor.store.dispose()


def rows(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Every mirrored row and inbox entry, without ids and wall-clock times (``deleted_at`` as a flag)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table in (users, organizations, organization_memberships, webhook_events):
        with store.connect() as conn:
            found = conn.execute(sa.select(table).order_by(table.c.id)).mappings().all()
        out[table.name] = [{**{k: v for k, v in r.items() if k not in VOLATILE | {"deleted_at", "redacted_at"}},
                            **({"deleted": r["deleted_at"] is not None} if "deleted_at" in r else {}),
                            **({"redacted": r["redacted_at"] is not None} if "redacted_at" in r else {})}
                           for r in found]
    return out


def deliveries() -> list[tuple[dict[str, str], bytes]]:
    out = []
    for i, path in enumerate(EXAMPLE_FILES):
        out.append(f.signed(example_as_sent(path), f"msg_example_{i}"))
    return out


def post_django(client: Client, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
    response = client.post("/webhooks/clerk", data=body, content_type="application/json", headers=headers)
    return response.status_code, response.json()


def test_every_example_payload_gives_the_services_statuses_and_rows(
        django_view: tuple[Client, Store], service: tuple[httpx.Client, Store]) -> None:
    client, django_store = django_view
    http, service_store = service
    answers = []
    for headers, body in [*deliveries(), *deliveries()[:5]]:  # and a few duplicates
        expected = http.post("/webhooks/clerk", content=body, headers=headers)
        answers.append((post_django(client, headers, body), (expected.status_code, expected.json())))
    assert len(EXAMPLE_FILES) >= 45
    assert [django for django, _ in answers] == [svc for _, svc in answers]
    assert {body["status"] for (_, body), _ in answers} >= {"applied", "ignored", "duplicate"}
    assert rows(django_store) == rows(service_store)


def _refusals(registry: Any) -> dict[str, float]:
    return {sample.labels["code"]: sample.value for metric in registry.collect()
            if metric.name == "clerk_sync_webhook_refused" for sample in metric.samples if sample.name.endswith("_total")}


@pytest.mark.parametrize("case", [c[0] for c in _bad_requests()])
def test_bad_input_gets_the_services_status_and_writes_nothing(django_view: tuple[Client, Store], case: str) -> None:
    _, headers, body, status = next(c for c in _bad_requests() if c[0] == case)  # signed now, not at collection
    client, store = django_view
    registry = get_clerk_sync().processor.metrics.registry
    before = _refusals(registry)
    got, answer = post_django(client, headers, body)
    assert got == status and answer["error"] and answer["message"]
    if got < 500:  # counted as the service counts it (it was an event of type "unknown")
        after = _refusals(registry)
        assert after[answer["error"]] == before.get(answer["error"], 0) + 1 and sum(after.values()) == sum(
            before.values()) + 1
    with store.connect() as conn:
        assert {conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in metadata.sorted_tables} == {0}


def test_only_post_and_no_csrf_token_needed(django_view: tuple[Client, Store]) -> None:
    client = Client(enforce_csrf_checks=True)
    assert client.get("/webhooks/clerk").status_code == 405
    headers, body = f.signed(f.envelope("user.created", f.user("user_csrf", 1)), "msg_csrf")
    response = client.post("/webhooks/clerk", data=body, content_type="application/json", headers=headers)
    assert response.status_code == 200 and response.json()["status"] == "applied"


def test_missing_secret_answers_500_naming_the_variable(db_url: str) -> None:
    with django_database(db_url), override_settings(CLERK_SYNC={"CLERK_JWT_KEY": ""}):
        status, body = post_django(Client(), *f.signed(f.envelope("user.created", f.user("user_x", 1)), "msg_x"))
    assert status == 500 and "CLERK_WEBHOOK_SIGNING_SECRET" in body["message"]


def test_the_django_view_says_why_a_delivery_failed(django_view: tuple[Client, Store]) -> None:
    """As the service does (tests/test_failed_answer_says_why.py): a delivery stored ``failed`` is answered 200
    with its reason and what to do, for the attempt log Svix keeps."""
    client, _ = django_view
    headers, body = f.signed(f.envelope("user.updated", f.user("user_" + "x" * 10_000, 5)), "msg_failed_django")
    answer = client.post("/webhooks/clerk", data=body, content_type="application/json", headers=headers)
    said = answer.json()
    assert answer.status_code == 200 and said["status"] == "failed", said
    assert said["reason"] == "user object 'id' is 10005 characters; Clerk ids have at most 64"
    assert "clerk-sync replay" in said["message"]
