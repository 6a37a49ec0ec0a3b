"""An erasure searches for the address (or phone number) a member's stored ``organizationMembership.*`` events
give as ``public_user_data.identifier``.

A user whose ``user.*`` events never came here (synced before clerk-sync was installed, or pruned) is known by
address only there; an invitation, ``email.created`` or ``sms.created`` naming only that address stayed whole
after the erasure, until its redaction by age (review, stop 59: "left alone"). Clerk's example payloads, through
``WebhookProcessor``, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.tables import webhook_events
from tests import factories as f
from tests.test_erasure_address_only_events import holding
from tests.test_event_hooks import example, send

USER = "user_member_only"


def _member(mem_id: str, user_id: str, identifier: str) -> dict[str, Any]:
    body = f.membership(mem_id, "org_m", user_id, 100)
    body["public_user_data"]["identifier"] = identifier
    return f.envelope("organizationMembership.created", body)


def test_a_member_known_only_by_membership_has_the_address_it_gives_searched(db_url: str) -> None:
    store = Store.from_url(db_url)
    address, other = "Mia.Member@Example.com", "someone.else@example.com"
    assert send(store, _member("orgmem_1", USER, address), "msg_member") == "applied"
    assert send(store, _member("orgmem_2", "user_someone", other), "msg_someone") == "applied"
    for n, to in enumerate([address.lower(), other]):  # mail sent to the address only, and another person's
        mail = example("email.created", to_email_address=to, user_id=None, email_address_id=None)
        assert send(store, mail, f"msg_mail_{n}") == "ignored"
    invited = example("organizationInvitation.created", email_address=address.upper())
    assert send(store, invited, "msg_invited") == "ignored"
    assert holding(store, address.lower()) == ["msg_invited", "msg_mail_0", "msg_member"]

    report = Retention(store).erase_user(USER, reason="DSR")
    assert holding(store, address.lower()) == []
    assert report.payloads_redacted == 3
    assert holding(store, other) == ["msg_mail_1", "msg_someone"]  # another member's: whole
    store.dispose()


def test_a_phone_number_identifier_is_searched_and_a_username_is_not(db_url: str) -> None:
    store = Store.from_url(db_url)
    phone = "+15555550123"
    assert send(store, _member("orgmem_p", USER, phone), "msg_member_phone") == "applied"
    assert send(store, _member("orgmem_u", USER, "mia"), "msg_member_username") == "applied"
    text = example("sms.created", to_phone_number=phone, user_id=None, phone_number_id=None)
    assert send(store, text, "msg_sms") == "ignored"
    # another person's payload holding the word of the username: a username is not searched for
    named = example("email.created", to_email_address="mia@example.org", user_id=None, email_address_id=None,
                    subject="Hello mia")
    assert send(store, named, "msg_other_mail") == "ignored"

    Retention(store).erase_user(USER)
    assert holding(store, phone) == []
    assert holding(store, "mia@example.org") == ["msg_other_mail"]
    store.dispose()


# -- review of the above: the address of another live user, tied to them by their deliveries only ------------

def _with_phone(user_id: str, email: str, phone: str, at: int) -> dict[str, Any]:
    data = f.user(user_id, at, email=email)
    data["phone_numbers"] = [{"id": f"idn_p_{user_id}", "object": "phone_number", "phone_number": phone}]
    return data


def _redacted(store: Store) -> list[str]:
    with store.connect() as conn:
        return sorted(svix_id for svix_id, at in conn.execute(
            sa.select(webhook_events.c.svix_id, webhook_events.c.redacted_at)) if at is not None)


def test_a_recycled_phone_number_of_a_live_user_is_not_searched_for(db_url: str) -> None:
    """A person deletes their account and signs up again: Clerk gives the address and the number to the new
    account. The address was left out of the search (a users row holds it), the number was not (no row keeps
    one): the new account's own ``user.created`` was redacted, while the report said it was left whole."""
    store = Store.from_url(db_url)
    address, phone = "ann@example.com", "+15555550123"
    assert send(store, f.envelope("user.created", _with_phone("user_old", address, phone, 100)), "msg_old") \
        == "applied"
    assert send(store, f.envelope("user.deleted", f.deleted("user", "user_old")), "msg_old_deleted") == "applied"
    assert send(store, f.envelope("user.created", _with_phone("user_new", address, phone, 200)), "msg_new") \
        == "applied"
    report = Retention(store).erase_user("user_old", reason="DSR")
    assert _redacted(store) == ["msg_old", "msg_old_deleted"]
    assert len(report.mentioned_elsewhere) == 1 and report.mentioned_elsewhere[0].startswith(
        "users user_new: email (a live user holds this address now"), report.mentioned_elsewhere
    assert "stored deliveries (a live user's: they hold this address or number now" \
        in report.mentioned_elsewhere[0]  # (the number: no row says it)
    store.dispose()


def test_an_identifier_another_live_member_holds_now_is_not_searched_for(db_url: str) -> None:
    """The identifier search (above) redacted the deliveries of another member known only by deliveries, who
    holds the address now: their membership and their mail."""
    store = Store.from_url(db_url)
    address = "shared@example.com"
    assert send(store, _member("orgmem_old", "user_old", address), "msg_old_member") == "applied"
    assert send(store, _member("orgmem_new", "user_new", address), "msg_new_member") == "applied"
    mail = example("email.created", to_email_address=address, user_id="user_new")
    assert send(store, mail, "msg_new_mail") == "ignored"
    report = Retention(store).erase_user("user_old")
    assert _redacted(store) == ["msg_old_member"]
    assert report.mentioned_elsewhere == ("users user_new: stored deliveries (a live user's: they hold this address "
                                          "or number now: it was not searched for, what names only it was left "
                                          "whole)",)
    # once that member is erased too, nothing holds the address: it is searched for
    Retention(store).erase_user("user_new")
    assert _redacted(store) == ["msg_new_mail", "msg_new_member", "msg_old_member"]
    store.dispose()


def test_the_address_a_member_was_invited_at_is_searched_for(db_url: str) -> None:
    """Clerk's membership ``identifier`` is the primary one; the address the person was invited at is tied to
    them by the accepted invitation (and a mail to it naming their id)."""
    store = Store.from_url(db_url)
    work = "mia.member@work.example"
    assert send(store, _member("orgmem_1", USER, "mia@private.example"), "msg_member") == "applied"
    assert send(store, example("organizationInvitation.created", email_address=work), "msg_invited") == "ignored"
    before = example("email.created", to_email_address=work, user_id=None, email_address_id=None)
    assert send(store, before, "msg_mail_before") == "ignored"
    accepted = example("organizationInvitation.accepted", email_address=work, user_id=USER)
    assert send(store, accepted, "msg_accepted") == "ignored"
    Retention(store).erase_user(USER)
    assert holding(store, work) == [] and holding(store, "mia@private.example") == []
    store.dispose()


@pytest.mark.parametrize(("field", "value"), [("phone_numbers", True), ("email_addresses", 5),
                                          ("phone_numbers", {"phone_number": "+15555550123"})])
def test_an_erasure_reads_past_a_stored_event_of_another_shape(db_url: str, field: str, value: Any) -> None:
    """A signed ``user.updated`` whose list is not one is applied ("cleaned") and stored as received; the
    erasure raised TypeError on it, every run, until prune redacted it (review). Likewise a user id that is a
    list in another delivery."""
    store = Store.from_url(db_url)
    assert send(store, f.envelope("user.created", f.user("user_h", 100)), "msg_h") == "applied"
    assert send(store, f.envelope("user.updated", {**f.user("user_h", 200), field: value}), "msg_odd") == "applied"
    odd = example("email.created", to_email_address="x@example.com", user_id=["user_h"])
    assert send(store, odd, "msg_odd_mail") == "ignored"
    report = Retention(store).erase_user("user_h")
    assert report.row_existed and {"msg_h", "msg_odd"} <= set(_redacted(store))
    store.dispose()


def test_an_address_or_number_another_user_held_once_is_searched_for(db_url: str) -> None:
    """Review of the above: any stored delivery that ever named the address made its user its holder "now":
    user_b had the address (and the number), changed them, user_a signed up with them; erasing user_a left
    their invitation and texts whole, and the report said user_b holds them."""
    store = Store.from_url(db_url)
    address, phone = "shared@example.com", "+15555550199"
    assert send(store, f.envelope("user.created", _with_phone("user_b", address, phone, 100)), "msg_b1") \
        == "applied"
    assert send(store, f.envelope("user.updated", _with_phone("user_b", "b.new@example.com", "+15555550100", 200)),
                "msg_b2") == "applied"
    assert send(store, f.envelope("user.created", _with_phone("user_a", address, phone, 300)), "msg_a1") \
        == "applied"
    assert send(store, example("organizationInvitation.created", email_address=address), "msg_invite") == "ignored"
    text = example("sms.created", to_phone_number=phone, user_id=None, phone_number_id=None)
    assert send(store, text, "msg_sms") == "ignored"
    report = Retention(store).erase_user("user_a", reason="DSR")
    # (user_b's old event, superseded, names it too: redacted with the rest, as before the holders were read)
    assert holding(store, address) == [] and holding(store, phone) == []
    assert report.mentioned_elsewhere == ()
    store.dispose()
