"""A signed delivery stored ``failed`` is answered 200 (Svix must not retry it for ever) with its reason and what
to do, so the attempt log Svix keeps, which the Clerk Dashboard shows, says why; on every face alike.

Until 2026-12-05 the answer was ``{"status": "failed", "svix_id": ...}`` only: the reason was in the inbox's
``last_error``, which the Dashboard user may not be able to read."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from starlette.applications import Starlette

from clerk_sync.config import Settings
from clerk_sync.integrations.flask import ClerkSync
from clerk_sync.integrations.http import delivery_answer
from clerk_sync.integrations.starlette import build_processor, create_app, webhook_routes
from clerk_sync.store import Store
from clerk_sync.tables import webhook_events
from tests import factories as f
from tests._flask import running_wsgi
from tests._server import running
from tests.conftest import SECRET

REASON = "user object 'id' is 10005 characters; Clerk ids have at most 64"


def _settings(db_url: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                              "CLERK_INSTANCE_ID": f.INSTANCE})


def _too_long_id(svix_id: str) -> tuple[dict[str, str], bytes]:
    return f.signed(f.envelope("user.updated", f.user("user_" + "x" * 10_000, 5)), svix_id)


def _said(answer: httpx.Response, svix_id: str) -> None:
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert (body["status"], body["svix_id"], body["reason"]) == ("failed", svix_id, REASON), body
    assert "clerk-sync replay" in body["message"] and "clerk-sync dismiss" in body["message"]


def _stored(store: Store, svix_id: str) -> tuple[str, str]:
    with store.connect() as conn:
        row = conn.execute(sa.select(webhook_events.c.status, webhook_events.c.last_error)
                           .where(webhook_events.c.svix_id == svix_id)).one()
    return row.status, row.last_error


def test_the_service_and_an_apps_own_routes_say_why_a_delivery_failed(db_url: str) -> None:
    settings = _settings(db_url)
    processor = build_processor(settings)
    own = Starlette(routes=webhook_routes(build_processor(settings)))
    try:
        with running(create_app(settings, processor)) as served, running(own) as mine, \
                httpx.Client() as client:
            for base, svix_id in ((served, "msg_failed_service"), (mine, "msg_failed_own")):
                headers, body = _too_long_id(svix_id)
                _said(client.post(f"{base}/webhooks/clerk", content=body, headers=headers), svix_id)
                assert _stored(processor.store, svix_id) == ("failed", REASON)
                again = client.post(f"{base}/webhooks/clerk", content=body, headers=headers)  # Svix's retry
                assert again.json() == {"status": "duplicate", "svix_id": svix_id}
            headers, body = f.signed(f.envelope("user.created", f.user("user_fine", 100)), "msg_fine")
            fine = client.post(f"{served}/webhooks/clerk", content=body, headers=headers)
            assert fine.json() == {"status": "applied", "svix_id": "msg_fine"}  # (no reason when there is none)
    finally:
        processor.store.dispose()


def test_flask_says_why_a_delivery_failed(tmp_path: Any) -> None:
    from clerk_sync import migrations
    from clerk_sync.store import create_engine

    url = f"sqlite:///{tmp_path / 'flask.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    app = Flask(__name__)
    ClerkSync(app, settings=_settings(url))
    with running_wsgi(app) as base, httpx.Client(base_url=base) as client:
        headers, body = _too_long_id("msg_failed_flask")
        _said(client.post("/webhooks/clerk", content=body, headers=headers), "msg_failed_flask")
    store = Store.from_url(url)
    try:
        assert _stored(store, "msg_failed_flask") == ("failed", REASON)
    finally:
        store.dispose()


@pytest.mark.parametrize(("status", "error", "body"), [
    ("applied", "cleaned: data.first_name dropped", {"status": "applied", "svix_id": "m"}),  # notes stay stored
    ("failed", None, {"status": "failed", "svix_id": "m"}),
    ("duplicate", REASON, {"status": "duplicate", "svix_id": "m"}),
])
def test_only_a_failed_delivery_with_a_reason_carries_one(status: str, error: str | None,
                                                         body: dict[str, str]) -> None:
    assert delivery_answer("m", status, error) == body
