"""``doctor``'s privileges line and ``/readyz``: what the database role DATABASE_URL names may do to clerk-sync's tables
(and the app's mapped ones), against what the webhook deliveries, the hook dispatcher (``serve --hooks``, ``worker``),
``reconcile``, ``prune`` and erasure, the console do, with the GRANT statements that give what is missing (RUNBOOK,
"Least-privilege database roles"). Each lack is said with who needs it: ``/readyz`` asks only what this process
writes (a ``serve --no-dispatch`` replica is not taken out of rotation for a DELETE only the dispatcher needs).

clerk-sync's own tables are asked by running what would need each privilege on no row (``INSERT .. SELECT .. WHERE
1 = 0``, ``UPDATE .. WHERE 1 = 0``, ``DELETE .. WHERE 1 = 0``), each in a transaction rolled back: the database
answers by its own rules (roles, wildcards, column grants), and nothing is written (they have no statement-level
triggers). The app's mapped tables are asked as :func:`clerk_sync.mapping.lacking_privileges` does: PostgreSQL's
catalog (no statement runs on the app's table, whose statement-level triggers would fire), MySQL/MariaDB's zero-row
statements (its triggers are FOR EACH ROW: none fires). PostgreSQL's serial sequences and TEMPORARY are asked of its
catalog functions; MySQL/MariaDB's database-wide privileges (CREATE TEMPORARY TABLES, LOCK TABLES) of ``SHOW GRANTS``
for the user and the roles it has in use (``information_schema`` alone shows a user's own grants, not a role's)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from clerk_sync import tables
from clerk_sync._db_errors import is_insufficient_privilege, is_schema_behind
from clerk_sync.mapping import (
    PG_SCHEMA_USAGE,
    PG_TABLE_SEQUENCES,
    MappedTable,
    SchemaMapping,
    lacking_privileges,
    mapped_privileges,
    mapped_reads,
)
from clerk_sync.migrations import VERSION_TABLE

__all__ = ["DELIVERIES", "DISPATCHER", "MISSING_TABLES_ADVICE", "Missing", "delivery_tables", "missing_privileges",
           "missing_tables", "outbox_refusals", "unusable_schemas"]

_WRITE = ("SELECT", "INSERT", "UPDATE", "DELETE")
DELIVERIES = "deliveries (serve's webhook path: answered 503 until granted)"
DISPATCHER = "the hook dispatcher (serve --hooks, worker)"
_PRUNE = "prune and users erase"
# Who needs what of clerk-sync's tables: each line of a lack names who (doctor), and /readyz asks only DELIVERIES'
# (and DISPATCHER's when the process dispatches). Tables not named: everything, for DELIVERIES.
_WHO: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "audit_log": ((("SELECT", "INSERT"), DELIVERIES), (("UPDATE", "DELETE"), _PRUNE)),
    "clerk_sync_erased": ((("SELECT",), DELIVERIES), (("INSERT", "UPDATE", "DELETE"), _PRUNE)),
    "hook_jobs": ((("INSERT",), DELIVERIES), (("SELECT", "UPDATE", "DELETE"), DISPATCHER)),
    "pending_role_changes": ((_WRITE, "the console's and the admin's role changes"),),
    "reconcile_runs": ((_WRITE, "reconcile"),),
    "reconcile_seen": ((_WRITE, "reconcile"),),
}


@dataclass
class Missing:
    """What the role lacks: ``needed`` are refusals that stop the service (each table's GRANT), ``optional``
    those of one command (``reconcile --dry-run``'s TEMPORARY table, ``users erase``'s LOCK TABLES)."""

    grants: list[str] = field(default_factory=list)  # the GRANT statements to run, as the owner
    needed: list[str] = field(default_factory=list)  # "hook_jobs: DELETE"
    optional: list[tuple[str, str]] = field(default_factory=list)  # (what, GRANT statement)


@dataclass(frozen=True)
class _Need:
    table: str
    schema: str | None
    privileges: tuple[str, ...]  # in the order a GRANT names them
    columns: tuple[str, ...]  # INSERT and UPDATE are asked of these (an app's mapped table: granted on them only)
    on_columns: bool = False  # the GRANT names the columns (INSERT (a, b), UPDATE (a, b))
    who: str = DELIVERIES  # who needs them (doctor's words; /readyz asks only what its process does)
    mapped: MappedTable | None = None  # the app's: asked as mapping.lacking_privileges does


def _needs(mapping: SchemaMapping | None, who: frozenset[str] | None = None) -> list[_Need]:
    """What the runtime needs, of those ``who`` needs (None: everyone)."""
    everything = ((_WRITE, DELIVERIES),)
    needs = [_Need(t.name, None, privileges, tuple(t.columns.keys()), who=need_by)
             for t in tables.metadata.sorted_tables for privileges, need_by in _WHO.get(t.name, everything)]
    needs.append(_Need(VERSION_TABLE, None, ("SELECT",), ()))
    for mapped in (mapping.tables.values() if mapping is not None else ()):
        privileges, written = mapped_privileges(mapped)
        needs.append(_Need(mapped.table, mapped.schema, privileges, written, on_columns=True, mapped=mapped))
    return [n for n in needs if who is None or n.who in who]


def missing_privileges(conn: Connection, mapping: SchemaMapping | None = None,
                       who: frozenset[str] | None = None) -> Missing:
    """What the connection's role lacks of what clerk-sync's runtime does (:class:`Missing`), of what ``who`` needs
    (:data:`DELIVERIES`, :data:`DISPATCHER`, ...; None: everyone, with the optional ones too)."""
    grantee = _grantee(conn)
    missing = Missing()
    needs = _needs(mapping, who)
    if conn.dialect.name == "postgresql":
        schemas = [*unusable_schemas(conn), *(n.schema for n in needs if n.schema and conn.execute(
            _USAGE, {"s": n.schema}).scalar() is False)]
        for schema in dict.fromkeys(schemas):
            missing.needed.append(f"schema {schema}: USAGE (its tables are asked once granted: ask again then)")
            missing.grants.append(f"GRANT USAGE ON SCHEMA {_quote(conn, schema)} TO {grantee};")
        if missing.needed:  # its tables cannot even be named: asked once it is granted
            return missing
    for need in needs:
        name = _table_name(conn, need)
        columns = [_quote(conn, c) for c in need.columns]
        if need.mapped is not None:
            lacking = lacking_privileges(conn, need.mapped)
        else:
            lacking = [p for p in need.privileges if _refused(conn, _probe(p, name, columns))]
        if not lacking:
            continue
        listed = ", ".join(columns)
        read = ", ".join(_quote(conn, c) for c in mapped_reads(conn, need.mapped)) if need.mapped is not None else ""
        parts = [f"{p} ({listed})" if need.on_columns and p in ("INSERT", "UPDATE") else
                 f"{p} ({read})" if need.on_columns and p == "SELECT" else p for p in lacking]
        missing.needed.append(f"{need.table}: {', '.join(parts)} (for {need.who})")
        missing.grants.append(f"GRANT {', '.join(parts)} ON {name} TO {grantee};")
    if conn.dialect.name == "postgresql":
        _postgres_extras(conn, needs, grantee, missing, optional=who is None)
    elif conn.dialect.name in ("mysql", "mariadb") and who is None:
        _mysql_extras(conn, grantee, missing)
    return missing


def missing_tables(conn: Connection) -> list[str]:
    """clerk-sync's tables the deliveries need that the database lacks (one catalog read). Asked only at this
    release's head: the version table then says migrated, so a table missing was dropped or left out of a partial
    restore, and `clerk-sync migrate` adds nothing. Without this, ``/readyz`` said ready on SQLite (and "database
    down" elsewhere) while every delivery failed, and ``doctor`` said ok. Only the deliveries' tables: MySQL/MariaDB
    hide a table from a role with no privilege on it at all (``reconcile_runs`` from a runtime role, say)."""
    present = set(sa.inspect(conn).get_table_names())
    absent = [name for name in delivery_tables() if name not in present]
    if conn.dialect.name in ("mysql", "mariadb"):  # hidden or gone? Only a read tells, when it may be told
        absent = [name for name in absent if _gone(conn, name)]
    return absent


def _gone(conn: Connection, table: str) -> bool:
    """MySQL/MariaDB: a table the catalog does not list is gone when a read says so (1146); refused (1142, which
    they answer for a table the role has no privilege on, there or not: the RUNBOOK's step of a new table to
    grant) it is no table to restore: the privileges probe says what to grant (review)."""
    try:
        conn.exec_driver_sql(_probe("SELECT", _quote(conn, table), []))
    except sa.exc.DBAPIError as exc:
        if is_insufficient_privilege(exc.orig):
            return False
        if is_schema_behind(exc.orig):
            return True
        raise
    return False


def delivery_tables() -> list[str]:
    """clerk-sync's own tables the deliveries write or read (not the version table: read on its own)."""
    return [n for n in dict.fromkeys(n.table for n in _needs(None, frozenset({DELIVERIES}))) if n != VERSION_TABLE]


MISSING_TABLES_ADVICE = ("the schema's version says migrated, so `clerk-sync migrate` adds nothing: restore them from "
                         "a backup (a partial restore or a table dropped by hand)")


def outbox_refusals(conn: Connection) -> tuple[list[str], str, sa.exc.DBAPIError | None]:
    """What a hook dispatcher may not do to ``hook_jobs`` (claim, extend, finish: SELECT, UPDATE, DELETE), the
    GRANT statement that gives it, and the database's first refusal (None: nothing lacking)."""
    need = _Need(tables.hook_jobs.name, None, ("SELECT", "UPDATE", "DELETE"), tuple(tables.hook_jobs.columns.keys()))
    name = _table_name(conn, need)
    columns = [_quote(conn, c) for c in need.columns]
    refusals = {p: _refusal(conn, _probe(p, name, columns)) for p in need.privileges}
    lacking = [p for p, refusal in refusals.items() if refusal is not None]
    if not lacking:
        return [], "", None
    return lacking, f"GRANT {', '.join(lacking)} ON {name} TO {_grantee(conn)};", refusals[lacking[0]]


_USAGE = sa.text(PG_SCHEMA_USAGE)  # (no row: no such schema)


def unusable_schemas(conn: Connection) -> list[str]:
    """PostgreSQL: the schemas of the ``search_path`` that exist but this role may not use (no USAGE): their tables
    are invisible to it, as if never created (a database that looks unmigrated). Empty elsewhere, and when
    clerk-sync's version table is visible (a schema of the path it does not use, the app's say, is not its need)."""
    if conn.dialect.name != "postgresql":
        return []
    if conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": VERSION_TABLE}).scalar_one():
        return []  # clerk-sync's tables are visible: another schema of the path is none of its business
    path = str(conn.exec_driver_sql("SHOW search_path").scalar_one())
    names = [n.strip().strip('"') for n in path.split(",") if n.strip() and n.strip() != '"$user"']
    return [n for n in names if conn.execute(_USAGE, {"s": n}).scalar() is False]


def _probe(privilege: str, name: str, columns: list[str]) -> str:
    """A statement needing ``privilege`` on table ``name`` (on each of ``columns``, for INSERT and UPDATE) that
    touches no row. (Names from clerk-sync's tables and the mapping, quoted: no value of anyone's.)"""
    if privilege == "SELECT":
        return f"SELECT 1 FROM {name} WHERE 1 = 0"  # noqa: S608
    if privilege == "DELETE":
        return f"DELETE FROM {name} WHERE 1 = 0"  # noqa: S608
    listed = ", ".join(columns)
    if privilege == "INSERT":  # (SELECT of the same columns: needed anyway; a NULL would be typed text)
        return f"INSERT INTO {name} ({listed}) SELECT {listed} FROM {name} WHERE 1 = 0"  # noqa: S608
    return f"UPDATE {name} SET {', '.join(f'{c} = NULL' for c in columns)} WHERE 1 = 0"  # noqa: S608


def _refused(conn: Connection, statement: str) -> bool:
    """Run ``statement`` in a transaction rolled back: True if the database refused it for a privilege."""
    return _refusal(conn, statement) is not None


def _refusal(conn: Connection, statement: str) -> sa.exc.DBAPIError | None:
    """:func:`_refused`, with the database's refusal."""
    outer = conn.begin_nested() if conn.in_transaction() else conn.begin()
    try:
        conn.exec_driver_sql(statement)
    except sa.exc.DBAPIError as exc:
        outer.rollback()
        if is_insufficient_privilege(exc.orig):
            return exc
        raise
    outer.rollback()
    return None


def _grantee(conn: Connection) -> str:
    if conn.dialect.name == "postgresql":
        return _quote(conn, str(conn.exec_driver_sql("SELECT current_user").scalar_one()))
    user, _, host = str(conn.exec_driver_sql("SELECT CURRENT_USER()").scalar_one()).rpartition("@")
    return f"'{user}'@'{host}'"


def _quote(conn: Connection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote(name))


def _table_name(conn: Connection, need: _Need) -> str:
    if need.mapped is not None:  # (its name may carry its schema: "public.accounts")
        return ".".join(_quote(conn, part) for part in need.table.split(".", 1))
    schema = need.schema
    if schema is None and conn.dialect.name in ("mysql", "mariadb"):  # a GRANT's own default is the session's
        schema = str(conn.exec_driver_sql("SELECT DATABASE()").scalar_one())
    table = _quote(conn, need.table)
    return f"{_quote(conn, schema)}.{table}" if schema else table


def _postgres_extras(conn: Connection, needs: list[_Need], grantee: str, missing: Missing, *, optional: bool) -> None:
    """USAGE of the sequences that number the tables' rows (serial columns, or a default naming a sequence: an INSERT
    calls nextval), and
    TEMPORARY on the database (``reconcile --dry-run``'s table, revoked from PUBLIC by careful set-ups)."""
    for need in needs:
        if "INSERT" not in need.privileges:
            continue
        rows = conn.execute(sa.text(PG_TABLE_SEQUENCES), {"t": _table_name(conn, need)}).all()
        for sequence, usage in rows:
            if not usage:
                missing.needed.append(f"{sequence}: USAGE (the sequence numbering {need.table}'s rows)")
                missing.grants.append(f"GRANT USAGE ON SEQUENCE {sequence} TO {grantee};")
    if not optional:
        return
    database = str(conn.exec_driver_sql("SELECT current_database()").scalar_one())
    if not conn.exec_driver_sql("SELECT has_database_privilege(current_database(), 'TEMPORARY')").scalar_one():
        missing.optional.append(("TEMPORARY on the database (`reconcile --dry-run` stages ids in a TEMPORARY table)",
                                 f"GRANT TEMPORARY ON DATABASE {_quote(conn, database)} TO {grantee};"))


def _mysql_extras(conn: Connection, grantee: str, missing: Missing) -> None:
    """CREATE TEMPORARY TABLES (``reconcile --dry-run``) and LOCK TABLES (``users erase``'s wait for deliveries
    in progress) on the database, as the role holds them itself or through the roles it has in use
    (:func:`_mysql_database_privileges`)."""
    held = _mysql_database_privileges(conn)
    database = _quote(conn, str(conn.exec_driver_sql("SELECT DATABASE()").scalar_one()))
    for privilege, why in (("CREATE TEMPORARY TABLES", "`reconcile --dry-run` stages ids in a TEMPORARY table"),
                           ("LOCK TABLES", "`users erase` waits for deliveries in progress with LOCK TABLES .. READ")):
        if privilege not in held and "ALL PRIVILEGES" not in held:
            missing.optional.append((f"{privilege} on the database ({why})",
                                     f"GRANT {privilege} ON {database}.* TO {grantee};"))


# A GRANT statement SHOW GRANTS prints: its privileges (column lists in parentheses) and what it is on. A role's own
# line ("GRANT `role` TO `user`@`%`") has no ON.
_GRANT_LINE = re.compile(r"^GRANT (?P<privileges>.+?) ON (?:(?:TABLE|FUNCTION|PROCEDURE|PACKAGE(?: BODY)?) )?"
                         r"(?P<database>\*|`(?:[^`]|``)*`|\w+)\.(?P<table>\*|`(?:[^`]|``)*`|\w+) TO ", re.DOTALL)


def _mysql_database_privileges(conn: Connection) -> set[str]:
    """The database-wide (and global) privileges this session holds on its database: what ``SHOW GRANTS`` says of
    the user and of each role in use (``information_schema.ENABLED_ROLES``: the default role, SET ROLE's, and the
    roles granted to those), with what ``information_schema`` lists for the user (MySQL). ``information_schema``
    alone shows the user's own grants, not those received through a MariaDB role: a false warning there."""
    held = set(conn.execute(sa.text(
        "SELECT PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES WHERE DATABASE() LIKE TABLE_SCHEMA "
        "UNION SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES")).scalars())
    database = str(conn.exec_driver_sql("SELECT DATABASE()").scalar_one())
    lines = [str(row[0]) for row in conn.exec_driver_sql("SHOW GRANTS")]
    try:
        roles = [str(role) for role in conn.exec_driver_sql(
            "SELECT ROLE_NAME FROM information_schema.ENABLED_ROLES").scalars() if role is not None]  # (none: NULL)
    except sa.exc.DBAPIError:  # a server without it (MySQL before 8.0.19): the user's own grants only
        roles = []
    for role in roles:
        try:  # (MariaDB lets a user see the grants of a role it has; a refusal leaves the role's out)
            lines += [str(row[0]) for row in conn.exec_driver_sql(f"SHOW GRANTS FOR {_quote_always(role)}")]
        except sa.exc.DBAPIError:
            continue
    for line in lines:
        grant = _GRANT_LINE.match(line)
        if grant is None or grant["table"] != "*":
            continue
        if grant["database"] != "*" and not _database_matches(_unquote(grant["database"]), database):
            continue
        listed = re.sub(r"\([^)]*\)", "", grant["privileges"])  # column lists: not a database-wide privilege
        held.update(p.strip().upper() for p in listed.split(","))
    return held


def _quote_always(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _unquote(name: str) -> str:
    return name[1:-1].replace("``", "`") if name.startswith("`") else name


def _database_matches(pattern: str, database: str) -> bool:
    """A GRANT's database name, whose ``_`` and ``%`` are wildcards unless escaped (``grants\\_x``), matches
    ``database``."""
    parts = re.findall(r"\\.|.", pattern, re.DOTALL)
    regex = "".join(re.escape(p[1]) if p.startswith("\\") and len(p) == 2 else
                    "." if p == "_" else ".*" if p == "%" else re.escape(p) for p in parts)
    return re.fullmatch(regex, database, re.DOTALL) is not None
