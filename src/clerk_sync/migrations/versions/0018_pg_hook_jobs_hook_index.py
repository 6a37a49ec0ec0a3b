"""PostgreSQL: a partial index on ``hook_jobs (hook, id)`` for unfinished jobs, for a dispatcher's claim.

A dispatcher claims only the jobs of its own hooks (``outbox.claim(hooks=...)``). Its page of due jobs walks
the primary key and filters by hook, so a backlog of another hook's jobs ahead of its own (a removed hook's,
which ``doctor --freshness`` fails on, or another pool's, with pools split by ``--hooks``) was walked at every
claim: 0.5 s a claim over 500,000 such jobs, 5 ms with this index, and the same 5 ms as before over a backlog of
the dispatcher's own hooks (BENCHMARKS.md, tenth session). Dead jobs are left out: no claim reads them.

PostgreSQL only. SQLite's claim gained nothing from it, and MariaDB's optimizer chose it and claimed 3-5x
slower; neither gets it. Like 0008's expression indexes it is declared here, not in ``clerk_sync.tables``
(SQLAlchemy's comparison of the two does not read a partial index's predicate on every store).

The build takes the table's SHARE lock (new jobs wait) for as long as it reads ``hook_jobs``: seconds for a
queue of a million rows; dead jobs are read too (``clerk-sync hooks purge`` first makes it shorter).

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

NAME = "ix_hook_jobs_hook_id_unfinished"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"CREATE INDEX IF NOT EXISTS {NAME} ON hook_jobs (hook, id) WHERE status <> 'dead'")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"DROP INDEX IF EXISTS {NAME}")
