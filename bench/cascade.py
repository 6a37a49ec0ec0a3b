"""A large organization's deletion: how long one signed ``organization.deleted`` takes to apply (one delivery,
in process: verify, parse, the tombstones and their cascade, commit), against Svix's 15 s per attempt.

Systems, each on a fresh database per cell, the same seeded organization of N members:

- ``plain``: clerk-sync's own tables only (the baseline of the run);
- ``mapped + hook``: README's B2B mapping (``accounts``, ``workspaces``, ``workspace_members`` with foreign keys
  to the Clerk-id columns; members hard-deleted) and one hook on ``organizationMembership.deleted``: the
  members' app rows and hook jobs written set-wise (``Outbox.record_many``);
- ``mapped + hook, row by row``: the same, each member's deletion recorded on its own (``Outbox.record`` per
  change: the path before set-wise cascades, kept as the fallback for a chunk the app's table refuses).

Usage: ``.venv/bin/python bench/cascade.py [--stores postgres,sqlite] [--members 5000,20000] [--rounds 2]
[--no-write]``. Needs PostgreSQL on 127.0.0.1:5432 (trust, database ``test``) for ``postgres`` and MariaDB
(root, no password) for ``mariadb``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _ingest_mariadb as maria  # noqa: E402
from bench._common import wait_quiet, write_section  # noqa: E402
from tests import factories as f  # noqa: E402

from clerk_sync import migrations  # noqa: E402
from clerk_sync.changes import Change, Hook  # noqa: E402
from clerk_sync.engine import Entity  # noqa: E402
from clerk_sync.events import membership_record, organization_record, user_record  # noqa: E402
from clerk_sync.ingest import WebhookProcessor  # noqa: E402
from clerk_sync.mapping import HardDelete, MappedTable, SchemaMapping, SoftDelete, migrate_schema  # noqa: E402
from clerk_sync.outbox import Outbox  # noqa: E402
from clerk_sync.store import Store, create_engine  # noqa: E402
from clerk_sync.webhooks import WebhookVerifier  # noqa: E402

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SVIX_TIMEOUT_S = 15.0  # Svix's wait for an answer per attempt (shared/clerk/FACTS.md)
ORG = "org_big"
T0 = 1_790_000_000_000
SYSTEMS = ("plain", "mapped + hook", "mapped + hook, row by row")
BEGIN, END = "<!-- cascade-bench:begin -->", "<!-- cascade-bench:end -->"


def _app_tables(engine: sa.Engine) -> None:
    """README's B2B tables (readme-b2b), the members' foreign keys to the Clerk-id columns included."""
    meta = sa.MetaData()
    sa.Table("accounts", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(320)))
    sa.Table("workspaces", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_org_id", sa.String(64), unique=True), sa.Column("name", sa.String(255)))
    sa.Table("workspace_members", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_membership_id", sa.String(64), unique=True),
             sa.Column("workspace_clerk_id", sa.String(64), sa.ForeignKey("workspaces.clerk_org_id"), nullable=False,
                       index=True),
             sa.Column("account_clerk_id", sa.String(64), sa.ForeignKey("accounts.clerk_user_id"), nullable=False,
                       index=True),
             sa.Column("role", sa.String(64)))
    meta.create_all(engine)


MAPPING = SchemaMapping(
    users=MappedTable("accounts", "clerk_user_id", {"email": "email"}, on_delete=SoftDelete("deleted_at")),
    organizations=MappedTable("workspaces", "clerk_org_id", {"name": "name"}, on_delete=HardDelete()),
    memberships=MappedTable("workspace_members", "clerk_membership_id", {
        "workspace_clerk_id": "organization_clerk_id", "account_clerk_id": "user_clerk_id", "role": "role"},
        on_delete=HardDelete()),
)
HOOKS = [Hook("member-removed", lambda change: None, on=["organizationMembership.deleted"])]


@contextmanager
def fresh_url(kind: str, name: str, tmp: Path) -> Iterator[str]:
    """A database of its own for one cell: a PostgreSQL schema, a MariaDB database or a SQLite file."""
    if kind == "postgres":
        admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        try:
            yield f"{PG}?options=-csearch_path%3D{name}"
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            admin.dispose()
    elif kind == "mariadb":
        maria.create_database(name)
        try:
            yield maria.database_url(name, "mysqldb")
        finally:
            maria.drop_database(name)
    else:
        yield f"sqlite:///{tmp / (name + '.db')}"


def seed(url: str, members: int, mapped: bool) -> None:
    """N users, one organization, N memberships in clerk-sync's tables (and, mapped, in the app's)."""
    engine = create_engine(url)
    migrations.upgrade(engine)
    if mapped:
        _app_tables(engine)
        with engine.begin() as conn:
            migrate_schema(conn, MAPPING)
    store = Store(engine, mapping=MAPPING if mapped else None)
    with store.transaction() as writer:
        writer.upsert_many(Entity.USER, [user_record(f.user(f"user_{i:06d}", T0)) for i in range(members)])
        writer.upsert_many(Entity.ORGANIZATION, [organization_record(f.organization(ORG, T0, name="Big"))])
        writer.upsert_many(Entity.MEMBERSHIP, [membership_record(f.membership(f"orgmem_{i:06d}", ORG,
                                                                              f"user_{i:06d}", T0))
                                               for i in range(members)])
    if mapped:
        MAPPING.backfill(store)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    engine.dispose()


@contextmanager
def row_by_row() -> Iterator[None]:
    """Each cascaded deletion recorded on its own, as before set-wise cascades."""
    original = Outbox.record_many

    def one_at_a_time(self: Outbox, changes: list[Change]) -> None:
        for change in changes:
            self.record(change)

    Outbox.record_many = one_at_a_time  # type: ignore[method-assign]
    try:
        yield
    finally:
        Outbox.record_many = original  # type: ignore[method-assign]


def delete_org(url: str, mapped: bool) -> tuple[float, int]:
    """Seconds for one signed ``organization.deleted`` through the webhook processor, and the hook jobs it wrote."""
    store = Store.from_url(url, mapping=MAPPING if mapped else None, hooks=HOOKS if mapped else ())
    try:
        processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
        event = f.envelope("organization.deleted", f.deleted("organization", ORG))
        headers, body = f.signed(event, f"msg_{uuid.uuid4().hex}")
        started = time.perf_counter()
        outcome = processor.process(headers, body)
        seconds = time.perf_counter() - started
        assert outcome.status == "applied", outcome
        with store.connect() as conn:
            jobs = int(conn.execute(sa.text("SELECT count(*) FROM hook_jobs")).scalar_one())
            live = int(conn.execute(sa.text(
                "SELECT count(*) FROM organization_memberships WHERE deleted_at IS NULL")).scalar_one())
        assert live == 0, f"{live} memberships left live"
        return seconds, jobs
    finally:
        store.dispose()


def cell(kind: str, members: int, system: str, tmp: Path, n: int) -> tuple[float, int]:
    mapped = system != "plain"
    with fresh_url(kind, f"cascade_bench_{n}", tmp) as url:
        seed(url, members, mapped)
        wait_quiet()
        if system.endswith("row by row"):
            with row_by_row():
                return delete_org(url, mapped)
        return delete_org(url, mapped)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="postgres,sqlite")
    parser.add_argument("--members", default="5000,20000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    stores, sizes = args.stores.split(","), [int(n) for n in args.members.split(",")]
    results: dict[tuple[str, int, str], list[tuple[float, int]]] = {}
    started = time.time()
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for kind in stores:
            for members in sizes:
                for _ in range(args.rounds):
                    for system in SYSTEMS:  # alternating within each round
                        n += 1
                        got = cell(kind, members, system, Path(tmp), n)
                        results.setdefault((kind, members, system), []).append(got)
                        print(f"{kind} {members} {system}: {got[0]:.2f} s, {got[1]} jobs", flush=True)
    block = render(results, stores, sizes, args, time.time() - started)
    print(block)
    if not args.no_write:
        print(f"wrote {write_section('## Large organizations (bench/cascade.py)', BEGIN, END, block)}")


def render(results: dict[tuple[str, int, str], list[tuple[float, int]]], stores: list[str], sizes: list[int],
           args: argparse.Namespace, wall_s: float) -> str:
    median: Callable[[list[float]], float] = statistics.median
    lines = [BEGIN, f"_{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
             f"{platform.machine()}, 2 CPUs; command `.venv/bin/python bench/cascade.py --stores {args.stores} "
             f"--members {args.members} --rounds {args.rounds}` ({wall_s / 60:.1f} min); one signed "
             "`organization.deleted` applied in process (verify, parse, tombstones, cascade, commit), seconds "
             "as median (each round in brackets), on a fresh database per cell._", "",
             "| store | members | system | seconds | ÷ plain | hook jobs | within Svix's 15 s? |",
             "|---|---:|---|---:|---:|---:|---|"]
    for kind in stores:
        for members in sizes:
            plain = median([s for s, _ in results[(kind, members, "plain")]])
            for system in SYSTEMS:
                runs = results[(kind, members, system)]
                secs = median([s for s, _ in runs])
                each = ", ".join(f"{s:.2f}" for s, _ in runs)
                lines.append(f"| {kind} | {members:,} | {system} | {secs:.2f} ({each}) | {secs / plain:.1f}x | "
                             f"{runs[0][1]:,} | {'yes' if max(s for s, _ in runs) < SVIX_TIMEOUT_S else 'NO'} |")
    lines += ["", END]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
