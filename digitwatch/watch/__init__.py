"""Which inbox files are candidates and when they are complete: the only watchdog user.

Layered as watchdog layers its own inotify support, one responsibility per module:

- `filters`: names that are never input, reserved folders, the path filter, the scan;
- `inotify`: the event source on Linux, a thread that turns kernel events into hints;
- `polling`: the fallback event source (network filesystems), watchdog's polling observer;
- `completeness`: when a candidate is complete (close, rename, lease, quiet period);
- `hints`: what an event says about completeness, the words the others share.

An event source does as little as possible: it turns an event into a `(path, hint)`
tuple and puts it on the daemon's queue. `Gate` then decides, in the daemon's thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from digitwatch.watch import inotify
from digitwatch.watch.completeness import Gate, writer_open
from digitwatch.watch.filters import (
    DEFAULT_IGNORE,
    RESERVED_FOLDERS,
    STATE_DIR,
    Filter,
    Ignore,
    ignored_name,
    scan,
)
from digitwatch.watch.hints import (
    CLOSED,
    CREATED,
    DIRECTORY,
    MOVED,
    OVERFLOW,
    QUIET,
    SCAN,
    Sink,
)
from digitwatch.watch.polling import polling_observer

__all__ = [
    "CLOSED",
    "CREATED",
    "DEFAULT_IGNORE",
    "DIRECTORY",
    "MOVED",
    "OVERFLOW",
    "QUIET",
    "RESERVED_FOLDERS",
    "SCAN",
    "STATE_DIR",
    "Filter",
    "Gate",
    "Ignore",
    "Sink",
    "Watcher",
    "check_watchable",
    "ignored_name",
    "scan",
    "writer_open",
]


class Watcher:
    """Owns the event source's thread(s); `alive()` is False once any of them has died."""

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
        self.filter = Filter(root, recursive, ignore)
        self._observer: Any
        if poll > 0:
            self._observer = polling_observer(root, self.filter, sink, poll)
        else:
            self._observer = inotify.Inotify(root, recursive, sink, ignore)

    def start(self) -> None:
        self._observer.start()

    def alive(self) -> bool:
        emitters = list(getattr(self._observer, "emitters", ()))
        return bool(self._observer.is_alive()) and all(e.is_alive() for e in emitters)

    def stop(self) -> None:
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=5.0)


def check_watchable(root: Path, *, poll: float) -> None:
    """Raise WatchLimit unless the event source can watch `root` now (`run --check`)."""
    if poll <= 0:  # polling needs no kernel resources
        inotify.check_watchable(root)
