"""The event source on Linux: watchdog's low-level inotify thread, for the inbox only.

`InotifyFD` reads the kernel's events and hands each to a callback on its own thread;
we use it directly rather than watchdog's observer, which passes each event through two
more threads and queues and holds every IN_MOVED_FROM back for 0.5 s to pair it (about
400 us of CPU per file in a 5,000-file burst, benchmarks/profile_daemon.py). The callback
asks only for what decides completeness, only for the inbox (not `.digitwatch/`), and
never holds an event back, so a claim (a rename out of the watched folders) costs one
event and no delay.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

from digitwatch.errors import WatchLimit
from digitwatch.watch.filters import Ignore, ignored_name, reserved_folder
from digitwatch.watch.hints import CLOSED, CREATED, DIRECTORY, MOVED, OVERFLOW, Sink

_C = InotifyConstants
# IN_MOVED_FROM only to tell a rename inside the inbox (x.part -> x: MOVED, complete)
# from a rename in from elsewhere (CREATED: the lease probe decides).
_MASK = Mask(
    _C.IN_CLOSE_WRITE
    | _C.IN_MOVED_FROM
    | _C.IN_MOVED_TO
    | _C.IN_CREATE
    | _C.IN_ONLYDIR
    | _C.IN_DONT_FOLLOW
    | _C.IN_EXCL_UNLINK
)
_ID = CallbackId(0)  # one callback per watch: this source's

log = logging.getLogger(__name__)


class Inotify:
    """Turns each inotify event into at most one sink call, on InotifyFD's thread.

    Watches the inbox, and in recursive mode every folder below it whose name is not
    ignored (so never `.digitwatch/`). Watches are added in `start()`, before it returns.
    """

    def __init__(self, root: Path, recursive: bool, sink: Sink, ignore: Ignore) -> None:
        self._root = str(root)
        self._recursive = recursive
        self._ignore = ignore
        self._sink = sink
        self._thread: InotifyFD | None = None
        self._dirs: dict[int, str] = {}  # watch descriptor -> folder path
        self._inodes: dict[tuple[int, int], int] = {}  # watched folder's (dev, ino) -> wd
        self._last_from = -1  # the cookie of the last IN_MOVED_FROM
        self._warned_full = False  # the watch limit was hit and said so (once)

    def start(self) -> None:
        try:
            thread = InotifyFD()
        except OSError as e:
            raise WatchLimit(_instance_failed(e)) from None
        thread.name = "digitwatch-inotify"
        thread.start()  # first: an unstarted InotifyFD cannot close its descriptors
        self._thread = thread
        try:
            self._watch_tree(self._root, strict=True)
        except BaseException:
            self.stop()
            self.join()
            raise

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch(self, folder: str, *, strict: bool = False) -> None:
        assert self._thread is not None
        try:
            st = os.lstat(folder)
            known = self._inodes.get((st.st_dev, st.st_ino))
            if known is not None and known in self._dirs:
                # Renamed within the tree, it keeps its watch: re-point it (adding it
                # again would only overwrite the callback, with a warning).
                self._dirs[known] = folder
                return
            wd = self._thread.add_callback(os.fsencode(folder), _MASK, self, _ID)
        except OSError as e:
            if strict:
                raise WatchLimit(_watch_failed(folder, e.errno)) from None
            if e.errno == errno.ENOSPC and not self._warned_full:
                self._warned_full = True
                log.warning(
                    "cannot watch %s: the inotify watch limit is reached (%s); files in "
                    "folders without a watch are found only by the rescan",
                    folder,
                    _limit("max_user_watches"),
                )
            return  # gone again, or not a folder: a rescan covers it
        if wd < 0:  # InotifyFD passes EACCES over without raising
            if strict:
                raise WatchLimit(_watch_failed(folder, errno.EACCES))
            return
        self._dirs[wd] = folder
        self._inodes[(st.st_dev, st.st_ino)] = wd

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
                if reserved_folder(entry.path, self._root):
                    continue
                with contextlib.suppress(OSError):
                    if not self._ignore(entry.name) and entry.is_dir(follow_symlinks=False):
                        self._watch(entry.path)
                        stack.append(entry.path)

    # InotifyFD's callbacks (watchdog.observers.inotify_c.WatchCallback), on its thread.

    def on_event(self, event: InotifyEvent) -> None:
        mask = event.mask
        if mask & _C.IN_MOVED_FROM:
            self._last_from = event.cookie  # its IN_MOVED_TO, if inside the tree, comes next
            return
        folder = self._dirs.get(event.wd)
        name = os.fsdecode(event.name)
        if folder is None or self._ignore(name):
            return
        path = f"{folder}/{name}"
        if mask & _C.IN_ISDIR:
            if reserved_folder(path, self._root):
                return
            if self._recursive and mask & (_C.IN_CREATE | _C.IN_MOVED_TO):
                self._watch_tree(path)  # before the scan, so nothing lands unseen
                self._sink((path, DIRECTORY))
        elif mask & _C.IN_CLOSE_WRITE:
            self._sink((path, CLOSED))
        elif mask & _C.IN_MOVED_TO:
            self._sink((path, MOVED if event.cookie == self._last_from else CREATED))
        elif mask & _C.IN_CREATE:
            self._sink((path, CREATED))

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        self._dirs.pop(wd, None)  # a watched folder went away (or we stopped)

    def on_queue_overflow(self) -> None:
        log.warning("inotify queue overflowed; rescanning the inbox")
        self._sink((self._root, OVERFLOW))


def _limit(name: str) -> str:
    try:
        value = Path(f"/proc/sys/fs/inotify/{name}").read_text().strip()
    except OSError:
        value = "?"
    return f"fs.inotify.{name} = {value}"


def _instance_failed(e: OSError) -> str:
    if e.errno == errno.EMFILE:
        return (
            f"cannot watch the inbox: the inotify instance limit is reached "
            f"({_limit('max_user_instances')}); raise it, or use --poll"
        )
    return f"cannot watch the inbox: inotify_init: {os.strerror(e.errno or 0)}"


def _watch_failed(folder: str, e: int | None) -> str:
    if e == errno.ENOSPC:
        return (
            f"cannot watch {folder}: the inotify watch limit is reached "
            f"({_limit('max_user_watches')}); raise it, or use --poll"
        )
    return f"cannot watch {folder}: {os.strerror(e or 0)}"


def check_watchable(root: Path) -> None:
    """Raise WatchLimit unless inotify can watch `root` now (`run --check`)."""
    source = Inotify(root, False, lambda _: None, ignored_name)
    source.start()
    source.stop()
    source.join()
