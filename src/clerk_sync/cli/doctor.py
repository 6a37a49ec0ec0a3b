"""``clerk-sync doctor``: each check says what it found and, when something is wrong, what to do."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync._db_errors import (
    BINLOG_TRIGGER_ADVICE,
    PRIVILEGE_ADVICE,
    is_insufficient_privilege,
    sqlite_file_advice,
    store_error,
)
from clerk_sync._urls import masked_url
from clerk_sync.cli._database import missing_sqlite_file
from clerk_sync.config import Settings
from clerk_sync.errors import ClerkSyncError, ConfigError, database_message
from clerk_sync.mapping import SchemaMapping, check_schema
from clerk_sync.store import READ_ONLY_OPTION, Store

__all__ = ["Check", "run_checks", "run_freshness"]


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: ``status`` is ok, warn or fail."""

    name: str
    status: str
    detail: str


def run_checks(settings: Settings, *, http: httpx.Client | None = None,
               mapping: SchemaMapping | None = None) -> list[Check]:
    """Run every check; one failing check never hides the others."""
    client = http or httpx.Client(timeout=5)
    missing = missing_sqlite_file(settings)
    database = (Check("database", "fail", f"{_UNREACHABLE}: {missing}") if missing is not None
                else _guard("database", lambda: _database(settings)))
    reachable = not database.detail.startswith(_UNREACHABLE)  # else what reads it says so, not "migrate"
    try:
        checks = [_guard("webhook secret", lambda: _webhook_secret(settings)), database]
        if settings.database_url.startswith("sqlite") and reachable:  # what a read of one row cannot see:
            checks.append(_guard("sqlite file", lambda: _sqlite_file(settings)))  # corrupt pages, read-only
        if not settings.database_url.startswith("sqlite"):  # a server's roles: what this one may do
            checks.append(_guard("privileges", lambda: _privileges(settings, mapping)) if reachable
                          else _not_checked("privileges"))
        if reachable and settings.database_url.startswith(("mysql", "mariadb")):
            checks.append(_guard("body limit", lambda: _mysql_packet(settings)))
        checks.append(_guard("hook jobs", lambda: _hook_jobs(settings)) if reachable else _not_checked("hook jobs"))
        checks += [_guard(name, fn) for name, fn in (
            ("Clerk Backend API", lambda: _clerk_api(settings, client, mirrors=reachable)),
            ("session keys", lambda: _session_keys(settings, client)),
        )]
        if settings.console_enabled:  # what `serve` would refuse to start with
            checks.append(_guard("console", lambda: _console(settings)))
    finally:
        if http is None:
            client.close()
    if mapping is None:
        return checks
    return checks + (_mapping_checks(settings, mapping) if reachable else [_not_checked("mapping")])


_UNREACHABLE = "cannot reach the database"


def _not_checked(name: str) -> Check:
    return Check(name, "warn", "not checked: the database cannot be reached (see the database line)")


#: What a delivery's statement carries beside its body (the row's other columns, the statement's own text)
_PACKET_MARGIN = 64 * 1024


def _mysql_packet(settings: Settings) -> tuple[str, str]:
    """CLERK_SYNC_MAX_BODY_BYTES against the server's ``max_allowed_packet``: a signed delivery whose statement
    is larger is dropped with the connection (2006 "gone away", read as an outage), so it answered 503 on every
    retry, never stored (review). The limit must leave room for the body in one statement."""
    store = Store.from_settings(settings)
    try:
        with store.connect() as conn:
            packet = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())
    except sa.exc.SQLAlchemyError as exc:
        raise store_error(exc) from exc
    finally:
        store.dispose()
    # A body's statement is up to 7 times the body: JSON columns are written ASCII-escaped ("é", 2 bytes, as
    # \u00e9) and the driver escapes each backslash again (7 bytes: 3.5 times), and a hook job holds the change's
    # values and its previous values (twice that). Twice the body allowed a delivery of raw non-ASCII text that
    # dropped the connection (review)
    room = (packet - _PACKET_MARGIN) // 7
    if settings.max_body_bytes > room:
        return "fail", (f"CLERK_SYNC_MAX_BODY_BYTES is {settings.max_body_bytes:,} but the server's max_allowed_packet "
                        f"is {packet:,}: a delivery larger than ~{room:,} bytes would be refused with the connection "
                        "(503 on every retry, never stored). Lower CLERK_SYNC_MAX_BODY_BYTES to at most "
                        f"{room:,}, or raise max_allowed_packet (SET GLOBAL max_allowed_packet, and in the server's "
                        "config) above 7 times the limit + 64 KiB: escaped, a body's text may take 3.5 times its "
                        "size, twice in a hook job)")
    return "ok", f"CLERK_SYNC_MAX_BODY_BYTES {settings.max_body_bytes:,} fits max_allowed_packet {packet:,}"


def _privileges(settings: Settings, mapping: SchemaMapping | None) -> tuple[str, str]:
    """What DATABASE_URL's role lacks of what the runtime does (``_privileges.missing_privileges``), with the
    GRANT statements to run as the tables' owner (RUNBOOK, "Least-privilege database roles")."""
    from clerk_sync.migrations._privileges import missing_privileges

    store = Store.from_settings(settings)
    try:
        with store.connect() as conn:
            missing = missing_privileges(conn, mapping)
    except sa.exc.SQLAlchemyError as exc:
        raise store_error(exc) from exc
    finally:
        store.dispose()
    mapped = " and the mapped tables' columns" if mapping is not None else ""
    if missing.needed:
        return "fail", (f"the role lacks privileges ({'; '.join(missing.needed)}): each is refused to whom it is for "
                        "until granted. As the tables' owner, run: "
                        + " ".join(missing.grants + [grant for _, grant in missing.optional]))
    if missing.optional:
        return "warn", ("the role may do what serve and worker need, not: "
                        + "; ".join(f"{what}: {grant}" for what, grant in missing.optional))
    return "ok", f"SELECT, INSERT, UPDATE, DELETE on clerk-sync's tables{mapped}, as the runtime needs"


def _hook_jobs(settings: Settings) -> tuple[str, str]:
    """Dead after-commit hook jobs wait for a person: say how many and what to run."""
    from clerk_sync.tables import hook_jobs

    store = Store.from_settings(settings)
    try:
        with store.connect() as conn:
            by_status = sa.select(hook_jobs.c.status, sa.func.count()).group_by(hook_jobs.c.status)
            counts: dict[str, int] = {status: n for status, n in conn.execute(by_status).all()}
    except ClerkSyncError:
        return "warn", "cannot read hook_jobs (see the database line): run `clerk-sync migrate`"
    finally:
        store.dispose()
    queued = counts.get("pending", 0) + counts.get("running", 0)
    if counts.get("dead"):
        return "warn", (f"{counts['dead']} dead, {queued} queued: `clerk-sync hooks list`, fix the cause, then "
                        "`clerk-sync hooks retry ID...` (or `--all`), or `clerk-sync hooks purge ID...`")
    return "ok", f"none dead, {queued} queued"


def _mapping_checks(settings: Settings, mapping: SchemaMapping) -> list[Check]:
    """One line per problem of the mapped tables (clerk_sync.mapping.check_schema), or one ok."""
    store = Store.from_settings(settings)
    try:
        with store.connect() as conn:
            problems = check_schema(conn, mapping)
    except ClerkSyncError as exc:
        return [Check("mapping", "fail", str(exc))]
    finally:
        store.dispose()
    tables = ", ".join(t.table for t in mapping.tables.values())
    return [Check("mapping", s, p) for s, p in problems] or [Check("mapping", "ok", f"{tables} match the mapping")]


def run_freshness(settings: Settings, *, now: Callable[[], float] = time.time) -> list[Check]:
    """``doctor --freshness``: the alert rules' questions, answered from the database.

    A database it cannot read raises the store's error, which the CLI reports as every cron command does:
    down or not answering, exit 3 and retry once it answers; refusing the login or not migrated, exit 2 and
    what to fix (``clerk-sync migrate`` only for the latter: it cannot help a refused connection). The schema's
    revision is asked first, as ``doctor`` asks it: one behind raises :class:`ConfigError` (exit 2, run
    ``clerk-sync migrate``) even where every table it reads is there (a dump of an older revision restored:
    every delivery answers 503 while the freshness series look fresh); one newer is a warning line."""
    from clerk_sync.freshness import (
        REFUSALS_WINDOW_S,
        check_freshness,
        read_initial_load,
        read_refusals,
        read_snapshot,
    )

    missing = missing_sqlite_file(settings)
    if missing is not None:
        raise ConfigError(missing)
    store = Store.from_settings(settings)
    at = now()
    try:
        schema = _read_schema(store)
        snap = read_snapshot(store)
        refusals = read_refusals(store, since=at - REFUSALS_WINDOW_S)  # ClerkSyncMappedRowsRefused
        initial_load = read_initial_load(store)
    finally:
        store.dispose()
    found = check_freshness(snap, now=at, max_delivery_age_s=settings.freshness_max_delivery_age_s,
                            max_failed=settings.freshness_max_failed,
                            max_reconcile_age_s=settings.freshness_max_reconcile_age_s,
                            max_hook_wait_s=settings.freshness_max_hook_wait_s, refusals=refusals,
                            initial_load=initial_load)
    return schema + [Check(c.name, c.status, c.detail) for c in found]


def _read_schema(store: Store) -> list[Check]:
    """``doctor --freshness``'s first question, as ``doctor``'s database line asks it (:func:`_schema`): a schema
    behind raises (exit 2: what the alert rules read may look fresh while every delivery answers 503); one
    newer than this release is a warning line; a current one adds no line."""
    try:
        status, detail = _schema(store)
    except sa.exc.SQLAlchemyError as exc:  # as the reads after it: down (exit 3) or refused (exit 2)
        raise store_error(exc) from exc
    if status == "fail":
        raise ConfigError(detail)  # (exit 2, as the CLI's table says for a schema to migrate)
    return [Check("database", status, detail)] if status == "warn" else []


def _guard(name: str, fn: Callable[[], tuple[str, str]]) -> Check:
    try:
        status, detail = fn()
    except (ClerkSyncError, httpx.HTTPError) as exc:
        status, detail = "fail", str(exc)
    except ValueError as exc:  # e.g. an answer that is not the JSON expected: one failed line, not a traceback
        status, detail = "fail", f"unexpected answer ({type(exc).__name__}: {exc})"
    return Check(name, status, detail)


def _console(settings: Settings) -> tuple[str, str]:
    """CLERK_SYNC_CONSOLE is set: a way to sign in, and a cookie key of its own (``check_console_settings``)."""
    from clerk_sync.integrations.console import check_console_settings

    check_console_settings(settings)
    return "ok", "a way to sign in and a cookie key of its own"


def _webhook_secret(settings: Settings) -> tuple[str, str]:
    secrets = settings.webhook_secrets()
    return "ok", f"{len(secrets)} secret(s) configured"


def _database(settings: Settings) -> tuple[str, str]:
    try:
        store = Store.from_settings(settings)
    except ConfigError as exc:  # a malformed DATABASE_URL, a driver not installed: says what to do itself
        return "fail", f"{_UNREACHABLE}: {exc}"
    try:
        store.ping()
        return _schema(store)
    except Exception as exc:
        text = _cause(exc, settings)  # (a StoreError's words carry sqlite_file_advice's already)
        if is_insufficient_privilege(getattr(exc, "orig", None)):  # reached: the privileges line says what to grant
            return "fail", f"reached, but a read was refused: {text}; {PRIVILEGE_ADVICE}"
        advice = sqlite_file_advice(getattr(exc, "orig", None) or exc)  # corrupt, not a database, cannot open
        if advice is None and not any(said in text for said in ("the SQLite file", "DATABASE_URL")):
            advice = "check DATABASE_URL"
        return "fail", f"{_UNREACHABLE}: {text}" + (f"; {advice}" if advice else "")
    finally:
        store.dispose()


#: How long ``doctor`` lets ``PRAGMA quick_check`` read (a few seconds per GB; it holds a read snapshot only, so
#: writers go on, but a checkpoint cannot pass it): past this it says how to run it by hand.
QUICK_CHECK_S = 10.0
#: The SQLite release whose ``quick_check`` calls the progress handler during its B-tree walk: before it, that walk
#: is one bytecode step, which :data:`QUICK_CHECK_S` cannot interrupt (it only stops the index checks after it).
QUICK_CHECK_INTERRUPTIBLE = (3, 43, 0)
#: On an older SQLite, ``doctor`` runs ``quick_check`` only on a file up to this size (measured: 548 MiB in 0.5 s
#: from the page cache; 256 MiB read cold at 50 MB/s, a slow disk, stays well under :data:`QUICK_CHECK_S`); on a
#: bigger one it says how to run it by hand rather than read the whole file for minutes.
QUICK_CHECK_UNBOUNDED_BYTES = 256 * 1024 * 1024
#: Free space on the SQLite file's disk below which ``doctor`` warns: the -wal file grows with the writes between
#: checkpoints (store.WAL_SIZE_LIMIT, a big reconcile or prune more), and SQLite refuses every write when it cannot.
LOW_DISK_BYTES = 256 * 1024 * 1024


def _sqlite_file(settings: Settings) -> tuple[str, str]:
    """SQLite: ``PRAGMA quick_check`` (bounded by :data:`QUICK_CHECK_S`; skipped, saying the command to run by
    hand, when it cannot be bounded: a file over :data:`QUICK_CHECK_UNBOUNDED_BYTES` on a SQLite older than
    :data:`QUICK_CHECK_INTERRUPTIBLE`), a write rolled back (a read-only file, directory or mount refuses it while
    every read answers; it needs no table, so a file not migrated yet passes), the free space on its disk, the
    -wal file's size and the share of free pages (what ``VACUUM`` would give back)."""
    import shutil
    import sqlite3

    store = Store.from_settings(settings)
    raw: Any = store.engine.raw_connection()  # (the engine's pragmas set; no BEGIN of SQLAlchemy's)
    fails: list[str] = []
    notes: list[str] = []
    file = ""
    try:
        file = str(raw.execute("PRAGMA database_list").fetchone()[2] or "")  # ("" in memory; a URI's own path)
        by_hand = f"`sqlite3 {shlex.quote(file)} 'PRAGMA quick_check'` in a quiet hour"  # pasted into a shell
        pages, free, size = (int(raw.execute(f"PRAGMA {name}").fetchone()[0])
                             for name in ("page_count", "freelist_count", "page_size"))
        if sqlite3.sqlite_version_info < QUICK_CHECK_INTERRUPTIBLE and pages * size > QUICK_CHECK_UNBOUNDED_BYTES:
            notes.append(f"quick_check skipped ({_mib(pages * size)}: SQLite {sqlite3.sqlite_version} cannot stop "
                         f"it in {QUICK_CHECK_S:.0f} s, {'.'.join(map(str, QUICK_CHECK_INTERRUPTIBLE[:2]))} can): "
                         f"run {by_hand}")
        else:
            deadline = time.monotonic() + QUICK_CHECK_S
            raw.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
            try:
                found = [str(row[0]) for row in raw.execute("PRAGMA quick_check(5)").fetchall()]
                if found != ["ok"]:
                    fails.append(f"quick_check found: {'; '.join(found)[:300]}; " + (sqlite_file_advice(
                        sqlite3.DatabaseError("database disk image is malformed")) or ""))
                else:
                    notes.append("quick_check ok")
            except sqlite3.OperationalError as exc:
                if str(exc) != "interrupted":
                    raise
                notes.append(f"quick_check not finished in {QUICK_CHECK_S:.0f} s: run {by_hand}")
            finally:
                raw.set_progress_handler(None, 0)
        raw.execute("PRAGMA busy_timeout=1000")  # (this connection only: it is disposed of below)
        try:
            raw.execute("BEGIN IMMEDIATE")
            try:  # a write, rolled back: BEGIN IMMEDIATE alone passes on a read-only file. The header's own
                # user_version set to its value writes page 1 and needs no table (a file not migrated yet passes)
                version = int(raw.execute("PRAGMA user_version").fetchone()[0])
                raw.execute(f"PRAGMA user_version = {version}")
                notes.append("writable")
            finally:
                raw.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            if not str(exc).startswith("database is locked"):
                raise
            notes.append("write not probed (another process was writing)")
    except sqlite3.DatabaseError as exc:  # (quick_check itself raises on a page it cannot read)
        fails.append(f"{type(exc).__name__}: {exc}; {sqlite_file_advice(exc) or 'check the file'}")
        pages = free = size = 0
    finally:
        raw.close()
        store.dispose()
    if fails:
        return "fail", "; ".join(fails)
    if not file:
        return "ok", "; ".join(notes)
    path = Path(file)
    wal = path.with_name(path.name + "-wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    disk = shutil.disk_usage(path.parent).free
    notes.append(f"{_mib(pages * size)} ({free * 100 // max(pages, 1)}% free pages), -wal {_mib(wal_bytes)}, "
                 f"{_mib(disk)} free on {path.parent}")
    if disk < LOW_DISK_BYTES:
        return "warn", ("; ".join(notes) + f": low on disk space, SQLite refuses every write when its -wal file "
                        f"cannot grow: free space on {path.parent}")
    if pages * size > 64 * 1024 * 1024 and free * 2 > pages:
        return "warn", ("; ".join(notes) + f": over half the file is free pages (after a big prune): "
                        f"`sqlite3 {shlex.quote(str(path))} \".timeout 30000\" VACUUM` in a quiet hour gives them "
                        "back (it holds the write lock while it runs, and needs up to twice the file's size in "
                        "free disk space; without the timeout it fails at once while a write is in progress)")
    return "ok", "; ".join(notes)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _schema(store: Store) -> tuple[str, str]:
    """The database's migrations against this release's (``doctor``'s database line, ``doctor --freshness``'s
    first question): fail when behind (`clerk-sync migrate`), warn when newer, and when current with the
    revision of a release before clerk-sync's own version table still in ``alembic_version`` (left for that
    release's replicas during the upgrade: how to remove it). A read that fails raises."""
    state, current = migrations.schema_state(store.engine)
    head = migrations.head_revision()
    if state == "newer":  # a rolling deploy under way, or rolled back: this release runs on it, `migrate` cannot
        return "warn", (f"schema at {current}, newer than this release (its newest is {head}): a newer clerk-sync "
                        "migrated it. Finish rolling that release out (or run it here); this one keeps serving, "
                        "and `clerk-sync migrate` of this release cannot go back")
    if state == "behind":
        from clerk_sync.migrations._privileges import unusable_schemas

        with store.engine.connect() as conn:  # PostgreSQL: a schema without USAGE hides its tables from the role
            hidden = unusable_schemas(conn)
            untrusted = (migrations.untrusted_trigger_steps(conn, current, "heads")
                         if conn.dialect.name in ("mysql", "mariadb") else [])
        if hidden:
            return "fail", (f"reached, but this role may not use schema {', '.join(hidden)} (USAGE), so clerk-sync's "
                            f"tables look missing to it; {PRIVILEGE_ADVICE}")
        told = f"schema at {current or 'nothing'}, code expects {head}: run `clerk-sync migrate`"
        if untrusted:  # (whether this role has SUPER, only trying tells: `migrate` does, before any step)
            told += (f"; migrations {', '.join(untrusted)} create triggers, and {BINLOG_TRIGGER_ADVICE} (`migrate` "
                     "tries first and changes nothing if refused)")
        return "fail", told
    from clerk_sync.migrations._privileges import MISSING_TABLES_ADVICE, missing_tables

    with store.engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as conn:
        gone = missing_tables(conn) if state == "current" else []
        leftover = migrations.legacy_leftover(conn)  # (kept by `migrate` for the old release's replicas)
    if gone:
        return "fail", f"reachable, migrations current ({head}), but missing tables: {', '.join(gone)}; " \
                       f"{MISSING_TABLES_ADVICE}"
    if leftover is not None:
        return "warn", f"reachable, migrations current ({head}); {migrations.legacy_leftover_advice(leftover)}"
    return "ok", f"reachable, migrations current ({head})"


def _cause(exc: Exception, settings: Settings) -> str:
    """The driver's first line (a wrong role, a missing database or directory), as ``main()`` shows it for
    the other commands; the password, should the driver quote it, is masked."""
    from sqlalchemy.engine import make_url

    orig = getattr(exc, "orig", None) or exc
    line = exc if isinstance(exc, ClerkSyncError) else f"{type(orig).__name__}: {database_message(orig)}"
    text = str(line).removeprefix("database error: ")
    password = make_url(settings.sqlalchemy_url()).password
    if password:
        text = text.replace(str(password), "***")
    sqlite = settings.sqlite_path()
    if sqlite is not None and not sqlite.parent.is_dir():
        text += f" (the directory {sqlite.parent} does not exist)"
    return text


def _clerk_api(settings: Settings, client: httpx.Client, *, mirrors: bool = False) -> tuple[str, str]:
    """Whether the Backend API answers to CLERK_SECRET_KEY, and (``mirrors``: the database can be read) whether
    the key is of the instance this database mirrors, as ``reconcile`` checks before it writes."""
    if settings.clerk_secret_key is None:
        return "warn", "CLERK_SECRET_KEY not set: JIT sync, reconcile and admin actions are unavailable"
    from clerk_sync.clerk_api import UNREACHABLE, unreachable_advice

    base = settings.clerk_api_url.rstrip("/") + "/v1"
    url = masked_url(base + "/users/count")  # (shown: credentials a proxy takes in the URL masked; review)
    try:
        key = settings.clerk_secret_key.get_secret_value()
        response = client.get(base + "/users/count", headers={"Authorization": f"Bearer {key}"})
    except UNREACHABLE as exc:  # reconcile's words (never the refused header: the key)
        return "fail", f"GET /users/count: {unreachable_advice(exc, base)}"
    except httpx.ProxyError as exc:
        return "fail", (f"{url}: the proxy refused the connection ({exc}): check HTTPS_PROXY / HTTP_PROXY and "
                        "NO_PROXY in this process's environment")
    except httpx.TransportError as exc:  # connected, then no answer (a read timeout, a dropped connection)
        return "fail", (f"{url}: connected, but no answer ({type(exc).__name__}: {exc}): CLERK_API_URL may name a "
                        "server that is not Clerk's Backend API, or a proxy between them stalls; retry, then check it")
    if response.status_code in (401, 403):
        return "fail", f"{url} refused CLERK_SECRET_KEY ({response.status_code}): use this instance's secret key"
    expected = "CLERK_API_URL should be the Backend API's base URL (default https://api.clerk.com)"
    if response.status_code >= 300:  # a redirect is not followed: the secret key must not travel on
        where = response.headers.get("location")
        return "fail", f"{url} answered {response.status_code}{f' (to {where})' if where else ''}: {expected}"
    try:
        total = response.json().get("total_count", "?")
    except (ValueError, AttributeError):
        return "fail", f"{url} answered {response.status_code} but not with Clerk's JSON: {expected}"
    mismatch = _instance_mismatch(settings, client, base) if mirrors else None
    if mismatch is not None:
        return "fail", mismatch
    return "ok", f"{masked_url(settings.clerk_api_url)} reachable, {total} users"


def _instance_mismatch(settings: Settings, client: httpx.Client, base: str) -> str | None:
    """The key's instance (``GET /instance``) against the one this database mirrors (``reconcile``'s check: a
    development key against the production database passed here, then every nightly reconcile refused to run,
    and JIT sync and promotions went to the other instance). No verdict when Clerk does not say."""
    from clerk_sync.reconcile import instance_mismatch

    assert settings.clerk_secret_key is not None  # (checked by the caller)
    try:
        response = client.get(base + "/instance",
                              headers={"Authorization": f"Bearer {settings.clerk_secret_key.get_secret_value()}"})
        found = response.json().get("id") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):  # (an API without the endpoint, a key without the
        return None  # permission, a body not Clerk's: as reconcile, not a verdict on the instance)
    if not isinstance(found, str) or not found:
        return None
    store = Store.from_settings(settings)
    try:
        mismatch = instance_mismatch(store, found, settings.instance_id)
    except (sa.exc.SQLAlchemyError, ClerkSyncError):  # (not migrated, say: the database line says so)
        return None
    finally:
        store.dispose()
    return None if mismatch is None else f"{mismatch[0]}: {mismatch[1]} (`reconcile` refuses to run with this key)"


def _session_keys(settings: Settings, client: httpx.Client) -> tuple[str, str]:
    from clerk_sync.auth.jwks import JWKSKeySource
    from clerk_sync.auth.sessions import verifier_from_settings

    if settings.clerk_jwt_key is None and settings.clerk_jwks_url is None and settings.clerk_secret_key is None:
        return "warn", "no CLERK_JWT_KEY / CLERK_JWKS_URL / CLERK_SECRET_KEY: session verification is not configured"
    keys = verifier_from_settings(settings, http=client).keys
    mode = "PEM key (networkless)"
    if isinstance(keys, JWKSKeySource):
        count = keys.prefetch()
        if count == 0:
            return "fail", f"{masked_url(keys.url)} holds no RS256 signing key"
        mode = f"JWKS {masked_url(keys.url)} ({count} key(s))"
    parties = settings.authorized_parties()
    if not parties:
        return "warn", f"{mode}; azp is not checked: set CLERK_AUTHORIZED_PARTIES to your app's origins"
    return "ok", f"{mode}; azp checked against {sorted(parties)}"
