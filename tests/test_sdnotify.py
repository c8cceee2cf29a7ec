"""NOTIFY_SOCKET protocol: path and abstract sockets, no-op when unset, watchdog interval."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from digitwatch.sdnotify import Notifier, socket_address, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def test_sends_ready_watchdog_status_stopping(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("3 waiting")
    fields = sock.recv(4096).decode().split("\n")
    assert fields[0] == "READY=1" and "STATUS=3 waiting" in fields
    assert f"MAINPID={os.getpid()}" in fields
    assert n.watchdog() and sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("busy") and sock.recv(4096) == b"STATUS=busy"
    assert n.stopping() and sock.recv(4096).startswith(b"STOPPING=1\n")
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"digitwatch-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
        n.close()
    finally:
        sock.close()
    assert socket_address("@x") == b"\0x" and socket_address("/run/x") == "/run/x"


def test_without_socket_every_call_is_a_no_op() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert not n.ready("x") and not n.watchdog() and not n.stopping()
    n.close()


def test_a_vanished_manager_never_raises(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.send("READY=1") is False
    assert n.watchdog() is False
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env, pid=os.getpid() if os.getpid() != 1 else 2) == expected
