"""The emulator's public surface, its independence from clerk-sync, and in-process use."""

from __future__ import annotations

import ast
import asyncio
import importlib
import pkgutil
from pathlib import Path

import httpx
import pytest

import clerk_sync.emulator
from clerk_sync import testing
from clerk_sync.emulator import EmulatorConfig, create_app

PACKAGE_DIR = Path(clerk_sync.emulator.__file__).parent
MODULES = sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE_DIR)]))


def test_package_exports() -> None:
    assert set(clerk_sync.emulator.__all__) == {
        "SVIX_RETRY_SCHEDULE_S", "ClerkAPIError", "Emulator", "EmulatorConfig", "FaultSettings",
        "create_app", "generate_webhook_secret", "serve", "sign_headers",
    }  # fmt: skip
    assert testing.__all__ == ["EmulatorServer"]


@pytest.mark.parametrize("name", MODULES)
def test_every_module_declares_its_exports(name: str) -> None:
    module = importlib.import_module(f"clerk_sync.emulator.{name}")
    exported = module.__all__
    assert exported == sorted(exported, key=lambda n: (not n.isupper(), n))
    for attribute in exported:
        assert hasattr(module, attribute), f"{name}.{attribute}"


@pytest.mark.parametrize("name", MODULES)
def test_emulator_imports_nothing_from_clerk_sync(name: str) -> None:
    """It is Clerk, not us: only relative imports inside the subpackage are allowed."""
    tree = ast.parse((PACKAGE_DIR / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{name} imports from outside the emulator"
            assert not (node.module or "").startswith("clerk_sync"), name
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("clerk_sync") for alias in node.names), name


def test_create_app_in_process() -> None:
    """No socket needed: httpx's ASGI transport drives the app, knobs stay in-process."""
    app, emulator = create_app(EmulatorConfig(seed=1))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer sk_test_emulator"}
        async with httpx.AsyncClient(transport=transport, base_url="http://emulator", headers=headers) as client:
            created = await client.post("/v1/users", json={"email_address": ["inproc@example.com"]})
            assert created.status_code == 200
            assert emulator.store.summary()["users"] == 1
            emulator.faults.update({"outage": True})
            assert (await client.get("/v1/users")).status_code == 503

    try:
        asyncio.run(scenario())
    finally:
        emulator.close()
