"""sd_notify: datagrams on a real Unix socket, as systemd would receive them."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.notify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def test_ready_watchdog_status_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert n.enabled
    assert n.watchdog_interval_s == 2.0  # half of WATCHDOG_USEC
    assert n.ready("starting up")
    assert sock.recv(4096).decode().splitlines() == ["READY=1", "STATUS=starting up"]
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("line one\nline two")
    assert sock.recv(4096) == b"STATUS=line one line two"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_socket() -> None:
    name = f"evergreen-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()


def test_noop_without_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert n.ready() is False
    assert n.watchdog() is False


def test_watchdog_for_another_pid_is_ignored(tmp_path: Path) -> None:
    n = Notifier(
        {"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert n.watchdog_interval_s is None


def test_missing_socket_never_raises(tmp_path: Path) -> None:
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready() is False


def test_full_socket_buffer_never_blocks(notify_socket: tuple[socket.socket, str]) -> None:
    """A receiver that stops reading must not stall the daemon's main loop."""
    _sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    results = [n.status("x" * 1000) for _ in range(5000)]  # far more than any buffer holds
    assert results[0] is True
    assert results[-1] is False  # dropped, not blocked
