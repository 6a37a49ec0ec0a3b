"""Alembic migrations for the contract tables, plus the helpers the CLI and ``/readyz`` use."""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Engine

from clerk_sync.errors import ConfigError
from clerk_sync.store import READ_ONLY_OPTION

__all__ = ["current_revision", "head_revision", "is_current", "upgrade"]

_HERE = Path(__file__).parent


def _config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent). A database at a revision this release does not
    know (a newer clerk-sync migrated it: a rolled-back deploy) is a :class:`ConfigError` that says so."""
    try:
        command.upgrade(_config(engine), revision)
    except CommandError:
        at = current_revision(engine)
        if at is None or _knows(at):
            raise
        raise ConfigError(
            f"the database is at migration {at!r}, which this clerk-sync does not know (its newest is "
            f"{head_revision()!r}): a newer clerk-sync migrated it. Run that release (or newer), or restore the "
            "database to a migration this one knows; `serve --no-migrate` starts without migrating") from None


def _knows(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(_config()).get_revision(revision) is not None
    except CommandError:  # (alembic's "Can't locate revision")
        return False


def downgrade(engine: Engine, revision: str) -> None:
    command.downgrade(_config(engine), revision)


@functools.cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    # A reader's connection: on SQLite it must not take the write lock (``/readyz`` runs this).
    with engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()
