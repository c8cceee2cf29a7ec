"""When a candidate file is complete: its close or rename, a read lease, or a quiet period.

Every check here (lstat, the lease probe, size and mtime stability) runs in the daemon's
thread, never in an event source's, so a slow or strange file can never stall or kill
the observer.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from digitwatch.watch.hints import CLOSED, MOVED, QUIET


def writer_open(path: str) -> bool | None:
    """True while some process has the file open for writing, None when Linux won't say.

    A read lease is refused with EAGAIN while any writer holds the file open; it needs
    the file's owner (or CAP_LEASE), so other users' files fall back to quiet periods.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return True if e.errno == errno.EAGAIN else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


@dataclass
class _Pending:
    detected_at: float  # wall clock (time.time()) of the first sighting
    signature: tuple[int, int]  # (size, mtime_ns)
    since: float  # monotonic time the signature was first seen
    check_at: float
    leases: bool  # whether the lease probe works for this file


class Gate:
    """Hold candidate paths until they are complete; hand back (path, detected_at) pairs."""

    def __init__(self, quiet_period: float, *, use_leases: bool) -> None:
        self.quiet = quiet_period
        self.use_leases = use_leases
        self.pending: dict[str, _Pending] = {}
        self._next = float("inf")

    def next_check(self) -> float:
        return self._next

    def offer(self, path: str, hint: str, now: float, wall: float) -> float | None:
        """Return the detection time if `path` is complete now, else None (held or gone)."""
        held = self.pending.get(path)
        if hint in (CLOSED, MOVED):
            if held is not None:
                del self.pending[path]
                return held.detected_at
            return wall
        if held is not None:
            return None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return wall  # not ours to judge: the daemon skips it with a log line
        leases = self.use_leases and hint != QUIET
        if leases:
            try:
                busy = writer_open(path)
            except OSError:
                return None
            if busy is False:
                return wall
            leases = busy is True  # None: not permitted here, use the quiet period
        self._hold(
            path, _Pending(wall, (st.st_size, st.st_mtime_ns), now, now + self.quiet, leases)
        )
        return None

    def _hold(self, path: str, p: _Pending) -> None:
        self.pending[path] = p
        self._next = min(self._next, p.check_at)

    def due(self, now: float) -> list[tuple[str, float]]:
        """Paths whose writer has gone or whose size and mtime held still long enough."""
        if now < self._next:
            return []
        ready: list[tuple[str, float]] = []
        self._next = float("inf")
        for path, p in list(self.pending.items()):
            if p.check_at > now:
                self._next = min(self._next, p.check_at)
                continue
            try:
                st = os.lstat(path)
                busy = writer_open(path) if p.leases else None
            except OSError:
                del self.pending[path]  # claimed by a peer, or deleted
                continue
            signature = (st.st_size, st.st_mtime_ns)
            if busy is False or (
                busy is None and signature == p.signature and now - p.since >= self.quiet
            ):
                del self.pending[path]
                ready.append((path, p.detected_at))
                continue
            if signature != p.signature:
                p.signature, p.since = signature, now
            # A held writer is rechecked too, in case its close event was dropped.
            p.check_at = now + self.quiet if busy else p.since + self.quiet
            self._next = min(self._next, p.check_at)
        return ready
