"""Console benchmark: every page's latency with 100,000 deliveries and 100,000 users in the database.

    .venv/bin/python bench/console.py [--users 100000] [--deliveries 100000] [--requests 40]
                                      [--databases sqlite,postgres] [--no-write]

For each database: a fresh, migrated SQLite file or PostgreSQL schema is filled in bulk (users,
1,000 organizations with 20,000 memberships, deliveries whose payloads are Clerk-shaped user events
about those users with 1 % ``failed``, 10,000 audit rows), then the console is served by uvicorn on
loopback and each page is requested sequentially over one keep-alive connection with the operator
token (after 3 warm-up requests). Latency is measured at the client: request sent -> body read.
Results: stdout and the "Console (bench/console.py)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import uvicorn
from _common import free_port, write_section  # bench/ is on sys.path when run as a script
from starlette.applications import Starlette
from starlette.routing import Mount

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.integrations.console import create_console
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import (
    audit_log,
    organization_memberships,
    organizations,
    reconcile_runs,
    users,
    webhook_events,
)

SECTION = "## Console (bench/console.py)"
BEGIN, END = "<!-- console-bench:begin -->", "<!-- console-bench:end -->"
PG_URL = os.environ.get("CLERK_SYNC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TOKEN = "bench-operator-token"  # noqa: S105 - a throwaway local server
TARGET_MS = 100.0
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Frances", "John"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Thompson", "Allen", "Backus"]
TYPES = ["user.created"] * 40 + ["user.updated"] * 55 + ["session.created"] * 5


def clerk_id(prefix: str, i: int) -> str:
    return f"{prefix}_{uuid.UUID(int=random.Random(f'{prefix}{i}').getrandbits(128)).hex[:27]}"


def user_json(i: int, ms: int) -> dict[str, Any]:
    first, last = FIRST[i % len(FIRST)], LAST[(i // len(FIRST)) % len(LAST)]
    email = f"{first.lower()}.{last.lower()}.{i}@example.com"
    return {"id": clerk_id("user", i), "object": "user", "first_name": first, "last_name": last, "username": None,
            "image_url": f"https://img.clerk.com/{i}", "email_addresses": [
                {"id": clerk_id("idn", i), "email_address": email, "verification": {"status": "verified"}}],
            "primary_email_address_id": clerk_id("idn", i), "public_metadata": {"role": "user"},
            "private_metadata": {"stripe_customer": f"cus_{i}"}, "unsafe_metadata": {},
            "created_at": ms, "updated_at": ms}


def seed(store: Store, n_users: int, n_deliveries: int) -> dict[str, Any]:
    """Bulk rows in a few big transactions; returns ids the requests below look up."""
    now = datetime.now(UTC)
    start = now - timedelta(days=7)
    base_ms = int(start.timestamp() * 1000)
    with store.engine.begin() as conn:
        for lo in range(0, n_users, 5000):
            rows = []
            for i in range(lo, min(lo + 5000, n_users)):
                u = user_json(i, base_ms + i)
                rows.append({"clerk_id": u["id"], "email": u["email_addresses"][0]["email_address"],
                             "email_addresses": [u["email_addresses"][0]["email_address"]],
                             "first_name": u["first_name"], "last_name": u["last_name"], "image_url": u["image_url"],
                             "public_metadata": u["public_metadata"], "private_metadata": u["private_metadata"],
                             "unsafe_metadata": {}, "role": "admin" if i == 0 else "user",
                             "clerk_created_at": base_ms + i, "clerk_updated_at": base_ms + i,
                             "created_at": start, "updated_at": start + timedelta(seconds=i)})
            conn.execute(users.insert(), rows)
        conn.execute(organizations.insert(), [
            {"clerk_id": clerk_id("org", j), "name": f"Org {j}", "slug": f"org-{j}", "public_metadata": {},
             "private_metadata": {}, "clerk_updated_at": base_ms, "created_at": start, "updated_at": start}
            for j in range(1000)])
        conn.execute(organization_memberships.insert(), [
            {"clerk_id": clerk_id("orgmem", k), "organization_clerk_id": clerk_id("org", k % 1000),
             "user_clerk_id": clerk_id("user", (k * 7) % n_users), "role": "org:member", "permissions": [],
             "clerk_updated_at": base_ms, "created_at": start, "updated_at": start} for k in range(20_000)])
    rng = random.Random(7)
    step = timedelta(days=7) / n_deliveries
    with store.engine.begin() as conn:
        for lo in range(0, n_deliveries, 5000):
            rows = []
            for k in range(lo, min(lo + 5000, n_deliveries)):
                received = start + step * k
                kind = TYPES[rng.randrange(len(TYPES))]
                data = user_json(rng.randrange(n_users), int(received.timestamp() * 1000) - 40)
                failed = rng.random() < 0.01
                rows.append({"svix_id": f"msg_bench_{k}", "type": kind, "instance_id": "ins_bench",
                             "event_timestamp": data["updated_at"], "received_at": received,
                             "payload": {"object": "event", "type": kind, "data": data,
                                         "timestamp": data["updated_at"], "instance_id": "ins_bench"},
                             "status": "failed" if failed else "applied", "attempts": 1,
                             "last_error": "database error: OperationalError: database is locked" if failed else None,
                             "applied_at": None if failed else received + timedelta(milliseconds=35)})
            conn.execute(webhook_events.insert(), rows)
        conn.execute(audit_log.insert(), [
            {"action": ("role.changed", "console.payload_revealed", "impersonation.granted")[a % 3],
             "actor_clerk_id": clerk_id("user", 0), "target_clerk_id": clerk_id("user", a), "details": {"n": a},
             "ip": "127.0.0.1", "created_at": start + timedelta(seconds=a * 60)} for a in range(10_000)])
        conn.execute(reconcile_runs.insert().values(
            status="completed", phase="done", cursor=0, details={}, started_at=now, heartbeat_at=now,
            finished_at=now, created=3, updated=5))
        middle = conn.execute(sa.select(webhook_events.c.id).where(webhook_events.c.svix_id == f"msg_bench_{n_deliveries // 2}")).scalar_one()
    return {"user": clerk_id("user", n_users // 2), "middle": middle, "now": now}


@contextmanager
def serving(app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def pages(ids: dict[str, Any]) -> list[tuple[str, str]]:
    hour_ago = (ids["now"] - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    user = ids["user"]
    return [
        ("overview", "/"),
        ("deliveries, newest", "/deliveries"),
        ("deliveries, page in the middle (keyset)", f"/deliveries?before={ids['middle']}"),
        ("deliveries, status=failed", "/deliveries?status=failed"),
        ("deliveries, type=session.created", "/deliveries?type=session.created"),
        ("deliveries, Clerk id", f"/deliveries?clerk_id={user}"),
        ("deliveries, last hour", f"/deliveries?since={hour_ago}"),
        ("delivery detail", f"/deliveries/{ids['middle']}"),
        ("users, newest", "/users"),
        ("users, email prefix", "/users?q=grace.knuth.5"),
        ("users, name prefix", "/users?q=Marg"),
        ("users, first + last name", "/users?q=ada+lovelace"),
        ("users, Clerk id", f"/users?q={user}"),
        ("user detail", f"/users/{user}"),
        ("drift", "/drift"),
        ("audit log", "/audit"),
        ("audit log, actor + action", f"/audit?actor={clerk_id('user', 0)}&action=role.changed"),
    ]


def measure(url: str, ids: dict[str, Any], n: int) -> list[tuple[str, float, float, float]]:
    results = []
    with httpx.Client(base_url=f"{url}/console", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        for name, path in pages(ids):
            for _ in range(3):
                response = client.get(path)
                response.raise_for_status()
            times = []
            for _ in range(n):
                started = time.perf_counter()
                client.get(path).raise_for_status()
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            results.append((name, statistics.median(times), times[int(len(times) * 0.95) - 1], times[-1]))
    return results


@contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'console_bench.db'}"
        return
    schema = f"bench_console_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def run(kind: str, args: argparse.Namespace, workdir: Path) -> tuple[list[tuple[str, float, float, float]], float]:
    with database(kind, workdir) as url:
        engine = create_engine(url)
        migrations.upgrade(engine)
        store = Store(engine)
        started = time.perf_counter()
        ids = seed(store, args.users, args.deliveries)
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        seeded = time.perf_counter() - started
        settings = Settings.from_env({"DATABASE_URL": url, "CLERK_SYNC_CONSOLE_TOKEN": TOKEN})
        app = Starlette(routes=[Mount("/console", app=create_console(store, settings))])
        with serving(app) as base:
            results = measure(base, ids, args.requests)
        store.dispose()
    return results, seeded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--deliveries", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--databases", default="sqlite,postgres")
    ap.add_argument("--no-write", action="store_true", help="don't touch BENCHMARKS.md")
    args = ap.parse_args()
    tables = []
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.databases.split(","):
            results, seeded = run(kind, args, Path(tmp))
            rows = "\n".join(f"| {name} | {med:.1f} | {p95:.1f} | {top:.1f} |" for name, med, p95, top in results)
            worst = max([worst, *(p95 for _, _, p95, _ in results)])
            tables.append(f"**{kind}** (seeded in {seeded:.0f} s)\n\n| page | median ms | p95 ms | max ms |\n"
                          f"|---|---:|---:|---:|\n{rows}\n")
            print(tables[-1], flush=True)
    verdict = "met" if worst < TARGET_MS else "MISSED"
    block = (
        f"{BEGIN}\n_{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; {args.users:,} users, {args.deliveries:,} deliveries "
        f"(1 % failed), 20,000 memberships, 10,000 audit rows; {args.requests} sequential requests per page after "
        f"3 warm-ups, one keep-alive connection, client and server in one process._\n\n"
        f"Command: `.venv/bin/python bench/console.py`\n\n" + "\n".join(tables) +
        f"\nTarget: every page under {TARGET_MS:.0f} ms: **{verdict}** (worst p95 {worst:.1f} ms).\n{END}"
    )
    if not args.no_write:
        print(f"wrote {write_section(SECTION, BEGIN, END, block)}")
    sys.exit(0 if worst < TARGET_MS else 1)


if __name__ == "__main__":
    main()
