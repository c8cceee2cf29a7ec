"""The event source on Linux: one thread reading the kernel's inotify events for the inbox.

We read the kernel's events ourselves instead of through watchdog's observer: watchdog
passes each event through three threads and two queues and pairs every IN_MOVED_FROM
with its IN_MOVED_TO by a linear search of a delay queue, ~400 us of CPU per file in a
5,000-file burst (benchmarks/profile_daemon.py), more than everything else the daemon
does. This reader asks the kernel only for what decides completeness, only for the inbox
(not `.digitwatch/`), and never holds an event back, so a claim (a rename out of the
watched folders) costs one event and no delay.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import threading
from pathlib import Path
from typing import Any

from digitwatch.errors import WatchLimit
from digitwatch.watch.filters import Ignore, reserved_folder
from digitwatch.watch.hints import CLOSED, CREATED, DIRECTORY, MOVED, OVERFLOW, Sink

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


class Inotify(threading.Thread):
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
                if reserved_folder(entry.path, self._root):
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
                if reserved_folder(path, self._root):
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


def check_watchable(root: Path) -> None:
    """Raise WatchLimit unless inotify can watch `root` now (`run --check`)."""
    libc = _libc()
    fd = _new_instance(libc)
    try:
        if libc.inotify_add_watch(fd, os.fsencode(root), _MASK) < 0:
            _watch_failed(str(root), ctypes.get_errno())
    finally:
        os.close(fd)
