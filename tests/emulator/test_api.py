"""Backend API behaviour: paging, filters, metadata semantics, rate limits and fault knobs."""

from __future__ import annotations

import time

import httpx
import pytest

from clerk_sync.emulator import Emulator, EmulatorConfig
from clerk_sync.testing import EmulatorServer


def _get(clerk: EmulatorServer, path: str, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {clerk.secret_key}"}
    return httpx.get(clerk.url + path, params=params, headers=headers)  # type: ignore[arg-type]


def test_users_page_newest_first_with_offset(clerk: EmulatorServer) -> None:
    ids = [clerk.create_user(f"u{n}@example.com")["id"] for n in range(5)]
    assert [u["id"] for u in clerk.request("GET", "/v1/users")] == ids[::-1]
    page = clerk.request("GET", "/v1/users", params={"limit": 2, "offset": 1})
    assert [u["id"] for u in page] == [ids[3], ids[2]]
    oldest = clerk.request("GET", "/v1/users", params={"order_by": "created_at", "limit": 2})
    assert [u["id"] for u in oldest] == ids[:2]
    after = clerk.request("GET", "/v1/users", params={"order_by": "-created_at", "starting_after": ids[3], "limit": 2})
    assert [u["id"] for u in after] == [ids[2], ids[1]]


def test_user_filters_and_count(clerk: EmulatorServer) -> None:
    a = clerk.create_user("alice@example.com", first_name="Alice")
    b = clerk.create_user("bob@example.com", first_name="Bob", external_id="ext-b")
    clerk.create_user("carol@example.com")
    by_email = clerk.request("GET", "/v1/users?email_address=alice@example.com&email_address=bob@example.com")
    assert {u["id"] for u in by_email} == {a["id"], b["id"]}
    by_id = clerk.request("GET", "/v1/users", params={"user_id": [b["id"]]})
    assert [u["id"] for u in by_id] == [b["id"]]
    excluding = clerk.request("GET", "/v1/users", params={"user_id": [f"-{b['id']}"]})
    assert b["id"] not in {u["id"] for u in excluding}
    assert len(excluding) == 2
    assert [u["id"] for u in clerk.request("GET", "/v1/users", params={"query": "ALI"})] == [a["id"]]
    assert clerk.request("GET", "/v1/users", params={"external_id": "ext-b"})[0]["id"] == b["id"]
    assert clerk.request("GET", "/v1/users/count")["total_count"] == 3
    assert clerk.request("GET", "/v1/users/count", params={"query": "example"})["total_count"] == 3
    assert clerk.request("GET", "/v1/users/count", params={"email_address": "bob@example.com"}) == {
        "object": "total_count",
        "total_count": 1,
    }


def test_updated_at_bumps_and_ordering(clerk: EmulatorServer) -> None:
    first = clerk.create_user("first@example.com")
    second = clerk.create_user("second@example.com")
    updated = clerk.request("PATCH", f"/v1/users/{first['id']}", json={"last_name": "Changed"})
    assert updated["updated_at"] > first["updated_at"]
    newest_update = clerk.request("GET", "/v1/users", params={"order_by": "-updated_at"})
    assert [u["id"] for u in newest_update] == [first["id"], second["id"]]


def test_metadata_merge_is_deep_and_null_removes(clerk: EmulatorServer) -> None:
    user = clerk.create_user(
        "meta@example.com", public_metadata={"role": "admin", "prefs": {"theme": "dark", "lang": "en"}}
    )
    merged = clerk.request(
        "PATCH",
        f"/v1/users/{user['id']}/metadata",
        json={
            "public_metadata": {"role": None, "prefs": {"lang": "fr", "tz": "UTC"}},
            "private_metadata": {"stripe": "cus_1"},
        },
    )
    assert merged["public_metadata"] == {"prefs": {"theme": "dark", "lang": "fr", "tz": "UTC"}}
    assert merged["private_metadata"] == {"stripe": "cus_1"}
    replaced = clerk.request("PUT", f"/v1/users/{user['id']}/metadata", json={"public_metadata": {}})
    assert replaced["public_metadata"] == {}
    assert replaced["private_metadata"] == {"stripe": "cus_1"}


def test_patch_user_metadata_depends_on_api_version(clerk: EmulatorServer) -> None:
    user = clerk.create_user("ver@example.com")
    old = clerk.request(
        "PATCH",
        f"/v1/users/{user['id']}",
        json={"public_metadata": {"a": 1}},
        headers={"Clerk-API-Version": "2025-11-10"},
    )
    assert old["public_metadata"] == {"a": 1}
    with pytest.raises(httpx.HTTPStatusError) as info:
        clerk.request(
            "PATCH",
            f"/v1/users/{user['id']}",
            json={"public_metadata": {"a": 2}},
            headers={"Clerk-API-Version": "2026-05-12"},
        )
    assert info.value.response.status_code == 422


def test_organizations_page_and_filter(clerk: EmulatorServer) -> None:
    user = clerk.create_user("orgs@example.com")
    created = [clerk.create_organization(f"Org {n}")["id"] for n in range(4)]
    clerk.add_membership(created[1], user["id"])
    page = clerk.request("GET", "/v1/organizations", params={"limit": 2, "offset": 1})
    assert page["total_count"] == 4
    assert [o["id"] for o in page["data"]] == [created[2], created[1]]
    mine = clerk.request("GET", "/v1/organizations", params={"user_id": user["id"]})
    assert [o["id"] for o in mine["data"]] == [created[1]]
    assert clerk.request("GET", f"/v1/organizations/{created[1]}")["members_count"] == 1
    everyone = clerk.request("GET", "/v1/organization_memberships")
    assert everyone["total_count"] == 1
    assert everyone["data"][0]["public_user_data"]["identifier"] == "orgs@example.com"


def test_duplicate_membership_and_slug_conflicts(clerk: EmulatorServer) -> None:
    user = clerk.create_user("m@example.com")
    org = clerk.create_organization("Same", created_by=user["id"], slug="same")
    for method, path, body in [
        ("POST", f"/v1/organizations/{org['id']}/memberships", {"user_id": user["id"], "role": "org:member"}),
        ("POST", "/v1/organizations", {"name": "Other", "slug": "same"}),
    ]:
        with pytest.raises(httpx.HTTPStatusError) as info:
            clerk.request(method, path, json=body)
        assert info.value.response.status_code == 422


def test_sessions_list_shapes(clerk: EmulatorServer) -> None:
    user = clerk.create_user("s@example.com")
    sessions = [clerk.create_session(user["id"])["id"] for _ in range(3)]
    assert [s["id"] for s in clerk.request("GET", "/v1/sessions", params={"user_id": user["id"]})] == sessions[::-1]
    paged = clerk.request("GET", "/v1/sessions", params={"user_id": user["id"], "paginated": "true", "limit": 1})
    assert paged["total_count"] == 3
    assert len(paged["data"]) == 1
    assert _get(clerk, "/v1/sessions").status_code == 422


def test_rate_limit_returns_429_with_retry_after() -> None:
    with EmulatorServer(rate_limit_requests=5, rate_limit_window_s=1.0) as clerk:
        statuses = [_get(clerk, "/v1/users").status_code for _ in range(5)]
        limited = _get(clerk, "/v1/users")
        assert statuses == [200] * 5
        assert limited.status_code == 429
        assert limited.json()["errors"][0]["code"] == "too_many_requests"
        assert int(limited.headers["Retry-After"]) == 1
        assert _get(clerk, "/v1/jwks").status_code == 200  # JWKS is not rate limited
        time.sleep(float(limited.headers["Retry-After"]))
        assert _get(clerk, "/v1/users").status_code == 200


def test_outage_error_rate_and_latency_knobs(clerk: EmulatorServer) -> None:
    clerk.set_faults(outage=True)
    response = _get(clerk, "/v1/users")
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "service_unavailable"
    assert httpx.get(clerk.url + "/.well-known/jwks.json").status_code == 200
    clerk.set_faults(outage=False, error_rate=1.0)
    assert _get(clerk, "/v1/users").status_code == 500
    clerk.set_faults(error_rate=0.0, latency_s=0.3)
    started = time.monotonic()
    assert _get(clerk, "/v1/users").status_code == 200
    assert time.monotonic() - started >= 0.3
    state = clerk.request("GET", "/_emulator/state")
    assert state["faults"]["latency_s"] == 0.3


def test_error_rate_is_partial_and_seeded() -> None:
    def statuses() -> list[int]:
        with EmulatorServer(seed=5, error_rate=0.5, rate_limit_requests=1000) as clerk:
            return [_get(clerk, "/v1/users").status_code for _ in range(20)]

    first = statuses()
    assert first == statuses()
    assert set(first) == {200, 500}


def test_admin_endpoints_need_the_key_and_validate(clerk: EmulatorServer) -> None:
    assert httpx.get(clerk.url + "/_emulator/state").status_code == 401
    with pytest.raises(httpx.HTTPStatusError) as info:
        clerk.set_faults(error_rate=2)
    assert info.value.response.status_code == 422
    with pytest.raises(httpx.HTTPStatusError):
        clerk.set_faults(no_such_knob=1)


def test_reset_forgets_everything(clerk: EmulatorServer) -> None:
    clerk.create_user("gone@example.com")
    clerk.set_faults(latency_s=0.01)
    state = clerk.request("POST", "/_emulator/reset")
    assert state["records"]["users"] == 0
    assert state["faults"]["latency_s"] == 0.0
    assert clerk.deliveries() == []


def test_seed_demo_is_deterministic() -> None:
    config = EmulatorConfig(seed=11)
    first, second = Emulator(config), Emulator(config)
    try:
        assert first.seed_demo(6, 2) == second.seed_demo(6, 2)
        assert first.store.summary()["memberships"] == 6
    finally:
        first.close()
        second.close()


def test_seed_endpoint(clerk: EmulatorServer) -> None:
    seeded = clerk.request("POST", "/_emulator/seed", json={"users": 4, "organizations": 2})
    assert len(seeded["users"]) == 4
    assert len(seeded["organizations"]) == 2
    demo0 = clerk.request("GET", f"/v1/users/{seeded['users'][0]}")
    assert demo0["public_metadata"] == {"role": "admin"}


def test_bulk_users_page_fast_without_webhooks(clerk: EmulatorServer) -> None:
    assert clerk.request("POST", "/_emulator/bulk_users", json={"count": 20_000}) == {"created": 20_000}
    assert clerk.deliveries() == []
    assert clerk.request("GET", "/v1/users/count")["total_count"] == 20_000
    started = time.monotonic()
    seen = 0
    for offset in range(0, 20_000, 500):
        seen += len(clerk.request("GET", "/v1/users", params={"limit": 500, "offset": offset}))
    assert seen == 20_000
    assert time.monotonic() - started < 15


def test_config_from_env() -> None:
    env = {
        "CLERK_SECRET_KEY": "sk_test_x",
        "CLERK_WEBHOOK_SIGNING_SECRET": "whsec_abc",
        "CLERK_EMULATOR_TIME_SCALE": "100",
        "CLERK_EMULATOR_SEED": "3",
    }
    config = EmulatorConfig.from_env(env, webhook_url="http://h/x")
    assert (config.secret_key, config.effective_webhook_secret, config.time_scale, config.seed) == (
        "sk_test_x",
        "whsec_abc",
        100.0,
        3,
    )
    assert config.webhook_url == "http://h/x"
    assert not config.webhook_secret_was_generated
    generated = EmulatorConfig.from_env({})
    assert generated.webhook_secret_was_generated
    assert generated.effective_webhook_secret.startswith("whsec_")
    assert generated.replace(seed=1).effective_webhook_secret == generated.effective_webhook_secret
    with pytest.raises(ValueError, match="CLERK_EMULATOR_SEED"):
        EmulatorConfig.from_env({"CLERK_EMULATOR_SEED": "x"})
