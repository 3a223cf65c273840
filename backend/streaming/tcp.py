"""How long a TCP connection has gone without sending data, from the kernel (Linux TCP_INFO).

A client that stops reading first fills its own receive buffer, then the kernel's send buffer on this
side, and only then does the server's write find the socket refusing bytes. Counting the send timeout
from that moment would add the time the buffers took to fill; the kernel knows when data last left
(``tcpi_last_data_sent``), which is when the client's window closed.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Protocol

TCP_INFO_SIZE = 104
_LAST_DATA_SENT = struct.Struct("=I")
_LAST_DATA_SENT_OFFSET = 44
"""struct tcp_info: eight one-byte fields, then nine u32 (rto ... fackets), then tcpi_last_data_sent (ms)."""


class HasSocket(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def limit_send_buffer(transport: HasSocket, size: int) -> None:
    """Cap the kernel's send buffer for this connection (Linux allots twice the size asked for).

    Left alone, Linux grows a busy connection's buffer up to net.ipv4.tcp_wmem's maximum (4 MiB by
    default): a frozen client would hold that much kernel memory, and take that long to fill it
    before its stream notices anything. Twice 128 KiB still carries several MB/s to a distant client."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def idle_s(transport: HasSocket) -> float | None:
    """Seconds since the connection last sent data; None where the kernel cannot tell (not TCP, not Linux)."""
    option = getattr(socket, "TCP_INFO", None)
    sock = transport.get_extra_info("socket")
    if option is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, TCP_INFO_SIZE)
    except (OSError, ValueError):  # closed under us: uvloop's socket says "negative file descriptor"
        return None
    if len(info) < _LAST_DATA_SENT_OFFSET + _LAST_DATA_SENT.size:
        return None
    return float(_LAST_DATA_SENT.unpack_from(info, _LAST_DATA_SENT_OFFSET)[0]) / 1000
