"""Walkthrough review: ``serve --workers N`` set up logging in the supervisor only. Each spawned worker kept
structlog's defaults: plain text on stdout under ``--json-logs``, and the per-delivery DEBUG line whatever
``CLERK_SYNC_LOG_LEVEL`` said (``--workers 1`` honoured both)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx

from tests import factories as f
from tests._server import free_port, wait_for_http
from tests.conftest import SECRET
from tests.test_cli import CLI, run


def test_workers_log_at_the_level_and_in_the_format_serve_was_given(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_")}
    env.update({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_SYNC_LOG_LEVEL": "INFO"})
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2", "--json-logs", "--no-migrate"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/healthz", timeout=30, proc=proc)
        with httpx.Client(base_url=base) as client:
            headers, body = f.signed(f.envelope("user.created", f.user("user_ok", 100)), "msg_ok")
            assert client.post("/webhooks/clerk", content=body, headers=headers).json()["status"] == "applied"
            broken = f.envelope("user.created", {"object": "user", "first_name": "X"})  # no id: stored failed
            headers, body = f.signed(broken, "msg_bad")
            assert client.post("/webhooks/clerk", content=body, headers=headers).json()["status"] == "failed"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    lines = [line for line in (out + err).splitlines() if "msg_" in line]
    assert lines, (out, err)
    parsed = [json.loads(line) for line in lines]  # every line of a delivery is JSON (a plain one raises here)
    assert [(p["event"], p["svix_id"], p["level"]) for p in parsed] == [("webhook", "msg_bad", "warning")], parsed
