"""The README's usage, type-checked by `scripts/check` (mypy --strict): the documented API must stay typed."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from starlette.applications import Starlette

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.auth.users import AuthUser, JitUsers
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.config import Settings
from clerk_sync.freshness import database_probe
from clerk_sync.integrations.asgi import ClerkAuthMiddleware
from clerk_sync.integrations.fastapi import ClerkAuth, build_processor, sync_me_router, webhook_router
from clerk_sync.integrations.starlette import webhook_routes
from clerk_sync.store import Store


def build(settings: Settings) -> FastAPI:
    processor = build_processor(settings)
    store = processor.store
    starlette_app = Starlette(routes=webhook_routes(processor))
    assert starlette_app.routes

    app = FastAPI()
    app.include_router(webhook_router(processor))
    jit = JitUsers(store, clerk=ClerkClient.from_settings(settings))
    authenticator = Authenticator(verifier_from_settings(settings), store, load_user=jit.get_auth_user)
    clerk = ClerkAuth(authenticator, get_user=lambda auth: jit.get_auth_user(auth.user_id))
    clerk.install(app, public_paths={"/", "/webhooks/clerk"})
    app.include_router(sync_me_router(clerk, jit))

    @app.get("/admin")
    def admin_page(user: AuthUser = Depends(clerk.require_role("admin"))) -> dict[str, str]:
        return {"admin": user.clerk_id}

    @app.get("/me")
    async def me(auth: Auth = Depends(clerk.current_auth)) -> dict[str, str | None]:
        return {"user": auth.user_id, "org": auth.org_id, "impersonator": auth.actor_id}

    return app


def wrap_any_asgi_app(settings: Settings, store: Store) -> ClerkAuthMiddleware:
    authenticator = Authenticator(verifier_from_settings(settings), store)
    return ClerkAuthMiddleware(Starlette(), authenticator, public_paths={"/", "/webhooks/clerk"})


def observe(settings: Settings) -> bytes:
    processor = build_processor(settings)
    store = processor.store
    metrics = processor.metrics
    metrics.watch_database(database_probe(processor.store))
    jit = JitUsers(store, clerk=ClerkClient.from_settings(settings, metrics=metrics), metrics=metrics)
    assert jit.metrics is metrics
    return metrics.render()


def console(settings: Settings) -> Starlette:
    """The README's "Operator console" snippet."""
    from starlette.routing import Mount

    from clerk_sync.integrations.console import create_console

    store = Store.from_url(settings.sqlalchemy_url())
    return Starlette(routes=[Mount("/console", app=create_console(store, settings))])


def hooks_of_changes_and_events() -> list[object]:
    """README "Your own tables, your side effects": a handler of changes and one of events, both accepted by
    ``Hook`` (and the sinks, which take either)."""
    from clerk_sync.changes import Change, Event, Hook
    from clerk_sync.hooks.sinks import StandardWebhookSink, change_message

    def welcome(change: Change) -> None:
        print(change.values.get("email"), change.idempotency_key)

    def set_plan(event: Event) -> None:
        print(event.type, event.svix_id, event.timestamp_ms + 1, event.data.get("plan"), event.idempotency_key)

    sink = StandardWebhookSink("https://example.com/changes", "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert change_message(Event("subscription.active", "msg_1", 1, {}))["type"] == "subscription.active"
    return [Hook("welcome", welcome, on=["user.created"]), Hook("plan", set_plan, on=["subscriptionItem.active"]),
            Hook("forward", sink, on=["*", "subscription.*"])]
