"""Tell a service manager what the process is doing: systemd's sd_notify protocol, without libsystemd.

systemd (Type=notify) sets NOTIFY_SOCKET to a datagram socket (a path, or an abstract address written
with a leading '@') and reads `READY=1`, `STATUS=...`, `STOPPING=1` and `WATCHDOG=1` lines from it; with
WatchdogSec it also sets WATCHDOG_USEC (and WATCHDOG_PID, the process meant) and restarts a process
whose pings stop, so a wedged event loop gets the service restarted. Without NOTIFY_SOCKET every call
here does nothing. The environment is read at each call, never at import time; a message that cannot
be sent is dropped (the manager is gone or never listened): serving never depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Mapping

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
MANAGER_VARIABLES = (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID)
"""What the manager tells its main process alone: a child that inherited them would speak for it."""


def socket_address(value: str) -> str | None:
    """NOTIFY_SOCKET's address as the socket module takes it ('@name' is the abstract '\\0name'), or None
    for what is not an AF_UNIX address (systemd also knows vsock, which this process does not speak)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*lines: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send `lines` as one datagram to NOTIFY_SOCKET; whether it was sent (False without one)."""
    address = socket_address(env.get(NOTIFY_SOCKET, ""))
    if address is None or not lines:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str) -> bool:
    return notify("STOPPING=1", f"STATUS={status}")


def watchdog_interval_s(env: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """WatchdogSec in seconds when it is set for this process (WATCHDOG_PID absent or this pid), else None."""
    owner = env.get(WATCHDOG_PID, "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    usec = env.get(WATCHDOG_USEC, "")
    if not usec.isdigit() or int(usec) == 0 or NOTIFY_SOCKET not in env:
        return None
    return int(usec) / 1_000_000


async def _ping(every_s: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def watchdog() -> AsyncIterator[None]:
    """While inside, ping the manager's watchdog from this event loop at half its interval (nothing when
    no watchdog is set): a loop that stops turning stops the pings."""
    interval = watchdog_interval_s()
    if interval is None:
        yield
        return
    task = asyncio.create_task(_ping(interval / 2), name="service-manager-watchdog")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
