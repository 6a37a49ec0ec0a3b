"""The package as users get it from PyPI, not the editable install every other test imports.

Once per module: ``python -m build`` makes the sdist and, from it, the wheel (as a release does), and the
wheel is installed with the ``postgres`` extra into a fresh venv, pip resolving its dependencies from the
index (about 10-30 s: no reuse of the dev venv's packages, whose editable finder would put the source tree
back on the path). Every check then runs that venv's interpreter or ``clerk-sync`` script from a directory
outside the repository, with no PYTHONPATH, so nothing can come from ``src/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from tests.conftest import _PG_PROBLEM, PG_URL, pg_schema_url, require_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
PACKAGE = SRC / "clerk_sync"
BIN = "Scripts" if sys.platform == "win32" else "bin"
OPERATOR_TOKEN = "wheel-test-operator-token-0123456789"


@dataclass(frozen=True)
class Installed:
    sdist: Path
    wheel: Path
    python: Path
    script: Path  # the console script pip wrote: clerk-sync
    cwd: Path  # outside the repository
    env: dict[str, str]

    def run(self, *args: str | Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in args], cwd=self.cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, check=False)

    def python_code(self, code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-c", textwrap.dedent(code), env=env)


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point the venv back at the repo (PYTHONPATH, the
    dev venv) or configure clerk-sync (CI's DATABASE_URL, CLERK_*): pip's own settings stay."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "DATABASE_URL", "REDIS_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("CLERK_")}
    env["PYTHONNOUSERSITE"] = "1"  # no ~/.local packages either
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _check(proc: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _new_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / BIN / ("python.exe" if sys.platform == "win32" else "python")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    assert not base.resolve().is_relative_to(REPO), f"{base} is inside the repository: set --basetemp elsewhere"
    env = _clean_env()
    cwd = base / "elsewhere"
    cwd.mkdir()

    def run(*args: str | Path, timeout: float = 600) -> None:
        _check(subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False), " ".join(map(str, args)))

    # Built as a release is: sdist, then the wheel from the unpacked sdist (a file missing from the sdist
    # is then missing from the wheel too). `build` lives in a venv of its own, not the user's.
    builder = _new_venv(base / "build-venv")
    run(builder, "-m", "pip", "install", "-q", "build")
    dist = base / "dist"
    run(builder, "-m", "build", "--outdir", dist, REPO)
    (sdist,) = dist.glob("clerk_sync-*.tar.gz")
    (wheel,) = dist.glob("clerk_sync-*.whl")

    python = _new_venv(base / "venv")
    started = time.monotonic()
    run(python, "-m", "pip", "install", "-q", f"{wheel}[postgres]")
    print(f"pip install {wheel.name}[postgres]: {time.monotonic() - started:.1f} s")  # shown with -s
    return Installed(sdist=sdist, wheel=wheel, python=python, script=python.parent / "clerk-sync", cwd=cwd, env=env)


def _files(root: Path, relative_to: Path) -> set[str]:
    """Every file under ``root`` a build should ship, relative to ``relative_to``: what git tracks or would
    track (hatchling drops what .gitignore ignores, as git does); without git, the tree minus bytecode."""
    proc = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "."],
                          cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode == 0 and proc.stdout:
        # (ls-files lists a deleted but not yet committed file too: only what exists counts.)
        paths = [root / p for p in proc.stdout.split("\0") if p]
        files = {p for p in paths if p.is_file()}
    else:
        files = {p for p in root.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}}
    return {p.relative_to(relative_to).as_posix() for p in files}


def _source_files() -> set[str]:
    """src/clerk_sync's files as wheel paths (clerk_sync/...)."""
    return _files(PACKAGE, SRC)


# Never in an sdist: environments, databases and their journals/locks, secrets, caches, benchmark output.
_JUNK_DIRS = {".venv", ".ci-venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache",
              ".ruff_cache", "node_modules"}
_JUNK_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db-wal", ".db-shm", ".db-journal", ".lock", ".pyc")


def test_the_sdist_holds_the_sources_and_tests_and_nothing_local(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile() and "/" in m.name}
    needed = _files(SRC, REPO) | _files(REPO / "tests", REPO) | {"pyproject.toml", "README.md", "LICENSE"}
    assert sorted(needed - members) == [], "needed to rebuild and test, but not in the sdist"
    junk = sorted(m for m in members
                  if _JUNK_DIRS.intersection(m.split("/")) or m.endswith(_JUNK_SUFFIXES)
                  or m.split("/")[-1].startswith(".env") or m.startswith("bench/results/"))
    assert junk == []


def test_the_wheel_holds_every_file_of_the_source_tree(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("clerk_sync/")}
    source = _source_files()
    data = {f for f in source if not f.endswith(".py")}
    # The data files the code loads (templates, static, Alembic's script.py.mako, py.typed) are among them:
    # computed, but an empty set would make the check vacuous.
    assert {"clerk_sync/py.typed", "clerk_sync/migrations/script.py.mako"} <= data
    assert any(f.startswith("clerk_sync/integrations/console/templates/") for f in data)
    assert sorted(source - shipped) == [], "in src/clerk_sync but not in the wheel"
    assert sorted(shipped - source) == [], "in the wheel but not in src/clerk_sync"


def test_the_installed_package_is_the_venvs_not_the_repos(installed: Installed) -> None:
    proc = _check(installed.python_code("""
        import json, sys
        import clerk_sync, clerk_sync.integrations.console
        print(json.dumps([clerk_sync.__file__, clerk_sync.integrations.console.__file__, clerk_sync.__version__,
                          sys.prefix]))
    """), "import clerk_sync")
    package, console, version, prefix = json.loads(proc.stdout)
    venv_dir = installed.python.parent.parent
    for path in (package, console):
        assert Path(path).resolve().is_relative_to(venv_dir.resolve()), path
        assert not Path(path).resolve().is_relative_to(REPO), path
    assert Path(prefix).resolve() == venv_dir.resolve()
    assert version == installed.wheel.name.split("-")[1]


def test_the_console_script_and_every_command_answer_help(installed: Installed) -> None:
    top = _check(installed.run(installed.script, "--help"), "clerk-sync --help")
    # Every command and subcommand, found in the installed app (one process: a second each, one by one).
    proc = _check(installed.python_code("""
        import json
        import typer.main
        from typer.testing import CliRunner
        from clerk_sync.cli import app

        def paths(group, prefix=()):
            for name, command in sorted(group.commands.items()):
                yield (*prefix, name)
                if hasattr(command, "commands"):
                    yield from paths(command, (*prefix, name))

        runner = CliRunner()
        out = {}
        for path in paths(typer.main.get_command(app)):
            result = runner.invoke(app, [*path, "--help"])
            usage = "Usage:" in result.output
            out[" ".join(path)] = [result.exit_code if usage else f"{result.exit_code}, no usage", result.output[-2000:]]
        print(json.dumps(out))
    """), "every command's --help")
    helps = json.loads(proc.stdout)
    assert {"migrate", "serve", "dev", "doctor", "hooks list", "users promote"} <= set(helps)
    assert all(name in top.stdout for name in helps if " " not in name)
    failed = {name: [code, output] for name, (code, output) in helps.items() if code != 0}
    assert failed == {}


def _versions(url: str, schema: str | None = None) -> list[str]:
    """The rows of clerk-sync's Alembic version table, read with the dev venv's SQLAlchemy."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            table = sa.table(migrations.VERSION_TABLE, sa.column("version_num"), schema=schema)
            return list(conn.scalars(sa.select(table.c.version_num)))
    finally:
        engine.dispose()


def test_migrate_brings_a_new_sqlite_file_to_the_head_revision(installed: Installed) -> None:
    url = f"sqlite:///{installed.cwd / f'fresh-{uuid.uuid4().hex[:8]}.db'}"
    _check(installed.run(installed.script, "migrate", env={"DATABASE_URL": url}), "clerk-sync migrate")
    # The source tree's head: a revision file the wheel lacks leaves the installed package behind it.
    assert _versions(url) == [migrations.head_revision()]


@pytest.mark.postgres
def test_migrate_on_postgresql_through_the_postgres_extra(installed: Installed) -> None:
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    schema = f"t_wheel_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        _check(installed.run(installed.script, "migrate", env={"DATABASE_URL": pg_schema_url(schema)}),
               "clerk-sync migrate (PostgreSQL)")
        assert _versions(PG_URL, schema) == [migrations.head_revision()]
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_the_console_renders_its_templates_and_static_files_from_the_installed_package(installed: Installed) -> None:
    db = installed.cwd / f"console-{uuid.uuid4().hex[:8]}.db"
    proc = _check(installed.python_code(f"""
        import json
        from starlette.testclient import TestClient
        from clerk_sync import migrations
        from clerk_sync.config import Settings
        from clerk_sync.integrations.console import create_console
        from clerk_sync.store import Store

        store = Store.from_url({f"sqlite:///{db}"!r})
        migrations.upgrade(store.engine)
        settings = Settings.from_env({{"CLERK_SYNC_CONSOLE": "1", "CLERK_SYNC_CONSOLE_TOKEN": {OPERATOR_TOKEN!r}}})
        auth = {{"Authorization": "Bearer {OPERATOR_TOKEN}"}}
        out = {{}}
        with TestClient(create_console(store, settings)) as client:
            for path in ("/", "/deliveries", "/users", "/audit", "/login", "/static/console.css",
                         "/static/console.js"):
                r = client.get(path, headers=auth)
                out[path] = [r.status_code, r.text[:4000]]
        store.dispose()
        print(json.dumps(out))
    """), "render the console")
    pages = json.loads(proc.stdout)
    assert {path: status for path, (status, _) in pages.items()} == dict.fromkeys(pages, 200)
    assert "<title>Overview" in pages["/"][1]
    assert "<title>" in pages["/deliveries"][1] and "<title>" in pages["/login"][1]
    for name in ("console.css", "console.js"):  # the files themselves, not some fallback answer
        assert pages[f"/static/{name}"][1] == (PACKAGE / "integrations/console/static" / name).read_text()[:4000]


def test_a_missing_extra_is_named_on_import(installed: Installed) -> None:
    proc = _check(installed.python_code("""
        import importlib, json
        out = {}
        for module in ("clerk_sync.integrations.flask", "clerk_sync.integrations.fastapi",
                       "clerk_sync.integrations.django"):
            try:
                importlib.import_module(module)
                out[module] = None
            except ImportError as exc:
                out[module] = str(exc)
        print(json.dumps(out))
    """), "import the framework integrations")
    said = json.loads(proc.stdout)
    # Only the postgres extra is installed: each framework names the extra that brings it.
    assert said == {
        "clerk_sync.integrations.flask": "clerk_sync.integrations.flask needs Flask: pip install 'clerk-sync[flask]'",
        "clerk_sync.integrations.fastapi": "clerk_sync.integrations.fastapi needs FastAPI: "
                                           "pip install 'clerk-sync[fastapi]'",
        "clerk_sync.integrations.django": "clerk_sync.integrations.django needs Django: pip install 'clerk-sync[django]'",
    }
