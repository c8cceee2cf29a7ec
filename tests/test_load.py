"""Under load: large valid images against the watchdog, the memory budget and the stop bound.

Every test runs the real daemon on a backlog of 36-megapixel 16-bit RGBA PNGs (1.3 MB
each, ~1.2 s to decode on an idle core, 288 MB of pixels): the files the issue found
the service mishandling.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import (
    DaemonProcess,
    children,
    csv_rows,
    digit_png,
    drop,
    results,
    rgba16_png,
    stage,
    wait_for,
)


@pytest.fixture(scope="session")
def big_png() -> bytes:
    return rgba16_png(6000, 6000)  # 36 MP


class NotifyListener:
    """A NOTIFY_SOCKET for the daemon: every datagram's fields, with when it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, list[str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))

    def times(self, field: str) -> list[float]:
        with self._lock:
            return [t for t, fields in self.messages if field in fields]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def backlog(inbox: Path, data: bytes, n: int) -> list[str]:
    """`n` copies of `data` renamed into the inbox at once (before the daemon starts)."""
    names = [f"big{i:02d}.png" for i in range(n)]
    staging = stage(inbox, dict.fromkeys(names, data))
    for name in names:
        (staging / name).rename(inbox / name)
    return names


WATCHDOG_USEC = 3_000_000  # a ping due every 1.5 s


def test_slow_batches_of_large_images_keep_the_watchdog_fed(
    folders: tuple[Path, Path], notify: NotifyListener, big_png: bytes
) -> None:
    """Thirty 36 MP PNGs in batches of four: each batch takes seconds and three are in
    flight, so the main loop waits on the workers far longer than a ping interval. Files
    keep finishing, so no gap between pings may come near WATCHDOG_USEC (systemd's kill).
    A 10 s period here: one decode step is the heartbeat's grain, and on a loaded machine
    one 36 MP decode took over 3 s."""
    usec = 10_000_000  # a ping due every 5 s
    inbox, outbox = folders
    names = backlog(inbox, big_png, 30)  # 20 took 19 s on a quiet machine: too quick to tell
    d = DaemonProcess(
        inbox,
        outbox,
        "--batch-size",
        "4",
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(usec)},
    )
    try:
        wait_for(lambda: bool(notify.times("READY=1")), 20, "READY=1")
        start = notify.times("READY=1")[0]
        wait_for(lambda: len(csv_rows(outbox)) == len(names), 240, "every file answered")
        end = time.monotonic()
        pings = [t for t in notify.times("WATCHDOG=1") if start <= t <= end]
        # The whole backlog took several ping intervals; a ping at least every 5 s plus
        # scheduling slack, never the 10 s after which systemd kills.
        assert end - start > 2 * usec / 1e6, "the backlog was too quick to tell"
        gaps = [round(b - a, 2) for a, b in itertools.pairwise([start, *pings, end])]
        assert max(gaps) < 0.75 * usec / 1e6, gaps
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert sorted(str(r["input"]) for r in results(outbox)) == names
    assert {r["status"] for r in results(outbox)} == {"ok"}


def test_a_stopped_worker_on_a_large_image_stops_the_pings(
    folders: tuple[Path, Path], notify: NotifyListener, big_png: bytes
) -> None:
    """One worker SIGSTOPped mid-backlog: the other finishes what it can, then no file
    moves, and the pings must stop for longer than WATCHDOG_USEC (systemd would restart
    the service). Continued, the worker finishes and the pings come back."""
    inbox, outbox = folders
    names = backlog(inbox, big_png, 4)
    d = DaemonProcess(
        inbox,
        outbox,
        "--batch-size",
        "2",
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )
    stopped: list[int] = []
    try:
        wait_for(lambda: bool(notify.times("READY=1")), 20, "READY=1")
        stopped = children(d.proc.pid)[:1]
        os.kill(stopped[0], signal.SIGSTOP)
        sent = time.monotonic()

        def silent_for_a_period() -> bool:
            last = max([sent, *notify.times("WATCHDOG=1")])
            return time.monotonic() - last > WATCHDOG_USEC / 1e6 + 0.5

        wait_for(silent_for_a_period, 60, "the pings to stop")
        assert len(csv_rows(outbox)) < len(names)
        os.kill(stopped[0], signal.SIGCONT)
        stopped = []
        resumed = time.monotonic()
        wait_for(lambda: len(csv_rows(outbox)) == len(names), 120, "every file answered")
        wait_for(lambda: any(t > resumed for t in notify.times("WATCHDOG=1")), 10, "pings")
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        assert d.stop() == 0, d.log.read_text()
    assert sorted(str(r["input"]) for r in results(outbox)) == names


def pss_mb(pid: int) -> float:
    """Proportional set size of `pid` (shared pages split among sharers), 0 once gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def test_workers_on_large_images_stay_under_the_units_memory_limit(
    folders: tuple[Path, Path], big_png: bytes
) -> None:
    """A backlog of 36 MP 16-bit RGBA PNGs with two workers: the daemon and its workers
    together (PSS summed: what the unit's cgroup charges) stay well under MemoryMax=1G.
    Each such decode takes ~620 MB, so the shared decode budget lets one run at a time."""
    inbox, outbox = folders
    names = backlog(inbox, big_png, 4)
    d = DaemonProcess(inbox, outbox, "--batch-size", "2")
    peak = 0.0
    try:
        d.wait_ready(20)
        end = time.monotonic() + 120
        while len(csv_rows(outbox)) < len(names) and time.monotonic() < end:
            pids = [d.proc.pid, *children(d.proc.pid)]
            peak = max(peak, sum(pss_mb(p) for p in pids))
            time.sleep(0.02)
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert {r["status"] for r in results(outbox)} == {"ok"}, results(outbox)
    assert len(results(outbox)) == len(names)
    assert peak < 850, f"peak PSS of the daemon and its workers: {peak:.0f} MB"


def test_an_image_over_the_decode_budget_gets_an_error_record(
    folders: tuple[Path, Path], big_png: bytes
) -> None:
    inbox, outbox = folders
    backlog(inbox, big_png, 1)
    d = DaemonProcess(inbox, outbox, "--max-decode-mb", "200")
    try:
        d.wait_ready(20)
        wait_for(lambda: len(csv_rows(outbox)) == 1, 20, "the answer")
    finally:
        assert d.stop() == 0, d.log.read_text()
    (record,) = results(outbox)
    assert record["status"] == "error"
    assert record["error"] == (
        "PNG is 6000x6000 pixels: decoding would take ~584 MB, over the 200 MB decode "
        "budget (--max-decode-mb)"
    )
    assert [p.name.split("~", 1)[1] for p in (inbox / ".digitwatch" / "failed").iterdir()] == [
        "big00.png"
    ]


def test_sigterm_on_a_large_image_backlog_stops_within_the_bound(
    folders: tuple[Path, Path], notify: NotifyListener, big_png: bytes
) -> None:
    """SIGTERM with three batches of 36 MP PNGs in flight (~15 s of work): STOPPING=1 at
    once, exit 0 within the README's 10 s (the unit's TimeoutStopSec is 15); what was not
    finished stays claimed, and the next start answers every file exactly once."""
    inbox, outbox = folders
    names = backlog(inbox, big_png, 18)
    env = {"NOTIFY_SOCKET": str(notify.path)}
    d = DaemonProcess(inbox, outbox, "--batch-size", "6", env=env)
    try:
        d.wait_ready(20)
        wait_for(lambda: not list(inbox.glob("*.png")), 10, "the backlog claimed")
        sent = time.monotonic()
        d.signal(signal.SIGTERM)
        code = d.proc.wait(15)
        took = time.monotonic() - sent
    finally:
        d.close()
    assert code == 0, d.log.read_text()
    assert took < 10, f"stop took {took:.1f} s"
    stopping = [t for t in notify.times("STOPPING=1") if t >= sent]
    assert stopping and stopping[0] - sent < 1.0
    assert d.has_event("stop_left_claimed")
    assert len(csv_rows(outbox)) < len(names)

    again = DaemonProcess(inbox, outbox, "--batch-size", "6")
    try:
        again.wait_ready(20)
        wait_for(lambda: len(csv_rows(outbox)) >= len(names), 120, "every file answered")
    finally:
        assert again.stop() == 0, again.log.read_text()
    assert sorted(r["input"] for r in csv_rows(outbox)) == names
    assert sorted(str(r["input"]) for r in results(outbox)) == names
    assert {r["status"] for r in results(outbox)} == {"ok"}
    assert not [p.name for p in outbox.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("stop_signal", [signal.SIGHUP, signal.SIGQUIT])
def test_other_signals_have_a_meaning_and_never_kill_by_default(
    folders: tuple[Path, Path], notify: NotifyListener, stop_signal: signal.Signals
) -> None:
    """SIGUSR1 logs the state, SIGUSR2 is ignored, by the daemon and by its workers (a
    signal to the whole group reaches them too); SIGHUP and SIGQUIT stop the service as
    SIGTERM does: STOPPING=1, exit 0."""
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox, env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        d.wait_ready()
        workers = children(d.proc.pid)
        assert len(workers) == 2
        for pid in [d.proc.pid, *workers]:
            os.kill(pid, signal.SIGUSR1)
            os.kill(pid, signal.SIGUSR2)
        wait_for(lambda: d.has_event("status"), 5, "the status event")
        (status,) = [e for e in d.events() if e.get("event") == "status"]
        assert status["status"] == "0 ok, 0 no digit, 0 errors; 0 waiting"
        drop(inbox, "after.png", digit_png(1))
        wait_for(lambda: len(csv_rows(outbox)) == 1, 10, "an answer after the signals")
        assert d.proc.poll() is None and children(d.proc.pid) == workers
        d.signal(stop_signal)
        assert d.proc.wait(10) == 0, d.log.read_text()
    finally:
        d.close()
    assert notify.times("STOPPING=1")
    assert d.has_event("stopped")
