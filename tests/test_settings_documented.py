"""Every setting a user can set is named in README.md: each environment variable ``Settings`` reads (every
alias, ``AliasChoices`` included) and each Django-only ``CLERK_SYNC`` key. Error messages, ``doctor`` and
Django's checks name these variables (``CLERK_SYNC_WEBHOOK_TOLERANCE_S``, ``CLERK_JWKS_URL``,
``USER_FIELDS``), so the README must say what they mean."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import AliasChoices, AliasPath

from clerk_sync.config import Settings
from clerk_sync.integrations.django.conf import _OPTION_KEYS

README = Path(__file__).resolve().parents[1] / "README.md"

# Read by Settings but not for users to set, each with its reason.
INTERNAL = {
    # Set by `clerk-sync serve --workers N` (from --migrate / --no-migrate) for the worker processes it
    # starts, read by their app factory (integrations.starlette.app_from_env); users choose with the flags.
    "CLERK_SYNC_MIGRATE_ON_START",
}


def _names(alias: object) -> list[str]:
    """The environment variable names of one field's ``validation_alias``."""
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [name for choice in alias.choices for name in _names(choice)]
    if isinstance(alias, AliasPath) and isinstance(alias.path[0], str):
        return [alias.path[0]]
    return []


ENV_NAMES = sorted({name for info in Settings.model_fields.values() for name in _names(info.validation_alias)})
DJANGO_KEYS = sorted(_OPTION_KEYS)


def documented(readme: str) -> set[str]:
    """Names written as a whole word inside an inline code span (`CLERK_ISSUER`, `CLERK_SYNC["HOOKS"]`);
    fenced code blocks do not count: a name there is used, not explained."""
    text = re.sub(r"^```.*?^```", "", readme, flags=re.MULTILINE | re.DOTALL)
    return {word for span in re.findall(r"`([^`\n]+)`", text) for word in re.findall(r"\b[A-Z][A-Z0-9_]*\b", span)}


def test_every_alias_is_seen() -> None:
    # AliasChoices are expanded (both names of a setting), and the exemptions are still settings.
    assert {"CLERK_WEBHOOK_SECRET", "CLERK_FRONTEND_API_URL", "DATABASE_URL"} <= set(ENV_NAMES)
    assert set(ENV_NAMES) >= INTERNAL


@pytest.mark.parametrize("name", [n for n in ENV_NAMES if n not in INTERNAL])
def test_environment_variable_is_documented(name: str) -> None:
    assert name in documented(README.read_text()), f"README.md does not name `{name}` (Settings reads it)"


@pytest.mark.parametrize("key", DJANGO_KEYS)
def test_django_option_is_documented(key: str) -> None:
    section = README.read_text().split("## In a Django project\n", 1)[1].split("\n## ", 1)[0]
    assert key in documented(section), f"README.md's Django section does not name CLERK_SYNC key `{key}`"


def test_a_name_in_prose_or_in_a_code_block_is_not_documentation() -> None:
    readme = "Set CLERK_A.\n\n```python\nCLERK_B = 1\n```\n`CLERK_C=1`, `..._D`, `CLERK_SYNC[\"E\"]`\n"
    assert documented(readme) == {"CLERK_C", "CLERK_SYNC", "E"}
