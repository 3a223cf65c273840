"""What the workers of `serve --workers N` tell their parent: the sd_notify protocol again, on a socket
of the parent's.

Under a service manager only the parent speaks to it (NotifyAccess=main), and it may say READY=1
only once every worker is: so the parent binds a datagram socket of its own (an abstract address the
kernel picks: nothing to clean up), hands it to the workers as their NOTIFY_SOCKET, and reads what
each one says (`READY=1` once listening, `STATUS=...`, `WATCHDOG=1`). The kernel stamps each datagram
with its sender's pid (SO_PASSCRED), so a notice is matched to a worker by pid, and one from any other
process is ignored.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

CREDENTIALS = struct.Struct("iII")
"""struct ucred: pid, uid, gid."""
MAX_NOTICE = 4096


@dataclass(frozen=True, slots=True)
class Notice:
    pid: int
    fields: dict[str, str]


class WorkerNotices:
    """The parent's end: a non-blocking datagram socket; `address` is what workers get as NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.bind("")  # Linux autobind: a unique abstract address
        except BaseException:
            self._sock.close()
            raise
        name = self._sock.getsockname()
        self.address = "@" + (name[1:].decode() if isinstance(name, bytes) else name[1:])

    def receive(self) -> list[Notice]:
        """Every notice waiting now (none blocks)."""
        found: list[Notice] = []
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(MAX_NOTICE, socket.CMSG_SPACE(CREDENTIALS.size))
            except (BlockingIOError, InterruptedError):
                return found
            pid = next((CREDENTIALS.unpack_from(payload)[0] for level, kind, payload in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                        and len(payload) >= CREDENTIALS.size), None)
            if pid is not None:
                found.append(Notice(pid, parse(data)))

    def close(self) -> None:
        self._sock.close()


def parse(data: bytes) -> dict[str, str]:
    """`KEY=value` lines (a later line wins; a line without '=' is skipped)."""
    fields = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields
