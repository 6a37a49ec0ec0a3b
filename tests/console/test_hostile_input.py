"""Review findings: hostile filter, pagination and path input gave 500 or 503 (with Retry-After) where the
console means 400 or 404; a time filter with an offset was off by that offset on SQLite; a stored Clerk id
with a ``/`` made the pages that link it 500. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.console.conftest import ConsoleStack, operator_client
from tests.console.test_http import HTML, delivery_id, status_of

BIG = "99999999999999999999999"
NOT_A_ROW_ID = "is not a row id"
NUL = "contains a NUL character"
OUT_OF_RANGE = "outside the years 1-9999"


def test_hostile_filters_and_ids_are_a_clear_400_or_404_and_write_nothing(stack: ConsoleStack) -> None:
    svix_id = stack.failed_delivery(stack.user_id, first_name="Gracie")
    cases: list[tuple[str, str, dict[str, str], int, str]] = [
        # row ids: past BIGINT (OverflowError on SQLite, 503 on PostgreSQL), digits int() refuses
        ("GET", "/deliveries", {"before": BIG}, 400, NOT_A_ROW_ID),
        ("GET", "/audit", {"before": BIG}, 400, NOT_A_ROW_ID),
        ("GET", "/users", {"before": BIG}, 400, NOT_A_ROW_ID),
        ("GET", "/deliveries", {"before": str(2**63)}, 400, NOT_A_ROW_ID),
        ("GET", "/deliveries", {"before": "²"}, 400, NOT_A_ROW_ID),
        ("GET", f"/deliveries/{BIG}", {}, 404, "no such delivery"),
        ("GET", f"/deliveries/{'9' * 5000}", {}, 404, "no such delivery"),  # int() refuses 4,300+ digits
        ("POST", f"/deliveries/{BIG}/replay", {}, 404, "no such delivery"),
        ("POST", f"/deliveries/{BIG}/reveal", {}, 404, "no such delivery"),
        # NUL: PostgreSQL refuses it in text (503 with Retry-After)
        ("GET", "/deliveries", {"clerk_id": "user_\x00"}, 400, NUL),
        ("GET", "/deliveries", {"type": "user.\x00"}, 400, NUL),
        ("GET", "/users", {"q": "ada\x00"}, 400, NUL),
        ("GET", "/audit", {"actor": "user_\x00"}, 400, NUL),
        ("GET", "/audit", {"action": "console.\x00"}, 400, NUL),
        ("GET", "/audit", {"target": "user_\x00"}, 400, NUL),
        ("GET", "/audit.csv", {"target": "user_\x00"}, 400, NUL),
        ("GET", "/users/%00", {}, 400, NUL),
        ("GET", "/organizations/%00", {}, 400, NUL),
        ("POST", "/users/%00/role", {"role": "admin"}, 400, NUL),
        ("POST", "/deliveries/replay", {"clerk_id": f"{stack.user_id}\x00"}, 400, NUL),
        # times with no UTC equivalent (OverflowError converting to UTC: 503 on MariaDB)
        ("GET", "/deliveries", {"since": "9999-12-31T23:59:59-01:00"}, 400, OUT_OF_RANGE),
        ("GET", "/deliveries", {"until": "0001-01-01T00:00+01:00"}, 400, OUT_OF_RANGE),
        ("GET", "/audit", {"since": "0001-01-01T00:00+01:00"}, 400, OUT_OF_RANGE),
        ("POST", "/deliveries/replay", {"since": "9999-12-31T23:59:59-01:00"}, 400, OUT_OF_RANGE),
    ]
    with operator_client(stack) as client:
        for method, path, values, status, says in cases:
            response = client.get(path, params=values) if method == "GET" else client.post(path, data=values)
            case = (method, path[:40], values, response.status_code, response.text[:200])
            assert response.status_code == status, case
            assert says in response.json()["message"] and "retry-after" not in response.headers, case
        # the edges themselves are fine
        assert client.get("/deliveries", params={"before": str(2**63 - 1)}).status_code == 200
        assert client.get(f"/deliveries/{2**63 - 1}").status_code == 404
        assert client.get("/deliveries", params={"since": "0001-01-01T00:00", "until": "9999-12-31T23:59"},
                          headers=HTML).status_code == 200
    assert status_of(stack, svix_id) == "failed" and stack.audit_rows() == []


def test_a_time_filter_written_with_an_offset_means_that_instant(stack: ConsoleStack) -> None:
    """SQLite compared the wall time of ``since`` and dropped its offset: an hour ago at +05:00 was four
    hours ahead, and the delivery received now was not listed."""
    svix_id = stack.failed_delivery(stack.user_id, first_name="Gracie")
    link = f'/console/deliveries/{delivery_id(stack, svix_id)}"'
    with stack.store.transaction() as writer:
        record_audit(writer, AuditEntry("impersonation.refused", stack.user_id, stack.admin_id))
    now = datetime.now(UTC)
    since = (now - timedelta(hours=1)).astimezone(timezone(timedelta(hours=5))).isoformat()
    until = (now + timedelta(hours=1)).astimezone(timezone(timedelta(hours=-5))).isoformat()
    with operator_client(stack) as client:
        for where in ({"since": since}, {"until": until}, {"since": since, "until": until}):
            assert link in client.get("/deliveries", params=where, headers=HTML).text, where
            audit = client.get("/audit", params={"action": "impersonation.refused", **where}, headers=HTML).text
            assert "impersonation.refused</td>" in audit, where
        later = (now + timedelta(hours=1)).astimezone(timezone(timedelta(hours=5))).isoformat()
        assert link not in client.get("/deliveries", params={"since": later}, headers=HTML).text


def test_a_stored_id_with_a_slash_is_shown_not_linked(stack: ConsoleStack) -> None:
    """``path_for('user', clerk_id='user_a/b')`` asserts (no ``/`` in a path parameter): /audit, the
    delivery page, the user list and the organization page answered 500."""
    odd = "user_a/b"
    processor = WebhookProcessor(stack.store, WebhookVerifier([f.SECRET]))
    events = {"u": f.envelope("user.created", f.user(odd, 10, first_name="Slashy")),
              "o": f.envelope("organization.created", f.organization("org_slash", 10, name="Slash Inc")),
              "m": f.envelope("organizationMembership.created", f.membership("orgmem_slash", "org_slash", odd, 10))}
    for key, event in events.items():
        assert processor.process(*f.signed(event, f"msg_slash_{key}")).status == "applied"
    with stack.store.transaction() as writer:
        record_audit(writer, AuditEntry("impersonation.refused", stack.admin_id, odd))
        record_audit(writer, AuditEntry("impersonation.refused", stack.admin_id, stack.user_id))
    with operator_client(stack) as client:
        pages = {"/audit": {}, f"/deliveries/{delivery_id(stack, 'msg_slash_u')}": {}, "/users": {"q": "slashy"},
                 "/organizations/org_slash": {}}
        for path, params in pages.items():
            response = client.get(path, params=params, headers=HTML)
            assert response.status_code == 200, (path, response.text[:300])
            assert odd in response.text and "/users/user_a/b" not in response.text, path
        # a Clerk id is still a link
        assert f'href="/console/users/{stack.user_id}"' in client.get("/audit", headers=HTML).text


def test_a_clerk_id_filter_longer_than_a_clerk_id_is_a_clear_400(stack: ConsoleStack) -> None:
    """Review finding: bulk replay filtered by a 65+ character "Clerk id" wrote it into
    ``audit_log.target_clerk_id`` (VARCHAR(64)): 503 with Retry-After on PostgreSQL and MariaDB."""
    svix_id = stack.failed_delivery(stack.user_id, first_name="Gracie")
    long = "user_" + "x" * 60
    with operator_client(stack) as client:
        for response in (client.get("/deliveries", params={"clerk_id": long}),
                         client.post("/deliveries/replay", data={"clerk_id": long})):
            case = (response.request.method, response.status_code, response.text[:200])
            assert response.status_code == 400 and "retry-after" not in response.headers, case
            assert "at most 64" in response.json()["message"], case
        assert client.get("/deliveries", params={"clerk_id": long[:64]}).status_code == 200
    assert status_of(stack, svix_id) == "failed" and stack.audit_rows() == []


def test_done_shows_only_the_notices_the_console_writes(stack: ConsoleStack) -> None:
    """Review finding: ``?done=`` was shown verbatim as a notice, so a link could make the trusted console say
    "Session expired: sign in again at https://evil.example/console"."""
    svix_id = stack.failed_delivery(stack.user_id, first_name="Gracie")
    phishing = "Session expired: sign in again at https://evil.example/console"
    pages = (f"/users/{stack.user_id}", "/deliveries", f"/deliveries/{delivery_id(stack, svix_id)}")
    with operator_client(stack) as client:
        for path in pages:
            for done in (phishing, "replayed 3 (applied:1) " + phishing):
                page = client.get(path, params={"done": done}, headers=HTML)
                assert page.status_code == 200 and "evil.example" not in page.text, path
                assert 'data-testid="notice"' not in page.text, path
        known = {f"/users/{stack.user_id}": "role:applied", "/deliveries": "replayed 3 (applied:1,skipped:2)",
                 f"/deliveries/{delivery_id(stack, svix_id)}": "replayed:applied"}
        for path, done in known.items():
            assert f'data-testid="notice">{done}<' in client.get(path, params={"done": done}, headers=HTML).text
