"""examples/saas_hooks end to end: emulator -> webhook -> the app's own ``accounts`` table, one welcome
mail per sign-up (none for updates, none more when a job runs again), and the signed forward to the
billing service, which loses no change whose handling failed once. On every store (``db_url``)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from examples.saas_hooks.__main__ import BILLING_SECRET
from examples.saas_hooks.app import accounts, build, welcome_mail, welcome_mails
from examples.saas_hooks.billing import create_billing
from standardwebhooks.webhooks import Webhook

from clerk_sync.changes import Change
from clerk_sync.config import Settings
from clerk_sync.engine import Entity
from clerk_sync.hooks.sinks import change_message
from clerk_sync.tables import hook_jobs
from clerk_sync.testing import EmulatorServer
from tests._server import free_port, running

ROOT = Path(__file__).resolve().parent.parent
B_VERSION = 1_800_000_000_000


def _settings(db_url: str, secret: str = "whsec_" + "ZXhhbXBsZS1ob29rcy10ZXN0LXNlY3JldC0zMi1ieXRlcyE=") -> Settings:
    return Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": secret})


def test_sign_up_update_and_delete_reach_the_table_the_mail_and_billing(db_url: str) -> None:
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk") as clerk, \
            running(create_billing(BILLING_SECRET)) as billing:
        example = build(_settings(db_url, clerk.webhook_secret), billing_url=f"{billing}/clerk-changes",
                        billing_secret=BILLING_SECRET)
        try:
            with example.store.transaction() as writer:  # a customer from before Clerk
                writer.conn.execute(accounts.insert().values(email="old@example.com", plan="enterprise"))
            with running(example.app, port=port):
                old = clerk.create_user("old@example.com", first_name="Olga")
                ada = clerk.create_user("ada@example.com", first_name="Ada", public_metadata={"role": "admin"})
                clerk.request("PATCH", f"/v1/users/{ada['id']}", json={"last_name": "Lovelace"})
                clerk.wait_for_deliveries()
            with example.store.connect() as conn:  # the welcome-mail jobs as queued, to run them once more
                queued = [dict(r) for r in conn.execute(
                    sa.select(hook_jobs).where(hook_jobs.c.hook == "welcome-mail")).mappings()]
            assert len(queued) == 2
            example.dispatcher.drain()
            # At least once: the same jobs again, as after a crash between the send and its record.
            with example.store.transaction() as writer:
                writer.conn.execute(hook_jobs.insert(), [
                    {k: v for k, v in job.items() if k != "id"} | {"status": "pending", "attempts": 0,
                                                                   "lease_until": None, "claim_token": None}
                    for job in queued])
            example.dispatcher.drain()
            with example.store.connect() as conn:
                rows = {r.email: r for r in conn.execute(sa.text("SELECT * FROM accounts"))}  # with added columns
                mails = sorted(r.to for r in conn.execute(sa.select(welcome_mails)))
                left = conn.execute(sa.select(hook_jobs.c.hook, hook_jobs.c.status, hook_jobs.c.last_error)).all()
            customers = httpx.get(f"{billing}/customers").json()
        finally:
            example.store.dispose()
    assert left == []  # every job done, none retrying or dead
    assert (rows["old@example.com"].clerk_user_id, rows["old@example.com"].plan) == (old["id"], "enterprise")
    assert (rows["ada@example.com"].name, rows["ada@example.com"].role, rows["ada@example.com"].plan) == (
        "Ada Lovelace", "admin", "trial")
    assert mails == ["ada@example.com", "old@example.com"]  # one each, though each job ran twice
    assert customers == {old["id"]: {"email": "old@example.com", "role": "user"},  # the contract default
                         ada["id"]: {"email": "ada@example.com", "role": "admin"}}


def test_the_welcome_hook_run_twice_with_one_change_sends_one_mail(db_url: str) -> None:
    example = build(_settings(db_url), billing_url="http://127.0.0.1:9/unused", billing_secret=BILLING_SECRET)
    try:
        send = welcome_mail(example.store.engine)
        change = Change(Entity.USER, "user_twice", "created", 1, {"email": "twice@example.com", "first_name": "Tw"})
        send(change)
        send(change)  # a retried job: finds its key, sends nothing
        with example.store.connect() as conn:
            mails = conn.execute(sa.select(welcome_mails.c.idempotency_key, welcome_mails.c.to)).all()
    finally:
        example.store.dispose()
    assert mails == [(change.idempotency_key, "twice@example.com")]


def test_a_user_created_again_is_not_welcomed_twice(db_url: str) -> None:
    """Docs review 3: the mail was keyed by the change's idempotency key, once per change: a user whose rows
    were deleted (a restore) and synced again got a second welcome mail, against the README's advice (a side
    effect once per user deduplicates on the Clerk id)."""
    example = build(_settings(db_url), billing_url="http://127.0.0.1:9/unused", billing_secret=BILLING_SECRET)
    try:
        send = welcome_mail(example.store.engine)
        send(Change(Entity.USER, "user_again", "created", 1, {"email": "again@example.com"}))
        send(Change(Entity.USER, "user_again", "created", 2, {"email": "again@example.com"}))
        with example.store.connect() as conn:
            mails = conn.execute(sa.select(welcome_mails.c.clerk_user_id, welcome_mails.c.to)).all()
    finally:
        example.store.dispose()
    assert mails == [("user_again", "again@example.com")]


def test_billing_skips_a_redacted_change_and_takes_the_next() -> None:
    """Docs review 1: a change queued before its user was erased arrives with ``data.redacted`` and
    ``values == {}``; billing read ``values["email"]``, answered 500, and the job was retried for 4 h, holding
    the user's later changes, then died."""
    redacted = Change(Entity.USER, "user_gone", "updated", 5, {}, redacted=True)
    with running(create_billing(BILLING_SECRET)) as billing:
        assert _deliver(billing, redacted) == 204
        assert _deliver(billing, Change(Entity.USER, "user_gone", "deleted", 6, {})) == 204


class _DownOnce(dict[str, dict[str, Any]]):
    """Billing's customer store, whose first write fails (its database was down)."""

    failed = False

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("billing database unavailable")
        super().__setitem__(key, value)


def _deliver(billing: str, change: Change) -> int:
    """POST ``change`` signed, as StandardWebhookSink sends it (and sends it again on a retry). A
    connection each time: the server closes one whose request raised."""
    msg_id, body, now = change.idempotency_key, json.dumps(change_message(change)), datetime.now(UTC)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": Webhook(BILLING_SECRET).sign(msg_id, now, body),
               "content-type": "application/json"}
    return httpx.post(f"{billing}/clerk-changes", content=body, headers=headers, timeout=10).status_code


def test_billing_handles_a_retried_message_whose_first_handling_failed() -> None:
    customers = _DownOnce()
    change = Change(Entity.USER, "user_1", "created", 1, {"email": "a@example.com", "role": "user"})
    with running(create_billing(BILLING_SECRET, customers)) as billing:
        answers = [_deliver(billing, change)]  # handling fails: 500, the sink retries
        assert customers == {}
        answers.append(_deliver(billing, change))  # the retry is handled, not answered 204 as a duplicate
        after_retry = httpx.get(f"{billing}/customers").json()
        answers.append(_deliver(billing, change))  # a true duplicate now: answered, nothing changes
        after_duplicate = httpx.get(f"{billing}/customers").json()
    assert answers == [500, 204, 204]
    assert after_retry == after_duplicate == {"user_1": {"email": "a@example.com", "role": "user"}}


def test_billing_never_answers_a_message_it_could_not_handle_as_a_duplicate() -> None:
    broken = Change(Entity.USER, "user_2", "created", 1, {"email": "b@example.com"})  # no role: handling fails
    with running(create_billing(BILLING_SECRET)) as billing:
        answers = [_deliver(billing, broken), _deliver(billing, broken)]
    assert answers == [500, 500]  # the retry fails again (retried, then dead and visible), never a 204 and lost


def test_the_example_runs_as_documented() -> None:
    result = subprocess.run([sys.executable, "-m", "examples.saas_hooks"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "welcome mails: [{'idempotency_key': 'user.created:" in result.stdout
    assert "billing customers: {'user_" in result.stdout


def test_billing_ignores_an_older_change_arriving_after_the_deletion() -> None:
    """Node.js forwarding walkthrough (finding 11): a dead ``user.created`` retried with ``clerk-sync hooks retry``
    reaches the receiver after the user's ``user.deleted`` (clerk-sync warns: out of order). Billing deduplicated on
    the key only and put the deleted customer back; it keeps the last version (a deletion's too) per Clerk id and
    ignores an older change, answering 2xx (handled: nothing to do)."""
    values = {"email": "gone@example.com", "role": "user"}
    created = Change(Entity.USER, "user_3", "created", B_VERSION, values)
    updated = Change(Entity.USER, "user_3", "updated", B_VERSION + 10, values | {"role": "admin"}, {"role": "user"})
    deleted = Change(Entity.USER, "user_3", "deleted", B_VERSION + 20, values | {"role": "admin"})
    newer = Change(Entity.USER, "user_4", "updated", B_VERSION + 30, {"email": "kept@example.com", "role": "admin"})
    older = Change(Entity.USER, "user_4", "created", B_VERSION, {"email": "kept@example.com", "role": "user"})
    with running(create_billing(BILLING_SECRET)) as billing:
        answers = [_deliver(billing, change) for change in (updated, deleted, created, newer, older)]
        customers = httpx.get(f"{billing}/customers").json()
    assert answers == [204] * 5
    assert customers == {"user_4": {"email": "kept@example.com", "role": "admin"}}  # not user_3 back, not user_4 older
