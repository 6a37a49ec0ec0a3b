"""The in-process per-user gate of the webhook endpoint (issue 10 #9); the end-to-end test is
tests/test_stuck_replica_pg.py."""

from __future__ import annotations

import pytest

from clerk_sync.errors import StoreError
from clerk_sync.integrations._gate import KeyGate, delivery_keys
from tests import factories as f


def test_a_key_held_past_patience_refuses_at_once_other_keys_pass() -> None:
    clock = [0.0]
    gate = KeyGate(patience_s=0.5, now=lambda: clock[0])
    with gate.hold(["user:a", "svix:1"]):
        clock[0] = 0.6  # the holder is stuck on the database
        with pytest.raises(StoreError, match="retry later"), gate.hold(["user:a", "svix:2"]):
            pass
        with gate.hold(["user:b", "svix:3"]):  # unrelated: not held back
            pass
    with gate.hold(["user:a", "svix:2"]):  # released with its holder
        pass


def test_delivery_keys_name_the_rows_and_locks_a_delivery_touches() -> None:
    def keys(event_type: str, data: dict[str, object]) -> list[str]:
        return delivery_keys("msg_1", f.body_of(f.envelope(event_type, data)))

    assert keys("user.updated", f.user("user_1", 1)) == ["svix:msg_1", "user:user_1"]
    assert keys("organization.deleted", f.deleted("organization", "org_1")) == ["svix:msg_1", "org:org_1"]
    assert keys("organizationMembership.created", f.membership("m_1", "org_1", "user_1", 1)) == [
        "svix:msg_1", "org:org_1", "user:user_1"]
    assert keys("session.revoked", {"id": "sess_1", "user_id": "user_1"}) == ["svix:msg_1"]  # never held back
    assert delivery_keys("msg_2", b"[" * 5000) == ["svix:msg_2"]
    assert delivery_keys(None, b"not json") == []
