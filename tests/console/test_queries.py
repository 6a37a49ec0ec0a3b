"""The console's reads use the indexes of migrations 0008_console (expressions) and 0012 (MySQL/MariaDB:
indexed virtual columns), and masking hides personal data."""

from __future__ import annotations

import sqlalchemy as sa

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.console._masking import MASK, mask
from clerk_sync.integrations.console._queries import (
    AuditFilter,
    DeliveryFilter,
    _user_matches,
    delivery_ids,
    list_audit,
    list_deliveries,
    memberships,
    search_organizations,
    search_users,
    touching,
)
from clerk_sync.store import Store
from clerk_sync.tables import users, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f


def _plan(store: Store, query: sa.Select[tuple[int]] | sa.CompoundSelect[tuple[int]]) -> str:
    with store.connect() as conn:
        if store.dialect == "mysql":  # FORCE INDEX-free: the plan's possible_keys name the usable indexes
            sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
            return "\n".join(" ".join(map(str, r)) for r in conn.exec_driver_sql(f"EXPLAIN {sql}"))
        if conn.dialect.name == "sqlite":
            sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
            return "\n".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
        conn.exec_driver_sql("SET enable_seqscan = off")  # tiny tables: make the planner show its index choice
        sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
        return "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {sql}"))


def test_clerk_id_filter_uses_the_payload_indexes(store: Store) -> None:
    plan = _plan(store, sa.select(webhook_events.c.id).where(webhook_events.c.id.in_(touching("user_1"))))
    for index in ("ix_webhook_events_data_id", "ix_webhook_events_data_user_id", "ix_webhook_events_data_org_id",
                  "ix_webhook_events_data_owner_id"):
        assert index in plan, plan


def test_name_search_uses_the_lower_case_indexes(store: Store) -> None:
    plan = _plan(store, sa.select(users.c.id).where(users.c.id.in_(_user_matches("ada"))))
    for index in ("ix_users_first_name_lower", "ix_users_last_name_lower", "ix_users_email_lower"):
        assert index in plan, plan


def test_address_search_uses_the_lower_case_index(store: Store) -> None:
    plan = _plan(store, sa.select(users.c.id).where(users.c.id.in_(_user_matches("John.Smith@"))))
    assert "ix_users_email_lower" in plan, plan


def test_time_filter_uses_the_received_at_index(store: Store) -> None:
    since = sa.select(webhook_events.c.id).where(*DeliveryFilter(status=None).conditions(),
                                                 webhook_events.c.received_at >= sa.literal("2026-01-01"))
    assert "ix_webhook_events_received_at" in _plan(store, since)


def test_clerk_id_filter_and_name_search_find_the_rows_on_every_store(store: Store) -> None:
    """The same answers from the expressions (SQLite, PostgreSQL) and the virtual columns (MySQL/MariaDB)."""
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    events = {"u": f.envelope("user.created", f.user("user_a", 10, first_name="Ada")),
              "v": f.envelope("user.created", f.user("user_b", 10, first_name="Grace")),
              "o": f.envelope("organization.created", f.organization("org_a", 10, name="Analytical Engines")),
              "m": f.envelope("organizationMembership.created", f.membership("orgmem_a", "org_a", "user_a", 10))}
    for key, event in events.items():
        assert processor.process(*f.signed(event, f"msg_{key}")).status == "applied"
    with store.connect() as conn:
        def about(clerk_id: str) -> set[str]:
            return {r["svix_id"] for r in list_deliveries(conn, DeliveryFilter(clerk_id=clerk_id), None).rows}

        assert (about("user_a"), about("org_a"), about("orgmem_a"), about("user_c")) == (
            {"msg_u", "msg_m"}, {"msg_o", "msg_m"}, {"msg_m"}, set())
        assert [r["clerk_id"] for r in search_users(conn, "ADA", None).rows] == ["user_a"]
        assert [r["clerk_id"] for r in search_users(conn, "grace love", None).rows] == ["user_b"]
        assert [r["clerk_id"] for r in search_organizations(conn, "analytical")] == ["org_a"]


def test_an_address_is_found_as_typed_and_lower_cased_on_every_store(store: Store) -> None:
    """Clerk keeps an e-mail address as it was entered: one stored with capitals is found when typed as it is
    (the search lower-cased the query only, and so never matched it), and a lower-case one however typed."""
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    for n, (clerk_id, email) in enumerate([("user_t", "Twin@Case.example"), ("user_l", "lower@case.example")]):
        event = f.envelope("user.created", f.user(clerk_id, 10, email=email))
        assert processor.process(*f.signed(event, f"msg_case_{n}")).status == "applied"
    with store.connect() as conn:
        def found(q: str) -> list[str]:
            return [r["clerk_id"] for r in search_users(conn, q, None).rows]

        assert found("Twin@Case.example") == ["user_t"]
        assert found("Twin@") == ["user_t"]
        assert found("lower@case.example") == found("LOWER@Case") == ["user_l"]
        assert found("nobody@case.example") == []


def test_an_address_stored_with_capitals_is_found_typed_in_any_case_on_every_store(store: Store) -> None:
    """The search says it is case-insensitive, and was for names only: ``john.smith@example.com`` (how an
    operator types it) never found ``John.Smith@Example.com``, nor did ``john`` (console review)."""
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    event = f.envelope("user.created", f.user("user_j", 10, email="John.Smith@Example.com", first_name="Ann"))
    assert processor.process(*f.signed(event, "msg_john")).status == "applied"
    with store.connect() as conn:
        def found(q: str) -> list[str]:
            return [r["clerk_id"] for r in search_users(conn, q, None).rows]

        for q in ("John.Smith@Example.com", "john.smith@example.com", "JOHN.SMITH@", "john", "JOHN", "John.S"):
            assert found(q) == ["user_j"], q
        assert found("jane") == found("john.smith@example.org") == []


def test_a_session_event_is_about_its_user_on_every_store(store: Store) -> None:
    """A ``session.*`` event names its user in ``data.user_id``: a failed revocation was missing from the user's
    deliveries, from the ``clerk_id`` filter and from the bulk replay of that user's failed deliveries (console
    review); the index of migration 0020 serves the lookup."""
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    session = {"object": "session", "id": "sess_1", "user_id": "user_s", "client_id": "client_1", "status": "revoked",
               "expire_at": 1_900_000_000_000, "abandon_at": 1_900_000_000_000, "last_active_at": 1_700_000_000_000,
               "created_at": 1_700_000_000_000, "updated_at": 1_700_000_000_000}
    deliveries = {"msg_user": (f.envelope("user.created", f.user("user_s", 10)), "applied"),
                  "msg_ok": (f.envelope("session.revoked", session), "applied"),
                  "msg_bad": (f.envelope("session.revoked", {**session, "id": ["not", "an", "id"]}), "failed"),
                  "msg_other": (f.envelope("session.revoked", {**session, "id": "sess_2", "user_id": "user_o"}),
                                "applied")}
    for svix_id, (event, status) in deliveries.items():
        assert processor.process(*f.signed(event, svix_id)).status == status, svix_id
    with store.connect() as conn:
        about = {r["svix_id"] for r in list_deliveries(conn, DeliveryFilter(clerk_id="user_s"), None).rows}
        assert about == {"msg_user", "msg_ok", "msg_bad"}
        assert [s for s, _ in delivery_ids(conn, DeliveryFilter(status="failed", clerk_id="user_s"), 10)] == ["msg_bad"]


def test_the_operator_token_is_an_actor_the_audit_filter_finds_on_every_store(store: Store) -> None:
    """The audit page shows an operator-token action's actor as ``operator``; filtering by that found nothing
    (the filter compared ``actor_clerk_id``, which such a row lacks), nor did anything else (console review)."""
    entries = [AuditEntry("console.reveal", None, "user_a", details={"via": "console", "as": "operator"}),
               AuditEntry("user.role_changed", None, "user_a", details={"via": "cli"}),
               AuditEntry("console.reveal", "user_admin", "user_a", details={"via": "console", "as": "admin"})]
    with store.transaction() as writer:
        for entry in entries:
            record_audit(writer, entry)
    with store.connect() as conn:
        def actions(actor: str) -> list[tuple[str, str | None]]:
            return [(r["action"], r["actor_clerk_id"]) for r in list_audit(conn, AuditFilter(actor=actor), None).rows]

        assert actions("operator") == [("console.reveal", None)]
        assert actions("user_admin") == [("console.reveal", "user_admin")]
    if store.dialect == "postgresql":
        return  # (its json refused NaN when an earlier release wrote it)
    with store.transaction() as w:  # an earlier release's unreadable details, no actor (kept by migration 0019)
        w.conn.execute(sa.text("INSERT INTO audit_log (action, actor_clerk_id, target_clerk_id, details, created_at) "
                               "VALUES ('users.erased', NULL, 'user_b', '{\"score\": NaN}', :at)"), {"at": w.now})
    with store.connect() as conn:  # SQLite's json_extract raised "malformed JSON": the page answered 503 (review)
        assert actions("operator") == [("console.reveal", None)]


def test_an_address_with_letters_beyond_ascii_is_found_typed_in_capitals_on_every_store(store: Store) -> None:
    """SQLite's lower() folds ASCII only: ``JÜRGEN@`` found ``jürgen@example.de`` when the query was lower-cased in
    Python, and not once the search went through the database's lower() (review of this change)."""
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    event = f.envelope("user.created", f.user("user_j", 10, email="jürgen@example.de", first_name="J"))
    assert processor.process(*f.signed(event, "msg_jurgen")).status == "applied"
    with store.connect() as conn:
        for q in ("JÜRGEN@", "JÜRGEN", "jürgen@example.de", "Jürgen@Example.DE"):
            assert [r["clerk_id"] for r in search_users(conn, q, None).rows] == ["user_j"], q


def test_memberships_come_admins_first_with_their_count_on_every_store(store: Store) -> None:
    """A large organization's page shows its first rows and says how many there are in all; its admins, the
    rows an operator looks for, come first whatever order they joined in."""
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    events = [f.envelope("organization.created", f.organization("org_big", 10, name="Big"))]
    for n in range(5):
        role = "org:admin" if n == 3 else "org:member"
        events.append(f.envelope("organizationMembership.created",
                                 f.membership(f"orgmem_{n}", "org_big", f"user_{n}", 10, role=role)))
    for n, event in enumerate(events):
        assert processor.process(*f.signed(event, f"msg_mem_{n}")).status == "applied"
    with store.connect() as conn:
        cut = memberships(conn, organization="org_big", limit=2)
        assert (cut.total, [r["clerk_id"] for r in cut.rows]) == (5, ["orgmem_3", "orgmem_0"])
        whole = memberships(conn, organization="org_big")
        assert (whole.total, len(whole.rows)) == (5, 5)
        assert memberships(conn, user="user_3").total == 1


def test_mask_hides_personal_fields_at_any_depth() -> None:
    payload = {"type": "user.updated", "data": {
        "id": "user_1", "first_name": "Ada", "last_name": None, "image_url": "https://img/1",
        "email_addresses": [{"id": "idn_1", "email_address": "ada@example.com"}],
        "phone_numbers": [{"phone_number": "+15555550100"}], "private_metadata": {"stripe": "cus_1"},
        "public_metadata": {"role": "admin"}, "unsafe_metadata": {},
    }}
    data = mask(payload)["data"]
    assert data["first_name"] == MASK and data["last_name"] is None and data["image_url"] == MASK
    assert data["email_addresses"] == [{"id": "idn_1", "email_address": MASK}]
    assert data["phone_numbers"] == [{"phone_number": MASK}]
    assert data["private_metadata"] == MASK and data["unsafe_metadata"] == {}
    assert data["public_metadata"] == {"role": "admin"} and data["id"] == "user_1"
    assert payload["data"]["first_name"] == "Ada"  # a copy: the stored payload is untouched


def test_delivery_types_lists_each_type_once(store: Store) -> None:
    from clerk_sync.integrations.console._queries import delivery_types

    with store.transaction() as w:
        for i, kind in enumerate(["user.updated", "user.created", "user.updated", "session.created"]):
            w.record_delivery(f"msg_{i}", {"type": kind, "data": {}}, event_type=kind, instance_id=None,
                              event_timestamp=None)
    with store.connect() as conn:
        assert delivery_types(conn) == ["session.created", "user.created", "user.updated"]
    with store.transaction() as w:
        w.conn.execute(sa.delete(webhook_events))
    with store.connect() as conn:
        assert delivery_types(conn) == []


def test_mask_hides_fields_it_has_never_heard_of_in_every_clerk_example() -> None:
    """Review finding: OTP codes, message bodies, phone numbers and IP addresses of email/sms/session
    events were shown in clear. With an allow-list, no example's personal string survives."""
    import json

    from tests.conftest import CLERK_FIXTURES

    secrets = {"email.created": ["otp_code", "body", "to_email_address"], "sms.created": ["message", "to_phone_number"]}
    for path in sorted((CLERK_FIXTURES / "examples").glob("*.json")):
        payload = json.loads(path.read_text())
        shown = json.dumps(mask(payload))
        for name in secrets.get(payload["type"], []):
            value = payload["data"].get(name)
            if isinstance(value, str) and len(value) > 3:
                assert value not in shown, (path.name, name)
        assert "@" not in shown.replace(MASK, ""), path.name  # no e-mail address anywhere
        assert mask(payload)["data"].get("id") == payload["data"].get("id")  # ids stay in clear

def test_names_python_and_the_database_lower_case_differently_are_found_on_every_store(store: Store) -> None:
    """The typed text is lower-cased by the database's ``lower()``, as the indexed column is: Python gives
    ``İ`` as ``i̇`` (PostgreSQL and MariaDB: ``i``) and lower-cases Deseret ``𐐀`` (MariaDB leaves it), so these
    names were never found, typed exactly as stored."""
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    ibrahim, orin = f.user("user_i", 10, first_name="İbrahim"), f.user("user_d", 10, first_name="\U00010400rin")
    ibrahim["last_name"], orin["last_name"] = "Öz", "İnce"
    events = {"i": f.envelope("user.created", ibrahim), "d": f.envelope("user.created", orin),
              "o": f.envelope("organization.created", f.organization("org_i", 10, name="İstanbul Works"))}
    for key, event in events.items():
        assert processor.process(*f.signed(event, f"msg_fold_{key}")).status == "applied"
    with store.connect() as conn:
        def found(q: str) -> list[str]:
            return sorted(r["clerk_id"] for r in search_users(conn, q, None).rows)

        assert found("İbrahim") == found("İbr") == found("İbrahim Öz") == ["user_i"]
        assert found("\U00010400rin") == found("\U00010400") == found("\U00010400rin İnce") == ["user_d"]
        assert found("İ") == ["user_d", "user_i"]  # a first name, a last name
        assert [r["clerk_id"] for r in search_organizations(conn, "İstanbul")] == ["org_i"]
