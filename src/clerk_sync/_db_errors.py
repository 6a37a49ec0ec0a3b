"""Database exceptions as clerk-sync's errors: transient (:class:`StoreError`, 503, retried) or a value
refused for good (:class:`StoreDataError`: the delivery is stored failed, or the app's mapped row
refused). One place, for the store's transactions and the outbox's guarded projection."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from clerk_sync.errors import StoreDataError, StoreError, StorePrivilegeMissing, database_message

__all__ = ["POOLER_ADVICE", "PRIVILEGE_ADVICE", "driver_cursor", "foreign_key_of", "is_foreign_key_violation",
           "is_insufficient_privilege", "is_pooler_misconfigured", "is_row_referenced", "is_schema_behind",
           "privilege_refusal", "sqlite_file_advice", "store_error"]

log = structlog.get_logger("clerk_sync.store")

@contextmanager
def driver_cursor(conn: Connection, what: str) -> Iterator[Any]:
    """A cursor of the driver under ``conn``, in its transaction (SQLAlchemy began it), for statements whose
    SQLAlchemy overhead was measured to matter; a driver error comes out as SQLAlchemy's own execute
    raises it (``what`` stands for the statement), so :func:`store_error` classifies it as any other.

    A disconnect (the database restarted, the connection was killed) is handled as SQLAlchemy's execute handles
    it: this connection is invalidated (no ROLLBACK on it later, whose failure would hide this error), and so is
    every connection the pool handed out before it (all dead alike after a restart): each is replaced at its
    next checkout, rather than failing one request each first. A cursor refusing to close while an error is on its
    way out (a dead connection's; mysqlclient's 2014 after a statement's error) does not replace that error: the
    refusal is logged at debug."""
    dbapi: Any = conn.dialect.dbapi
    proxied = conn.connection
    raw: Any = proxied.driver_connection
    cur = None
    failing = False  # an exception is on its way out: a cursor refusing to close must not replace it
    try:
        cur = raw.cursor()  # a closed connection refuses this already
        yield cur
    except dbapi.Error as exc:
        failing = True
        disconnect = bool(getattr(raw, "closed", False)) or conn.dialect.is_disconnect(exc, proxied, cur)
        if disconnect and not conn.invalidated:
            # SQLAlchemy's own step (Connection._handle_dbapi_exception); Pool._invalidate is private, and no
            # public call marks the pool's older connections stale without replacing the pool under the
            # connections in use (Engine.dispose). Pinned by tests/test_driver_cursor_disconnect.py.
            conn.engine.pool._invalidate(proxied, exc)
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(what, None, exc, dbapi.Error, hide_parameters=True,
                                         connection_invalidated=disconnect) from exc
    except BaseException:
        failing = True
        raise
    finally:
        if cur is not None:
            try:
                cur.close()
            except dbapi.Error as refused:  # a dead connection's cursor, or mysqlclient's after an error (2014)
                if not (failing or conn.invalidated):
                    raise
                log.debug("driver_cursor_close_failed", what=what, error=type(refused).__name__)


_TIMEOUTS = {  # SQLSTATEs of the bounds set in _postgres_bounds
    "55P03": "waited longer than lock_timeout for a lock held by another connection",
    "57014": "a statement ran longer than statement_timeout",
    "25P03": "the transaction sat idle longer than idle_in_transaction_session_timeout",
}


_MYSQL_WAITS = {  # MySQL/MariaDB error numbers of the same bounds (see _mysql_engine)
    1205: "waited longer than innodb_lock_wait_timeout (a row) or lock_wait_timeout (a table's metadata) for a "
          "lock held by another connection",
    1213: "a deadlock with another transaction (the server rolled this one back)",
    1969: "a statement ran longer than max_statement_time",
    3024: "a statement ran longer than max_execution_time",
}

# MySQL/MariaDB error numbers of a value a column refuses (mysqlclient raises them as OperationalError, so
# the class does not say it): wrong type, truncated, out of range, too long, invalid JSON.
# out of range, truncated, bad datetime, bad value, too long, invalid JSON; a CHECK constraint refused the row
# (MariaDB 4025, which is also its JSON columns' implicit json_valid check; MySQL 8: 3819)
_MYSQL_VALUE_REFUSED = frozenset({1264, 1265, 1292, 1366, 1406, 3140, 3819, 4025})
_CHECK_MAPPING = "; check the mapping's column types against the values Clerk sends"


def _mysql_errno(orig: object) -> int:
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


CONNECTION_OPTION_ADVICE = ("the database driver refused DATABASE_URL's connection options before connecting: "
                            "correct or remove the query option it names (a PostgreSQL spelling such as ?sslmode= "
                            "is not MySQL's, and a misspelt one such as ?sslmod= is no one's)")


def store_error(exc: sa.exc.SQLAlchemyError) -> StoreError:
    """A StoreError whose message names the failure but never carries SQL or bound values
    (they hold emails and private metadata, and the message reaches HTTP answers and logs)."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        # A value the statement could not bind (a text for a Boolean column, a dict for an Integer one, from
        # a mapping's metadata path): refused for good. Its message quotes the value: not repeated here.
        return StoreDataError(f"a value could not be bound to the statement ({type(orig).__name__})" + _CHECK_MAPPING)
    first_line = database_message(orig)
    message = f"database error: {type(orig).__name__}: {first_line}"
    advice = sqlite_file_advice(orig)
    if advice is not None:  # the file itself (corrupt, read-only, its disk full): what to do, not DATABASE_URL
        return StoreError(f"{message}; {advice}")
    bound = _TIMEOUTS.get(getattr(orig, "sqlstate", None) or "") or _MYSQL_WAITS.get(_mysql_errno(orig))
    if bound is not None:  # a bounded wait ran out: someone else holds what we need, try again later
        return StoreError(f"database timeout: {bound} ({first_line}); nothing was applied, retry later")
    if _mysql_errno(orig) == 1044 and isinstance(exc, sa.exc.DBAPIError) and exc.statement is None:
        # at connect (no statement): the database DATABASE_URL names is not one this user may use at all
        named = re.search(r"to database '([^']*)'", first_line)
        database = f" {named.group(1)}" if named else ""
        return StoreError(f"{message}; the user may not use database{database}: check the database name in "
                          "DATABASE_URL, or run the RUNBOOK's GRANT statements as root (\"Least-privilege database "
                          "roles\")")
    if isinstance(exc, sa.exc.ProgrammingError) and exc.statement is None and _client_side(orig) \
            and type(orig).__module__.startswith("psycopg"):
        # at connect (no statement), refused by the driver before any round trip: DATABASE_URL's options
        # ("invalid connection option \"sslmod\""), not a value of a row (the mapping's advice below)
        return StoreError(f"{message}; {CONNECTION_OPTION_ADVICE}")
    if is_insufficient_privilege(orig):  # a grant to add: no retry heals it, a GRANT does (the delivery kept)
        return StorePrivilegeMissing(f"{message}; {PRIVILEGE_ADVICE}")
    if _missing_table(orig) or _missing_column(orig):  # the schema is behind (a new install, a new migration)
        mapped = ("; for a column of one of the app's mapped tables, the app's own migrations or `clerk-sync "
                  "migrate --mapping`") if _missing_column(orig) else ""
        return StoreError(message + "; the schema is not current: run clerk-sync's migrations on this database "
                          "(`clerk-sync migrate` with the same DATABASE_URL; in Django `manage.py clerk_sync "
                          f"migrate`, in Flask `flask clerk-sync migrate`){mapped}")
    if is_pooler_misconfigured(orig):
        return StoreError(f"{message}; {POOLER_ADVICE}")
    if isinstance(exc, sa.exc.DataError):  # a value refused for good: retrying cannot help
        return StoreDataError(message)
    if str(getattr(orig, "sqlstate", None) or "").startswith("54"):
        # PostgreSQL's program limits (an index row over 2,704 bytes, a value nested too deep): this row is
        # over a limit on every retry, so stored failed rather than 503 (an app's index on a mapped column)
        return StoreDataError(message + _CHECK_MAPPING)
    if (isinstance(exc, sa.exc.ProgrammingError) and _client_side(orig)) \
            or _mysql_errno(orig) in _MYSQL_VALUE_REFUSED:
        # Refused by the driver before it sent anything ("cannot adapt type 'dict'"), or a MySQL column's
        # refusal: the same values would be refused on every retry, so stored failed rather than 503.
        return StoreDataError(message + _CHECK_MAPPING)
    return StoreError(message)


# A privilege the database role lacks: PostgreSQL's class 42501 (a table's, a column's, a sequence's, TEMPORARY on
# the database, a schema's USAGE), MySQL/MariaDB 1142 (a table's), 1143 (a column's), 1044 (the database's: CREATE
# TEMPORARY TABLES, LOCK TABLES), 1227 (a global one). Not 1045 (a wrong password: the login, DATABASE_URL's).
_MYSQL_DENIED = frozenset({1044, 1142, 1143, 1227})
PRIVILEGE_ADVICE = ("the database role lacks a privilege clerk-sync needs: grant it, as the tables' owner (`clerk-sync "
                    "doctor` with this DATABASE_URL prints the GRANT statements for clerk-sync's tables and the mapped "
                    "ones; a table an app trigger writes is yours to grant; RUNBOOK, \"Least-privilege database "
                    "roles\"); nothing was applied: retry once granted (a webhook delivery is answered 503, so "
                    "Svix retries it)")


def is_insufficient_privilege(orig: object) -> bool:
    """The database refused a statement for a privilege (:data:`PRIVILEGE_ADVICE`). On clerk-sync's own tables a
    setting to fix (the delivery kept, answered 503 until someone grants it); on an app's mapped table PostgreSQL
    says the same (42501) for a row-level security policy's refusal and for a trigger raising
    ``insufficient_privilege``: the row's own refusal, told apart by asking the catalog
    (:meth:`clerk_sync.mapping.SchemaMapping.role_lacks`), never by this alone (:func:`privilege_refusal`)."""
    return getattr(orig, "sqlstate", None) == "42501" or _mysql_errno(orig) in _MYSQL_DENIED


# MySQL/MariaDB 1419: binary logging is on, and CREATE TRIGGER (a migration's) needs SUPER unless the server
# trusts routine creators. A server setting, not a grant doctor can print.
BINLOG_TRIGGER_ADVICE = ("binary logging is on and log_bin_trust_function_creators is off, so only a role with SUPER "
                         "may create triggers: set log_bin_trust_function_creators=1 (SET GLOBAL as an admin, and in "
                         "the server's configuration; RDS and Aurora: the DB parameter group), or run `clerk-sync "
                         "migrate` as a role with SUPER")


def is_binlog_trigger_refusal(orig: object) -> bool:
    """MySQL/MariaDB refused CREATE TRIGGER for binary logging (1419, :data:`BINLOG_TRIGGER_ADVICE`)."""
    return _mysql_errno(orig) == 1419


def _in_chain(exc: BaseException, test: Callable[[object], bool]) -> sa.exc.DBAPIError | None:
    """The first driver error in ``exc``'s chain (``__cause__``, else ``__context__``) whose ``orig`` passes
    ``test``, or None."""
    seen: BaseException | None = exc
    walked: set[int] = set()
    while seen is not None and id(seen) not in walked:  # (a chain can loop back on itself)
        walked.add(id(seen))
        if isinstance(seen, sa.exc.DBAPIError) and test(seen.orig):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def privilege_refusal(exc: BaseException) -> sa.exc.DBAPIError | None:
    """The privilege refusal (:func:`is_insufficient_privilege`) in ``exc``'s chain, as :func:`passing_cause` reads
    it, or None. Not passing by itself: a mapped write's caller asks whether the role really lacks a privilege."""
    return _in_chain(exc, is_insufficient_privilege)


def binlog_trigger_refusal(exc: BaseException) -> sa.exc.DBAPIError | None:
    """A migration step's CREATE TRIGGER refused for binary logging (:func:`is_binlog_trigger_refusal`) in ``exc``'s
    chain, or None: no retry helps until someone changes the server's setting."""
    return _in_chain(exc, is_binlog_trigger_refusal)


# PgBouncer in transaction mode: it refuses libpq's `options` (clerk-sync's timeouts), and psycopg's prepared
# statements (_pg3_N) are missing or already there on the next server connection (before PgBouncer 1.21).
POOLER_ADVICE = ("DATABASE_URL leads to a connection pooler in transaction mode (PgBouncer): set "
                  "CLERK_SYNC_DB_TRANSACTION_POOLER=1, and clerk-sync's timeouts on its role (RUNBOOK, PgBouncer)")


def is_pooler_misconfigured(orig: object) -> bool:
    """A pooler in transaction mode reached without ``CLERK_SYNC_DB_TRANSACTION_POOLER`` (:data:`POOLER_ADVICE`): a
    setting to fix, which no retry heals (the CLI exits 2), though the webhook path still answers 503."""
    sqlstate = getattr(orig, "sqlstate", None)
    text = str(orig).split("\n", 1)[0]  # the message, not a DETAIL line (which may quote a row's values)
    return ("unsupported startup parameter" in text and sqlstate in (None, "08P01")) or (
        sqlstate in ("42P05", "26000") and '"_pg3_' in text)


# SQLite's errors about the file rather than a statement (sqlite3_errstr's texts, which sqlite3 raises as the
# message): said with what to do, on the webhook path's log line, the CLI's and doctor's. Each names "the SQLite
# file", which the CLI reads as advice given (no "Check DATABASE_URL" after it).
_SQLITE_RESTORE = ("stop every process using it (serve, worker, the app, cron jobs), keep the damaged file with "
                   "its -wal and -shm aside, and restore the last good backup (made with `sqlite3 DB \".backup "
                   "FILE\"` or `VACUUM INTO`, never `cp` of a live file) with no -wal or -shm left beside it; then "
                   "`clerk-sync migrate` and `clerk-sync reconcile`. Without a backup, `sqlite3 DB .recover` into a "
                   "new file may save most rows (see the RUNBOOK: restoring a SQLite database)")
_SQLITE_FILE = {
    # SQLITE_CORRUPT: retrying cannot help (exit 2); some statements may still work, so the reads of /readyz and
    # doctor's database line can look fine: `doctor` runs `PRAGMA quick_check`
    "database disk image is malformed": "the SQLite file is corrupt (`sqlite3 DB \"PRAGMA integrity_check\"` "
                                        "shows where): " + _SQLITE_RESTORE,
    # SQLITE_NOTADB: DATABASE_URL names some other file, or the header is damaged
    "file is not a database": "the SQLite file DATABASE_URL names is not a SQLite database, or its header is "
                              "corrupt: check the path; if it is the right file, " + _SQLITE_RESTORE,
    # SQLITE_READONLY: permissions, a read-only mount, an immutable file (exit 2: a setting to fix)
    "attempt to write a readonly database": "the SQLite file cannot be written by this process: make the file, "
                                            "its -wal and -shm files and their directory writable by the user the "
                                            "service runs as{uid}, on a file system mounted read-write (SQLite "
                                            "creates and writes the -wal and -shm files beside the database)",
    # SQLITE_FULL (exit 3, 503: Svix retries once there is room)
    "database or disk is full": "the disk holding the SQLite file (or its temporary directory, for a big sort) is "
                                "full: nothing was applied; free space there and retry later (the -wal file beside "
                                "the database grows with the writes between checkpoints; `doctor` shows its size)",
    # SQLITE_CANTOPEN with the directory there (a missing one is refused first, as a setting): -shm cannot be made
    # (the hook dispatcher's and the CLI's "check DATABASE_URL, and that the database is up" kept: a path gone)
    "unable to open database file": "SQLite could not open the file or create its -wal and -shm files beside it: "
                                    "check DATABASE_URL, and that the database is up: the file and its directory "
                                    "exist, are readable and writable by the user the service runs as{uid} and are "
                                    "not on a read-only mount; retry later if it is a passing shortage (too many "
                                    "open files)",
    # SQLITE_IOERR
    "disk I/O error": "the file system under the SQLite file failed a read or a write: check the disk and the "
                      "kernel log (dmesg), that it is not full or remounted read-only, and that the file, its -wal "
                      "or -shm was not removed or replaced while in use; retry later",
}


def sqlite_file_advice(orig: object) -> str | None:
    """What to do about a SQLite error of the file itself (corrupt, not a database, read-only, disk full, cannot
    open, I/O), or None for any other error (another database's, a statement's)."""
    if type(orig).__module__ != "sqlite3":
        return None
    text = str(orig)
    for prefix, advice in _SQLITE_FILE.items():
        if text.startswith(prefix):
            uid = f" (uid {os.geteuid()})" if hasattr(os, "geteuid") else ""
            return advice.format(uid=uid)
    return None


def _missing_table(orig: object) -> bool:
    """PostgreSQL 42P01, MySQL 1146, SQLite's "no such table"."""
    return (getattr(orig, "sqlstate", None) == "42P01" or _mysql_errno(orig) == 1146
            or (type(orig).__module__ == "sqlite3" and str(orig).startswith("no such table")))


def _missing_column(orig: object) -> bool:
    """A column the statement names is not there, the schema behind as with a missing table: PostgreSQL 42703
    (undefined column), MySQL/MariaDB 1054 (unknown column), SQLite's "no such column" (a read) and "table ..
    has no column named .." (an insert). Only for the message: :func:`passing_cause` keeps it the row's (an
    app's mapped table without the column refuses every row the same way; the unit of work is not retried)."""
    if getattr(orig, "sqlstate", None) == "42703" or _mysql_errno(orig) == 1054:
        return True
    message = str(orig)
    return type(orig).__module__ == "sqlite3" and (message.startswith("no such column")
                                                  or " has no column named " in message)


def is_schema_behind(orig: object) -> bool:
    """A table or column the statement names is missing (a migration not run): no retry heals it."""
    return _missing_table(orig) or _missing_column(orig)


def _client_side(orig: object) -> bool:
    """The driver refused a value before sending it: psycopg's errors without a SQLSTATE ("cannot adapt
    type 'dict'"), sqlite3's "Error binding parameter". Not any ProgrammingError without a SQLSTATE: the
    MySQL drivers' carry none at all (a missing table is one there)."""
    module = type(orig).__module__
    if module.startswith("psycopg"):
        return getattr(orig, "sqlstate", None) is None
    return module == "sqlite3" and str(orig).startswith("Error binding parameter")


def is_transient(orig: object) -> bool:
    """A bounded wait ran out or a deadlock was broken (PostgreSQL 55P03/57014/25P03/40P01/40001, MySQL
    1205/1213/..): nothing about the row itself, and on MySQL a deadlock rolled the whole transaction back."""
    return (getattr(orig, "sqlstate", None) in (*_TIMEOUTS, "40P01", "40001")
            or _mysql_errno(orig) in _MYSQL_WAITS)


# PostgreSQL SQLSTATE classes of the connection's or the server's state, never a row's: connection exception,
# invalid transaction state, insufficient resources (disk full, out of memory), operator intervention
# (shutdown, a cancelled statement), system error (I/O).
_PG_PASSING_CLASSES = ("08", "25", "53", "57", "58")
# MySQL/MariaDB: disk full, out of memory (three ways), a table full; a statement or session killed from
# outside (KILL QUERY by an operator or a proxy's query killer: 1317, MySQL's 3169) or by a server shutting down.
_MYSQL_PASSING = frozenset({1021, 1037, 1038, 1041, 1114, 1053, 1317, 3169})
# SQLite's messages for the same (sqlite3_errstr's texts).
# A corrupt or read-only file is the database's state too: never a row's refusal (the delivery 503, not failed).
_SQLITE_CORRUPT = ("database disk image is malformed", "file is not a database")
_SQLITE_PASSING = ("database or disk is full", "disk I/O error", "database is locked", "out of memory",
                   "attempt to write a readonly database", *_SQLITE_CORRUPT)


def passing_cause(exc: BaseException) -> sa.exc.SQLAlchemyError | None:
    """The failure in ``exc``'s chain that is the database's passing state, not a refusal of the row: the
    connection is gone, a bounded wait ran out or a deadlock was broken (:func:`is_transient`), the server
    ran out of something, a table is missing (mid-deploy), or on MySQL the
    savepoint was rolled back with the whole transaction (1305: a deadlock). None when the database refused the
    row itself (a constraint, a trigger's ``RAISE EXCEPTION`` or ``SIGNAL``): retrying the same row cannot help,
    so it is its refusal. A privilege refusal is neither by itself (:func:`privilege_refusal`).

    The whole chain is read: leaving a savepoint may fail on its ROLLBACK, the cause in the context."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sa.exc.NoSuchTableError):
            return seen
        if isinstance(seen, sa.exc.DBAPIError):
            orig = seen.orig
            sqlstate = str(getattr(orig, "sqlstate", None) or "")
            if (seen.connection_invalidated or is_transient(orig) or _missing_table(orig)
                    or sqlstate.startswith(_PG_PASSING_CLASSES) or _mysql_errno(orig) in _MYSQL_PASSING
                    or (type(orig).__module__ == "sqlite3" and str(orig).startswith(_SQLITE_PASSING))
                    or _savepoint_gone(orig)):
                return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _savepoint_gone(orig: object) -> bool:
    """MySQL/MariaDB 1305 on a savepoint: the transaction that held it was rolled back (a deadlock)."""
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
    return len(args) > 1 and args[0] == 1305 and "SAVEPOINT" in str(args[1]).upper()


def is_lock_wait_timeout(orig: object) -> bool:
    """A bounded wait for a lock another connection holds ran out (PostgreSQL 55P03, MySQL 1205)."""
    return getattr(orig, "sqlstate", None) == "55P03" or _mysql_errno(orig) == 1205


def is_foreign_key_violation(orig: object) -> bool:
    """A row refers to one its table's foreign key does not find (yet): PostgreSQL 23503, MySQL/MariaDB 1452
    (1216 where the server leaves the key out), SQLite's "FOREIGN KEY constraint failed". PostgreSQL and SQLite
    say the same for a row still referred to (:func:`is_row_referenced`): there the statement tells them apart,
    or on PostgreSQL the key's own table (:func:`foreign_key_of`)."""
    if getattr(orig, "sqlstate", None) == "23503":
        return True
    if _mysql_errno(orig) in (1452, 1216):
        return True
    return _sqlite_foreign_key(orig)


def is_row_referenced(orig: object) -> bool:
    """A row another table's foreign key still refers to could not be deleted (or its key changed):
    PostgreSQL 23503, MySQL/MariaDB 1451 (1217 where the server leaves the key out), SQLite's "FOREIGN KEY
    constraint failed". Not a missing parent (MySQL's 1452, :func:`is_foreign_key_violation`): waiting never
    heals this one, the referring row has to go first."""
    if getattr(orig, "sqlstate", None) == "23503":
        return True
    return _mysql_errno(orig) in (1451, 1217) or _sqlite_foreign_key(orig)


def foreign_key_of(orig: object) -> tuple[str | None, str | None, str | None]:
    """PostgreSQL: the (schema, table, constraint) of the foreign key that refused a row, from the error's
    diagnostics (psycopg's ``diag``), in no message's language. The table is the key's own, the referring
    one, in both cases of 23503 (``errtableconstraint(fk_rel, ..)`` in PostgreSQL's ri_ReportViolation): the
    written row's table when a row it refers to is missing, another table when the write changed a value
    that table still refers to. (None, None, None) elsewhere, or when the server did not say."""
    diag = getattr(orig, "diag", None)
    return (getattr(diag, "schema_name", None), getattr(diag, "table_name", None),
            getattr(diag, "constraint_name", None))


def _sqlite_foreign_key(orig: object) -> bool:
    return type(orig).__module__ == "sqlite3" and str(orig).startswith("FOREIGN KEY constraint failed")
