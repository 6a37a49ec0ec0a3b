"""Shared by the benchmarks: ports, process control, waiting for a quiet machine, and the BENCHMARKS.md writer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_section(section: str, begin: str, end: str, block: str) -> Path:
    """Swap the text between ``begin`` and ``end`` for ``block`` (which carries both markers).

    Re-reads the file right before writing: other benchmarks own other sections.
    """
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    elif section in text:
        pre, post = text.split(section, 1)
        text = pre + section + "\n\n" + block + "\n" + post
    else:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    path.write_text(text)
    return path


def free_port() -> int:
    """A free loopback port (for servers started as separate processes, which bind it themselves)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(port: int, proc: subprocess.Popen[bytes], timeout: float = 90.0, path: str = "/healthz") -> None:
    """Wait until the server started as ``proc`` answers 200 on ``path``; fail if it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not become healthy")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started with ``start_new_session=True`` (its process group: uvicorn workers too)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the rest of the group too (a `clerk-sync worker` beside `serve`); bounded: a zombie nobody reaps
    # stays in the group
    for patience in (15.0, 5.0):
        deadline = time.monotonic() + patience
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _group_alive(proc.pid):
            return
        os.killpg(proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def machine_busy(seconds: float = 0.5) -> float:
    """Share of the machine's CPU time that was busy over ``seconds`` (from /proc/stat)."""

    def read() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    a = read()
    time.sleep(seconds)
    d = [y - x for x, y in zip(a, read(), strict=True)]
    return 1 - (d[3] + d[4]) / max(1, sum(d))


def wait_quiet(threshold: float = 0.3, max_wait: float = 10.0) -> tuple[float, float]:
    """Other sessions share this 2-core box: start a cell once it is mostly idle (bounded wait).

    Returns (the last busy share measured, seconds waited).
    """
    started = time.time()
    busy = machine_busy()
    while time.time() - started < max_wait and busy > threshold:
        busy = machine_busy()
    return busy, time.time() - started
