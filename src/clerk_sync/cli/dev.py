"""``clerk-sync dev``: the whole system on one machine, zero config.

A local Clerk (the emulator) and the sync service on a SQLite file, wired by a generated webhook
secret; demo users/orgs/memberships are created through the emulator's Backend API (so they arrive
as real signed webhooks), then we wait until the database equals the emulator's state.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import uvicorn
from filelock import FileLock, Timeout
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from clerk_sync import migrations
from clerk_sync.cli._args import bind_error
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.store import Store
from clerk_sync.tables import organization_memberships, organizations, users, webhook_events
from clerk_sync.testing import EmulatorServer

__all__ = ["DevReport", "DevStack", "run_dev", "seed_demo"]

_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Frances", "John",
          "Radia", "Tim", "Hedy", "Linus", "Sophie", "Guido"]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Thompson", "Allen",
         "McCarthy", "Perlman", "Berners-Lee", "Lamarr", "Torvalds", "Wilson", "van Rossum"]
_ORGS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli"]


# SQLite's application_id (header offset 68) of the databases this demo creates ("ClSd"): a file without
# it is someone's data, which `--db` must not delete. Set once, at creation; reading it opens nothing.
_DEMO_APPLICATION_ID = 0x436C5364


def _is_demo_database(path: Path) -> bool:
    with path.open("rb") as file:
        header = file.read(72)
    if not header.startswith(b"SQLite format 3\x00"):
        return False
    # The demo's default file from before the mark (releases up to 0.2) is the demo's too: the README's
    # main command keeps working in a checkout that ran it before.
    mark = int.from_bytes(header[68:72], "big")
    return mark == _DEMO_APPLICATION_ID or (mark == 0 and path.name == "clerk_sync_dev.db")


def _only_demo_on(path: Path) -> FileLock:
    """Hold ``<db>.lock`` while the demo runs (the OS drops it when the process dies, kill -9 included): a
    second ``clerk-sync dev`` on the same ``--db`` deleted the running demo's database under it."""
    lock = FileLock(f"{path}.lock", timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"another `clerk-sync dev` is running on {path}: stop it (Ctrl-C), or pass another "
                          "--db") from None
    except OSError as exc:
        raise ConfigError(f"cannot create the demo database {path} ({exc}): pass a --db in a writable "
                          "directory that exists") from None
    return lock


def _fresh_database(path: Path, *, force: bool) -> None:
    """Delete an earlier demo's database (and its -wal/-shm) and create an empty one marked as the demo's.
    Any other existing file is refused unless ``force``: ``--db clerk_sync.db`` would wipe the service's."""
    if path.exists() and not force and not _is_demo_database(path):
        raise ConfigError(f"--db {path} exists and is not a database `clerk-sync dev` created: it would be "
                          "deleted and recreated. Pass another --db (the default is clerk_sync_dev.db), or "
                          "--force to delete it")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute(f"PRAGMA application_id = {_DEMO_APPLICATION_ID}")
            conn.commit()
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot create the demo database {path} ({exc}): pass a --db in a writable "
                          "directory that exists") from None


def _bound(port: int) -> socket.socket:
    """The service's socket, bound now and kept: a port picked and released here could be taken (by the
    emulator binding port 0, say) before the service bound it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise bind_error(exc, f"the sync service cannot listen on 127.0.0.1:{port}") from None
    return sock


@dataclass
class DevReport:
    """What the demo produced, for printing and for tests."""

    db_rows: dict[str, int]
    clerk_counts: dict[str, int]
    events_by_status: dict[str, int]
    seconds: float
    converged: bool
    service_url: str
    emulator_url: str
    notes: list[str] = field(default_factory=list)
    console_url: str | None = None


@contextmanager
def _serve(app: Any, sock: socket.socket) -> Iterator[str]:
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="clerk-sync-service", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ConfigError(f"the sync service could not start on 127.0.0.1:{port}: see the lines above")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class DevStack:
    """Emulator + sync service, started together and stopped together."""

    def __init__(self, db_path: Path, *, port: int = 0, fresh: bool = True, faults: bool = True,
                 force: bool = False) -> None:
        """``fresh``: recreate ``db_path``, which must be an earlier demo's database unless ``force``."""
        self._socket = _bound(port)  # first: a port in use leaves the last demo's database as it was
        try:
            self._lock = _only_demo_on(db_path)  # then: a demo running on it keeps its database
            try:
                self._set_up(db_path, fresh=fresh, faults=faults, force=force)
            except BaseException:
                self._lock.release()
                raise
        except BaseException:
            self._socket.close()
            raise

    def _set_up(self, db_path: Path, *, fresh: bool, faults: bool, force: bool) -> None:
        if fresh:
            _fresh_database(db_path, force=force)
        self.port = int(self._socket.getsockname()[1])
        self.emulator = EmulatorServer(webhook_url=f"http://127.0.0.1:{self.port}/webhooks/clerk",
                                       time_scale=100.0, seed=7,
                                       # Show at-least-once delivery: some duplicates and reorderings.
                                       duplicate_rate=0.2 if faults else 0.0, reorder_rate=0.2 if faults else 0.0)
        self.settings = Settings.from_env({
            "DATABASE_URL": f"sqlite:///{db_path}",
            "CLERK_WEBHOOK_SIGNING_SECRET": self.emulator.webhook_secret,
            "CLERK_INSTANCE_ID": self.emulator.config.instance_id,
            # The emulator is Clerk for the console too: drift, promotion, and admin sign-in.
            "CLERK_SECRET_KEY": self.emulator.secret_key,
            "CLERK_API_URL": self.emulator.url,
            "CLERK_SYNC_CONSOLE": "1",
            "CLERK_SYNC_CONSOLE_TOKEN": secrets.token_urlsafe(24),
        })
        self.processor = build_processor(self.settings)
        self.store: Store = self.processor.store

    @contextmanager
    def running(self) -> Iterator[DevStack]:
        with self._socket:  # closed however this ends
            migrations.upgrade(self.store.engine)
            with _serve(create_app(self.settings, self.processor), self._socket) as url, self.emulator:
                self.service_url = url
                try:
                    yield self
                finally:
                    self.store.dispose()
                    self._lock.release()

    def console_link(self, *, expires_in_s: int = 3600) -> str | None:
        """A sign-in link to the console for the demo admin: a session token minted by the emulator
        (the console verifies it like any Clerk session, then confirms the role in the database)."""
        with self.store.connect() as conn:
            live_admins = sa.select(users.c.clerk_id).where(users.c.role == "admin", users.c.deleted_at.is_(None))
            admin = conn.execute(live_admins.order_by(users.c.id).limit(1)).scalar()
        if admin is None:
            return None
        token = self.emulator.mint_session_token(admin, expires_in_seconds=expires_in_s)
        return f"{self.service_url}/console/login/clerk?token={token}"

    def clerk(self) -> httpx.Client:
        return demo_client(self.emulator)

    def clerk_counts(self) -> dict[str, int]:
        with self.clerk() as c:
            n_users = c.get("/users/count").json()["total_count"]
            orgs = _all_pages(c, "/organizations")
            n_members = sum(len(_all_pages(c, f"/organizations/{o['id']}/memberships")) for o in orgs)
        return {"users": n_users, "organizations": len(orgs), "organization_memberships": n_members}

    def db_rows(self) -> dict[str, int]:
        with self.store.connect() as conn:
            live = {t: sa.select(sa.func.count()).select_from(t).where(t.c.deleted_at.is_(None))
                    for t in (users, organizations, organization_memberships)}
            return {t.name: conn.execute(query).scalar_one() for t, query in live.items()}

    def events_by_status(self) -> dict[str, int]:
        with self.store.connect() as conn:
            rows = conn.execute(sa.select(webhook_events.c.status, sa.func.count()).group_by(webhook_events.c.status))
            return {status: n for status, n in rows}

    def duplicates_acknowledged(self) -> int:
        """Re-deliveries (injected by the emulator) answered 200 without touching the database."""
        return int(sum(sample.value for metric in self.processor.metrics.events.collect() for sample in metric.samples
                       if sample.name.endswith("_total") and sample.labels.get("status") == "duplicate"))

    def wait_converged(self, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        self.emulator.wait_for_deliveries(timeout=timeout_s)
        target = self.clerk_counts()
        while time.monotonic() < deadline:
            if self.db_rows() == target:
                return True
            time.sleep(0.1)
        return False


def seed_demo(clerk: httpx.Client, n_users: int, n_orgs: int, progress: Progress | None = None) -> None:
    """Create users, orgs and memberships through the Backend API, then rename one user and delete one."""
    steps = n_users + n_orgs * 2 + 2
    task = progress.add_task("seeding Clerk", total=steps) if progress else None

    def advance() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    user_ids = []
    for i in range(n_users):
        first, last = _FIRST[i % len(_FIRST)], _LAST[i % len(_LAST)]
        body = {"email_address": [f"{first.lower()}.{i}@example.com"], "first_name": first, "last_name": last,
                "public_metadata": {"role": "admin" if i == 0 else "user"}}
        user_ids.append(_ok(clerk.post("/users", json=body))["id"])
        advance()
    for j in range(n_orgs):
        body = {"name": _ORGS[j % len(_ORGS)], "created_by": user_ids[j % n_users]}
        org = _ok(clerk.post("/organizations", json=body))
        advance()
        for k in range(2):
            member = user_ids[(j * 3 + k + 1) % n_users]
            if member != user_ids[j % n_users]:
                membership = {"user_id": member, "role": "org:member"}
                _ok(clerk.post(f"/organizations/{org['id']}/memberships", json=membership))
        advance()
    _ok(clerk.patch(f"/users/{user_ids[1]}", json={"first_name": "Renamed"}))
    advance()
    _ok(clerk.delete(f"/users/{user_ids[-1]}"))
    advance()


def demo_client(emulator: EmulatorServer) -> httpx.Client:
    """The demo's own Backend API client (seeding, counts): it waits out a 429 as Clerk asks, so
    ``--users 200`` takes longer rather than crashing on the emulator's 100 requests per 10 s."""
    return httpx.Client(base_url=f"{emulator.url}/v1", timeout=30, transport=_PatientTransport(),
                        headers={"Authorization": f"Bearer {emulator.secret_key}"})


class _PatientTransport(httpx.HTTPTransport):
    """Resends a request answered 429 after its ``Retry-After`` (at most 10 s a wait, 30 tries). By hand: the
    demo's seeding is a handful of plain calls, not worth the rate-limited client's budget machinery."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(30):
            response = super().handle_request(request)
            if response.status_code != 429:
                return response
            response.read()
            response.close()
            try:
                wait = float(response.headers.get("Retry-After", "1"))
            except ValueError:
                wait = 1.0
            time.sleep(min(max(wait, 0.05), 10.0) if math.isfinite(wait) else 1.0)
        return super().handle_request(request)


def _all_pages(clerk: httpx.Client, path: str, limit: int = 100) -> list[dict[str, Any]]:
    """Every item of a ``{data, total_count}`` list, page by page."""
    items: list[dict[str, Any]] = []
    while True:
        page = _ok(clerk.get(path, params={"limit": limit, "offset": len(items)}))
        items.extend(page["data"])
        if not page["data"] or len(items) >= page["total_count"]:
            return items


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise RuntimeError(f"emulator answered {response.status_code}: {response.text[:300]}")
    return response.json()


def run_dev(db_path: Path, *, port: int = 0, users_n: int = 12, orgs_n: int = 3, console: Console,
            keep_running: bool = True, force: bool = False) -> DevReport:
    """Start everything, seed, wait for convergence, print the report; then serve until Ctrl-C."""
    started = time.monotonic()
    stack = DevStack(db_path, port=port, force=force)
    with stack.running():
        console.print(f"Clerk emulator  {stack.emulator.url}/v1   (secret key {stack.emulator.secret_key})")
        console.print(f"sync service    {stack.service_url}/webhooks/clerk   (SQLite {db_path})", soft_wrap=True)
        with Progress(console=console, transient=True) as progress, stack.clerk() as clerk:
            seed_demo(clerk, users_n, orgs_n, progress)
        converged = stack.wait_converged()
        report = DevReport(stack.db_rows(), stack.clerk_counts(), stack.events_by_status(),
                           time.monotonic() - started, converged, stack.service_url, stack.emulator.url,
                           console_url=stack.console_link())
        _print_report(console, report, stack, running=keep_running)
        if keep_running:
            console.print("Running; press Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return report


def _print_report(console: Console, report: DevReport, stack: DevStack, *, running: bool = True) -> None:
    """The convergence table and verdict; with ``running`` (not ``--once``) the console link and commands to try
    against the services, which ``--once`` stops right after this (only the database file stays)."""
    table = Table(title="clerk-sync dev: Clerk (emulator) vs your database")
    table.add_column("table")
    table.add_column("in Clerk", justify="right")
    table.add_column("in DB (live rows)", justify="right")
    for name, n in report.db_rows.items():
        table.add_row(name, str(report.clerk_counts.get(name, "?")), str(n))
    console.print(table)
    console.print(f"webhook deliveries by status: {report.events_by_status}; "
                  f"duplicate re-deliveries acknowledged without a write: {stack.duplicates_acknowledged()}")
    verdict = "[green]converged[/]" if report.converged else "[red]NOT converged[/]"
    console.print(f"{verdict} in {report.seconds:.1f} s")
    if report.console_url and running:
        console.print(f"[bold]console[/]  {report.console_url}", soft_wrap=True)  # one line: keep it clickable
        console.print("         (signed in as the demo admin; the link holds a session token valid for 1 hour)")
    console.print("Try:" if running else "Try (the services have stopped: run without --once to keep them up):")
    key = stack.emulator.secret_key  # one line each, not wrapped at the terminal's width, URLs quoted: copy-pasteable
    served = (f"curl -s '{report.service_url}/metrics' | grep clerk_sync_webhook_events",
              f"curl -s -H 'Authorization: Bearer {key}' '{report.emulator_url}/v1/users?limit=3'")
    stored = f"sqlite3 {stack.settings.sqlite_path()} 'select clerk_id, email, role from users'"  # noqa: S608
    for command in (*(served if running else ()), stored):
        console.print(f"  {command}", soft_wrap=True, markup=False, highlight=False)
