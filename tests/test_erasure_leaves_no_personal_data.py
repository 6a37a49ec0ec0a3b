"""Erasure leaves nothing behind (late and failed deliveries, error messages, a large inbox, an erasure passed on
later): after ``users erase`` nothing the person sent stays in any column, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync import outbox
from clerk_sync.changes import Hook
from clerk_sync.config import DatabaseTimeouts
from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import StoreDataError, StoreError
from clerk_sync.events import parse_envelope
from clerk_sync.hooks import Dispatcher
from clerk_sync.hooks.sinks import change_message
from clerk_sync.ingest import WebhookProcessor, replay_deliveries
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.mapping import MappedTable, SchemaMapping, migrate_schema
from clerk_sync.retention import Retention
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_cli import run
from tests.test_hooks import Clock, Recorder, hooked
from tests.test_hooks import deliver as hook_deliver
from tests.test_hooks import jobs as hook_jobs_of
from tests.test_retention import _later, deliver

NAME, MAIL = "Zenobia", "zenobia.secret@example.com"


def _stored(store: Store, svix_id: str) -> tuple[str, str, str | None, Any]:
    """A delivery's payload (as text), status, last error and redaction time."""
    e = webhook_events
    with store.connect() as conn:
        row = conn.execute(sa.select(e.c.payload, e.c.status, e.c.last_error, e.c.redacted_at)
                           .where(e.c.svix_id == svix_id)).one()
    payload = row.payload if isinstance(row.payload, str) else json.dumps(row.payload)
    return payload, row.status, row.last_error, row.redacted_at


def _membership(mem_id: str, org_id: str, user_id: str, updated_at: int) -> dict[str, Any]:
    body = f.membership(mem_id, org_id, user_id, updated_at)
    body["public_user_data"].update(first_name=NAME, identifier=MAIL)
    return body


def test_a_late_membership_deletion_after_erasure_keeps_no_personal_data(store: Store, verifier: WebhookVerifier) -> None:
    """Fixed: erased, then deleted in Clerk (as the CLI says to), the user's
    ``organizationMembership.deleted`` arrived skipped (the erasure had tombstoned the membership) and was
    stored whole, ``public_user_data`` and all. Redacted at once, alone and in a batch; a skipped deletion of
    a live user's membership stays whole."""
    processor = WebhookProcessor(store, verifier)
    assert deliver(processor, f.envelope("user.created", f.user("user_z", 100, email=MAIL, first_name=NAME)),
                   "m1") == "applied"
    for n in (1, 2):
        created = f.envelope("organizationMembership.created", _membership(f"orgmem_{n}", "org_z", "user_z", 100))
        assert deliver(processor, created, f"m_mem{n}") == "applied"
    assert deliver(processor, f.envelope("organizationMembership.created", f.membership("orgmem_live", "org_z",
                                                                                        "user_live", 100)),
                   "m_live") == "applied"
    Retention(store).erase_user("user_z", reason="DSR")

    late = f.envelope("organizationMembership.deleted", _membership("orgmem_1", "org_z", "user_z", 200))
    assert deliver(processor, late, "m_late") == "skipped"
    batch = GroupCommitter(processor).write([("m_late_batch", parse_envelope(f.body_of(f.envelope(
        "organizationMembership.deleted", _membership("orgmem_2", "org_z", "user_z", 200)))))])
    assert [r.status for r in batch] == ["skipped"]  # type: ignore[union-attr]
    for svix_id in ("m_late", "m_late_batch"):
        payload, status, _, redacted_at = _stored(store, svix_id)
        assert MAIL not in payload and NAME not in payload and redacted_at is not None, (svix_id, status)
        assert json.loads(payload)["data"]["public_user_data"] == {"user_id": "user_z"}  # still says whose

    live = f.envelope("organizationMembership.deleted", f.membership("orgmem_live", "org_z", "user_live", 200))
    assert deliver(processor, live, "m_live_deleted") == "applied"
    assert deliver(processor, live, "m_live_again") == "skipped"  # (a re-send under another svix-id)
    assert _stored(store, "m_live_again")[3] is None  # the user is not gone: kept whole


def test_a_failed_delivery_about_a_deleted_or_erased_user_is_stored_redacted(
        store: Store, verifier: WebhookVerifier) -> None:
    """Fixed: a delivery stored ``failed`` after the erasure kept the person's data for good (failed
    deliveries are never pruned). One about an erased or deleted user is stored redacted and settled
    ``skipped`` at once (nothing to replay); one about a live user stays whole and ``failed`` for its replay."""
    processor = WebhookProcessor(store, verifier)
    for user_id in ("user_f", "user_d", "user_live"):
        assert deliver(processor, f.envelope("user.created", f.user(user_id, 100)), f"c_{user_id}") == "applied"
    Retention(store).erase_user("user_f", reason="DSR")
    assert deliver(processor, f.envelope("user.deleted", f.deleted("user", "user_d")), "del_d") == "applied"

    def broken(user_id: str) -> dict[str, Any]:
        bad = _membership(f"orgmem_{user_id}", "org_f", user_id, 300)
        bad["organization"] = None  # no organization id, and no row here to take it from: failed
        return f.envelope("organizationMembership.updated", bad)

    broken_membership = _membership("orgmem_f", "org_f", "user_f", 300)
    broken_membership["organization"] = {"id": 42}  # not an id: failed
    for svix_id, event in (("f_erased", broken("user_f")), ("f_deleted", broken("user_d")),
                           ("f_member", f.envelope("organizationMembership.updated", broken_membership)),
                           ("f_live", broken("user_live"))):
        assert deliver(processor, event, svix_id) == ("failed" if svix_id == "f_live" else "skipped")
    refused = parse_envelope(f.body_of(f.envelope("user.updated", f.user("user_f", 400, email=MAIL))))
    assert processor._store_refused("f_refused", refused, StoreDataError("simulated")).status == "skipped"

    for svix_id in ("f_erased", "f_deleted", "f_member", "f_refused"):
        payload, status, error, redacted_at = _stored(store, svix_id)
        assert (MAIL in payload, NAME in payload, status) == (False, False, "skipped"), svix_id
        assert MAIL not in (error or "") and NAME not in (error or ""), svix_id
        assert redacted_at is not None
    Retention(store, now=_later(400)).prune()  # a year later: those settled skipped (nothing to replay), deleted
    with store.connect() as conn:
        assert set(conn.execute(sa.select(webhook_events.c.svix_id).where(
            webhook_events.c.svix_id.like("f/_%", escape="/"))).scalars()) == {"f_live"}
    payload, status, _, redacted_at = _stored(store, "f_live")
    assert (MAIL in payload, status, redacted_at) == (True, "failed", None)  # a live user's: whole, for its replay
    assert replay_deliveries(store).by_status == {"failed": 1}


def test_a_link_refusal_names_no_address_and_erasure_and_prune_redact_last_errors(
        db_url: str, verifier: WebhookVerifier) -> None:
    """Fixed: an ambiguous link wrote ``e-mail 'x@..'`` into the delivery's ``last_error`` (and the log
    line), where neither erasure nor prune looked. The refusal names the column and the count; a
    ``last_error`` naming the person (an app's message, an older release's refusal) is redacted by the erasure,
    also where the payload already was, and by the prune that redacts the payload; another person's stays."""
    engine = sa.create_engine(db_url)
    legacy = sa.Table("ambiguous_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("email", sa.String(320)), sa.Column("name", sa.String(100)))
    mapping = SchemaMapping(users=MappedTable("ambiguous_accounts", "clerk_user_id",
                                              {"email": "email", "name": "full_name"}, link_by_email="email"))
    with engine.begin() as conn:
        legacy.create(conn)
        conn.execute(legacy.insert(), [{"id": 1, "email": MAIL, "name": "a"}, {"id": 2, "email": MAIL, "name": "b"}])
        migrate_schema(conn, mapping)
    store = Store.from_url(db_url, mapping=mapping)
    processor = WebhookProcessor(store, verifier)
    assert deliver(processor, f.envelope("user.created", f.user("user_l", 100, email=MAIL)), "m_link") == "applied"
    error = _stored(store, "m_link")[2] or ""
    assert MAIL not in error and "2 rows without a Clerk id have user user_l's e-mail (email)" in error, error

    def stored_with(svix_id: str, user_id: str, message: str) -> None:  # as an older release or app code wrote it
        with store.transaction() as writer:
            writer.record_delivery(svix_id, f.body_of(f.envelope("user.updated", f.user(user_id, 50))).decode(),
                                   event_type="user.updated", instance_id=None, event_timestamp=None,
                                   status=DeliveryStatus.SKIPPED, error=message)

    stored_with("m_old", "user_l", f"ambiguous_accounts: 2+ rows without a Clerk id have e-mail {MAIL!r}")
    stored_with("m_other", "user_o", "ValueError: CRM refused joann.doe@example.com")  # another person's
    Retention(store, now=_later(31)).prune()  # the payloads of m_old and m_other redacted, and their errors
    assert [_stored(store, s)[2] for s in ("m_old", "m_other")] == ["(redacted)", "(redacted)"]
    stored_with("m_app", "user_o", f"apply raised KeyError: {MAIL!r}")  # (a payload naming someone else)
    stored_with("m_near", "user_o", f"ValueError: CRM refused x{MAIL}")  # another address that ends alike
    with store.transaction() as writer:  # payload redacted, its error not: an older release's prune
        writer.conn.execute(webhook_events.update().where(webhook_events.c.svix_id == "m_old").values(
            last_error=f"ambiguous_accounts: 2+ rows without a Clerk id have e-mail {MAIL!r}"))
    Retention(store).erase_user("user_l", reason="DSR")
    assert {s: _stored(store, s)[2] for s in ("m_link", "m_old", "m_app", "m_near")} == {
        "m_link": "(redacted)", "m_old": "(redacted)", "m_app": "(redacted)", "m_near": f"ValueError: CRM refused x{MAIL}"}
    assert _stored(store, "m_app")[3] is None  # only its error named them: the other user's payload stays
    store.dispose()
    engine.dispose()


def test_a_hook_job_failing_after_its_users_erasure_keeps_no_message(db_url: str) -> None:
    """Fixed: a handler running while its user was erased failed afterwards, quoting the person; its
    ``last_error`` kept the e-mail until the job was deleted (90 days). A job whose payload is already
    redacted keeps only the exception's name; a live user's job keeps the message."""
    clock = Clock()
    store = hooked(db_url, Hook("crm", lambda change: None), now=clock)
    hook_deliver(store, f.envelope("user.created", f.user("user_j", 1000, email=MAIL)),
                 f.envelope("user.created", f.user("user_k", 1000, email="kept@example.com")))
    with store.transaction() as w:  # a dispatcher claims the jobs and runs the handlers
        running = outbox.claim(w.conn, clock(), lease=timedelta(seconds=60), limit=10, max_attempts=1)
    assert sorted(job.change.clerk_id for job in running) == ["user_j", "user_k"]
    Retention(store).erase_user("user_j", reason="DSR")  # meanwhile
    with store.transaction() as w:
        for job in running:
            assert outbox.fail(w.conn, job, f"ValueError: CRM refused contact {job.change.values['email']}", None)
    errors = {j["payload"]["clerk_id"]: j["last_error"] for j in hook_jobs_of(store) if j["status"] == "dead"}
    store.dispose()
    assert errors == {"user_j": "ValueError: (redacted)", "user_k": "ValueError: CRM refused contact kept@example.com"}


@pytest.fixture
def big_inbox(db_url: str) -> str:
    """A database whose inbox holds 20,000 deliveries (one of them user_7's), filled in SQL."""
    template = json.dumps(f.envelope("user.updated", f.user("user_XXXX", 1, email="XXXX@example.com")))
    engine = create_engine(db_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(
                "INSERT INTO webhook_events (svix_id, type, received_at, payload, status) SELECT 'msg_' || g, "
                "'user.updated', now(), replace(:t, 'XXXX', g::text)::jsonb, 'applied' FROM generate_series(1, 20000) g"
            ), {"t": template})
        else:  # MariaDB's sequence engine
            conn.execute(sa.text(
                "INSERT INTO webhook_events (svix_id, type, received_at, payload, status, attempts) SELECT "
                "CONCAT('msg_', seq), 'user.updated', CURRENT_TIMESTAMP, REPLACE(:t, 'XXXX', seq), 'applied', 1 "
                "FROM seq_1_to_20000"), {"t": template})
    engine.dispose()
    return db_url


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_erasure_of_a_large_inbox_is_not_bounded_by_the_statement_timeout(big_inbox: str) -> None:
    """Fixed: ``users erase`` searched a 700,000-delivery inbox in statements longer than the 15 s
    bound deliveries keep, and failed. The bound is lifted for the erasure's transaction (20 ms here, where
    the search takes far longer) and is back on the connection afterwards."""
    store = Store(create_engine(big_inbox, timeouts=DatabaseTimeouts(statement_s=0.02)))
    report = Retention(store).erase_user("user_7", reason="DSR")
    assert (report.row_existed, report.payloads_redacted) == (False, 1)
    show = "SHOW statement_timeout" if store.dialect == "postgresql" else "SELECT @@SESSION.max_statement_time"
    with store.connect() as conn:  # (the pool's one connection: the erasure's)
        assert str(conn.exec_driver_sql(show).scalar()) in ("20ms", "0.02")  # PostgreSQL's, MariaDB's
    store.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_an_erasure_that_waited_too_long_for_a_lock_says_what_to_change(db_url: str) -> None:
    store = Store(create_engine(db_url, timeouts=DatabaseTimeouts(lock_s=0.2)))
    hook_deliver(store, f.envelope("user.created", f.user("user_w", 1000, email=MAIL)))
    holder = create_engine(db_url)
    with holder.begin() as conn:  # a delivery for this user in progress elsewhere
        conn.execute(sa.text("SELECT id FROM users WHERE clerk_id = 'user_w' FOR UPDATE"))
        with pytest.raises(StoreError, match="CLERK_SYNC_DB_LOCK_TIMEOUT_S") as refused:
            Retention(store).erase_user("user_w", reason="DSR")
    assert "nothing was applied, retry later" in str(refused.value)  # (the erasure's transaction rolled back)
    holder.dispose()
    store.dispose()


_MAPPED = """
from clerk_sync.changes import Hook
from clerk_sync.mapping import MappedTable, SchemaMapping, SoftDelete

HOOKS = [Hook("crm", lambda change: None, on=["user.deleted", "organizationMembership.deleted"])]
MAPPING = SchemaMapping(
    users=MappedTable("erased_accounts", "clerk_user_id", {"email": "email", "name": "full_name"},
                      on_delete=SoftDelete("deleted_at")),
    memberships=MappedTable("erased_seats", "clerk_membership_id", {"member": "user_clerk_id"},
                            on_delete=SoftDelete("deleted_at")))
"""


def test_an_erasure_run_again_with_the_mapping_and_hooks_passes_the_deletion_on(db_url: str, tmp_path: Path) -> None:
    """Fixed: ``users erase`` without ``--mapping`` (it had no ``--hooks``) told neither the app's
    tables nor the hooks, and run again with ``--mapping`` (as its notice says) it cleared the personal columns
    but left the app's row live: the tombstone was already there, so the deletion applied nowhere. Run again
    with them, the deletion reaches both (the memberships deleted with the user first), once per run's
    options; with them the first time, the notice is not printed."""
    engine = sa.create_engine(db_url)
    meta = sa.MetaData()
    sa.Table("erased_accounts", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("email", sa.String(320)), sa.Column("name", sa.String(100)))
    sa.Table("erased_seats", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("member", sa.String(64)))
    meta.create_all(engine)
    (tmp_path / "erasemap.py").write_text(_MAPPED)
    sys.path.insert(0, str(tmp_path))
    try:
        from erasemap import MAPPING  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("erasemap", None)  # (each run's own file)
    with engine.begin() as conn:
        migrate_schema(conn, MAPPING)
    app = Store.from_url(db_url, mapping=MAPPING)
    hook_deliver(app, f.envelope("user.created", f.user("user_m", 100, email=MAIL, first_name=NAME)),
                 f.envelope("user.created", f.user("user_n", 100, email="n@example.com")),
                 f.envelope("organizationMembership.created", f.membership("orgmem_m", "org_1", "user_m", 100)),
                 f.envelope("organizationMembership.created", f.membership("orgmem_n", "org_1", "user_n", 100)))
    env = {"DATABASE_URL": db_url, "PYTHONPATH": str(tmp_path)}

    plain = run("users", "erase", "user_m", env=env)  # forgot both
    assert plain.returncode == 0, plain.stderr
    assert "--mapping module:attribute or --hooks module:attribute, run this again" in " ".join(plain.stdout.split())

    def app_rows() -> dict[str, tuple[Any, ...]]:
        with engine.connect() as conn:
            users = {r[0]: tuple(r[1:]) for r in conn.execute(sa.text(
                "SELECT clerk_user_id, email, deleted_at IS NOT NULL FROM erased_accounts"))}
            seats = {r[0]: (r[1],) for r in conn.execute(sa.text(
                "SELECT clerk_membership_id, deleted_at IS NOT NULL FROM erased_seats"))}
        return users | seats

    assert app_rows() == {"user_m": (MAIL, False), "user_n": ("n@example.com", False),
                          "orgmem_m": (False,), "orgmem_n": (False,)}
    again = run("users", "erase", "user_m", "--mapping", "erasemap:MAPPING", "--hooks", "erasemap:HOOKS", env=env)
    assert again.returncode == 0 and "run this again" not in again.stdout, again.stdout + again.stderr
    assert {k: tuple(bool(v) for v in row) for k, row in app_rows().items()} == {
        "user_m": (False, True), "user_n": (True, False), "orgmem_m": (True,), "orgmem_n": (False,)}
    jobs = [(j["type"], j["payload"]["clerk_id"]) for j in hook_jobs_of(app)]
    assert jobs == [("organizationMembership.deleted", "orgmem_m"), ("user.deleted", "user_m")]
    # Clerk's own user.deleted, arriving after the erasure, changes nothing: the deletion was passed on already
    assert hook_deliver(app, f.envelope("user.deleted", f.deleted("user", "user_m"))) == ["skipped"]
    first = run("users", "erase", "user_n", "--mapping", "erasemap:MAPPING", "--hooks", "erasemap:HOOKS", env=env)
    assert first.returncode == 0 and "run this again" not in first.stdout, first.stdout + first.stderr
    assert [j["type"] for j in hook_jobs_of(app)][2:] == ["organizationMembership.deleted", "user.deleted"]
    app.dispose()
    engine.dispose()


def test_apply_many_in_stores_a_late_event_of_an_erased_user_redacted(store: Store, verifier: WebhookVerifier) -> None:
    """Fixed: the batch form of apply_in (public) kept a pipelined late event whole on PostgreSQL,
    where the group committer redacts it (``forget_if_deleted``)."""
    mail = "zenobia.secret@example.com"
    processor = WebhookProcessor(store, verifier)
    assert deliver(processor, f.envelope("user.created", f.user("user_z", 100, email=mail)), "u1") == "applied"
    Retention(store).erase_user("user_z", reason="DSR")
    late = parse_envelope(f.body_of(f.envelope("user.updated", f.user("user_z", 200, email=mail))))
    fresh = parse_envelope(f.body_of(f.envelope("user.created", f.user("user_y", 100, email="y@example.com"))))
    with store.transaction() as writer:
        outcomes = processor.apply_many_in(writer, [("late", late), ("fresh", fresh)])
    assert [o.status for o in outcomes] == ["skipped", "applied"]
    with store.connect() as conn:
        stored = dict(conn.execute(sa.select(webhook_events.c.svix_id, webhook_events.c.payload)).all())
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in stored.items()}
    assert mail not in text["late"] and "y@example.com" in text["fresh"]


def test_clearing_a_deleted_users_tombstone_redacts_the_audit_details_quoting_their_address(
        store: Store, verifier: WebhookVerifier) -> None:
    """Fixed: once retention had cleared the tombstone (and redacted the user's events), a later
    erasure no longer knew the address, and an audit row quoting it stayed. The clearing redacts it."""
    from clerk_sync.auth.audit import AuditEntry, record_audit
    from clerk_sync.tables import audit_log

    mail = "zenobia.secret@example.com"
    processor = WebhookProcessor(store, verifier)
    assert deliver(processor, f.envelope("user.created", f.user("user_z", 100, email=mail)), "u1") == "applied"
    with store.transaction() as w:
        record_audit(w, AuditEntry("support.ticket", "user_admin", "user_z", details={"note": f"from {mail}",
                                                                                     "ticket": 7}))
        record_audit(w, AuditEntry("support.ticket", "user_admin", "user_q", details={"note": "from q@example.com"}))
    assert deliver(processor, f.envelope("user.deleted", f.deleted("user", "user_z")), "u2") == "applied"
    Retention(store, now=_later(31)).prune()  # the default policy: tombstone cleared, the user's events redacted
    with store.connect() as conn:
        details = [d if isinstance(d, dict) else json.loads(d)
                   for d in conn.execute(sa.select(audit_log.c.details).order_by(audit_log.c.id)).scalars()]
    assert details == [{"ticket": 7, "redacted": True}, {"note": "from q@example.com"}]
    Retention(store).erase_user("user_z", reason="DSR")  # a request later finds nothing more to do there
    with store.connect() as conn:
        texts = [d if isinstance(d, str) else json.dumps(d) for d in conn.execute(sa.select(audit_log.c.details)).scalars()]
    assert not any(mail in t for t in texts), texts


def test_an_erasure_after_the_deletion_reaches_receivers_that_deduplicate_or_keep_the_last_version(
        db_url: str) -> None:
    """Review of the forwarding docs: a user deleted in Clerk (its ``user.deleted`` sent to the hooks with the
    row's last values), then erased: the erasure's ``user.deleted`` repeated the deletion's version and
    idempotency key, so a receiver deduplicating on the key (``webhook-id``), or ignoring what is not newer
    than a deletion, dropped it and kept the person's values. It is versioned when erased: a key of its own."""
    recorder = Recorder()
    app = hooked(db_url, Hook("forward", recorder))
    hook_deliver(app, f.envelope("user.created", f.user("user_e", 100, email=MAIL, first_name=NAME)),
                 f.envelope("user.deleted", f.deleted("user", "user_e"), 200))
    deletion = [j for j in hook_jobs_of(app) if j["type"] == "user.deleted"]
    assert len(deletion) == 1 and deletion[0]["payload"]["values"].get("email") == MAIL  # the last values
    Retention(app).erase_user("user_e", reason="art. 17")
    erasure = [j for j in hook_jobs_of(app) if j["type"] == "user.deleted"][1:]
    assert len(erasure) == 1, hook_jobs_of(app)
    assert erasure[0]["payload"]["values"] == {}
    assert erasure[0]["idempotency_key"] != deletion[0]["idempotency_key"]
    assert erasure[0]["payload"]["version"] > deletion[0]["payload"]["version"]
    app.dispose()


def test_a_hook_job_queued_before_its_users_erasure_reaches_its_handler_marked_redacted(db_url: str) -> None:
    """Fixed: the erasure emptied the queued change's ``values`` (``{}``) and its handler could not tell: the
    README's ``change.values["email"]`` failed with KeyError for four hours, then the job was dead (and
    ClerkSyncHookJobsDead paged). ``Change.redacted`` says it; the forwarded body carries ``data.redacted``."""
    clock = Clock()
    seen = Recorder()
    store = hooked(db_url, Hook("welcome", seen, on=["user.created"]), now=clock)
    hook_deliver(store, f.envelope("user.created", f.user("user_j", 1000, email=MAIL)),
                 f.envelope("user.created", f.user("user_k", 1000, email="kept@example.com")))
    Retention(store).erase_user("user_j", reason="DSR")
    Dispatcher(store, now=clock).drain()
    store.dispose()
    by_id = {change.clerk_id: change for change in seen.seen}
    assert (by_id["user_j"].redacted, by_id["user_j"].values, by_id["user_j"].previous) == (True, {}, {})
    assert by_id["user_k"].redacted is False and by_id["user_k"].values["email"] == "kept@example.com"
    assert change_message(by_id["user_j"])["data"]["redacted"] is True
    assert "redacted" not in change_message(by_id["user_k"])["data"]  # (a live user's body as it was)
