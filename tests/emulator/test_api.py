"""Backend API behaviour: paging, filters, metadata semantics, rate limits and fault knobs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clerk_sync.emulator import Emulator, EmulatorConfig, create_app
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


def test_patch_organization_metadata_depends_on_api_version(clerk: EmulatorServer) -> None:
    """Stored (wholesale) before 2026-05-12 and without a version header, as PATCH /users/{id} does."""
    org = clerk.create_organization("Versioned", public_metadata={"old": True})
    path = f"/v1/organizations/{org['id']}"
    unversioned = clerk.request("PATCH", path, json={"public_metadata": {"a": 1}, "private_metadata": {"p": 1}})
    assert (unversioned["public_metadata"], unversioned["private_metadata"]) == ({"a": 1}, {"p": 1})
    old = clerk.request("PATCH", path, json={"public_metadata": {"b": 2}}, headers={"Clerk-API-Version": "2025-11-10"})
    assert (old["public_metadata"], old["private_metadata"]) == ({"b": 2}, {"p": 1})
    refused = _call(clerk, "PATCH", path, json={"private_metadata": {"c": 3}}, headers={"Clerk-API-Version": "2026-05-12"})
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["meta"] == {"param_name": "private_metadata"}
    assert clerk.request("GET", path)["private_metadata"] == {"p": 1}


def _call(clerk: EmulatorServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {clerk.secret_key}", **kwargs.pop("headers", {})}
    return httpx.request(method, clerk.url + path, headers=headers, **kwargs)


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        ("/v1/organizations", {"name": "Q", "max_allowed_memberships": "abc"}, "max_allowed_memberships",
         "max_allowed_memberships must be an integer"),
        ("/v1/actor_tokens", {"actor": {"sub": "user_admin"}, "expires_in_seconds": "abc"}, None,
         "wrong type (ValueError: invalid literal for int() with base 10: 'abc')"),
        ("/v1/users", {"email_address": [5]}, "email_address", "is invalid"),
    ],
    ids=["org-limit-string", "actor-token-expiry-string", "email-number"],
)
def test_wrong_body_types_are_clerk_422s(clerk: EmulatorServer, path: str, body: dict[str, Any],
                                         param: str | None, says: str) -> None:
    """Not a text/plain 500: a value the emulator does not check itself still gets Clerk's 422."""
    if path == "/v1/actor_tokens":
        body = {**body, "user_id": clerk.create_user("imp@example.com")["id"]}
    response = _call(clerk, "POST", path, json=body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "form_param_format_invalid"
    assert error["meta"] == ({"param_name": param} if param else {})
    assert says in error["long_message"]


def test_unexpected_errors_answer_in_clerk_shape() -> None:
    """A bug in a handler is still Clerk's error JSON (a 500), which clients parse like any other."""
    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    app, emulator = create_app(EmulatorConfig())
    app.router.routes.append(Route("/v1/broken", broken))

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as client:
            return await client.get("/v1/broken")

    try:
        response = asyncio.run(call())
    finally:
        emulator.close()
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    (error,) = response.json()["errors"]
    assert error["code"] == "internal_clerk_error"
    assert "RuntimeError: boom" in error["long_message"]


def test_starting_after_needs_the_created_at_ordering(clerk: EmulatorServer) -> None:
    ids = [clerk.create_user(f"c{n}@example.com")["id"] for n in range(4)]
    for order_by, expected in [(None, ids[0:1]), ("-created_at", ids[0:1]), ("created_at", ids[2:3]),
                               ("+created_at", ids[2:3])]:
        params = {"starting_after": ids[1], "limit": 1, **({"order_by": order_by} if order_by else {})}
        assert [u["id"] for u in clerk.request("GET", "/v1/users", params=params)] == expected, order_by
    refused = _get(clerk, "/v1/users", starting_after=ids[1], order_by="-updated_at")
    assert refused.status_code == 422
    (error,) = refused.json()["errors"]
    assert error["meta"] == {"param_name": "order_by"}
    assert "requires ordering by created_at" in error["message"]


def test_query_parameter_bounds(clerk: EmulatorServer) -> None:
    """offset has no maximum; id filters take up to 100 values; session statuses are the spec's enum."""
    offset = _get(clerk, "/v1/users", offset=-1)
    assert offset.status_code == 422
    assert offset.json()["errors"][0]["message"] == "offset must be at least 0"
    assert _get(clerk, "/v1/users", user_id=[f"user_{n}" for n in range(100)]).status_code == 200
    too_many = _get(clerk, "/v1/users", user_id=[f"user_{n}" for n in range(101)])
    assert too_many.status_code == 422
    assert too_many.json()["errors"][0]["meta"] == {"param_name": "user_id"}
    user = clerk.create_user("st@example.com")
    assert _get(clerk, "/v1/sessions", user_id=user["id"], status="active").status_code == 200
    bogus = _get(clerk, "/v1/sessions", user_id=user["id"], status="bogus")
    assert bogus.status_code == 422
    assert bogus.json()["errors"][0]["meta"] == {"param_name": "status"}


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
    assert EmulatorConfig.from_env({"CLERK_EMULATOR_SEED": "x"}, seed=4).seed == 4  # an override wins


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")], ids=["zero", "negative", "nan"])
def test_time_scale_must_be_positive(scale: float) -> None:
    """It divides the retry delays: 0 used to kill the delivery worker at the first retry."""
    with pytest.raises(ValueError, match="time_scale must be greater than 0"):
        EmulatorConfig(time_scale=scale)
    with pytest.raises(ValueError, match="CLERK_EMULATOR_TIME_SCALE must be a number greater than 0"):
        EmulatorConfig.from_env({"CLERK_EMULATOR_TIME_SCALE": str(scale)})
    assert EmulatorConfig.from_env({"CLERK_EMULATOR_TIME_SCALE": "0"}, time_scale=2.0).time_scale == 2.0


def test_a_rate_limit_below_one_request_is_refused_with_its_reason(clerk: EmulatorServer) -> None:
    """Review finding: ``emulate --rate-limit 0`` started, then answered every Backend API call 429."""
    from clerk_sync.emulator import EmulatorConfig

    for bad in (0, -5):
        with pytest.raises(ValueError, match=r"rate_limit_requests must be at least 1 .*got"):
            EmulatorConfig(rate_limit_requests=bad)
    with pytest.raises(ValueError, match="rate_limit_window_s must be greater than 0"):
        EmulatorConfig(rate_limit_window_s=0)
    with pytest.raises(httpx.HTTPStatusError) as info:
        clerk.set_faults(rate_limit_requests=0)
    assert info.value.response.status_code == 422
    assert clerk.request("GET", "/v1/users", params={"limit": 1}) is not None  # still serving
