"""Where the emulator used to be more lenient than Clerk: query filters it ignored, webhooks it only ever sent one
at a time, and the per-user/organization/membership rate limits it did not enforce."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from clerk_sync.emulator import EmulatorConfig
from clerk_sync.testing import EmulatorServer

from .support import Receiver

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emu(clock: Clock) -> Iterator[EmulatorServer]:
    with EmulatorServer(seed=7, clock=clock) as server:
        yield server


def _app(emu: EmulatorServer) -> httpx.Client:
    """A client as the app under test calls Clerk: no helper header, so every limit applies."""
    return httpx.Client(base_url=emu.url + "/v1", headers={"Authorization": f"Bearer {emu.secret_key}"})


def _ext(users: list[dict[str, Any]]) -> list[str]:
    return sorted(u["external_id"] for u in users)


def _count(emu: EmulatorServer, **params: Any) -> int:
    total: int = emu.request("GET", "/v1/users/count", params=params)["total_count"]
    return total


# -- A. query filters ------------------------------------------------------------------------------------------


@pytest.fixture
def two_users(emu: EmulatorServer) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    a = emu.create_user(email_address=["ada@example.com"], external_id="ext_a", first_name="Ada",
                        last_name="Lovelace", username="ada")
    b = emu.create_user(email_address=["bob@example.com"], external_id="ext_b", first_name="Bob", username="bobby")
    org = emu.create_organization(name="Acme", created_by=a["id"])
    return a, b, org


def test_users_organization_id_filter_includes_and_excludes(emu: EmulatorServer, two_users: Any) -> None:
    _, _, org = two_users
    get = lambda **p: _ext(emu.request("GET", "/v1/users", params=p))  # noqa: E731
    assert get(organization_id=org["id"]) == ["ext_a"]
    assert get(organization_id="org_missing") == []
    assert get(organization_id="-" + org["id"]) == ["ext_b"]
    assert get(organization_id="+" + org["id"]) == ["ext_a"]
    assert _count(emu, organization_id=org["id"]) == 1
    assert _count(emu, organization_id="-" + org["id"]) == 1


def test_users_timestamp_ranges(emu: EmulatorServer, clock: Clock) -> None:
    early = emu.create_user(email_address=["early@example.com"], external_id="early")
    clock.now += 100
    late = emu.create_user(email_address=["late@example.com"], external_id="late")
    emu.create_session(late["id"])  # a sign-in: last_sign_in_at and last_active_at now
    mid = int((T0 + 50) * 1000)
    get = lambda **p: _ext(emu.request("GET", "/v1/users", params=p))  # noqa: E731
    assert get(created_at_after=mid) == ["late"]
    assert get(created_at_before=mid) == ["early"]
    assert get(created_at_after=4102444800000) == []
    assert get(created_at_after=early["created_at"]) == ["late"]  # exclusive
    assert get(last_active_at_after=mid) == ["late"]
    assert get(last_active_at_before=1) == []  # never active: no timestamp matches no range
    assert get(last_active_at_since=mid) == ["late"]
    assert get(last_sign_in_at_after=mid) == ["late"]
    assert get(last_sign_in_at_before=int((T0 + 1000) * 1000)) == ["late"]
    assert _count(emu, created_at_after=4102444800000) == 0
    assert _count(emu, created_at_before=mid) == 1
    with pytest.raises(Exception, match="422"):
        emu.request("GET", "/v1/users", params={"created_at_after": "yesterday"})


def test_users_text_filters(emu: EmulatorServer, two_users: Any) -> None:
    get = lambda **p: _ext(emu.request("GET", "/v1/users", params=p))  # noqa: E731
    assert get(name_query="zzz") == []
    assert get(name_query="LOVE") == ["ext_a"]
    assert get(name_query="ada love") == ["ext_a"]
    assert get(email_address_query="BOB@") == ["ext_b"]
    assert get(username_query="BB") == ["ext_b"]
    assert _count(emu, name_query="bob") == 1


def test_users_external_id_exclusion(emu: EmulatorServer, two_users: Any) -> None:
    emu.create_user(email_address=["nobody@example.com"])
    users = emu.request("GET", "/v1/users", params={"external_id": "-ext_a"})
    assert sorted(str(u["external_id"]) for u in users) == ["None", "ext_b"]
    assert _ext(emu.request("GET", "/v1/users", params={"external_id": ["+ext_a", "-ext_b"]})) == ["ext_a"]


def test_users_query_does_not_search_external_id(emu: EmulatorServer, two_users: Any) -> None:
    """The spec: ``query`` checks "email addresses, phone numbers, usernames, web3 wallets, user IDs, first and last
    names"."""
    a, _, _ = two_users
    assert emu.request("GET", "/v1/users", params={"query": "ext_a"}) == []
    assert _ext(emu.request("GET", "/v1/users", params={"query": a["id"]})) == ["ext_a"]
    assert _ext(emu.request("GET", "/v1/users", params={"query": "lovelace"})) == ["ext_a"]


@pytest.mark.parametrize("path", ["/v1/users", "/v1/users/count"])
@pytest.mark.parametrize(
    ("name", "value"),
    [("web3_wallet", "0xabc"), ("provider", "oauth_google"), ("provider_user_id", "12345"),
     ("web3_wallet[]", "0xabc")],
)
def test_users_filters_the_emulator_cannot_honour_answer_422(
    emu: EmulatorServer, two_users: Any, path: str, name: str, value: str
) -> None:
    with _app(emu) as app:
        answer = app.get(path.removeprefix("/v1"), params={name: value})
    assert answer.status_code == 422, answer.text
    error = answer.json()["errors"][0]
    assert error["meta"]["param_name"] == name.removesuffix("[]")
    assert "does not implement the" in error["long_message"]


def test_unknown_query_parameters_are_ignored_as_clerk_does(emu: EmulatorServer, two_users: Any) -> None:
    assert len(emu.request("GET", "/v1/users", params={"no_such_filter": "x"})) == 2
    assert _count(emu, limit=1) == 2  # not documented for /users/count
    org = two_users[2]
    # a /users filter on the instance-wide membership list (which documents only order_by/limit/offset): ignored
    found = emu.request("GET", "/v1/organization_memberships", params={"phone_number": "+1555"})
    assert found["total_count"] == 1
    assert emu.request("GET", f"/v1/organizations/{org['id']}", params={"phone_number": "+1"})["id"] == org["id"]


def test_users_order_by_phone_number_is_spec_valid(emu: EmulatorServer, two_users: Any) -> None:
    assert _ext(emu.request("GET", "/v1/users", params={"order_by": "-phone_number"})) == ["ext_a", "ext_b"]


def test_organizations_id_filters_exclude_and_query_matches_ids_exactly(
    emu: EmulatorServer, two_users: Any
) -> None:
    a, b, acme = two_users
    other = emu.create_organization(name="Other", created_by=b["id"])
    names = lambda **p: sorted(o["name"] for o in emu.request("GET", "/v1/organizations", params=p)["data"])  # noqa: E731
    assert names(organization_id="-" + acme["id"]) == ["Other"]
    assert names(user_id="-" + a["id"]) == ["Other"]
    assert names(user_id=["+" + a["id"]]) == ["Acme"]
    assert names(query=other["id"]) == ["Other"]
    assert names(query=other["id"][:-2]) == []  # exact match for organization ID
    assert names(include_missing_member_with_elevated_permissions="false") == ["Acme", "Other"]
    with _app(emu) as app:
        answer = app.get("/organizations", params={"include_missing_member_with_elevated_permissions": "true"})
    assert answer.status_code == 422, answer.text


def test_org_memberships_user_filters(emu: EmulatorServer, two_users: Any) -> None:
    a, b, org = two_users
    emu.add_membership(org["id"], b["id"])
    path = f"/v1/organizations/{org['id']}/memberships"
    members = lambda **p: sorted(  # noqa: E731
        m["public_user_data"]["user_id"] for m in emu.request("GET", path, params=p)["data"])
    assert members(email_address="BOB@example.com") == [b["id"]]
    assert members(username="ada") == [a["id"]]
    assert members(name_query="lovelace") == [a["id"]]
    assert members(email_address_query="ada@") == [a["id"]]
    assert members(username_query="obb") == [b["id"]]
    assert members(query="bob") == [b["id"]]
    assert members(last_active_at_after=1) == []
    ordered = emu.request("GET", path, params={"order_by": "-username"})["data"]
    assert [m["public_user_data"]["user_id"] for m in ordered] == [b["id"], a["id"]]
    with _app(emu) as app:
        for name in ("created_at_after", "web3_wallet"):
            answer = app.get(path.removeprefix("/v1"), params={name: "1"})
            assert answer.status_code == 422, (name, answer.text)


# -- B. concurrent webhook deliveries ------------------------------------------------------------------------


class _Gate:
    """A receiver that holds every delivery until released, and tells when ``want`` are in flight at once."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.ids: list[str] = []
        self.reached = threading.Event()
        self.release = threading.Event()

    def handle(self, msg_id: str) -> None:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.ids.append(msg_id)
            if self.in_flight >= self.want:
                self.reached.set()
        self.release.wait(20)
        with self.lock:
            self.in_flight -= 1


@pytest.fixture
def gate() -> Iterator[tuple[_Gate, str]]:
    state = _Gate(want=2)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            state.handle(self.headers["svix-id"])
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/webhooks/clerk"
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_delivery_concurrency_sends_several_messages_at_once(gate: tuple[_Gate, str]) -> None:
    state, url = gate
    with EmulatorServer(seed=7, webhook_url=url, delivery_concurrency=4) as emu:
        for i in range(6):
            emu.create_user(email_address=[f"u{i}@example.com"])
        reached = state.reached.wait(10)
        state.release.set()
        emu.wait_for_deliveries(20)
        log = emu.deliveries()
    assert reached, f"at most {state.most} delivery in flight at once with delivery_concurrency=4"
    assert 2 <= state.most <= 4
    assert sorted(state.ids) == sorted(m["id"] for m in log)  # each message once
    assert all(m["status"] == "succeeded" for m in log)


def test_delivery_concurrency_1_stays_one_at_a_time(gate: tuple[_Gate, str]) -> None:
    state, url = gate
    with EmulatorServer(seed=7, webhook_url=url) as emu:
        for i in range(3):
            emu.create_user(email_address=[f"u{i}@example.com"])
        assert not state.reached.wait(0.3)  # the first holds the only worker
        state.release.set()
        emu.wait_for_deliveries(20)
    assert state.most == 1
    assert len(state.ids) == 3


def test_concurrent_delivery_keeps_retries_and_never_sends_one_message_twice_at_once(receiver: Receiver) -> None:
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def first_fails(item: Any) -> int:
        with lock:
            seen[item.headers["svix-id"]] = seen.get(item.headers["svix-id"], 0) + 1
            return 500 if seen[item.headers["svix-id"]] == 1 else 204

    receiver.status_for = first_fails
    with EmulatorServer(seed=3, time_scale=1000.0, webhook_url=receiver.url, delivery_concurrency=4,
                        duplicate_rate=1.0) as emu:
        for i in range(8):
            emu.create_user(email_address=[f"u{i}@example.com"])
        emu.wait_for_deliveries(20)
        log = emu.deliveries()
        emu.set_webhook_url(None)  # a pause still holds with several workers
        emu.create_user(email_address=["paused@example.com"])
        with pytest.raises(RuntimeError, match="are held"):
            emu.wait_for_deliveries(5)
        paused = emu.deliveries()[-1]
        sent_in_the_pause = len(receiver.received)
        emu.set_webhook_url(receiver.url)  # then it goes, with the same faults and retries
        emu.wait_for_deliveries(20)
        late = emu.deliveries()[-1]
    assert len(log) == 8
    for message in log:
        assert message["status"] == "succeeded"
        assert [a["outcome"] for a in message["attempts"]] == ["failed", "succeeded", "succeeded"]
        assert [a["duplicate"] for a in message["attempts"]] == [False, False, True]
    assert sorted(seen.values()) == [3] * 9
    assert paused["status"] == "pending" and paused["attempts"] == [] and sent_in_the_pause == 24
    assert late["id"] == paused["id"] and late["status"] == "succeeded"
    assert [a["outcome"] for a in late["attempts"]] == ["failed", "succeeded", "succeeded"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_delivery_concurrency_must_be_a_positive_integer(bad: Any) -> None:
    with pytest.raises(ValueError, match="delivery_concurrency"):
        EmulatorConfig(delivery_concurrency=bad)


# -- C. per-object rate limits -------------------------------------------------------------------------------


def test_user_metadata_is_limited_per_user(emu: EmulatorServer, clock: Clock, two_users: Any) -> None:
    a, b, _ = two_users
    with _app(emu) as app:
        path = f"/users/{a['id']}/metadata"
        codes = [app.patch(path, json={"public_metadata": {"n": i}}).status_code for i in range(10)]
        assert codes == [200] * 10
        refused = app.patch(path, json={"public_metadata": {"n": 10}})
        assert refused.status_code == 429
        assert refused.json()["errors"][0]["code"] == "too_many_requests"
        assert refused.headers["retry-after"] == "10"
        # another user, and the test helpers, are not held by this user's limit
        assert app.patch(f"/users/{b['id']}/metadata", json={"public_metadata": {}}).status_code == 200
        emu.request("PATCH", "/v1" + path, json={"public_metadata": {"helper": True}})
        clock.now += 4
        assert app.patch(path, json={}).headers["retry-after"] == "6"
        clock.now += 6  # the window, on the emulator's clock, is over
        assert app.patch(path, json={"public_metadata": {"n": 11}}).status_code == 200


@pytest.mark.parametrize(
    ("method", "template", "body"),
    [
        ("PATCH", "/users/{user}", {"first_name": "A"}),
        ("PUT", "/users/{user}/metadata", {"public_metadata": {}}),
        ("PATCH", "/organizations/{org}", {"name": "Acme"}),
        ("PATCH", "/organizations/{org}/metadata", {"public_metadata": {}}),
        ("PUT", "/organizations/{org}/metadata", {"public_metadata": {}}),
        ("PATCH", "/organizations/{org}/memberships/{user}", {"role": "org:admin"}),
        ("PATCH", "/organizations/{org}/memberships/{user}/metadata", {"public_metadata": {}}),
    ],
)
def test_every_per_object_limited_route(
    emu: EmulatorServer, two_users: Any, method: str, template: str, body: dict[str, Any]
) -> None:
    a, _, org = two_users
    with _app(emu) as app:
        path = template.format(user=a["id"], org=org["id"])
        codes = [app.request(method, path, json=body).status_code for _ in range(11)]
        assert codes == [200] * 10 + [429], path
        if "{org}" in template:  # the slug names the same organization
            assert app.request(method, template.format(user=a["id"], org=org["slug"]), json=body).status_code == 429
        # each route has its own window: a GET is not limited per object
        assert app.get(f"/users/{a['id']}").status_code == 200


def test_per_object_limit_can_be_turned_off() -> None:
    with EmulatorServer(object_rate_limit_requests=None) as emu:
        user = emu.create_user(email_address=["x@example.com"])
        with _app(emu) as app:
            codes = {app.patch(f"/users/{user['id']}/metadata", json={}).status_code for _ in range(12)}
    assert codes == {200}
