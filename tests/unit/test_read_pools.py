"""READ_DATABASE_URL's parsing and a replica's label (what health and metrics show: never a password).
The routing itself runs against a real primary and streaming replica in tests/system/test_replicas.py."""

from __future__ import annotations

import pytest

from backend.config import ConfigError, dsn_label, load_settings


def test_a_comma_list_splits_into_dsns_but_a_multi_host_url_stays_one() -> None:
    settings = load_settings(read_database_url="postgresql://u:p@r1:5433/tally, postgres://r2/tally,"
                                               "postgresql://a,b:5434/tally?target_session_attrs=any")
    assert settings.read_dsns() == ["postgresql://u:p@r1:5433/tally", "postgres://r2/tally",
                                    "postgresql://a,b:5434/tally?target_session_attrs=any"]


def test_one_replica_named_twice_is_refused_without_quoting_it() -> None:
    """Health and metrics tell replicas apart by host:port/database: the same replica twice (even with
    other credentials or options) would be two series of one name, a scrape Prometheus refuses."""
    with pytest.raises(ConfigError) as refused:
        load_settings(read_database_url="postgresql://u:s3cret@r1:5432/tally,postgresql://v@r1/tally?sslmode=require")
    message = str(refused.value)
    assert "READ_DATABASE_URL" in message and "more than once" in message and "s3cret" not in message, message
    assert load_settings(read_database_url="postgresql://r1/tally,postgresql://r1:5433/tally,"
                                           "postgresql://r1/other").read_dsns()


def test_unset_or_empty_means_no_replica() -> None:
    assert load_settings(read_database_url="").read_dsns() == []
    assert load_settings(read_database_url="  ").read_dsns() == []


def test_the_label_is_host_port_and_database_without_credentials() -> None:
    assert dsn_label("postgresql://tally:s3cret@db-replica-1:6432/tally") == "db-replica-1:6432/tally"
    assert dsn_label("postgresql://tally@10.0.0.7/ledger") == "10.0.0.7:5432/ledger"
    assert dsn_label("postgresql:///tally?host=/run/postgresql&port=5433&password=s3cret") == \
        "/run/postgresql:5433/tally"
    assert "s3cret" not in dsn_label("postgresql://u:s3cret@h/d?password=s3cret")
