"""DIRECT_DATABASE_URL and DATABASE_POOL_MODE: where session connections go, and what the pools send."""

from __future__ import annotations

import pytest

from backend.config import ConfigError, load_settings
from backend.db import connect_kwargs, pooled_connect_kwargs

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


def test_transaction_mode_pools_have_no_statement_cache_and_no_startup_timeout() -> None:
    session = load_settings(database_url=POOLER)
    assert pooled_connect_kwargs(session) == connect_kwargs(session)
    assert connect_kwargs(session)["server_settings"]["statement_timeout"] == "5000"
    transaction = load_settings(database_url=POOLER, database_pool_mode="transaction")
    pooled = pooled_connect_kwargs(transaction)
    assert pooled["statement_cache_size"] == 0
    assert pooled["server_settings"] == {"application_name": "tally"}
    assert "statement_cache_size" not in connect_kwargs(transaction)  # direct connections keep both
    assert connect_kwargs(transaction)["server_settings"]["statement_timeout"] == "5000"


def test_an_empty_direct_url_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DIRECT_DATABASE_URL", "")
    assert load_settings().direct_database_url is None
