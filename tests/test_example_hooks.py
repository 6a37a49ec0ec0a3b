"""examples/saas_hooks end to end: emulator -> webhook -> the app's own ``accounts`` table, one welcome
mail per sign-up (none for updates), and the signed forward to the billing service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import sqlalchemy as sa
from examples.saas_hooks.__main__ import BILLING_SECRET
from examples.saas_hooks.app import accounts, build, welcome_mails
from examples.saas_hooks.billing import create_billing

from clerk_sync.config import Settings
from clerk_sync.testing import EmulatorServer
from tests._server import free_port, running

ROOT = Path(__file__).resolve().parent.parent


def test_sign_up_update_and_delete_reach_the_table_the_mail_and_billing(tmp_path: Path) -> None:
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk") as clerk, \
            running(create_billing(BILLING_SECRET)) as billing:
        settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}",
                                      "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret})
        example = build(settings, billing_url=f"{billing}/clerk-changes", billing_secret=BILLING_SECRET)
        with example.store.transaction() as writer:  # a customer from before Clerk
            writer.conn.execute(accounts.insert().values(email="old@example.com", plan="enterprise"))
        with running(example.app, port=port):
            old = clerk.create_user("old@example.com", first_name="Olga")
            ada = clerk.create_user("ada@example.com", first_name="Ada", public_metadata={"role": "admin"})
            clerk.request("PATCH", f"/v1/users/{ada['id']}", json={"last_name": "Lovelace"})
            clerk.wait_for_deliveries()
            example.dispatcher.drain()
            example.dispatcher.drain()  # nothing is left to send twice
        with example.store.connect() as conn:
            rows = {r.email: r for r in conn.execute(sa.text("SELECT * FROM accounts"))}  # with the added columns
            mails = sorted(r.to for r in conn.execute(sa.select(welcome_mails)))
        customers = httpx.get(f"{billing}/customers").json()
        example.store.dispose()
    assert (rows["old@example.com"].clerk_user_id, rows["old@example.com"].plan) == (old["id"], "enterprise")
    assert (rows["ada@example.com"].name, rows["ada@example.com"].role, rows["ada@example.com"].plan) == (
        "Ada Lovelace", "admin", "trial")
    assert mails == ["ada@example.com", "old@example.com"]
    assert customers == {old["id"]: {"email": "old@example.com", "role": "user"},  # the contract default
                         ada["id"]: {"email": "ada@example.com", "role": "admin"}}


def test_the_example_runs_as_documented() -> None:
    result = subprocess.run([sys.executable, "-m", "examples.saas_hooks"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "welcome mails: [{'idempotency_key': 'user.created:" in result.stdout
    assert "billing customers: {'user_" in result.stdout
