"""watch.polling: the fallback source hands every candidate on as QUIET, one poll later."""

from __future__ import annotations

import queue
from pathlib import Path

from daemon_helpers import wait_for

from digitwatch.watch import DIRECTORY, QUIET, Watcher


def test_polling_reports_files_as_quiet_and_new_folders(tmp_path: Path) -> None:
    q: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    w = Watcher(tmp_path, recursive=True, poll=0.05, sink=q.put)
    w.start()
    seen: list[tuple[str, str]] = []

    def got(item: tuple[str, str]) -> bool:
        while not q.empty():
            seen.append(q.get_nowait())
        return item in seen

    try:
        assert w.alive()
        (tmp_path / "x.png.part").write_bytes(b"x")
        (tmp_path / ".digitwatch").mkdir()
        (tmp_path / ".digitwatch" / "y.png").write_bytes(b"x")
        (tmp_path / "a.png").write_bytes(b"x")
        wait_for(lambda: got((str(tmp_path / "a.png"), QUIET)), 5, "a.png")
        (tmp_path / "sub").mkdir()
        wait_for(lambda: got((str(tmp_path / "sub"), DIRECTORY)), 5, "sub/")
        (tmp_path / "sub" / "b.png").write_bytes(b"x")
        wait_for(lambda: got((str(tmp_path / "sub" / "b.png"), QUIET)), 5, "sub/b.png")
    finally:
        w.stop()
    assert not w.alive()
    assert {Path(p).name for p, _ in seen} == {"a.png", "sub", "b.png"}
    assert {h for p, h in seen if not p.endswith("sub")} == {QUIET}
