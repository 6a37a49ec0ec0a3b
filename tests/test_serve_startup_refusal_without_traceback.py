"""A start-up failure of ours (a :class:`ClerkSyncError`: a refused migration, a setting) is told as its one line,
without the 60-line traceback Starlette hands uvicorn for it; anything else (a bug) keeps its traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette

from clerk_sync.cli._serve import tell_startup_failure
from clerk_sync.errors import ConfigError


def _failing_app(exc: BaseException) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        raise exc
        yield  # pragma: no cover

    return Starlette(lifespan=lifespan)


def _start(exc: BaseException) -> list[str]:
    told: list[str] = []
    app = _failing_app(exc)
    tell_startup_failure(app, told.append)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    with pytest.raises(SystemExit) as stopped:
        asyncio.run(server.serve())
    assert stopped.value.code == 3 and not server.started  # uvicorn's start-up failure
    return told


def test_ours_is_told_in_one_line_without_the_traceback_and_a_bug_keeps_its_own(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    told = _start(ConfigError("the database refuses to create triggers: set log_bin_trust_function_creators=1"))
    ours = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert told == ["the database refuses to create triggers: set log_bin_trust_function_creators=1"]
    assert "Application startup failed. Exiting." in ours, ours
    assert not any("Traceback" in line for line in ours), ours
    assert not logging.getLogger("uvicorn.error").filters

    caplog.clear()
    told = _start(RuntimeError("a bug"))
    bug = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert told == ["RuntimeError: a bug"]
    assert any("Traceback (most recent call last)" in line and "RuntimeError: a bug" in line for line in bug), bug
    assert not logging.getLogger("uvicorn.error").filters  # the drop was for one record, not left behind


def test_a_bug_beside_ours_in_a_task_group_keeps_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    _start(ExceptionGroup("start-up", [ConfigError("a setting"), RuntimeError("a bug beside it")]))
    said = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert any("Traceback (most recent call last)" in line and "a bug beside it" in line for line in said), said
    assert not logging.getLogger("uvicorn.error").filters
