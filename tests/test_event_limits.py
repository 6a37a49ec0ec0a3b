"""Record builders against the column limits, without a database: what is failed, dropped or applied."""

from __future__ import annotations

import re
from typing import Any

import pytest

from clerk_sync._limits import show
from clerk_sync.engine import Entity, RevokeSession, Tombstone, Upsert, plan
from clerk_sync.errors import EventShapeError, PayloadError
from clerk_sync.events import membership_record, organization_record, parse_envelope, user_record
from tests import factories as f


def planned(event_type: str, data: dict[str, Any]) -> Any:
    return plan(parse_envelope(f.body_of(f.envelope(event_type, data))))


@pytest.mark.parametrize(
    ("change", "field", "note"),
    [
        ({"first_name": "x" * 256}, "first_name", "data.first_name dropped: 256 characters, the column holds 255"),
        ({"last_name": ["not", "text"]}, "last_name", "data.last_name dropped: not a string"),
        ({"username": "u" * 300}, "username", "data.username dropped: 300 characters"),
        ({"image_url": 5}, "image_url", "data.image_url dropped: not a string"),
        ({"unsafe_metadata": "text"}, "unsafe_metadata", "data.unsafe_metadata dropped: not an object"),
        ({"email_addresses": {"a": 1}}, "email_addresses", "data.email_addresses dropped: not a list"),
    ],
    ids=["name-too-long", "name-wrong-type", "username-too-long", "image-wrong-type", "metadata-not-object", "emails-not-list"],
)
def test_an_unstorable_non_essential_value_is_dropped_and_noted(change: dict[str, Any], field: str, note: str) -> None:
    data = {**f.user("user_1", 5, role="admin", banned=True), "locked": True, "deprovisioned": True, **change}
    intent = planned("user.updated", data)
    assert isinstance(intent, Upsert)
    record = intent.record
    assert getattr(record, field) in (None, {}, [])
    assert any(n.startswith(note) for n in intent.notes), intent.notes
    assert (record.role, record.banned, record.locked, record.deprovisioned) == ("admin", True, True, True)  # type: ignore[union-attr]


def test_a_long_email_is_dropped_not_truncated() -> None:
    notes: list[str] = []
    record = user_record(f.user("user_1", 5, email="a" * 400 + "@example.com"), notes)
    assert record.email is None
    assert notes == ["primary email address dropped: 412 characters, the column holds 320"]


@pytest.mark.parametrize("role", ["r" * 65, "", 7, {"nested": "admin"}], ids=["too-long", "empty", "number", "object"])
def test_an_unusable_role_means_the_least_privilege(role: object) -> None:
    notes: list[str] = []
    data = f.user("user_1", 5)
    data["public_metadata"] = {"role": role}
    assert user_record(data, notes).role == "user"
    assert notes and notes[0].startswith("data.public_metadata.role ignored")
    mem = f.membership("m", "o", "u", 5)
    mem["role"] = role
    assert membership_record(mem, notes).role == "org:member"


@pytest.mark.parametrize("flag", ["banned", "locked", "deprovisioned"])
@pytest.mark.parametrize("value", ["yes", "false", 0, 1, {}, [True]],
                         ids=["string", "false-string", "zero", "number", "object", "list"])
def test_a_security_flag_that_is_not_a_boolean_fails_closed_and_holds_back_nothing(flag: str, value: object) -> None:
    """Review (fuzz): ``locked: "false"`` failed the whole event, holding back the ban and the role change
    it carried. The flag is True now (refused until Clerk sends a boolean), noted; the rest applies."""
    notes: list[str] = []
    data = {**f.user("user_1", 5, role="user", banned=True), flag: value}
    record = user_record(data, notes)
    assert getattr(record, flag) is True and record.banned is True and record.role == "user"
    assert notes == [f"data.{flag} is not true or false ({show(value)}): true applied (refused until Clerk sends "
                     "a boolean)"]


@pytest.mark.parametrize("flag", ["banned", "locked"])
def test_a_null_ban_or_lock_fails_closed_and_an_absent_one_is_false(flag: str) -> None:
    """Clerk's User never has ``banned``/``locked`` null (required booleans), so null is malformed: True, noted
    (False lifted a ban without a word). Absent is False: older payloads carry neither key."""
    notes: list[str] = []
    assert getattr(user_record({**f.user("user_1", 5), flag: None}, notes), flag) is True
    assert notes and notes[0].startswith(f"data.{flag} is not true or false (None)")
    legacy = {k: v for k, v in f.user("user_1", 5).items() if k != flag}
    assert getattr(user_record(legacy), flag) is False


def test_deprovisioned_is_mirrored_and_defaults_to_false() -> None:
    assert user_record({**f.user("user_1", 5), "deprovisioned": True}).deprovisioned is True
    assert user_record(f.user("user_1", 5)).deprovisioned is False  # webhook payloads may omit it
    assert user_record({**f.user("user_1", 5), "deprovisioned": None}).deprovisioned is False


@pytest.mark.parametrize(
    ("event_type", "data", "message"),
    [
        ("user.updated", f.user("u" * 65, 5), "user object 'id' is 65 characters; Clerk ids have at most 64"),
        ("organization.updated", f.organization("o" * 65, 5), "organization object 'id' is 65 characters"),
        ("organizationMembership.updated", f.membership("m", "o" * 65, "u", 5), "membership organization.id is 65"),
        ("organizationMembership.updated", f.membership("m", "o", "u" * 65, 5), "public_user_data.user_id is 65"),
        ("user.deleted", f.deleted("user", "u" * 65), "user.deleted data.id is 65 characters"),
        ("session.revoked", {"id": "s" * 65}, "session.revoked data.id is 65 characters"),
        ("session.ended", {"id": 5}, "session.ended data.id is missing or not a string (got 5)"),
    ],
    ids=["user", "organization", "membership-org", "membership-user", "deleted", "session", "session-id-type"],
)
def test_an_identity_no_column_can_hold_fails_the_event(event_type: str, data: dict[str, Any], message: str) -> None:
    with pytest.raises(EventShapeError, match=re.escape(message)):
        planned(event_type, data)


def test_a_revocation_keeps_its_session_id_and_drops_what_no_column_holds() -> None:
    intent = planned("session.revoked", {"id": "sess_1", "user_id": "u" * 65, "expire_at": 10**20})
    assert isinstance(intent, RevokeSession)
    assert (intent.session_id, intent.user_id, intent.expire_at) == ("sess_1", None, None)
    assert intent.notes == (
        "data.user_id dropped: 65 characters, the column holds 64",
        "data.expire_at dropped: not a millisecond timestamp in range (100000000000000000000)",
    )


def test_a_tombstone_ignores_an_updated_at_no_bigint_holds() -> None:
    intent = planned("user.deleted", {**f.deleted("user", "user_1"), "updated_at": 10**20})
    assert isinstance(intent, Tombstone) and intent.entity is Entity.USER
    assert intent.version < 2**63


def test_an_organization_name_too_long_is_dropped_and_noted() -> None:
    notes: list[str] = []
    record = organization_record(f.organization("org_1", 5, name="n" * 256), notes)
    assert (record.name, record.slug) == (None, None)
    assert notes == [
        "data.name dropped: 256 characters, the column holds 255",
        "data.slug dropped: 256 characters, the column holds 255",
    ]


@pytest.mark.parametrize(
    "body",
    [
        f.body_of(f.envelope("t" * 129, {})),
        f.body_of({**f.envelope("user.created", {}), "instance_id": "i" * 65}),
        f.body_of(f.envelope("user.created", {})).replace(b'"timestamp":', b'"timestamp":1e400,"x":'),
        f.body_of(f.envelope("user.created", {})).replace(b'"timestamp":', b'"timestamp":' + b"9" * 400 + b',"x":'),
    ],
    ids=["type-too-long", "instance-too-long", "timestamp-overflows", "timestamp-400-digits"],
)
def test_an_envelope_no_column_can_hold_is_not_a_clerk_event(body: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_envelope(body)


def test_a_deep_body_parses_and_says_what_was_cut() -> None:
    body = f.body_of(f.envelope("user.updated", f.user("user_1", 5, role="user")))
    body = body.replace(b'"unsafe_metadata":{}', b'"unsafe_metadata":' + b"[" * 5000 + b"]" * 5000)
    env = parse_envelope(body)
    assert env.notes == ("data.unsafe_metadata: value nested deeper than 64 levels replaced by null",)
    intent = plan(env)
    assert isinstance(intent, Upsert) and intent.record.role == "user"  # type: ignore[union-attr]
    assert intent.notes == ("data.unsafe_metadata dropped: not an object",)


def test_integers_too_large_for_a_float_are_out_of_range_not_a_crash() -> None:
    huge = 10**400  # math.isfinite(10**400) raises OverflowError: found by the property test
    data = {**f.user("user_1", 5), "created_at": huge, "last_sign_in_at": -huge}
    record = user_record(data)
    assert (record.clerk_created_at, record.last_sign_in_at) == (None, None)
    with pytest.raises(EventShapeError, match="'updated_at' must be a number of milliseconds, got an integer of about"):
        user_record({**data, "updated_at": huge})
