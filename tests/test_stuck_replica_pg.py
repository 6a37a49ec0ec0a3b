"""One stuck replica must not stall the healthy ones (issue 10 #9), on the real PostgreSQL.

A foreign connection holds what a replica holds mid-delivery of four ``user.updated`` at once (a
replica runs four deliveries at a time) — each user's advisory lock, its uncommitted inbox row and the
user's row lock — and never lets go while the test runs (at most ``HOLD_S``). A healthy
``clerk-sync serve`` process then receives, all at once: the retries of those four svix ids, an update
and five membership events of the first user, and twenty unrelated ``user.created``. Unrelated
deliveries must be answered 200 without waiting for the stuck ones to time out; the stuck users'
deliveries 503 (with Retry-After) within the configured lock bound, long before the hold ends. When
the hold ends (the stuck replica dies: rollback), Svix-style retries apply everything: nothing is lost.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.store import _lock_id
from clerk_sync.tables import organization_memberships, users, webhook_events
from tests import factories as f
from tests._procs import Server
from tests.conftest import SECRET

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

HOLD_S = 30.0
LOCK_BOUND_S = 3.0
STUCK = [f"user_stuck_{i}" for i in range(4)]
USER = STUCK[0]


@dataclass
class Answer:
    svix_id: str
    status: int
    retry_after: str | None
    finished: float  # time.monotonic()


def _post(client: httpx.Client, url: str, svix_id: str, event: dict[str, object]) -> Answer:
    headers, body = f.signed(event, svix_id)
    r = client.post(f"{url}/webhooks/clerk", content=body, headers={**headers, "content-type": "application/json"})
    return Answer(svix_id, r.status_code, r.headers.get("retry-after"), time.monotonic())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_stuck_replica_does_not_stall_a_healthy_one(db_url: str, tmp_path: Path) -> None:
    now_ms = int(time.time() * 1000)
    stuck = [(f"msg_stuck_{i}", f.envelope("user.updated", f.user(u, now_ms, first_name="Stuck")))
             for i, u in enumerate(STUCK)]
    same_user = [("msg_user_upd", f.envelope("user.updated", f.user(USER, now_ms + 1, first_name="Later")))]
    same_user += [(f"msg_mem_{i}", f.envelope("organizationMembership.created",
                                              f.membership(f"orgmem_{i}", f"org_{i}", USER, now_ms)))
                  for i in range(5)]
    unrelated = [(f"msg_new_{i}", f.envelope("user.created", f.user(f"user_ok_{i}", now_ms))) for i in range(20)]

    server = Server(db_url, SECRET, log=tmp_path / "serve.log",
                    env={"CLERK_SYNC_DB_LOCK_TIMEOUT_S": str(LOCK_BOUND_S)})
    foreign = sa.create_engine(db_url)
    try:
        server.wait_ready()
        with httpx.Client(timeout=HOLD_S * 2) as client:
            for i, user_id in enumerate(STUCK):
                created = f.envelope("user.created", f.user(user_id, now_ms - 1))
                assert _post(client, server.url, f"msg_created_{i}", created).status == 200
            # The stuck replica, mid-delivery of four events: locks, inbox rows, user rows, then silence.
            conn = foreign.connect()
            hold = conn.begin()
            for (svix_id, event), user_id in zip(stuck, STUCK, strict=True):
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_id(f"user:{user_id}"))))
                conn.execute(webhook_events.insert().values(
                    svix_id=svix_id, type="user.updated", payload=event, status="applied", received_at=sa.func.now()))
                conn.execute(users.update().where(users.c.clerk_id == user_id).values(first_name="Stuck"))
            held_at = time.monotonic()

            blocked = [*stuck, *same_user]
            with ThreadPoolExecutor(len(blocked) + len(unrelated)) as pool:
                started = time.monotonic()
                futures = [pool.submit(_post, client, server.url, s, e) for s, e in blocked + unrelated]
                answers = [fut.result(timeout=HOLD_S) for fut in futures]
            hold_ended = time.monotonic()
            assert hold_ended - held_at < HOLD_S  # everything was answered while the hold lasted
            hold.rollback()  # the stuck replica dies; its transaction goes with it
            conn.close()

            by_id = {a.svix_id: a for a in answers}
            ok = [by_id[s] for s, _ in unrelated]
            refused = [by_id[s] for s, _ in blocked]
            assert [a.status for a in ok] == [200] * len(ok)
            assert [a.status for a in refused] == [503] * len(refused)
            assert all(a.retry_after for a in refused)
            # Bounded: each refusal came within a few lock bounds, not after the hold.
            assert max(a.finished for a in refused) - started < 2 * LOCK_BOUND_S + 3
            # Unrelated deliveries did not queue behind the blocked ones: all answered before the first
            # stuck retry ran out of patience with the database. Only the stuck deliveries alone on their
            # user wait for the database: the one about USER shares it with same_user, and this process's
            # per-user gate may refuse it after its own patience (0.5 s), well before the lock bound.
            db_bound = [by_id[s] for (s, _), user_id in zip(stuck, STUCK, strict=True) if user_id != USER]
            assert max(a.finished for a in ok) < min(a.finished for a in db_bound)
            assert max(a.finished for a in ok) - started < LOCK_BOUND_S

            # Svix retries once the hold is gone: everything applies, nothing lost.
            for svix_id, event in blocked:
                assert _post(client, server.url, svix_id, event).status == 200
    finally:
        server.stop()
        foreign.dispose()

    engine = sa.create_engine(db_url)
    with engine.connect() as check:
        name = check.execute(sa.select(users.c.first_name).where(users.c.clerk_id == USER)).scalar_one()
        memberships = check.execute(sa.select(sa.func.count()).select_from(organization_memberships)
                                    .where(organization_memberships.c.deleted_at.is_(None))).scalar_one()
        created = check.execute(sa.select(sa.func.count()).select_from(users)).scalar_one()
        statuses = dict(check.execute(sa.select(webhook_events.c.svix_id, webhook_events.c.status)).all())
    engine.dispose()
    assert name == "Later"  # the newer update wins over the stuck one, which applied on retry as stale
    assert memberships == 5 and created == len(STUCK) + len(unrelated)
    assert len(statuses) == 2 * len(STUCK) + len(same_user) + len(unrelated)
    assert set(statuses.values()) <= {"applied", "skipped"}


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_postgres_connections_bound_every_wait_and_keep_the_url_options(db_url: str) -> None:
    from clerk_sync.config import Settings
    from clerk_sync.errors import StoreError
    from clerk_sync.store import Store

    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_SYNC_DB_LOCK_TIMEOUT_S": "0.5"})
    store = Store.from_settings(settings)
    with store.connect() as conn:
        shown = {n: conn.exec_driver_sql(f"SHOW {n}").scalar() for n in (
            "lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout", "tcp_keepalives_idle")}
        assert conn.exec_driver_sql("SELECT current_schema()").scalar() == db_url.rsplit("%3D", 1)[1]
    assert shown == {"lock_timeout": "500ms", "statement_timeout": "15s",
                     "idle_in_transaction_session_timeout": "15s", "tcp_keepalives_idle": "10"}
    other = sa.create_engine(db_url)
    with other.connect() as holder, holder.begin():
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_id("user:u"))))
        with pytest.raises(StoreError, match="lock_timeout"), store.transaction() as w:
            w.lock(["user:u"])
    other.dispose()
    store.dispose()


def test_every_command_and_face_builds_its_store_with_the_settings_timeouts() -> None:
    """Review finding: `worker`, `hooks ...` and `doctor` built their store from DATABASE_URL alone, so
    CLERK_SYNC_DB_* (a lock or statement timeout) did not apply there. Every command and framework face
    builds it with ``Store.from_settings`` (DATABASE_URL and its timeouts, the test above) now: a store
    built from the URL alone is a bug there."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "clerk_sync"
    faces = [*(src / "cli").rglob("*.py"), *(src / "integrations").rglob("*.py")]
    assert len(faces) > 20
    offenders = [f"{path.relative_to(src)}:{text[:match.start()].count(chr(10)) + 1}"
                 for path in faces for text in [path.read_text()]
                 for match in re.finditer(r"Store\.from_url\(", text)]
    assert offenders == []


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_postgres_connections_name_themselves_unless_the_url_or_pgappname_does(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pg_stat_activity tells clerk-sync's connections from the app's own (two walkthroughs mapped them by pid):
    ``application_name`` is ``clerk-sync``, or what the URL's own ``application_name`` (or ``options=-c
    application_name=``) says, or libpq's ``PGAPPNAME``."""
    from clerk_sync.store import create_engine

    def name(url: str) -> str:
        engine = create_engine(url)
        with engine.connect() as conn:
            shown = str(conn.exec_driver_sql("SHOW application_name").scalar())
        engine.dispose()
        return shown

    assert name(db_url) == "clerk-sync"
    assert name(f"{db_url}&application_name=billing-worker") == "billing-worker"
    assert name(db_url.replace("options=-c", "options=-capplication_name%3Dcron%20-c")) == "cron"
    monkeypatch.setenv("PGAPPNAME", "from-env")
    assert name(db_url) == "from-env"
