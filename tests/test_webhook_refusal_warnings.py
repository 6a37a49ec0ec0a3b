"""Refused deliveries reach a log at WARNING, rate limited.

Walkthrough finding (2026-12-05, section 7): every ``webhook_refused`` line was INFO, so with
``CLERK_SYNC_LOG_LEVEL=WARNING`` a complete signature outage (a secret rotated in the Clerk Dashboard) left no
log line at all. A refusal that may be an outage (bad signature, another instance, too large, a signed body that
is no event) is now said at WARNING: the first of each code at once, then at most one line per interval counting
the rest, so a forged-request flood is one line a minute, not a line a request.
"""

from __future__ import annotations

import io
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import structlog

from clerk_sync.errors import WebhookError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests._server import free_port, wait_for_http
from tests.conftest import SECRET, FakeClock

CLI = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]
WRONG = "whsec_" + "A" * 32


def _fields(text: str) -> list[dict[str, str]]:
    return [dict(part.split("=", 1) for part in shlex.split(line)) for line in text.splitlines() if line.strip()]


@pytest.fixture
def warning_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The CLI's log set-up at CLERK_SYNC_LOG_LEVEL=WARNING, into a buffer (logfmt: not a terminal)."""
    from clerk_sync._logging import configure_logging

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("WARNING")
    structlog.configure(cache_logger_on_first_use=False)  # (the module loggers must not keep this one)
    try:
        yield out
    finally:
        structlog.reset_defaults()


def _refuse(processor: WebhookProcessor, svix_id: str, *, secret: str = SECRET, instance: str | None = None,
            size: int = 0, headers: bool = True) -> str:
    """One delivery as an endpoint handles it: process, and a refusal logged and counted by ``refused``."""
    event = f.envelope("user.created", f.user("user_r", 1))
    if instance is not None:
        event["instance_id"] = instance
    if size:
        event["data"]["padding"] = "x" * size
    sent_headers, body = f.signed(event, svix_id, secret=secret)
    try:
        processor.process(sent_headers if headers else {}, body)
    except WebhookError as exc:
        processor.refused(exc, svix_id)
        return exc.code
    raise AssertionError("not refused")


def test_refusals_are_warned_once_then_counted_per_interval(warning_log: io.StringIO) -> None:
    clock = FakeClock()
    store = Store.from_url("sqlite://")  # (a refusal writes nothing)
    processor = WebhookProcessor(store, WebhookVerifier([SECRET]), instance_id=f.INSTANCE, max_body_bytes=4096,
                                 clock=clock, refused_warning_s=60.0, summary_s=0)
    try:
        assert _refuse(processor, "msg_1", secret=WRONG) == "webhook_signature_invalid"  # said at once
        for i in range(99):  # a flood within the minute: counted, not a line each
            _refuse(processor, f"msg_f{i}", secret=WRONG)
        assert _refuse(processor, "msg_i", instance="ins_other") == "wrong_instance"  # another code: at once
        assert _refuse(processor, "msg_big", size=8000) == "payload_too_large"
        assert _refuse(processor, "msg_probe", headers=False) == "webhook_headers_missing"  # no delivery: no line
        clock.t += 30
        _refuse(processor, "msg_2", secret=WRONG)
        clock.t += 30.5  # a minute after the first line: the count since
        _refuse(processor, "msg_3", secret=WRONG)
        clock.t += 5
        _refuse(processor, "msg_4", secret=WRONG)
        _refuse(processor, "msg_5", secret=WRONG)
        processor.flush_summary()  # serve stopping: the two not said yet
        processor.flush_summary()
    finally:
        store.dispose()
    lines = _fields(warning_log.getvalue())
    assert all(line["level"] == "warning" for line in lines), lines  # the INFO line per refusal is below the level
    said = [(line["code"], int(line["refused"]), float(line["seconds"])) for line in lines
            if line["event"] == "webhooks_refused"]
    assert said == [("webhook_signature_invalid", 1, 0.0), ("wrong_instance", 1, 0.0), ("payload_too_large", 1, 0.0),
                    ("webhook_signature_invalid", 101, 60.5), ("webhook_signature_invalid", 2, 5.0)], said
    first = lines[0]
    assert "CLERK_WEBHOOK_SIGNING_SECRET" in first["check"] and "rotated" in first["check"]
    assert first["last_reason"] == "no matching signature found", first
    assert "svix_id" not in first  # about many deliveries, not the one that happened to log it


def test_serve_at_warning_logs_an_outage_of_refused_deliveries(tmp_path: object) -> None:
    """The walkthrough's run: serve with CLERK_SYNC_LOG_LEVEL=WARNING, then a delivery signed with a wrong
    secret (401), one from another instance (403), an oversized body (413): each code is in the log."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path}/w.db", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                "CLERK_INSTANCE_ID": f.INSTANCE, "CLERK_SYNC_MAX_BODY_BYTES": "4096", "CLERK_SYNC_LOG_LEVEL": "WARNING"})
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/healthz", timeout=30, proc=proc)
        other = f.envelope("user.created", f.user("user_o", 1))
        other["instance_id"] = "ins_other"
        big = f.envelope("user.created", {**f.user("user_b", 1), "padding": "x" * 8000})
        with httpx.Client(base_url=base) as client:
            answers = [client.post("/webhooks/clerk", content=body, headers=headers).status_code for headers, body in (
                f.signed(f.envelope("user.created", f.user("user_w", 1)), "msg_w", secret=WRONG),
                f.signed(other, "msg_o"), f.signed(big, "msg_b"))]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert answers == [401, 403, 413], (answers, err)
    refused = [line for line in _fields("\n".join(x for x in err.splitlines() if x.startswith("timestamp=")))
               if line.get("event") == "webhooks_refused"]
    assert [(line["level"], line["code"]) for line in refused] == [
        ("warning", "webhook_signature_invalid"), ("warning", "wrong_instance"), ("warning", "payload_too_large")], err


def test_refusals_said_at_warning_write_no_line_each_at_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """A soak test: 200 forged requests wrote 201 lines at the default level (INFO), one per request beside
    the throttled WARNING. The line per refusal is DEBUG for the codes said at WARNING; the others keep theirs,
    and the sender's id is cut to a length a log line holds."""
    from clerk_sync._logging import configure_logging

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("INFO")
    structlog.configure(cache_logger_on_first_use=False)
    clock = FakeClock()
    store = Store.from_url("sqlite://")
    processor = WebhookProcessor(store, WebhookVerifier([SECRET]), clock=clock, refused_warning_s=60.0, summary_s=0)
    try:
        for i in range(50):
            _refuse(processor, f"msg_forged_{i}", secret=WRONG)
        _refuse(processor, "msg_" + "x" * 3000, headers=False)  # no signature headers: its INFO line stays
    finally:
        store.dispose()
        structlog.reset_defaults()
    lines = _fields(out.getvalue())
    assert [line["event"] for line in lines].count("webhooks_refused") == 1, lines
    per_delivery = [line for line in lines if line["event"] == "webhook_refused"]
    assert [line["code"] for line in per_delivery] == ["webhook_headers_missing"], per_delivery
    assert len(per_delivery[0]["svix_id"]) < 140 and "3004 characters" in per_delivery[0]["svix_id"]
