"""Which inbox files are candidates and when they are complete: the only watchdog user.

The observer thread does as little as possible: it turns an event into a
`(path, hint)` tuple and puts it on the daemon's queue. Every filesystem check
(lstat, the lease probe, quiet-period stability) runs in the daemon thread through
`Gate`, so a slow or strange file can never stall or kill the observer.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

STATE_DIR = ".digitwatch"  # the service's own area inside the inbox; hidden, so never input

# Hints: what the event says about completeness.
CLOSED = "closed"  # IN_CLOSE_WRITE: the writer is done
MOVED = "moved"  # renamed into place: the producer finished before renaming
CREATED = "created"  # ambiguous: a finished rename-in from outside, or a writer just started
SCAN = "scan"  # found by the backlog scan or a rescan
QUIET = "quiet"  # polling: only size+mtime stability can tell
DIRECTORY = "dir"  # a folder appeared (recursive mode): scan it

_TEMP_SUFFIXES = (".part", ".tmp", ".crdownload")
_TEMP_NAMES = frozenset({"thumbs.db"})

Sink = Callable[[tuple[str, str]], None]


def ignored_name(name: str) -> bool:
    """Hidden, temporary and desktop-litter names wait until they are renamed."""
    if name.startswith((".", "~$")):  # also .DS_Store, .syncthing.*, our .digitwatch
        return True
    lower = name.lower()
    return lower.endswith(_TEMP_SUFFIXES) or lower in _TEMP_NAMES


class _Filter:
    """Decide from a path string alone (no syscalls) whether it may be an input."""

    def __init__(self, root: Path, recursive: bool) -> None:
        self.prefix = str(root) + "/"
        self.recursive = recursive

    def relative(self, path: str) -> str | None:
        if not path.startswith(self.prefix):
            return None
        rel = path[len(self.prefix) :]
        if "/" in rel:
            if not self.recursive:
                return None
            if any(ignored_name(p) for p in rel.split("/")):
                return None
            return rel
        return None if ignored_name(rel) else rel


class _Handler(FileSystemEventHandler):
    def __init__(self, flt: _Filter, sink: Sink, polling: bool) -> None:
        self._filter = flt
        self._sink = sink
        self._polling = polling

    def dispatch(self, event: FileSystemEvent) -> None:
        # Overrides the base dispatch: one branch per event, no per-type method calls.
        kind = event.event_type
        if kind == "moved":
            path: Any = event.dest_path
            hint = MOVED
        elif kind == "closed":
            path, hint = event.src_path, CLOSED
        elif kind == "created" or (self._polling and kind == "modified"):
            path, hint = event.src_path, CREATED
        else:
            return
        if not isinstance(path, str):
            path = os.fsdecode(path)
        if event.is_directory:
            if self._filter.recursive and kind != "closed" and self._filter.relative(path):
                self._sink((path, DIRECTORY))
            return
        if self._filter.relative(path) is not None:
            self._sink((path, QUIET if self._polling else hint))


class Watcher:
    """Owns the watchdog observer; `alive()` is False once any of its threads has died."""

    def __init__(self, root: Path, *, recursive: bool, poll: float, sink: Sink) -> None:
        self.root = root
        self.filter = _Filter(root, recursive)
        self._observer: Any = PollingObserver(timeout=poll) if poll > 0 else Observer()
        handler = _Handler(self.filter, sink, polling=poll > 0)
        if poll > 0:
            # Polling walks the tree each tick, so only walk what can hold input.
            self._observer.schedule(handler, str(root), recursive=recursive)
        else:
            # Always recursive at the inotify level: claims and archives are renames into
            # .digitwatch/ and must stay inside the watched tree, or watchdog holds each
            # IN_MOVED_FROM for 0.5 s and every later event waits behind it (NOTES.md).
            self._observer.schedule(
                handler,
                str(root),
                recursive=True,
                event_filter=[
                    FileCreatedEvent,
                    FileMovedEvent,
                    FileClosedEvent,
                    DirCreatedEvent,
                    DirMovedEvent,
                ],
            )

    def start(self) -> None:
        self._observer.start()

    def alive(self) -> bool:
        emitters = list(self._observer.emitters)
        return bool(self._observer.is_alive()) and all(e.is_alive() for e in emitters)

    def stop(self) -> None:
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=5.0)


def scan(root: Path, *, recursive: bool) -> Iterator[str]:
    """Every candidate path now in the inbox (non-directories; the daemon lstats them)."""
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            if ignored_name(entry.name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if recursive:
                    stack.append(entry.path)
            else:
                yield entry.path


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
