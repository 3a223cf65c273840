"""The sd_notify client: addresses as systemd writes them, one datagram per message, nothing without a
manager, and a watchdog only for the process it names."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from backend import service_manager
from backend.server.worker_notices import WorkerNotices, parse


def test_addresses_as_systemd_writes_them() -> None:
    assert service_manager.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert service_manager.socket_address("@tally/notify") == "\0tally/notify"
    assert service_manager.socket_address("") is None
    assert service_manager.socket_address("@") is None
    assert service_manager.socket_address("vsock:2:1234") is None


def test_a_message_is_one_datagram_of_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        assert service_manager.notify("READY=1", "STATUS=serving", env={"NOTIFY_SOCKET": path})
        assert manager.recv(4096) == b"READY=1\nSTATUS=serving"


def test_nothing_is_sent_without_a_manager_or_to_one_that_is_gone(tmp_path: Path) -> None:
    assert not service_manager.notify("READY=1", env={})
    assert not service_manager.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def test_the_watchdog_is_for_the_process_it_names() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000"}
    assert service_manager.watchdog_interval_s(env) == 3.0
    assert service_manager.watchdog_interval_s({**env, "WATCHDOG_PID": str(os.getpid())}) == 3.0
    assert service_manager.watchdog_interval_s({**env, "WATCHDOG_PID": "1"}, pid=2) is None
    assert service_manager.watchdog_interval_s({**env, "WATCHDOG_USEC": "0"}) is None
    assert service_manager.watchdog_interval_s({"WATCHDOG_USEC": "3000000"}) is None  # no one to ping


def test_the_parent_hears_each_notice_with_its_senders_pid() -> None:
    notices = WorkerNotices()
    try:
        assert notices.address.startswith("@")
        assert service_manager.notify("READY=1", "STATUS=up", env={"NOTIFY_SOCKET": notices.address})
        [notice] = notices.receive()
        assert notice.pid == os.getpid()
        assert notice.fields == {"READY": "1", "STATUS": "up"}
        assert notices.receive() == []
    finally:
        notices.close()


def test_notice_lines_without_a_value_are_skipped() -> None:
    assert parse(b"READY=1\nnonsense\nSTATUS=a=b") == {"READY": "1", "STATUS": "a=b"}
