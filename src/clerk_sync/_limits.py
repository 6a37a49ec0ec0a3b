"""The limits every stored value obeys, stated once, and the JSON parser that enforces them (pure).

SQLite and PostgreSQL must decide every delivery the same way, so no limit is left to the database:
a value is cleaned, dropped or refused here, before either store sees it. Column sizes are the
PostgreSQL ones (``tables.py`` builds its columns from these constants; SQLite would store anything).

:func:`parse_json` has a fast path: a body with nothing to clean (no ``\\u0000`` or surrogate escape,
no float with an exponent, no deep nesting) is one ``json.loads`` plus a few substring checks, and is
stored as received. Anything else is re-parsed by :func:`_parse_slow` into a cleaned copy:

* nesting deeper than :data:`MAX_DEPTH` is cut in the text before parsing (``json.loads`` recurses and
  raises ``RecursionError`` near 1,000 levels) and the cut containers become ``null``;
* NUL and lone surrogates become U+FFFD: JSONB refuses both, SQLite's driver cannot encode the second.
  Replacing rather than stripping cannot turn ``"ad\\u0000min"`` into ``"admin"``;
* numbers that do not fit a double (``1e400``) or have more than :data:`MAX_INT_DIGITS` digits become
  ``null``; other floats are re-serialised by ``repr``, which both stores read back alike.

Each change is counted under the first two keys of its path (``data.unsafe_metadata``) and reported
in :attr:`Parsed.notes`, without the values (they may be private).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from clerk_sync.errors import EventShapeError

__all__ = [
    "BIGINT_MAX",
    "CLERK_ID_CHARS",
    "EMAIL_CHARS",
    "EVENT_TYPE_CHARS",
    "INSTANCE_ID_CHARS",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "NAME_CHARS",
    "REASON_CHARS",
    "ROLE_CHARS",
    "SVIX_ID_CHARS",
    "URL_CHARS",
    "Notes",
    "Parsed",
    "fit_clerk_id",
    "fit_ms",
    "fit_reason",
    "fit_text",
    "isfinite",
    "parse_json",
    "show",
]

CLERK_ID_CHARS = 64  # every clerk_id / *_clerk_id column, revoked_sessions.session_id
NAME_CHARS = 255  # users.first_name, last_name, username; organizations.name, slug
EMAIL_CHARS = 320  # users.email (RFC 5321: 64 + 1 + 255)
ROLE_CHARS = 64  # users.role, organization_memberships.role
EVENT_TYPE_CHARS = 128  # webhook_events.type
SVIX_ID_CHARS = 128  # webhook_events.svix_id
INSTANCE_ID_CHARS = 64  # webhook_events.instance_id
BIGINT_MAX = 2**63 - 1  # BIGINT columns (timestamps in ms)
URL_CHARS = 8192  # image_url, logo_url: TEXT, which MariaDB caps at 64 KB; no working URL is longer
REASON_CHARS = 2000  # webhook_events.last_error: why a delivery failed, what was cleaned or refused
MAX_DEPTH = 64  # JSON nesting, the outermost object being level 1; Clerk metadata never comes close
MAX_INT_DIGITS = 4300  # CPython's default int/str limit: a longer integer could not be read back

_TOO_DEEP = "\x00clerk_sync:too_deep"  # never survives cleaning otherwise: NUL becomes U+FFFD
_TOO_DEEP_JSON = json.dumps(_TOO_DEEP)
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_CLOSE = {"[": "]", "{": "}"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPES = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")  # \u0000 and surrogate escapes (pairs too)
_HUGE = object()  # an integer literal longer than MAX_INT_DIGITS
_NOTE_TEXT = {
    "nul": "NUL replaced by U+FFFD",
    "surrogate": "lone surrogate replaced by U+FFFD",
    "deep": f"value nested deeper than {MAX_DEPTH} levels replaced by null",
    "nonfinite": "number outside the double range replaced by null",
    "huge": f"integer longer than {MAX_INT_DIGITS} digits replaced by null",
}


@dataclass(frozen=True, slots=True)
class Parsed:
    """A parsed body, the text to store for it (the body itself when clean), and what was changed."""

    value: Any
    text: str
    notes: tuple[str, ...] = ()


class _Unusual(Exception):
    """Raised from a ``json.loads`` hook: the fast path cannot vouch for this body."""


def parse_json(text: str) -> Parsed:
    """Parse RFC 8259 JSON into values both stores accept; ``ValueError`` if it is not JSON."""
    try:
        value = _FAST.decode(text)
    except (_Unusual, RecursionError, ValueError):  # ValueError: too many digits, or not JSON at all
        return _parse_slow(text)
    if (
        ("\\" in text and _ESCAPES.search(text) is not None)  # most bodies have no backslash at all
        or (text.count("{") + text.count("[") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH))
    ):
        return _parse_slow(text)
    return Parsed(value, text)


# -- single values against their columns ----------------------------------------------------------
Notes = list[str] | None  # where a builder says what it dropped (None: the caller does not ask)


def fit_clerk_id(value: object, what: str) -> str:
    """A Clerk id that fits the id columns; anything else is an :class:`EventShapeError` (stored failed)."""
    if not isinstance(value, str) or not value:
        raise EventShapeError(f"{what} is missing or not a string (got {show(value)})")
    if len(value) > CLERK_ID_CHARS:
        raise EventShapeError(f"{what} is {len(value)} characters; Clerk ids have at most {CLERK_ID_CHARS}")
    if value != value.strip():  # MariaDB's PAD SPACE collations would take "user_1 " for "user_1"
        raise EventShapeError(f"{what} starts or ends with whitespace (got {show(value)}); Clerk ids have none")
    return value


def fit_reason(text: str) -> str:
    """``text`` cut to :data:`REASON_CHARS` (marked by "..."): what ``last_error`` holds."""
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


def fit_ms(value: object) -> int | None:
    """A millisecond timestamp that fits a BIGINT column, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not isfinite(value):
        return None
    return int(value) if 0 <= value <= BIGINT_MAX else None


def isfinite(value: int | float) -> bool:
    """``math.isfinite`` that also answers for integers too large for a float (it raises on 10**400)."""
    return isinstance(value, int) or math.isfinite(value)


def fit_text(value: object, where: str, limit: int | None, notes: Notes) -> str | None:
    """A string that fits its column (``limit`` characters, None: unlimited), else None and a note."""
    if value is None or (isinstance(value, str) and (limit is None or len(value) <= limit)):
        return value
    if notes is not None:
        why = f"{len(value)} characters, the column holds {limit}" if isinstance(value, str) else "not a string"
        notes.append(f"{where} dropped: {why}")
    return None


def show(value: object, limit: int = 40) -> str:
    """A short ``repr`` for error messages: never the whole of a 10,000-character value."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr of a 5,000-digit int raises
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _plain_float(literal: str) -> float:
    # Exponents can overflow (1e400 is inf, which SQLite's JSON would store as Infinity) or be out of
    # PostgreSQL's numeric range (1e-20000); long literals too. Rare in Clerk bodies: re-serialise them.
    if len(literal) > 24 or "e" in literal or "E" in literal:
        raise _Unusual
    return float(literal)


def _refuse_constant(literal: str) -> float:
    raise ValueError(f"{literal} is not a JSON value")


def _bounded_int(literal: str) -> object:
    return _HUGE if len(literal.lstrip("-")) > MAX_INT_DIGITS else int(literal)


# Built once: json.loads(text, **hooks) would build a decoder and its scanner per call (~3 us).
_FAST = json.JSONDecoder(parse_float=_plain_float, parse_constant=_refuse_constant)
_SLOW = json.JSONDecoder(parse_int=_bounded_int, parse_constant=_refuse_constant)


def _deeper_than(value: Any, limit: int) -> bool:
    if isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, list):
        return False
    if limit <= 0:
        return True
    return any(_deeper_than(item, limit - 1) for item in value if isinstance(item, dict | list))


def _parse_slow(text: str) -> Parsed:
    cut = _cut_deep(text)
    value = _SLOW.decode(cut)
    cleaner = _Cleaner()
    clean = cleaner.clean(value, 1, ())
    stored = json.dumps(clean, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return Parsed(clean, stored, cleaner.notes())


def _cut_deep(text: str) -> str:
    """Replace every container nested deeper than MAX_DEPTH by a marker string, in the text."""
    if text.count("{") + text.count("[") <= MAX_DEPTH:
        return text
    out: list[str] = []
    stack: list[str] = []
    pos, cut_from = 0, -1
    for match in _TOKENS.finditer(text):
        start = match.start()
        char = text[start]
        if char == '"':
            continue
        if char in _CLOSE:
            stack.append(char)
            if len(stack) == MAX_DEPTH + 1:
                cut_from = start
            continue
        if not stack or _CLOSE[stack.pop()] != char:
            raise ValueError(f"unbalanced {char!r} at character {start}")
        if len(stack) == MAX_DEPTH:
            out += (text[pos:cut_from], _TOO_DEEP_JSON)
            pos = match.end()
    out.append(text[pos:])
    return "".join(out)


class _Cleaner:
    """One walk over a parsed body (at most MAX_DEPTH deep), counting what it changes by path."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def clean(self, value: Any, depth: int, path: tuple[str, ...]) -> Any:
        if isinstance(value, str):
            return self._text(value, path) if value != _TOO_DEEP else self._drop(path, "deep")
        if isinstance(value, dict | list) and depth > MAX_DEPTH:
            return self._drop(path, "deep")
        if isinstance(value, dict):
            return {self._text(k, path): self.clean(v, depth + 1, _sub(path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.clean(v, depth + 1, path) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return self._drop(path, "nonfinite")
        return self._drop(path, "huge") if value is _HUGE else value

    def _text(self, text: str, path: tuple[str, ...]) -> str:
        if "\x00" in text:
            self._note(path, "nul", text.count("\x00"))
            text = text.replace("\x00", "\ufffd")
        if not text.isascii() and (found := len(_SURROGATE.findall(text))):
            self._note(path, "surrogate", found)
            text = _SURROGATE.sub("\ufffd", text)
        return text

    def _drop(self, path: tuple[str, ...], kind: str) -> None:
        self._note(path, kind)
        return None

    def _note(self, path: tuple[str, ...], kind: str, count: int = 1) -> None:
        key = (".".join(path) or "body", kind)
        self.counts[key] = self.counts.get(key, 0) + count

    def notes(self) -> tuple[str, ...]:
        return tuple(
            f"{where}: {_NOTE_TEXT[kind]}" + (f" ({n} times)" if n > 1 else "")
            for (where, kind), n in self.counts.items()
        )


def _sub(path: tuple[str, ...], key: str) -> tuple[str, ...]:
    if len(path) >= 2:
        return path
    # Keys name the place in notes; keep them short and printable (they may come from metadata).
    shown = "".join(c if c.isprintable() else "?" for c in key[:40])
    return (*path, shown if len(key) <= 40 else f"{shown}...")

PRUNE_BATCH_MAX = 10_000  # rows a prune transaction takes at most: its ids go in one statement (PostgreSQL's
# protocol takes 65,535 parameters), and a batch that size is a short transaction still
