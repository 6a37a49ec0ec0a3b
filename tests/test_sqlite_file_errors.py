"""SQLite walkthrough, findings 4, 5 and 8: the SQLite file itself failing.

- A corrupt file ("database disk image is malformed", "file is not a database") was reported by the CLI as a
  setting ("Check DATABASE_URL", exit 2) and by the webhook path as an outage, while ``doctor`` said "ok
  database" (its reads touched no broken page). Now every face says the file is corrupt and how to restore it,
  a delivery is retried (503) rather than stored failed, and ``doctor`` runs ``PRAGMA quick_check``.
- Disk full and a read-only file said "Check DATABASE_URL" and ``doctor`` was green: now "free space" / "make
  the file and its directory writable", and ``doctor`` writes (rolled back) and reads the free space.
- The -wal file kept its 1.3 GB high-water mark: every connection sets ``journal_size_limit``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
from starlette.applications import Starlette

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET
from tests.test_cli_exit_codes import run, said

LIMIT = 64 * 1024 * 1024
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _migrated(path: Path) -> str:
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    return url


def _corrupt(path: Path, *tables: str) -> None:
    """Overwrite the root pages of ``tables``: the schema and the version table still read fine."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        roots = [conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (t,)).fetchone()[0]
                 for t in tables]
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    with path.open("r+b") as file:
        for root in roots:
            file.seek(size * (root - 1))
            file.write(b"\xff" * size)


@pytest.fixture
def corrupt_url(tmp_path: Path) -> str:
    url = _migrated(tmp_path / "corrupt.db")
    _corrupt(tmp_path / "corrupt.db", "webhook_events", "users")
    return url


@pytest.fixture
def read_only_url(tmp_path: Path) -> Iterator[str]:
    """The file opened read-only (``mode=ro``), another process's connection holding its -wal and -shm, as on
    a read-only mount under running replicas (SQLite: "attempt to write a readonly database")."""
    path = tmp_path / "ro.db"
    _migrated(path)
    holder = sqlite3.connect(path)
    holder.execute("SELECT count(*) FROM users").fetchall()
    try:
        yield f"sqlite:///file:{path}?mode=ro&uri=true"
    finally:
        holder.close()


@pytest.fixture
def full_url(tmp_path: Path) -> Iterator[str]:
    """A migrated file on a 2 MiB tmpfs filled to the last byte, another process's connection holding its -shm
    (as serve does: without one, growing the -shm fails first, "disk I/O error") (root only: mount)."""
    if not ROOT:
        pytest.skip("mounts a tmpfs: root only")
    mount = tmp_path / "full"
    mount.mkdir()
    try:  # (root in a container lacks CAP_SYS_ADMIN: "permission denied")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                 capture_output=True, text=True, check=False)
    except OSError as exc:  # no mount(8)
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if mounted.returncode != 0:
        error = (mounted.stderr or mounted.stdout or "?").strip().splitlines()[0]
        pytest.skip(f"cannot mount a tmpfs (needs CAP_SYS_ADMIN): {error}")
    try:
        url = _migrated(mount / "full.db")
        with contextlib.closing(sqlite3.connect(mount / "full.db")) as holder:
            holder.execute("SELECT count(*) FROM users").fetchall()
            with contextlib.suppress(OSError), (mount / "filler").open("wb") as filler:
                while True:
                    filler.write(b"\0" * 4096)
                    filler.flush()
            yield url
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _webhook(url: str) -> tuple[httpx.Response, list[dict[str, Any]]]:
    from clerk_sync.ingest import WebhookProcessor
    from clerk_sync.integrations.starlette import webhook_routes
    from clerk_sync.webhooks import WebhookVerifier

    store = Store.from_url(url)
    processor = WebhookProcessor(store, WebhookVerifier([SECRET]))
    headers, body = f.signed(f.envelope("user.created", f.user("user_file", 1_700_000_000_000)), "msg_file")
    try:
        with running(Starlette(routes=webhook_routes(processor))) as base, httpx.Client(base_url=base) as client, \
                structlog.testing.capture_logs() as logs:
            answer = client.post("/webhooks/clerk", content=body, headers=headers)
    finally:
        store.dispose()
    return answer, logs


def _reason(logs: list[dict[str, Any]]) -> str:
    return " ".join(str(e.get("reason")) for e in logs if e["event"] == "webhook_store_error")


def _checks(url: str) -> dict[str, Any]:
    from clerk_sync.cli.doctor import run_checks

    settings = Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    with httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(500))) as client:
        return {c.name: c for c in run_checks(settings, http=client)}


# --- corrupt -------------------------------------------------------------------------------------------------

def test_a_corrupt_file_is_said_on_the_webhook_path_and_retried(corrupt_url: str) -> None:
    answer, logs = _webhook(corrupt_url)
    assert answer.status_code == 503, answer.text
    reason = _reason(logs)
    assert "database disk image is malformed" in reason and "the SQLite file is corrupt" in reason, logs
    assert ".backup" in reason and "PRAGMA integrity_check" in reason, reason


def test_a_corrupt_file_exits_2_saying_restore_not_database_url(corrupt_url: str) -> None:
    result = run("prune", env={"DATABASE_URL": corrupt_url})
    assert result.returncode == 2, said(result)
    assert "the SQLite file is corrupt" in said(result) and "restore the last good backup" in said(result)
    assert "Check DATABASE_URL" not in said(result) and "Traceback" not in said(result), said(result)


def test_a_file_that_is_not_a_database_exits_2_saying_so(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(bytes(range(256)) * 400)
    result = run("hooks", "list", env={"DATABASE_URL": f"sqlite:///{garbage}"})
    assert result.returncode == 2, said(result)
    assert "is not a SQLite database, or its header is corrupt" in said(result), said(result)
    database = _checks(f"sqlite:///{garbage}")["database"]
    assert database.status == "fail" and "its header is corrupt" in database.detail, database
    assert not database.detail.endswith("check DATABASE_URL"), database


def test_doctor_finds_corrupt_pages_its_reads_do_not_touch(corrupt_url: str) -> None:
    checks = _checks(corrupt_url)
    assert checks["database"].status == "ok", checks["database"]  # the version table reads fine
    assert checks["sqlite file"].status == "fail", checks
    assert "the SQLite file is corrupt" in checks["sqlite file"].detail, checks["sqlite file"]


def test_a_corrupt_page_is_the_databases_state_not_the_rows_refusal(corrupt_url: str) -> None:
    from clerk_sync._db_errors import passing_cause

    engine = sa.create_engine(corrupt_url)
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(sa.text("SELECT * FROM webhook_events"))
    finally:
        engine.dispose()
    assert passing_cause(raised.value) is raised.value


# --- read-only -----------------------------------------------------------------------------------------------

def test_a_read_only_file_is_said_on_the_webhook_path(read_only_url: str) -> None:
    answer, logs = _webhook(read_only_url)
    assert answer.status_code == 503, answer.text
    reason = _reason(logs)
    assert "attempt to write a readonly database" in reason and "writable by the user" in reason, logs
    assert "-wal and -shm" in reason, reason


def test_a_read_only_file_exits_2_saying_make_it_writable(read_only_url: str) -> None:
    result = run("users", "erase", "user_gone", "--force", env={"DATABASE_URL": read_only_url})
    assert result.returncode == 2, said(result)
    assert "cannot be written by this process" in said(result) and "directory writable" in said(result)
    assert "Check DATABASE_URL" not in said(result), said(result)


def test_doctor_writes_to_find_a_read_only_file(read_only_url: str) -> None:
    checks = _checks(read_only_url)
    assert checks["database"].status == "ok", checks["database"]
    assert checks["sqlite file"].status == "fail", checks
    assert "writable by the user" in checks["sqlite file"].detail, checks["sqlite file"]


def test_doctor_on_a_healthy_file(sqlite_url: str) -> None:
    line = _checks(sqlite_url)["sqlite file"]
    assert line.status == "ok" and "quick_check ok" in line.detail and "writable" in line.detail, line
    assert "free on" in line.detail and "-wal" in line.detail, line


def test_doctor_probes_the_write_on_a_file_not_migrated_yet(tmp_path: Path) -> None:
    """Review 2, finding 3: the probe updated clerk-sync's version table, missing there: 'sqlite file | fail |
    no such table ...; check the file' beside the database line's 'run clerk-sync migrate'."""
    path = tmp_path / "fresh.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 7")  # (the host app's own: the probe writes it back unchanged)
        conn.execute("CREATE TABLE app_things (id INTEGER PRIMARY KEY)")
        conn.commit()
    checks = _checks(f"sqlite:///{path}")
    assert checks["database"].status == "fail" and "clerk-sync migrate" in checks["database"].detail, checks
    line = checks["sqlite file"]
    assert line.status == "ok" and "writable" in line.detail and "quick_check ok" in line.detail, line
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 7
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["app_things"]
    # A file that does not exist is said so, and not created (SQLite would make an empty one on connect, and
    # "run `clerk-sync migrate`" then built a second database at a mistyped path): no file line to probe.
    missing = _checks(f"sqlite:///{tmp_path / 'new.db'}")
    assert "does not exist (nothing was created)" in missing["database"].detail, missing
    assert "sqlite file" not in missing and not (tmp_path / "new.db").exists()


@pytest.mark.parametrize(("version", "threshold", "runs"), [
    ((3, 40, 1), 0, False),  # cannot be interrupted, the file over the size: skipped, saying the command
    ((3, 40, 1), None, True),  # cannot be interrupted, a small file: runs
    ((3, 43, 0), 0, True),  # interrupted at QUICK_CHECK_S whatever the size: runs
])
def test_doctor_runs_quick_check_only_when_it_can_be_bounded(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch, version: tuple[int, int, int], threshold: int | None,
        runs: bool) -> None:
    """Review 2, finding 2: before SQLite 3.43 the progress handler is not called during quick_check's B-tree
    walk, so the 10 s bound did not hold: on a multi-GB file doctor read for minutes."""
    from clerk_sync.cli import doctor

    monkeypatch.setattr(sqlite3, "sqlite_version_info", version)
    if threshold is not None:
        monkeypatch.setattr(doctor, "QUICK_CHECK_UNBOUNDED_BYTES", threshold)
    line = _checks(sqlite_url)["sqlite file"]
    assert line.status == "ok" and "writable" in line.detail, line
    if runs:
        assert "quick_check ok" in line.detail and "skipped" not in line.detail, line
    else:
        file = sqlite_url.removeprefix("sqlite:///")
        assert "quick_check ok" not in line.detail and "quick_check skipped" in line.detail, line
        assert f"`sqlite3 {file} 'PRAGMA quick_check'`" in line.detail, line


# --- disk full -----------------------------------------------------------------------------------------------

def test_a_full_disk_is_said_on_the_webhook_path(full_url: str) -> None:
    answer, logs = _webhook(full_url)
    assert answer.status_code == 503, answer.text
    reason = _reason(logs)
    assert "database or disk is full" in reason and "free space there" in reason, logs


def test_a_full_disk_exits_3_saying_free_space(full_url: str) -> None:
    result = run("users", "erase", "user_gone", "--force", env={"DATABASE_URL": full_url})
    assert result.returncode == 3, said(result)
    assert "free space there and retry later" in said(result), said(result)
    assert "Check DATABASE_URL" not in said(result), said(result)
    line = _checks(full_url)["sqlite file"]
    assert line.status == "warn" and "low on disk space" in line.detail, line


# --- the -wal file's size ------------------------------------------------------------------------------------

def test_every_connection_limits_the_wal(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    raws = [engine.raw_connection() for _ in range(3)]  # three at once: three connections of the pool
    try:
        assert [r.cursor().execute("PRAGMA journal_size_limit").fetchone()[0] for r in raws] == [LIMIT] * 3
    finally:
        for raw in raws:
            raw.close()
        engine.dispose()


def test_the_wal_shrinks_after_a_big_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a connection held open (serve, the worker, the app) the -wal file kept its high-water mark."""
    from clerk_sync import store as store_module

    monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT", 256 * 1024, raising=False)  # (64 MiB: a slow test)
    path = tmp_path / "wal.db"
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE big (v BLOB)"))
            conn.execute(sa.text("INSERT INTO big SELECT randomblob(4096) FROM "
                                 "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500) "
                                 "SELECT i FROM n)"))
        high = Path(f"{path}-wal").stat().st_size
        assert high > 4 * 1024 * 1024
        for _ in range(3):  # the checkpoint after the big commit; the next writes restart the -wal from its start
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM big WHERE rowid = (SELECT min(rowid) FROM big)"))
        assert Path(f"{path}-wal").stat().st_size <= 512 * 1024, (high, Path(f"{path}-wal").stat().st_size)
    finally:
        engine.dispose()
