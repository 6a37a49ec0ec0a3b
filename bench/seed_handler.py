"""Baseline for bench/ingest.py: a Clerk webhook handler the way typical tutorials write one.

FastAPI + ``svix.webhooks.Webhook(secret).verify(body, headers)`` + a SQLAlchemy ORM session:
``select`` the row by clerk_id, insert or set attributes in Python, ``commit()`` per event.
No inbox, no idempotency, no ordering guard. The ORM work runs in Starlette's thread pool
(``run_in_threadpool``), i.e. the *stronger* form of the tutorial: the common ``async def`` +
blocking-session variant would serialise every request on the event loop.

Run: ``SEED_DATABASE_URL=... CLERK_WEBHOOK_SIGNING_SECRET=whsec_... \
      uvicorn --app-dir bench seed_handler:app --port 8001``
Tables are created on start-up (``create_all``) in whatever schema/file/database the URL points at.
MariaDB/MySQL needs no change: ``mysql+mysqldb://root@127.0.0.1:3306/<db>?charset=utf8mb4`` (the
charset is the one tutorial step it takes; the server's default REPEATABLE READ and sql_mode stay).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from sqlalchemy import JSON, BigInteger, DateTime, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from starlette.concurrency import run_in_threadpool
from svix.webhooks import Webhook, WebhookVerificationError

DATABASE_URL = os.environ.get("SEED_DATABASE_URL", "sqlite:///./seed.db")
SECRET = os.environ["CLERK_WEBHOOK_SIGNING_SECRET"]

connect_args = {"check_same_thread": False} if DATABASE_URL.startswith("sqlite") else {}
engine = create_engine(DATABASE_URL, connect_args=connect_args, pool_size=20, max_overflow=20)
SessionLocal = sessionmaker(bind=engine, autoflush=False)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "seed_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    clerk_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    email: Mapped[str | None] = mapped_column(String(320))
    first_name: Mapped[str | None] = mapped_column(String(255))
    last_name: Mapped[str | None] = mapped_column(String(255))
    username: Mapped[str | None] = mapped_column(String(255))
    image_url: Mapped[str | None] = mapped_column(String(1024))
    public_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Organization(Base):
    __tablename__ = "seed_organizations"
    id: Mapped[int] = mapped_column(primary_key=True)
    clerk_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    name: Mapped[str | None] = mapped_column(String(255))
    slug: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Membership(Base):
    __tablename__ = "seed_memberships"
    id: Mapped[int] = mapped_column(primary_key=True)
    clerk_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[int] = mapped_column(BigInteger)


Base.metadata.create_all(engine)
app = FastAPI()


def _primary_email(data: dict[str, Any]) -> str | None:
    for e in data.get("email_addresses") or []:
        if e.get("id") == data.get("primary_email_address_id"):
            return e.get("email_address")
    return None


def handle(evt: dict[str, Any]) -> None:
    etype, data = evt["type"], evt["data"]
    now = datetime.now(UTC)
    with SessionLocal() as db:
        if etype in ("user.created", "user.updated"):
            u = db.scalars(select(User).where(User.clerk_id == data["id"])).first()
            if u is None:
                u = User(clerk_id=data["id"], created_at=now)
                db.add(u)
            u.email = _primary_email(data)
            u.first_name = data.get("first_name")
            u.last_name = data.get("last_name")
            u.username = data.get("username")
            u.image_url = data.get("image_url")
            u.public_metadata = data.get("public_metadata") or {}
            u.updated_at = now
        elif etype == "user.deleted":
            u = db.scalars(select(User).where(User.clerk_id == data["id"])).first()
            if u is not None:
                db.delete(u)
        elif etype in ("organization.created", "organization.updated"):
            o = db.scalars(select(Organization).where(Organization.clerk_id == data["id"])).first()
            if o is None:
                o = Organization(clerk_id=data["id"])
                db.add(o)
            o.name, o.slug, o.updated_at = data.get("name"), data.get("slug"), now
        elif etype in ("organizationMembership.created", "organizationMembership.updated"):
            m = db.scalars(select(Membership).where(Membership.clerk_id == data["id"])).first()
            if m is None:
                m = Membership(clerk_id=data["id"])
                db.add(m)
            m.organization_id = data["organization"]["id"]
            m.user_id = data["public_user_data"]["user_id"]
            m.role = data.get("role", "org:member")
            m.updated_at = data.get("updated_at", 0)
        db.commit()


@app.post("/webhooks/clerk")
async def clerk_webhook(request: Request) -> dict[str, str]:
    body = await request.body()
    try:
        Webhook(SECRET).verify(body, dict(request.headers))  # svix 2.x returns None: parse ourselves
    except WebhookVerificationError as exc:
        raise HTTPException(status_code=400, detail="invalid signature") from exc
    evt = json.loads(body)
    await run_in_threadpool(handle, evt)
    return {"status": "ok"}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
