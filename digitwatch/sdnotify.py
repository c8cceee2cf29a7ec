"""systemd's notify protocol (sd_notify(3)) spoken directly over NOTIFY_SOCKET.

No dependency: one datagram per message. Without NOTIFY_SOCKET every call does
nothing, so the daemon runs the same under systemd, in a terminal and in tests.
The two variables are the service manager's contract with this process, not
configuration, so they are read here rather than in settings.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger()


def socket_address(raw: str) -> str | bytes:
    """NOTIFY_SOCKET as socket.sendto takes it: '@name' is the abstract namespace."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner.isdigit() and int(owner) != pid):
        return None
    return int(usec) / 2_000_000


class Notifier:
    """Send READY/WATCHDOG/STATUS/STOPPING; a no-op when there is no socket."""

    def __init__(self, address: str | None, watchdog_every: float | None = None) -> None:
        self.watchdog_every = watchdog_every  # seconds between WATCHDOG=1, None: not asked
        self._address = socket_address(address) if address else None
        self._sock: socket.socket | None = None
        self._warned = False
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_interval(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """One datagram of newline-separated KEY=VALUE fields; False if it was not sent."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as e:
            # The manager may be gone during shutdown; say so once, never fail the service.
            if not self._warned:
                log.warning("sd_notify_failed", error=str(e))
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
