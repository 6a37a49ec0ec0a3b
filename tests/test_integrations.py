"""The webhook endpoint mounted inside a user's FastAPI app."""

from __future__ import annotations

import httpx
import sqlalchemy as sa
from fastapi import FastAPI

from clerk_sync.config import Settings
from clerk_sync.integrations.fastapi import build_processor, webhook_router
from clerk_sync.tables import users
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET


def test_fastapi_router_applies_signed_events(db_url: str) -> None:
    processor = build_processor(Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}))
    app = FastAPI()
    app.include_router(webhook_router(processor, "/hooks/clerk"))
    headers, body = f.signed(f.envelope("user.created", f.user("user_fa", 1)), "msg_fa")
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.post("/hooks/clerk", content=body, headers=headers).json()["status"] == "applied"
        assert client.post("/hooks/clerk", content=body, headers={}).status_code == 400
    with processor.store.connect() as conn:
        assert conn.execute(sa.select(users.c.clerk_id)).scalar_one() == "user_fa"
    processor.store.dispose()
