"""PostgreSQL: the console's indexes on the Clerk ids in a delivery's payload cut to 191 characters.

0008_console indexed ``payload -> 'data' ->> 'id'`` (and the membership's user and organization ids) at full
length. A btree entry holds at most 2,704 bytes, so a signed delivery whose ``data.id`` is a long object or
string (``->>`` gives an object's JSON text) could not be stored at all: its INSERT failed with
``ProgramLimitExceeded`` and the service answered 503 to every retry, a demotion in it never applied. The
indexes are built again on ``left(.., 191)``, as 0012 does on MariaDB, and the console's queries compile to the
same expression. 0008 now builds them cut, so this finds nothing to do on an install made since.

The build takes the inbox's SHARE lock (writes wait) for as long as it scans ``webhook_events``, within the
upgrade's transaction: on a large inbox run ``clerk-sync migrate`` as its own step.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_CUT = 191  # 0008's PG_ID_CHARS
# name -> (the JSON path of the id, partial: only rows where it is not NULL), as 0008 declares them
_INDEXES = {
    "ix_webhook_events_data_id": (("data", "id"), False),
    "ix_webhook_events_data_user_id": (("data", "public_user_data", "user_id"), True),
    "ix_webhook_events_data_org_id": (("data", "organization", "id"), True),
}


def _expression(path: tuple[str, ...]) -> str:
    *parents, leaf = path
    return f"left((payload{''.join(f' -> {p!r}' for p in parents)} ->> {leaf!r}), {_CUT})"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return  # SQLite has no entry size limit; MariaDB's virtual columns are cut since 0012
    built: dict[str, str] = dict(bind.execute(sa.text(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = "
        "'webhook_events'")).all())
    for name, (path, partial) in _INDEXES.items():
        if "left" in built.get(name, ""):  # (PostgreSQL writes it "left"(..))
            continue  # built cut by 0008 already
        expression = _expression(path)
        op.execute(f"DROP INDEX IF EXISTS {name}")
        where = f" WHERE {expression} IS NOT NULL" if partial else ""
        op.execute(f"CREATE INDEX {name} ON webhook_events ({expression}){where}")


def downgrade() -> None:
    """Nothing: the cut indexes stay. An uncut one could not be built over a stored delivery with a long id;
    0014's console does not use the cut ones (it scans the inbox for an id), which is slower, not wrong."""
