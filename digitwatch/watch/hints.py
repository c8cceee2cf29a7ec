"""What an event says about a path's completeness: the words every event source hands on."""

from __future__ import annotations

from collections.abc import Callable

CLOSED = "closed"  # IN_CLOSE_WRITE: the writer is done
MOVED = "moved"  # renamed into place: the producer finished before renaming
CREATED = "created"  # ambiguous: a finished rename-in from outside, or a writer just started
SCAN = "scan"  # found by the backlog scan or a rescan
QUIET = "quiet"  # polling: only size+mtime stability can tell
DIRECTORY = "dir"  # a folder appeared (recursive mode): scan it
OVERFLOW = "overflow"  # the kernel dropped events: rescan the whole inbox now

# Where an event source puts each `(path, hint)`: the daemon's queue.
Sink = Callable[[tuple[str, str]], None]
