"""The README's console snippet runs as printed, and the app it builds serves the console."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests._server import running

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet() -> str:
    text = README.read_text()
    found = re.search(r"<!-- console-snippet -->\n```python\n(.*?)```", text, re.S)
    assert found, "the console snippet is missing from the README"
    return found.group(1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_readme_console_snippet_runs(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("CLERK_SYNC_CONSOLE_TOKEN", "readme-token")
    for name in ("CLERK_SECRET_KEY", "CLERK_JWT_KEY", "CLERK_JWKS_URL"):
        monkeypatch.delenv(name, raising=False)
    namespace: dict[str, object] = {}
    exec(compile(snippet(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    with running(namespace["app"]) as url:
        assert httpx.get(f"{url}/console/login").status_code == 200
        overview = httpx.get(f"{url}/console/", headers={"Authorization": "Bearer readme-token"})
        assert overview.status_code == 200 and "Overview" in overview.text
    namespace["store"].dispose()  # type: ignore[attr-defined]
