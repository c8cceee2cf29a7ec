"""Which inbox files are candidates and when they are complete: the only watchdog user.

The observer thread does as little as possible: it turns an event into a
`(path, hint)` tuple and puts it on the daemon's queue. Every filesystem check
(lstat, the lease probe, quiet-period stability) runs in the daemon thread through
`Gate`, so a slow or strange file can never stall or kill the observer.

With inotify we read the kernel's events ourselves (`_Inotify`) instead of through
watchdog's observer: watchdog passes each event through three threads and two queues
and pairs every IN_MOVED_FROM with its IN_MOVED_TO by a linear search of a delay queue,
~400 us of CPU per file in a 5,000-file burst (benchmarks/profile_daemon.py), more than
everything else the daemon does. Our own reader asks the kernel only for what decides
completeness, only for the inbox (not `.digitwatch/`), and never holds an event back,
so a claim (a rename out of the watched folders) costs one event and no delay. Polling
(network filesystems) still uses watchdog.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import logging
import os
import re
import select
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.polling import PollingObserver

from digitwatch.errors import WatchLimit
from digitwatch.results import CSV_NAME

STATE_DIR = ".digitwatch"  # the service's own area inside the inbox; hidden, so never input

# Hints: what the event says about completeness.
CLOSED = "closed"  # IN_CLOSE_WRITE: the writer is done
MOVED = "moved"  # renamed into place: the producer finished before renaming
CREATED = "created"  # ambiguous: a finished rename-in from outside, or a writer just started
SCAN = "scan"  # found by the backlog scan or a rescan
QUIET = "quiet"  # polling: only size+mtime stability can tell
DIRECTORY = "dir"  # a folder appeared (recursive mode): scan it
OVERFLOW = "overflow"  # the kernel dropped events: rescan the whole inbox now

# The outbox's own names at its top level: an inbox subfolder of one of these names
# (--recursive) would be mirrored onto results.csv, so its files are never inputs.
# The review queue's default home is outbox/review/ (settings.review_path).
RESERVED_FOLDERS = frozenset({CSV_NAME, "review"})

# Names that are never input, in any folder (case-insensitive globs): hidden names
# (.DS_Store, ._resource forks, .syncthing.*.tmp, our .digitwatch), Office lock files,
# partial downloads and sync-tool temporaries, and desktop litter. A file whose name
# matches waits until it is renamed to a name that does not; a folder that matches is not
# entered. `--ignore GLOB` adds to these.
DEFAULT_IGNORE = (
    ".*",
    "~$*",
    "~syncthing~*",
    "*.part",
    "*.partial",
    "*.tmp",
    "*.crdownload",
    "@eaDir",
    "thumbs.db",
    "desktop.ini",
)

Sink = Callable[[tuple[str, str]], None]


class Ignore:
    """Whether a file or folder name is never input: DEFAULT_IGNORE plus `extra` globs."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.patterns = DEFAULT_IGNORE + tuple(extra)
        regex = "|".join(fnmatch.translate(p.lower()) for p in self.patterns)
        self._match = re.compile(regex, re.DOTALL).match

    def __call__(self, name: str) -> bool:
        return self._match(name.lower()) is not None


ignored_name = Ignore()


class _Filter:
    """Decide from a path string alone (no syscalls) whether it may be an input."""

    def __init__(self, root: Path, recursive: bool, ignore: Ignore = ignored_name) -> None:
        self.prefix = str(root) + "/"
        self.recursive = recursive
        self.ignore = ignore

    def relative(self, path: str) -> str | None:
        if not path.startswith(self.prefix):
            return None
        rel = path[len(self.prefix) :]
        if "/" in rel:
            if not self.recursive:
                return None
            parts = rel.split("/")
            if parts[0] in RESERVED_FOLDERS or any(self.ignore(p) for p in parts):
                return None
            return rel
        return None if self.ignore(rel) else rel


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


# inotify(7) constants (linux/inotify.h).
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_IN_DONT_FOLLOW = 0x02000000
_IN_EXCL_UNLINK = 0x04000000
_IN_ISDIR = 0x40000000
_IN_CLOEXEC = os.O_CLOEXEC
# IN_MOVED_FROM only to tell a rename inside the inbox (x.part -> x: MOVED, complete)
# from a rename in from elsewhere (CREATED: the lease probe decides).
_MASK = (
    _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_ONLYDIR
    | _IN_DONT_FOLLOW
    | _IN_EXCL_UNLINK
)
_EVENT = struct.Struct("iIII")

log = logging.getLogger(__name__)


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return libc


class _Inotify(threading.Thread):
    """One thread reading one inotify descriptor: each event becomes at most one sink call.

    Watches the inbox, and in recursive mode every folder below it whose name is not
    ignored (so never `.digitwatch/`). Watches are added in `start()`, before it returns.
    """

    def __init__(self, root: Path, recursive: bool, sink: Sink, ignore: Ignore) -> None:
        super().__init__(name="digitwatch-inotify", daemon=True)
        self._root = str(root)
        self._recursive = recursive
        self._ignore = ignore
        self._sink = sink
        self._libc = _libc()
        self._fd = -1
        self._dirs: dict[int, str] = {}  # watch descriptor -> folder path
        self._warned_full = False  # the watch limit was hit and said so (once)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)

    def start(self) -> None:
        self._fd = _new_instance(self._libc)
        try:
            self._watch_tree(self._root, strict=True)
        except BaseException:
            os.close(self._fd)
            raise
        super().start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _watch(self, folder: str, *, strict: bool = False) -> None:
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(folder), _MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if strict:
                _watch_failed(folder, e)
            if e == errno.ENOSPC and not self._warned_full:
                self._warned_full = True
                log.warning(
                    "cannot watch %s: the inotify watch limit is reached (%s); files in "
                    "folders without a watch are found only by the rescan",
                    folder,
                    _limit("max_user_watches"),
                )
            return  # gone again, or not a folder: a rescan covers it
        self._dirs[wd] = folder  # a folder renamed within the tree keeps its wd: re-point it

    def _watch_tree(self, top: str, *, strict: bool = False) -> None:
        self._watch(top, strict=strict)
        if not self._recursive:
            return
        stack = [top]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:
                continue
            for entry in entries:
                if _reserved_folder(entry.path, self._root):
                    continue
                with contextlib.suppress(OSError):
                    if not self._ignore(entry.name) and entry.is_dir(follow_symlinks=False):
                        self._watch(entry.path)
                        stack.append(entry.path)

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    return
                try:
                    buf = os.read(self._fd, 65536)
                except InterruptedError:
                    continue
                self._handle(buf)
        finally:
            os.close(self._fd)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _handle(self, buf: bytes) -> None:
        sink, dirs, last_from = self._sink, self._dirs, -1
        unpack, i, end = _EVENT.unpack_from, 0, len(buf)
        while i < end:
            wd, mask, cookie, length = unpack(buf, i)
            name = os.fsdecode(buf[i + 16 : i + 16 + length].rstrip(b"\0"))
            i += 16 + length
            if mask & _IN_MOVED_FROM:
                last_from = cookie  # its IN_MOVED_TO, if inside the tree, comes next
                continue
            if mask & _IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed; rescanning the inbox")
                sink((self._root, OVERFLOW))
                continue
            if mask & _IN_IGNORED:
                dirs.pop(wd, None)  # a watched folder went away
                continue
            folder = dirs.get(wd)
            if folder is None or self._ignore(name):
                continue
            path = f"{folder}/{name}"
            if mask & _IN_ISDIR:
                if _reserved_folder(path, self._root):
                    continue
                if self._recursive and mask & (_IN_CREATE | _IN_MOVED_TO):
                    self._watch_tree(path)  # before the scan, so nothing lands unseen
                    sink((path, DIRECTORY))
            elif mask & _IN_CLOSE_WRITE:
                sink((path, CLOSED))
            elif mask & _IN_MOVED_TO:
                sink((path, MOVED if cookie == last_from else CREATED))
            elif mask & _IN_CREATE:
                sink((path, CREATED))


def _limit(name: str) -> str:
    try:
        value = Path(f"/proc/sys/fs/inotify/{name}").read_text().strip()
    except OSError:
        value = "?"
    return f"fs.inotify.{name} = {value}"


def _new_instance(libc: Any) -> int:
    fd = int(libc.inotify_init1(_IN_CLOEXEC))
    if fd < 0:
        e = ctypes.get_errno()
        if e == errno.EMFILE:
            raise WatchLimit(
                f"cannot watch the inbox: the inotify instance limit is reached "
                f"({_limit('max_user_instances')}); raise it, or use --poll"
            )
        raise WatchLimit(f"cannot watch the inbox: inotify_init1: {os.strerror(e)}")
    return fd


def _watch_failed(folder: str, e: int) -> None:
    if e == errno.ENOSPC:
        raise WatchLimit(
            f"cannot watch {folder}: the inotify watch limit is reached "
            f"({_limit('max_user_watches')}); raise it, or use --poll"
        )
    raise WatchLimit(f"cannot watch {folder}: {os.strerror(e)}")


def check_watchable(root: Path, *, poll: float) -> None:
    """Raise WatchLimit unless inotify can watch `root` now (`run --check`)."""
    if poll > 0:
        return  # polling needs no kernel resources
    libc = _libc()
    fd = _new_instance(libc)
    try:
        if libc.inotify_add_watch(fd, os.fsencode(root), _MASK) < 0:
            _watch_failed(str(root), ctypes.get_errno())
    finally:
        os.close(fd)


class Watcher:
    """Owns the observer thread(s); `alive()` is False once any of them has died."""

    def __init__(
        self,
        root: Path,
        *,
        recursive: bool,
        poll: float,
        sink: Sink,
        ignore: Ignore = ignored_name,
    ) -> None:
        self.root = root
        self.filter = _Filter(root, recursive, ignore)
        self._observer: Any
        if poll > 0:
            self._observer = PollingObserver(timeout=poll)
            # Polling walks the tree each tick, so only walk what can hold input.
            self._observer.schedule(
                _Handler(self.filter, sink, polling=True), str(root), recursive=recursive
            )
        else:
            self._observer = _Inotify(root, recursive, sink, ignore)

    def start(self) -> None:
        self._observer.start()

    def alive(self) -> bool:
        emitters = list(getattr(self._observer, "emitters", ()))
        return bool(self._observer.is_alive()) and all(e.is_alive() for e in emitters)

    def stop(self) -> None:
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=5.0)


def scan(
    root: Path, *, recursive: bool, inbox: bool = True, ignore: Ignore = ignored_name
) -> Iterator[str]:
    """Every candidate path now in the inbox (non-directories; the daemon lstats them).

    `inbox`: `root` is the inbox itself, not a folder below it, so its reserved folder
    names (RESERVED_FOLDERS) are skipped.
    """
    stack = [str(root)]
    inbox_root = str(root) if inbox else None
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            if ignore(entry.name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                reserved = inbox_root is not None and _reserved_folder(entry.path, inbox_root)
                if recursive and not reserved:
                    stack.append(entry.path)
            else:
                yield entry.path


def _reserved_folder(path: str, root: str) -> bool:
    folder, _, name = path.rpartition("/")
    return name in RESERVED_FOLDERS and folder == root


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
