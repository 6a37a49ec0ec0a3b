"""The README's "Your own tables, your side effects" snippet runs as printed, then does what it says, on
SQLite, PostgreSQL and MariaDB (an adopter walkthrough found its first table's id unnumbered on the latter two:
every account row refused, silently)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_THEN = """
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from clerk_sync.engine import Entity, Upsert
from clerk_sync.events import user_record
from tests import factories as f

from clerk_sync.ingest import WebhookProcessor
from clerk_sync.webhooks import WebhookVerifier


def billing(svix_id, slug, at):  # Clerk Billing's subscriptionItem.active for user_1, as Clerk sends it
    event = json.loads((Path(f.__file__).parent / "fixtures/clerk/examples/subscriptionItem.active.json").read_text())
    event["timestamp"], event["data"]["plan"]["slug"], event["data"]["payer"]["user_id"] = at, slug, "user_1"
    return WebhookProcessor(store, WebhookVerifier([f.SECRET])).process(*f.signed(event, svix_id)).status


print(billing("msg_pro", "pro", 1_800_000_000_500))  # before the account exists: its job is retried
dispatcher.drain()
with store.transaction() as writer:
    writer.apply(Upsert(Entity.USER, user_record(f.user("user_1", 1_800_000_000_000, role="admin"))))
print(billing("msg_free", "free-plan", 1_800_000_000_100), billing("msg_pro", "pro", 1_800_000_000_500))
# a minute on, the retry's backoff has passed (the late, older free-plan event then leaves pro; the repeated msg_pro
# queued nothing)
Dispatcher(store, now=lambda: datetime.now(UTC) + timedelta(minutes=1)).drain()
with engine.connect() as conn:
    print(dict(conn.execute(sa.text("SELECT clerk_user_id, email, role, plan FROM accounts")).one()._mapping))
"""


def test_the_hooks_snippet_runs_as_printed(tmp_path: Path, db_url: str) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-hooks:begin -->\n```python\n(.*?)```\n<!-- readme-hooks:end -->", readme, re.S)
    assert block is not None
    result = subprocess.run([sys.executable, "-c", block.group(1) + _THEN], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, check=False, env={"PYTHONPATH": str(ROOT), "PATH": "", "DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("20")]  # log lines
    assert lines == [
        "['added accounts.clerk_user_id', 'added accounts.deleted_at', "
        "'created unique index uq_accounts_clerk_user_id']",
        "ignored",
        "ignored duplicate",
        "welcome user_1@example.com user_1",
        "{'clerk_user_id': 'user_1', 'email': 'user_1@example.com', 'role': 'admin', 'plan': 'pro'}",
    ]


_EDGES = """
from clerk_sync.changes import Event

item = {"id": "csub_item_1", "object": "subscription_item", "status": "active", "plan": {"slug": "team"}}
# a payer erased (data reduced to ids: no plan), and an organization's plan (no payer.user_id): left alone
set_plan(Event("subscriptionItem.active", "msg_erased", 1_800_000_000_900, {"id": "csub_item_1"}, redacted=True))
set_plan(Event("subscriptionItem.active", "msg_erased", 1_800_000_000_900,
               {"id": "csub_item_1", "object": "subscription_item", "status": "active",
                "payer": {"user_id": "user_1"}}, redacted=True))
set_plan(Event("subscriptionItem.active", "msg_org", 1_800_000_000_900, item | {"payer": {"organization_id": "org_1"}}))
print("left alone")
"""


def test_the_snippets_set_plan_leaves_an_erased_payers_event_and_an_organizations_plan_alone(
        tmp_path: Path, db_url: str) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-hooks:begin -->\n```python\n(.*?)```\n<!-- readme-hooks:end -->", readme, re.S)
    assert block is not None
    result = subprocess.run([sys.executable, "-c", block.group(1) + _EDGES], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, check=False, env={"PYTHONPATH": str(ROOT), "PATH": "", "DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr  # was: KeyError 'plan', then 'user_id' (retried until dead)
    assert [line for line in result.stdout.splitlines() if not line.startswith("20")][-1] == "left alone"
