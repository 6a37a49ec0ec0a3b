"""The service's logfmt renderer writes exactly what structlog's would (it only checks keys once)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import structlog

from clerk_sync._logging import Logfmt

ORDER = ("timestamp", "level", "event")
VALUES: list[Any] = [
    None, True, False, 0, -7, 3.25, 1e-7, "", "plain", "two words", "a=b", 'say "hi"', "back\\slash",
    'both \\ and "', "line\nbreak", "tab\there", "ünïcödé ✓", {"nested": ["x y", 1]}, ["a", None], b"bytes",
]


def _theirs() -> structlog.processors.LogfmtRenderer:
    return structlog.processors.LogfmtRenderer(key_order=list(ORDER), drop_missing=True, bool_as_flag=False)


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_every_kind_of_value_renders_as_structlog_renders_it(value: Any) -> None:
    ours, theirs = Logfmt(ORDER), _theirs()
    for event in ({"event": "webhook", "level": "info", "svix_id": value},
                  {"timestamp": value, "event": value, "error": value, "z": 1},
                  {"x": value, "event": "e", "y": value}):
        assert ours(None, "info", dict(event)) == theirs(None, "info", dict(event))


def test_key_order_missing_keys_and_extra_keys_in_their_order() -> None:
    ours, theirs = Logfmt(ORDER), _theirs()
    keys = ["event", "svix_id", "level", "status", "timestamp", "seconds"]
    for picked in itertools.chain.from_iterable(itertools.permutations(keys, n) for n in range(4)):
        event = {key: f"{key} value" for key in picked}
        assert ours(None, "info", dict(event)) == theirs(None, "info", dict(event))
    twice = {"event": "again", "k": 1}
    assert ours(None, "info", dict(twice)) == ours(None, "info", dict(twice)) == theirs(None, "info", dict(twice))


@pytest.mark.parametrize("key", ["has space", "tab\tkey", "new\nline", ""])
def test_a_key_with_blanks_is_refused_every_time_like_structlog(key: str) -> None:
    ours = Logfmt(ORDER)
    for _ in range(2):  # a refused key is not remembered as checked
        if key:
            with pytest.raises(ValueError, match="Invalid key"):
                ours(None, "info", {key: 1})
            with pytest.raises(ValueError, match="Invalid key"):
                _theirs()(None, "info", {key: 1})
        else:
            assert ours(None, "info", {key: 1}) == _theirs()(None, "info", {key: 1})


def test_a_traceback_at_a_terminal_shows_no_local_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Privacy review: at a terminal, structlog's default traceback (rich) printed every frame's locals, which
    on the apply path are the event's values: an `apply_crashed` line quoted the person's e-mail."""
    import io
    import sys

    from clerk_sync._logging import configure_logging

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    configure_logging("INFO")
    try:
        def apply(email: str) -> None:
            raise KeyError("primary_email_address_id")

        try:
            person = "@".join(["ann.secret", "example.com"])  # (not in the source lines the traceback quotes)
            apply(person)
        except KeyError:
            structlog.get_logger("t").exception("apply_crashed")
    finally:
        structlog.reset_defaults()
    out = terminal.getvalue()
    assert "apply_crashed" in out and "KeyError" in out and "Traceback" in out
    assert "ann.secret@example.com" not in out
