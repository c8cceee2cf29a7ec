"""watch.inotify: the event source reports what decides completeness, for the inbox only."""

from __future__ import annotations

import queue
from pathlib import Path

from daemon_helpers import wait_for

from digitwatch.watch import CLOSED, CREATED, MOVED, Watcher


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
