"""How a one-shot subcommand reports what stopped it (backend.__main__.run_tool): one line and status 2
for the database or an unwritable output, whichever error class asyncpg used; a misuse of asyncpg is a
bug and keeps its traceback."""

from __future__ import annotations

import argparse
import errno

import asyncpg
import pytest
from asyncpg import exceptions

import backend.__main__ as cli
from tests.conftest import make_settings

LOST = "cannot switch to state 15; another operation (2) is in progress"


@pytest.mark.parametrize(("raised", "line"), [
    (exceptions.InternalClientError(LOST), f"tally: error: database: InternalClientError: {LOST}"),
    (asyncpg.InterfaceError("connection is closed"), "tally: error: database: InterfaceError: connection is closed"),
    (OSError(errno.ENOSPC, "No space left on device"), "tally: error: cannot write the output: "),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "tally: error: database: "),
])
def test_one_line_and_status_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                               raised: BaseException, line: str) -> None:
    async def fail(*_: object) -> int:
        raise raised

    monkeypatch.setattr(cli, "run_migrations", fail)
    assert cli.run_tool(make_settings("postgresql://127.0.0.1:1/x"), argparse.Namespace(command="migrate")) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


@pytest.mark.parametrize("raised", [
    asyncpg.InterfaceError("the server expects 2 arguments for this query, 1 was passed"),
    exceptions.InternalClientError("no encoder for OID 1234"),
])
def test_a_misuse_of_asyncpg_is_not_called_the_database(monkeypatch: pytest.MonkeyPatch,
                                                        raised: BaseException) -> None:
    async def fail(*_: object) -> int:
        raise raised

    monkeypatch.setattr(cli, "run_migrations", fail)
    with pytest.raises(type(raised)):
        cli.run_tool(make_settings("postgresql://127.0.0.1:1/x"), argparse.Namespace(command="migrate"))
