"""The data-protection walkthrough of retention and erasure: what it found, fixed (one test or two each)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.errors import StoreError
from clerk_sync.events import parse_envelope
from clerk_sync.freshness import read_snapshot
from clerk_sync.ingest import WebhookProcessor, replay_deliveries
from clerk_sync.retention import Retention, RetentionPolicy
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, organizations, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_retention import EMAIL, _failing, _later, deliver


def _rows(store: Store) -> dict[str, tuple[str, str | None, bool]]:
    """Each delivery's status, ``last_error``, and whether its payload still holds the person's address."""
    with store.connect() as conn:
        return {r.svix_id: (r.status, r.last_error, EMAIL in json.dumps(r.payload))
                for r in conn.execute(sa.select(webhook_events))}


def _redacted_failed_stays(store: Store, svix_id: str) -> None:
    """As an earlier release left a failed delivery it redacted (or ingest stores one about a gone user)."""
    with store.transaction() as w:
        doc: Any = w.conn.execute(sa.select(webhook_events.c.payload)
                                  .where(webhook_events.c.svix_id == svix_id)).scalar_one()
        doc = json.loads(doc) if isinstance(doc, str) else doc
        w.conn.execute(webhook_events.update().where(webhook_events.c.svix_id == svix_id).values(
            payload={"type": doc["type"], "data": {"id": doc["data"]["id"]}, "redacted": True},
            redacted_at=w.now, last_error="(redacted)"))


def test_a_failed_delivery_an_erasure_or_prune_redacts_is_settled_skipped_not_left_failing(
        store: Store, verifier: WebhookVerifier) -> None:
    """Walkthrough item 4: the redacted failed deliveries stayed ``failed`` ("(redacted)"): doctor --freshness
    failed, and the failed-backlog gauge (its alert) counted them, asking for a fix and a replay that could
    only settle them ``skipped``. The redaction settles them so, in the same statement; another user's failure
    stays failed, and so does nothing a replay could still apply."""
    processor = WebhookProcessor(store, verifier)
    for user_id in ("user_e", "user_d", "user_old", "user_live"):
        assert deliver(processor, f.envelope("user.created", f.user(user_id, 100)), f"c_{user_id}") == "applied"
        assert deliver(processor, _failing(user_id), f"f_{user_id}") == "failed"
    assert read_snapshot(store).failed_backlog == 4

    Retention(store).erase_user("user_e", reason="DSR")  # the erasure redacts f_user_e
    assert deliver(processor, f.envelope("user.deleted", f.deleted("user", "user_d")), "d_user_d") == "applied"
    _redacted_failed_stays(store, "f_user_old")  # redacted, and left failed, before this fix
    policy = RetentionPolicy(clear_tombstones_after=timedelta(days=7))
    assert Retention(store, policy, now=_later(8)).prune().redacted == 1  # f_user_d (f_user_old was already)

    rows = _rows(store)
    settled = "(redacted) skipped: its payload was redacted"
    for svix_id in ("f_user_e", "f_user_d", "f_user_old"):
        status, error, whole = rows[svix_id]
        assert (status, whole) == ("skipped", False), svix_id
        assert error is not None and error.startswith(settled), (svix_id, error)
    assert rows["f_user_live"] == ("failed", rows["f_user_live"][1], True)  # a live user's: whole, for its replay
    assert read_snapshot(store).failed_backlog == 1  # doctor --freshness and clerk_sync_failed_deliveries
    assert replay_deliveries(store).by_status == {"failed": 1}  # nothing else is left to replay
    assert Retention(store, policy, now=_later(8)).prune().redacted == 0  # once
    assert Retention(store, now=_later(91)).prune().deleted >= 3  # settled: deleted at the inbox's age like others
    assert set(_rows(store)) == {"f_user_live"}


def test_a_failed_user_delivery_with_a_padded_id_is_redacted_once_its_user_is_deleted(
        store: Store, verifier: WebhookVerifier) -> None:
    """Walkthrough item 2: a ``user.*`` delivery whose ``data.id`` is padded (``" user_p"``) is refused, on
    purpose, and stored ``failed``, whole; once user_p was deleted, prune never redacted it (the id it read
    was None), though the docs promise "redacted once its user is deleted". The id trimmed decides whom it is
    about, for the redaction only; a padded id of a live user stays whole, for a fix by hand and a replay."""
    processor = WebhookProcessor(store, verifier)
    for user_id in ("user_p", "user_q"):
        assert deliver(processor, f.envelope("user.created", f.user(user_id, 100)), f"c_{user_id}") == "applied"
        padded = f.envelope("user.updated", f.user(f" {user_id} ", 200, email=EMAIL))
        assert deliver(processor, padded, f"pad_{user_id}") == "failed"
    assert deliver(processor, f.envelope("user.deleted", f.deleted("user", "user_p")), "d_user_p") == "applied"
    policy = RetentionPolicy(clear_tombstones_after=timedelta(days=7))

    assert Retention(store, policy, now=_later(8)).prune(dry_run=True).redacted == 1
    assert Retention(store, policy, now=_later(8)).prune().redacted == 1
    rows = _rows(store)
    assert (rows["pad_user_p"][0], rows["pad_user_p"][2]) == ("skipped", False)
    assert (rows["pad_user_q"][0], rows["pad_user_q"][2]) == ("failed", True)  # user_q lives: whole


def test_an_erasure_lists_the_organizations_the_person_created_for_review(
        store: Store, verifier: WebhookVerifier) -> None:
    """Walkthrough item 1: an organization the erased person created kept a name and slug made of theirs
    ("Ada Lovelace's team", ``ada-lovelace``), and nothing said so: ``mentioned_elsewhere`` looked for their id,
    addresses and numbers only. clerk-sync's tables do not keep the creator; the stored events not redacted yet
    do (``created_by``, also a membership event's ``organization.created_by``): those organizations are listed
    (report and audit row) and left as they are, the organization's data; another creator's are not."""
    processor = WebhookProcessor(store, verifier)
    assert deliver(processor, f.envelope("user.created", f.user("user_a", 100, email=EMAIL)), "c_a") == "applied"

    def org(org_id: str, creator: str, **extra: Any) -> dict[str, Any]:
        return f.organization(org_id, 100, name="Ada Lovelace's team") | {"slug": f"ada-{org_id}",
                                                                            "created_by": creator, **extra}

    for svix_id, data in (("o_team", org("org_team", "user_a")),
                          ("o_both", org("org_both", "user_a", private_metadata={"billing": EMAIL})),
                          ("o_m", org("org_m", "user_a")), ("o_other", org("org_other", "user_x"))):
        assert deliver(processor, f.envelope("organization.created", data), svix_id) == "applied"
    with store.transaction() as w:  # org_m's own event redacted already (retention): its membership event says it
        w.conn.execute(webhook_events.update().where(webhook_events.c.svix_id == "o_m").values(
            payload={"type": "organization.created", "data": {"id": "org_m"}, "redacted": True}, redacted_at=w.now))
    member = f.membership("orgmem_m", "org_m", "user_a", 200, role="org:admin")
    member["organization"]["created_by"] = "user_a"
    assert deliver(processor, f.envelope("organizationMembership.created", member), "m_m") == "applied"

    report = Retention(store).erase_user("user_a", reason="DSR-9")
    assert report.mentioned_elsewhere == ("organizations org_both: private_metadata; created by them (name, slug)",
                                          "organizations org_team: created by them (name, slug)",
                                          "organizations org_m: created by them (name, slug)")
    advice = report.elsewhere_advice()
    assert advice is not None and "org_team" in advice and "created by them" in advice and "org_other" not in advice
    with store.connect() as conn:
        audit = conn.execute(sa.select(audit_log.c.details).where(audit_log.c.action == "user.erased")).scalar_one()
        names = dict(conn.execute(sa.select(organizations.c.clerk_id, organizations.c.name)).all())
    assert audit["mentioned_elsewhere"] == list(report.mentioned_elsewhere)
    assert set(names.values()) == {"Ada Lovelace's team"}  # listed, not changed
    # (run again, it knows none of it: the row is cleared, the events that said it are redacted)
    assert Retention(store).erase_user("user_a").mentioned_elsewhere == ()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_an_erasure_whose_wait_for_deliveries_in_flight_ran_out_says_so_in_its_audit_row(
        db_url: str, verifier: WebhookVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
    """Walkthrough item 6: an erasure whose wait for the deliveries in flight ran out (exit 3, "run again")
    committed its ``user.erased`` row before the wait, and nothing recorded that what they stored was left
    unchecked. The row still commits with the erasure (a kill during the wait leaves no erasure unaudited);
    a ``user.erasure_settled`` row now says ``"settled": false``, and one counts what a later check redacted."""
    import clerk_sync.retention as retention

    monkeypatch.setattr(retention, "_SETTLE_WAIT_S", 1)
    store, other = Store.from_url(db_url), Store.from_url(db_url)
    processor = WebhookProcessor(store, verifier)

    def erased_rows() -> list[tuple[str, dict[str, Any]]]:
        with other.connect() as conn:
            return [(action, dict(d)) for action, d in conn.execute(sa.select(audit_log.c.action, audit_log.c.details)
                    .where(audit_log.c.action.like("user.eras%")).order_by(audit_log.c.id))]

    try:
        assert deliver(processor, f.envelope("user.created", f.user("user_h", 100, email=EMAIL)), "u1") == "applied"
        with store.transaction() as writer:  # a delivery in flight, its inbox row written, not committed
            session = {"id": "sess_h", "object": "session", "user_id": "user_h", "client_id": "client_1",
                       "status": "active", "created_at": 1, "updated_at": 1, "expire_at": 9_999_999_999_999}
            processor.apply_in(writer, "s1", parse_envelope(f.body_of(f.envelope("session.created", session))))
            with pytest.raises(StoreError, match="run the erasure again"):
                Retention(other).erase_user("user_h", reason="DSR-3")
            assert erased_rows() == [("user.erased", {"payloads_redacted": 1, "reason": "DSR-3"}),
                                     ("user.erasure_settled", {"payloads_redacted": 0, "settled": False})]
        again = Retention(other).erase_user("user_h", reason="DSR-3")
        assert again.payloads_redacted == 1  # the session, committed since
        assert erased_rows()[2:] == [("user.erased", {"payloads_redacted": 1, "reason": "DSR-3"}),
                                     ("user.erasure_settled", {"payloads_redacted": 0, "settled": True})]
    finally:
        store.dispose()
        other.dispose()


def test_a_failing_delivery_about_a_user_already_deleted_is_stored_settled_skipped(
        store: Store, verifier: WebhookVerifier) -> None:
    """Left by the data-protection walkthrough: a delivery about a user deleted before it arrived, that could
    not apply (here a membership update without its organization), was stored redacted but ``failed`` until
    prune's next pass settled it: doctor --freshness failed and the failed-backlog alert could fire in between,
    asking for a fix and a replay that could only settle it. Ingest now stores it settled ``skipped`` at once, with
    the reason that names nobody; a live user's failing delivery stays ``failed`` and whole, for its replay."""
    processor = WebhookProcessor(store, verifier)
    for user_id in ("user_gone", "user_live"):
        assert deliver(processor, f.envelope("user.created", f.user(user_id, 100)), f"c_{user_id}") == "applied"
    assert deliver(processor, f.envelope("user.deleted", f.deleted("user", "user_gone")), "d_gone") == "applied"

    assert deliver(processor, _failing("user_gone"), "f_gone") == "skipped"
    assert deliver(processor, _failing("user_live"), "f_live") == "failed"
    assert deliver(processor, _failing("user_gone"), "f_gone") == "duplicate"

    rows = _rows(store)
    status, error, whole = rows["f_gone"]
    assert (status, whole) == ("skipped", False)
    assert error is not None and error.startswith("(redacted) skipped: its payload was redacted"), error
    assert (rows["f_live"][0], rows["f_live"][2]) == ("failed", True)
    assert read_snapshot(store).failed_backlog == 1
    assert replay_deliveries(store).by_status == {"failed": 1}
