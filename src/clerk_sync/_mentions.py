"""Whether a stored JSON document names a person: erasure's test.

A SQL text search (``LIKE '%ann@example.com%'``) only narrows the rows down: it also finds
``joann@example.com`` and ``user_2ab`` for ``user_2a``, and misses an address the sender escaped
(``zo\\u00eb@``, Go's ``\\u0026`` for ``&``) where the store keeps the body as received (SQLite,
MariaDB). :class:`Mentions` gives the SQL patterns that find every candidate and the exact test on the
parsed document. Hand-written: no library knows where a Clerk id or an e-mail address ends.
"""

from __future__ import annotations

import json
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
_ESCAPE = re.compile(r"\\u[0-9a-fA-F]{4}")  # a JSON escape, \u00e9
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


class Mentions:
    """The Clerk ids, e-mail addresses and phone numbers of one person (``needles``). E-mail addresses
    compare without regard to case; ids and numbers exactly, as whole words."""

    def __init__(self, needles: Iterable[str]) -> None:
        self.needles = sorted({n for n in needles if n})
        parts = [f"(?i:{_EMAIL_BEFORE}{re.escape(n)}{_EMAIL_AFTER})" if "@" in n else
                 f"{_ID_BEFORE}{re.escape(n)}{_ID_AFTER}" for n in self.needles]
        self._pattern = re.compile("|".join(parts)) if parts else None

    def __bool__(self) -> bool:
        return bool(self.needles)

    def patterns(self) -> list[str]:
        """SQL ``LIKE`` patterns (escape character ``/``, compared with both sides lowered) that find every
        row that may name the person: each needle as written, and as JSON escapes it (non-ASCII as
        ``\\uXXXX``, and Go's HTML-safe ``\\u0026``, ``\\u003c``, ``\\u003e``). An escape's hex digits are
        wildcards: ``lower()`` folds them, not the letter they stand for, so ``ANN\\u00c9@`` must match
        ``ann\\u00e9@`` (one pattern whatever the address's letters; :meth:`in_document` decides)."""
        found: set[str] = set()
        for needle in self.needles:
            for text in (needle, json.dumps(needle)[1:-1]):
                found.add(_like(text))
                found.add(_like(text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")))
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


def _like(text: str) -> str:
    """``%text%`` as a LIKE pattern: ``/``, ``%`` and ``_`` escaped, each JSON escape's hex digits ``____``, each
    run of non-ASCII letters ``%``: the database's ``lower()`` may fold ASCII only (PostgreSQL under
    ``LC_CTYPE=C``: ``lower('ANNÉ')`` is ``annÉ``), and Python's may change a letter's length (``İ``)."""
    pieces = [_NON_ASCII.sub("%", piece.replace("/", "//").replace("%", "/%").replace("_", "/_"))
              for piece in _ESCAPE.split(text)]
    return "%" + "\\u____".join(pieces) + "%"
