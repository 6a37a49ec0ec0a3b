"""Alembic migrations for the contract tables, plus the helpers the CLI and ``/readyz`` use.

clerk-sync keeps its revision in a version table of its own, :data:`VERSION_TABLE`, not Alembic's default
``alembic_version``: the app on the same ``DATABASE_URL`` (the README recommends it) may run Alembic or
Flask-Migrate itself, and both would read and write one table, each finding the other's revision unknown.
Databases migrated by a release before this one are adopted from ``alembic_version`` once (:func:`adopt`), which
keeps its row for the old release's replicas (a rolling upgrade) until the operator removes it.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection, Engine

from clerk_sync._db_errors import (
    BINLOG_TRIGGER_ADVICE,
    PRIVILEGE_ADVICE,
    is_binlog_trigger_refusal,
    is_insufficient_privilege,
)
from clerk_sync.errors import ConfigError, StoreError
from clerk_sync.store import READ_ONLY_OPTION, dialect_family

# (The public API pinned in tests/test_package.py; VERSION_TABLE, MigrationError (a StoreError), schema_state
# and Upgraded (what upgrade returns) are for clerk-sync's own commands and /readyz.)
__all__ = ["Upgraded", "current_revision", "head_revision", "is_current", "upgrade", "upgrading"]

_HERE = Path(__file__).parent

#: clerk-sync's own Alembic version table (the app's Alembic keeps ``alembic_version``).
VERSION_TABLE = "clerk_sync_alembic_version"
#: Where releases before :data:`VERSION_TABLE` kept clerk-sync's revision (Alembic's default).
LEGACY_VERSION_TABLE = "alembic_version"
# Tables clerk-sync's first migration creates: a revision of ours in ``alembic_version`` is adopted only
# beside them (an app's own Alembic may use ids such as '0005' too).
_FIRST_TABLES = ("users", "organizations", "organization_memberships", "webhook_events")
_log = structlog.get_logger("clerk_sync.migrations")
_PROGRESS = "clerk_sync_progress"  # Config.attributes key: what env.py reports of the run (see upgrade)

# Alembic's ``context`` (env.py's) is one per process: two threads migrating at once break each other
# (KeyError: 'config'); processes and replicas serialize on the database's lock (env.py).
_RUN_LOCK = threading.Lock()

SchemaState = Literal["current", "behind", "newer"]


class MigrationError(StoreError):
    """A migration step (or Alembic) failed: the message names the migration, the database's cause and what
    to do. A :class:`StoreError`: ``serve`` retries it in the background (a lock wait that ran out passes)."""

    def __init__(self, message: str, revision: str | None = None) -> None:
        super().__init__(message)
        self.revision = revision


class Upgraded(NamedTuple):
    """What :func:`upgrade` did: the revision the database was at (None: no clerk-sync tables yet) and the
    steps it applied, in order (none: it was current already, or a replica migrated it meanwhile)."""

    start: str | None
    steps: tuple[str, ...]

    def summary(self) -> str:
        """One line for a command's output: ``migrated 0015 -> 0017 (2 steps)``, ``already current (0017)``."""
        if not self.steps:
            return f"already current ({self.start})" if self.start else "nothing to apply"
        count = f"{len(self.steps)} step{'s' if len(self.steps) > 1 else ''}"
        if self.start is None:
            return f"migrated a new database to {self.steps[-1]} ({count})"
        return f"migrated {self.start} -> {self.steps[-1]} ({count})"


def _config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


#: PostgreSQL: the waits before `upgrade` runs the whole upgrade again after it lost a deadlock to live traffic
#: (a delivery writes ``webhook_events`` then ``users``; the upgrade locks ``users`` in 0006, then needs
#: ``webhook_events``). The upgrade is one transaction, so nothing was applied; after the last, the error says so.
DEADLOCK_BACKOFF_S = (0.5, 1.0, 2.0)
_sleep = time.sleep  # (a test waits for its own traffic to finish instead)


_UPGRADES_RUNNING = [0]  # upgrade() calls in progress in this process (see upgrading)
_UPGRADES_LOCK = threading.Lock()


def upgrading() -> bool:
    """Whether an :func:`upgrade` on MySQL/MariaDB runs in this process now: ``serve``'s exit timer waits for it
    rather than end the process in the middle of DDL (theirs is not transactional: a schema left half-migrated).
    PostgreSQL's and SQLite's DDL roll back whole: an upgrade there, or one still connecting to an unreachable
    host, does not hold a stopping ``serve`` past its bound (review: a SIGTERM waited out the connect timeout)."""
    return _UPGRADES_RUNNING[0] > 0


def upgrade(engine: Engine, revision: str = "head") -> Upgraded:
    """Apply migrations up to ``revision``: see :func:`_upgrade` (counted for :func:`upgrading` on MySQL/MariaDB)."""
    counted = dialect_family(engine.dialect) == "mysql"
    if counted:
        with _UPGRADES_LOCK:
            _UPGRADES_RUNNING[0] += 1
    try:
        return _upgrade(engine, revision)
    finally:
        if counted:
            with _UPGRADES_LOCK:
                _UPGRADES_RUNNING[0] -= 1


def _upgrade(engine: Engine, revision: str = "head") -> Upgraded:
    """Apply migrations up to ``revision`` (idempotent) and say which were applied, from which revision (read
    under the migration lock). A database at a revision this release does not know (a newer clerk-sync
    migrated it: a rolled-back deploy) is a :class:`ConfigError` that says so.

    A failed step is a :class:`MigrationError` naming it (``migration 0007 failed: <cause>; <what to do>``),
    as is any other refusal of Alembic's; a database that cannot be reached (before any step ran) stays the
    driver's ``SQLAlchemyError``, which every command already reports with "check DATABASE_URL". On PostgreSQL
    an upgrade that lost a deadlock to live traffic is run again, whole, after each of :data:`DEADLOCK_BACKOFF_S`
    (nothing of it was applied)."""
    for attempt, wait in enumerate((*DEADLOCK_BACKOFF_S, None), start=1):
        cfg = _config(engine)
        try:
            with _RUN_LOCK:
                command.upgrade(cfg, revision)
        except CommandError as exc:
            at = _newer_revision(engine)
            if at is not None:
                raise ConfigError(
                    f"the database is at migration {at!r}, which this clerk-sync does not know (its newest is "
                    f"{head_revision()!r}): a newer clerk-sync migrated it. Run that release (or newer), or restore "
                    "the database to a migration this one knows; `serve --no-migrate` starts without migrating"
                ) from None
            raise MigrationError(f"could not migrate: {_first_line(exc)}; `clerk-sync doctor` shows the schema's "
                                 "state, run `clerk-sync migrate` again once it is fixed") from exc
        except sa.exc.SQLAlchemyError as exc:
            progress: dict[str, Any] = cfg.attributes.get(_PROGRESS, {})
            if "start" not in progress:  # no step ran: the database did not answer, or its lock did not come
                raise
            failed = _next_step(progress["start"], progress["applied"])
            if _is_deadlock(exc) and engine.dialect.name == "postgresql" and wait is not None:
                _log.warning("migration_deadlock", migration=failed, attempt=attempt, retry_in_s=wait,
                             detail="lost a deadlock with live traffic; nothing was applied, the upgrade runs again")
                _sleep(wait)
                continue
            raise MigrationError(_step_failure(failed, exc, engine.dialect.name, attempts=attempt), failed) from exc
        progress = cfg.attributes.get(_PROGRESS, {})
        return Upgraded(progress.get("start"), tuple(progress.get("applied", ())))
    raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover


# The steps that create triggers on MySQL/MariaDB (the audit log's guards; 0013, 0014 and 0019 drop one and create
# its successor). With binary logging on (or a Galera node's emulated one), the server refuses CREATE TRIGGER (1419) to
# a role without SUPER unless log_bin_trust_function_creators is on (RDS and Aurora: off by default).
_MYSQL_TRIGGER_STEPS = frozenset({"0004", "0013", "0014", "0019"})
_TRIGGER_PROBE = "clerk_sync_trigger_probe"
_NO_SUCH_TABLE = "clerk_sync_no_such_table"  # (the probe's trigger is on a table that does not exist)


def _trigger_steps(start: str | None, destination: str | tuple[str, ...] | None) -> list[str] | None:
    """The steps from ``start`` to ``destination`` that create triggers on MySQL/MariaDB, or None when the range
    cannot be read here (a relative destination such as ``-2``, which Alembic resolves from ``start``)."""
    if isinstance(destination, str) and re.search(r"[+-]\d+$", destination):
        return None
    try:
        pending = {step.revision for step in _script().iterate_revisions(destination, start or "base")}
        return sorted(pending & _MYSQL_TRIGGER_STEPS)
    except (RevisionError, CommandError):
        pass
    try:  # a downgrade: 0019's, 0014's and 0013's create their predecessor's trigger again
        pending = {step.revision for step in _script().iterate_revisions(start, destination)}
        return sorted(pending & (_MYSQL_TRIGGER_STEPS - {"0004"}))
    except (RevisionError, CommandError):
        return None


def untrusted_trigger_steps(conn: Connection, start: str | None,
                            destination: str | tuple[str, ...] | None) -> list[str]:
    """``doctor``'s question: the steps from ``start`` to ``destination`` that create triggers, when this
    MySQL/MariaDB server logs binary (or is a Galera node) and does not trust routine creators (only a role with
    SUPER may then create them); [] otherwise. Reads three server variables, writes nothing."""
    steps = _trigger_steps(start, destination)
    if not steps:
        return []
    names = ", ".join(f"'{name}'" for name in _BINLOG_VARIABLES)  # (SHOW: a server without wsrep lacks it)
    variables: dict[str, str] = dict(conn.exec_driver_sql(f"SHOW VARIABLES WHERE Variable_name IN ({names})").all())
    return steps if refuses_untrusted_triggers(variables) else []


_BINLOG_VARIABLES = ("log_bin", "wsrep_on", "log_bin_trust_function_creators")


def refuses_untrusted_triggers(variables: Mapping[str, str]) -> bool:
    """Whether a server with these variables (``SHOW VARIABLES``: ``ON``/``OFF``) refuses CREATE TRIGGER to a role
    without SUPER: binary logging on, or a Galera node (``wsrep_on``, which emulates it with ``log_bin`` off), and
    routine creators not trusted. A variable the server lacks is off."""
    def on(name: str) -> bool:
        return str(variables.get(name, "OFF")).upper() in ("ON", "1")

    return (on("log_bin") or on("wsrep_on")) and not on("log_bin_trust_function_creators")


def refuse_untrusted_trigger_creation(conn: Connection, start: str | None,
                                      destination: str | tuple[str, ...] | None) -> None:
    """Before a MySQL/MariaDB upgrade (or downgrade) whose steps create triggers: a :class:`ConfigError` when the
    server will refuse them to this role (1419), so that no step runs. Without it the step fails half-done (MySQL
    cannot roll DDL back): 0004 leaves a table that makes the next ``migrate`` fail ("already exists"), and
    0013/0014 leave the audit log without its update guard (the old trigger dropped, its successor refused).

    Tried rather than deduced (which privilege passes the check differs between MySQL and MariaDB versions, and a
    Galera node refuses with ``log_bin`` off): a trigger on a table that does not exist, which both servers judge
    for 1419 before they look for the table. 1146 (no such table) means allowed; no table is created, no privilege
    beyond the steps' own is needed, nothing is left behind."""
    if start is not None and not _knows(start):
        return  # a newer release migrated it: the upgrade itself says so
    steps = _trigger_steps(start, destination)
    if steps == []:
        return
    if conn.exec_driver_sql("SELECT @@log_bin_trust_function_creators").scalar():
        return
    try:
        conn.exec_driver_sql(f"CREATE TRIGGER {_TRIGGER_PROBE} BEFORE INSERT ON {_NO_SUCH_TABLE} FOR EACH ROW "
                             "SET @clerk_sync_probe = 1")
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated:  # the connection lost: that, not a step's failure
            raise
        if not is_binlog_trigger_refusal(exc.orig):
            return  # 1146, the table missing: allowed (any other refusal is the steps' own to report)
        which = f"migrations {', '.join(steps)} create" if steps else "the migrations create"
        raise ConfigError(f"the database refuses to create triggers ({which} the audit log's guards): "
                          f"{BINLOG_TRIGGER_ADVICE}; nothing was changed, run `clerk-sync migrate` again once it is "
                          "set") from None
    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {_TRIGGER_PROBE}")  # (only if someone made that table)


def _is_deadlock(exc: sa.exc.SQLAlchemyError) -> bool:
    """PostgreSQL's 40P01, MySQL/MariaDB's 1213: the server broke a deadlock by rolling this transaction back."""
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
    return state == "40P01" or (len(args) > 0 and args[0] == 1213)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _next_step(start: str | None, applied: list[str]) -> str | None:
    """The step after the last one applied in this run (the history is linear)."""
    before = applied[-1] if applied else start
    for script in _script().walk_revisions():
        if script.down_revision == before:
            return script.revision
    return None


def _step_failure(revision: str | None, exc: sa.exc.SQLAlchemyError, dialect: str, attempts: int = 1) -> str:
    from clerk_sync._db_errors import store_error

    # store_error names the cause without SQL or values, and a lock wait that ran out in plain words; its
    # advice for the service ("run the migrations", "retry later") is not this command's.
    cause = str(store_error(exc))
    for advice in ("; nothing was applied, retry later", "; the schema is not current", f"; {PRIVILEGE_ADVICE}"):
        cause = cause.split(advice, 1)[0]
    what = f"migration {revision}" if revision else "a migration"
    if dialect in ("mysql", "mariadb"):
        kept = ("the migrations before it stay applied (MySQL cannot roll DDL back), and part of it may have: "
                "`clerk-sync migrate` continues from there")
    else:
        kept = "nothing was applied (the upgrade is one transaction)"
    if _is_deadlock(exc):
        tried = f" ({attempts} attempts)" if attempts > 1 else ""
        todo = (f"it deadlocked with live traffic{tried} (deliveries lock the inbox and users in the opposite "
                "order), not a fault of the schema: run `clerk-sync migrate` again")
    elif cause.startswith("database timeout"):
        todo = "another connection held a lock it needs (traffic on a large table?): run `clerk-sync migrate` again"
    elif is_binlog_trigger_refusal(getattr(exc, "orig", None)):  # (the probe before the upgrade passed: changed since)
        todo = f"{BINLOG_TRIGGER_ADVICE}; then run `clerk-sync migrate` again"
    elif is_insufficient_privilege(getattr(exc, "orig", None)):  # a runtime role's DATABASE_URL, most likely
        todo = ("migrations create and alter tables: run `clerk-sync migrate` as the role that owns them (the "
                "service's runtime role then starts without migrating: `serve --no-migrate`, or "
                "CLERK_SYNC_MIGRATE_ON_START=0; RUNBOOK, \"Least-privilege database roles\")")
    else:
        todo = "fix the cause, then run `clerk-sync migrate` again"
    taken = _taken_name(exc)
    if taken is not None:
        todo = f"{_names_taken([taken], dialect)}; {todo}"
        if dialect in ("mysql", "mariadb") and taken in _own_table_names():
            todo = (f"if an earlier `clerk-sync migrate` was interrupted in this step, {taken} is clerk-sync's own "
                    f"(MySQL and MariaDB commit each CREATE TABLE at once) and empty: DROP TABLE {taken}, then run "
                    f"`clerk-sync migrate` again. Otherwise {todo}")
    return f"{what} failed: {cause}; {kept}; {todo}"


# "relation "users" already exists" (PostgreSQL, 42P07), "Table 'users' already exists" (MySQL/MariaDB, 1050),
# "table users already exists" (SQLite): the name, when the message is in English.
_ALREADY_EXISTS = re.compile(r"""(?:relation|table|index)\s+["'`]?([^"'`\s]+)["'`]?\s+already exists""",
                             re.IGNORECASE)


def _taken_name(exc: sa.exc.SQLAlchemyError) -> str | None:
    """The table a migration step could not create because the database has one of that name already
    (PostgreSQL's 42P07, MySQL/MariaDB's 1050, SQLite's "already exists"); "" when the message (translated)
    does not say which; None for any other failure."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return None
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    args = getattr(orig, "args", ())
    errno = args[0] if args and isinstance(args[0], int) else None
    found = _ALREADY_EXISTS.search(str(orig))
    if state == "42P07" or errno == 1050 or (found and type(orig).__module__.startswith("sqlite3")):
        return found.group(1) if found else ""
    return None


def _own_table_names() -> list[str]:
    """The names of clerk-sync's own tables, its first ones first (the version table is not in the list)."""
    from clerk_sync.tables import metadata

    return [*_FIRST_TABLES, *sorted(name for name in metadata.tables if name not in _FIRST_TABLES)]


def _names_taken(names: list[str], dialect: str) -> str:
    """Which of clerk-sync's table names the app's tables hold, and the ways out: clerk-sync's tables in a
    schema (PostgreSQL) or database (MySQL/MariaDB) of their own, the app's table mapped by its qualified
    name; on SQLite, the app's table renamed."""
    # (the mapping's example names a table an app maps: users, organizations or organization_memberships)
    first = next((n for n in names if n in _FIRST_TABLES[:3]), "users")
    own = ", ".join(n for n in _own_table_names() if not n.startswith("clerk_sync_")) + " and clerk_sync_*"
    if any(names):  # (PostgreSQL's 42P07 is an index's name too: its indexes share the tables' namespace)
        kind = "table" if set(names) <= set(_own_table_names()) else "table or index"
        head = (f"the database already has a {kind} {', '.join(names)} that clerk-sync did not create: "
                f"clerk-sync's own tables need the names {own}")
    else:
        head = f"the database already has a table of a name clerk-sync's own tables need ({own})"
    indexes = [n for n in names if n and n not in _own_table_names()]
    again = "; on SQLite drop it and create it again under the new name" if dialect == "sqlite" else ""
    renamed = (f" (an index keeps its name when its table is renamed: rename {', '.join(indexes)} too, e.g. to "
               f"app_{indexes[0]}{again})" if indexes else "")
    if dialect == "postgresql":
        way = ("put clerk-sync's tables in a schema of their own (CREATE SCHEMA clerk_sync; then add "
               "?options=-csearch_path%3Dclerk_sync to clerk-sync's database URL) and, if the mapping writes your "
               f"table, name it with its schema (MappedTable(\"public.{first}\", ...)); or rename your table")
    elif dialect in ("mysql", "mariadb"):
        way = ("give clerk-sync a database of its own on the same server (CREATE DATABASE clerk_sync; point "
               "clerk-sync's database URL at it) and, if the mapping writes your table, name it with its database "
               f"(MappedTable(\"app.{first}\", ...), app being your database); or rename your table")
    else:
        way = (f"SQLite has no schemas to keep them apart: rename your table (ALTER TABLE {first} RENAME TO "
               f"app_{first}) and change your app and the mapping to that name")
    return f"{head}; {way}{renamed}"


def _refuse_taken_names(conn: Connection) -> None:
    """Before a first migration: the app's tables holding clerk-sync's table names, all of them at once and
    before anything is created (on MySQL/MariaDB a failed step's tables stay: DDL commits). Under the
    migration lock (:func:`adopt`): a replica migrating first is not taken for the app."""
    ours, left = _own_names_present(conn, sa.inspect(conn))
    taken = [name for name in ours if name not in left] + _taken_index_names(conn, exclude_tables=left)
    if taken:
        raise ConfigError(f"could not migrate (nothing was created): {_names_taken(taken, conn.dialect.name)}; "
                          "then run `clerk-sync migrate` again")
    _refuse_interrupted_first_run(ours, left)


def _own_names_present(conn: Connection, inspector: Any) -> tuple[list[str], list[str]]:
    """clerk-sync's table names the connection's schema holds (PostgreSQL: where CREATE TABLE writes, not all
    of the search_path), and those of them an interrupted first migration left (MySQL/MariaDB)."""
    schema = conn.dialect.default_schema_name
    existing = set(inspector.get_table_names(schema=schema))
    ours = [name for name in _own_table_names() if name in existing]
    return ours, _left_by_an_interrupted_first_run(conn, inspector, ours, schema)


def _refuse_interrupted_first_run(ours: Sequence[str], left: Sequence[str]) -> None:
    """MySQL/MariaDB commit each CREATE TABLE: a first `clerk-sync migrate` stopped part-way leaves the tables
    it made (``left``), with no revision recorded. Said as such, with the DROPs (not blamed on the app, nor
    answered with "record the revision": the first migration is not complete)."""
    if not left or len(left) < len(ours):  # (any table of those names not shaped like ours: the app's)
        return
    drops = "; ".join(f"DROP TABLE {name}" for name in reversed(left))
    raise ConfigError(
        f"could not migrate: the database has clerk-sync's own tables {', '.join(left)}, empty, but no migration "
        "is recorded: an earlier `clerk-sync migrate` was interrupted during its first migration (MySQL and "
        f"MariaDB commit each CREATE TABLE at once, so what it made stayed). Drop them ({drops}), then run "
        "`clerk-sync migrate` again")


def _left_by_an_interrupted_first_run(conn: Connection, inspector: Any, names: Sequence[str],
                                      schema: str | None) -> list[str]:
    """Of ``names`` (clerk-sync's table names present), those shaped like clerk-sync's own, on MySQL/MariaDB."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        return []  # (transactional DDL: a failed first migration leaves nothing)
    left = [name for name in names if _shaped_like_ours(conn, inspector, name, schema)]
    # The first migration creates _FIRST_TABLES first, each with its unique key (clerk_id, svix_id): without one
    # of those among them, an empty table of few columns (an app's audit_log) is not taken for a leftover.
    return left if any(name in _FIRST_TABLES for name in left) else []


def _shaped_like_ours(conn: Connection, inspector: Any, name: str, schema: str | None) -> bool:
    """Whether table ``name`` is one an interrupted first migration made: empty (nothing writes before the
    first migration ends), with columns of clerk-sync's table of that name only (its first migration's are a
    part of today's), its unique keys' among them (``clerk_id``, ``svix_id``: an app's empty ``users(id, email,
    first_name)`` has no such column), not an app's table (columns of its own, or rows)."""
    from clerk_sync.tables import metadata

    table = metadata.tables[name]
    ours = {c.name for c in table.columns}
    keys = {c.name for u in table.constraints if isinstance(u, sa.UniqueConstraint) for c in u.columns}
    present = {c["name"] for c in inspector.get_columns(name, schema=schema)}
    if not keys <= present <= ours:
        return False
    return conn.execute(sa.select(sa.literal(1)).select_from(sa.table(name)).limit(1)).first() is None


def _taken_index_names(conn: Connection, *, exclude_tables: Sequence[str]) -> list[str]:
    """Indexes (PostgreSQL: and constraints, which share a schema's namespace with tables) of the app's holding
    names clerk-sync's first migration gives its own (``ix_users_email``: SQLAlchemy's default name for an
    app's indexed ``users.email`` too, kept when the table is renamed). MySQL/MariaDB name indexes per table."""
    from clerk_sync.tables import metadata

    ours: set[str] = {str(i.name) for t in metadata.tables.values() for i in t.indexes if i.name}
    if conn.dialect.name == "postgresql":
        ours |= {str(c.name) for t in metadata.tables.values() for c in t.constraints if c.name}
        rows = conn.execute(sa.text("SELECT c.relname, t.relname FROM pg_class c JOIN pg_index i ON i.indexrelid = "
                                    "c.oid JOIN pg_class t ON t.oid = i.indrelid WHERE c.relnamespace = "
                                    "current_schema()::regnamespace")).all()
    elif conn.dialect.name == "sqlite":
        rows = conn.execute(sa.text("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")).all()
    else:
        return []
    return sorted(index for index, table in rows if index in ours and table not in exclude_tables)


def _knows(revision: str) -> bool:
    try:
        return _script().get_revision(revision) is not None
    except CommandError:  # (alembic's "Can't locate revision")
        return False


def downgrade(engine: Engine, revision: str) -> None:
    with _RUN_LOCK:
        command.downgrade(_config(engine), revision)


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


@functools.cache
def head_revision() -> str | None:
    return _script().get_current_head()


def _heads(conn: Connection) -> tuple[str, ...]:
    heads = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_heads()
    if heads:
        return heads
    legacy = legacy_revision(conn)
    return (legacy,) if legacy is not None else ()


def _read(engine: Engine) -> tuple[str, ...]:
    # A reader's connection: on SQLite it must not take the write lock (``/readyz`` runs this).
    with engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as conn:
        return _heads(conn)


def current_revision(engine: Engine) -> str | None:
    """The revision in :data:`VERSION_TABLE`; before the first migration of this release, the revision of
    clerk-sync's in ``alembic_version`` that :func:`adopt` will move (the schema is at it meanwhile)."""
    heads = _read(engine)
    if len(heads) > 1:
        raise CommandError(f"clerk-sync's version table {VERSION_TABLE} holds several revisions: {', '.join(heads)}")
    return heads[0] if heads else None


def schema_state(engine: Engine) -> tuple[SchemaState, str | None]:
    """``("current", head)`` at this release's head; ``("newer", revision)`` at a revision this release does not
    know: a newer clerk-sync migrated the database (a rolling deploy under way, or rolled back), whose schema
    this release still runs on; ``("behind", revision or None)`` otherwise: `clerk-sync migrate` is due."""
    return state_of(_read(engine))


def state_of(heads: Sequence[str]) -> tuple[SchemaState, str | None]:
    """:func:`schema_state` of the revisions read from :data:`VERSION_TABLE` (for a reader that reads them with
    other values in one round trip: the scrape-time freshness read)."""
    if len(heads) != 1:  # none (a new database), or several: not a state any release of ours leaves
        return "behind", ", ".join(heads) or None
    at = heads[0]
    if at == head_revision():
        return "current", at
    return ("behind" if _knows(at) else "newer"), at


def is_current(engine: Engine) -> bool:
    """The schema has what this release needs: at its head, or newer (a newer release migrated it, as during
    a rolling deploy). False when a migration of this release has yet to run."""
    return schema_state(engine)[0] != "behind"


def _newer_revision(engine: Engine) -> str | None:
    """A revision in the version table this release does not know, or None (also when it cannot be read)."""
    try:
        heads = _read(engine)
    except (sa.exc.SQLAlchemyError, CommandError):
        return None
    return next((h for h in heads if not _knows(h)), None)


def legacy_revision(conn: Connection) -> str | None:
    """clerk-sync's revision in ``alembic_version``, as releases before :data:`VERSION_TABLE` kept it: the table
    holds exactly one row, a revision of clerk-sync's, and clerk-sync's first tables exist. Anything else there
    is the app's own Alembic (its ids may look like ours, such as '0005'): None."""
    inspector = sa.inspect(conn)
    if not _readable_table(inspector, LEGACY_VERSION_TABLE):
        return None
    legacy = sa.table(LEGACY_VERSION_TABLE, sa.column("version_num", sa.String(32)))
    rows = list(conn.execute(sa.select(legacy.c.version_num)).scalars())
    if len(rows) != 1 or not _knows(rows[0]):
        return None
    if not all(inspector.has_table(name) for name in _FIRST_TABLES) or not _has_our_inbox(inspector):
        return None
    return str(rows[0])


def _readable_table(inspector: Any, name: str) -> bool:
    """``name`` exists and this role may read it. MySQL/MariaDB answer a role granted privileges table by table
    (RUNBOOK, least-privilege roles) 1142 for any other table, there or not (SQLAlchemy's ``has_table`` raises it):
    the app's ``alembic_version`` is none of the runtime role's business, so for it that table is not there."""
    try:
        return bool(inspector.has_table(name))
    except sa.exc.DBAPIError as exc:
        if is_insufficient_privilege(exc.orig):
            return False
        raise


def _has_our_inbox(inspector: Any) -> bool:
    """clerk-sync's ``webhook_events`` (its ``svix_id``), not an app's table of a common name."""
    return bool(inspector.has_table("webhook_events")) and \
        "svix_id" in {c["name"] for c in inspector.get_columns("webhook_events")}


def _refuse_unversioned_tables(conn: Connection) -> None:
    """clerk-sync's inbox exists but no revision says how far it was migrated (none of ours, none to adopt: an
    ``alembic_version`` of several rows, as when an app's Alembic ran clerk-sync's scripts as a branch). Left
    to run, the upgrade would start from 0001 and fail on a table that exists, at every start; the fix is one
    row, which only the operator can tell."""
    inspector = sa.inspect(conn)
    if not _has_our_inbox(inspector):
        return  # a new database, or an app's tables of the same names: migrate from the start
    _refuse_interrupted_first_run(*_own_names_present(conn, inspector))
    found = ""
    if inspector.has_table(LEGACY_VERSION_TABLE):
        legacy = sa.table(LEGACY_VERSION_TABLE, sa.column("version_num", sa.String(32)))
        rows = sorted(str(r) for r in conn.execute(sa.select(legacy.c.version_num)).scalars())
        found = f" ({LEGACY_VERSION_TABLE} holds {rows}, which is not one revision of clerk-sync's alone)"
    raise ConfigError(  # (the SQL below is advice printed for the operator, never run)
        f"clerk-sync's tables exist but no migration revision of clerk-sync's says how far they were migrated"  # noqa: S608
        f"{found}. Record the revision they are at: INSERT INTO {VERSION_TABLE} (version_num) VALUES ('<rev>') "
        f"(clerk-sync's revisions are 0001 to {head_revision()}; if {LEGACY_VERSION_TABLE} holds one of them for "
        f"clerk-sync, move that one and delete it there), then run `clerk-sync migrate` again")


def adopt(conn: Connection) -> str | None:
    """Copy clerk-sync's revision from ``alembic_version`` into :data:`VERSION_TABLE`, once: when ours holds no
    revision and ``alembic_version`` holds exactly one of clerk-sync's beside its tables
    (:func:`legacy_revision`). Returns the revision adopted, or None. A database with no revision of
    clerk-sync's at all is checked for the app's tables holding its names first (:func:`_refuse_taken_names`).

    env.py runs this under the migration lock, in the migration's transaction: concurrent starts adopt once
    (the next finds :data:`VERSION_TABLE` holding a revision). ``alembic_version`` is left as it was, row and
    all: the replicas of the release being upgraded from (0.2.0 and earlier) read their revision there. Their
    ``/readyz`` wants it at their head and their start-up migration would start from 0001 without it (``relation "users"
    already exists``), so removing it would take every old replica out of service the moment the upgrade
    commits, and stop any of them (re)starting. Their schema is a part of the new one (0006 onwards only add
    nullable or defaulted columns, tables and indexes), so they keep serving meanwhile. ``clerk-sync doctor``
    warns while the row is there and says how to remove it once no replica of those releases runs
    (:func:`legacy_leftover`); this release never reads it again once :data:`VERSION_TABLE` holds a revision.

    On MySQL/MariaDB the ``CREATE TABLE`` commits on its own, the row with it or with the migration. Stopped in
    between, our table is there but empty, ``alembic_version`` intact: the next run adopts again."""
    ours = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    if ours.get_current_heads():
        return None
    revision = legacy_revision(conn)
    if revision is None:
        _refuse_unversioned_tables(conn)
        _refuse_taken_names(conn)  # (a database without clerk-sync's inbox: its first migration is next)
        return None
    ours.stamp(_script(), revision)  # creates the table (MigrationContext._ensure_version_table) with the row
    return revision


def legacy_leftover(conn: Connection) -> str | None:
    """The revision a release before :data:`VERSION_TABLE` (0.2.0 and earlier) kept in ``alembic_version``, still
    there once :data:`VERSION_TABLE` holds one: :func:`adopt` leaves it for that release's replicas during a rolling
    upgrade. None when there is none (or our table holds no revision yet: it is adopted at the next migrate).
    Read by :func:`legacy_revision`'s rules, so an app's own Alembic at a revision named like one of ours
    ('0005') beside clerk-sync's tables is taken for it too: the advice that goes with it says so."""
    if not MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_heads():
        return None
    return legacy_revision(conn)


def legacy_leftover_advice(revision: str) -> str:
    """What to do about :func:`legacy_leftover`'s row (``doctor``'s warning, the RUNBOOK's Upgrading section)."""
    table = LEGACY_VERSION_TABLE
    # (the SQL below is advice printed for the operator, never run)
    return (f"{table} still holds {revision!r}, where clerk-sync 0.2.0 and earlier read their revision: "  # noqa: S608
            "`clerk-sync migrate` left it so that their replicas stay ready and can restart during a rolling "
            "upgrade. Once no replica of such a release runs (and you will not roll back to one), remove it: "
            f"DELETE FROM {table} WHERE version_num = '{revision}'; and, if that leaves it empty, DROP TABLE "
            f"{table} (unless your app's own Alembic is at revision {revision!r} in that table: then the row is "
            "the app's, keep it)")
