"""The service under hostile conditions: a full outbox, hostile files, odd names."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, csv_rows, digit_png, drop, results, wait_for
from test_daemon import assert_exactly_once, state

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
        assert d.has_event("outbox_writable")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, {"first.png", *names})
    assert not state(inbox, "work")


def _retried(d: DaemonProcess) -> bool:
    """True once the daemon has tried the held files again at least twice (3.5 s)."""
    first = next(e for e in d.events() if e.get("event") == "outbox_unwritable")
    t0 = dt.datetime.fromisoformat(str(first["timestamp"]))
    return (dt.datetime.now(dt.UTC) - t0).total_seconds() > 3.5


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_hostile_names_and_special_files_never_stop_the_service(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    inbox, outbox = folders
    outside = tmp_path / "secret.png"
    outside.write_bytes(digit_png(5))
    d = DaemonProcess(inbox, outbox)
    odd = [
        "with space.png",
        "ünïcödé-数字.png",
        'comma,and,quote".png',
        "new\nline.png",
        "-leading-dash.png",
        "semi;colon 'single'.png",
    ]
    try:
        d.wait_ready()
        os.mkfifo(inbox / "fifo.png")
        (inbox / "link.png").symlink_to(outside)
        (inbox / "folder.png").mkdir()
        for i, n in enumerate(odd):
            drop(inbox, n, digit_png(i))
        drop(inbox, "text.png", b"this is not an image\n")
        wait_for(lambda: len(csv_rows(outbox)) == len(odd) + 1, 15, "every odd name answered")
        drop(inbox, "after.png", digit_png(9))
        wait_for(lambda: len(csv_rows(outbox)) == len(odd) + 2, 5, "answered at once after")
        # The FIFO, the symlink and the folder are left in place, never opened or followed.
        assert (inbox / "fifo.png").exists() and (inbox / "link.png").is_symlink()
        assert (inbox / "folder.png").is_dir()
        assert outside.read_bytes() == digit_png(5)
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, {*odd, "text.png", "after.png"})
    by_input = {r["input"]: r for r in results(outbox)}
    assert by_input["text.png"]["status"] == "error"
    assert str(by_input["text.png"]["error"]).startswith("not an image in a supported format")
    assert all(by_input[n]["status"] == "ok" for n in odd)
    assert [p.name.split("~", 1)[1] for p in state(inbox, "failed")] == ["text.png"]
    shutil.rmtree(inbox / "folder.png")
