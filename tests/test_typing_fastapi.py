"""tests/typing/fastapi_usage.py under mypy --strict: ``ClerkAuth.current_user`` is typed as what its getter
returns (it was ``Any``, so ``(await clerk.current_user(request)).emial`` passed the type check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import clerk_sync

TYPING = Path(__file__).parent / "typing" / "fastapi_usage.py"


def test_current_user_is_typed_as_its_getters_row(tmp_path: Path) -> None:
    # the clerk_sync this test imports (a checkout's src, or PYTHONPATH's), not only the installed one
    package_root = str(Path(clerk_sync.__file__).parent.parent)
    env = {**os.environ, "MYPYPATH": package_root}
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--warn-unused-ignores", "--cache-dir",
                             str(tmp_path / "mypy_cache"), str(TYPING)],
                            capture_output=True, text=True, env=env, cwd=TYPING.parent.parent.parent, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
