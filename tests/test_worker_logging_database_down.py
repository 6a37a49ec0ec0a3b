"""SRE walkthrough: ``clerk-sync worker`` never set up logging. With ``CLERK_SYNC_LOG_LEVEL=ERROR`` and the
database down it still printed ``[warning ] hook dispatch: database unavailable`` once a second, in
structlog's default console format on stdout; ``serve`` logs at the level it is given, logfmt (JSON with
``--json-logs``) on stderr. The worker now logs as ``serve`` does."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests._server import free_port
from tests.test_cli import CLI

_LINE = "hook dispatch: database unavailable"


def _env(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    (tmp_path / "worker_hooks.py").write_text(
        "from clerk_sync.changes import Hook\nHOOKS = [Hook('noop', lambda change: None)]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    path = [p for p in (env.get("PYTHONPATH"), str(tmp_path)) if p]
    env.update({"DATABASE_URL": database_url, "PYTHONPATH": os.pathsep.join(path), **extra})
    return env


@contextmanager
def _worker(env: dict[str, str], *args: str) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str]]]:
    """The worker in a subprocess, its stderr lines handed to the queue as they come; terminated on exit."""
    proc = subprocess.Popen([*CLI, "worker", "--hooks", "worker_hooks:HOOKS", "--poll", "0.05", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    stderr = proc.stderr

    def read() -> None:
        for line in stderr:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield proc, lines
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=10)


def _first(lines: queue.Queue[str], text: str, proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            assert proc.poll() is None, f"worker exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"no {text!r} line on stderr"
            continue
        if text in line:
            return line


def _stdout(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.read()


def test_worker_logs_the_unreachable_database_on_stderr_in_serves_format(tmp_path: Path) -> None:
    env = _env(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")  # nothing listens there
    with _worker(env) as (proc, lines):
        line = _first(lines, _LINE, proc)
    assert line.startswith("timestamp="), line  # logfmt, as serve's lines outside a terminal
    assert f'level=warning event="{_LINE}"' in line, line
    assert "Connection refused" in line, line
    assert _stdout(proc) == ""


def test_worker_json_logs_as_serve(tmp_path: Path) -> None:
    env = _env(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    with _worker(env, "--json-logs") as (proc, lines):
        line = _first(lines, _LINE, proc)
    parsed = json.loads(line)
    assert (parsed["event"], parsed["level"]) == (_LINE, "warning"), parsed
    assert _stdout(proc) == ""


@contextmanager
def _refusing_database() -> Iterator[tuple[int, list[int]]]:
    """A loopback port whose every connection is accepted and closed at once (the database down, each
    attempt counted: the test knows the worker tried, rather than waiting some time for it)."""
    accepted: list[int] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        done = threading.Event()

        def serve() -> None:
            while not done.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conn.close()
                accepted.append(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield server.getsockname()[1], accepted
        finally:
            done.set()
            thread.join(timeout=10)


def test_worker_at_level_error_says_nothing_of_a_database_it_keeps_retrying(tmp_path: Path) -> None:
    with _refusing_database() as (port, accepted):
        env = _env(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{port}/x", CLERK_SYNC_LOG_LEVEL="ERROR")
        with _worker(env) as (proc, lines):
            deadline = time.monotonic() + 60
            while len(accepted) < 4:  # several turns of the loop, each one's failure a warning before
                assert proc.poll() is None, f"worker exited with {proc.returncode}"
                assert time.monotonic() < deadline, "the worker never tried the database"
                time.sleep(0.05)
    assert _stdout(proc) == ""
    said = list(lines.queue)
    assert not [line for line in said if "warning" in line or _LINE in line], said
