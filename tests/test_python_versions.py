"""The Python versions the package claims are the ones tested: ``requires-python``'s floor is the version ruff and
mypy check the code for (and CI's ./scripts/test runs on), the classifiers name every minor from there on, and the
newest of them is the one ./scripts/pyversions looks for; without it on the machine that script says so and
passes, rather than failing CI or testing an older Python in its name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPT = REPO / "scripts" / "pyversions"


def _floor_minor() -> int:
    match = re.fullmatch(r">=3\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert match, PYPROJECT["project"]["requires-python"]
    return int(match.group(1))


def _classifier_minors() -> list[int]:
    prefix = "Programming Language :: Python :: 3."
    return [int(c.removeprefix(prefix)) for c in PYPROJECT["project"]["classifiers"] if c.startswith(prefix)]


def _wanted_minor() -> int:
    match = re.search(r"^WANT=(\d+)\b", SCRIPT.read_text(), flags=re.MULTILINE)
    assert match, "scripts/pyversions sets no WANT="
    return int(match.group(1))


def test_floor_is_what_ruff_and_mypy_check_for() -> None:
    floor = _floor_minor()
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{floor}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"3.{floor}"


def test_classifiers_name_each_minor_from_the_floor_to_the_one_pyversions_tests() -> None:
    minors = _classifier_minors()
    assert minors == list(range(_floor_minor(), _wanted_minor() + 1)), minors


def test_pyversions_without_a_newer_python_says_so_and_passes(tmp_path: Path) -> None:
    # A PATH with the two tools the script runs and no python3.N, and an empty pyenv root: nothing to test on.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("dirname", "seq"):
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(tools), "PYENV_ROOT": str(tmp_path / "pyenv"),
           "CLERK_SYNC_PYVERSIONS_VENV": str(tmp_path / "venv")}
    bash = shutil.which("bash")
    assert bash
    done = subprocess.run([bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert f"pyversions: SKIPPED: no Python 3.{_wanted_minor()} or newer on this machine" in done.stderr
    assert str(tmp_path / "pyenv") in done.stderr
    assert not (tmp_path / "venv").exists()
