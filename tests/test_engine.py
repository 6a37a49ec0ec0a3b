"""The ordering rules as a table, without a database."""

from __future__ import annotations

import json

import pytest

from clerk_sync.engine import (
    Action,
    Entity,
    Ignore,
    RevokeSession,
    RowState,
    Tombstone,
    Upsert,
    decide,
    plan,
    touches,
)
from clerk_sync.errors import EventShapeError, PayloadError
from clerk_sync.events import UserRecord, normalize_timestamp_ms, parse_envelope, user_record
from tests import factories as f

UP = Upsert(Entity.USER, user_record(f.user("user_1", 200)))
DEL = Tombstone(Entity.USER, "user_1", 150)


@pytest.mark.parametrize(
    ("current", "intent", "expected"),
    [
        (None, UP, Action.INSERT),
        (RowState(100, False), UP, Action.UPDATE),
        (RowState(200, False), UP, Action.SKIP_STALE),
        (RowState(300, False), UP, Action.SKIP_STALE),
        (RowState(100, True), UP, Action.SKIP_DELETED),
        (None, DEL, Action.DELETE),
        (RowState(999, False), DEL, Action.DELETE),
        (RowState(100, True), DEL, Action.SKIP_DELETED),
    ],
    ids=["new", "newer", "same-version", "older", "after-delete", "tombstone-new",
         "delete-beats-newer-row", "delete-twice"],
)
def test_decide(current: RowState | None, intent: Upsert | Tombstone, expected: Action) -> None:
    assert decide(current, intent) is expected


def test_a_membership_touches_its_user_and_organization_and_a_deletion_only_its_row() -> None:
    """What a batch keeps in order (see WebhookProcessor.pipelined_in)."""
    member = plan(parse_envelope(f.body_of(f.envelope("organizationMembership.created",
                                                      f.membership("orgmem_1", "org_1", "user_1", 5)))))
    assert touches(member) == {(Entity.MEMBERSHIP, "orgmem_1"), (Entity.USER, "user_1"),
                               (Entity.ORGANIZATION, "org_1")}
    assert touches(plan(parse_envelope(f.body_of(f.envelope("user.updated", f.user("user_1", 5)))))) == {
        (Entity.USER, "user_1")}
    gone = plan(parse_envelope(f.body_of(f.envelope("user.deleted", f.deleted("user", "user_1")))))
    assert isinstance(gone, Tombstone) and touches(gone) == {(Entity.USER, "user_1")}
    assert touches(RevokeSession("sess_1", "user_1", "revoked", None)) == frozenset()


def test_plan_maps_each_mirrored_type() -> None:
    assert isinstance(plan(parse_envelope(f.body_of(f.envelope("user.created", f.user("u", 1))))), Upsert)
    tomb = plan(parse_envelope(f.body_of(f.envelope("user.deleted", f.deleted("user", "u"), 1_700_000_000))))
    assert tomb == Tombstone(Entity.USER, "u", 1_700_000_000_000)  # seconds envelope -> ms
    mem = plan(parse_envelope(f.body_of(f.envelope("organizationMembership.deleted", f.membership("m", "o", "u", 5)))))
    assert isinstance(mem, Tombstone) and mem.entity is Entity.MEMBERSHIP
    assert isinstance(plan(parse_envelope(f.body_of(f.envelope("session.created", {"id": "s"})))), Ignore)
    revoke = plan(parse_envelope(f.body_of(f.envelope("session.revoked", {"id": "sess_1", "user_id": "u",
                                                                          "expire_at": 1_900_000_000_000}))))
    assert revoke == RevokeSession("sess_1", "u", "revoked", 1_900_000_000_000)


@pytest.mark.parametrize(("expire_at", "kept", "said"), [(9, None, "dropped (the revocation is kept)"),
                                                         (0, None, "dropped (the revocation is kept)"),
                                                         (1_900_000_000, 1_900_000_000_000, "read as seconds")])
def test_a_revocations_expiry_that_is_no_millisecond_time_never_lets_the_session_back(
        expire_at: int, kept: int | None, said: str) -> None:
    """Review (webhook edge) 2: an ``expire_at`` of 0 or in seconds was stored as it came: the deny list took the
    session for long expired and never loaded the revocation (applied, no note, and the session kept working)."""
    revoke = plan(parse_envelope(f.body_of(f.envelope("session.revoked", {"id": "sess_1", "user_id": "u",
                                                                          "expire_at": expire_at}))))
    assert isinstance(revoke, RevokeSession) and revoke.expire_at == kept
    assert revoke.notes == (f"data.expire_at {expire_at} is not a millisecond timestamp: {said}",)


def test_primary_email_is_the_one_named_by_primary_email_address_id() -> None:
    record = user_record(f.user("user_1", 1, email="main@example.com"))
    assert record.email == "main@example.com"
    assert record.email_addresses == ["alt.main@example.com", "main@example.com"]


def test_role_comes_from_public_metadata_with_user_default() -> None:
    assert user_record(f.user("u", 1, role="admin")).role == "admin"
    assert user_record(f.user("u", 1)).role == "user"


def test_legacy_membership_roles_are_normalised() -> None:
    env = parse_envelope(f.body_of(f.envelope("organizationMembership.created", f.membership("m", "o", "u", 5, role="basic_member"))))
    intent = plan(env)
    assert isinstance(intent, Upsert) and intent.record.role == "org:member"  # type: ignore[union-attr]


@pytest.mark.parametrize(("raw", "ms"), [(1_654_012_591, 1_654_012_591_000), (1_654_012_591_835, 1_654_012_591_835)])
def test_timestamps_in_seconds_or_ms_normalise_to_ms(raw: int, ms: int) -> None:
    assert normalize_timestamp_ms(raw) == ms


@pytest.mark.parametrize("raw", [10**400, -(10**400), -1], ids=["huge", "huge-negative", "negative"])
def test_timestamps_out_of_range_are_payload_errors(raw: int) -> None:
    """-10**400 passed the upper bound, then overflowed float(): a 500 on every retry, not a 400."""
    with pytest.raises(PayloadError, match="out of range"):
        normalize_timestamp_ms(raw)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"data":{}}', b'{"type":"user.created"}', b'{"type":"x","data":{},"timestamp":"now"}',
     b'{"type":"x","data":{},"object":"list","timestamp":1}'],
    ids=["not-json", "array", "no-type", "no-data", "bad-timestamp", "not-an-event"],
)
def test_non_envelopes_are_payload_errors(body: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_envelope(body)


def test_shape_errors_are_reported_not_guessed() -> None:
    bad = f.membership("m", "o", "u", 5)
    del bad["public_user_data"]
    with pytest.raises(EventShapeError, match="public_user_data"):
        plan(parse_envelope(f.body_of(f.envelope("organizationMembership.created", bad))))
    no_updated = f.user("u", 1)
    del no_updated["updated_at"]
    with pytest.raises(EventShapeError, match="updated_at"):  # a Backend API object: nothing vouches for a version
        user_record(no_updated)


@pytest.mark.parametrize("updated_at", [None, "200", -5, 2**63, 1_700_000_000_001_000, "absent"],
                         ids=["null", "text", "negative", "overflow", "microseconds", "absent"])
def test_a_webhook_events_unusable_or_far_future_version_is_its_timestamp(updated_at: object) -> None:
    """Review (hostile events) 2: a ``user.updated`` whose ``updated_at`` was in microseconds was applied with
    that version, and every later ban or demotion of the user was skipped as stale, for good; a missing or
    malformed one failed the event, its ban with it. The event's timestamp is the version now, noted."""
    data = f.user("u", 1, role="user", banned=True)
    if updated_at == "absent":
        del data["updated_at"]
    else:
        data["updated_at"] = updated_at
    intent = plan(parse_envelope(f.body_of(f.envelope("user.updated", data, timestamp=1_700_000_000_000))))
    assert isinstance(intent, Upsert) and isinstance(intent.record, UserRecord)
    assert (intent.record.clerk_updated_at, intent.record.banned) == (1_700_000_000_000, True)
    assert intent.notes[-1].startswith("'updated_at' ") and intent.notes[-1].endswith(
        ": the event's timestamp is the version")


def test_a_version_up_to_a_year_ahead_of_its_event_is_kept() -> None:
    day = 366 * 86_400_000
    for kind, data in (("user.updated", f.user("u", 1_700_000_000_000 + day)),
                       ("organization.updated", f.organization("o", 1_700_000_000_000 + day)),
                       ("organizationMembership.updated", f.membership("m", "o", "u", 1_700_000_000_000 + day))):
        intent = plan(parse_envelope(f.body_of(f.envelope(kind, data, timestamp=1_700_000_000_000))))
        assert isinstance(intent, Upsert) and intent.version == 1_700_000_000_000 + day and not intent.notes
        data["updated_at"] += 1
        intent = plan(parse_envelope(f.body_of(f.envelope(kind, data, timestamp=1_700_000_000_000))))
        assert isinstance(intent, Upsert) and intent.version == 1_700_000_000_000, kind


def test_a_tombstone_ignores_an_updated_at_far_ahead_of_its_event() -> None:
    gone = {**f.deleted("user", "u"), "updated_at": 1_700_000_000_001_000}
    intent = plan(parse_envelope(f.body_of(f.envelope("user.deleted", gone, timestamp=1_700_000_000_000))))
    assert isinstance(intent, Tombstone) and intent.version == 1_700_000_000_000


def test_the_status_rule_is_one_pure_function() -> None:
    from clerk_sync.engine import DeliveryStatus, plan_delivery
    from clerk_sync.events import parse_envelope

    def planned(event_type: str, data: dict[str, object]) -> tuple[DeliveryStatus, DeliveryStatus]:
        body = json.dumps({"type": event_type, "object": "event", "timestamp": 1_700_000_000_000, "data": data})
        p = plan_delivery(parse_envelope(body))
        return p.status, p.status_after(False)

    assert planned("email.created", {"id": "x"}) == (DeliveryStatus.IGNORED, DeliveryStatus.SKIPPED)
    assert planned("user.created", {"id": 1})[0] == DeliveryStatus.FAILED  # no id: unusable
    # no updated_at: the event's timestamp is the version (noted)
    assert planned("user.created", {"id": "user_1"})[0] == DeliveryStatus.APPLIED
    assert planned("user.deleted", {"id": "user_1", "deleted": True}) == (DeliveryStatus.APPLIED, DeliveryStatus.SKIPPED)
    assert DeliveryStatus.DUPLICATE == "duplicate"  # what the inbox stores and the service answers
