"""The app: Clerk users land in *its own* ``accounts`` table, a welcome mail is queued once per
sign-up, and every change is forwarded to a second service (``billing.py``), signed.

Nothing here runs in the webhook request: the row is written with the delivery, the hook jobs are
queued in the same transaction, and the dispatcher runs them after the commit (retried, at least
once). The mail is keyed by the Clerk id, so neither a retry nor a second ``user.created`` of the same user
(its rows restored from a backup, then re-synced) sends it twice. Everything
here is portable SQL: the same code runs on SQLite, PostgreSQL and MariaDB/MySQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
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
    sa.Column("idempotency_key", sa.String(200), nullable=False),  # the job that sent it
    sa.Column("clerk_user_id", sa.String(64), primary_key=True),  # once per user, not once per change
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
    """The ``welcome-mail`` handler. A job runs at least once: a retry, or a run whose success was not
    recorded (a crash in between), runs it again with the same change. A side effect once per *user* is
    keyed by ``change.clerk_id`` (not ``change.idempotency_key``, which is once per change: the same user
    may be created again here, after a restore), so a second run finds the user and sends nothing.

    Note: a pre-Clerk row adopted through ``link_by_email`` reaches hooks as ``user.created`` too (the
    Clerk user is new to the table), so it is welcomed like a sign-up. To skip those, look the row up
    here and return early for an account that predates the Clerk user, e.g. a ``created_at`` column
    older than ``change.values["clerk_created_at"]``, or a flag your import set on legacy rows.
    """

    def send(change: Change) -> None:
        email = change.values.get("email")
        if not email:
            return
        mail = {"idempotency_key": change.idempotency_key, "clerk_user_id": change.clerk_id, "to": email,
                "body": f"Welcome, {change.values.get('first_name') or email}!"}
        try:
            # A plain INSERT, portable to every store (no dialect's ON CONFLICT / INSERT IGNORE).
            with engine.begin() as conn:
                conn.execute(welcome_mails.insert().values(**mail))
        except sa.exc.IntegrityError:
            # Already sent (by an earlier run, or for an earlier sign-up) if the user is there; anything else
            # is an error.
            with engine.connect() as conn:
                sent = conn.execute(sa.select(sa.literal(1)).where(
                    welcome_mails.c.clerk_user_id == change.clerk_id)).first()
            if sent is None:
                raise

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
