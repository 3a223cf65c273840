"""EVENT_LOOP: uvloop is an optional speed-up, never a requirement."""

from __future__ import annotations

import importlib.util

import pytest

from backend import event_loop
from backend.config import ConfigError, load_settings


async def running_loop() -> str:
    return event_loop.loop_name()


def test_asyncio_keeps_the_standard_loop() -> None:
    assert event_loop.run(running_loop(), "asyncio") == "asyncio"


def test_auto_and_uvloop_take_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop")
    assert event_loop.run(running_loop(), "auto") == "uvloop"
    assert event_loop.run(running_loop(), "uvloop") == "uvloop"


@pytest.fixture
def without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "uvloop" else real_find_spec(name, *args))


@pytest.mark.usefixtures("without_uvloop")
def test_auto_falls_back_to_asyncio_without_uvloop() -> None:
    assert event_loop.run(running_loop(), "auto") == "asyncio"


@pytest.mark.usefixtures("without_uvloop")
def test_insisting_on_a_missing_uvloop_fails_clearly_and_runs_nothing() -> None:
    started = []

    async def main() -> None:
        started.append(True)

    with pytest.raises(event_loop.EventLoopUnavailable, match="EVENT_LOOP=uvloop but uvloop is not installed"):
        event_loop.run(main(), "uvloop")
    assert started == []


def test_the_setting_is_case_insensitive_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENT_LOOP", "UVLOOP")
    assert load_settings().event_loop == "uvloop"
    monkeypatch.setenv("EVENT_LOOP", "trio")
    with pytest.raises(ConfigError, match="EVENT_LOOP"):
        load_settings()

