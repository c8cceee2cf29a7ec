"""Which files are candidates and when they are complete, without a daemon."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest
from daemon_helpers import wait_for

from digitwatch.watcher import (
    CLOSED,
    CREATED,
    MOVED,
    QUIET,
    SCAN,
    Gate,
    Ignore,
    Watcher,
    _Filter,
    ignored_name,
    scan,
    writer_open,
)


@pytest.mark.parametrize(
    "name",
    [
        ".hidden.png",
        "x.png.part",
        "x.tmp",
        "x.PART",
        "big.crdownload",
        "~$doc.png",
        ".syncthing.x.png.tmp",
        "Thumbs.db",
        ".DS_Store",
        ".digitwatch",
        "~syncthing~photo.jpg.tmp",
        "photo.jpg.partial",
        "@eaDir",
        "._photo.jpg",
        "Desktop.ini",
    ],
)
def test_temp_and_hidden_names_are_ignored(name: str) -> None:
    assert ignored_name(name)


@pytest.mark.parametrize("name", ["7.png", "scan 1.JPG", "a.part.png", "tmp.png"])
def test_ordinary_names_are_candidates(name: str) -> None:
    assert not ignored_name(name)


def test_extra_globs_add_to_the_defaults_case_insensitively(tmp_path: Path) -> None:
    ignore = Ignore(["*.raw", "scratch"])
    assert ignore("IMG_1.RAW") and ignore("Scratch") and ignore(".hidden.png")
    assert not ignore("IMG_1.jpg") and not ignored_name("IMG_1.RAW")
    for rel in ["a.png", "b.raw", "scratch/c.png", "sub/@eaDir/d.png", "sub/e.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = sorted(Path(p).name for p in scan(tmp_path, recursive=True, ignore=ignore))
    assert found == ["a.png", "e.png"]
    deep = _Filter(tmp_path, recursive=True, ignore=ignore)
    assert deep.relative(f"{tmp_path}/scratch/c.png") is None
    assert deep.relative(f"{tmp_path}/sub/x.RAW") is None
    assert deep.relative(f"{tmp_path}/sub/x.png") == "sub/x.png"


def test_filter_depth_and_state_folder(tmp_path: Path) -> None:
    flat, deep = _Filter(tmp_path, recursive=False), _Filter(tmp_path, recursive=True)
    assert flat.relative(f"{tmp_path}/a.png") == "a.png"
    assert flat.relative(f"{tmp_path}/sub/a.png") is None
    assert deep.relative(f"{tmp_path}/sub/a.png") == "sub/a.png"
    for f in (flat, deep):
        assert f.relative(f"{tmp_path}/.digitwatch/work/1/x~a.png") is None
        assert f.relative("/elsewhere/a.png") is None
    assert deep.relative(f"{tmp_path}/.cache/a.png") is None


def test_scan_skips_state_hidden_and_depth(tmp_path: Path) -> None:
    for rel in ["a.png", "b.part", ".digitwatch/work/x~c.png", "sub/d.png", ".h/e.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert sorted(Path(p).name for p in scan(tmp_path, recursive=False)) == ["a.png"]
    assert sorted(Path(p).name for p in scan(tmp_path, recursive=True)) == ["a.png", "d.png"]


def test_lease_probe_sees_an_open_writer(tmp_path: Path) -> None:
    path = tmp_path / "w.png"
    with path.open("wb") as f:
        f.write(b"half")
        assert writer_open(str(path)) is True
    assert writer_open(str(path)) is False


def test_gate_holds_a_file_being_written_until_its_close(tmp_path: Path) -> None:
    gate = Gate(quiet_period=0.05, use_leases=True)
    path = tmp_path / "w.png"
    with path.open("wb"):
        assert gate.offer(str(path), CREATED, time.monotonic(), 100.0) is None
        time.sleep(0.1)
        assert gate.due(time.monotonic()) == []  # still open: no quiet period applies
    assert gate.offer(str(path), CLOSED, time.monotonic(), 200.0) == 100.0
    assert not gate.pending


def test_gate_takes_a_finished_rename_in_at_once(tmp_path: Path) -> None:
    gate = Gate(quiet_period=10.0, use_leases=True)
    path = tmp_path / "r.png"
    path.write_bytes(b"data")
    assert gate.offer(str(path), CREATED, time.monotonic(), 5.0) == 5.0
    assert gate.offer(str(path), MOVED, time.monotonic(), 6.0) == 6.0


def test_gate_without_leases_waits_for_a_quiet_period(tmp_path: Path) -> None:
    gate = Gate(quiet_period=0.2, use_leases=False)
    path = tmp_path / "p.png"
    path.write_bytes(b"a")
    t0 = time.monotonic()
    assert gate.offer(str(path), QUIET, t0, 1.0) is None
    with path.open("ab") as f:
        f.write(b"b")  # changed within the quiet period: the clock restarts
    assert gate.due(t0 + 0.1) == []
    assert gate.due(t0 + 0.21) == []
    assert gate.due(t0 + 0.3) == []
    assert gate.due(t0 + 0.45) == [(str(path), 1.0)]


def test_gate_drops_a_file_that_vanished(tmp_path: Path) -> None:
    gate = Gate(quiet_period=0.01, use_leases=False)
    path = tmp_path / "gone.png"
    path.write_bytes(b"a")
    assert gate.offer(str(path), SCAN, 0.0, 1.0) is None
    path.unlink()
    assert gate.due(1.0) == [] and not gate.pending


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
