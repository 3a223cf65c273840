"""The systemd units of docs/ops/ are ones systemd accepts (`systemd-analyze verify`, where the systemd
package is installed: .ci/run installs it), and their timeouts and limits fit what the code does."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backend.config import Settings
from backend.server.workers import STOP_MARGIN_S
from tests.conftest import ROOT

UNITS = {"tally.service": "backend serve", "tally-projections.service": "projections"}
INSTALLED_PYTHON = "/opt/tally/.venv/bin/python"


def service(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd's keys are case-sensitive
    parser.read_string((ROOT / "docs" / "ops" / name).read_text())
    return parser["Service"]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_runs_what_it_says_as_a_notify_service(name: str) -> None:
    unit = service(name)
    assert unit["ExecStart"] == f"{INSTALLED_PYTHON} -m {UNITS[name]}"
    assert (unit["Type"], unit["NotifyAccess"], unit["KillSignal"], unit["KillMode"]) == (
        "notify", "main", "SIGTERM", "mixed")
    assert unit["EnvironmentFile"] == "/etc/tally/tally.env"
    assert unit["Restart"] == "on-failure"
    assert float(unit["WatchdogSec"]) > 0


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_waits_longer_than_the_drain(name: str) -> None:
    """systemd SIGKILLs at TimeoutStopSec: past the workers' drain and the parent's own deadline."""
    defaults = Settings()
    assert float(service(name)["TimeoutStopSec"]) > defaults.shutdown_timeout_s + STOP_MARGIN_S


def test_each_worker_may_open_as_many_files_as_its_streams_need() -> None:
    assert int(service("tally.service")["LimitNOFILE"]) > 2 * Settings().sse_max_streams


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian package systemd)")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """As installed, but with this test's interpreter for the one path that must exist here."""
    for name in UNITS:
        text = (ROOT / "docs" / "ops" / name).read_text()
        assert INSTALLED_PYTHON in text
        (tmp_path / name).write_text(text.replace(INSTALLED_PYTHON, sys.executable))
    checked = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / name) for name in sorted(UNITS))],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.strip() == "", checked.stderr  # an unknown or misspelt key is only a warning
