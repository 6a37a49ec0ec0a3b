"""The emulator's public surface, its independence from clerk-sync, in-process use, and how
``serve`` and ``clerk-sync emulate`` start (or refuse to)."""

from __future__ import annotations

import ast
import asyncio
import importlib
import io
import os
import pkgutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import clerk_sync.emulator
from clerk_sync import testing
from clerk_sync.emulator import EmulatorConfig, create_app, serve
from tests._server import free_port, wait_for_http

CLI = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]

PACKAGE_DIR = Path(clerk_sync.emulator.__file__).parent
MODULES = sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE_DIR)]))


def test_package_exports() -> None:
    assert set(clerk_sync.emulator.__all__) == {
        "SVIX_RETRY_SCHEDULE_S", "ClerkAPIError", "Emulator", "EmulatorConfig", "FaultSettings",
        "create_app", "generate_webhook_secret", "serve", "sign_headers",
    }  # fmt: skip
    assert testing.__all__ == ["EmulatorRequestError", "EmulatorServer", "serve_app"]


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


def _environ(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CLERK_")}, **extra}


def _emulate_fails(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``clerk-sync emulate`` expecting it to stop at once (killed after 60 s if it serves)."""
    return subprocess.run([*CLI, "emulate", *args], env=_environ(**env), capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_serve_refuses_a_busy_port_before_printing(busy_port: int) -> None:
    """No URLs and no generated secret for a server that never runs."""
    out = io.StringIO()
    with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{busy_port} .*another port"):
        serve(EmulatorConfig(), "127.0.0.1", busy_port, out=out)
    assert out.getvalue() == ""


def test_emulate_on_a_busy_port_is_one_error_line(busy_port: int) -> None:
    done = _emulate_fails("--port", str(busy_port))
    assert done.returncode == 3, done.stderr  # unavailable now (the CLI's exit-code table), not a setting
    assert f"127.0.0.1:{busy_port}" in done.stderr
    assert "--port" in done.stderr
    assert "Traceback" not in done.stderr
    assert "whsec_" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        ((), {"CLERK_EMULATOR_SEED": "abc"}, "CLERK_EMULATOR_SEED must be an integer"),
        ((), {"CLERK_EMULATOR_TIME_SCALE": "0"}, "CLERK_EMULATOR_TIME_SCALE must be a number greater than 0"),
        ((), {"CLERK_WEBHOOK_SIGNING_SECRET": "whsec_"},
         "CLERK_WEBHOOK_SIGNING_SECRET: the webhook signing secret cannot sign"),
        (("--time-scale", "0"), {}, "must be greater than 0"),
    ],
    ids=["seed", "env-time-scale", "secret", "option-time-scale"],
)
def test_emulate_refuses_bad_settings_in_one_line(args: tuple[str, ...], env: dict[str, str], says: str) -> None:
    done = _emulate_fails("--port", "0", *args, **env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in " ".join(done.stderr.split())  # Rich wraps a long line
    assert "Traceback" not in done.stderr


def test_emulate_reads_the_time_scale_from_the_environment() -> None:
    """The --time-scale default used to override CLERK_EMULATOR_TIME_SCALE with 1.0."""
    port = free_port()
    proc = subprocess.Popen([*CLI, "emulate", "--port", str(port)], env=_environ(CLERK_EMULATOR_TIME_SCALE="250"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=20, proc=proc)
        state = httpx.get(f"http://127.0.0.1:{port}/_emulator/state",
                          headers={"Authorization": "Bearer sk_test_emulator"}).json()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert state["faults"]["time_scale"] == 250.0
