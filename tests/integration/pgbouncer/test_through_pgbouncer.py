"""Tally behind a real PgBouncer in transaction mode (conftest.py): the suite's command tests run again
with DATABASE_URL through it (credits, debits, locks and settles, reservations, deposits, idempotent
replays, the 100-way debit race, two processes racing), and what holds a session is shown to bypass it."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from backend.app import create_app
from backend.appkeys import LISTENER, POOL, PROJECTIONS
from backend.config import Settings
from backend.db import connect_kwargs, pooled_connect_kwargs
from tests.conftest import make_settings
from tests.integration.commands.test_races import (
    test_100_concurrent_debits_succeed_exactly_as_far_as_funds_go,
    test_two_app_instances_racing_on_one_wallet_never_overdraw,
)
from tests.integration.http.test_http_deposits import (
    alice,
    test_20_concurrent_confirmations_credit_once,
    test_confirmations_racing_across_two_processes_credit_once,
    test_idempotent_confirmation_replays_and_credits_once,
    test_transitions_through_confirmed_credit_the_wallet,
    watcher,
)
from tests.integration.http.test_http_idempotency import (
    test_a_repeat_while_the_first_is_running_is_409_in_flight,
    test_a_replayed_create_locates_what_the_first_created,
)
from tests.integration.http.test_http_wallets import (
    admin,
    test_domain_errors_have_stable_codes,
    test_idempotency_replay_mismatch_and_in_flight,
    test_if_match_makes_commands_conditional,
    test_locks_release_and_settle,
    test_open_credit_debit_and_read,
    test_replay_wins_over_a_precondition_that_no_longer_holds,
    test_reservations_confirm_partial_and_rollback,
)
from tests.integration.pgbouncer.bouncer import Bouncer
from tests.support import Client

__all__ = [  # collected by pytest from here too, with this directory's settings
    "admin",
    "alice",
    "test_20_concurrent_confirmations_credit_once",
    "test_100_concurrent_debits_succeed_exactly_as_far_as_funds_go",
    "test_a_repeat_while_the_first_is_running_is_409_in_flight",
    "test_a_replayed_create_locates_what_the_first_created",
    "test_confirmations_racing_across_two_processes_credit_once",
    "test_domain_errors_have_stable_codes",
    "test_idempotency_replay_mismatch_and_in_flight",
    "test_idempotent_confirmation_replays_and_credits_once",
    "test_if_match_makes_commands_conditional",
    "test_locks_release_and_settle",
    "test_open_credit_debit_and_read",
    "test_replay_wins_over_a_precondition_that_no_longer_holds",
    "test_reservations_confirm_partial_and_rollback",
    "test_transitions_through_confirmed_credit_the_wallet",
    "test_two_app_instances_racing_on_one_wallet_never_overdraw",
    "watcher",
]

REAL_BACKEND = "select count(*) from pg_stat_activity where pid = $1"
HOLDS_ADVISORY_LOCK = "select count(*) from pg_locks where pid = $1 and locktype = 'advisory' and granted"


async def test_the_pool_goes_through_pgbouncer_and_sessions_do_not(
        client: Client, database_url: str) -> None:
    app = client.app
    async with app[POOL].acquire() as pooled:
        # PgBouncer answers with a key of its own, not the server process's: the two pids differ
        assert pooled.get_server_pid() != await pooled.fetchval("select pg_backend_pid()")
    direct = await asyncpg.connect(database_url)
    try:
        listener_pid = app[LISTENER].backend_pid()
        assert listener_pid is not None and await direct.fetchval(REAL_BACKEND, listener_pid) == 1
        leaders = [r.backend_pid for r in app[PROJECTIONS].runners if r.state == "leading"]
        assert leaders, [r.state for r in app[PROJECTIONS].runners]
        for pid in leaders:
            assert await direct.fetchval(HOLDS_ADVISORY_LOCK, pid) == 1  # the leader's lock, on its own backend
    finally:
        await direct.close()


async def test_a_statement_cache_breaks_behind_transaction_pooling_and_none_works(
        pgbouncer: Bouncer, database_url: str, settings: Settings) -> None:
    """Why DATABASE_POOL_MODE=transaction turns asyncpg's statement cache off: a statement prepared on
    one server connection is asked for on another. `other` holds the server connection `mine` just
    used (PgBouncer reuses the most recent one first), so `mine`'s next query lands on another one."""
    through = pgbouncer.dsn_for(database_url)
    for chosen, works in ((connect_kwargs(settings), False), (pooled_connect_kwargs(settings), True)):
        kwargs = {**chosen, "server_settings": {"application_name": "tally-test"}}
        mine, other = await asyncpg.connect(through, **kwargs), await asyncpg.connect(through, **kwargs)
        try:
            assert await mine.fetchval("select $1::int + 1", 1) == 2
            async with other.transaction():
                await other.execute("select 1")
                if works:
                    assert await mine.fetchval("select $1::int + 1", 2) == 3
                else:
                    with pytest.raises(asyncpg.InvalidSQLStatementNameError):
                        await mine.fetchval("select $1::int + 1", 2)
        finally:
            await mine.close()
            await other.close()


async def test_pgbouncer_refuses_statement_timeout_at_connect_so_the_pool_sends_none(
        pgbouncer: Bouncer, database_url: str, settings: Settings) -> None:
    through = pgbouncer.dsn_for(database_url)
    with pytest.raises(asyncpg.ProtocolViolationError, match="statement_timeout"):
        await asyncpg.connect(through, **connect_kwargs(settings))
    conn = await asyncpg.connect(through, **pooled_connect_kwargs(settings))
    await conn.close()


async def test_startup_warns_when_the_pools_have_no_statement_timeout(  # type: ignore[no-untyped-def]
        aiohttp_client, settings: Settings, pgbouncer: Bouncer, own_database_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    warning = "no statement_timeout on the pooled connections"
    with caplog.at_level(logging.WARNING, logger="backend.db"):
        await aiohttp_client(create_app(settings))
    assert warning in caplog.text  # the test server sets none
    caplog.clear()
    direct = await asyncpg.connect(own_database_url)  # before PgBouncer has any connection to it
    try:
        await direct.execute(f"alter database \"{await direct.fetchval('select current_database()')}\" "
                             "set statement_timeout = '5s'")
    finally:
        await direct.close()
    timed = make_settings(pgbouncer.dsn_for(own_database_url), direct_database_url=own_database_url,
                          database_pool_mode="transaction")
    with caplog.at_level(logging.WARNING, logger="backend.db"):
        client = await aiohttp_client(create_app(timed))
    assert warning not in caplog.text
    assert await client.app[POOL].fetchval("select current_setting('statement_timeout')") == "5s"
