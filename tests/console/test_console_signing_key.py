"""Security review of 2026-12-05, finding 1: the console's cookie key was derived from the operator token,
CLERK_SECRET_KEY and the webhook signing secret, whichever were set. With admins signing in through
CLERK_JWT_KEY / CLERK_JWKS_URL and neither of the first two set, it came from the webhook secret alone,
which Svix and the Clerk Dashboard hold too: anyone with it signed a console session for any admin.

Now the webhook secret is never an input; such a set-up needs CLERK_SYNC_CONSOLE_SECRET and says so at
start-up. An admin's console session must also belong to a sign-in the console recorded (its ``sid``)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import sqlalchemy as sa
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from starlette.applications import Starlette
from starlette.routing import Mount

from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.integrations.console import check_console_settings, create_console
from clerk_sync.integrations.console._access import COOKIE, signing_key
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, users
from tests._server import running
from tests.conftest import SECRET
from tests.test_sessions import KEY, claims, mint, pem

CONSOLE_SECRET = "Zq8Jc1vS0m4Rk7Xy2Bn5Tw9Lp3Hd6Gf0Ae1Ui4Oo7Yy"
HTML = {"accept": "text/html"}
JSON = {"accept": "application/json"}


def jwt_only(db_url: str, **extra: str) -> dict[str, str]:
    """A read-only-ish console whose admins sign in with Clerk through a PEM key: no operator token, no
    CLERK_SECRET_KEY. The webhook secret is set, as it is wherever webhooks are received."""
    return {"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY),
            "CLERK_SYNC_CONSOLE": "1", **extra}


def forge(key: bytes, admin: str, sid: str = "sess_made_up") -> str:
    """What an attacker signs: a console session for ``admin``, a CSRF token of their choosing."""
    return URLSafeTimedSerializer(key, salt="clerk-sync-console-session", signer=TimestampSigner).dumps(
        {"k": "admin", "sub": admin, "sid": sid, "csrf": "attacker-csrf", "iat": time.time()})


def webhook_key() -> bytes:
    """The key the console derived from the webhook secret alone (before the fix)."""
    return hashlib.sha256(b"clerk-sync console\x00" + SECRET.encode()).digest()


@pytest.fixture
def admin(store: Store) -> str:
    now = datetime.now(UTC)
    with store.transaction() as w:
        for clerk_id, role in (("user_adm", "admin"), ("user_victim", "member")):
            w.conn.execute(users.insert().values(
                clerk_id=clerk_id, email=f"{clerk_id}@corp.example", email_addresses=[], public_metadata={"role": role},
                private_metadata={}, unsafe_metadata={}, role=role, clerk_updated_at=1, created_at=now, updated_at=now))
    return "user_adm"


@pytest.fixture
def console(db_url: str, store: Store, admin: str) -> Starlette:
    """The console of a set-up whose admins sign in with CLERK_JWT_KEY, CLERK_SYNC_CONSOLE_SECRET set."""
    return create_console(store, Settings.from_env(jwt_only(db_url, CLERK_SYNC_CONSOLE_SECRET=CONSOLE_SECRET)))


@pytest.fixture
def console_key(console: Starlette) -> bytes:
    """The key the console signs its cookies with (whatever it was derived from)."""
    return console.state.console.access._sessions.secret_key  # type: ignore[no-any-return]


@pytest.fixture
def client(console: Starlette) -> Iterator[httpx.Client]:
    """The console served on loopback, and a client that keeps no cookies of its own: each request says
    which it sends (:func:`cookies`)."""
    with running(Starlette(routes=[Mount("/console", app=console)])) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        yield client


def cookies(**sent: str) -> dict[str, str]:
    """A Cookie header (``console=`` for the console's session cookie)."""
    named = {COOKIE if name == "console" else name: value for name, value in sent.items()}
    return {"cookie": "; ".join(f"{name}={value}" for name, value in named.items())}


# -- start-up ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys", [{"CLERK_JWT_KEY": pem(KEY)}, {"CLERK_JWT_KEY": "", "CLERK_JWKS_URL":
                                                                 "https://clerk.example.test/.well-known/jwks.json"}])
def test_a_console_with_only_the_webhook_secret_to_sign_with_does_not_start(
        db_url: str, store: Store, keys: dict[str, str]) -> None:
    """Admins sign in with Clerk, no operator token, no CLERK_SECRET_KEY: the only secret left was the
    webhook's. Start-up now stops, naming the variable to set and how to make one."""
    settings = Settings.from_env({**jwt_only(db_url), **keys})
    for start in (lambda: check_console_settings(settings), lambda: create_console(store, settings)):
        with pytest.raises(ConfigError) as refused:
            start()
        said = str(refused.value)
        assert "CLERK_SYNC_CONSOLE_SECRET" in said and "secrets.token_urlsafe(32)" in said, said
        assert SECRET not in said


def test_the_console_secret_must_be_long_and_not_the_webhook_secret(db_url: str, store: Store) -> None:
    with pytest.raises(ConfigError, match=r"CLERK_SYNC_CONSOLE_SECRET.*at least 32 characters.*token_urlsafe"):
        Settings.from_env(jwt_only(db_url, CLERK_SYNC_CONSOLE_SECRET="short-one"))
    for copied in (SECRET, SECRET.removeprefix("whsec_"), f"  {SECRET}  "):
        settings = Settings.from_env(jwt_only(db_url, CLERK_SYNC_CONSOLE_SECRET=copied))
        with pytest.raises(ConfigError, match="CLERK_SYNC_CONSOLE_SECRET is the webhook signing secret"):
            create_console(store, settings)
    blank = Settings.from_env(jwt_only(db_url, CLERK_SYNC_CONSOLE_SECRET="  "))
    assert blank.console_secret is None


@pytest.mark.parametrize("own", [{"CLERK_SYNC_CONSOLE_TOKEN": "op-token-0123456789"},
                                 {"CLERK_SECRET_KEY": "sk_test_0123456789"},
                                 {"CLERK_SYNC_CONSOLE_SECRET": CONSOLE_SECRET}])
def test_set_ups_with_a_secret_of_their_own_still_start(db_url: str, store: Store, own: dict[str, str]) -> None:
    """The operator token and CLERK_SECRET_KEY still key the cookies (existing set-ups keep working)."""
    settings = Settings.from_env({**jwt_only(db_url), **own})
    check_console_settings(settings)
    assert create_console(store, settings).state.console is not None


def test_the_webhook_secret_is_no_input_of_the_key() -> None:
    """Every input is one no third party can sign in with; changing the webhook secret changes nothing, rotating
    the operator token (or any input) ends every console session, and two settings never share a key by
    trading values."""
    base = signing_key(operator_token="op-token-0123456789", clerk_secret_key="sk_test_1")
    assert signing_key(clerk_secret_key="sk_test_1", operator_token="op-token-0123456789") == base
    assert signing_key(operator_token="op-token-9876543210", clerk_secret_key="sk_test_1") != base
    assert signing_key(console_secret=CONSOLE_SECRET, operator_token="op-token-0123456789",
                       clerk_secret_key="sk_test_1") != base
    assert signing_key(operator_token="x" * 20) != signing_key(clerk_secret_key="x" * 20)
    assert webhook_key() not in {base, signing_key(console_secret=CONSOLE_SECRET)}
    with pytest.raises(ConfigError, match="CLERK_SYNC_CONSOLE_SECRET"):
        signing_key()  # was a random key: every worker its own, every restart a sign-out


# -- forged cookies ------------------------------------------------------------------------------------------

def test_a_cookie_signed_with_the_webhook_secret_is_refused(client: httpx.Client, store: Store, admin: str) -> None:
    """The review's PoC: a console session for a real admin, signed with the webhook secret's key: the pages,
    the audit export and a reveal (its CSRF token the attacker's choice) are all refused, nothing written."""
    forged = cookies(console=forge(webhook_key(), admin))
    page = client.get("/console/users?q=", headers={**HTML, **forged})
    assert page.status_code == 303 and page.headers["location"].startswith("/console/login"), page.text
    assert "user_victim@corp.example" not in page.text
    assert client.get("/console/audit.csv", headers=forged).status_code == 401
    reveal = client.post("/console/deliveries/1/reveal", data={"csrf": "attacker-csrf"}, headers={**JSON, **forged})
    assert reveal.status_code == 401
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar() == 0


def test_a_cookie_for_a_clerk_session_nobody_signed_in_with_is_refused(
        client: httpx.Client, console_key: bytes, store: Store, admin: str) -> None:
    """Even signed with the right key (a leaked CLERK_SYNC_CONSOLE_SECRET, say), an admin's console session
    must belong to a sign-in the console recorded: a made-up ``sid`` is refused, a real sign-in works."""
    key = console_key
    made_up = client.get("/console/users?q=", headers={**JSON, **cookies(console=forge(key, admin))})
    assert made_up.status_code == 401, made_up.text

    now = int(time.time())
    token = mint(claims(sub=admin, sid="sess_real", iat=now - 5, nbf=now - 15, exp=now + 55))
    signed_in = client.get("/console/users?q=", headers={**JSON, **cookies(__session=token)})
    assert signed_in.status_code == 200, signed_in.text
    cookie = signed_in.cookies[COOKIE]
    with store.connect() as conn:
        rows = conn.execute(sa.select(audit_log.c.action, audit_log.c.actor_clerk_id, audit_log.c.details)).all()
    assert [(a, actor, d.get("sid")) for a, actor, d in rows] == [("console.login", admin, "sess_real")]
    alone = client.get("/console/users?q=", headers={**JSON, **cookies(console=cookie)})
    assert alone.status_code == 200  # the recorded console session, without the Clerk token
    # Review: the key and a sid the audit page shows, of the same admin, even with a later issue time (past a
    # sign-out): refused, since the cookie lacks the secret the sign-in's row keeps only a digest of.
    replayed = URLSafeTimedSerializer(key, salt="clerk-sync-console-session", signer=TimestampSigner).dumps(
        {"k": "admin", "sub": admin, "sid": "sess_real", "csrf": "attacker-csrf", "iat": time.time() + 3600})
    forged_recorded = client.get("/console/users?q=", headers={**JSON, **cookies(console=replayed)})
    assert forged_recorded.status_code == 401, forged_recorded.text
    assert "sess_real" not in str([d.get("session") for _, _, d in rows])  # the row keeps a digest, not a secret
    # The key and a real sid, but another admin's name on it: that admin never signed in with it.
    promote(store, "user_victim")
    other = client.get("/console/users?q=", headers={**JSON, **cookies(console=forge(key, "user_victim", "sess_real"))})
    assert other.status_code == 401
    assert key == signing_key(console_secret=CONSOLE_SECRET)  # the key is the console secret's


def test_a_forged_cookie_cannot_sign_the_admin_out(
        client: httpx.Client, console_key: bytes, store: Store, admin: str) -> None:
    """Signing out ends every console session of the identity; a cookie no sign-in opened may not."""
    forged = cookies(console=forge(console_key, admin))
    out = client.post("/console/logout", data={"csrf": "attacker-csrf"}, headers={**JSON, **forged})
    assert out.status_code == 401
    with store.connect() as conn:
        assert conn.execute(sa.select(audit_log.c.action)).scalars().all() == []


def promote(store: Store, clerk_id: str) -> None:
    with store.transaction() as w:
        w.conn.execute(users.update().where(users.c.clerk_id == clerk_id).values(role="admin"))

