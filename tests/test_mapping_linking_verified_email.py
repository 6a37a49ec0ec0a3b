"""Linking an existing row by e-mail trusts only an address Clerk verified; an erasure or an
``Anonymise`` deletion clears the linking e-mail column even when the mapping does not write it."""

from __future__ import annotations

import ast
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from clerk_sync.cli.hooks import clerk_link_lookup, migrate_mapping
from clerk_sync.config import Settings
from clerk_sync.engine import Entity, Upsert
from clerk_sync.events import user_record
from clerk_sync.mapping import Anonymise, MappedTable, SchemaMapping
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests.conftest import clerk_client
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table


def _accounts(name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("email", sa.String(320)), sa.Column("name", sa.String(200)),
                    sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
                    sa.Column("anonymised_at", sa.DateTime(timezone=True)))


def _unverified(user: dict[str, object]) -> dict[str, object]:
    for address in user["email_addresses"]:  # type: ignore[attr-defined]
        address["verification"] = {"status": "unverified", "strategy": "email_code"}
    return user


@pytest.mark.parametrize(("verification", "verified"), [
    ({"status": "verified", "strategy": "from_oauth_google"}, True), ({"status": "unverified"}, False),
    ({"status": "transferable"}, False), ({"status": "expired"}, False), (None, False), ("verified", False),
])
def test_a_user_record_carries_whether_clerk_verified_its_primary_address(verification: object,
                                                                         verified: bool) -> None:
    data = f.user("user_v", B)
    data["email_addresses"][1]["verification"] = verification  # the primary
    assert user_record(data).email_verified is verified
    data["primary_email_address_id"] = "idn_other_user_v"  # an unverified secondary as the primary
    assert user_record(data).email_verified is False


def test_an_unverified_primary_address_never_takes_over_an_existing_row(db_url: str) -> None:
    """Fixed: the primary address was trusted whatever its verification, so whoever signed up with an
    existing customer's address (verification at sign-up off, an OAuth provider that does not verify) was
    handed that row: its admin flag, its orders. (Nor is it given a row beside it, which the verification would
    never link: refused until Clerk verifies the address, which the claimant cannot do.)"""
    table = _accounts("acc_unv")
    mapping = SchemaMapping(users=MappedTable("acc_unv", "clerk_user_id", {"name": "full_name"},
                                              link_by_email="email"))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(email="victim@example.com", name="Victim", is_admin=True))
        attacker = _unverified(f.user("user_attacker", B + 1000, email="victim@example.com", first_name="Mallory"))
        assert deliver(store, f.envelope("user.created", attacker)) == ["applied"]
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.id, table.c.name, table.c.is_admin, sa.column("clerk_user_id"))
                                .order_by(table.c.id)).all()
        assert rows[0][1:] == ("Victim", True, None)  # the customer's row is untouched
        assert rows[1:] == []  # and no row beside it
        with engine.connect() as conn:
            error = conn.execute(sa.text("SELECT last_error FROM webhook_events")).scalar_one()
        assert "which Clerk has not verified: not written" in error
        # The customer, whose address Clerk verified, is still linked to the row
        owner = f.user("user_owner", B + 1000, email="Victim@Example.com", first_name="Vic")
        assert deliver(store, f.envelope("user.created", owner)) == ["applied"]
        with engine.connect() as conn:
            linked = conn.execute(sa.select(table.c.is_admin, sa.column("clerk_user_id"))
                                  .where(table.c.id == rows[0][0])).one()
        assert linked == (True, "user_owner")
    finally:
        store.dispose()
        engine.dispose()


@pytest.mark.parametrize("how", ["erase", "anonymise"])
def test_the_linking_email_column_is_cleared_with_the_person(db_url: str, how: str) -> None:
    """Fixed: an erasure and an ``Anonymise`` deletion cleared the mapped columns only; a table linked
    by ``link_by_email="email"`` whose mapping does not write ``email`` kept the address (the audit said done)."""
    table = _accounts(f"acc_{how}")
    mapping = SchemaMapping(users=MappedTable(f"acc_{how}", "clerk_user_id", {"name": "full_name"},
                                              link_by_email="email", on_delete=Anonymise("anonymised_at")))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(email="ada@example.com", name="Ada L"))
        assert deliver(store, f.envelope("user.created", f.user("user_a1", B + 1000, email="ada@example.com"))) \
            == ["applied"]
        if how == "erase":
            Retention(store).erase_user("user_a1", reason="data-subject request")
        else:
            assert deliver(store, f.envelope("user.deleted", f.deleted("user", "user_a1"))) == ["applied"]
        with engine.connect() as conn:
            row = conn.execute(sa.select(table.c.email, table.c.name, sa.column("clerk_user_id"))).one()
        assert row.email is None and row.name is None, row
    finally:
        store.dispose()
        engine.dispose()


def test_a_backfill_neither_links_nor_duplicates_a_row_whose_email_it_cannot_trust(db_url: str) -> None:
    """Fixed: clerk-sync's tables do not keep whether Clerk verified an address, so once linking
    required a verified one, ``--backfill`` linked no row by e-mail and wrote an empty second row beside each
    customer's, which no later event would link. Such a user is refused by the backfill (counted, with the
    reason); the user's next event, verified, links the customer's row."""
    table = _accounts("acc_backfill")
    plain = Store.from_url(db_url)  # a running install, before the app adopted the mapping
    deliver(plain, f.envelope("user.created", f.user("user_known", B + 1000, email="Known@Example.com")),
            f.envelope("user.created", f.user("user_new", B + 1000, email="new@example.com")))
    plain.dispose()
    mapping = SchemaMapping(users=MappedTable("acc_backfill", "clerk_user_id", {"name": "full_name"},
                                              link_by_email="email"))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(email="known@example.com", name="Legacy", is_admin=True))
        with capture_logs() as logs:
            counts = mapping.backfill(store)
        assert counts == {"users": 1, "refused": 1}
        refusals = [e for e in logs if e["event"] == "backfill_row_refused"]
        assert [e["clerk_id"] for e in refusals] == ["user_known"]
        assert "next event links it" in refusals[0]["reason"] and "@" not in refusals[0]["reason"]

        def rows() -> list[tuple[object, ...]]:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(
                    sa.select(table.c.email, table.c.name, table.c.is_admin, sa.column("clerk_user_id"))
                    .order_by(table.c.id))]

        assert rows() == [("known@example.com", "Legacy", True, None), (None, "Ada Lovelace", False, "user_new")]
        assert mapping.backfill(store) == {"users": 1, "refused": 1}  # idempotent: still no second row
        assert len(rows()) == 2
        # The user's next event carries Clerk's verification: the customer's row is linked, not duplicated
        assert deliver(store, f.envelope("user.updated", f.user("user_known", B + 2000, email="Known@Example.com",
                                                                first_name="Kim"))) == ["applied"]
        assert rows() == [("known@example.com", "Kim Lovelace", True, "user_known"),
                          (None, "Ada Lovelace", False, "user_new")]
    finally:
        store.dispose()
        engine.dispose()


def test_a_backfill_writes_no_row_beside_one_the_external_id_would_link(db_url: str) -> None:
    """Fixed: with ``link_by_external_id`` the backfill (whose rows carry no external id) inserted a new row
    for every user, beside the legacy row Clerk's external id names; later events found the new row by Clerk id
    and never linked the legacy one. A user not written yet is refused; its next event links the legacy row."""
    table = sa.Table("acc_ext", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("name", sa.String(200)))
    plain = Store.from_url(db_url)
    user = f.user("user_ext", B + 1000)
    user["external_id"] = "41"
    deliver(plain, f.envelope("user.created", user))
    plain.dispose()
    mapping = SchemaMapping(users=MappedTable("acc_ext", "clerk_user_id", {"name": "full_name"},
                                              link_by_external_id="id"))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=41, name="Legacy"))
        with capture_logs() as logs:
            assert mapping.backfill(store) == {"refused": 1}
        (refusal,) = [e for e in logs if e["event"] == "backfill_row_refused"]
        assert "external id" in refusal["reason"] and "next event links it" in refusal["reason"]

        def rows() -> list[tuple[object, ...]]:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(
                    sa.select(table.c.id, table.c.name, sa.column("clerk_user_id")).order_by(table.c.id))]

        assert rows() == [(41, "Legacy", None)]
        user = f.user("user_ext", B + 2000, first_name="Lin")
        user["external_id"] = "41"
        assert deliver(store, f.envelope("user.updated", user)) == ["applied"]
        assert rows() == [(41, "Lin Lovelace", "user_ext")]
        assert mapping.backfill(store) == {"users": 1}  # linked now: written again as it is, idempotent
        assert rows() == [(41, "Lin Lovelace", "user_ext")]
    finally:
        store.dispose()
        engine.dispose()


def test_a_backfill_with_clerks_key_links_the_rows_it_can_vouch_for(db_url: str, emu: EmulatorServer) -> None:
    """Fixed: without what links a user (kept by no clerk-sync table), the backfill linked nothing, and a
    legacy user who never changes their profile stayed unlinked. With Clerk's secret key it reads, for the
    users it has not written, their external id and their e-mail's verification from Clerk's API: rows are
    linked by external id and by a verified e-mail; a user whose e-mail changed in Clerk since its row was
    synced is refused (the next event says); one with no legacy row is written."""
    ada = emu.create_user(email="ada@example.com", first_name="Ada")
    bob = emu.create_user(email="bob@example.com", first_name="Bob", external_id="107")
    cid = emu.create_user(email="cid@example.com", first_name="Cid")
    dan = emu.create_user(email="dan@example.com", first_name="Dan")
    eve = emu.create_user(email="eve@example.com", first_name="Eve")
    plain = Store.from_url(db_url)

    def synced_as(user: dict[str, Any], email: str) -> dict[str, Any]:  # the address changed in Clerk since
        return {**user, "email_addresses": [{**user["email_addresses"][0], "email_address": email}]}

    with plain.transaction() as writer:
        for data in (ada, bob, synced_as(cid, "old.cid@example.com"), dan, synced_as(eve, "old.eve@example.com")):
            writer.apply(Upsert(Entity.USER, user_record(data)))
    plain.dispose()
    table = _accounts("acc_lookup")
    mapping = SchemaMapping(users=MappedTable("acc_lookup", "clerk_user_id", {"name": "full_name"},
                                              link_by_email="email", link_by_external_id="id"))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        with engine.begin() as conn:
            # (ids past those the table's own sequence gives the rows the backfill writes, on PostgreSQL)
            conn.execute(table.insert(), [{"id": 101, "email": "ADA@example.com", "name": "legacy ada"},
                                          {"id": 103, "email": "old.cid@example.com", "name": "legacy cid"},
                                          {"id": 107, "email": "robert@example.com", "name": "legacy bob"},
                                          {"id": 105, "email": "eve@example.com", "name": "legacy eve"}])
        settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_SECRET_KEY": emu.secret_key,
                                      "CLERK_API_URL": emu.url})
        migrated = migrate_mapping(store, mapping, backfill=True, settings=settings)
        lines = migrated.lines
        assert _backfilled(lines[-2]) == {"users": 3, "refused": 2}, lines
        assert migrated.refused == 2 and lines[-1].startswith("mapping: 2 row(s) refused, not written"), lines
        with engine.connect() as conn:
            rows = {r.id: (r.name, r.clerk_user_id) for r in conn.execute(
                sa.select(table.c.id, table.c.name, sa.column("clerk_user_id")))}
        assert rows.pop(101) == ("Ada", ada["id"])  # by its verified e-mail
        assert rows.pop(107) == ("Bob", bob["id"])  # by its external id
        assert rows.pop(103) == ("legacy cid", None)  # the e-mail synced is not the one Clerk verified now
        assert rows.pop(105) == ("legacy eve", None)  # nor by Clerk's new one: no second row, the event links it
        assert list(rows.values()) == [("Dan", dan["id"])]  # no legacy row: its own
        without = migrate_mapping(store, mapping, backfill=True, settings=Settings.from_env({"DATABASE_URL": db_url}))
        assert "no CLERK_SECRET_KEY" in without.lines[-3] and _backfilled(without.lines[-2]) == {"users": 3, "refused": 2}
    finally:
        store.dispose()
        engine.dispose()


def _backfilled(line: str) -> object:
    assert line.startswith("mapping: backfilled ")
    return ast.literal_eval(line.removeprefix("mapping: backfilled "))


def test_the_backfills_lookup_leaves_out_a_user_it_cannot_read(emu: EmulatorServer) -> None:
    """Fixed: one malformed user in Clerk's answer stopped ``migrate --backfill`` at the same page on
    every run; it is left out (the backfill refuses that user, as reconcile skips it) and the others are read."""
    good = emu.create_user(email="good@example.com")
    bad = emu.create_user(email="bad@example.com")
    emu.emulator.store.users[bad["id"]].updated_at = None  # type: ignore[assignment]
    with clerk_client(emu) as clerk, capture_logs() as logs:
        found = clerk_link_lookup(clerk)([good["id"], bad["id"]])
    assert set(found) == {good["id"]} and found[good["id"]]["email"] == "good@example.com"
    assert [e["clerk_id"] for e in logs if e["event"] == "backfill_lookup_unreadable"] == [bad["id"]]
