"""Review of the least-privilege fixes (223e1cb, revA): a delivery while the start-up migration is pending or refused
says what pending() says, not "the database is unavailable"; `serve --migrate` stopped for a refusal exits 2 even if
a /readyz poll reads the schema healed during the drain, and with the shutdown watchdog armed; /readyz says a
privilege refusal is one; the slow-probe line is not said of the previous probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from clerk_sync.config import Settings
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.starlette import StartupMigration, build_processor, create_app
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET


def _embedded(tmp_path: Path) -> tuple[Any, WebhookProcessor]:
    url = f"sqlite:///{tmp_path / 'fixa.db'}"
    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    processor = build_processor(settings, Store(create_engine(url)))
    return create_app(settings, processor, migrate=True), processor


@pytest.mark.parametrize("refused", [False, True])
def test_a_delivery_while_the_migration_is_pending_or_refused_says_so_not_database_unavailable(
        tmp_path: Path, refused: bool) -> None:
    """Every delivery was answered 503 store_unavailable "the database is unavailable" (Svix's attempt log, which
    the operator reads in Clerk's Dashboard) while /readyz said the migration was refused; and counted as a
    database error. Now: migration_pending, with pending()'s text (no driver text), Retry-After, not counted."""
    app, processor = _embedded(tmp_path)  # (no lifespan: the migration is not attempted)
    migration: StartupMigration = app.state.clerk_sync_migration
    if refused:
        migration.refused = migration.error = "serve --migrate: refused (psycopg InsufficientPrivilege: host db1)"
        migration._for_privilege = True
    try:
        headers, body = f.signed(f.envelope("user.created", f.user("user_fixa1", 5)), "msg_fixa1")
        with (structlog.testing.capture_logs() as logs, running(app) as base,
              httpx.Client(base_url=base, timeout=30) as client):
            answer = client.post("/webhooks/clerk", content=body, headers={**headers, "content-type": "application/json"})
    finally:
        processor.store.dispose()
    said = answer.json()
    assert answer.status_code == 503 and said["error"] == "migration_pending", answer.text
    assert said["message"] == migration.pending() and "unavailable" not in said["message"], said
    assert "host db1" not in answer.text and answer.headers["retry-after"], answer.text
    if refused:
        assert "run `clerk-sync migrate` as the tables' owner" in said["message"], said
    assert not [e for e in logs if e["event"] == "webhook_store_error"], logs
    assert processor.metrics.db_errors.labels(operation="webhook")._value.get() == 0
    assert processor.metrics.unavailable._value.get() == 0
