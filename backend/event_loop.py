"""Which asyncio event loop the long-running processes use (EVENT_LOOP: auto, uvloop or asyncio).

uvloop (libuv, the loop asyncpg's authors wrote) is an optional speed-up and never a requirement:
`auto` takes it when it is installed (`./scripts/serve` installs the `fast` extra) and the standard
loop otherwise; `uvloop` insists on it and fails with a clear message when it is missing; `asyncio`
keeps the standard loop. Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
T = TypeVar("T")


class EventLoopUnavailable(Exception):
    """EVENT_LOOP names a loop that is not installed."""


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for `asyncio.Runner`, or None for the standard loop."""
    if choice == "asyncio":
        return None
    if importlib.util.find_spec("uvloop") is None:
        if choice == "uvloop":
            raise EventLoopUnavailable("EVENT_LOOP=uvloop but uvloop is not installed "
                                       "(pip install 'tally[fast]', or set EVENT_LOOP=asyncio)")
        return None
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice) -> T:
    """`asyncio.run` on the chosen loop."""
    try:
        factory = loop_factory(choice)
    except EventLoopUnavailable:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


STRAY_SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2")
"""Signals whose default action ends a process at once, without a drain or a log line; init scripts
send SIGHUP to mean "reload". Tally has nothing to reload: SIGTERM (or SIGINT) stops it."""


def ignore_stray_signals() -> None:
    """Log each of STRAY_SIGNALS, and go on serving."""
    def stray(signum: int, frame: object) -> None:
        log.warning("signal ignored: nothing to reload; SIGTERM stops the process",
                    extra={"signal": signal.Signals(signum).name})

    for name in STRAY_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stray)


def run_main(main: Coroutine[Any, Any, Any], choice: EventLoopChoice, prog: str,
             fatal: tuple[type[Exception], ...] = ()) -> int:
    """Run a process's main coroutine on the chosen loop and give its exit status, each known failure
    as one line on stderr: 2 when EVENT_LOOP names a missing loop, 1 for one of `fatal` (the database
    unreachable, the port taken...), 0 otherwise, Ctrl-C included."""
    ignore_stray_signals()
    try:
        run(main, choice)
    except EventLoopUnavailable as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except fatal as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def loop_name() -> str:
    """The running loop's implementation, as logs and /metrics report it."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
