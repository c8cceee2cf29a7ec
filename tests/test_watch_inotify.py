"""watch.inotify: the event source reports what decides completeness, for the inbox only."""

from __future__ import annotations

import os
import queue
from pathlib import Path

from daemon_helpers import wait_for

from digitwatch.watch import CLOSED, CREATED, DIRECTORY, MOVED, Watcher


def test_watcher_reports_rename_in_close_and_move(tmp_path: Path) -> None:
    inbox, staging = tmp_path / "in", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    q: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    w = Watcher(inbox, recursive=False, poll=0.0, sink=q.put)
    w.start()
    seen: list[tuple[str, str]] = []

    def got(item: tuple[str, str]) -> bool:
        while True:
            try:
                seen.append(q.get_nowait())
            except queue.Empty:
                return item in seen

    try:
        assert w.alive()
        (staging / "r.png").write_bytes(b"x")
        (staging / "r.png").rename(inbox / "r.png")
        wait_for(lambda: got((str(inbox / "r.png"), CREATED)), 5, "created")
        (inbox / "c.png").write_bytes(b"x")
        wait_for(lambda: got((str(inbox / "c.png"), CLOSED)), 5, "closed")
        (inbox / "m.png.part").write_bytes(b"x")
        (inbox / "m.png.part").rename(inbox / "m.png")
        wait_for(lambda: got((str(inbox / "m.png"), MOVED)), 5, "moved")
        (inbox / ".digitwatch").mkdir()
        (inbox / "m.png").rename(inbox / ".digitwatch" / "m.png")
        (inbox / "sub").mkdir()
        (inbox / "sub" / "s.png").write_bytes(b"x")
        (inbox / "z.png").write_bytes(b"x")
        wait_for(lambda: got((str(inbox / "z.png"), CLOSED)), 5, "closed")
    finally:
        w.stop()
    assert not w.alive()
    names = {Path(p).name for p, _ in seen}
    assert names == {"r.png", "c.png", "m.png", "z.png"}  # nothing from .digitwatch or sub/
    assert all(".part" not in p for p, _ in seen)


def test_recursive_watches_follow_new_and_renamed_folders_and_any_name(tmp_path: Path) -> None:
    q: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    w = Watcher(tmp_path, recursive=True, poll=0.0, sink=q.put)
    w.start()
    seen: list[tuple[str, str]] = []

    def got(item: tuple[str, str]) -> bool:
        while not q.empty():
            seen.append(q.get_nowait())
        return item in seen

    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1: not UTF-8, kept as surrogates
    try:
        (tmp_path / "sub").mkdir()
        wait_for(lambda: got((str(tmp_path / "sub"), DIRECTORY)), 5, "sub/")
        (tmp_path / "sub" / "a.png").write_bytes(b"x")
        wait_for(lambda: got((str(tmp_path / "sub" / "a.png"), CLOSED)), 5, "sub/a.png")
        # Renamed within the tree, the folder keeps its watch, now under its new name.
        (tmp_path / "sub").rename(tmp_path / "moved")
        wait_for(lambda: got((str(tmp_path / "moved"), DIRECTORY)), 5, "moved/")
        (tmp_path / "moved" / "b.png").write_bytes(b"x")
        wait_for(lambda: got((str(tmp_path / "moved" / "b.png"), CLOSED)), 5, "moved/b.png")
        (tmp_path / "moved" / odd).write_bytes(b"x")
        wait_for(lambda: got((str(tmp_path / "moved" / odd), CLOSED)), 5, "a non-UTF-8 name")
        assert w.alive()
    finally:
        w.stop()
    assert not w.alive()
