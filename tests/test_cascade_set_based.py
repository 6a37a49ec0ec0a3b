"""A user's or organization's deletion cascading to many memberships, with the memberships mapped into the
app's table and a hook on their deletion: the app's rows are deleted (per delete policy) and the hook jobs
written set-wise, a bounded number of statements, not ~4 round trips per member (a 20,000-member
organization's deletion took longer than Svix waits). The same rows, jobs, payloads and keys as one by one;
a row the app's table refuses is that row's alone."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.changes import Change, Hook
from clerk_sync.engine import Upsert, plan_delivery
from clerk_sync.events import parse_envelope
from clerk_sync.mapping import (
    Anonymise,
    Deactivate,
    DeletePolicy,
    HardDelete,
    MappedTable,
    SchemaMapping,
    SoftDelete,
    migrate_schema,
)
from clerk_sync.outbox import Outbox
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs, webhook_events
from tests import factories as f
from tests.test_hooks import B, deliver

POLICIES: list[DeletePolicy] = [HardDelete(), SoftDelete("deleted_at"), Deactivate("is_active"),
                                 Anonymise("deleted_at")]
MEMBERS = 300


def _tables(check: bool = False) -> tuple[sa.MetaData, sa.Table, sa.Table]:
    meta = sa.MetaData()
    orgs = sa.Table("cs_workspaces", meta, sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("clerk_org_id", sa.String(64), unique=True, nullable=True),
                    sa.Column("name", sa.String(255)))
    members = sa.Table(
        "cs_workspace_members", meta, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("clerk_membership_id", sa.String(64), unique=True, nullable=True),
        sa.Column("workspace_clerk_id", sa.String(64), sa.ForeignKey("cs_workspaces.clerk_org_id"), index=True),
        sa.Column("member", sa.String(64)), sa.Column("role", sa.String(64)),
        sa.Column("note", sa.String(16), nullable=True),  # the app's own
        sa.Column("deleted_at", sa.DateTime, nullable=True),
        *([sa.CheckConstraint("deleted_at IS NULL OR note IS NULL OR note <> 'keep'", name="cs_keep")]
          if check else []))
    return meta, orgs, members


def _mapping(policy: DeletePolicy, org_policy: DeletePolicy | None = None) -> SchemaMapping:
    return SchemaMapping(
        organizations=MappedTable("cs_workspaces", "clerk_org_id", {"name": "name"}, on_delete=org_policy or policy),
        memberships=MappedTable("cs_workspace_members", "clerk_membership_id", {
            "workspace_clerk_id": "organization_clerk_id", "member": "user_clerk_id", "role": "role"},
            on_delete=policy))


REMOVED = Hook("member-removed", print, on=["organizationMembership.deleted"])


def _store(db_url: str, mapping: SchemaMapping, *, check: bool = False) -> tuple[Store, sa.Engine]:
    meta, _, _ = _tables(check)
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        meta.create_all(conn)
        migrate_schema(conn, mapping)
    return Store.from_url(db_url, mapping=mapping, hooks=[REMOVED]), engine


def _seed(store: Store, org: str, members: list[tuple[str, str]]) -> None:
    """``org`` and its ``members`` (membership id, user id), written in one transaction (through the mapping)."""
    events = [f.envelope("organization.created", f.organization(org, B + 1000))]
    events += [f.envelope("organizationMembership.created", f.membership(mem, org, user, B + 1000))
               for mem, user in members]
    with store.transaction() as writer:
        for event in events:
            intent = plan_delivery(parse_envelope(json.dumps(event))).intent
            assert isinstance(intent, Upsert)
            writer.apply(intent)


@contextmanager
def _statements(engine: sa.Engine) -> Iterator[list[str]]:
    sent: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


def _jobs(store: Store, like: str) -> list[tuple[str, str, str, str, Any]]:
    with store.connect() as conn:
        rows = conn.execute(sa.select(hook_jobs.c.hook, hook_jobs.c.type, hook_jobs.c.entity_key,
                                      hook_jobs.c.idempotency_key, hook_jobs.c.payload)
                            .where(hook_jobs.c.entity_key.like(f"%{like}%")).order_by(hook_jobs.c.id)).all()
    return [(h, t, k, i, p if isinstance(p, dict) else json.loads(p)) for h, t, k, i, p in rows]


def _one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path before: each cascaded deletion recorded on its own."""
    def record_many(self: Outbox, changes: list[Change]) -> None:
        for change in changes:
            self.record(change)
    monkeypatch.setattr(Outbox, "record_many", record_many, raising=False)


def _assert_deleted(policy: DeletePolicy, rows: Sequence[Any]) -> None:
    if isinstance(policy, HardDelete):
        assert list(rows) == []
        return
    assert len(rows) == MEMBERS
    for row in rows:
        if isinstance(policy, SoftDelete | Anonymise):
            assert row.deleted_at is not None
        if isinstance(policy, Deactivate):
            assert row.is_active in (False, 0)  # (MariaDB's reflected BOOLEAN is a TINYINT)
        assert row.role == "org:member"  # (Anonymise: no personal column mapped; the rest kept)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_an_organizations_deletion_deletes_its_mapped_members_set_wise(
        db_url: str, policy: DeletePolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    store, engine = _store(db_url, _mapping(policy))
    _, orgs, members = _tables()
    runs: dict[str, tuple[list[Any], int]] = {}
    for ns in ("old", "new"):  # the same organization twice: recorded one by one, then set-wise
        org = f"org_{ns}"
        _seed(store, org, [(f"orgmem_{ns}{i:04d}", f"user_{ns}{i:04d}") for i in range(MEMBERS)])
        with monkeypatch.context() as patch:
            if ns == "old":
                _one_by_one(patch)
            with _statements(store.engine) as sent:
                assert deliver(store, f.envelope("organization.deleted", f.deleted("organization", org),
                                                 B + 2000)) == ["applied"]
        with engine.connect() as conn:
            live = conn.execute(sa.select(sa.func.count()).select_from(members).where(
                members.c.workspace_clerk_id == org, members.c.deleted_at.is_(None))).scalar_one()
            org_rows = conn.execute(sa.select(orgs.c.id).where(orgs.c.clerk_org_id == org)).all()
            error = conn.execute(sa.select(webhook_events.c.last_error).where(
                webhook_events.c.type == "organization.deleted").order_by(webhook_events.c.id.desc()).limit(1)).scalar()
        assert error is None  # nothing refused
        if isinstance(policy, HardDelete):  # the members' rows went before the workspace they refer to
            assert org_rows == []
        if isinstance(policy, SoftDelete | Anonymise):
            assert live == 0
        full = sa.Table("cs_workspace_members", sa.MetaData(), autoload_with=engine)
        with engine.connect() as conn:
            _assert_deleted(policy, conn.execute(sa.select(full).where(full.c.workspace_clerk_id == org)).all())
        runs[ns] = (_jobs(store, f"orgmem_{ns}"), len(sent))
    (old_jobs, old_sent), (new_jobs, new_sent) = runs["old"], runs["new"]
    assert len(new_jobs) == MEMBERS
    renamed = json.loads(json.dumps(old_jobs).replace("_old", "_new"))
    assert [list(j) for j in new_jobs] == renamed  # same hooks, keys, payloads, in the same order
    assert old_sent > MEMBERS  # (what it was: a DELETE or UPDATE per member, and a job INSERT per member)
    print(f"statements for {MEMBERS} members: {old_sent} one by one, {new_sent} set-wise")
    assert new_sent < 30, f"{new_sent} statements for {MEMBERS} members"
    store.dispose()
    engine.dispose()


def test_a_users_deletion_from_many_organizations_is_set_wise_too(db_url: str) -> None:
    store, engine = _store(db_url, _mapping(HardDelete(), SoftDelete()))
    _, _, members = _tables()
    orgs = 60
    for i in range(orgs):
        _seed(store, f"org_u{i:03d}", [(f"orgmem_u{i:03d}", "user_many")])
    with _statements(store.engine) as sent:
        assert deliver(store, f.envelope("user.deleted", f.deleted("user", "user_many"), B + 2000)) == ["applied"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(members)).scalar_one() == 0
    jobs = _jobs(store, "orgmem_u")
    assert sorted(key for _, _, _, key, _ in jobs) == [
        f"organizationMembership.deleted:orgmem_u{i:03d}:{B + 2000}" for i in range(orgs)]
    assert len(sent) < 30, f"{len(sent)} statements for {orgs} memberships"
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("policy", [HardDelete(), SoftDelete("deleted_at")], ids=lambda p: type(p).__name__)
def test_a_member_row_the_app_refuses_is_its_own_refusal_the_others_are_deleted(
        db_url: str, policy: DeletePolicy) -> None:
    """HardDelete: another app table still refers to one member's row (a foreign key); SoftDelete: a CHECK
    refuses that row's deletion stamp. The set statement is refused: written again one by one, the others
    deleted, that one noted in the delivery's last_error; every member's hook job written still."""
    store, engine = _store(db_url, _mapping(policy, SoftDelete("deleted_at")), check=True)
    _, _, members = _tables()
    meta = sa.MetaData()
    sa.Table("cs_workspace_members", meta, autoload_with=engine)
    notes = sa.Table("cs_member_notes", meta, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("membership", sa.String(64),
                               sa.ForeignKey("cs_workspace_members.clerk_membership_id"), nullable=False))
    notes.create(engine)
    n = 40
    _seed(store, "org_r", [(f"orgmem_r{i:03d}", f"user_r{i:03d}") for i in range(n)])
    kept = "orgmem_r017"
    with engine.begin() as conn:
        if isinstance(policy, HardDelete):
            conn.execute(notes.insert().values(membership=kept))
        else:
            conn.execute(members.update().where(members.c.clerk_membership_id == kept).values(note="keep"))
    assert deliver(store, f.envelope("organization.deleted", f.deleted("organization", "org_r"), B + 2000)) == [
        "applied"]
    with engine.connect() as conn:
        left = conn.execute(sa.select(members.c.clerk_membership_id).where(
            members.c.workspace_clerk_id == "org_r", members.c.deleted_at.is_(None))).scalars().all()
        error = conn.execute(sa.select(webhook_events.c.last_error).where(
            webhook_events.c.type == "organization.deleted")).scalar_one()
        tombstoned = conn.execute(sa.text(
            "SELECT count(*) FROM organization_memberships WHERE deleted_at IS NOT NULL")).scalar_one()
    assert left == [kept]
    assert error is not None and "the app's table refused" in error
    assert kept in error or "cs_keep" in error  # (MariaDB's CHECK: the note quotes the database's error)
    assert tombstoned == n  # clerk-sync's own rows: every membership deleted
    assert len(_jobs(store, "orgmem_r")) == n
    store.dispose()
    engine.dispose()
