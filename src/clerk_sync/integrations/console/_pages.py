"""The console's pages and actions, one function each: ``(console, request, identity, form) -> Response``.

They run in a worker thread (the store is synchronous); :mod:`._app` has already identified the
caller and, for POSTs, checked the CSRF token and the read-only setting. Each action writes its audit
row in the transaction of the change itself when it can (replay), else right after it.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from clerk_sync import migrations
from clerk_sync._time import as_utc
from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.audit import record_audit
from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import AccessDenied, ConfigError, StoreError
from clerk_sync.freshness import (
    REFUSALS_WINDOW_S,
    FreshnessCheck,
    check_freshness,
    read_initial_load,
    read_refusals,
    read_snapshot,
)
from clerk_sync.ingest import replay_if_failed
from clerk_sync.integrations.console import _queries as q
from clerk_sync.integrations.console._access import SIGN_OUT, Identity
from clerk_sync.integrations.console._console import Console
from clerk_sync.integrations.console._masking import mask
from clerk_sync.integrations.console._web import BadInput, NotFound, client_ip, set_session_cookie
from clerk_sync.store import Writer
from clerk_sync.tables import audit_log

__all__ = [
    "audit", "audit_csv", "deliveries", "delivery", "drift", "drift_run", "drift_status", "logout", "organization",
    "overview", "replay", "replay_matching", "replay_matching_confirm", "reveal", "set_role", "user", "users_page",
]

Form = dict[str, str]
STATUSES = ("received", "applied", "skipped", "ignored", "failed")
MAX_REPLAY = 1000  # per click: a bigger backlog is `clerk-sync replay`'s job
MAX_CSV_ROWS = 100_000
MAX_CLERK_ID = 64  # the width of the Clerk-id columns
_ROLE = re.compile(r"^[A-Za-z0-9:_-]{1,64}$")
_ROW_ID = re.compile(r"[0-9]{1,19}")  # ASCII digits: str.isdigit() takes "²", which int() refuses


class FilterError(BadInput):
    """Filter values a page cannot use, by field (``{"since": "since='yesterday' is not …"}``): the deliveries and
    audit pages show each beside its field (an HTML 400 with the form); elsewhere the joined message (a 400)."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(errors.values()))
        self.errors = errors


def _time(values: Any, name: str, errors: dict[str, str]) -> datetime | None:
    """An ISO 8601 time as aware UTC (naive is UTC). SQLite compares the stored text, so a time that kept its
    offset would shift the filter by it; one with no UTC time (year 1 at +01:00) is refused, not sent."""
    value = values.get(name)
    if not value:
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        errors[name] = f"{name}={value!r} is not an ISO 8601 time (e.g. 2026-11-30T20:00)"
    except OverflowError:
        errors[name] = f"{name}={value!r} is outside the years 1-9999 once converted to UTC"
    return None


def _row_id(value: str) -> int | None:
    """A row id the database can hold (BIGINT, up to :data:`~._queries.MAX_ID`), or None."""
    if _ROW_ID.fullmatch(value) is None or int(value) > q.MAX_ID:
        return None
    return int(value)


def _before(request: Request, errors: dict[str, str] | None = None) -> int | None:
    value = request.query_params.get("before")
    if not value:
        return None
    before = _row_id(value)
    if before is None:
        found = {"before": f"before={value!r} is not a row id (a whole number from 0 to {q.MAX_ID})"}
        if errors is None:
            raise FilterError(found)
        errors.update(found)
    return before


def _delivery_filter(values: Any, errors: dict[str, str] | None = None) -> q.DeliveryFilter:
    """The deliveries filter; a value it cannot use goes into ``errors`` (its field left out), or without
    ``errors`` raises :class:`FilterError`."""
    found: dict[str, str] = {}
    status = values.get("status") or None
    if status is not None and status not in STATUSES:
        found["status"] = f"status={status!r} is not one of {', '.join(STATUSES)}"
    clerk_id = (values.get("clerk_id") or "").strip() or None
    if clerk_id is not None and len(clerk_id) > MAX_CLERK_ID:  # audit_log.target_clerk_id is VARCHAR(64): 503
        found["clerk_id"] = (f"clerk_id is {len(clerk_id)} characters long; a Clerk id (user_…, org_…) has at "
                             f"most {MAX_CLERK_ID}: check the filter")
    since, until = _time(values, "since", found), _time(values, "until", found)
    _report(found, errors)
    return q.DeliveryFilter(status=None if "status" in found else status, type=values.get("type") or None,
                            clerk_id=None if "clerk_id" in found else clerk_id, since=since, until=until)


def _report(found: dict[str, str], errors: dict[str, str] | None) -> None:
    if found and errors is None:
        raise FilterError(found)
    if errors is not None:
        errors.update(found)


# The filter fields of each page, in the form's order, with their labels (the error summary names them).
_DELIVERY_FIELDS = {"status": "Status", "type": "Type", "clerk_id": "Clerk id", "since": "Since", "until": "Until"}
_AUDIT_FIELDS = {"actor": "Actor", "action": "Action", "target": "Target", "since": "Since", "until": "Until"}


def _refused_filter(console: Console, request: Request, identity: Identity, template: str,
                    fields: dict[str, str], errors: dict[str, str], **context: Any) -> Response:
    """400 with the page itself for a browser: its filter form holding the values as typed, each error beside
    its field (the first one focused) and listed at the top, no results. An API caller gets the JSON 400."""
    if "text/html" not in request.headers.get("accept", ""):
        raise FilterError(errors)
    typed = {name: request.query_params.get(name, "") for name in fields}
    first = next((name for name in fields if name in errors), None)
    return console.render(request, template, identity, status=400, errors=errors, labels={**fields, "before": "Page"},
                          first=first, shown=typed, where=None, page=None, done=None, **context)


_NOTICES = frozenset({*(f"replayed:{s}" for s in DeliveryStatus), "role:applied", "role:pending"})
_COUNT = rf"(?:{'|'.join(DeliveryStatus)}):[0-9]{{1,4}}"  # applied:3
_BULK_NOTICE = re.compile(rf"replayed [0-9]{{1,4}} \((?:none|{_COUNT}(?:,{_COUNT})*)\)"  # replayed 3 (applied:3)
                          r"(?:; not replayed [0-9]{1,4} \(no longer failed\))?")
_NOT_REPLAYED = re.compile(rf"not replayed: delivery [0-9]{{1,19}} is (?:{'|'.join(STATUSES)})")


def _notice(request: Request) -> str | None:
    """The notice an action's redirect asks for (``?done=``), only if it is one the console writes: a link can
    set any ``done``, and its text must not speak inside the console ("session expired: sign in at …")."""
    done = request.query_params.get("done", "")
    # fixed words, counts and statuses only, never the link's text
    if done in _NOTICES or _BULK_NOTICE.fullmatch(done) or _NOT_REPLAYED.fullmatch(done):
        return done
    return None


def _redirect(console: Console, request: Request, name: str, query: str = "", **params: Any) -> Response:
    url = console.path_for(request, name, **params)
    return RedirectResponse(url + (f"?{query}" if query else ""), status_code=303)


# -- overview --------------------------------------------------------------------------------------
def overview(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    with console.store.connect() as conn:
        figures = q.overview(conn, console.now())
    return console.render(request, "overview.html", identity, figures=figures, database=_database(console),
                          clerk=_clerk_state(console), checks=_freshness(console))


def _freshness(console: Console) -> list[FreshnessCheck]:
    """The questions the alert rules and ``doctor --freshness`` ask, with the same thresholds."""
    limits = console.freshness_limits
    if not limits:
        return []
    now = console.now().timestamp()
    refusals = read_refusals(console.store, since=now - REFUSALS_WINDOW_S)  # ClerkSyncMappedRowsRefused
    return check_freshness(read_snapshot(console.store), now=now, refusals=refusals,
                           initial_load=read_initial_load(console.store), **limits)  # day one: not drift


def _database(console: Console) -> dict[str, Any]:
    try:
        console.store.ping()
        state, _ = migrations.schema_state(console.store.engine)
    except (StoreError, sa.exc.SQLAlchemyError) as exc:
        return {"ok": False, "detail": str(exc)}
    if state == "newer":  # a newer release migrated it (a rolling deploy): this one runs on it
        return {"ok": True, "detail": "schema newer than this release: finish rolling out the newer clerk-sync"}
    if state == "behind":
        return {"ok": False, "detail": "migrations behind: run `clerk-sync migrate`"}
    return {"ok": True, "detail": "migrations current"}


def _clerk_state(console: Console) -> dict[str, Any] | None:
    if console.clerk is None:
        return None
    limit = getattr(console.clerk.budget, "limit", None)
    stats = console.clerk.stats
    # (refusing(), as the circuit-open gauge reads: is_open stays set until a call succeeds, and the console's
    # client calls Clerk rarely, so the card said "circuit open" for days after Clerk was back)
    return {"limit": f"{limit.requests} requests / {limit.window_s:g} s" if limit else "shared (Redis)",
            "requests": stats.requests, "rate_limited": stats.rate_limited, "failures": stats.failures,
            "breaker_open": console.clerk.breaker.refusing()}


# -- deliveries ------------------------------------------------------------------------------------
def deliveries(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    errors: dict[str, str] = {}
    where = _delivery_filter(request.query_params, errors)
    before = _before(request, errors)
    with console.store.connect() as conn:
        types = q.delivery_types(conn)
        if errors:
            return _refused_filter(console, request, identity, "deliveries.html", _DELIVERY_FIELDS, errors,
                                   types=types, statuses=STATUSES)
        page = q.list_deliveries(conn, where, before)
    return console.render(request, "deliveries.html", identity, page=page, where=where, types=types,
                          statuses=STATUSES, done=_notice(request), shown=_shown(_DELIVERY_FIELDS, where.query()),
                          errors={})


def _shown(fields: dict[str, str], query: dict[str, str]) -> dict[str, str]:
    return {name: query.get(name, "") for name in fields}


def _load_delivery(console: Console, request: Request) -> Any:
    delivery_id = _row_id(request.path_params["delivery_id"])  # a text route parameter: see _app._routes
    if delivery_id is None:
        raise NotFound("no such delivery")
    with console.store.connect() as conn:
        row = q.get_delivery(conn, delivery_id)
    if row is None:
        raise NotFound("no such delivery")
    return row


def delivery(console: Console, request: Request, identity: Identity, form: Form,
             *, revealed: bool = False) -> Response:
    row = _load_delivery(console, request)
    payload = row["payload"] if revealed else mask(row["payload"])
    return console.render(request, "delivery.html", identity, row=row, payload=payload, revealed=revealed,
                          subject=_subject(row["payload"]), done=_notice(request))


def _subject(payload: Any) -> str | None:
    data = payload.get("data") if isinstance(payload, dict) else None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _whose(payload: Any) -> str | None:
    """The person a payload's personal data is about: a membership's member (``public_user_data.user_id``), a
    session's or an e-mail's user (``user_id``), else the object itself. A reveal is audited under them, so the
    user's audit trail shows who looked at their data (review: a membership's was filed under ``orgmem_...``)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if isinstance(data, dict):
        member = data.get("public_user_data")
        for value in (member.get("user_id") if isinstance(member, dict) else None, data.get("user_id")):
            if isinstance(value, str) and value:
                return value
    return _subject(payload)


def reveal(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    """Show the payload unmasked, once, and record who looked at whose data."""
    row = _load_delivery(console, request)
    whose, subject = _whose(row["payload"]), _subject(row["payload"])
    console.audit(identity, "console.payload_revealed", whose, request, delivery_id=row["id"],
                  svix_id=row["svix_id"], **({"object": subject} if subject not in (None, whose) else {}))
    return delivery(console, request, identity, form, revealed=True)


def replay(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    row = _load_delivery(console, request)
    replayed, status = _replay_if_failed(console, request, identity, row["svix_id"], _subject(row["payload"]))
    done = f"replayed:{status}" if replayed else f"not replayed: delivery {row['id']} is {status}"
    return _redirect(console, request, "delivery", urlencode({"done": done}, safe=":"), delivery_id=row["id"])


def _replay_if_failed(console: Console, request: Request, identity: Identity, svix_id: str,
                      subject: str | None) -> tuple[bool, str]:
    """Re-apply one delivery if it is still ``failed`` (:func:`~clerk_sync.ingest.replay_if_failed`), its
    audit row in that transaction; returns (replayed, status). A double click or a second admin writes
    nothing, as ``clerk-sync replay`` replays only failed ones."""

    def audit(w: Writer, status: DeliveryStatus) -> None:
        record_audit(w, console.audit_entry(identity, "console.delivery_replayed", subject, request,
                                            svix_id=svix_id, result=status))

    return replay_if_failed(console.store, svix_id, audit=audit)


def replay_matching_confirm(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    """What "Replay all failed matching this filter" leads to: how many failed deliveries match (up to
    :data:`MAX_REPLAY`), and the button that replays them (:func:`replay_matching`, a POST with the CSRF token).
    A bulk action on a click alone was one mis-click from replaying a thousand deliveries (WCAG 3.3.4). The
    button carries the row id of the last delivery counted, so no more are replayed than the page said."""
    if console.read_only:
        raise AccessDenied("the console is read-only (CLERK_SYNC_CONSOLE_READ_ONLY is set)")
    where = _delivery_filter({**request.query_params, "status": "failed"})
    with console.store.connect() as conn:
        count, through, more = q.count_upto(conn, where, MAX_REPLAY)
    return console.render(request, "confirm_replay.html", identity, where=where, count=count, through=through,
                          more=more, limit=MAX_REPLAY)


def _bound(form: Form, name: str) -> int | None:
    if not form.get(name):
        return None
    value = _row_id(form[name])
    if value is None:
        raise BadInput(f"{name}={form[name]!r} is not a whole number from 0 to {q.MAX_ID}")
    return value


def replay_matching(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    """Replay every ``failed`` delivery matching the page's filter (at most :data:`MAX_REPLAY`; with ``through``
    and ``count``, as the confirmation page sends them, none past that row id and no more than that count: a
    delivery received after the page, or one that failed meanwhile, does not make it replay more than it said).

    Each replay commits with its own audit row, as a single replay does, so a database error midway
    leaves every delivery replayed so far audited (a summary row written in a ``finally`` would not: the
    error that stopped the loop, the database gone, would often refuse it too). A delivery no longer
    ``failed`` when its turn comes (another click replayed it) is left alone. The summary row, once all
    are done, records the filter and the counts.
    """
    where = _delivery_filter({**form, "status": "failed"})
    through, count = _bound(form, "through"), _bound(form, "count")
    with console.store.connect() as conn:
        found = q.delivery_ids(conn, where, min(MAX_REPLAY, MAX_REPLAY if count is None else count), through)
    counts: dict[str, int] = {}
    left = 0
    for svix_id, subject in found:
        replayed, status = _replay_if_failed(console, request, identity, svix_id, subject)
        if replayed:
            counts[status] = counts.get(status, 0) + 1
        else:
            left += 1
    console.audit(identity, "console.deliveries_replayed", where.clerk_id, request,
                  filter=where.query(), total=len(found), by_status=counts, not_replayed=left,
                  **({"through": through} if through is not None else {}))
    summary = ",".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "none"
    done = f"replayed {len(found) - left} ({summary})" + (f"; not replayed {left} (no longer failed)" if left else "")
    return _redirect(console, request, "deliveries", where.urlencode(done=done))


# -- drift -----------------------------------------------------------------------------------------
def drift(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    state = console.drift.snapshot() if console.drift else None
    return console.render(request, "drift.html", identity, state=state)


def drift_run(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    if console.drift is None:
        raise ConfigError("reconcile needs CLERK_SECRET_KEY (Clerk Dashboard -> API keys)")
    mode = form.get("mode")
    if mode not in ("dry_run", "apply"):
        raise BadInput("mode must be dry_run or apply")
    console.drift.start(dry_run=mode == "dry_run", actor=identity.actor, ip=client_ip(request),
                        audit_details=console.origin(identity))  # 409 when busy
    console.audit(identity, "console.reconcile.started", None, request, dry_run=mode == "dry_run")
    return _redirect(console, request, "drift")


def drift_status(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    return JSONResponse(console.drift.snapshot() if console.drift else {"status": "unavailable"})


# -- users and organizations -----------------------------------------------------------------------
def users_page(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    text = request.query_params.get("q", "")
    before = _before(request)
    with console.store.connect() as conn:
        page = q.search_users(conn, text, before)
        orgs = q.search_organizations(conn, text) if before is None and not text.startswith("user_") else []
    return console.render(request, "users.html", identity, page=page, q=text, orgs=orgs)


def user(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    clerk_id = request.path_params["clerk_id"]
    with console.store.connect() as conn:
        row = q.get_user(conn, clerk_id)
        if row is None:
            raise NotFound(f"no user {clerk_id} in the database (not synced yet? try Drift)")
        context: dict[str, Any] = {
            "memberships": q.memberships(conn, user=clerk_id), "pending": q.pending_changes(conn, clerk_id),
            "recent": q.list_deliveries(conn, q.DeliveryFilter(clerk_id=clerk_id), None, limit=10).rows,
        }
    return console.render(request, "user.html", identity, row=row, can_promote=console.clerk is not None,
                          done=_notice(request), **context)


def set_role(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    """Promote/demote through :class:`AdminActions`, the same audited action as ``clerk-sync users promote``."""
    clerk_id = request.path_params["clerk_id"]
    role = form.get("role", "").strip()
    if not _ROLE.match(role):
        raise BadInput("role must be 1-64 letters, digits, ':', '_' or '-' (e.g. admin, user)")
    if console.clerk is None:
        raise ConfigError("changing a role needs CLERK_SECRET_KEY: Clerk holds the role (public_metadata.role)")
    with console.store.connect() as conn:
        if q.get_user(conn, clerk_id) is None:
            raise NotFound(f"no user {clerk_id} in the database")
    change = AdminActions(console.store, console.clerk).promote(
        clerk_id, role, by=identity.actor, ip=client_ip(request),
        audit_details=console.origin(identity))
    return _redirect(console, request, "user", f"done=role:{change.status}", clerk_id=clerk_id)


def organization(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    clerk_id = request.path_params["clerk_id"]
    with console.store.connect() as conn:
        row = q.get_organization(conn, clerk_id)
        if row is None:
            raise NotFound(f"no organization {clerk_id} in the database")
        members = q.memberships(conn, organization=clerk_id)
        recent = q.list_deliveries(conn, q.DeliveryFilter(clerk_id=clerk_id), None, limit=10).rows
    return console.render(request, "organization.html", identity, row=row, members=members, recent=recent)


# -- audit log -------------------------------------------------------------------------------------
def _audit_filter(values: Any, errors: dict[str, str] | None = None) -> q.AuditFilter:
    found: dict[str, str] = {}
    since, until = _time(values, "since", found), _time(values, "until", found)
    _report(found, errors)
    return q.AuditFilter(actor=values.get("actor") or None, action=values.get("action") or None,
                         target=values.get("target") or None, since=since, until=until)


def audit(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    errors: dict[str, str] = {}
    where = _audit_filter(request.query_params, errors)
    before = _before(request, errors)
    if errors:
        return _refused_filter(console, request, identity, "audit.html", _AUDIT_FIELDS, errors)
    with console.store.connect() as conn:
        page = q.list_audit(conn, where, before)
    return console.render(request, "audit.html", identity, page=page, where=where,
                          shown=_shown(_AUDIT_FIELDS, where.query()), errors={})


_FORMULA = frozenset("=+-@\u2212")  # (U+2212 MINUS SIGN: NFKC keeps it, a spreadsheet may read it as minus)


def _cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a user can put any text into an audited Clerk id (a refused
    impersonation of ``=HYPERLINK(...)``), which would run as a formula when an admin opens the export.

    Prefixed with ``'`` when it starts with a tab, carriage return or line feed, or when its first character
    that is not blank, a control or a format character (a zero-width space, a byte-order mark, a bidi
    control), taken in its NFKC form (full-width U+FF1D is ``=``, small U+FE62 is ``+``), is one that starts a
    formula: ``= + - @`` (pentest of the console: ``\uff1dHYPERLINK(...)``, ``\n=1+1``, ``\u200b=1+1`` went
    out as they were)."""
    if not isinstance(value, str) or not value:
        return value
    if value[0] in "\t\r\n":
        return "'" + value
    for char in value:
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            continue
        if unicodedata.normalize("NFKC", char)[:1] in _FORMULA:
            return "'" + value
        break
    return value


def audit_csv(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    """The filtered audit log as CSV, oldest first: the newest :data:`MAX_CSV_ROWS` rows (the recent ones are
    what an incident needs), then, when older rows were left out, a last row that says so."""
    where = _audit_filter(request.query_params)
    out = io.StringIO()
    writer = csv.writer(out)
    columns = ["id", "created_at", "action", "actor_clerk_id", "target_clerk_id", "impersonator_clerk_id", "ip",
               "details"]
    writer.writerow(columns)
    a = audit_log.c
    with console.store.connect() as conn:
        query = sa.select(audit_log).where(*where.conditions()).order_by(a.id.desc()).limit(MAX_CSV_ROWS + 1)
        rows = list(conn.execute(query).mappings())
    for row in reversed(rows[:MAX_CSV_ROWS]):
        values = [row[c] for c in columns[:-1]]
        values[1] = as_utc(row["created_at"]).isoformat()  # (UTC whatever the session's TimeZone)
        writer.writerow([_cell(v) for v in (*values, _json(row["details"]))])
    if len(rows) > MAX_CSV_ROWS:
        note = (f"only the newest {MAX_CSV_ROWS} matching rows are exported: narrow the filter (until=) "
                "to export the older ones")
        writer.writerow(["", "", "export.truncated", "", "", "", "", _json({"message": note})])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="audit_log.csv"'})


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def logout(console: Console, request: Request, identity: Identity, form: Form) -> Response:
    if identity.csrf is not None:  # a cookie session: its copies end too (Bearer callers hold none)
        try:
            console.audit(identity, SIGN_OUT, identity.clerk_id, request, **console.access.sign_out_details())
        except StoreError as exc:  # this browser is signed out all the same; copies last until they expire
            structlog.get_logger("clerk_sync.console").warning("console_sign_out_unrecorded", error=str(exc),
                                                               who=identity.label)
    response = _redirect(console, request, "login")
    set_session_cookie(request, response, None)
    return response


