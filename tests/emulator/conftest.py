"""Fixtures for the emulator tests: a served emulator, a webhook receiver, spec validators."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clerk_sync.testing import EmulatorServer

from .support import BAPI_SPEC, WEBHOOK_SPEC, Receiver, SpecValidator, served_receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with served_receiver() as recv:
        yield recv


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
