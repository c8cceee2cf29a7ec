"""End-to-end: the real daemon as a subprocess, waiting on conditions with deadlines."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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

from digitwatch.errors import ExitCode, WatcherDied
from digitwatch.results import CSV_COLUMNS, Record
from digitwatch.sdnotify import Notifier
from digitwatch.service import Daemon
from digitwatch.service.outbox import Results
from digitwatch.settings import Settings

pytestmark = pytest.mark.slow


def assert_exactly_once(outbox: Path, names: set[str]) -> None:
    """Every input has one JSON and one CSV row, and they describe the same answer."""
    jsons = results(outbox)
    rows = csv_rows(outbox)
    by_json = collections.Counter(str(r["input"]) for r in jsons)
    by_row = collections.Counter(r["input"] for r in rows)
    assert by_json == collections.Counter(names), f"JSON results: {by_json}"
    assert by_row == collections.Counter(names), f"CSV rows: {by_row}"
    assert {(r["input"], r["processed_at"]) for r in jsons} == {
        (r["input"], r["processed_at"]) for r in rows
    }
    header = (outbox / "results.csv").read_text().splitlines()[0]
    assert header == ",".join(CSV_COLUMNS)


def state(inbox: Path, folder: str) -> list[Path]:
    root = inbox / ".digitwatch" / folder
    return [p for p in root.rglob("*") if p.is_file() and p.name != ".lock"]


def test_rename_in_slow_copy_and_part_each_answered_once_and_whole(
    folders: tuple[Path, Path],
) -> None:
    inbox, outbox = folders
    # A short quiet period: without the writer check, the paused slow copy would be read.
    d = DaemonProcess(inbox, outbox, "--quiet-period", "0.4")
    try:
        d.wait_ready()
        renamed = digit_png(1)
        drop(inbox, "renamed.png", renamed)

        slow = digit_png(2)
        with (inbox / "slow.png").open("wb") as f:
            f.write(slow[:20])
            f.flush()
            wait_for(
                lambda: any(r["input"] == "renamed.png" for r in csv_rows(outbox)),
                5,
                "the rename-in answered",
            )
            time.sleep(1.2)  # the writer pauses for three quiet periods mid-file
            assert not any(r["input"] == "slow.png" for r in results(outbox))
            f.write(slow[20:])

        part = digit_png(3)
        with (inbox / "partial.png.part").open("wb") as f:
            f.write(part[:30])
            f.flush()
            time.sleep(0.6)
            f.write(part[30:])
        (inbox / "partial.png.part").rename(inbox / "partial.png")

        # Never inputs: a text file posing as PNG is answered with an error record;
        # hidden and temporary names, FIFOs and symlinks are left alone.
        (inbox / "notes.png").write_text("not an image")
        (inbox / ".hidden.png").write_bytes(renamed)
        (inbox / "download.crdownload").write_bytes(renamed)
        os.mkfifo(inbox / "pipe.png")
        long_name = "l" * 230 + ".png"  # fits the inbox, not "<name>.<claim>.json"
        (inbox / long_name).write_bytes(renamed)
        (inbox / "link.png").symlink_to(inbox.parent / "staging" / "renamed.png")
        names = {"renamed.png", "slow.png", "partial.png", "notes.png"}
        wait_for(lambda: len(csv_rows(outbox)) >= len(names), 10, "four answers")
        wait_for(
            lambda: sum(e.get("event") == "skipped" for e in d.events()) >= 3,
            5,
            "skip logs for the FIFO, the symlink and the long name",
        )
    finally:
        assert d.stop() == 0
    assert_exactly_once(outbox, names)
    by_name = {r["input"]: r for r in results(outbox)}
    for name, data in (("renamed.png", renamed), ("slow.png", slow), ("partial.png", part)):
        assert by_name[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert by_name[name]["status"] == "ok"
    assert by_name["notes.png"]["status"] == "error"
    for r in results(outbox):
        assert str(r["detected_at"]).endswith("+00:00") and r["processed_at"] >= r["detected_at"]
    assert [p.name.split("~")[1] for p in state(inbox, "failed")] == ["notes.png"]
    assert len(state(inbox, "processed")) == 3 and not state(inbox, "work")
    left = {p.name for p in inbox.iterdir()}
    never = {".hidden.png", "download.crdownload", "pipe.png", "link.png", long_name}
    assert left == never | {".digitwatch"}
    skipped = {e["input"] for e in d.events() if e.get("event") == "skipped"}
    assert skipped == {"pipe.png", "link.png", long_name}
    # One log event per image, with the answer it gave.
    images = [e for e in d.events() if e.get("event") == "image"]
    assert sorted(str(e["input"]) for e in images) == sorted(names)
    for e in images:
        answer = by_name[str(e["input"])]
        assert e["level"] == "info" and str(e["timestamp"]).endswith("Z"), e
        assert (e["status"], e["digit"], e["confidence"]) == (
            answer["status"],
            answer["digit"],
            answer["confidence"],
        )
        assert e["ms"] == answer["elapsed_ms"] and e["error"] == answer["error"]
    assert d.has_event("batch")


def test_same_name_twice_gives_two_results(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        drop(inbox, "again.png", digit_png(1))
        wait_for(lambda: len(csv_rows(outbox)) == 1, 5, "first answer")
        drop(inbox, "again.png", digit_png(2, blank=True))
        wait_for(lambda: len(csv_rows(outbox)) == 2, 5, "second answer")
    finally:
        assert d.stop() == 0
    answers = results(outbox)
    assert [r["input"] for r in answers] == ["again.png", "again.png"]
    assert {r["status"] for r in answers} == {"ok", "no_digit"}
    assert len(state(inbox, "processed")) == 2


def test_backlog_at_start_then_sigterm_drains_and_restart_finishes(
    folders: tuple[Path, Path],
) -> None:
    inbox, outbox = folders
    names = {f"b{i:03d}.png" for i in range(300)}
    for n in names:
        (inbox / n).write_bytes(digit_png(len(n)))
    d = DaemonProcess(inbox, outbox, "--batch-size", "16")
    d.wait_ready()
    wait_for(lambda: len(csv_rows(outbox)) >= 16, 10, "the backlog is being answered")
    t0 = time.monotonic()
    assert d.stop(deadline=10) == 0
    assert time.monotonic() - t0 < 10
    answered = {r["input"] for r in csv_rows(outbox)}
    # Stopped mid-backlog: what was claimed was finished, the rest is still in the inbox.
    assert answered and not state(inbox, "work")
    assert answered | {p.name for p in inbox.glob("*.png")} == names
    assert d.has_event("stopped")

    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        wait_for(lambda: len(csv_rows(outbox)) >= len(names), 20, "the rest of the backlog")
    finally:
        assert d.stop() == 0
    assert_exactly_once(outbox, names)


def test_sigkill_during_burst_then_restart_answers_each_exactly_once(
    folders: tuple[Path, Path],
) -> None:
    inbox, outbox = folders
    names = [f"k{i:03d}.png" for i in range(400)]
    staging = stage(inbox, {n: digit_png(i, blank=i % 7 == 0) for i, n in enumerate(names)})
    kills = 0
    for round_ in range(2):
        d = DaemonProcess(inbox, outbox, "--batch-size", "8")
        d.wait_ready()
        if round_ == 0:
            for n in names:
                (staging / n).rename(inbox / n)
        # Kill at a moment the daemon is mid-burst: some answered, most not.
        target = 40 + 120 * round_
        wait_for(lambda t=target: len(csv_rows(outbox)) >= t, 15, f"{target} answers")
        # Aim for the middle of a batch: claimed files sitting in the work folder.
        wait_for(lambda: bool(state(inbox, "work")), 5, "a batch in hand")
        d.kill()
        kills += 1
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        wait_for(lambda: len(csv_rows(outbox)) >= len(names), 30, "every input answered")
        wait_for(lambda: not state(inbox, "work"), 5, "the work area emptied")
    finally:
        assert d.stop() == 0
    assert kills == 2
    assert_exactly_once(outbox, set(names))
    assert len(state(inbox, "processed")) == len(names)
    assert not list(inbox.glob("*.png"))


def test_two_daemons_on_one_inbox_never_answer_twice(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    names = [f"t{i:03d}.png" for i in range(400)]
    staging = stage(inbox, {n: digit_png(i) for i, n in enumerate(names)})
    a = DaemonProcess(inbox, outbox, "--batch-size", "4")
    b = DaemonProcess(inbox, outbox, "--batch-size", "4")
    try:
        a.wait_ready()
        b.wait_ready()
        for n in names:
            (staging / n).rename(inbox / n)
        wait_for(lambda: len(csv_rows(outbox)) >= len(names), 30, "every input answered")
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    assert_exactly_once(outbox, set(names))
    # Every line is a whole row: rows from the two writers never interleave.
    for line in (outbox / "results.csv").read_bytes().split(b"\r\n")[1:-1]:
        assert line.count(b",") >= len(CSV_COLUMNS) - 1, line


def _dead_peer_claim(inbox: Path, claim_id: str, name: str, data: bytes) -> Path:
    peer = inbox / ".digitwatch" / "work" / "999999-dead00"
    peer.mkdir(parents=True, exist_ok=True)
    (peer / ".lock").touch()
    claimed = peer / f"{claim_id}~{name}"
    claimed.write_bytes(data)
    return claimed


def test_recovers_a_dead_daemons_claims(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    # Crash after its JSON was written but before its CSV row: only the row is added.
    _dead_peer_claim(inbox, "0001-aa0", "had_json.png", digit_png(1))
    record = Record(
        input="had_json.png",
        sha256="x",
        status="ok",
        digit=1,
        confidence=0.9,
        uncertain=False,
        probabilities=None,
        error=None,
        model="m",
        width=28,
        height=28,
        elapsed_ms=1.0,
        detected_at="2026-01-01T00:00:00.000000+00:00",
        processed_at="2026-01-01T00:00:01.000000+00:00",
    )
    (outbox / "had_json.png.0001-aa0.json").write_text(record.to_json())
    # Crash after JSON and row: archived, nothing added.
    _dead_peer_claim(inbox, "0002-aa1", "had_both.png", digit_png(2))
    both = Record(**{**record.to_dict(), "input": "had_both.png"})
    (outbox / "had_both.png.0002-aa1.json").write_text(both.to_json())
    Results(outbox, fsync=False).append_csv([both])
    # Crash before anything was written, with a torn row at the end of the CSV.
    _dead_peer_claim(inbox, "0003-aa2", "had_nothing.png", digit_png(3))
    with (outbox / "results.csv").open("ab") as f:
        f.write(b"had_nothing.png,abc,ok,3,0.9")

    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        wait_for(lambda: len(csv_rows(outbox)) == 3, 5, "three rows")
        wait_for(lambda: d.has_event("batch"), 5, "had_nothing answered")
    finally:
        assert d.stop() == 0
    assert_exactly_once(outbox, {"had_json.png", "had_both.png", "had_nothing.png"})
    assert not (inbox / ".digitwatch" / "work" / "999999-dead00").exists()
    assert len(state(inbox, "processed")) == 3
    assert d.has_event("csv_repaired")


def test_notify_socket_gets_ready_watchdog_and_stopping(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    sock_path = inbox.parent / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    messages: list[str] = []

    def received(field: str) -> bool:
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        return any(field in m.split("\n") for m in messages)

    d = DaemonProcess(
        inbox, outbox, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    )
    try:
        wait_for(lambda: received("READY=1"), 10, "READY=1")
        ready = next(m for m in messages if "READY=1" in m.split("\n"))
        assert "MAINPID=" in ready and "STATUS=" in ready
        assert d.has_event("ready")  # READY=1 comes after the backlog scan and observer start
        wait_for(lambda: received("WATCHDOG=1"), 5, "WATCHDOG=1")
        drop(inbox, "one.png", digit_png(1))
        wait_for(lambda: len(csv_rows(outbox)) == 1, 5, "an answer")
        wait_for(lambda: any("STATUS=1 ok" in m for m in messages) or received("x"), 5, "STATUS")
        d.signal(signal.SIGTERM)
        wait_for(lambda: received("STOPPING=1"), 10, "STOPPING=1")
        assert d.stop() == 0
    finally:
        d.close()
        sock.close()


def test_a_stuck_batch_stops_the_watchdog_pings_until_it_moves(
    folders: tuple[Path, Path],
) -> None:
    """The main loop keeps running while a batch is in the workers, but it must not ping
    for a batch that makes no progress: systemd's watchdog is what restarts a hung decoder.
    The workers are SIGSTOPped with a file in hand; the pings stop, and come back with the
    answer once the workers are continued."""
    inbox, outbox = folders
    sock_path = inbox.parent / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.05)

    def pings(seconds: float) -> int:
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                n += "WATCHDOG=1" in sock.recv(4096).decode().split("\n")
        return n

    # WATCHDOG_USEC=400000: a ping every 0.2 s while all is well.
    d = DaemonProcess(
        inbox, outbox, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    )
    workers: list[int] = []
    try:
        d.wait_ready()
        assert pings(1.0) >= 3
        workers = children(d.proc.pid)
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        drop(inbox, "stuck.png", digit_png(3))
        wait_for(lambda: len(state(inbox, "work")) == 1, 5, "the file claimed")
        pings(0.5)  # the batch becomes overdue after 0.2 s; a ping may be on its way
        assert pings(1.5) == 0, "pinged for a batch that did not move"
        assert d.proc.poll() is None and not csv_rows(outbox)
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        workers = []
        wait_for(lambda: len(csv_rows(outbox)) == 1, 10, "the answer after SIGCONT")
        assert pings(1.0) >= 3
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        assert d.stop() == 0, d.log.read_text()
        sock.close()
    assert_exactly_once(outbox, {"stuck.png"})


def test_one_worker_answers_in_the_daemon_process(folders: tuple[Path, Path]) -> None:
    """--workers 1 runs the pipeline in the main process: each batch is done on submit."""
    inbox, outbox = folders
    names = [f"w{i}.png" for i in range(6)]
    d = DaemonProcess(inbox, outbox, "--workers", "1")
    try:
        d.wait_ready()
        assert children(d.proc.pid) == []
        for i, n in enumerate(names):
            drop(inbox, n, digit_png(i))
        wait_for(lambda: len(csv_rows(outbox)) == len(names), 10, "every file answered")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, set(names))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "digitwatch", "run", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_refuses_to_start_with_one_line_and_exit_code(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    inbox, outbox = folders
    inside = inbox / "out"
    inside.mkdir()
    cases = [
        (["--inbox", str(inbox), "--outbox", str(inbox)], 4, "inside"),
        (["--inbox", str(inbox), "--outbox", str(inside)], 4, "inside"),
        (["--inbox", str(tmp_path / "missing"), "--outbox", str(outbox)], 4, "does not exist"),
        (
            ["--inbox", str(inbox), "--outbox", str(outbox), "--weights", str(tmp_path / "w.pt")],
            5,
            "weights",
        ),
    ]
    for args, code, words in cases:
        p = _run(*args, "--check")
        assert p.returncode == code, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], p.stderr
    ok = _run("--inbox", str(inbox), "--outbox", str(outbox), "--check")
    assert ok.returncode == 0 and ok.stdout.startswith("digitwatch: ok"), ok.stderr
    assert not (inbox / ".digitwatch").exists()  # --check changes nothing


def test_polling_mode_waits_for_a_quiet_file(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox, "--poll", "0.1", "--quiet-period", "0.3")
    try:
        d.wait_ready()
        data = digit_png(4)
        with (inbox / "polled.png").open("wb") as f:
            f.write(data[:25])
            f.flush()
            for i in range(25, len(data), 20):  # keeps changing for longer than the quiet period
                time.sleep(0.1)
                f.write(data[i : i + 20])
                f.flush()
        wait_for(lambda: len(csv_rows(outbox)) == 1, 5, "the polled file answered")
    finally:
        assert d.stop() == 0
    (answer,) = results(outbox)
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()


def test_recursive_mirrors_subfolders(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox, "--recursive")
    try:
        d.wait_ready()
        (inbox / "a" / "b").mkdir(parents=True)
        # Staged outside the inbox: beside a/b it would be inside the watched tree, and
        # the daemon could claim the staged file before it is renamed into place.
        drop(inbox / "a" / "b", "deep.png", digit_png(5), staging=inbox.parent / "staging")
        drop(inbox, "top.png", digit_png(6))
        # A whole folder renamed in: its files were never announced one by one.
        batch = inbox.parent / "folder"
        batch.mkdir()
        (batch / "in_folder.png").write_bytes(digit_png(7))
        batch.rename(inbox / "c")
        wait_for(lambda: len(csv_rows(outbox)) == 3, 5, "three answers")
    finally:
        assert d.stop() == 0
    assert {r["input"] for r in csv_rows(outbox)} == {
        "a/b/deep.png",
        "top.png",
        "c/in_folder.png",
    }
    assert len(list((outbox / "a" / "b").glob("deep.png.*.json"))) == 1
    assert json.loads(next((outbox / "a" / "b").glob("*.json")).read_text())["status"] == "ok"


def test_a_vanished_inbox_exits_non_zero_for_a_restart(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        shutil.rmtree(inbox)  # watching nothing: exit so systemd restarts (and reports) it
        code = d.proc.wait(10)
    finally:
        d.close()
    assert code == int(ExitCode.FOLDER), d.log.read_text()
    assert "disappeared" in d.log.read_text()


class _StubPipeline:
    model_id = "stub"
    inline = False

    def run(self, items: list[object]) -> list[object]:
        raise AssertionError("no input expected")


def test_a_dead_observer_thread_stops_the_service(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: when watchdog's threads die, run() raises WatcherDied (exit code 8)."""
    inbox, outbox = folders
    settings = Settings(inbox=inbox, outbox=outbox)
    daemon = Daemon(settings, inbox, outbox, _StubPipeline(), Notifier(None))  # type: ignore[arg-type]
    real_start = daemon.watcher.start

    def start_then_die() -> None:
        real_start()
        daemon.watcher._observer.stop()  # as if an exception had killed the thread
        daemon.watcher._observer.join()

    monkeypatch.setattr(daemon.watcher, "start", start_then_die)
    with pytest.raises(WatcherDied) as err:
        daemon.run()
    assert err.value.exit_code == ExitCode.WATCHER_DIED
    assert not (inbox / ".digitwatch" / "work" / daemon.daemon_id).exists()


def test_a_survivor_adopts_a_killed_peers_claims(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    names = [f"s{i:03d}.png" for i in range(300)]
    staging = stage(inbox, {n: digit_png(i) for i, n in enumerate(names)})
    a = DaemonProcess(inbox, outbox, "--batch-size", "8")
    b = DaemonProcess(inbox, outbox, "--batch-size", "8", "--rescan-interval", "0.5")
    try:
        a.wait_ready()
        b.wait_ready()
        for n in names:
            (staging / n).rename(inbox / n)
        wait_for(lambda: len(csv_rows(outbox)) >= 60, 15, "some answers")
        a.kill()
        wait_for(lambda: len(csv_rows(outbox)) >= len(names), 30, "the survivor finished")
        wait_for(lambda: not state(inbox, "work"), 5, "no claims left behind")
    finally:
        a.close()
        assert b.stop() == 0
    assert_exactly_once(outbox, set(names))


def test_on_success_delete_removes_answered_inputs_but_keeps_failures(
    folders: tuple[Path, Path],
) -> None:
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox, "--on-success", "delete")
    try:
        d.wait_ready()
        drop(inbox, "good.png", digit_png(1))
        drop(inbox, "blank.png", digit_png(2, blank=True))
        drop(inbox, "bad.png", b"not an image")
        wait_for(lambda: len(csv_rows(outbox)) == 3, 5, "three answers")
    finally:
        assert d.stop() == 0
    assert not state(inbox, "processed")
    assert [p.name.split("~")[1] for p in state(inbox, "failed")] == ["bad.png"]


@pytest.mark.slow
def test_ignored_names_are_never_taken(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    ignored = ["x.raw", "~syncthing~y.png", "z.png.partial", "sub/@eaDir/t.png", "hold"]
    (inbox / "sub" / "@eaDir").mkdir(parents=True)
    args = ("--recursive", "--ignore", "*.raw", "--ignore", "hold")
    d = DaemonProcess(inbox, outbox, *args)
    try:
        d.wait_ready()
        for rel in ignored:  # written in place and closed: events the watcher must drop
            (inbox / rel).write_bytes(digit_png(1))
        drop(inbox, "first.png", digit_png(2))
        wait_for(lambda: len(csv_rows(outbox)) == 1, 20, "the first real input answered")
        assert d.stop() == 0
    finally:
        d.close()
    d = DaemonProcess(inbox, outbox, *args)  # its start-up scan must skip them too
    try:
        d.wait_ready()
        drop(inbox, "second.png", digit_png(3))
        wait_for(lambda: len(csv_rows(outbox)) == 2, 20, "the second real input answered")
        assert d.stop() == 0
    finally:
        d.close()
    assert [r["input"] for r in csv_rows(outbox)] == ["first.png", "second.png"]
    for rel in ignored:
        assert (inbox / rel).exists(), f"{rel} left where it was"
