"""Shared by the benchmarks: replace one generated section of BENCHMARKS.md, leave the rest alone."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_section(section: str, begin: str, end: str, block: str) -> Path:
    """Swap the text between ``begin`` and ``end`` for ``block`` (which carries both markers).

    Re-reads the file right before writing: other benchmarks own other sections.
    """
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    elif section in text:
        pre, post = text.split(section, 1)
        text = pre + section + "\n\n" + block + "\n" + post
    else:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    path.write_text(text)
    return path
