"""The app: Clerk users land in *its own* ``accounts`` table, a welcome mail is queued once per
sign-up, and every change is forwarded to a second service (``billing.py``), signed.

Nothing here runs in the webhook request: the row is written with the delivery, the hook jobs are
queued in the same transaction, and the dispatcher runs them after the commit (retried, at least
once). The mail hook keys on ``change.idempotency_key``, so a retry never sends twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from starlette.applications import Starlette

from clerk_sync import migrations
from clerk_sync.changes import Change, Hook
from clerk_sync.config import Settings
from clerk_sync.hooks import Dispatcher
from clerk_sync.hooks.sinks import StandardWebhookSink
from clerk_sync.integrations.starlette import build_processor, webhook_routes
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, SoftDelete, migrate_schema
from clerk_sync.store import Store, create_engine

app_tables = sa.MetaData()
accounts = sa.Table(  # the app's own table: clerk-sync writes only the mapped columns
    "accounts", app_tables,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(320)),
    sa.Column("name", sa.String(255)),
    sa.Column("role", sa.String(32), nullable=False, server_default="member"),
    sa.Column("plan", sa.String(32), nullable=False, server_default="trial"),  # the app's, never touched
)
welcome_mails = sa.Table(  # the "mail server": one row per mail sent
    "welcome_mails", app_tables,
    sa.Column("idempotency_key", sa.String(200), primary_key=True),
    sa.Column("to", sa.String(320), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)

MAPPING = SchemaMapping(users=MappedTable(
    "accounts", "clerk_user_id",
    {"email": "email", "name": "full_name", "role": Column("public_metadata.role", default="member")},
    on_delete=SoftDelete("deleted_at"),
    link_by_email="email",  # accounts from before Clerk are adopted on first sight
))


@dataclass
class Example:
    app: Starlette
    store: Store
    dispatcher: Dispatcher


def welcome_mail(engine: sa.Engine) -> Any:
    def send(change: Change) -> None:
        email = change.values.get("email")
        if not email:
            return
        with engine.begin() as conn:  # idempotent: a retried job finds its key and sends nothing
            conn.execute(sqlite.insert(welcome_mails).values(
                idempotency_key=change.idempotency_key, to=email,
                body=f"Welcome, {change.values.get('first_name') or email}!",
            ).on_conflict_do_nothing())

    return send


def build(settings: Settings, *, billing_url: str, billing_secret: str) -> Example:
    """The webhook app and its dispatcher (start it with ``dispatcher.start()``, or run ``drain()``)."""
    engine = create_engine(settings.sqlalchemy_url())
    migrations.upgrade(engine)  # clerk-sync's own tables
    app_tables.create_all(engine)  # the app's tables (its own migrations, in real life)
    with engine.begin() as conn:
        migrate_schema(conn, MAPPING)  # accounts.clerk_user_id (+ unique index) and accounts.deleted_at
    hooks = [
        Hook("welcome-mail", welcome_mail(engine), on=["user.created"]),
        Hook("billing", StandardWebhookSink(billing_url, billing_secret), on=["user.*"]),
    ]
    store = Store(engine, hooks=hooks, mapping=MAPPING)
    processor = build_processor(settings, store)
    return Example(Starlette(routes=webhook_routes(processor)), store, Dispatcher(store, poll_s=0.2))
