"""Several Clerk apps on one host (localhost:3000 and :3001 in development): Clerk JS writes ``__session`` and
``__session_<suffix>`` for each, so ``__session`` holds whichever app refreshed last (every 50 s). Before, the
plain ``__session`` won: another app's token was verified and refused, and the visitor was signed out of this
one at random. With ``CLERK_PUBLISHABLE_KEY`` set, this app's own suffixed cookie is used, as Clerk's backend
SDKs do; without it, as before."""

from __future__ import annotations

import base64
import hashlib

import httpx
import pytest
from fastapi import Depends, FastAPI

from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.sessions import cookie_suffix, token_from_request, verifier_from_settings
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError, TokenMalformed
from clerk_sync.integrations.fastapi import ClerkAuth
from tests import factories as f
from tests._server import running
from tests.test_auth import Harness, token
from tests.test_sessions import ISS, KEY, pem

OURS = "pk_test_Y2xlcmsuaW5zcGlyZWQucHVtYS03NC5sY2wuZGV2JA"  # FACTS 5.3's example key
THEIRS = "pk_test_b3RoZXItYXBwLmNsZXJrLmFjY291bnRzLmRldiQ"


def _as_clerk_js_names_it(publishable_key: str) -> str:
    """getCookieSuffix as FACTS 5.3 gives it: btoa(SHA-1), '+' -> '-', '/' -> '_', 8 characters."""
    digest = base64.b64encode(hashlib.sha1(publishable_key.encode(), usedforsecurity=False).digest()).decode()
    return digest.replace("+", "-").replace("/", "_")[:8]


def test_the_suffix_is_clerk_js_s() -> None:
    assert cookie_suffix(OURS) == _as_clerk_js_names_it(OURS)
    assert cookie_suffix(OURS) != cookie_suffix(THEIRS) and len(cookie_suffix(OURS)) == 8


def test_this_apps_suffixed_cookie_wins_over_the_plain_one_and_the_others() -> None:
    ours, theirs = cookie_suffix(OURS), cookie_suffix(THEIRS)
    cookies = {"__session": "theirs, refreshed last", f"__session_{theirs}": "theirs", f"__session_{ours}": "ours"}
    assert token_from_request({}, cookies, suffix=ours) == "ours"
    assert token_from_request({}, cookies) == "theirs, refreshed last"  # without the key: as before
    # ours absent or empty: the rules without a key (the plain one; several suffixed ones refused)
    assert token_from_request({}, {"__session": "plain", f"__session_{ours}": ""}, suffix=ours) == "plain"
    with pytest.raises(TokenMalformed):
        token_from_request({}, {f"__session_{theirs}": "a", "__session_Zz99Yy88": "b"}, suffix=ours)
    assert token_from_request({"authorization": "Bearer t"}, cookies, suffix=ours) == "t"  # Bearer first


@pytest.mark.parametrize("name", ["CLERK_PUBLISHABLE_KEY", "NEXT_PUBLIC_CLERK_PUBLISHABLE_KEY"])
def test_the_publishable_key_setting_gives_the_verifier_its_suffix(name: str) -> None:
    settings = Settings.from_env({"CLERK_JWT_KEY": pem(KEY), name: f" {OURS}\n"})
    assert verifier_from_settings(settings).cookie_suffix == cookie_suffix(OURS)
    assert verifier_from_settings(Settings.from_env({"CLERK_JWT_KEY": pem(KEY)})).cookie_suffix is None


@pytest.mark.parametrize("value", ["sk_test_abcdefabcdefabcdefabcdef", "Y2xlcmsuZXhhbXBsZS5jb20k", "pk_test_a b"])
def test_another_value_in_the_publishable_key_setting_is_refused_without_showing_a_secret(value: str) -> None:
    with pytest.raises(ConfigError, match="CLERK_PUBLISHABLE_KEY") as refused:
        Settings.from_env({"CLERK_PUBLISHABLE_KEY": value})
    assert "sk_test_abcdef" not in str(refused.value)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_visitor_stays_signed_in_whichever_app_refreshed_the_plain_cookie_last(db_url: str) -> None:
    h = Harness(db_url)
    h.event("user.created", f.user("user_here", 1))
    settings = Settings.from_env({"CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS, "CLERK_PUBLISHABLE_KEY": OURS})
    auth = Authenticator(verifier_from_settings(settings), h.store, deny_list=DenyList(h.store, refresh_s=0))
    clerk = ClerkAuth(auth)
    app = FastAPI()

    @app.get("/me")
    async def me(session: Auth = Depends(clerk.current_auth)) -> dict[str, str]:
        return {"user_id": session.user_id}

    other = token("user_elsewhere", iss="https://other.example.test")  # the other app's, refreshed last
    cookie = (f"__session={other}; __session_{cookie_suffix(THEIRS)}={other}; "
              f"__session_{cookie_suffix(OURS)}={token('user_here')}")
    with running(app) as url:
        answer = httpx.get(f"{url}/me", headers={"Cookie": cookie})
    h.store.dispose()
    assert (answer.status_code, answer.json()) == (200, {"user_id": "user_here"}), answer.text


@pytest.mark.parametrize("value", ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", '"sk_live_abcdefghijklmnop"'])
def test_a_secret_pasted_as_the_publishable_key_is_not_shown_even_in_part(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"CLERK_PUBLISHABLE_KEY": value})
    said = str(refused.value)
    assert all(part not in said for part in ("whsec_", "MfKQ", "sk_live", "abcdef")), said


def test_another_apps_duplicate_cookie_does_not_refuse_this_apps_own() -> None:
    """Review: the duplicate check (cookie tossing) ran over every ``__session*`` name before ours was chosen."""
    ours, theirs = cookie_suffix(OURS), cookie_suffix(THEIRS)
    for header in (f"__session_{ours}=ours; __session=A; __session=B",
                   f"__session_{ours}=ours; __session_{theirs}=A; __session_{theirs}=B"):
        cookies = dict(pair.split("=", 1) for pair in header.split("; "))
        assert token_from_request({"cookie": header}, cookies, suffix=ours) == "ours"
    tossed = f"__session_{ours}=ours; __session_{ours}=planted"  # ours tossed: still refused
    with pytest.raises(TokenMalformed, match="two different"):
        token_from_request({"cookie": tossed}, {f"__session_{ours}": "planted"}, suffix=ours)
    with pytest.raises(TokenMalformed, match="two different"):  # without the key: as before
        token_from_request({"cookie": "__session=A; __session=B"}, {"__session": "B"})
