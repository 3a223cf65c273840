"""DIRECT_DATABASE_URL and DATABASE_POOL_MODE: where session connections go, and what the pools send;
POOL_MAX_SIZE's floor."""

from __future__ import annotations

import pytest

from backend.config import ConfigError, load_settings
from backend.db import connect_kwargs, mask_dsn, pooled_connect_kwargs

POOLER = "postgresql://tally@pgbouncer:6432/tally"
PRIMARY = "postgresql://tally@primary:5432/tally"


def test_direct_defaults_to_the_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", POOLER)
    monkeypatch.delenv("DIRECT_DATABASE_URL", raising=False)
    settings = load_settings()
    assert settings.direct_dsn(POOLER) == POOLER
    monkeypatch.setenv("DIRECT_DATABASE_URL", PRIMARY)
    assert load_settings().direct_dsn(POOLER) == PRIMARY


def test_direct_without_a_database_url_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DIRECT_DATABASE_URL", PRIMARY)
    with pytest.raises(ConfigError, match=r"DIRECT_DATABASE_URL: .*needs DATABASE_URL"):
        load_settings()


def test_an_unknown_pool_mode_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_POOL_MODE", "statement")
    with pytest.raises(ConfigError, match="DATABASE_POOL_MODE"):
        load_settings()


def test_transaction_mode_without_a_direct_url_is_refused_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """LISTEN, the leaders' session advisory locks and the migration lock would go through the pooler in
    transaction mode, which hands each transaction whichever server connection is free: a lock taken
    there stays on a server connection other clients then use."""
    monkeypatch.setenv("DATABASE_URL", POOLER)
    monkeypatch.delenv("DIRECT_DATABASE_URL", raising=False)
    monkeypatch.setenv("DATABASE_POOL_MODE", "transaction")
    with pytest.raises(ConfigError, match=r"DATABASE_POOL_MODE: .*needs DIRECT_DATABASE_URL"):
        load_settings()
    monkeypatch.setenv("DIRECT_DATABASE_URL", PRIMARY)
    assert load_settings().database_pool_mode == "transaction"


def test_transaction_mode_pools_have_no_statement_cache_and_no_startup_timeout() -> None:
    session = load_settings(database_url=POOLER)
    assert pooled_connect_kwargs(session) == connect_kwargs(session)
    assert connect_kwargs(session)["server_settings"]["statement_timeout"] == "5000"
    transaction = load_settings(database_url=POOLER, direct_database_url=PRIMARY, database_pool_mode="transaction")
    pooled = pooled_connect_kwargs(transaction)
    assert pooled["statement_cache_size"] == 0
    assert pooled["server_settings"] == {"application_name": "tally"}
    assert "statement_cache_size" not in connect_kwargs(transaction)  # direct connections keep both
    assert connect_kwargs(transaction)["server_settings"]["statement_timeout"] == "5000"


def test_an_empty_direct_url_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DIRECT_DATABASE_URL", "")
    assert load_settings().direct_database_url is None


MALFORMED = [
    "notaurl",
    "postgresql://u:se?cretpw@127.0.0.1:1/x",  # unescaped ?: asyncpg said "bad query field: 'cretpw@...'"
    "postgresql://u:se/cretpw@127.0.0.1:1/x",  # unescaped /: "invalid literal for int(): 'se'"
    "postgresql://u:secretpw@127.0.0.1:99999/x",  # OverflowError from connect()
    "postgresql://u:secretpw@[::1/x",
    "postgresql://u:secretpw@db/x?sslmode=bogus",
    "postgresql://u:se#cretpw@db/x",
]


@pytest.mark.parametrize("variable", ["DATABASE_URL", "DIRECT_DATABASE_URL", "READ_DATABASE_URL"])
@pytest.mark.parametrize("dsn", MALFORMED)
def test_a_malformed_url_is_one_line_naming_the_variable_and_nothing_of_the_value(
        monkeypatch: pytest.MonkeyPatch, variable: str, dsn: str) -> None:
    monkeypatch.setenv("DATABASE_URL", PRIMARY)
    monkeypatch.setenv(variable, dsn)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert f"{variable}: " in message and "\n" not in message
    assert not any(piece in message for piece in ("secret", "cretpw", "se?", "notaurl", "bogus", "99999")), message


@pytest.mark.parametrize("dsn", [PRIMARY, "postgresql://u:p%40ss@db1:5432,db2:5433/tally?sslmode=require",
                                 "postgresql://u@[::1]:5432/tally", "postgresql:///tally?host=/run/postgresql",
                                 "postgres://db/tally?application_name=tally&password=x"])
def test_well_formed_urls_pass(monkeypatch: pytest.MonkeyPatch, dsn: str) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)
    assert load_settings().dsn() == dsn


def test_the_masked_url_hides_every_password() -> None:
    assert mask_dsn("postgresql://u:pw@h:5/db?sslmode=require&password=x&%70assword=y#z") == \
        "postgresql://u:***@h:5/db?sslmode=require&password=***&%70assword=***#***"
    assert mask_dsn("postgresql:///tally?host=/tmp/s") == "postgresql:///tally?host=/tmp/s"
    assert mask_dsn("postgresql://u:secret@[::1/x") == "(a malformed URL)"


@pytest.mark.parametrize(("variable", "value"), [("CONNECT_TIMEOUT_S", "inf"), ("CONNECT_TIMEOUT_S", "1e400"),
                                                 ("COMMAND_TIMEOUT_S", "nan"), ("WAIT_FOR_DB_S", "infinity"),
                                                 ("STATEMENT_TIMEOUT_MS", "99999999999")])
def test_a_timeout_is_a_finite_number_the_server_takes(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                        value: str) -> None:
    """CONNECT_TIMEOUT_S=inf waited for ever on a server that never answers; STATEMENT_TIMEOUT_MS beyond
    PostgreSQL's int passed here and failed at the first connection."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"{variable}: "):
        load_settings()



def test_a_pool_of_one_connection_is_refused_naming_it() -> None:
    """The append batcher keeps one pooled connection from the first command on: with POOL_MAX_SIZE=1 every
    command after the first waited for ever for another, and /health/ready answered 503."""
    with pytest.raises(ConfigError, match=r"POOL_MAX_SIZE: .*at least 2: the append batcher keeps one"):
        load_settings(pool_min_size=1, pool_max_size=1)
    assert load_settings(pool_min_size=1, pool_max_size=2).pool_max_size == 2
