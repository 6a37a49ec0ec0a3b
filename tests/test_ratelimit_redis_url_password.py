"""The Redis budget's URL: a REDIS_URL whose password holds an unencoded ``/``, ``?`` or ``#`` is refused as
a ``ConfigError`` that shows the URL masked and says to percent-encode the password, with nothing of the password
in its text, its repr, its traceback or its chain (redis-py's own parse error quotes it: "Port could not be cast
to integer value as 'pa'"). A percent-encoded password still works, against the real Redis."""

from __future__ import annotations

import os
import traceback
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import anyio
import pytest
import redis

from clerk_sync.clerk_api.ratelimit import RateLimit, RedisBudget
from clerk_sync.errors import ClerkUnavailable, ConfigError

REDIS_URL = os.environ.get("CLERK_SYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
_kwargs = redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs
ADDRESS = f"{_kwargs.get('host', '127.0.0.1')}:{_kwargs.get('port', 6379)}"
HELP = "must be percent-encoded, e.g. urllib.parse.quote(password, safe='')"


def _budget(url: str) -> RedisBudget:
    return RedisBudget(url, RateLimit(100, 1.0), "sk_test_x", prefix=f"clerk_sync_test:review4:{uuid.uuid4().hex[:8]}")


def _everything_said(exc: BaseException) -> str:
    """What a log line or an error tracker could show of ``exc``: its text, repr, traceback and chain."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return "\n".join([*(f"{e}\n{e!r}" for e in chain), *traceback.format_exception(exc)])


# Each password's pieces are distinctive, so a piece that leaks (redis-py quotes the part before the '/') is seen.
@pytest.mark.parametrize(("url", "pieces", "shown"), [
    ("redis://:Xq7v/Zk9#Mw2?Lp4@{addr}/15", ["Xq7v", "Zk9", "Mw2", "Lp4"], "redis://***@{addr}/15"),
    ("redis://:Xq7v/Zk9@{addr}/15", ["Xq7v", "Zk9"], "redis://***@{addr}/15"),
    ("redis://:Xq7v#Zk9@{addr}/15", ["Xq7v", "Zk9"], "redis://***@{addr}/15"),
    ("redis://:Xq7v?Zk9@{addr}/15", ["Xq7v", "Zk9"], "redis://***@{addr}/15"),
    ("redis://Wn8u:Xq7v/Zk9@{addr}/15", ["Wn8u", "Xq7v", "Zk9"], "redis://***@{addr}/15"),
    ("rediss://:Xq7v?Zk9#Mw2@{addr}/15", ["Xq7v", "Zk9", "Mw2"], "rediss://***@{addr}/15"),
    ("redis://:Xq7v@Zk9/Mw2@{addr}/15", ["Xq7v", "Zk9", "Mw2"], "redis://***@{addr}/15"),
    # digits before the '/': redis-py parses them as a port and would connect to localhost:4521 without a word
    ("redis://:4521/Zk9@{addr}/15", ["4521", "Zk9"], "redis://***@{addr}/15"),
    ("redis://:4521?Zk9@{addr}/15", ["4521", "Zk9"], "redis://***@{addr}/15"),
    ("redis://:4521#Zk9@{addr}/15", ["4521", "Zk9"], "redis://***@{addr}/15"),
    # the '@' in a query value, after a host-less port: still the password cut short
    ("redis://:4521?ab=Zk9@{addr}/15", ["4521", "Zk9"], "redis://***@{addr}/15"),
    ("unix://:Xq7v/Zk9@/tmp/redis.sock?db=15", ["Xq7v", "Zk9"], "unix://***@/tmp/redis.sock?db=15"),
    # urllib's own errors: a fullwidth '#' (NFKC makes it '#'; its message quotes the netloc) and a lone '['
    ("redis://:Xq7v\uff03Zk9@{addr}/15", ["Xq7v", "Zk9"], "redis://***@{addr}/15"),
    ("redis://:Xq7v[Zk9@{addr}/15", ["Xq7v", "Zk9"], "redis://***@{addr}/15"),
], ids=["slash-hash-question", "slash", "hash", "question", "user-and-password", "rediss", "at-and-slash",
        "digits-slash", "digits-question", "digits-hash", "digits-query-value", "unix", "fullwidth-hash", "bracket"])
def test_a_password_with_an_unencoded_delimiter_is_refused_without_showing_it(
        url: str, pieces: list[str], shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        _budget(url.format(addr=ADDRESS))
    exc = info.value
    assert exc.__cause__ is None and exc.__context__ is None and exc.__suppress_context__
    said = _everything_said(exc)
    assert not [piece for piece in pieces if piece in said], said
    message = str(exc)
    assert message.startswith(f"REDIS_URL {shown.format(addr=ADDRESS)} is not a Redis URL"), message
    assert HELP in message and exc.code == "config_error"


def test_redis_pys_own_words_are_kept_when_they_quote_nothing_of_the_url() -> None:
    with pytest.raises(ConfigError) as info:
        _budget(f"redis://:s3cret@{ADDRESS}/15?db=x")
    assert "(Invalid value for 'db' in connection URL.)" in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        _budget("http://:s3cret@localhost:6379/0")
    assert str(info.value).startswith("REDIS_URL http://***@localhost:6379/0 is not a Redis URL redis-py can read "
                                      "(Redis URL must specify one of the following schemes")
    assert "s3cret" not in str(info.value)


# -- a well-formed URL ----------------------------------------------------------------------------------------------


@pytest.fixture
def redis_user() -> Iterator[tuple[str, str]]:
    """A Redis ACL user whose password holds every delimiter (the test Redis itself has none); removed afterwards."""
    name, password = f"clerk_sync_test_{uuid.uuid4().hex[:8]}", "Xq7v/Zk9#Mw2?Lp4@:%"
    admin = redis.Redis.from_url(REDIS_URL)
    admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["clerk_sync_test:*"], commands=["+@all"])
    try:
        yield name, password
    finally:
        admin.acl_deluser(name)
        admin.close()


def test_a_percent_encoded_password_works_against_the_real_redis(redis_user: tuple[str, str]) -> None:
    name, password = redis_user
    budget = _budget(f"redis://{name}:{quote(password, safe='')}@{ADDRESS}/15")

    async def areserve() -> None:
        try:
            assert (await budget.areserve(max_wait=60)).granted
        finally:
            await budget.aclose()

    try:
        assert budget.reserve(max_wait=60).granted
        anyio.run(areserve)
    finally:
        budget.reset()
        budget.close()
    assert budget.url == f"redis://***@{ADDRESS}/15"
    with pytest.raises(ConfigError):  # the same password unencoded
        _budget(f"redis://{name}:{password}@{ADDRESS}/15")


def test_an_at_sign_in_a_query_value_is_not_taken_for_a_cut_password(redis_user: tuple[str, str]) -> None:
    name, password = redis_user
    budget = _budget(f"redis://{ADDRESS}/15?client_name=ops@example.com&username={name}"
                     f"&password={quote(password, safe='')}")
    try:
        assert budget.reserve(max_wait=60).granted
    finally:
        budget.reset()
        budget.close()
    assert "Xq7v" not in budget.url


def test_a_wrong_password_is_still_a_redis_that_refuses(redis_user: tuple[str, str]) -> None:
    name, _ = redis_user
    budget = _budget(f"redis://{name}:{quote('Zk9/wrong', safe='')}@{ADDRESS}/15")
    try:
        with pytest.raises(ClerkUnavailable) as info:
            budget.reserve(max_wait=60)
    finally:
        budget.close()
    assert "Zk9" not in str(info.value) and f"redis://***@{ADDRESS}/15" in str(info.value)
