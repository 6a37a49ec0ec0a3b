"""Settings that could never work are refused when they are read, naming the setting and what to write instead;
`clerk-sync migrate` says what it did."""

from __future__ import annotations

from pathlib import Path

import pytest

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.store import Store
from tests.conftest import SECRET
from tests.test_cli import run


@pytest.mark.parametrize(("url", "said"), [
    ("foo://u:s3cret@bar/db", "scheme 'foo' names no database"),
    ("mysql+foo://u:s3cret@h/db", "names the driver 'foo', which SQLAlchemy's mysql dialect does not have"),
    ("sqlite+nope:///x.db", "names the driver 'nope', which SQLAlchemy's sqlite dialect does not have"),
    ("mssql+pyodbc://u:s3cret@h/db", "names mssql, which clerk-sync does not run on"),
    ("oracle://u:s3cret@h/db", "names oracle, which clerk-sync does not run on"),
    ("postgresql+asyncpg://u:s3cret@h/db", "'postgresql+asyncpg' is asyncio-only"),
    ("sqlite+aiosqlite:///x.db", "'sqlite+aiosqlite' is asyncio-only"),
], ids=["unknown-dialect", "unknown-mysql-driver", "unknown-sqlite-driver", "mssql", "oracle", "asyncpg",
        "aiosqlite"])
def test_an_unknown_database_scheme_is_a_config_error_naming_the_supported_ones(url: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Store.from_settings(Settings.from_env({"DATABASE_URL": url}))
    message = str(caught.value)
    assert said in message
    assert "sqlite:///" in message and "postgresql://" in message and "mysql+pymysql://" in message
    assert "s3cret" not in message


def test_migrate_with_an_unknown_driver_exits_2_without_a_traceback_or_the_password() -> None:
    result = run("migrate", env={"DATABASE_URL": "mysql+foo://app:s3cret@db-host/app"})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, out
    assert "'mysql+foo'" in out and "mysql+pymysql://" in out
    assert "Can't load plugin" not in out and "Traceback" not in out and "s3cret" not in out


@pytest.mark.parametrize(("entries", "said"), [
    ("localhost:3000", "the entry 'localhost:3000' has no scheme"),
    ("https://app.example.com, app.example.com", "the entry 'app.example.com' has no scheme"),
    ("https://app.example.com/dashboard", "write 'https://app.example.com'"),
    ("https://*.example.com", "has a '*'"),
], ids=["no-scheme", "one-of-two", "path", "wildcard"])
def test_an_authorized_party_that_can_never_equal_azp_is_refused(entries: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_AUTHORIZED_PARTIES": entries})
    assert "CLERK_AUTHORIZED_PARTIES" in str(caught.value) and said in str(caught.value)
    assert "scheme://host[:port]" in str(caught.value)


@pytest.mark.parametrize("entries", [
    "http://localhost:3000", "https://app.example.com/", " https://a.example.com , http://127.0.0.1:5173 ",
    "http://[::1]:3000", "chrome-extension://abcdefghijklmnop",
], ids=["localhost", "trailing-slash", "two-spaced", "ipv6", "extension"])
def test_origins_are_accepted(entries: str) -> None:
    parties = Settings.from_env({"CLERK_AUTHORIZED_PARTIES": entries}).authorized_parties()
    assert parties and all("://" in p and not p.endswith("/") for p in parties)


def test_an_origin_written_with_capitals_or_the_default_port_is_read_as_browsers_send_it() -> None:
    """Review: refusing ``https://App.Example.com:443`` stopped the start of a list that worked (another entry
    matched); as an origin it is ``https://app.example.com``, which a token's azp carries."""
    settings = Settings.from_env({"CLERK_AUTHORIZED_PARTIES": "https://app.example.com,https://App.Example.com:443,"
                                                              "HTTP://LOCALHOST:80/,http://localhost:3000"})
    assert settings.authorized_parties() == {"https://app.example.com", "http://localhost", "http://localhost:3000"}


@pytest.mark.parametrize(("name", "value"), [
    ("CLERK_API_URL", "sk_live_AbCdEf123456"), ("CLERK_JWKS_URL", "sk_test_AbCdEf123456"),
    ("CLERK_ISSUER", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), ("CLERK_AUTHORIZED_PARTIES", "pk_live_AbCdEf123456"),
])
def test_a_key_in_a_url_setting_is_refused_without_showing_it(name: str, value: str) -> None:
    """Review: the URL checks echoed the value, three times, into start-up logs: a key pasted into the wrong
    variable was printed in full."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    said = str(caught.value)
    assert name in said and "looks like a Clerk key or signing secret" in said, said
    assert value not in said and value[6:] not in said, said


@pytest.mark.parametrize("entries", ["null", "app"])
def test_no_scheme_suggestion_for_what_is_not_a_host(entries: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_AUTHORIZED_PARTIES": entries})
    assert "has no scheme" in str(caught.value) and "https://" not in str(caught.value).split("has no scheme")[1]


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_clerk_api_url_is_clerks(blank: str) -> None:
    """Review: ``CLERK_API_URL=`` (or a Flask config's ``os.environ.get(.., "")``) stopped start-up, although
    blank means unset for every other URL setting."""
    assert Settings.from_env({"CLERK_API_URL": blank}).clerk_api_url == "https://api.clerk.com"


def test_an_authorized_party_with_credentials_is_refused_without_showing_them() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_AUTHORIZED_PARTIES": "https://me:s3cret@app.example.com"})
    assert "write 'https://app.example.com'" in str(caught.value) and "s3cret" not in str(caught.value)


@pytest.mark.parametrize(("name", "value"), [
    ("CLERK_API_URL", "127.0.0.1:4711"), ("CLERK_API_URL", "api.clerk.com"), ("CLERK_ISSUER", "clerk.example.com"),
    ("CLERK_JWKS_URL", "clerk.example.com/.well-known/jwks.json"),
])
def test_a_clerk_url_without_http_scheme_is_refused_naming_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    assert f"{name}: {value!r} is not an http:// or https:// URL" in str(caught.value)
    assert f"'https://{value}'" in str(caught.value)


@pytest.mark.parametrize(("key", "said"), [
    ("pk_test_Y2xlcmsuZXhhbXBsZS5jb20k", "this is the publishable key"),
    ("pk_live_Y2xlcmsuZXhhbXBsZS5jb20k", "this is the publishable key"),
    ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "this is a webhook signing secret"),
], ids=["pk_test", "pk_live", "whsec"])
def test_another_clerk_key_in_clerk_secret_key_is_refused(key: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_SECRET_KEY": key})
    message = str(caught.value)
    assert "CLERK_SECRET_KEY" in message and said in message and "'sk_test_' or 'sk_live_'" in message
    assert "API keys" in message and key not in message


@pytest.mark.parametrize("key", ["sk_test_x", "sk_live_REALSECRET123", "sk_test_emulator", "x" * 20])
def test_secret_keys_stay_accepted(key: str) -> None:
    settings = Settings.from_env({"CLERK_SECRET_KEY": key})
    assert settings.clerk_secret_key is not None and settings.clerk_secret_key.get_secret_value() == key


def test_a_command_refuses_an_origin_without_scheme(tmp_path: Path) -> None:
    result = run("migrate", env={"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
                                 "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_AUTHORIZED_PARTIES": "localhost:3000"})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, out
    assert "CLERK_AUTHORIZED_PARTIES" in out and "write 'http://localhost:3000'" in out


def test_prune_with_inbox_deletion_under_the_floor_says_why_the_floor_is_there(tmp_path: Path) -> None:
    result = run("prune", env={"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
                               "CLERK_SYNC_INBOX_DELETE_AFTER_DAYS": "1"})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, out
    assert "CLERK_SYNC_INBOX_DELETE_AFTER_DAYS: must be at least 3 days, not 1" in out
    assert "Svix retries a failed delivery for about 27 hours" in out and "applied again" in out
    assert "Input should be" not in out


def test_inbox_deletion_before_redaction_names_both_values() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_SYNC_INBOX_DELETE_AFTER_DAYS": "5"})
    assert "CLERK_SYNC_INBOX_DELETE_AFTER_DAYS (5) must be >= CLERK_SYNC_INBOX_REDACT_AFTER_DAYS (30, its default)" \
        in str(caught.value)


def test_migrate_says_what_it_applied_and_when_nothing_was_due(db_url: str) -> None:
    store = Store.from_url(db_url)
    migrations.downgrade(store.engine, "base")  # (the fixture's database was migrated: made new again)
    store.dispose()
    head = migrations.head_revision()
    steps = len(list(migrations._script().walk_revisions()))

    def migrate() -> str:
        result = run("migrate", env={"DATABASE_URL": db_url})
        out = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 0, out
        return out

    assert f"migrated a new database to {head} ({steps} steps) on " in migrate()
    assert f"already current ({head}) on " in migrate()
    store = Store.from_url(db_url)
    migrations.downgrade(store.engine, "-1")
    previous = migrations.current_revision(store.engine)
    store.dispose()
    assert f"migrated {previous} -> {head} (1 step) on " in migrate()


def test_a_secret_key_read_with_a_trailing_newline_is_stripped() -> None:
    """Review: a key from `kubectl create secret --from-file` or `echo` ends in a newline: kept, every call to
    Clerk failed with httpx's refusal, which quotes the header (the key) into logs and doctor's output."""
    settings = Settings.from_env({"CLERK_SECRET_KEY": "sk_live_TOPSECRET123\n"})
    assert settings.clerk_secret_key is not None
    assert settings.clerk_secret_key.get_secret_value() == "sk_live_TOPSECRET123"


def test_a_secret_key_with_a_space_inside_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_SECRET_KEY": "sk_live_TOP SECRET123"})
    assert "CLERK_SECRET_KEY" in str(caught.value) and "a space, a control character" in str(caught.value)
    assert "TOP" not in str(caught.value).replace("TOP SECRET", "") and "SECRET123" not in str(caught.value)


@pytest.mark.parametrize(("entry", "fix"), [
    ("chrome-extension://me:s3cret@abcdefgh/popup.html", "write 'chrome-extension://abcdefgh'"),
    ("capacitor://localhost/app", "write 'capacitor://localhost'"),
])
def test_a_non_http_origin_with_a_path_suggests_the_origin_without_credentials(entry: str, fix: str) -> None:
    """Review: for other schemes the suggestion was the refused value itself, credentials included."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_AUTHORIZED_PARTIES": entry})
    assert fix in str(caught.value) and "s3cret" not in str(caught.value), str(caught.value)


def test_origins_are_written_as_browsers_send_them_idn_and_ipv6() -> None:
    settings = Settings.from_env({"CLERK_AUTHORIZED_PARTIES": "https://Bücher.example,http://[0:0:0:0:0:0:0:1]:3000"})
    assert settings.authorized_parties() == {"https://xn--bcher-kva.example", "http://[::1]:3000"}


def test_an_ipv6_origin_without_scheme_gets_the_suggestion() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_AUTHORIZED_PARTIES": "[::1]:3000"})
    assert "write 'http://[::1]:3000'" in str(caught.value)


def test_a_hostname_that_starts_like_a_key_is_not_called_one() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_API_URL": "sk_internal.example.com"})
    assert "looks like a Clerk key" not in str(caught.value) and "'https://sk_internal.example.com'" in str(caught.value)


def test_a_secret_key_with_a_non_ascii_character_is_refused_without_showing_it() -> None:
    """Final review: a typographic character pasted from a document passed the check and made httpx raise
    UnicodeEncodeError building the header: every session request answered 500 with a traceback."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CLERK_SECRET_KEY": "sk_live_TOPSECRET123\u2026"})
    assert "non-ASCII" in str(caught.value) and "TOPSECRET" not in str(caught.value)


@pytest.mark.parametrize("url", ["sqlite:///x.db", "mysql+mysqldb://root@127.0.0.1/test"])
def test_the_transaction_pooler_setting_with_a_database_it_cannot_apply_to_is_refused(url: str) -> None:
    """Review: CLERK_SYNC_DB_TRANSACTION_POOLER=1 beside a SQLite or MySQL URL was ignored silently (an operator
    who meant the pooler's PostgreSQL address ran on another database without a word)."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DATABASE_URL": url, "CLERK_SYNC_DB_TRANSACTION_POOLER": "1"})
    assert "CLERK_SYNC_DB_TRANSACTION_POOLER is for PostgreSQL" in str(caught.value)
    assert Settings.from_env({"DATABASE_URL": "postgresql://u@pgbouncer:6432/app",
                              "CLERK_SYNC_DB_TRANSACTION_POOLER": "1"}).db_transaction_pooler


@pytest.mark.parametrize("given", ["postgresql://app@db:5432/app\n", " sqlite:////var/lib/app.db ", "\tsqlite:///x.db\r\n"])
def test_a_database_url_read_from_a_file_is_used_without_its_line_break(given: str) -> None:
    """Before: kept whole, so PostgreSQL was asked for database "app\\n" (the driver's message cut at the line
    break: 'database "app. Check DATABASE_URL') and a trailing space named a database that does not exist."""
    assert Settings.from_env({"DATABASE_URL": given}).database_url == given.strip()


@pytest.mark.parametrize(("given", "said"), [
    ("'postgresql://app@db:5432/app'", "is quoted"),  # docker --env-file keeps the quotes
    ('"sqlite:///app.db"', "is quoted"),
    ("sqlite:///~/app.db", "'~'"),  # no shell expands it: the advice was `mkdir -p ./~`
])
def test_a_quoted_database_url_or_one_under_home_is_refused_saying_why(given: str, said: str) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL") as refused:
        Settings.from_env({"DATABASE_URL": given})
    assert said in str(refused.value)


def test_a_prune_batch_past_what_one_statement_takes_is_refused_at_start() -> None:
    """Review: CLERK_SYNC_PRUNE_BATCH=70000 was taken, and every prune on PostgreSQL then failed ("number of
    parameters must be between 0 and 65535", reported as a database to check): nothing was ever pruned again.
    Refused when read now, naming the setting, as is the policy built by hand."""
    from datetime import timedelta

    from clerk_sync.retention import RetentionPolicy

    with pytest.raises(ConfigError, match=r"CLERK_SYNC_PRUNE_BATCH.*less than or equal to 10000"):
        Settings.from_env({"CLERK_SYNC_PRUNE_BATCH": "70000"})
    assert Settings.from_env({"CLERK_SYNC_PRUNE_BATCH": "10000"}).prune_batch == 10_000
    with pytest.raises(ValueError, match="batch must be 1 to 10,000"):
        RetentionPolicy(batch=70_000, redact_after=timedelta(days=30))
