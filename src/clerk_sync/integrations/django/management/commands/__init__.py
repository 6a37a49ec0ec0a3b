"""Django management commands of clerk-sync."""

from __future__ import annotations

__all__: list[str] = []
