"""Clerk's lockout expires by itself: ``users.locked_until`` (the record's time base + Clerk's
``lockout_expires_in_seconds``) and every check compares it with its own injected clock.

Clerk documents no webhook and no ``updated_at`` bump when a lock expires, so nothing here waits for one: the
request of a user whose lock has passed is served again with no new event and no reconcile. A lock with a null
expiry stays refused until an unlock. No test sleeps: the clocks are injected.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI

from clerk_sync import migrations
from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth, ClaimsValidator
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.auth.users import AuthUser, JitUsers, read_user, standing_error
from clerk_sync.clerk_api import ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.config import Settings
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import UserLocked
from clerk_sync.events import parse_envelope, user_record
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.integrations.asgi import ClerkAuthMiddleware
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.integrations.starlette import build_processor
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import users, webhook_events
from clerk_sync.testing import EmulatorServer
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET
from tests.test_sessions import AZP, ISS, KEY, mint, pem

T0 = 1_800_000_000  # seconds: the tests' "now"
T0_MS = T0 * 1000


class Clock:
    """One injected time for everything (token checks, the deny list, the writers): seconds since the epoch."""

    def __init__(self, at: float = T0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.at, UTC)


def _locked(user_id: str, version: int, seconds: int | None) -> dict[str, Any]:
    return f.user(user_id, version, role="admin") | {"locked": True, "lockout_expires_in_seconds": seconds}


def _row(store: Store, clerk_id: str) -> Any:
    with store.connect() as conn:
        return conn.execute(sa.select(users.c.locked, users.c.locked_until, users.c.updated_at,
                                      users.c.clerk_updated_at).where(users.c.clerk_id == clerk_id)).one()


def _stored(store: Store, clerk_id: str) -> Any:
    """What a write would change (the columns every revision has)."""
    with store.connect() as conn:
        return conn.execute(sa.select(users.c.locked, users.c.updated_at, users.c.clerk_updated_at)
                            .where(users.c.clerk_id == clerk_id)).one()


def _inbox_count(store: Store) -> int:
    with store.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(webhook_events)).scalar_one())


# -- the record ----------------------------------------------------------------------------------------------------

def test_a_webhook_lock_ends_at_the_event_timestamp_plus_the_seconds_left() -> None:
    assert user_record(_locked("user_a", 5, 600), event_ms=T0_MS).locked_until == T0_MS + 600_000
    assert user_record(_locked("user_a", 5, 600), fetched_ms=T0_MS + 7).locked_until == T0_MS + 600_007
    # the event's own time wins over a fetch time (a webhook has no fetch)
    assert user_record(_locked("user_a", 5, 600), event_ms=T0_MS, fetched_ms=1).locked_until == T0_MS + 600_000
    never = user_record(_locked("user_a", 5, None), event_ms=T0_MS)
    assert (never.locked, never.locked_until) == (True, None)  # null: never expires
    unlocked = user_record(f.user("user_a", 5) | {"lockout_expires_in_seconds": 600}, event_ms=T0_MS)
    assert (unlocked.locked, unlocked.locked_until) == (False, None)
    notes: list[str] = []
    bad = user_record(_locked("user_a", 5, "soon"), notes, event_ms=T0_MS)  # type: ignore[arg-type]
    assert (bad.locked, bad.locked_until) == (True, None) and "lockout_expires_in_seconds" in notes[0]


def test_a_record_with_no_time_base_gets_its_lock_end_from_the_writer_clock(db_url: str) -> None:
    """reconcile builds its records without a time (its page was just fetched): the writer stamps them."""
    clock = Clock(T0 + 42)
    store = Store(create_engine(db_url), now=clock.utc)
    record = user_record(_locked("user_w", 5, 90))
    assert (record.locked_until, record.lockout_pending_s) == (None, 90)
    with store.transaction() as w:
        w.apply(Upsert(Entity.USER, record))
        w.upsert_many(Entity.USER, [user_record(_locked("user_m", 5, 30))])
    assert _row(store, "user_w").locked_until == (T0 + 42 + 90) * 1000
    assert _row(store, "user_m").locked_until == (T0 + 42 + 30) * 1000
    store.dispose()


def test_group_commit_waves_carry_the_lock_end(db_url: str) -> None:
    """The PostgreSQL wave (several users in one statement), MariaDB's and SQLite's writes alike."""
    store = Store.from_url(db_url)
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([SECRET])))
    ns = uuid.uuid4().hex[:8]
    batch = [(f"m{ns}_{i}", parse_envelope(f.body_of(f.envelope("user.updated", _locked(f"user_{ns}{i}", 5, s),
                                                                  timestamp=T0_MS))))
             for i, s in enumerate((60, None, 120))]
    batch.append((f"m{ns}_x", parse_envelope(f.body_of(f.envelope("user.created", f.user(f"user_{ns}x", 5),
                                                                   timestamp=T0_MS)))))
    assert [getattr(r, "status", r) for r in committer.write(batch)] == ["applied"] * 4
    assert [_row(store, f"user_{ns}{i}").locked_until for i in (0, 1, 2, "x")] == [
        T0_MS + 60_000, None, T0_MS + 120_000, None]
    store.dispose()


# -- requests --------------------------------------------------------------------------------------------------------

class App:
    """An app protected by clerk-sync, every clock on one :class:`Clock`; a deny list that refreshes only when
    told to (``refresh_s`` of an hour on a frozen monotonic clock), so what it caches is what is checked."""

    def __init__(self, db_url: str, clock: Clock, *, refresh_s: float = 0.0) -> None:
        settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
        self.clock = clock
        self.processor = build_processor(settings, Store(create_engine(db_url), now=clock.utc))
        self.store = self.processor.store
        self.ticks = [0.0]
        self.deny = DenyList(self.store, refresh_s=refresh_s, now=lambda: self.ticks[0], wall=clock.utc)
        verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS, authorized_parties={AZP}),
                                   now=clock)
        self.auth = Authenticator(verifier, self.store, deny_list=self.deny)
        self.n = 0
        clerk = ClerkAuth(self.auth)
        app = FastAPI()
        clerk.install(app, public_paths={"/"})

        @app.get("/me")
        async def me(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
            return {"user_id": auth.user_id}

        @app.get("/admin")
        def admin(user: AuthUser = Depends(clerk.require_role("admin"))) -> dict[str, str]:
            return {"admin": user.clerk_id}

        self.app = ClerkAuthMiddleware(app, self.auth, public_paths={"/"})

    def event(self, event_type: str, data: dict[str, Any]) -> None:
        """A delivery stamped with the app clock's time (as Clerk stamps its envelope)."""
        self.n += 1
        event = f.envelope(event_type, data, timestamp=int(self.clock() * 1000))
        headers, body = f.signed(event, f"msg_{uuid.uuid4().hex[:10]}_{self.n}")  # (Svix: the real time)
        assert self.processor.process(headers, body).status == "applied"

    def token(self, user_id: str) -> dict[str, str]:
        """A fresh token of the user's one session (``sid`` stays the same)."""
        now = int(self.clock())
        return {"Authorization": "Bearer " + mint({"sub": user_id, "sid": f"sess_{user_id}", "iss": ISS, "azp": AZP,
                                                   "iat": now, "nbf": now - 5, "exp": now + 60, "v": 2})}


def _answers(client: httpx.Client, headers: dict[str, str]) -> list[tuple[int, str | None]]:
    out = []
    for path in ("/me", "/admin"):
        r = client.get(path, headers=headers)
        out.append((r.status_code, r.json().get("error") if r.status_code != 200 else None))
    return out


SERVED = [(200, None), (200, None)]
LOCKED = [(403, "user_locked"), (403, "user_locked")]


def test_a_lock_ends_by_itself_and_the_same_session_is_served_with_no_event_and_no_reconcile(db_url: str) -> None:
    clock = Clock()
    a = App(db_url, clock)
    a.event("user.created", f.user("user_l", 1, role="admin"))
    with running(a.app) as url, httpx.Client(base_url=url) as client:
        assert _answers(client, a.token("user_l")) == SERVED
        a.event("user.updated", _locked("user_l", 2, 1800))  # locked out for 30 minutes, stamped now
        assert _answers(client, a.token("user_l")) == LOCKED
        clock.at += 1799
        assert _answers(client, a.token("user_l")) == LOCKED  # a second left
        inbox, row = _inbox_count(a.store), _stored(a.store, "user_l")
        clock.at += 1
        assert _answers(client, a.token("user_l")) == SERVED  # its end: served again
        assert (_inbox_count(a.store), _stored(a.store, "user_l")) == (inbox, row)  # nothing written, nothing arrived
    a.store.dispose()


def test_a_lock_that_never_expires_is_refused_until_an_unlock(db_url: str) -> None:
    clock = Clock()
    a = App(db_url, clock)
    a.event("user.created", _locked("user_n", 1, None))
    with running(a.app) as url, httpx.Client(base_url=url) as client:
        assert _answers(client, a.token("user_n")) == LOCKED
        clock.at += 365 * 86400
        assert _answers(client, a.token("user_n")) == LOCKED
        a.event("user.updated", f.user("user_n", 2, role="admin"))  # unlocked
        assert _answers(client, a.token("user_n")) == SERVED
    a.store.dispose()


def test_the_cached_deny_list_releases_a_lock_at_its_end_refreshed_or_not(db_url: str) -> None:
    clock = Clock()
    a = App(db_url, clock, refresh_s=3600)
    a.event("user.created", f.user("user_c", 1))
    a.event("user.created", f.user("user_keep", 1))
    assert a.deny.blocked_reason("user_c") is None  # the first (full) load
    a.event("user.updated", _locked("user_c", 2, 600))
    a.event("user.updated", _locked("user_keep", 2, None))
    a.ticks[0] += 3600
    assert a.deny.blocked_reason("user_c") == "locked"  # the incremental refresh saw the lock
    clock.at += 600
    assert a.deny.blocked_reason("user_c") is None  # cached: no refresh since, released at its end
    assert a.deny.blocked_reason("user_keep") == "locked"
    a.ticks[0] += 3600
    assert a.deny.blocked_reason("user_c") is None  # refreshed (incremental): still released
    fresh = DenyList(a.store, refresh_s=3600, wall=clock.utc)  # a replica's full load after the end
    assert (fresh.blocked_reason("user_c"), fresh.blocked_reason("user_keep")) == (None, "locked")
    early = DenyList(a.store, refresh_s=3600, now=lambda: 0.0, wall=lambda: datetime.fromtimestamp(T0, UTC))
    assert early.blocked_reason("user_c") == "locked"  # a full load before the end keeps it
    a.store.dispose()


def test_standing_error_and_the_impersonation_check_honour_the_end(db_url: str) -> None:
    clock = Clock()
    a = App(db_url, clock)
    a.event("user.created", _locked("user_adm", 1, 60))
    admin = read_user(a.store, "user_adm")
    assert admin is not None and admin.locked_until == T0_MS + 60_000
    assert isinstance(standing_error(admin, T0_MS), UserLocked)
    assert standing_error(admin, T0_MS + 60_000) is None
    a.event("user.created", f.user("user_tgt", 1))
    act = {"sub": "user_adm"}
    now = int(clock())
    claims = {"sub": "user_tgt", "sid": "sess_imp", "iss": ISS, "azp": AZP, "iat": now, "nbf": now - 5,
              "exp": now + 600, "v": 2, "act": act}
    with running(a.app) as url, httpx.Client(base_url=url) as client:
        headers = {"Authorization": "Bearer " + mint(claims)}
        r = client.get("/me", headers=headers)
        assert (r.status_code, r.json()["error"]) == (401, "impersonation_ended")  # its admin is locked
        clock.at += 60
        assert client.get("/me", headers=headers).status_code == 200  # their lock is over
    a.store.dispose()


# -- Backend API objects: JIT and reconcile --------------------------------------------------------------------------

def _client(emu: EmulatorServer) -> ClerkClient:
    return ClerkClient(emu.secret_key, api_url=emu.url, budget=LocalBudget(RateLimit(100, 1.0)),
                       retry=RetryPolicy(attempts=1, deadline_s=5))


def test_jit_and_reconcile_stamp_the_lock_end_from_the_fetch_time(db_url: str) -> None:
    clock = Clock()
    store = Store(create_engine(db_url), now=clock.utc)
    with EmulatorServer(clock=clock) as emu, _client(emu) as clerk:
        jit_user = emu.create_user(email="jit@example.com")
        swept = emu.create_user(email="swept@example.com")
        clock.at += 10
        for u in (jit_user, swept):
            assert emu.request("POST", f"/v1/users/{u['id']}/lock")["lockout_expires_in_seconds"] == 3600
        clock.at += 600  # fetched ten minutes into the lock: 3000 s left
        jit = JitUsers(store, clerk=clerk, wall=clock.utc)
        with pytest.raises(UserLocked):
            jit.get_auth_user(jit_user["id"])
        Reconciler(store, clerk, page_size=50).run()
        end = (T0 + 10 + 3600) * 1000
        assert (_row(store, jit_user["id"]).locked_until, _row(store, swept["id"]).locked_until) == (end, end)
        clock.at += 2999
        with pytest.raises(UserLocked):
            jit.get_auth_user(jit_user["id"])
        clock.at += 1
        assert jit.get_auth_user(jit_user["id"]).clerk_id == jit_user["id"]  # served: the stored row's lock is over
        report = Reconciler(store, clerk, page_size=50).run()  # Clerk now says unlocked, same updated_at
        assert report.counts["users"].lockouts_ended == 2  # the rows say so too (the ended lockouts are tidied)
        assert not _row(store, jit_user["id"]).locked and _row(store, swept["id"]).locked_until is None
    store.dispose()


# -- the migration ---------------------------------------------------------------------------------------------------

def test_migration_0016_adds_and_drops_locked_until(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        assert "locked_until" in {c["name"] for c in sa.inspect(engine).get_columns("users")}
        migrations.downgrade(engine, "0015")
        assert "locked_until" not in {c["name"] for c in sa.inspect(engine).get_columns("users")}
        migrations.upgrade(engine)
        assert "locked_until" in {c["name"] for c in sa.inspect(engine).get_columns("users")}
        assert migrations.current_revision(engine) == migrations.head_revision()
    finally:
        engine.dispose()
