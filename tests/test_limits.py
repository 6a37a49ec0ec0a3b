"""The one place that decides what a store can hold: clerk_sync._limits (pure, no database)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from clerk_sync import _limits
from clerk_sync._limits import MAX_DEPTH, parse_json
from clerk_sync.tables import organization_memberships, organizations, revoked_sessions, users, webhook_events


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


# (id, body, the cleaned value, a phrase every note set must contain, stored as received?)
CASES: list[tuple[str, str, Any, str | None, bool]] = [
    ("plain", '{"a":[1,2.5,"x",null,true]}', {"a": [1, 2.5, "x", None, True]}, None, True),
    ("surrogate-pair-kept", '{"a":"\\ud83d\\ude00"}', {"a": "\U0001f600"}, None, False),
    ("lone-surrogate", '{"a":"x\\ud800y"}', {"a": "x\ufffdy"}, "a: lone surrogate replaced by U+FFFD", False),
    ("lone-low-surrogate", '{"a":"\\uDC00"}', {"a": "\ufffd"}, "lone surrogate", False),
    ("nul-value", '{"a":"ad\\u0000min"}', {"a": "ad\ufffdmin"}, "a: NUL replaced by U+FFFD", False),
    ("nul-key", '{"k\\u0000":1}', {"k\ufffd": 1}, "NUL replaced", False),
    ("overflowing-float", '{"a":1e400,"b":-1E+400}', {"a": None, "b": None}, "outside the double range", False),
    ("underflowing-float", '{"a":1e-20000}', {"a": 0.0}, None, False),
    ("long-int-kept", '{"a":' + "9" * 400 + "}", {"a": int("9" * 400)}, None, True),
    ("too-long-int", '{"a":-' + "9" * 5000 + "}", {"a": None}, "longer than 4300 digits", False),
    ("at-the-depth-limit", nested(MAX_DEPTH), json.loads(nested(MAX_DEPTH)), None, True),
    ("one-level-too-deep", nested(MAX_DEPTH + 1), json.loads(nested(MAX_DEPTH, "null")), "deeper than 64", False),
    ("10000-levels", '{"data":{"m":' + nested(10_000) + ',"ok":1}}', None, "data.m: value nested deeper", False),
    ("brackets-in-strings", json.dumps({"a": "[" * 5000}), {"a": "[" * 5000}, None, True),
]


@pytest.mark.parametrize(("body", "value", "note", "as_received"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_json_cleans_what_a_store_would_refuse(body: str, value: Any, note: str | None, as_received: bool) -> None:
    parsed = parse_json(body)
    if value is not None:
        assert parsed.value == value
    assert depth_of(parsed.value) <= MAX_DEPTH
    assert (parsed.text == body) is as_received
    if note is None:
        assert parsed.notes == ()
    else:
        assert any(note in n for n in parsed.notes), parsed.notes
    again = parse_json(parsed.text)  # the stored copy is clean: parsing it changes nothing more
    assert (again.value, again.notes, again.text) == (parsed.value, (), parsed.text)


def test_a_deep_value_is_cut_where_it_starts_and_its_siblings_survive() -> None:
    parsed = parse_json('{"data":{"unsafe_metadata":{"a":' + nested(1200) + ',"b":"kept"},"role":"user"}}')
    meta = parsed.value["data"]["unsafe_metadata"]
    assert meta["b"] == "kept" and parsed.value["data"]["role"] == "user"
    assert depth_of(parsed.value) == MAX_DEPTH
    assert parsed.notes == ("data.unsafe_metadata: value nested deeper than 64 levels replaced by null",)


def test_the_internal_marker_sent_as_a_string_is_just_a_dropped_value() -> None:
    parsed = parse_json(json.dumps({"a": _limits._TOO_DEEP, "b": 1}))
    assert parsed.value == {"a": None, "b": 1}


@pytest.mark.parametrize(
    "body",
    ['{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}', '{"a":[}', nested(100)[:-1], "[" * 100 + "}" * 100, "nope", ""],
    ids=["nan", "infinity", "minus-infinity", "mismatched", "unclosed-deep", "mismatched-deep", "word", "empty"],
)
def test_what_is_not_rfc_8259_json_is_refused(body: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - every refusal is a ValueError; its text varies
        parse_json(body)


_hostile_text = st.text(st.characters(exclude_categories=()), max_size=20) | st.sampled_from(
    ["\x00", "\ud800", "a\udfffb", "\x00\ud83d", "\U0001f600"]
)
_hostile_number = st.sampled_from(["1e400", "-1e400", "1e-400", "9" * 4301, "0.1", "-0", "1E308"])


def _json_texts() -> st.SearchStrategy[str]:
    scalar = st.one_of(
        st.none().map(lambda _: "null"),
        st.booleans().map(json.dumps),
        st.integers().map(str),
        _hostile_number,
        _hostile_text.map(json.dumps),  # json.dumps writes lone surrogates and NUL as \\u escapes
    )
    tree = st.recursive(
        scalar,
        lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]")
        | st.lists(st.tuples(_hostile_text.map(json.dumps), inner), max_size=3).map(
            lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"
        ),
        max_leaves=12,
    )
    deep = st.tuples(st.integers(1, 3000), tree).map(lambda t: nested(t[0], t[1]))
    return st.one_of(tree, deep)


@settings(max_examples=300, deadline=None)
@given(_json_texts())
def test_every_json_text_parses_to_a_value_both_stores_can_hold(body: str) -> None:
    parsed = parse_json(body)
    assert "\x00" not in parsed.text
    parsed.text.encode("utf-8")  # no lone surrogate left: SQLite's driver and JSONB can take it
    assert depth_of(parsed.value) <= MAX_DEPTH
    strict = json.loads(parsed.text, parse_constant=lambda c: pytest.fail(f"{c} stored"))
    assert strict == parsed.value
    assert all(math.isfinite(n) for n in _numbers(parsed.value) if isinstance(n, float))
    assert all(len(str(abs(n))) <= _limits.MAX_INT_DIGITS for n in _numbers(parsed.value) if isinstance(n, int))
    if parsed.text == body:
        assert parsed.notes == ()


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


# Every column a Clerk value lands in is as wide as the limit the events module checks: one set of limits.
COLUMN_LIMITS = [
    (users.c.clerk_id, _limits.CLERK_ID_CHARS),
    (users.c.email, _limits.EMAIL_CHARS),
    (users.c.first_name, _limits.NAME_CHARS),
    (users.c.last_name, _limits.NAME_CHARS),
    (users.c.username, _limits.NAME_CHARS),
    (users.c.role, _limits.ROLE_CHARS),
    (organizations.c.clerk_id, _limits.CLERK_ID_CHARS),
    (organizations.c.name, _limits.NAME_CHARS),
    (organizations.c.slug, _limits.NAME_CHARS),
    (organization_memberships.c.clerk_id, _limits.CLERK_ID_CHARS),
    (organization_memberships.c.organization_clerk_id, _limits.CLERK_ID_CHARS),
    (organization_memberships.c.user_clerk_id, _limits.CLERK_ID_CHARS),
    (organization_memberships.c.role, _limits.ROLE_CHARS),
    (revoked_sessions.c.session_id, _limits.CLERK_ID_CHARS),
    (revoked_sessions.c.user_clerk_id, _limits.CLERK_ID_CHARS),
    (webhook_events.c.svix_id, _limits.SVIX_ID_CHARS),
    (webhook_events.c.type, _limits.EVENT_TYPE_CHARS),
    (webhook_events.c.instance_id, _limits.INSTANCE_ID_CHARS),
]


@pytest.mark.parametrize(("column", "limit"), COLUMN_LIMITS, ids=[str(c) for c, _ in COLUMN_LIMITS])
def test_column_sizes_are_the_checked_limits(column: sa.Column[Any], limit: int) -> None:
    assert isinstance(column.type, sa.String) and column.type.length == limit


def test_every_bounded_text_column_of_the_mirrored_tables_is_checked() -> None:
    checked = {str(c) for c, _ in COLUMN_LIMITS}
    bounded = {
        str(c) for t in (users, organizations, organization_memberships) for c in t.columns
        if isinstance(c.type, sa.String) and c.type.length is not None and c.name != "plan"  # plan is ours
    }
    assert bounded <= checked
