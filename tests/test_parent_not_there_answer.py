"""A membership delivered before its organization (a B2B app's ``workspace_members`` refers to ``workspaces``
by its Clerk-id column) was answered ``503 store_unavailable``, "the database is unavailable", logged as an
outage (``answered_unavailable``, ``webhook_store_error``) and counted as one (``clerk_sync_db_errors_total``,
``clerk_sync_webhook_unavailable_total``, which pages): the Clerk Dashboard's attempt log told the operator the
database was down. It is still a 503 (Svix retries, nothing is lost), but says what it is, on every store; the
README's organizations-and-memberships snippet is the app's schema, run as printed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
from starlette.applications import Starlette

from clerk_sync.errors import ParentNotThere, StoreError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.http import error_response
from clerk_sync.integrations.starlette import webhook_routes
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests._server import running
from tests.test_hooks import B

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_b2b_block() -> str:
    found = re.search(r"<!-- readme-b2b:begin -->\n```python\n(.*?)```\n<!-- readme-b2b:end -->", README.read_text(),
                      re.S)
    assert found is not None
    return found.group(1)


def test_the_answer_is_its_own_not_an_outage() -> None:
    answer = error_response(ParentNotThere("workspace_members refused ...; a row it refers to is not there yet",
                                           "workspace_members refused ..."))
    assert answer.status == 503 and answer.headers["Retry-After"]
    assert answer.body["error"] == "parent_not_there"
    assert "has not arrived yet" in answer.body["message"] and "unavailable" not in answer.body["message"]
    assert isinstance(ParentNotThere("x"), StoreError)  # the webhook faces' 5xx path, unchanged


def test_a_membership_before_its_organization_answers_parent_not_there_then_applies(
        db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(_readme_b2b_block(), str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    assert capsys.readouterr().out.strip() == "['added accounts.deleted_at', 'added workspaces.deleted_at']"
    store, engine = namespace["store"], namespace["engine"]
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    member = f.envelope("organizationMembership.created",
                        f.membership("orgmem_b2b", "org_b2b", "user_b2b", B + 1000, role="org:admin"))
    try:
        with running(Starlette(routes=webhook_routes(processor))) as base, \
                httpx.Client(base_url=base) as client:

            def post(event: dict[str, Any], svix_id: str) -> httpx.Response:
                headers, body = f.signed(event, svix_id)
                return client.post("/webhooks/clerk", content=body, headers=headers)

            with structlog.testing.capture_logs() as logs:
                early = post(member, "msg_member")
            assert early.status_code == 503 and early.headers["retry-after"]
            assert early.json()["error"] == "parent_not_there", early.json()
            assert "has not arrived yet" in early.json()["message"]
            events = {entry["event"] for entry in logs}
            assert {"webhook_parent_not_there", "answered_parent_not_there"} <= events, events
            assert not events & {"answered_unavailable", "webhook_store_error"}, events
            registry = processor.metrics.registry
            assert registry.get_sample_value("clerk_sync_webhook_parent_not_there_total") == 1
            assert not registry.get_sample_value("clerk_sync_webhook_unavailable_total")
            assert not registry.get_sample_value("clerk_sync_db_errors_total", {"operation": "webhook"})
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM workspace_members")).scalar_one() == 0

            assert post(f.envelope("user.created", f.user("user_b2b", B + 1000)), "msg_user").status_code == 200
            assert post(f.envelope("organization.created", f.organization("org_b2b", B + 1000)),
                        "msg_org").json()["status"] == "applied"
            retried = post(member, "msg_member")  # Svix's retry
            assert retried.status_code == 200 and retried.json()["status"] == "applied", retried.json()
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT workspace_clerk_id, account_clerk_id, role FROM workspace_members")).one()
        assert tuple(row) == ("org_b2b", "user_b2b", "org:admin")
    finally:
        store.dispose()
        engine.dispose()
