"""A DATABASE_URL query option the driver refuses is a setting to fix, said in one line (exit 2).

Before: the MySQL drivers' TypeError at connect (``?sslmode=require``, PostgreSQL's spelling; ``?bogus=1``) and
SQLAlchemy's ValueError (``?connect_timeout=abc``) were tracebacks with exit 1 ("work left undone"); psycopg's
"invalid connection option" got the advice to check the mapping's column types. And the error line was wrapped
at 80 columns whenever stderr was not a terminal (a pod's log: one error in several records)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import SECRET

CLI = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]


def _run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_")) and k != "COLUMNS"}
    env.update({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)


def _with(url: str, option: str) -> str:
    return url + ("&" if "?" in url else "?") + option


@pytest.mark.parametrize("db_url", [pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
@pytest.mark.parametrize("option", ["sslmode=require", "bogus=1", "connect_timeout=abc"])
def test_a_mysql_url_option_the_driver_refuses_is_one_line_and_exit_2(db_url: str, option: str) -> None:
    for command in (["migrate"], ["doctor", "--freshness"], ["hooks", "list"]):
        said = _run(_with(db_url, option), *command)
        assert said.returncode == 2, (command, said.stdout, said.stderr)
        assert "Traceback" not in said.stderr, said.stderr
        assert option.split("=")[0] in said.stderr and "correct or remove the query option" in said.stderr, said.stderr


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_misspelt_postgres_url_option_is_not_taken_for_the_mappings_column_types(db_url: str) -> None:
    said = _run(_with(db_url, "sslmod=disable"), "doctor", "--freshness")
    assert said.returncode == 2, said.stderr
    assert 'invalid connection option "sslmod"' in said.stderr and "correct or remove" in said.stderr, said.stderr
    assert "column types" not in said.stderr, said.stderr


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
@pytest.mark.parametrize("option", ["sslmode=bogus", "target_session_attrs=bogus", "options=-cbogus_guc%3D1"])
def test_a_postgres_url_option_value_refused_is_exit_2_not_retry_later(db_url: str, option: str) -> None:
    """Review finding: a value libpq refuses (``sslmode=bogus``) or a setting the server refuses
    (``options=-c...``) came with no SQLSTATE, so it was taken for a database that is down: exit 3 and "retry
    once it answers", which a cron or a deploy step retries for ever. It is a setting to fix: exit 2."""
    url = _with(db_url, option)
    if option.startswith("options"):  # (the schema's search_path is an options= too: a second one replaces it)
        url = db_url.split("?")[0] + "?" + option
    for command in (["migrate"], ["doctor", "--freshness"]):
        said = _run(url, *command)
        assert said.returncode == 2, (command, said.stdout, said.stderr)
        assert "Traceback" not in said.stderr and "retry once it answers" not in said.stderr, said.stderr
        assert "DATABASE_URL" in said.stderr, said.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_error_line_is_one_line_through_a_pipe(db_url: str, tmp_path: Path) -> None:
    deep = tmp_path / ("a-very-long-directory-name-for-the-database-files-of-this-service-" + "x" * 40) / "sub"
    said = _run(sa.engine.URL.create("sqlite", database=str(deep / "x.db")).render_as_string(), "migrate")
    assert said.returncode == 2, said.stderr
    (line,) = [line for line in said.stderr.splitlines() if line.strip()]  # one record in a log
    assert line.startswith("error:") and f"mkdir -p {deep}" in line, line


@pytest.mark.parametrize("args", [["serve", "--port", "70000"], ["serve", "--port", "-1"], ["serve", "--workers", "0"],
                                  ["emulate", "--port", "70000"], ["dev", "--port", "70000"]])
def test_a_port_or_worker_count_out_of_range_is_refused_by_the_argument_parser(args: list[str]) -> None:
    """Before: ``bind(): port must be 0-65535`` as a traceback (exit 1, "undone"), or ``--workers 0`` served with
    one worker without a word."""
    said = _run("sqlite:///unused.db", *args)
    assert said.returncode == 2, said.stderr
    assert "Traceback" not in said.stderr and f"Invalid value for '{args[1]}'" in said.stderr, said.stderr


@pytest.mark.parametrize("command", [["doctor"], ["doctor", "--freshness"]])
def test_doctor_on_a_sqlite_file_that_does_not_exist_says_so_and_creates_nothing(tmp_path: Path,
                                                                                 command: list[str]) -> None:
    """Before: doctor opened it (SQLite made an empty file there) and said "schema at nothing: run `clerk-sync
    migrate`", which built a second, empty database at the mistyped path."""
    typo = tmp_path / "typo.db"
    said = _run(f"sqlite:///{typo}", *command)
    assert said.returncode == (1 if command == ["doctor"] else 2), said.stdout + said.stderr
    assert f"the SQLite file {typo} does not exist (nothing was created)" in " ".join(
        (said.stdout + said.stderr).split()), said.stdout + said.stderr
    assert not typo.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["replay"], ["dismiss", "msg_1", "--reason", "r"], ["prune"],
                                     ["prune", "--dry-run"], ["users", "promote", "a@example.com"],
                                     ["users", "erase", "user_1"], ["users", "retry-pending"], ["reconcile"],
                                     ["hooks", "list"], ["hooks", "retry", "--all"], ["hooks", "purge", "--all"]])
def test_a_command_on_a_sqlite_file_that_does_not_exist_says_so_and_creates_nothing(tmp_path: Path,
                                                                                    command: list[str]) -> None:
    """As doctor's: before, each of these opened the mistyped path (SQLite made an empty file there) and said the
    schema was not current, whose advice (`clerk-sync migrate`) built a second, empty database there."""
    typo = tmp_path / "typo.db"
    said = _run(f"sqlite:///{typo}", *command)
    assert said.returncode == 2, said.stdout + said.stderr
    assert "Traceback" not in said.stderr, said.stderr
    assert f"the SQLite file {typo} does not exist (nothing was created)" in " ".join(said.stderr.split()), \
        said.stderr
    assert not typo.exists() and list(tmp_path.iterdir()) == []


def test_migrate_still_creates_a_new_installs_sqlite_file(tmp_path: Path) -> None:
    """The refusal is for commands that need the database there: ``migrate`` is how a new install makes it."""
    new = tmp_path / "new.db"
    said = _run(f"sqlite:///{new}", "migrate")
    assert said.returncode == 0, said.stdout + said.stderr
    assert new.exists()
    assert _run(f"sqlite:///{new}", "hooks", "list").returncode == 0


@pytest.mark.parametrize("db_url", [pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_an_apps_own_do_connect_listener_still_sets_the_credentials(db_url: str) -> None:
    """The refusals' wrapper must not answer the connect itself: SQLAlchemy stops at the first ``do_connect``
    listener that returns a connection, and an app's (an IAM token, a rotated password) would never run."""
    from sqlalchemy import event

    from clerk_sync.store import Store

    real = sa.make_url(db_url)
    store = Store.from_url(real.set(username="cs_no_such_user", password="stale").render_as_string(False))
    called: list[str] = []

    @event.listens_for(store.engine, "do_connect")
    def _credentials(dialect: object, record: object, cargs: object, cparams: dict[str, object]) -> None:
        called.append("yes")
        cparams["user"] = real.username
        cparams.pop("passwd", None)
        cparams.pop("password", None)

    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        store.dispose()
    assert called == ["yes"]


@pytest.mark.parametrize("db_url", [pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_an_engine_keyword_mistake_is_not_blamed_on_database_url(db_url: str) -> None:
    from clerk_sync.store import create_engine

    with pytest.raises(TypeError, match="pool_sizee"):
        create_engine(db_url, pool_sizee=5)


def test_migrate_backfill_without_a_mapping_is_refused_before_any_step(tmp_path: Path) -> None:
    """Before: the migrations ran, then the flag was refused (exit 2 after the schema had changed)."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    said = _run(url, "migrate", "--backfill")
    assert said.returncode == 2 and "--backfill needs --mapping" in said.stderr, said.stderr
    assert "nothing was migrated" in " ".join(said.stderr.split())
    assert not (tmp_path / "app.db").exists()


def test_doctor_freshness_with_a_mapping_is_refused_not_ignored(tmp_path: Path) -> None:
    """Before: exit 0, the mapping never loaded (``--mapping nosuch:X`` passed too)."""
    said = _run(f"sqlite:///{tmp_path / 'app.db'}", "doctor", "--freshness", "--mapping", "nosuch:X")
    assert said.returncode == 2 and "--freshness does not check a mapping" in said.stderr, said.stderr


@pytest.mark.parametrize("args", [["users", "erase", "user_\udcff"], ["dismiss", "msg_\udcff"],
                                  ["hooks", "purge", "--hook", "\udcff"]])
def test_an_argument_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    """Before: ``UnicodeEncodeError: surrogates not allowed`` from the driver, a traceback with exit 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    raw = [os.fsencode(a) for a in args]  # (as a shell in another encoding passes them: \xff, not UTF-8)
    said = subprocess.run([os.fsencode(sys.executable), b"-c", b"from clerk_sync.cli import main; main()", *raw],
                          env=env, capture_output=True, text=True, timeout=60)
    assert said.returncode == 2 and "Traceback" not in said.stderr, said.stderr
    assert "is not valid UTF-8" in said.stderr and "\\xff" in said.stderr, said.stderr


@pytest.mark.parametrize("url", ["mysql+mysqldb://root@127.0.0.1:abc/test", "sqlite+nosuch:///x.db"])
def test_doctor_on_a_malformed_database_url_still_runs_its_other_checks(url: str) -> None:
    """Review: the missing-file check ran outside doctor's guard, so a malformed URL ended doctor at once."""
    said = _run(url, "doctor")
    assert said.returncode == 1, said.stdout + said.stderr
    assert "FAIL  database: cannot reach the database" in said.stdout and "webhook secret" in said.stdout, said.stdout
