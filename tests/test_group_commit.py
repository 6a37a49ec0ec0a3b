"""Group commit (``serve``): deliveries share one transaction, and one delivery the database refuses or
cannot lock does not fail its batch-mates; concurrent requests really end up in one batch."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from clerk_sync.config import DatabaseTimeouts
from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import StoreError
from clerk_sync.events import Envelope, parse_envelope
from clerk_sync.ingest import Outcome, WebhookProcessor
from clerk_sync.integrations._committer import ALONE, GroupCommitter
from clerk_sync.integrations.starlette import WebhookFastPath
from clerk_sync.store import Store
from clerk_sync.tables import organization_memberships, organizations, users, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests._server import running
from tests.test_crash_safety import _users_refuse_inserts


def _statements_sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every psycopg statement the writers send from now on (SQL text, in order)."""
    import clerk_sync.store as store_module

    sent: list[str] = []
    run_raw = store_module._run_raw

    def counting(raw: Any, statements: Any, **kw: Any) -> Any:
        sent.extend(sql for sql, _ in statements)
        return run_raw(raw, statements, **kw)

    monkeypatch.setattr(store_module, "_run_raw", counting)
    return sent


def _parsed(event: dict[str, Any]) -> Envelope:
    return parse_envelope(f.body_of(event))


def _statuses(results: list[Any]) -> list[Any]:
    return [r.status if isinstance(r, Outcome) else r for r in results]


def _inbox(store: Store) -> dict[str, str]:
    with store.connect() as conn:
        return dict(conn.execute(sa.select(webhook_events.c.svix_id, webhook_events.c.status)).all())


def test_a_batch_writes_every_delivery_in_one_transaction(store: Store, verifier: WebhookVerifier) -> None:
    ns = uuid.uuid4().hex[:8]
    committer = GroupCommitter(WebhookProcessor(store, verifier))
    batch = [
        (f"m{ns}_1", _parsed(f.envelope("user.created", f.user(f"user_{ns}a", 10)))),
        (f"m{ns}_2", _parsed(f.envelope("user.created", f.user(f"user_{ns}b", 10)))),
        (f"m{ns}_3", _parsed(f.envelope("user.updated", f.user(f"user_{ns}a", 5)))),  # older: skipped
        (f"m{ns}_1", _parsed(f.envelope("user.created", f.user(f"user_{ns}a", 10)))),  # same svix id again
        (f"m{ns}_4", _parsed(f.envelope("organization.created", f.organization(f"org_{ns}", 10)))),
        (f"m{ns}_5", _parsed(f.envelope("organizationMembership.created",
                                        f.membership(f"mem_{ns}", f"org_{ns}", f"user_{ns}a", 10)))),
        (f"m{ns}_6", _parsed(f.envelope("user.deleted", f.deleted("user", f"user_{ns}b")))),
        (f"m{ns}_7", _parsed(f.envelope("email.created", {"id": "ema_1", "object": "email"}))),
    ]
    results = committer.write(batch)
    assert _statuses(results) == ["applied", "applied", "skipped", "duplicate", "applied", "applied", "applied",
                                  "ignored"]
    assert committer.batches == 1 and committer.committed == len(batch)
    assert _inbox(store) == {f"m{ns}_{i}": s for i, s in
                             enumerate(["applied", "applied", "skipped", "applied", "applied", "applied", "ignored"],
                                       start=1)}
    with store.connect() as conn:
        live = dict(conn.execute(sa.select(users.c.clerk_id, users.c.deleted_at.is_(None))).all())
        org = conn.execute(sa.select(organizations.c.clerk_id)).scalar_one()
        member = conn.execute(sa.select(organization_memberships.c.user_clerk_id)).scalar_one()
    assert live == {f"user_{ns}a": True, f"user_{ns}b": False}
    assert (org, member) == (f"org_{ns}", f"user_{ns}a")


def test_a_refused_delivery_leaves_the_batch_and_the_rest_commits(store: Store, verifier: WebhookVerifier) -> None:
    processor = WebhookProcessor(store, verifier)
    committer = GroupCommitter(processor)
    batch = [
        ("msg_u1", _parsed(f.envelope("user.created", f.user("user_refused_1", 10)))),
        ("msg_o1", _parsed(f.envelope("organization.created", f.organization("org_ok_1", 10)))),
        ("msg_u2", _parsed(f.envelope("user.created", f.user("user_refused_2", 10)))),
        ("msg_o2", _parsed(f.envelope("organization.created", f.organization("org_ok_2", 10)))),
    ]
    with _users_refuse_inserts(store):
        results = committer.write(batch)
    # The user rows are refused (a trigger): those two are to be written alone (where the refusal is a
    # 503, as without group commit); their batch-mates committed.
    assert _statuses(results) == [ALONE, "applied", ALONE, "applied"]
    assert _inbox(store) == {"msg_o1": "applied", "msg_o2": "applied"}
    assert committer.batches == 1 and committer.committed == 2
    # Written alone once the table accepts them again, as Svix's retry would.
    assert processor.apply_alone(*batch[0]).status == DeliveryStatus.APPLIED


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_user_locked_elsewhere_is_written_alone_without_holding_the_batch(db_url: str,
                                                                           verifier: WebhookVerifier) -> None:
    store = Store.from_url(db_url, timeouts=DatabaseTimeouts(lock_s=10.0))
    committer = GroupCommitter(WebhookProcessor(store, verifier), lock_wait_s=0.05)
    committer.write([("msg_seed", _parsed(f.envelope("user.created", f.user("user_held", 1))))])
    foreign = sa.create_engine(db_url)
    try:
        with foreign.connect() as conn, conn.begin():  # a stuck replica holds the user's row
            conn.execute(users.update().where(users.c.clerk_id == "user_held").values(first_name="Stuck"))
            started = time.monotonic()
            results = committer.write([
                ("msg_held", _parsed(f.envelope("user.updated", f.user("user_held", 2)))),
                ("msg_free", _parsed(f.envelope("user.created", f.user("user_free", 2)))),
                ("msg_org", _parsed(f.envelope("organization.created", f.organization("org_free", 2)))),
            ])
            waited = time.monotonic() - started
    finally:
        foreign.dispose()
    assert _statuses(results) == [ALONE, "applied", "applied"]
    assert waited < 5.0  # the batch gave up on the lock long before the 10 s lock_timeout
    assert _inbox(store) == {"msg_seed": "applied", "msg_free": "applied", "msg_org": "applied"}
    store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_concurrent_requests_share_one_batch_and_are_answered_after_its_commit(
        store: Store, verifier: WebhookVerifier) -> None:
    processor = WebhookProcessor(store, verifier)
    committer = GroupCommitter(processor)
    app = WebhookFastPath(Starlette(), processor, committer=committer)
    posts = [f.signed(f.envelope("user.created", f.user(f"user_c{i}", 10)), f"msg_c{i}") for i in range(10)]
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(10) as pool:
        # Hold the store's writer lock: the first batch's transaction waits for it, the others queue
        # (and then all go in the second batch).
        with store._writers:
            futures = [pool.submit(client.post, "/webhooks/clerk", content=body, headers=headers)
                       for headers, body in posts]
            deadline = time.monotonic() + 20
            # every delivery submitted, and handed to the writers (once per turn of the event loop)
            while (committer.waiting < len(posts) or committer._pending) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert committer.waiting == len(posts) and not committer._pending
            assert not any(fut.done() for fut in futures)  # nothing is answered before its COMMIT
            assert _inbox_count(store) == 0
        answers = [fut.result(timeout=30) for fut in futures]
    committer.close()
    assert [a.status_code for a in answers] == [200] * len(posts)
    assert {a.json()["status"] for a in answers} == {"applied"}
    assert (committer.batches, committer.committed) == (2, len(posts))
    assert len(_inbox(store)) == len(posts)


def _two_users_an_org_and_a_membership(processor: WebhookProcessor, base: int) -> None:
    """``user_alone`` and ``user_batch`` (first name "Old"), ``org_1`` and ``orgmem_1`` (user_alone's), applied
    in one batch at ``base``."""
    first = [f.envelope("user.created", f.user("user_alone", base, first_name="Old")),
             f.envelope("user.created", f.user("user_batch", base, first_name="Old")),
             f.envelope("organization.created", f.organization("org_1", base)),
             f.envelope("organizationMembership.created", f.membership("orgmem_1", "org_1", "user_alone", base))]
    assert _statuses(GroupCommitter(processor).write([(f"msg_{i}", _parsed(e)) for i, e in enumerate(first)])) == [
        "applied"] * 4


def _inbox_count(store: Store) -> int:
    # A reader beside the held writer lock (WAL: readers do not wait for the writer).
    with store.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(webhook_events)).scalar_one())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_fast_path_refuses_like_the_endpoint_and_passes_other_routes_on(
        store: Store, verifier: WebhookVerifier) -> None:
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(_: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    processor = WebhookProcessor(store, verifier, max_body_bytes=4096)
    app = WebhookFastPath(Starlette(routes=[Route("/hello", hello)]), processor,
                          committer=GroupCommitter(processor))
    headers, body = f.signed(f.envelope("user.created", f.user("user_fp", 10)), "msg_fp")
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/hello").text == "hello"
        bad = client.post("/webhooks/clerk", content=body, headers={**headers, "svix-signature": "v1,AAAA"})
        assert bad.status_code == 401, bad.text
        big = client.post("/webhooks/clerk", content=b"x" * 5000, headers=headers)
        assert big.status_code == 413
        ok = client.post("/webhooks/clerk", content=body, headers=headers)
        again = client.post("/webhooks/clerk", content=body, headers=headers)
    assert (ok.status_code, ok.json()) == (200, {"status": "applied", "svix_id": "msg_fp"})
    assert again.json()["status"] == "duplicate"
    assert _inbox(store) == {"msg_fp": "applied"}


def test_batches_in_any_order_converge_to_the_model(store: Store, verifier: WebhookVerifier) -> None:
    """Random histories (deletes, membership cascades, stale updates) delivered shuffled, with
    redeliveries, in batches of up to 12 through the committer (on PostgreSQL: the pipelined
    statements) end in the rows the pure model says, every inbox row once and terminal."""
    import random

    from tests._history import TERMINAL_STATUSES, bodies, db_rows, inbox, model, random_history

    committer = GroupCommitter(WebhookProcessor(store, verifier))
    for seed in range(4):
        rng = random.Random(seed)
        history = random_history(rng, n_users=6, n_orgs=3, n_memberships=8, n_steps=60)
        ns = uuid.uuid4().hex[:10]
        all_bodies = bodies(history, ns)
        order = [*range(len(all_bodies)), *rng.choices(range(len(all_bodies)), k=15)]
        rng.shuffle(order)
        results: list[Any] = []
        while order:
            size = rng.randint(1, 12)
            chunk, order = order[:size], order[size:]
            results += committer.write([(f"msg_{ns}_{i}", parse_envelope(all_bodies[i])) for i in chunk])
        assert all(isinstance(r, Outcome) for r in results)
        with store.connect() as conn:
            assert db_rows(conn, ns) == model(all_bodies), f"seed {seed}"
            stored = inbox(conn, f"msg_{ns}_")
        assert len(stored) == len(all_bodies)
        assert all(len(s) == 1 and s[0] in TERMINAL_STATUSES for s in stored.values())


def test_a_batch_gives_every_delivery_the_outcome_it_gets_alone(store: Store, verifier: WebhookVerifier) -> None:
    """The same shuffled deliveries (redeliveries, an entity twice or more in one batch, stale updates,
    deletions and memberships between them), once in batches of up to 16 (on PostgreSQL the plain
    upserts of a batch go in "waves", one statement each) and once one at a time in a second
    namespace: each delivery ends with the same status, and the rows are the same."""
    import random

    from tests._history import bodies, db_rows, inbox, normalize, random_history

    processor = WebhookProcessor(store, verifier)
    committer = GroupCommitter(processor)
    for seed in range(3):
        rng = random.Random(100 + seed)
        history = random_history(rng, n_users=4, n_orgs=2, n_memberships=4, n_steps=50)
        batched_ns, alone_ns = uuid.uuid4().hex[:10], uuid.uuid4().hex[:10]
        order = [*range(len(history)), *rng.choices(range(len(history)), k=20)]
        rng.shuffle(order)
        batched_bodies, alone_bodies = bodies(history, batched_ns), bodies(history, alone_ns)
        batched: list[Any] = []
        rest = list(order)
        while rest:
            size = rng.randint(8, 16)
            chunk, rest = rest[:size], rest[size:]
            batched += committer.write([(f"msg_{batched_ns}_{i}", parse_envelope(batched_bodies[i])) for i in chunk])
        alone = [processor.apply_alone(f"msg_{alone_ns}_{i}", parse_envelope(alone_bodies[i])) for i in order]
        assert _statuses(batched) == _statuses(alone), f"seed {seed}"
        assert committer.retried == 0  # (on PostgreSQL: no wave failed over to one statement at a time)
        assert {DeliveryStatus.APPLIED, DeliveryStatus.SKIPPED, DeliveryStatus.DUPLICATE} <= set(_statuses(alone))
        with store.connect() as conn:
            assert normalize(db_rows(conn, batched_ns), batched_ns) == normalize(db_rows(conn, alone_ns), alone_ns)
            assert normalize(inbox(conn, f"msg_{batched_ns}_"), batched_ns) == normalize(
                inbox(conn, f"msg_{alone_ns}_"), alone_ns)


def test_hooks_see_every_change_written_through_group_commit(db_url: str, verifier: WebhookVerifier) -> None:
    """Each applied change of a batch queues its outbox job in the batch's transaction (on PostgreSQL by the
    delivery's own statement, without falling back to one statement at a time); stale ones queue none."""
    from clerk_sync.changes import Hook
    from clerk_sync.tables import hook_jobs

    store = Store.from_url(db_url, hooks=[Hook("welcome", lambda change: None, on=["user.created", "user.updated"])])
    try:
        batch = [
            ("mh_1", _parsed(f.envelope("user.created", f.user("user_h1", 10)))),
            ("mh_2", _parsed(f.envelope("user.created", f.user("user_h2", 10)))),
            ("mh_3", _parsed(f.envelope("user.updated", f.user("user_h1", 5)))),  # stale: no job
            ("mh_4", _parsed(f.envelope("user.updated", f.user("user_h2", 20, first_name="New")))),
        ]
        committer = GroupCommitter(WebhookProcessor(store, verifier))
        results = committer.write(batch)
        assert _statuses(results) == ["applied", "applied", "skipped", "applied"]
        assert committer.retried == 0
        with store.connect() as conn:
            jobs = conn.execute(sa.select(hook_jobs.c.type, hook_jobs.c.entity_key).order_by(hook_jobs.c.id)).all()
        assert [job.type for job in jobs] == ["user.created", "user.created", "user.updated"]
    finally:
        store.dispose()


def test_mapping_refusals_never_fail_the_batch_nor_hold_back_the_delivery(tmp_path: Any,
                                                                          verifier: WebhookVerifier) -> None:
    """Review findings: an ambiguous link (StoreDataError raised by our code, not the database) and a
    UNIQUE clash in the app's own table (IntegrityError) used to fail every batch they landed in, 503
    forever; then the whole delivery was stored ``failed``, its contract row (a ban) held back with it.
    Now the app's row alone is refused (a savepoint), reported in the delivery's last_error, and the
    batch commits whole."""
    from clerk_sync import migrations
    from clerk_sync.mapping import MappedTable, SchemaMapping, SoftDelete
    from clerk_sync.store import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE accounts (id INTEGER PRIMARY KEY, clerk_user_id VARCHAR(64) UNIQUE, "
                             "email VARCHAR(320) UNIQUE, deleted_at TIMESTAMP)")
        conn.exec_driver_sql("INSERT INTO accounts (email) VALUES ('legacy@x.io')")
        conn.exec_driver_sql("CREATE TABLE legacy (id INTEGER PRIMARY KEY, clerk_user_id VARCHAR(64) UNIQUE, "
                             "email VARCHAR(320), deleted_at TIMESTAMP)")
        conn.exec_driver_sql("INSERT INTO legacy (email) VALUES ('dup@x.io'), ('dup@x.io')")
    clash = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"},
                                            on_delete=SoftDelete("deleted_at")))
    ambiguous = SchemaMapping(users=MappedTable("legacy", "clerk_user_id", {"email": "email"}, link_by_email="email"))
    for mapping, bad_email in ((clash, "legacy@x.io"), (ambiguous, "dup@x.io")):
        store = Store(engine, mapping=mapping)
        processor = WebhookProcessor(store, verifier)
        tag = uuid.uuid4().hex[:6]
        batch = [(f"a{tag}", _parsed(f.envelope("user.created", f.user(f"user_ok{tag}", 10, email=f"{tag}@x.io")))),
                 (f"b{tag}", _parsed(f.envelope("user.created", f.user(f"user_bad{tag}", 10, email=bad_email)))),
                 (f"c{tag}", _parsed(f.envelope("organization.created", f.organization(f"org_{tag}", 10))))]
        results = GroupCommitter(processor).write(batch)
        assert _statuses(results) == ["applied"] * 3
        assert "the app's table refused" in (results[1].error or "")  # type: ignore[union-attr]
        inbox = _inbox(store)
        assert (inbox[f"a{tag}"], inbox[f"b{tag}"], inbox[f"c{tag}"]) == ("applied", "applied", "applied")
        with store.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM users WHERE clerk_id = :c"),
                                {"c": f"user_bad{tag}"}).scalar_one() == 1
    engine.dispose()


def test_erased_entities_stay_gone_through_a_batch(store: Store, verifier: WebhookVerifier) -> None:
    """The batched paths (on PostgreSQL the pipelined one-statement upserts) consult the digests of
    hard-deleted tombstones like the one-delivery path does."""
    from datetime import UTC, datetime, timedelta

    from clerk_sync.retention import Retention, RetentionPolicy

    ns = uuid.uuid4().hex[:8]
    user_id, org_id = f"user_{ns}", f"org_{ns}"
    committer = GroupCommitter(WebhookProcessor(store, verifier))
    first = [(f"a{ns}_1", _parsed(f.envelope("user.created", f.user(user_id, 10)))),
             (f"a{ns}_2", _parsed(f.envelope("organization.created", f.organization(org_id, 10)))),
             (f"a{ns}_3", _parsed(f.envelope("organizationMembership.created",
                                             f.membership(f"mem_{ns}", org_id, user_id, 10)))),
             (f"a{ns}_4", _parsed(f.envelope("user.deleted", f.deleted("user", user_id))))]
    assert _statuses(committer.write(first)) == ["applied"] * 4
    later = datetime.now(UTC) + timedelta(days=2)
    policy = RetentionPolicy(delete_tombstones_after=timedelta(days=1))
    assert Retention(store, policy, now=lambda: later).prune().erased == 2
    late = [(f"b{ns}_1", _parsed(f.envelope("user.created", f.user(user_id, 20)))),
            (f"b{ns}_2", _parsed(f.envelope("user.updated", f.user(user_id, 30)))),
            (f"b{ns}_3", _parsed(f.envelope("organizationMembership.updated",
                                            f.membership(f"mem_{ns}", org_id, user_id, 20)))),
            (f"b{ns}_4", _parsed(f.envelope("organization.updated", f.organization(org_id, 20))))]
    assert _statuses(committer.write(late)) == ["skipped", "skipped", "skipped", "applied"]
    # A membership never seen before, of the erased user: the pipelined membership statement refuses it too.
    other = [(f"c{ns}_1", _parsed(f.envelope("organizationMembership.created",
                                             f.membership(f"mem2_{ns}", org_id, user_id, 40))))]
    assert _statuses(committer.write(other)) == ["skipped"]
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.clerk_id).where(users.c.clerk_id == user_id)).first() is None
        assert conn.execute(sa.select(organization_memberships.c.id)).first() is None


def test_a_mapped_row_the_app_table_refuses_leaves_the_pipelined_batch(db_url: str, verifier: WebhookVerifier) -> None:
    """On PostgreSQL the mapped rows of a batch go in one pipeline: a UNIQUE clash in the app's table
    fails it, and the batch is written again one statement at a time, where the clashing delivery's app
    row alone is refused (reported in its last_error) and written again without the columns the user sets in
    Clerk (its e-mail); every delivery commits with its jobs."""
    from clerk_sync.changes import Hook
    from clerk_sync.mapping import MappedTable, SchemaMapping, SoftDelete, migrate_schema
    from clerk_sync.tables import hook_jobs

    engine = sa.create_engine(db_url)
    accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("email", sa.String(320), unique=True))
    with engine.begin() as conn:
        accounts.create(conn)
        conn.execute(accounts.insert().values(email="legacy@x.io"))
    mapping = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"},
                                              on_delete=SoftDelete("deleted_at")))
    with engine.begin() as conn:
        migrate_schema(conn, mapping)
    engine.dispose()
    store = Store.from_url(db_url, mapping=mapping, hooks=[Hook("welcome", lambda change: None)])
    try:
        processor = WebhookProcessor(store, verifier)
        batch = [("ok1", _parsed(f.envelope("user.created", f.user("user_ok1", 10, email="a@x.io")))),
                 ("bad", _parsed(f.envelope("user.created", f.user("user_bad", 10, email="legacy@x.io")))),
                 ("ok2", _parsed(f.envelope("user.created", f.user("user_ok2", 10, email="b@x.io"))))]
        results = GroupCommitter(processor).write(batch)
        outcomes = [r if r is not ALONE else processor.apply_alone(*batch[i]) for i, r in enumerate(results)]
        assert _statuses(outcomes) == ["applied"] * 3
        assert "the app's table refused" in (outcomes[1].error or "")  # type: ignore[union-attr]
        assert "without the columns the user can set in Clerk (email)" in (outcomes[1].error or "")  # type: ignore[union-attr]
        with store.connect() as conn:
            emails = set(conn.exec_driver_sql("SELECT email FROM accounts WHERE clerk_user_id IS NOT NULL").scalars())
            jobs = list(conn.execute(sa.select(hook_jobs.c.idempotency_key)).scalars())
        assert emails == {"a@x.io", "b@x.io", None}  # user_bad's row, without the e-mail another row holds
        assert sorted(jobs) == ["user.created:user_bad:10", "user.created:user_ok1:10", "user.created:user_ok2:10"]
    finally:
        store.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("mapped", [False, True], ids=["contract", "mapped+hook"])
def test_users_and_organizations_of_a_batch_go_in_one_statement_per_type_and_wave(
        db_url: str, verifier: WebhookVerifier, monkeypatch: pytest.MonkeyPatch, mapped: bool) -> None:
    """A batch of 12 user deliveries (two of them for the same user, one a re-send) and 2 organization
    deliveries is sent as 3 statements (users in two waves, organizations in one) plus the lock pass,
    with or without a mapped table and a hook, and ends as the same deliveries one at a time do."""
    from clerk_sync.changes import Hook
    from clerk_sync.mapping import MappedTable, SchemaMapping, migrate_schema
    from clerk_sync.tables import hook_jobs

    kwargs: dict[str, Any] = {}
    if mapped:
        engine = sa.create_engine(db_url)
        with engine.begin() as conn:
            sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("email", sa.String(320)), sa.Column("plan", sa.String(20)),
                     sa.Column("meta", sa.JSON)).create(conn)
        mapping = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {
            "email": "email", "meta": "public_metadata"}))
        with engine.begin() as conn:
            migrate_schema(conn, mapping)
        engine.dispose()
        kwargs = {"mapping": mapping, "hooks": [Hook("welcome", lambda change: None, on=["user.*"])]}
    sent = _statements_sent(monkeypatch)
    store = Store.from_url(db_url, **kwargs)
    try:
        processor = WebhookProcessor(store, verifier)

        def batch(ns: str) -> list[tuple[str, Envelope]]:
            users_ = [(f"u{i}_{ns}", f.envelope("user.created", f.user(f"user_{ns}_{i}", 10, email=f"{i}@x.io",
                                                                       role="admin" if i % 2 else None)))
                      for i in range(10)]
            later = (f"u10_{ns}", f.envelope("user.updated", f.user(f"user_{ns}_3", 11, email="new@x.io")))
            orgs = [(f"o{i}_{ns}", f.envelope("organization.created", f.organization(f"org_{ns}_{i}", 10)))
                    for i in range(2)]
            return [(svix_id, _parsed(event)) for svix_id, event in [*users_, later, users_[0], *orgs]]

        batched, alone = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
        results = GroupCommitter(processor).write(batch(batched))
        assert len([sql for sql in sent if "json_to_recordset" in sql]) == 3, [s[:120] for s in sent]
        assert len(sent) == 3 + (1 if mapped else 0)  # hooked entities are locked first (one sorted pass)
        alone_results = [processor.apply_alone(*delivery) for delivery in batch(alone)]
        assert _statuses(results) == _statuses(alone_results) == ["applied"] * 11 + ["duplicate"] + ["applied"] * 2
        with store.connect() as conn:
            def state(ns: str) -> Any:
                users_ = conn.execute(sa.select(users.c.clerk_id, users.c.email, users.c.role)
                                      .where(users.c.clerk_id.like(f"%{ns}%"))).all()
                out = [tuple(str(v).replace(ns, "NS") for v in row) for row in sorted(users_)]
                if mapped:
                    out += sorted(tuple(str(v).replace(ns, "NS") for v in row) for row in conn.exec_driver_sql(
                        "SELECT clerk_user_id, email, meta::text FROM accounts WHERE clerk_user_id LIKE %s",
                        (f"%{ns}%",)))
                    out += sorted(tuple(str(v).replace(ns, "NS") for v in row) for row in conn.execute(
                        sa.select(hook_jobs.c.idempotency_key, hook_jobs.c.payload["previous"].as_string())
                        .where(hook_jobs.c.entity_key.like(f"%{ns}%"))))
                return out

            assert state(batched) == state(alone)
            rows = state(batched)
            assert mapped is False or (("user_NS_3", "new@x.io", "{}") in rows and any(
                row[0].startswith("user.updated:user_NS_3") and '"3@x.io"' in row[1] for row in rows)), rows
    finally:
        store.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize(("extra_type", "extra", "stored", "waves"), [
    ("integer", 7, "7", True), ("integer", 10.0, "10", False), ("text", 1.0, "1", False),
    ("double precision", float("nan"), "NaN", False), ("real", 1 + 2 ** -24, "1", False),
], ids=["int", "float-for-integer", "float-for-text", "nan-for-double", "float-for-real"])
def test_mapped_values_in_a_wave_are_stored_as_one_statement_per_delivery_stores_them(
        db_url: str, verifier: WebhookVerifier, monkeypatch: pytest.MonkeyPatch, extra_type: str, extra: Any,
        stored: str, waves: bool) -> None:
    """Values the wave's JSON carries differently from psycopg's parameters: a missing metadata path into a
    JSONB column (JSON null, not SQL NULL), a float into NUMERIC (PostgreSQL's 15-digit float8 cast), an
    offset time as text and a naive datetime into a timestamp column without time zone, text into an
    integer column. A value the JSON cannot carry as psycopg does (a float for INTEGER, which psycopg
    rounds; for TEXT, whose float8 output is not Python's repr; NaN; a float for REAL, rounded from float8)
    sends the users of the batch down the statement per delivery, without failing the batch."""
    from datetime import datetime

    from clerk_sync.mapping import Column, MappedTable, SchemaMapping, migrate_schema

    sent = _statements_sent(monkeypatch)

    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("prefs", postgresql_jsonb()), sa.Column("score", sa.Numeric(20, 17)),
                 sa.Column("trial_ends", sa.DateTime), sa.Column("renews", sa.DateTime), sa.Column("seats", sa.Integer)
                 ).create(conn)
        conn.exec_driver_sql(f"ALTER TABLE accounts ADD COLUMN level {extra_type}")
    columns = {"prefs": Column("public_metadata.missing"), "score": Column(compute=lambda v: 0.1 + 0.2),
               "trial_ends": Column(compute=lambda v: "2024-01-01T00:00:00+02:00"),
               "renews": Column(compute=lambda v: datetime(2024, 3, 31, 2, 30)),
               "seats": Column(compute=lambda v: "12"), "level": Column(compute=lambda v: extra)}
    mapping = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", columns))
    with engine.begin() as conn:
        migrate_schema(conn, mapping)
    engine.dispose()
    store = Store.from_url(db_url, mapping=mapping)
    try:
        processor = WebhookProcessor(store, verifier)
        committer = GroupCommitter(processor)
        batched, alone = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]

        def batch(ns: str) -> list[tuple[str, Envelope]]:
            return [(f"m{i}_{ns}", _parsed(f.envelope("user.created", f.user(f"user_{ns}_{i}", 10)))) for i in range(4)]

        assert _statuses(committer.write(batch(batched))) == ["applied"] * 4
        assert committer.retried == 0
        assert any("json_to_recordset" in sql for sql in sent) is waves
        for delivery in batch(alone):
            processor.apply_alone(*delivery)
        with store.connect() as conn:
            def rows(ns: str) -> list[tuple[Any, ...]]:
                return sorted(tuple(str(v).replace(ns, "NS") for v in row) for row in conn.exec_driver_sql(
                    "SELECT clerk_user_id, prefs IS NULL, prefs::text, score, trial_ends, renews, seats, level::text "
                    "FROM accounts WHERE clerk_user_id LIKE %s", (f"%{ns}%",)))

            assert rows(batched) == rows(alone)
            # (the offset text is the time it says, as UTC's wall clock in a column without a time zone: PostgreSQL
            # had dropped its offset, 00:00)
            assert rows(batched)[0][1:] == ("False", "null", "0.30000000000000000", "2023-12-31 22:00:00",
                                            "2024-03-31 02:30:00", "12", stored)
    finally:
        store.dispose()


def postgresql_jsonb() -> Any:
    from sqlalchemy.dialects.postgresql import JSONB

    return JSONB()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_commit_the_database_refuses_fails_the_batch_and_leaves_its_connection_clean(
        db_url: str, verifier: WebhookVerifier) -> None:
    """The pipelined batch runs its own BEGIN .. COMMIT on a driver connection in autocommit. A COMMIT the
    database refuses (a deferred constraint trigger) answers every delivery with a StoreError and writes
    nothing; and the one pooled connection comes back as a normal one: a later unit of work that fails
    is rolled back, not left committed statement by statement."""
    store = Store.from_url(db_url, pool_size=1, max_overflow=0)
    try:
        _refused_commit(store, verifier)
    finally:
        store.dispose()


def _refused_commit(store: Store, verifier: WebhookVerifier) -> None:
    committer = GroupCommitter(WebhookProcessor(store, verifier))
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF starts_with(NEW.clerk_id, 'user_nocommit') THEN RAISE EXCEPTION 'refused at commit'; END IF; "
            "RETURN NEW; END $$")
        conn.exec_driver_sql("CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT OR UPDATE ON users "
                             "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit()")
    ok = committer.write([("msg_ok", _parsed(f.envelope("user.created", f.user("user_ok", 10))))])
    assert _statuses(ok) == ["applied"]
    results = committer.write([  # COMMIT sent in the pipeline
        ("msg_a", _parsed(f.envelope("organization.created", f.organization("org_a", 10)))),
        ("msg_b", _parsed(f.envelope("user.created", f.user("user_nocommit_1", 10)))),
    ])
    assert all(isinstance(r, StoreError) for r in results), results
    results = committer.write([  # a stale delivery and a deletion: COMMIT after the pipeline
        ("msg_d", _parsed(f.envelope("user.updated", f.user("user_ok", 5)))),
        ("msg_e", _parsed(f.envelope("user.created", f.user("user_nocommit_2", 10)))),
        ("msg_f", _parsed(f.envelope("organization.deleted", f.deleted("organization", "org_a")))),
    ])
    assert all(isinstance(r, StoreError) for r in results), results
    assert _inbox(store) == {"msg_ok": "applied"}
    with store.engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None and raw.autocommit is False  # type: ignore[attr-defined]
    def insert_then_fail() -> None:
        with store.transaction() as writer:
            writer.conn.execute(organizations.insert().values(clerk_id="org_rolled_back", name="x", slug="x",
                                                              clerk_updated_at=1, created_at=writer.now,
                                                              updated_at=writer.now))
            raise RuntimeError("the unit of work fails after its insert")

    with pytest.raises(RuntimeError):
        insert_then_fail()
    with store.connect() as conn:
        assert conn.execute(sa.select(organizations.c.clerk_id)).scalars().all() == []
    # and the next batch commits as usual on the same connection
    assert _statuses(committer.write([("msg_c", _parsed(f.envelope("user.created", f.user("user_c", 10))))])) == [
        "applied"]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_pipelined_batch_begins_at_the_connections_isolation_level(db_url: str, verifier: WebhookVerifier) -> None:
    """The batch sends its own BEGIN: it carries what psycopg's implicit one would (the engine's isolation
    level), and the connection's autocommit setting comes back as it was."""
    from clerk_sync.integrations._committer import _begin_sql

    store = Store.from_url(db_url, isolation_level="REPEATABLE READ", pool_size=1, max_overflow=0)
    try:
        with store.engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert _begin_sql(raw) == "BEGIN ISOLATION LEVEL REPEATABLE READ"
        committer = GroupCommitter(WebhookProcessor(store, verifier))
        assert _statuses(committer.write([("m1", _parsed(f.envelope("user.created", f.user("user_rr", 10))))])) == [
            "applied"]
        with store.engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw.autocommit is False  # type: ignore[union-attr]
            assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "repeatable read"
    finally:
        store.dispose()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_jobs_written_by_the_batch_statement_are_the_ones_describe_gives(db_url: str, verifier: WebhookVerifier,
                                                                         seed: int) -> None:
    """On PostgreSQL a batch writes its hook jobs in the delivery's own statement (``jobs_cte_sql``: the
    change described in SQL). The same random user/organization history (stale, duplicate and no-op
    versions, role and name changes), once through group commit and once one delivery at a time (the
    row before read, :func:`~clerk_sync.changes.describe` and ``Hook.wants`` in Python), queues the
    same jobs in the same order per entity: hook, type, keys and payload, ``previous`` included (metadata flips
    between ``1`` and ``true``: JSON tells them apart), and no batch falls back to one statement at a time
    (the Python path would hide a broken statement). On SQLite and MariaDB both sides run the Python path
    (the test then pins the batch order)."""
    import random

    from clerk_sync.changes import Hook
    from clerk_sync.tables import hook_jobs

    hooks = [Hook("all", lambda change: None), Hook("roles", lambda change: None, on=["user.updated"], fields=["role"]),
             Hook("names", lambda change: None, on=["user.created", "organization.updated"],
                  fields=["first_name", "name"]),
             Hook("orgs", lambda change: None, on=["organization.*"])]
    rng = random.Random(seed)
    steps = []
    for n in range(60):
        version = rng.randint(1, 15)
        if rng.random() < 0.7:
            steps.append((n, "user", rng.randint(0, 2), version, rng.choice(["Ada", "Bea"]),
                          rng.choice([None, "admin"]), rng.choice([1, True, 0, False])))
        else:
            steps.append((n, "organization", rng.randint(0, 1), version, rng.choice(["Acme", "Zeta"]), None, None))
    steps += rng.choices(steps, k=8)  # Svix re-sends: the same svix-id and body

    def deliveries(ns: str) -> list[tuple[str, Envelope]]:
        out = []
        for n, kind, i, version, name, role, flag in steps:
            if kind == "user":
                body = f.user(f"user_{ns}_{i}", version, first_name=name, role=role)
                body["public_metadata"]["beta"] = flag
                event = f.envelope(["user.created", "user.updated"][n % 2], body, timestamp=version)
            else:
                event = f.envelope("organization.updated", f.organization(f"org_{ns}_{i}", version, name=name),
                                   timestamp=version)
            out.append((f"msg_{ns}_{n}", _parsed(event)))
        return out

    def jobs(store: Store, ns: str) -> list[tuple[Any, ...]]:
        with store.connect() as conn:
            rows = conn.execute(sa.select(hook_jobs.c.hook, hook_jobs.c.type, hook_jobs.c.entity_key,
                                          hook_jobs.c.idempotency_key, hook_jobs.c.payload)
                                .where(hook_jobs.c.entity_key.like(f"%\\_{ns}\\_%", escape="\\"))
                                .order_by(hook_jobs.c.id)).all()
        return [(*(str(v).replace(ns, "NS") for v in row[:4]), _renamed(row[4], ns)) for row in rows]

    store = Store.from_url(db_url, hooks=hooks)
    try:
        processor = WebhookProcessor(store, verifier)
        batched, alone = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
        batch_deliveries, alone_deliveries = deliveries(batched), deliveries(alone)
        committer = GroupCommitter(processor)
        at = 0
        while at < len(batch_deliveries):
            size = rng.randint(1, 12)
            results = committer.write(batch_deliveries[at:at + size])
            assert all(isinstance(r, Outcome) for r in results), results
            at += size
        assert committer.retried == 0
        for svix_id, envelope in alone_deliveries:
            processor.apply_alone(svix_id, envelope)
        queued = jobs(store, batched)
        assert _per_entity(queued) == _per_entity(jobs(store, alone))  # the dispatcher keeps order per entity
        by_hook = {name: sum(1 for job in queued if job[0] == name) for name in ("all", "roles", "names", "orgs")}
        updates = sum(1 for job in queued if job[0] == "all" and job[1] == "user.updated")
        assert all(by_hook.values()), by_hook  # every hook got some, and the role filter dropped some updates
        assert by_hook["roles"] < updates
        assert any(job[4]["previous"] for job in queued)
    finally:
        store.dispose()


def _per_entity(queued: list[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    """Jobs by entity key (hook and entity), each list in the order queued."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for job in queued:
        out.setdefault(job[2], []).append(job)
    return out


def _renamed(payload: Any, ns: str) -> Any:
    """A job payload with the test's namespace replaced (compared across the two runs)."""
    import json

    text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True)
    return json.loads(text.replace(ns, "NS"))


def test_hook_names_and_fields_with_quotes_and_percent_signs_reach_the_batch_statement_intact(
        db_url: str, verifier: WebhookVerifier) -> None:
    """Review finding: on PostgreSQL the batch statement carries its hooks as quoted constants beside its
    parameters; a ``%`` there would be read as a placeholder (every batch falling back to one statement at
    a time, or ``%%`` stored as ``%``). (A hook's ``fields`` are field names, checked by ``Hook``: no quotes.)"""
    from clerk_sync.changes import Hook
    from clerk_sync.tables import hook_jobs

    odd = ["100% o'clock \\ %s", "50%%"]
    store = Store.from_url(db_url, hooks=[
        Hook(odd[0], lambda change: None, on=["user.created"]),
        Hook(odd[1], lambda change: None, on=["user.updated"], fields=["first_name", "last_name"])])
    try:
        committer = GroupCommitter(WebhookProcessor(store, verifier))
        results = committer.write([
            ("mp_1", _parsed(f.envelope("user.created", f.user("user_pct", 10)))),
            ("mp_2", _parsed(f.envelope("user.updated", f.user("user_pct", 20, first_name="Percy")))),
            ("mp_3", _parsed(f.envelope("user.updated", f.user("user_pct", 30, first_name="Percy")))),  # no-op
        ])
        assert _statuses(results) == ["applied", "applied", "applied"]
        assert committer.retried == 0
        with store.connect() as conn:
            rows = conn.execute(sa.select(hook_jobs.c.hook, hook_jobs.c.type).order_by(hook_jobs.c.id)).all()
        assert [tuple(row) for row in rows] == [(odd[0], "user.created"), (odd[1], "user.updated")]
    finally:
        store.dispose()


def test_one_turn_of_the_event_loop_is_written_in_batches_of_at_most_max_batch(
        store: Store, verifier: WebhookVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: the deliveries of one turn of the loop reach the writers together; a burst larger
    than ``max_batch`` must still be written in batches of at most ``max_batch``, every delivery answered."""
    import asyncio

    committer = GroupCommitter(WebhookProcessor(store, verifier), max_batch=3, writers=1)
    sizes: list[int] = []
    write = committer.write

    def recording(batch: Any) -> list[Any]:
        sizes.append(len(batch))
        return write(batch)

    monkeypatch.setattr(committer, "write", recording)

    async def burst() -> list[Any]:
        return await asyncio.gather(*(
            committer.submit(f"mb_{i}", _parsed(f.envelope("user.created", f.user(f"user_mb{i}", 1))))
            for i in range(10)))

    try:
        outcomes = asyncio.run(burst())
    finally:
        committer.close()
    assert _statuses(outcomes) == ["applied"] * 10
    assert sum(sizes) == 10 and max(sizes) <= 3, sizes


def test_batch_statements_go_to_postgresql_in_its_own_placeholder_form() -> None:
    """psycopg's own cursor re-splits a statement longer than 4,096 characters or with more than 50
    parameters on every execution (a wide mapping plus hooks crosses that); the batch's statements are
    sent in PostgreSQL's ``$n`` form instead, ``%%`` (a literal percent sign) restored."""
    from clerk_sync.store import _native

    assert _native("SELECT %s, '100%% %%s', %s WHERE x = %s") == "SELECT $1, '100% %s', $2 WHERE x = $3"
    wide = "SELECT " + ", ".join(["%s"] * 60) + " -- " + "x" * 5000
    assert _native(wide).startswith("SELECT $1, $2") and "$60 --" in _native(wide)
    for unsupported in ("SELECT %(name)s", "SELECT %b", "SELECT 5 %"):
        with pytest.raises(ValueError, match="only %s placeholders"):
            _native(unsupported)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_batch_statement_is_sent_in_the_connections_own_encoding(db_url: str, verifier: WebhookVerifier) -> None:
    """Review finding: the statement text went out as UTF-8 whatever the connection's client_encoding, so
    on a LATIN1 connection a hook named "café" had its jobs stored under "cafÃ©" (never claimed)."""
    from clerk_sync.changes import Hook
    from clerk_sync.tables import hook_jobs

    store = Store.from_url(db_url, hooks=[Hook("café", lambda change: None, on=["user.created"])],
                           connect_args={"client_encoding": "LATIN1"})
    try:
        committer = GroupCommitter(WebhookProcessor(store, verifier))
        results = committer.write([("enc_1", _parsed(f.envelope("user.created", f.user("user_enc", 10)))),
                                   ("enc_2", _parsed(f.envelope("user.created", f.user("user_enc2", 10))))])
        assert _statuses(results) == ["applied", "applied"] and committer.retried == 0
        with store.connect() as conn:
            assert conn.exec_driver_sql("SHOW client_encoding").scalar() == "LATIN1"
            assert list(conn.execute(sa.select(hook_jobs.c.hook)).scalars()) == ["café", "café"]
    finally:
        store.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("pipeline", [True, False], ids=["piped", "alone"])
def test_a_failing_statement_of_several_is_the_one_the_error_names(db_url: str, pipeline: bool) -> None:
    """Review finding: one statement at a time, an error in the second was reported against the first."""
    from clerk_sync.store import _run_raw

    store = Store.from_url(db_url)
    try:
        with store.transaction() as writer:
            raw = writer.conn.connection.driver_connection
            with pytest.raises(sa.exc.DBAPIError) as caught:
                _run_raw(raw, [("SELECT %s", [1]), ("SELECT * FROM no_such_table WHERE x = %s", [2]),
                               ("SELECT 3", [])], pipeline=pipeline)
            writer.conn.rollback()
        assert "no_such_table" in str(caught.value.statement)
    finally:
        store.dispose()


def test_a_membership_after_a_deletion_of_its_stored_parent_follows_it_in_a_batch(
        store: Store, verifier: WebhookVerifier) -> None:
    """A user's deletion cascades to the memberships the rows hold. A later membership event naming another
    user (Clerk does not move memberships, a stand-in could) went into the pipeline ahead of that deletion:
    the membership survived in a batch and was deleted one at a time. It now follows it."""
    processor = WebhookProcessor(store, verifier)
    ns = uuid.uuid4().hex[:8]

    def parsed(svix_id: str, event: dict[str, Any]) -> tuple[str, Any]:
        return f"{svix_id}_{ns}", parse_envelope(f.body_of(event))

    outcomes = {}
    for mode in ("batch", "alone"):
        mem, user_a = f"orgmem_{mode}_{ns}", f"user_a_{mode}_{ns}"
        processor.apply_alone(*parsed(f"msg_{mode}_1", f.envelope("organizationMembership.created", f.membership(
            mem, f"org_{ns}", user_a, 10))))
        later = [parsed(f"msg_{mode}_2", f.envelope("user.deleted", f.deleted("user", user_a))),
                 parsed(f"msg_{mode}_3", f.envelope("organizationMembership.updated", f.membership(
                     mem, f"org_{ns}", f"user_b_{ns}", 20)))]
        results = (GroupCommitter(processor).write(later) if mode == "batch"
                   else [processor.apply_alone(*d) for d in later])
        with store.connect() as conn:
            live = conn.execute(sa.text("SELECT deleted_at IS NULL FROM organization_memberships WHERE clerk_id = :c"),
                                {"c": mem}).scalar_one()
        outcomes[mode] = ([r.status for r in results], bool(live))
    assert outcomes["batch"] == outcomes["alone"] == (["applied", "skipped"], False)


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
def test_a_duplicate_of_a_failed_delivery_applies_nothing_on_every_store(
        store: Store, verifier: WebhookVerifier, hooked: bool) -> None:
    """Review finding: on PostgreSQL the statement that writes the inbox row and the upsert together ran the
    upsert for a duplicate too, so a re-sent delivery that had been stored ``failed`` changed the row (and
    fired the hooks) while its inbox row still said failed; on SQLite and MariaDB it wrote nothing. It is
    a duplicate that applies nothing everywhere now, alone and in a batch; ``replay`` applies it."""
    from clerk_sync.changes import Hook
    from clerk_sync.ingest import replay_deliveries
    from clerk_sync.tables import hook_jobs

    target = Store(store.engine, hooks=[Hook("count", lambda change: None)]) if hooked else store
    processor = WebhookProcessor(target, verifier)
    base = 1_800_000_000_000
    _two_users_an_org_and_a_membership(processor, base)
    later = {"msg_u1": f.envelope("user.updated", f.user("user_alone", base + 1, first_name="New")),
             "msg_u2": f.envelope("user.updated", f.user("user_batch", base + 1, first_name="New")),
             "msg_m": f.envelope("organizationMembership.updated",
                                 f.membership("orgmem_1", "org_1", "user_alone", base + 1, role="org:admin"))}
    with store.transaction() as writer:  # stored failed once (a value the database refused, since fixed)
        for svix_id, event in later.items():
            writer.record_delivery(svix_id, f.body_of(event).decode(), event_type=event["type"], instance_id=None,
                                   event_timestamp=None, status=DeliveryStatus.FAILED, error="refused once")
    with store.connect() as conn:
        jobs_before = conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one()
    headers, body = f.signed(later["msg_u1"], "msg_u1")
    assert processor.process(headers, body).status == "duplicate"
    again = GroupCommitter(processor).write([("msg_u2", _parsed(later["msg_u2"])), ("msg_m", _parsed(later["msg_m"]))])
    assert _statuses(again) == ["duplicate", "duplicate"]
    with store.connect() as conn:
        names = {k: v for k, v in conn.execute(sa.select(users.c.clerk_id, users.c.first_name))}
        role = conn.execute(sa.select(organization_memberships.c.role)).scalar_one()
        jobs_after = conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one()
    assert (names, role, jobs_after) == ({"user_alone": "Old", "user_batch": "Old"}, "org:member", jobs_before)
    assert {k: v for k, v in _inbox(store).items() if k in later} == dict.fromkeys(later, "failed")
    assert replay_deliveries(target).by_status == {"applied": 3}  # the way a failed delivery is applied
    with store.connect() as conn:
        assert set(conn.execute(sa.select(users.c.first_name)).scalars()) == {"New"}


@pytest.mark.parametrize("stored", ["ignored", "skipped", "applied"])
@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
def test_a_repeated_svix_id_applies_nothing_whatever_the_stored_status_or_body(
        store: Store, verifier: WebhookVerifier, hooked: bool, stored: str) -> None:
    """Review finding: the guard above refused only a stored ``failed`` delivery, so on PostgreSQL a re-sent
    delivery an operator had dismissed (``ignored``), or a svix id re-sent with another body, was answered
    ``duplicate`` and still applied (a ban included), the inbox never saying so; SQLite and MariaDB wrote
    nothing. A svix id the inbox holds applies nothing on every store now, alone and in a batch."""
    from clerk_sync.changes import Hook
    from clerk_sync.tables import hook_jobs

    target = Store(store.engine, hooks=[Hook("count", lambda change: None)]) if hooked else store
    processor = WebhookProcessor(target, verifier)
    base = 1_800_000_000_000
    _two_users_an_org_and_a_membership(processor, base)
    later = {"msg_u1": f.envelope("user.updated", f.user("user_alone", base + 1, first_name="New", banned=True)),
             "msg_u2": f.envelope("user.updated", f.user("user_batch", base + 1, first_name="New", banned=True)),
             "msg_u3": f.envelope("user.created", f.user("user_other", base + 1, first_name="New")),
             "msg_m": f.envelope("organizationMembership.updated",
                                 f.membership("orgmem_1", "org_1", "user_alone", base + 1, role="org:admin"))}
    with store.transaction() as writer:  # these ids are stored already, with another body
        for svix_id in later:
            other = f.envelope("email.created", {"id": f"ema_{svix_id}", "object": "email"})
            writer.record_delivery(svix_id, f.body_of(other).decode(), event_type=other["type"], instance_id=None,
                                   event_timestamp=None, status=DeliveryStatus(stored), error=None)
    with store.connect() as conn:
        jobs_before = conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one()
    headers, body = f.signed(later["msg_u1"], "msg_u1")
    assert processor.process(headers, body).status == "duplicate"
    again = GroupCommitter(processor).write([(k, _parsed(later[k])) for k in ("msg_u2", "msg_u3", "msg_m")])
    assert _statuses(again) == ["duplicate"] * 3
    with store.connect() as conn:
        rows = {k: (n, bool(b)) for k, n, b in conn.execute(
            sa.select(users.c.clerk_id, users.c.first_name, users.c.banned))}
        role = conn.execute(sa.select(organization_memberships.c.role)).scalar_one()
        jobs_after = conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one()
    assert (rows, role, jobs_after) == (
        {"user_alone": ("Old", False), "user_batch": ("Old", False)}, "org:member", jobs_before)
    assert {k: v for k, v in _inbox(store).items() if k in later} == dict.fromkeys(later, stored)
