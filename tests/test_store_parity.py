"""The three stores decide alike where MariaDB's types and collations would have made them differ (review):
an image URL longer than MariaDB's TEXT, ids that differ only by trailing whitespace (PAD SPACE), a float
that jsonb reads back as an integer, a membership of a hard-deleted user, a long refusal note."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.changes import Hook
from clerk_sync.engine import Entity, Tombstone
from clerk_sync.errors import WebhookHeadersMissing
from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.retention import Retention, RetentionPolicy
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs, users, webhook_events
from clerk_sync.webhooks import SignedHeaders, WebhookVerifier
from tests import factories as f

B = 1_800_000_000_000


def _deliver(processor: WebhookProcessor, event: dict[str, Any], svix_id: str) -> str:
    headers, body = f.signed(event, svix_id)
    return processor.process(headers, body).status


def _inbox(store: Store, svix_id: str) -> Any:
    with store.connect() as conn:
        return conn.execute(sa.select(webhook_events).where(webhook_events.c.svix_id == svix_id)).mappings().one()


def test_an_image_url_longer_than_any_store_holds_is_dropped_and_the_ban_applies(store: Store,
                                                                                   verifier: WebhookVerifier) -> None:
    """70,000 characters of ``image_url``: more than MariaDB's TEXT (64 KB), so the whole update, ban and
    demotion included, was stored failed there and applied elsewhere. Dropped with a note on every store."""
    processor = WebhookProcessor(store, verifier)
    assert _deliver(processor, f.envelope("user.created", f.user("user_img", B, role="admin")), "msg_1") == "applied"
    update = f.user("user_img", B + 1, role="user", banned=True)
    update["image_url"] = "https://img.example.com/" + "a" * 70_000
    assert _deliver(processor, f.envelope("user.updated", update), "msg_2") == "applied"
    with store.connect() as conn:
        row = conn.execute(sa.select(users.c.role, users.c.banned, users.c.image_url)).one()
    assert (row.role, bool(row.banned), row.image_url) == ("user", True, None)
    assert "data.image_url dropped: 70024 characters, the column holds 8192" in _inbox(store, "msg_2")["last_error"]


def test_ids_with_whitespace_at_either_end_are_refused_on_every_store(store: Store, verifier: WebhookVerifier) -> None:
    """MariaDB's PAD SPACE collations took ``user_pad `` for ``user_pad`` (one row for two ids) and ``msg_3 ``
    for ``msg_3`` (a new delivery answered duplicate). Clerk's ids have no whitespace: such an event is stored
    failed with its reason, such a svix-id refused before anything is written, on every store."""
    processor = WebhookProcessor(store, verifier)
    assert _deliver(processor, f.envelope("user.created", f.user("user_pad", B, first_name="Ada")), "msg_1") == "applied"
    padded = f.user("user_pad ", B + 1, first_name="Mallory", role="admin")
    assert _deliver(processor, f.envelope("user.updated", padded), "msg_2") == "failed"
    assert "starts or ends with whitespace" in _inbox(store, "msg_2")["last_error"]
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.clerk_id, users.c.first_name, users.c.role)).all() == [
            ("user_pad", "Ada", "user")]
    with pytest.raises(WebhookHeadersMissing, match="whitespace"):
        SignedHeaders.from_headers({"svix-id": "msg_1 ", "svix-timestamp": "1", "svix-signature": "v1,x"})


def test_a_float_that_jsonb_reads_back_as_an_integer_is_no_change(store: Store, verifier: WebhookVerifier) -> None:
    """``{"n": 1e23}`` read back from jsonb is ``10**23``, which Python's ``==`` tells from the float ``1e23``:
    on PostgreSQL, alone, the same metadata sent again made a ``user.updated`` job for a change that was none."""
    hooked = Store(store.engine, hooks=[Hook("seen", lambda change: None, on=["user.updated"], fields=[
        "public_metadata"])])
    processor = WebhookProcessor(hooked, verifier)

    def user(at: int) -> dict[str, Any]:
        data = f.user("user_n", at)
        data["public_metadata"] = {"n": 1e23, "m": 0.1, "k": 10**23}
        return f.envelope("user.updated" if at > B else "user.created", data)

    assert _deliver(processor, user(B), "msg_1") == "applied"
    assert _deliver(processor, user(B + 1), "msg_2") == "applied"
    batch = GroupCommitter(processor).write([("msg_3", parse_envelope(f.body_of(user(B + 2))))])
    assert [r.status for r in batch] == ["applied"]  # type: ignore[union-attr]
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one() == 0


def test_a_membership_of_a_hard_deleted_user_keeps_no_personal_data(store: Store, verifier: WebhookVerifier) -> None:
    """A membership event naming a user whose tombstone retention hard-deleted is skipped (the digest in
    ``clerk_sync_erased``), but its ``public_user_data`` (e-mail, names) was kept until the 30-day redaction."""
    from datetime import UTC, datetime, timedelta

    processor = WebhookProcessor(store, verifier)
    assert _deliver(processor, f.envelope("user.created", f.user("user_hd", B)), "msg_1") == "applied"
    assert _deliver(processor, f.envelope("organization.created", f.organization("org_hd", B)), "msg_2") == "applied"
    with store.transaction() as writer:
        writer.apply(Tombstone(Entity.USER, "user_hd", B + 1))
    later = datetime.now(UTC) + timedelta(days=400)
    policy = RetentionPolicy(clear_tombstones_after=timedelta(days=1), delete_tombstones_after=timedelta(days=2))
    Retention(store, policy, now=lambda: later).prune()
    body = f.membership("orgmem_hd", "org_hd", "user_hd", B + 5)
    body["public_user_data"].update(identifier="ada.secret@example.com", first_name="Adalind")
    event = f.envelope("organizationMembership.created", body)
    assert _deliver(processor, event, "msg_late") == "skipped"
    batch = GroupCommitter(processor).write([("msg_late_batch", parse_envelope(f.body_of(event)))])
    assert [r.status for r in batch] == ["skipped"]  # type: ignore[union-attr]
    for svix_id in ("msg_late", "msg_late_batch"):
        row = _inbox(store, svix_id)
        payload = row["payload"] if isinstance(row["payload"], dict) else json.loads(row["payload"])
        assert row["redacted_at"] is not None and "ada.secret" not in json.dumps(payload), svix_id


def test_a_long_list_of_refusals_fits_last_error() -> None:
    """A user deletion cascading to hundreds of refused mapped memberships wrote a ``last_error`` longer than
    MariaDB's TEXT: the whole unit of work failed there. The note is bounded like every other reason."""
    from clerk_sync._limits import REASON_CHARS
    from clerk_sync.store import Writer

    writer = Writer.__new__(Writer)  # (only its outbox's refusals are read)
    writer.outbox = SimpleNamespace(refused=[f"the app's table refused membership {i}" for i in range(500)])  # type: ignore[assignment]
    noted = writer.refusals_noted(0, "cleaned: something")
    assert noted is not None and len(noted) == REASON_CHARS and noted.endswith("...")
