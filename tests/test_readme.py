"""Every python block of the README runs exactly as printed (issue 10 #8: the auth snippet used to fail
with ``NameError: app``, then ``store``), against a migrated temp database and the Clerk emulator."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clerk_sync import migrations
from clerk_sync.store import create_engine
from clerk_sync.testing import EmulatorServer
from tests._server import free_port, running

README = Path(__file__).resolve().parents[1] / "README.md"
# Framework sections whose blocks their own tests run as printed (tests/test_flask_readme.py, ...).
OWN_TESTS = ("## In a Flask app\n", "## In a Django project\n")


def _generic_part(text: str) -> str:
    for heading in OWN_TESTS:
        if heading in text:
            before, after = text.split(heading, 1)
            text = before + ("\n## " + after.split("\n## ", 1)[1] if "\n## " in after else "")
    return text


BLOCKS = re.findall(r"^```python\n(.*?)^```", _generic_part(README.read_text()), flags=re.MULTILINE | re.DOTALL)


def _first_line(block: str) -> str:
    return next(line for line in block.splitlines() if line.strip())[:60]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EmulatorServer, int]]:
    """What the README asks for first: the variables set and ``clerk-sync migrate`` run."""
    port = free_port()
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk") as clerk:
        for name, value in {"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
                            "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url}.items():
            monkeypatch.setenv(name, value)
        yield clerk, port


def test_the_readme_has_the_blocks_this_test_expects() -> None:
    assert len(BLOCKS) >= 2
    assert any("clerk.install(app" in b for b in BLOCKS)
    assert any("sync_me_router(clerk, jit)" in b for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=_first_line)
def test_readme_block_runs_as_printed(block: str, world: tuple[EmulatorServer, int]) -> None:
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    if "create_console" in block:
        _the_console_is_guarded(namespace["app"], *world)
    elif "app" in namespace:
        _the_app_behaves_as_described(namespace["app"], *world)


def _the_console_is_guarded(app: Any, clerk: EmulatorServer, port: int) -> None:
    """The "Operator console" snippet: the console answers, and only to admins (tests/console has the rest)."""
    stranger = clerk.create_user(email="eve@example.com")
    with running(app, port=port) as url, httpx.Client(base_url=f"{url}/console") as client:
        assert client.get("/login").status_code == 200
        assert client.get("/").status_code == 401
        bearer = {"Authorization": f"Bearer {clerk.mint_session_token(stranger['id'])}"}
        assert client.get("/", headers=bearer).status_code == 403  # no admin row in this database


def _the_app_behaves_as_described(app: Any, clerk: EmulatorServer, port: int) -> None:
    admin = clerk.create_user(email="ada@example.com", public_metadata={"role": "admin"})
    plain = clerk.create_user(email="bob@example.com")
    with running(app, port=port) as url, httpx.Client(base_url=url) as client:
        clerk.wait_for_deliveries()  # the webhook route is public: Clerk's deliveries got in
        assert all(d["status"] == "succeeded" for d in clerk.deliveries())
        assert client.get("/").json() == {"page": "public"}
        assert client.get("/admin").status_code == 401
        assert client.get("/docs").status_code == 401  # a route without any dependency: denied by default
        bearer = {"Authorization": f"Bearer {clerk.mint_session_token(admin['id'])}"}
        assert client.get("/admin", headers=bearer).json() == {"admin": admin["id"]}
        other = {"Authorization": f"Bearer {clerk.mint_session_token(plain['id'])}"}
        assert client.get("/admin", headers=other).status_code == 403
        pending = {"Authorization": f"Bearer {clerk.mint_session_token(admin['id'], pending=True)}"}
        assert client.get("/admin", headers=pending).json()["error"] == "session_pending"
        if any(getattr(route, "path", None) == "/sync/me" for route in app.routes):
            assert client.post("/sync/me").status_code == 401
            synced = client.post("/sync/me", headers=other).json()
            assert (synced["user_id"], synced["email"]) == (plain["id"], "bob@example.com")
