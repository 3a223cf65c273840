"""README.md's quick start, run line by line in one shell exactly as written there: serve in the
background, wait for it, make an admin key into $KEY, create a wallet with it, stop serve.

Only the environment differs from a person's: PORT is a free port, DATA_DIR a temporary directory and
DATABASE_URL a fresh, empty database of this test, so that nothing clashes with other runs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support import query_blocking

pytestmark = pytest.mark.system

FENCE = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def quick_start_commands() -> list[str]:
    """The commands of the quick start's shell blocks, a line ending in a backslash joined to the next."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = FENCE.findall(section)
    assert blocks, "README.md's quick start has no ```sh block"
    commands: list[str] = []
    pending = ""
    for line in "".join(blocks).splitlines():
        if not line.strip() and not pending:
            continue
        pending += line + "\n"
        if not line.rstrip().endswith("\\"):
            commands.append(pending.rstrip("\n"))
            pending = ""
    assert not pending, "a quick start line ends in a backslash"
    return commands


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(400)
def test_the_quick_start_works_pasted_line_by_line(fresh_database_url: str, tmp_path: Path) -> None:
    commands = quick_start_commands()
    assert any("serve &" in c for c in commands) and any("KEY=$(" in c for c in commands)
    statuses = tmp_path / "statuses"
    script = "".join(f"{command}\necho \"{i} $?\" >> {statuses}\n" for i, command in enumerate(commands))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TEST_DATABASE_URL", "KEY")}
    env.update(PORT=str(free_port()), DATA_DIR=str(tmp_path / "data"), DATABASE_URL=fresh_database_url)
    shell = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = shell.communicate(timeout=330)  # the wait line retries for up to 300 s
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        out, err = shell.communicate()
        pytest.fail(f"the quick start did not finish:\n{err[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)  # serve, should the shell have left it running
    assert shell.returncode == 0, err
    ran = dict(line.split() for line in statuses.read_text().splitlines())
    failed = {commands[int(i)]: rc for i, rc in ran.items() if rc != "0"}
    assert len(ran) == len(commands) and not failed, (failed, err)

    assert json.loads(out.splitlines()[0])["status"] == "ready"
    status = re.search(r"^HTTP/[\d.]+ (\d{3})", out, re.MULTILINE)
    assert status and status[1] == "201", out + err
    wallet = json.loads(out.strip().splitlines()[-1])
    assert wallet["owner"] == "ops" and wallet["currency"] == "USD" and wallet["balance"] == 0
    assert "listening on http://127.0.0.1:" + env["PORT"] in err
    assert "tly_" not in err  # the key went into $KEY, not onto the terminal

    opened = query_blocking(fresh_database_url, "select type from events order by position")
    assert [r["type"] for r in opened] == ["ApiKeyCreated", "WalletOpened"]
    with socket.socket() as probe:  # serve stopped with the shell's `kill %1`
        assert probe.connect_ex(("127.0.0.1", int(env["PORT"]))) != 0
