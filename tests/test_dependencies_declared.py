"""Every distribution ``src/`` imports is declared in ``pyproject.toml`` (a dependency, or an extra's), not
reached through another's requirements: ``anyio`` (worker threads, cancel scopes all over) and ``httpcore`` (the
Clerk client's deadline backend) came only with starlette and httpx, with no floor of ours, so a release of
theirs dropping or loosening them would have broken the package, or installed a version without what it uses."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src" / "clerk_sync"
#: Imported by a framework's integration, part of that framework's own API (its requirement, not ours).
WITH_THEIR_FRAMEWORK = {"click": "Flask", "werkzeug": "Flask", "asgiref": "Django", "markupsafe": "Jinja2"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {_normalized(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}


def _imported() -> dict[str, set[str]]:
    """Top-level module imported (outside the standard library) -> the src files importing it."""
    out: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top != "clerk_sync" and top not in sys.stdlib_module_names:
                    out.setdefault(top, set()).add(str(path.relative_to(SRC)))
    return out


def test_every_distribution_src_imports_is_declared() -> None:
    declared, owners = _declared(), packages_distributions()
    undeclared = {}
    for module, files in _imported().items():
        if module in WITH_THEIR_FRAMEWORK:
            continue
        distributions = {_normalized(d) for d in owners.get(module, [module])}
        if not distributions & declared:
            undeclared[module] = sorted(files)
    assert undeclared == {}, f"imported by src/ but not declared in pyproject.toml: {undeclared}"
