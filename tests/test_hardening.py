"""The service under hostile conditions: a full outbox, hostile files, odd names."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import corpus
import numpy as np
import pytest
from daemon_helpers import (
    DaemonProcess,
    children,
    csv_rows,
    digit_png,
    drop,
    results,
    stage,
    wait_for,
)
from test_daemon import assert_exactly_once, state
from test_guarantees import read_trace, stop_traced, strace_usable, traced

pytestmark = pytest.mark.slow


@pytest.fixture
def small_outbox(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs as the outbox, so it can really fill up (root only)."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "dwtest", str(outbox)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield outbox
    finally:
        subprocess.run(["umount", "-l", str(outbox)], check=False)


def _fill(folder: Path) -> Path:
    """Take every free byte of the filesystem holding `folder`; returns the filler file."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_outbox_keeps_the_inputs_and_catches_up(tmp_path: Path, small_outbox: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outbox = small_outbox
    d = DaemonProcess(inbox, outbox, log=tmp_path / "daemon.log")
    try:
        d.wait_ready()
        drop(inbox, "first.png", digit_png(0))
        wait_for(lambda: len(csv_rows(outbox)) == 1, 10, "the first answer")
        filler = _fill(outbox)
        names = [f"f{i:02d}.png" for i in range(12)]
        for i, n in enumerate(names):
            drop(inbox, n, digit_png(i))
        wait_for(lambda: d.has_event("outbox_unwritable"), 10, "the failure logged")
        # Several retries (0.5, 1, 2 s apart) while the disk stays full.
        wait_for(lambda: False if d.proc.poll() else _retried(d), 10, "retries")
        assert d.proc.poll() is None, "the service stays up"
        held = {p.name.split("~", 1)[1] for p in state(inbox, "work")}
        waiting = held | {p.name for p in inbox.iterdir() if p.is_file()}
        assert waiting == set(names), "every input is kept, claimed or in the inbox"
        archived = [p.name.split("~", 1)[1] for p in state(inbox, "processed")]
        assert archived == ["first.png"], "nothing archived unanswered"
        assert [r["input"] for r in csv_rows(outbox)] == ["first.png"], "no partial rows"
        assert not [p for p in outbox.iterdir() if p.name.startswith(".tmp-")]
        assert sum(e.get("event") == "outbox_unwritable" for e in d.events()) == 1
        filler.unlink()
        wait_for(lambda: len(csv_rows(outbox)) == len(names) + 1, 20, "catching up")
        # Logged just after the rows it announces are appended: wait, do not peek.
        wait_for(lambda: d.has_event("outbox_writable"), 10, "the recovery logged")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, {"first.png", *names})
    assert not state(inbox, "work")


def test_nothing_new_is_claimed_while_results_cannot_be_written(
    tmp_path: Path, small_outbox: Path
) -> None:
    """A held daemon leaves new files in the inbox, where a healthy peer can take them."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outbox = small_outbox
    d = DaemonProcess(inbox, outbox, log=tmp_path / "daemon.log")
    try:
        d.wait_ready()
        filler = _fill(outbox)
        drop(inbox, "held.png", digit_png(1))
        wait_for(lambda: d.has_event("outbox_unwritable"), 10, "the failure logged")
        drop(inbox, "late.png", digit_png(2))
        # Several retries (0.5, 1, 2 s apart) while the disk stays full.
        wait_for(lambda: False if d.proc.poll() else _retried(d), 10, "retries")
        assert (inbox / "late.png").exists(), "claimed while results could not be written"
        filler.unlink()
        wait_for(lambda: len(csv_rows(outbox)) == 2, 20, "catching up")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, {"held.png", "late.png"})


def test_retries_of_a_held_batch_back_off(tmp_path: Path, small_outbox: Path) -> None:
    """While the disk is full the held batch is tried again after 0.5 s, then 1, 2, 4 s:
    each try writes the file's JSON, which strace sees as one more open of a temp file."""
    reason = strace_usable()
    if reason is not None:
        pytest.skip(reason)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outbox = small_outbox
    trace = tmp_path / "trace.txt"
    d = DaemonProcess(inbox, outbox, log=tmp_path / "daemon.log", prefix=traced(trace))
    try:
        d.wait_ready(deadline=60)
        filler = _fill(outbox)
        drop(inbox, "held.png", digit_png(1))
        wait_for(lambda: d.has_event("outbox_unwritable"), 20, "the failure logged")
        t0 = time.monotonic()
        # Tries at 0, 0.5, 1.5 and 3.5 s; the next would be at 7.5 s.
        wait_for(lambda: time.monotonic() - t0 > 5.5, 10, "5.5 s of a full disk")
        tries = [
            c
            for c in read_trace(trace)
            if c.name == "openat" and any("/.tmp-" in p for p in c.paths)
        ]
        filler.unlink()
        wait_for(lambda: len(csv_rows(outbox)) == 1, 20, "caught up")
    finally:
        code = stop_traced(d)
    assert code == 0, d.log.read_text()
    assert 3 <= len(tries) <= 5, f"{len(tries)} tries in 5.5 s"


def _retried(d: DaemonProcess) -> bool:
    """True once the daemon has tried the held files again at least twice (3.5 s)."""
    first = next(e for e in d.events() if e.get("event") == "outbox_unwritable")
    t0 = dt.datetime.fromisoformat(str(first["timestamp"]))
    return (dt.datetime.now(dt.UTC) - t0).total_seconds() > 3.5


def _odd_formats() -> dict[str, bytes]:
    """Valid but unusual files: each must be classified, not refused."""
    rng = np.random.default_rng(0)
    d28 = np.zeros((28, 28), np.uint8)
    d28[6:8, 8:21] = 255
    for y in range(8, 23):  # a 7: a bar and a slanted stem
        d28[y, 19 - (y - 8) // 2 : 21 - (y - 8) // 2] = 255
    return {
        "sixteen-bit.png": corpus.png_16bit(d28, rng),
        "alpha-only.png": corpus.alpha_only(d28, rng),
        "scan.bmp": corpus.bmp(d28, rng),
        "scan.tiff": corpus.tiff(d28, rng),
        "drawing.webp": corpus.webp(d28, rng),
        "really-a-webp.png": corpus.webp(d28, rng),
        "mnist.png": corpus.mnist_28(d28, rng),
    }


def _tree_peak_rss_mb(pid: int) -> float:
    def hwm(p: int) -> int:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    return sum(hwm(p) for p in [pid, *children(pid)]) / 1024


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_hostile_files_and_names_never_stop_the_service(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    inbox, outbox = folders
    outside = tmp_path / "secret.png"
    outside.write_bytes(digit_png(5))
    hostile = {f"{k}.png": v for k, v in corpus.hostile().items()}
    odd_formats = _odd_formats()
    odd_names = [
        "with space.png",
        "ünïcödé-数字.png",
        'comma,and,quote".png',
        "new\nline.png",
        "-leading-dash.png",
        "semi;colon 'single'.png",
    ]
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        os.mkfifo(inbox / "fifo.png")
        (inbox / "link.png").symlink_to(outside)
        (inbox / "folder.png").mkdir()
        with (inbox.parent / "huge.png").open("wb") as f:
            f.truncate(120 * 1024 * 1024)  # sparse: over the 50 MB limit, never read
        (inbox.parent / "huge.png").rename(inbox / "huge.png")
        for name, data in {**hostile, **odd_formats}.items():
            drop(inbox, name, data)
        for i, n in enumerate(odd_names):
            drop(inbox, n, digit_png(i))
        total = len(hostile) + len(odd_formats) + len(odd_names) + 1
        wait_for(lambda: len(csv_rows(outbox)) == total, 30, "every file answered")
        t0 = time.monotonic()
        drop(inbox, "after.png", digit_png(9))
        wait_for(lambda: len(csv_rows(outbox)) == total + 1, 5, "answered at once after")
        assert time.monotonic() - t0 < 2, "the service is responsive after the hostile files"
        # The FIFO, the symlink and the folder are left in place, never opened or followed.
        assert (inbox / "fifo.png").exists() and (inbox / "link.png").is_symlink()
        assert (inbox / "folder.png").is_dir()
        assert outside.read_bytes() == digit_png(5)
        assert _tree_peak_rss_mb(d.proc.pid) < 1024
    finally:
        assert d.stop() == 0, d.log.read_text()
    errors = {*hostile, "huge.png"}
    assert_exactly_once(outbox, {*errors, *odd_formats, *odd_names, "after.png"})
    by_input = {str(r["input"]): r for r in results(outbox)}
    for name in errors:
        r = by_input[name]
        assert r["status"] == "error", (name, r)
        message = str(r["error"])
        assert message and "Traceback" not in message and len(message) < 200, (name, message)
    assert "over the limit" in str(by_input["huge.png"]["error"])
    for name in [*odd_formats, *odd_names, "after.png"]:
        assert by_input[name]["status"] == "ok", (name, by_input[name])
    failed = {p.name.split("~", 1)[1] for p in state(inbox, "failed")}
    assert failed == errors, "every broken file is kept, in failed/"
    assert by_input["new\nline.png"]["input"] == "new\nline.png"
    rows = {r["input"] for r in csv_rows(outbox)}
    assert 'comma,and,quote".png' in rows and "new\nline.png" in rows, "RFC 4180 quoting"
    shutil.rmtree(inbox / "folder.png")


def test_an_event_storm_beyond_the_inotify_queue_is_answered_once(
    folders: tuple[Path, Path],
) -> None:
    """50,000 files at once: inotify drops events past its queue and a rescan finds them."""
    inbox, outbox = folders
    n = 50_000
    queue_max = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    assert n > queue_max, "the storm must overflow the queue to test anything"
    data = digit_png(3)
    names = [f"s{i:05d}.png" for i in range(n)]
    staging = stage(inbox, dict.fromkeys(names, data))
    # The periodic rescan an hour away: only the rescan that the overflow triggers can
    # find the files whose events were dropped.
    d = DaemonProcess(inbox, outbox, "--rescan-interval", "3600")
    try:
        d.wait_ready()
        # Stopped, the daemon reads no event while they pile up: the queue overflows.
        d.signal(signal.SIGSTOP)
        try:
            for name in names:
                (staging / name).rename(inbox / name)
        finally:
            d.signal(signal.SIGCONT)
        wait_for(lambda: _csv_count(outbox) >= n, 240, "every file answered")
        wait_for(lambda: not state(inbox, "work"), 10, "nothing left claimed")
    finally:
        assert d.stop(30) == 0, d.log.read_text()[-2000:]
    assert "overflowed" in d.log.read_text(), "the queue did overflow"
    rows = csv_rows(outbox)
    assert sorted(r["input"] for r in rows) == names, "each file once in the CSV"
    jsons = [p for p in outbox.iterdir() if p.name.endswith(".json")]
    assert len(jsons) == n
    assert len({p.name.split(".", 1)[0] for p in jsons}) == n


def _csv_count(outbox: Path) -> int:
    try:
        with (outbox / "results.csv").open("rb") as f:
            return max(0, sum(1 for _ in f) - 1)
    except FileNotFoundError:
        return 0


def test_a_vanished_outbox_holds_the_files_until_it_is_back(folders: tuple[Path, Path]) -> None:
    """An unmounted share: nothing is written elsewhere, nothing lost, caught up after."""
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox, log=inbox.parent / "daemon.log")
    try:
        d.wait_ready()
        outbox.rmdir()
        names = [f"v{i}.png" for i in range(5)]
        for i, n in enumerate(names):
            drop(inbox, n, digit_png(i))
        wait_for(lambda: d.has_event("outbox_unwritable"), 10, "the failure logged")
        assert not outbox.exists(), "the outbox is not recreated behind the user's back"
        assert d.proc.poll() is None
        outbox.mkdir()
        wait_for(lambda: len(csv_rows(outbox)) == len(names), 20, "caught up")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, set(names))


def test_a_read_only_outbox_holds_the_files_until_it_is_writable(
    tmp_path: Path, small_outbox: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outbox = small_outbox
    d = DaemonProcess(inbox, outbox, log=tmp_path / "daemon.log")
    remount = ["mount", "-o", "remount,{}", "dwtest", str(outbox)]
    try:
        d.wait_ready()
        drop(inbox, "first.png", digit_png(0))
        # Archived means settled: results.csv is closed again, and a remount to read-only
        # fails with EBUSY while a file is open for writing on it.
        wait_for(lambda: len(state(inbox, "processed")) == 1, 10, "the first answer settled")
        subprocess.run([a.format("ro") for a in remount], check=True)
        names = [f"r{i}.png" for i in range(6)]
        for i, n in enumerate(names):
            drop(inbox, n, digit_png(i))
        wait_for(lambda: d.has_event("outbox_unwritable"), 10, "the failure logged")
        event = next(e for e in d.events() if e.get("event") == "outbox_unwritable")
        assert "Read-only" in str(event["error"]), event
        assert d.proc.poll() is None
        subprocess.run([a.format("rw") for a in remount], check=True)
        wait_for(lambda: len(csv_rows(outbox)) == len(names) + 1, 20, "caught up")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, {"first.png", *names})
