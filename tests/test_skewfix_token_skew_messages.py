"""Refusals of session tokens on a host whose clock is off (walkthrough finding, flaskmaria): every fresh
token was answered 401 "session token expired" / "not valid yet (nbf)", saying neither by how much nor that
this host's clock is the likely cause, and nothing was logged. The codes stay; the messages say what to do."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from clerk_sync.auth import claims as claims_module
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.errors import TokenError
from tests.test_sessions import AZP, ISS, KEY, NOW, claims, mint, pem

# What Clerk mints: iat now, nbf 10 s before, a 60 s lifetime.
FRESH = mint(claims(iat=NOW, nbf=NOW - 10, exp=NOW + 60, sub="user_secret_sub", sid="sess_secret_sid"))


def _refusal(offset_s: float, leeway_s: float = 5.0) -> TokenError:
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS, authorized_parties=frozenset({AZP}),
                                                                        leeway_s=leeway_s), now=lambda: NOW + offset_s)
    with pytest.raises(TokenError) as refused:
        verifier.verify(FRESH)
    return refused.value


@pytest.fixture(autouse=True)
def _no_recent_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_module, "_skew_warned", [], raising=False)


def test_a_host_two_minutes_ahead_says_by_how_much_and_points_to_its_clock() -> None:
    error = _refusal(+120)
    message = str(error)
    assert error.code == "token_expired"
    assert "expired 60 s ago" in message and "valid for 60 s" in message and "5 s leeway" in message
    assert "clock is ahead" in message and "NTP" in message and "CLERK_SYNC_SESSION_LEEWAY_S" in message
    assert "secret" not in message and ISS not in message  # no token contents


def test_a_host_two_minutes_behind_says_by_how_much_and_logs_it_once_a_minute() -> None:
    with capture_logs() as logs:
        error = _refusal(-120)
        again = _refusal(-120)
    assert error.code == again.code == "token_not_active_yet"
    message = str(error)
    assert "its nbf is 110 s ahead of this host's clock" in message and "5 s leeway" in message
    assert "clock is likely behind" in message and "NTP" in message and "CLERK_SYNC_SESSION_LEEWAY_S" in message
    assert "secret" not in message
    warnings = [e for e in logs if e["event"] == "session_token_from_the_future"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert (warnings[0]["claim"], warnings[0]["ahead_s"]) == ("nbf", 110.0)


def test_iat_in_the_future_keeps_its_code_and_the_leeway_still_accepts() -> None:
    token = mint(claims(iat=NOW + 30, nbf=None, exp=NOW + 90))
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS, authorized_parties=frozenset({AZP})),
                               now=lambda: NOW)
    with pytest.raises(TokenError) as refused:
        verifier.verify(token)
    assert refused.value.code == "token_iat_in_the_future"
    assert "its iat is 30 s ahead of this host's clock" in str(refused.value)
    # The stopgap the messages name: a leeway wider than the skew accepts fresh tokens on both hosts.
    for offset in (+120, -120):
        lenient = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS, leeway_s=150),
                                  now=lambda o=offset: NOW + o)  # type: ignore[misc]
        assert lenient.verify(FRESH).user_id == "user_secret_sub"


def test_a_token_merely_stale_is_refused_as_before() -> None:
    error = _refusal(+66)  # a minute-old cookie: just past exp + leeway
    assert error.code == "token_expired" and "expired 6 s ago" in str(error)
