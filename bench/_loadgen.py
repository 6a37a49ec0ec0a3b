# ruff: noqa: S105
"""Closed-loop HTTP/1.1 load generator for bench/ingest.py (run as its own process).

N keep-alive connections, each sending pre-signed, pre-serialised POSTs one after another over raw
asyncio streams (no HTTP client library: the generator must stay cheap on a 2-core machine).
Prints one JSON object: completed requests in the measurement window, throughput, latency
percentiles, status counts.

    python bench/_loadgen.py --port 8000 --concurrency 16 --warmup 1.5 --duration 8 \
        --corpus /tmp/corpus.jsonl --label pg-c16-service
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from typing import Any

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _signer(secret: str) -> Any:
    key = base64.b64decode(secret.removeprefix("whsec_"))

    def sign(msg_id: str, ts: int, body: bytes) -> str:
        mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        return "v1," + base64.b64encode(mac).decode()

    return sign


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot(server_pid: int | None) -> dict[str, float]:
    """CPU seconds so far: server process tree, all postgres processes, the MariaDB/MySQL server
    (one process, its threads included), this process, whole machine."""
    procs: dict[int, tuple[int, str, float]] = {}  # pid -> (ppid, comm, cpu s)
    children: list[tuple[str, float]] = []  # (comm, CPU s of reaped children)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        procs[int(d)] = (int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / _TICK)
        children.append((comm, (int(fields[13]) + int(fields[14])) / _TICK))
    tree: set[int] = set()
    if server_pid:
        tree.add(server_pid)
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _, _) in procs.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return {
        "server": sum(procs[p][2] for p in tree if p in procs),
        # live postgres processes + what the postmaster reaped (backends that exited in between)
        "postgres": sum(c for _, comm, c in procs.values() if comm.startswith("postgres"))
        + sum(reaped for comm, reaped in children if comm.startswith("postgres")),
        "mariadb": sum(c for _, comm, c in procs.values() if comm in ("mariadbd", "mysqld")),
        "loadgen": sum(os.times()[:2]),
        "machine_busy": (sum(cpu) - cpu[3] - cpu[4]) / _TICK,
        "machine_total": sum(cpu) / _TICK,
    }


async def run_window(clients: list[Any], server_pid: int | None, w_start: float, w_end: float) -> dict[str, float]:
    """Run the client coroutines while sampling the server's CPU at the window's start and end;
    returns the CPU used inside the window (shared by the ingest and auth load generators)."""
    snaps: list[dict[str, float]] = []

    async def sampler() -> None:
        for moment in (w_start, w_end):
            await asyncio.sleep(max(0.0, moment - time.perf_counter()))
            snaps.append(cpu_snapshot(server_pid))

    await asyncio.gather(sampler(), *clients)
    return {k: snaps[1][k] - snaps[0][k] for k in snaps[0]}


def build_requests(corpus: list[bytes], label: str, host: str, path: str) -> list[bytes]:
    """Sign every body with a unique svix-id (label + index) and serialise the whole request."""
    sign = _signer(SECRET)
    ts = int(time.time())
    out = []
    for i, body in enumerate(corpus):
        msg_id = f"msg_{label}_{i:06d}"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nsvix-id: {msg_id}\r\nsvix-timestamp: {ts}\r\n"
            f"svix-signature: {sign(msg_id, ts, body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    corpus = [line.rstrip(b"\n") for line in open(args.corpus, "rb") if line.strip()]  # noqa: SIM115
    requests = build_requests(corpus, args.label, f"{args.host}:{args.port}", args.path)
    n_req = len(requests)
    next_i = 0
    wrapped = False
    perf = time.perf_counter
    t0 = perf() + 0.2  # let every connection open first
    w_start, w_end = t0 + args.warmup, t0 + args.warmup + args.duration
    lat: list[float] = []  # seconds, requests completed inside the window
    statuses: dict[str, int] = {}
    errors: list[str] = []

    async def client() -> None:
        nonlocal next_i, wrapped
        reader, writer = await asyncio.open_connection(args.host, args.port)
        while perf() < t0:
            await asyncio.sleep(0.005)
        try:
            while True:
                start = perf()
                if start >= w_end:
                    return
                i = next_i
                next_i += 1
                if i >= n_req:
                    wrapped = True
                    if not args.wrap:
                        return
                    i %= n_req  # only for endpoints that ignore svix-id reuse (the HTTP floor)
                for attempt in (1, 2):
                    try:
                        writer.write(requests[i])
                        head = await reader.readuntil(b"\r\n\r\n")
                        status = head[9:12].decode()
                        clen, close = 0, False
                        for line in head.split(b"\r\n")[1:]:
                            name = line[:15].lower()
                            if name == b"content-length:":
                                clen = int(line[15:])
                            elif name.startswith(b"connection:") and b"close" in line.lower():
                                close = True
                        if clen:
                            await reader.readexactly(clen)
                        break
                    except (OSError, asyncio.IncompleteReadError) as exc:
                        # uvicorn drops a keep-alive connection after an unhandled exception (the
                        # seed handler's 500s): reconnect and resend once, then count an error.
                        errors.append(f"{type(exc).__name__}: {exc}")
                        status, close = "conn", False
                        writer.close()
                        reader, writer = await asyncio.open_connection(args.host, args.port)
                        if attempt == 2:
                            break
                end = perf()
                if w_start <= end < w_end:
                    lat.append(end - start)
                    statuses[status] = statuses.get(status, 0) + 1
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(args.host, args.port)
        finally:
            writer.close()

    cpu = await run_window([client() for _ in range(args.concurrency)], args.server_pid, w_start, w_end)
    lat.sort()
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))

    def pct(p: float) -> float | None:
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    return {
        "label": args.label,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "completed": len(lat),
        "ok": ok,
        "tps": ok / args.duration,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] * 1000 if lat else None,
        "statuses": statuses,
        "sent": min(next_i, n_req),
        "corpus_exhausted": wrapped,
        "client_errors": errors[:5],
        # CPU ms per completed request in the window (server tree, all postgres processes, mariadbd, load
        # generator) and the machine's busy share over the window (2 cores = 100 %).
        "cpu_ms_per_req": {k: 1000 * cpu[k] / max(1, len(lat))
                           for k in ("server", "postgres", "mariadb", "loadgen")},
        "machine_busy": cpu["machine_busy"] / cpu["machine_total"] if cpu["machine_total"] else None,
        # busy CPU not spent by the server tree, the databases or this generator (other users of the box)
        "foreign_cpu": (cpu["machine_busy"] - cpu["server"] - cpu["postgres"] - cpu["mariadb"] - cpu["loadgen"])
        / cpu["machine_total"] if cpu["machine_total"] else None,
        "client_error_count": len(errors),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/webhooks/clerk")
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--wrap", action="store_true", help="reuse requests when the corpus runs out")
    ap.add_argument("--server-pid", type=int, default=None, help="for CPU accounting")
    args = ap.parse_args()
    json.dump(asyncio.run(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
