"""Whether a stored JSON document names a person: erasure's test.

A SQL text search (``LIKE '%ann@example.com%'``) only narrows the rows down: it also finds
``joann@example.com`` and ``user_2ab`` for ``user_2a``, and misses an address the sender escaped
(``zo\\u00eb@``, Go's ``\\u0026`` for ``&``) where the store keeps the body as received (SQLite,
MariaDB). :class:`Mentions` gives the SQL patterns that find every candidate and the exact test on the
parsed document. Hand-written: no library knows where a Clerk id or an e-mail address ends.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["Mentions"]

# What may stand next to an e-mail address or a Clerk id without being part of it. Before an address: not a
# letter, digit, ``.``, ``%``, ``+``, ``_`` or ``-`` (``joann@`` is not ``ann@``). The rarer characters a local
# part may also hold (``'``, ``=``, ``/``, ``{``...) are taken as delimiters: they quote or frame addresses far
# more often (``KeyError: 'ann@example.com'``, ``?email=ann@...``), and an erasure that misses a real mention
# is worse than one that redacts a payload more. After it: not one that continues the domain.
_EMAIL_BEFORE = r"(?<![\w.%+-])"
_EMAIL_AFTER = r"(?![\w-])(?!\.\w)"
_ID_BEFORE, _ID_AFTER = r"(?<!\w)", r"(?!\w)"
_MAX_SPELLINGS = 64  # case spellings of an address searched for (see _spellings)


class Mentions:
    """The Clerk ids and e-mail addresses of one person (``needles``). E-mail addresses compare without
    regard to case; ids exactly."""

    def __init__(self, needles: Iterable[str]) -> None:
        self.needles = sorted({n for n in needles if n})
        parts = [f"(?i:{_EMAIL_BEFORE}{re.escape(n)}{_EMAIL_AFTER})" if "@" in n else
                 f"{_ID_BEFORE}{re.escape(n)}{_ID_AFTER}" for n in self.needles]
        self._pattern = re.compile("|".join(parts)) if parts else None

    def __bool__(self) -> bool:
        return bool(self.needles)

    def patterns(self) -> list[str]:
        """The texts a SQL search (case-insensitive ``LIKE``) looks for to find every row that may name the
        person: each needle as written, and as JSON escapes it (non-ASCII as ``\\uXXXX``, and Go's HTML-safe
        ``\\u0026``, ``\\u003c``, ``\\u003e``)."""
        found: set[str] = set()
        for needle in self.needles:
            for spelling in _spellings(needle) if "@" in needle else (needle,):
                escaped = json.dumps(spelling)[1:-1]
                for text in (spelling, escaped):
                    found.add(text)
                    found.add(text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e"))
        return sorted(found)

    def in_text(self, text: str | None) -> bool:
        """Whether ``text`` names the person (a whole address or id, not a part of another one)."""
        if not text or self._pattern is None:
            return False
        return self._pattern.search(text) is not None

    def in_document(self, document: Any) -> bool:
        """Whether any string of the parsed JSON ``document`` (values and keys) names the person."""
        if isinstance(document, str):
            return self.in_text(document)
        if isinstance(document, dict):
            return any(self.in_text(k) or self.in_document(v) for k, v in document.items())
        if isinstance(document, list):
            return any(self.in_document(v) for v in document)
        return False


def _spellings(address: str) -> list[str]:
    """``address`` with each non-ASCII letter in either case. The SQL ``lower()`` folds an escape's hex digits,
    not the letter it stands for: ``ANN\\u00c9@`` does not lower to ``ann\\u00e9@``, so each spelling's escape
    is searched for. Past :data:`_MAX_SPELLINGS`, the longest ASCII part of the address stands for all of
    them (more candidates for :meth:`Mentions.in_document` to turn down, none missed)."""
    choices = [sorted({c, c.lower(), c.upper()}) if not c.isascii() else [c] for c in address]
    if math.prod(len(c) for c in choices) <= _MAX_SPELLINGS:
        return ["".join(spelling) for spelling in itertools.product(*choices)]
    return [max(re.findall(r"[\x00-\x7f]+", address) or [""], key=len) or address]
