"""Closed-loop keep-alive GET load for bench/auth.py (run as its own process; raw asyncio streams).

Requests are pre-serialised: one per line of ``--tokens`` (a bearer token each, or none with
``--no-auth``), sent round-robin. Prints one JSON object with throughput, latency percentiles, status
counts and CPU ms per request (server tree / this process), via ``bench/_loadgen.cpu_snapshot``.

    python bench/_auth_loadgen.py --port 8000 --path /me --tokens /tmp/tokens.txt --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loadgen import run_window


def build_requests(host: str, path: str, tokens: list[str]) -> list[bytes]:
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
    return [(head + (f"Authorization: Bearer {t}\r\n" if t else "") + "\r\n").encode() for t in tokens]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tokens = [""] if args.no_auth else Path(args.tokens).read_text().split()
    requests = build_requests(f"{args.host}:{args.port}", args.path, tokens)
    perf = time.perf_counter
    t0 = perf() + 0.2
    w_start, w_end = t0 + args.warmup, t0 + args.warmup + args.duration
    lat: list[float] = []
    statuses: dict[str, int] = {}
    counter = 0

    async def client() -> None:
        nonlocal counter
        reader, writer = await asyncio.open_connection(args.host, args.port)
        while perf() < t0:
            await asyncio.sleep(0.005)
        try:
            while (start := perf()) < w_end:
                writer.write(requests[counter % len(requests)])
                counter += 1
                head = await reader.readuntil(b"\r\n\r\n")
                clen = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        clen = int(line[15:])
                if clen:
                    await reader.readexactly(clen)
                end = perf()
                if w_start <= end < w_end:
                    lat.append(end - start)
                    status = head[9:12].decode()
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    cpu = await run_window([client() for _ in range(args.concurrency)], args.server_pid, w_start, w_end)
    lat.sort()
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    n = max(1, len(lat))
    return {
        "path": args.path,
        "rps": ok / args.duration,
        "completed": len(lat),
        "statuses": statuses,
        "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else None,
        "server_cpu_us_per_req": 1e6 * cpu["server"] / n,
        "loadgen_cpu_us_per_req": 1e6 * cpu["loadgen"] / n,
        "machine_busy": cpu["machine_busy"] / cpu["machine_total"] if cpu["machine_total"] else None,
        "foreign_cpu": (cpu["machine_busy"] - cpu["server"] - cpu["loadgen"]) / cpu["machine_total"]
        if cpu["machine_total"] else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--tokens", default="")
    ap.add_argument("--no-auth", action="store_true")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--server-pid", type=int, default=None)
    args = ap.parse_args()
    json.dump(asyncio.run(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
