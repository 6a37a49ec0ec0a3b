"""Real processes for the service tests: ``clerk-sync serve`` replicas and Svix-like posters.

``Server`` runs the CLI in a subprocess on a free loopback port and waits for ``/healthz``.
``deliver`` posts one delivery the way Svix does: re-signed per attempt, retried on 5xx and on
connection errors. Run as a script (``python _procs.py poster JOB.json``) it is one poster process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clerk_sync.webhooks import sign
from tests._server import free_port, wait_for_http

HERE = Path(__file__).resolve().parent
SERVE = "from clerk_sync.cli import main; main()"


class Server:
    """One ``clerk-sync serve`` subprocess; ``kill()`` is ``kill -9``, ``stop()`` a clean shutdown."""

    def __init__(self, database_url: str, secret: str, *, migrate: bool = False, log: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DATABASE_URL": database_url, "CLERK_WEBHOOK_SIGNING_SECRET": secret,
               "CLERK_SYNC_LOG_LEVEL": "WARNING", **(env or {})}
        args = [sys.executable, "-c", SERVE, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--migrate" if migrate else "--no-migrate"]
        self._log = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=self._log)

    def wait_ready(self, timeout: float = 30.0) -> Server:
        wait_for_http(f"{self.url}/healthz", timeout=timeout, proc=self.proc)
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill()
        finally:
            if not isinstance(self._log, int):
                self._log.close()


@dataclass
class Tally:
    """What one poster saw; ``gave_up`` lists deliveries never acknowledged with 2xx."""

    statuses: dict[str, int] = field(default_factory=dict)
    retried_5xx: int = 0
    connection_errors: int = 0
    client_errors: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}


def deliver(client: httpx.Client, urls: Sequence[str], secret: str, svix_id: str, body: bytes,
            tally: Tally, rng: random.Random, *, attempts: int = 200) -> bool:
    """POST until a 2xx (True) or a 4xx / too many attempts (False); re-sign every attempt like Svix."""
    for attempt in range(attempts):
        url = urls[(rng.randrange(len(urls)) + attempt) % len(urls)]
        headers = sign(secret, svix_id, int(time.time()), body)
        try:
            response = client.post(f"{url}/webhooks/clerk", content=body,
                                   headers={**headers, "content-type": "application/json"})
        except httpx.TransportError:
            with tally.lock:
                tally.connection_errors += 1
            time.sleep(0.02 + rng.random() * 0.05)
            continue
        if response.status_code >= 500:
            with tally.lock:
                tally.retried_5xx += 1
            time.sleep(0.02 + rng.random() * 0.05)
            continue
        if response.status_code >= 300:
            with tally.lock:
                tally.client_errors.append(f"{svix_id}: {response.status_code} {response.text[:200]}")
            return False
        status = response.json()["status"]
        with tally.lock:
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            tally.acked.append(svix_id)
        return True
    with tally.lock:
        tally.gave_up.append(svix_id)
    return False


def post_all(urls: Sequence[str], secret: str, deliveries: Sequence[tuple[str, bytes]], *,
             threads: int, seed: int, tally: Tally | None = None) -> Tally:
    """Post ``deliveries`` from ``threads`` threads sharing one queue (order roughly preserved)."""
    tally = tally or Tally()
    queue = list(reversed(deliveries))
    queue_lock = threading.Lock()

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        with httpx.Client(timeout=30.0) as client:
            while True:
                with queue_lock:
                    if not queue:
                        return
                    svix_id, body = queue.pop()
                deliver(client, urls, secret, svix_id, body, tally, rng)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return tally


def spawn_poster(job: Path) -> subprocess.Popen[bytes]:
    """A poster process reading ``job`` (JSON: urls, secret, seed, threads, deliveries) and writing a tally."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, str(HERE / "_procs.py"), "poster", str(job)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE)


def _poster_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    deliveries = [(d["svix_id"], d["body"].encode()) for d in job["deliveries"]]
    tally = post_all(job["urls"], job["secret"], deliveries, threads=job["threads"], seed=job["seed"])
    sys.stdout.write(json.dumps(tally.as_json()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["poster"]:
        _poster_main(sys.argv[2])
