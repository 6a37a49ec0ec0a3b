"""The README's Flask section, run exactly as printed: the shell line migrates, the app serves the emulator's users."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from clerk_sync.integrations.flask import clerk_state
from clerk_sync.testing import EmulatorServer
from tests._flask import running_wsgi
from tests._server import free_port

README = Path(__file__).resolve().parents[1] / "README.md"


def flask_blocks() -> list[tuple[str, str]]:
    """The ``python`` and ``bash`` blocks of the README's "In a Flask app" section, in order."""
    text = README.read_text()
    section = text.split("## In a Flask app\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S)


def flask_section() -> dict[str, str]:
    """The app (the first ``python`` block) and the shell line (the first ``bash`` block)."""
    found: dict[str, str] = {}
    for kind, block in flask_blocks():
        found.setdefault(kind, block)
    return found


def test_the_flask_section_has_the_blocks_these_tests_run() -> None:
    kinds = [kind for kind, _ in flask_blocks()]
    assert kinds == ["python", "bash", "python"], kinds  # the app, its commands, an app factory with a store


def test_the_app_factory_block_runs_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its store (hooks, mapping) is the one the app's webhook writes through."""
    from clerk_sync import migrations
    from clerk_sync.changes import Hook
    from clerk_sync.store import create_engine
    from tests import factories as f
    from tests.conftest import SECRET

    factory = flask_blocks()[2][1]
    monkeypatch.chdir(tmp_path)  # the snippet's DATABASE_URL is relative
    for name in [n for n in os.environ if n.startswith("CLERK_") or n == "DATABASE_URL"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CLERK_WEBHOOK_SIGNING_SECRET", SECRET)
    engine = create_engine("sqlite:///app.db")
    migrations.upgrade(engine)
    engine.dispose()
    namespace: dict[str, object] = {"__name__": "__main__"}  # (as `python app.py` runs it)
    exec(compile(factory, "README factory block", "exec"), namespace)  # noqa: S102 (the README's own text)
    heard: list[str] = []
    app = namespace["create_app"](hooks=[Hook("heard", lambda change: heard.append(change.type))])  # type: ignore[operator]
    store = clerk_state(app).store
    try:
        headers, body = f.signed(f.envelope("user.created", f.user("user_factory", 1000)), "msg_factory")
        answer = app.test_client().post("/webhooks/clerk", data=body, headers=headers)
        assert answer.status_code == 200 and answer.get_json()["status"] == "applied", answer.get_data(as_text=True)
        from clerk_sync.hooks import Dispatcher

        assert Dispatcher(store).run_once() == 1 and heard == ["user.created"]  # the factory's hooks were queued
    finally:
        store.dispose()


def test_the_flask_section_runs_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = flask_section()
    (tmp_path / "app.py").write_text(blocks["python"])
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk", rate_limit_requests=1000) as clerk:
        env = {"CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret, "CLERK_SECRET_KEY": clerk.secret_key,
               "CLERK_API_URL": clerk.url, "CLERK_ISSUER": clerk.url}
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
        shell = subprocess.run(["bash", "-c", blocks["bash"]], capture_output=True, text=True, cwd=tmp_path, check=False,
                               env={**clean, **env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert shell.returncode == 0, shell.stderr
        assert (tmp_path / "app.db").exists()

        monkeypatch.chdir(tmp_path)  # the snippet's DATABASE_URL is relative
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        spec = importlib.util.spec_from_file_location("readme_flask_app", tmp_path / "app.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        app = module.app

        admin = clerk.create_user("root@example.com", public_metadata={"role": "admin"})
        member = clerk.create_user("member@example.com")
        with running_wsgi(app, port) as url, httpx.Client(base_url=url) as http:
            clerk.wait_for_deliveries()

            def get(path: str, user: str | None = None, method: str = "GET", **kw: str) -> httpx.Response:
                headers = {"Authorization": f"Bearer {clerk.mint_session_token(user, **kw)}"} if user else {}
                return http.request(method, path, headers=headers)

            assert get("/").json() == {"page": "public"}
            assert get("/dashboard").status_code == 401
            assert get("/dashboard", member["id"]).json() == {"email": "member@example.com", "impersonated_by": None}
            assert get("/admin", member["id"]).status_code == 403
            assert get("/admin", admin["id"]).json() == {"admin": "root@example.com"}
            assert get("/account/delete", member["id"], "POST").json() == {"deleted": member["id"]}
            assert get("/account/delete", member["id"], "POST", actor=admin["id"]).status_code == 403
        clerk_state(app).close()
