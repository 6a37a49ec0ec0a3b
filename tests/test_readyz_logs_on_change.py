"""/readyz is polled every few seconds per replica: a database outage logged ``readyz_database_down`` at WARNING on
every poll (thousands of lines an hour across replicas, the outage's own lines lost among them). Now: at WARNING
when a poll first finds it (or its error changes), repeats at DEBUG, and its end once at INFO with the count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog

from clerk_sync import migrations
from clerk_sync._db_errors import store_error
from tests._server import running
from tests.test_least_privilege_fixa import _embedded


def test_an_outage_is_warned_once_repeats_are_debug_and_its_end_is_said(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    app, processor = _embedded(tmp_path)
    migrations.upgrade(processor.store.engine)
    app.state.clerk_sync_migration.done = True
    down: list[str] = []
    ping = processor.store.ping

    def ping_or_fail() -> Any:
        if down:  # the driver's refusal of a connection, as store.ping raises it
            raise store_error(sa.exc.OperationalError("SELECT 1", {}, Exception(down[0])))
        return ping()

    monkeypatch.setattr(processor.store, "ping", ping_or_fail)
    try:
        with (structlog.testing.capture_logs() as logs, running(app) as base,
              httpx.Client(base_url=base, timeout=30) as client):
            codes = [client.get("/readyz").status_code]
            down.append("connection refused")
            codes += [client.get("/readyz").status_code for _ in range(3)]
            down[0] = "the server closed the connection"  # another error: said again
            codes.append(client.get("/readyz").status_code)
            down.clear()
            codes += [client.get("/readyz").status_code for _ in range(2)]
            down.append("connection refused")  # down again: a new outage, warned again
            codes.append(client.get("/readyz").status_code)
    finally:
        processor.store.dispose()
    assert codes == [200, 503, 503, 503, 503, 200, 200, 503], codes
    said = [(e["log_level"], e["event"], e.get("polls")) for e in logs if e["event"].startswith("readyz_")]
    assert said == [("warning", "readyz_database_down", None), ("debug", "readyz_database_down", None),
                    ("debug", "readyz_database_down", None), ("warning", "readyz_database_down", None),
                    ("info", "readyz_state_ended", 4), ("warning", "readyz_database_down", None)], said
    downs = [e for e in logs if e["event"] == "readyz_database_down"]
    assert "connection refused" in downs[0]["error"] and "closed the connection" in downs[3]["error"], downs


def test_a_poll_answering_after_a_later_one_is_not_said() -> None:
    """At recovery, a poll stuck on a connect timeout finished after a later poll that found the database: it warned
    again after the end had been said, and the next poll said the end a second time."""
    from clerk_sync.integrations.starlette import _SaidOnChange

    said = _SaidOnChange()
    with structlog.testing.capture_logs() as logs:
        said.warning(said.ticket(), "readyz_database_down", error="connection refused")
        slow, fast = said.ticket(), said.ticket()
        said.ended(fast)  # the later poll: the database answers
        said.warning(slow, "readyz_database_down", error="timeout expired")  # the earlier one, late
        said.ended(said.ticket())
    assert [(e["log_level"], e["event"]) for e in logs] == [("warning", "readyz_database_down"),
                                                           ("info", "readyz_state_ended")], logs
