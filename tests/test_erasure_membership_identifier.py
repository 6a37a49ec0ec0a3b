"""An erasure searches for the address (or phone number) a member's stored ``organizationMembership.*`` events
give as ``public_user_data.identifier``.

A user whose ``user.*`` events never came here (synced before clerk-sync was installed, or pruned) is known by
address only there; an invitation, ``email.created`` or ``sms.created`` naming only that address stayed whole
after the erasure, until its redaction by age (review, stop 59: "left alone"). Clerk's example payloads, through
``WebhookProcessor``, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from typing import Any

from clerk_sync.retention import Retention
from clerk_sync.store import Store
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
