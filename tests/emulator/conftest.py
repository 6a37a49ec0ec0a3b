"""Fixtures for the emulator tests: a served emulator, a webhook receiver, spec validators."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from clerk_sync.testing import EmulatorServer

from .support import BAPI_SPEC, WEBHOOK_SPEC, Receiver, SpecValidator, handler_for


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    recv = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(recv))
    server.daemon_threads = True
    recv.url = f"http://127.0.0.1:{server.server_address[1]}/webhooks/clerk"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield recv
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def clerk() -> Iterator[EmulatorServer]:
    """An emulator without a webhook endpoint (messages are logged as ``no_endpoint``)."""
    with EmulatorServer(seed=7, time_scale=1000.0) as server:
        yield server


@pytest.fixture
def clerk_hooked(receiver: Receiver) -> Iterator[EmulatorServer]:
    """An emulator delivering to ``receiver``, with the retry schedule sped up 1000x."""
    with EmulatorServer(seed=7, time_scale=1000.0, webhook_url=receiver.url) as server:
        yield server


@pytest.fixture(scope="session")
def bapi() -> SpecValidator:
    return SpecValidator(BAPI_SPEC)


@pytest.fixture(scope="session")
def webhook_spec() -> SpecValidator:
    return SpecValidator(WEBHOOK_SPEC)
