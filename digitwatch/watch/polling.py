"""The fallback event source for filesystems without inotify: watchdog's polling observer.

A poll sees only that a path appeared or changed, never that its writer closed it, so
every path goes on as QUIET and the gate waits for its size and mtime to hold still.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.polling import PollingObserver

from digitwatch.watch.filters import Filter
from digitwatch.watch.hints import DIRECTORY, QUIET, Sink


class _Handler(FileSystemEventHandler):
    def __init__(self, flt: Filter, sink: Sink) -> None:
        self._filter = flt
        self._sink = sink

    def dispatch(self, event: FileSystemEvent) -> None:
        # Overrides the base dispatch: one branch per event, no per-type method calls.
        kind = event.event_type
        if kind == "moved":
            path: Any = event.dest_path
        elif kind in ("created", "modified"):
            path = event.src_path
        else:
            return
        if not isinstance(path, str):
            path = os.fsdecode(path)
        if event.is_directory:
            if self._filter.recursive and self._filter.relative(path):
                self._sink((path, DIRECTORY))
            return
        if self._filter.relative(path) is not None:
            self._sink((path, QUIET))


def polling_observer(root: Path, flt: Filter, sink: Sink, interval: float) -> Any:
    """A polling observer over `root` (not started) that feeds `sink`."""
    observer = PollingObserver(timeout=interval)
    # Polling walks the tree each tick, so only walk what can hold input.
    observer.schedule(_Handler(flt, sink), str(root), recursive=flt.recursive)
    return observer
