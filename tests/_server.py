"""Run an ASGI app on a free loopback port in a background thread (real HTTP), and pick free ports."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
import sqlalchemy as sa

from clerk_sync.store import create_engine
from clerk_sync.testing import serve_app


def free_port() -> int:
    """A free loopback port for a server a test starts later, taken below the kernel's ephemeral range.

    A port the kernel hands out (a bind to port 0, the local end of an outgoing connection) could
    otherwise be the very one released here before its server binds it ("Address already in use",
    seen once in CI when an emulator started in between)."""
    low = _ephemeral_low()
    # Under pytest-xdist each worker draws from its own slice: two workers' ports, remembered in _given per
    # process, could otherwise be the same one, each released here before its own server binds it.
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) % workers if worker[2:].isdigit() else 0
    span = (low - max(1024, low - 12_000)) // workers
    first = max(1024, low - 12_000) + index * span
    for _ in range(500):
        port = random.randrange(first, first + span)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free loopback port found below {low}")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_given: set[int] = set()  # handed out by this process: two servers of one test never share a port


def wait_for_http(url: str, *, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> httpx.Response:
    """Poll ``url`` until it answers (any status); fail early if ``proc`` exits. Returns the first answer."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
            try:
                return client.get(url)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not answer within {timeout}s") from None
                time.sleep(0.05)


@contextmanager
def running(app: Any, port: int | None = None, *, lifespan: Literal["auto", "on", "off"] = "off") -> Iterator[str]:
    """Yield the base URL while the ASGI app is served; stop it afterwards (``lifespan="on"``: run start-up tasks).

    The public :func:`clerk_sync.testing.serve_app`, with lifespan off by default (most test apps have none)."""
    with serve_app(app, port=port or 0, interface="asgi", lifespan=lifespan) as url:
        yield url


def unreachable_engine(db_url: str, tmp_path: Path) -> sa.Engine:
    """An engine of the same database kind that reaches no database: nothing listens on its port (a SQLite file
    whose directory was removed after the engine was made cannot be opened; create_engine refuses a missing one)."""
    url = sa.engine.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        gone = tmp_path / f"gone-{uuid.uuid4().hex[:8]}"
        gone.mkdir()
        engine = create_engine(f"sqlite:///{gone / 'clerk_sync.db'}")
        gone.rmdir()
        return engine
    url = url.set(host="127.0.0.1", port=free_port())
    if url.get_backend_name() == "postgresql":
        url = url.update_query_dict({"connect_timeout": "2"})
    return create_engine(url.render_as_string(hide_password=False))
