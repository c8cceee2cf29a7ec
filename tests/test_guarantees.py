"""The README's guarantees, each checked where it can break.

The daemon tests run the real service as a subprocess under strace, which records the
order of its system calls (every process and thread, workers included): that order is
the durability promise, and a test of outcomes alone passes when it is broken.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, children, csv_rows, digit_png, drop, stage, wait_for

from digitwatch.results import Record

REPO = Path(__file__).resolve().parent.parent

# -- strace ------------------------------------------------------------------------------

_TRACED = "openat,write,rename,renameat,renameat2,syncfs,sync"
# The group commit's sync: one syncfs per filesystem, or sync() where syncfs is missing.
_SYNCS = {"syncfs", "sync"}


def strace_usable() -> str | None:
    """Why strace cannot trace here (not installed, ptrace refused), or None."""
    if shutil.which("strace") is None:
        return "strace is not installed"
    p = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True, timeout=30
    )
    return None if p.returncode == 0 else f"strace cannot trace: {p.stderr.decode()[:200]}"


@pytest.fixture(scope="module")
def strace() -> None:
    reason = strace_usable()
    if reason is not None:
        pytest.skip(reason)


@dataclass
class Call:
    """One system call that succeeded; start and end are line numbers in the trace."""

    start: int
    end: int
    pid: int
    name: str
    args: str

    @property
    def paths(self) -> list[str]:
        return re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)

    @property
    def fd_path(self) -> str:
        """The path of the call's first argument, a descriptor (strace -y)."""
        m = re.match(r"-?\d+<([^>]*)>", self.args)
        return m[1] if m else ""


_DONE = re.compile(r"(\w+)\((.*)\) += (-?\d+)")
_UNFINISHED = re.compile(r"(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>(.*)\) += (-?\d+)")


def read_trace(path: Path) -> list[Call]:
    calls: list[Call] = []
    pending: dict[int, tuple[int, str, str]] = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
        pid_text, _, rest = line.partition(" ")
        if not pid_text.isdigit():
            continue
        pid, rest = int(pid_text), rest.lstrip()
        if m := _RESUMED.match(rest):
            if pid in pending:
                start, name, args = pending.pop(pid)
                if int(m[3]) >= 0:
                    calls.append(Call(start, i, pid, name, args + m[2]))
        elif m := _UNFINISHED.match(rest):
            pending[pid] = (i, m[1], m[2])
        elif (m := _DONE.match(rest)) and int(m[3]) >= 0:
            calls.append(Call(i, i, pid, m[1], m[2]))
    return calls


def traced(trace: Path) -> list[str]:
    """The strace command to put before the daemon's: every process and thread, each
    descriptor shown with its path (-y), whole CSV writes (-s), no signal lines."""
    quiet = ["-qq", "-e", "signal=none", "--seccomp-bpf"]
    return ["strace", "-f", "-y", "-s", "8192", *quiet, "-e", f"trace={_TRACED}", "-o", str(trace)]


def stop_traced(d: DaemonProcess) -> int:
    """SIGTERM to the daemon itself (strace's child); strace exits with its status."""
    (daemon,) = children(d.proc.pid)
    os.kill(daemon, signal.SIGTERM)
    try:
        return d.proc.wait(30)
    finally:
        d.close()


def renames(calls: list[Call]) -> list[Call]:
    return [c for c in calls if c.name in {"rename", "renameat", "renameat2"}]


def one(calls: list[Call], what: str) -> Call:
    assert len(calls) == 1, f"{what}: {len(calls)} calls"
    return calls[0]


def json_written(calls: list[Call], outbox: Path, name: str, claim: str) -> Call:
    target = f"{outbox}/{name}.{claim}.json"
    return one([c for c in renames(calls) if c.paths[-1:] == [target]], f"JSON of {claim}")


def csv_row_written(calls: list[Call], outbox: Path, name: str) -> Call:
    """The write of results.csv that holds the row of `name` (names are unique here)."""
    csv = f"{outbox}/results.csv"
    row = re.compile(r'(^|\\n)"?' + re.escape(name) + '"?,')
    found = [
        c
        for c in calls
        if c.name == "write" and c.fd_path == csv and row.search(c.paths[0] if c.paths else "")
    ]
    return one(found, f"CSV row of {name}")


def archived(calls: list[Call], inbox: Path, stored: str) -> Call:
    target = f"{inbox}/.digitwatch/processed/{stored}"
    return one([c for c in renames(calls) if c.paths[-1:] == [target]], f"archive of {stored}")


def assert_synced_between(calls: list[Call], folders: set[str], after: Call, before: Call) -> None:
    """A sync of the results' filesystem starts after `after` ended and ends before `before`."""
    syncs = [
        c
        for c in calls
        if c.name in _SYNCS
        and (c.name == "sync" or c.fd_path in folders)
        and after.end < c.start
        and c.end < before.start
    ]
    assert syncs, f"no sync between {after.name}({after.args[:80]}) and {before.args[:160]}"


def processed(inbox: Path) -> list[Path]:
    return sorted((inbox / ".digitwatch" / "processed").glob("*"))


# -- commit order --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])  # answered in the daemon, or in workers
def test_a_batch_commits_json_then_csv_row_then_sync_then_archive(
    folders: tuple[Path, Path], tmp_path: Path, strace: None, workers: str
) -> None:
    """Archiving an input is the promise that its answer is durable: per file, its JSON is
    renamed into place, then its CSV row is written, then the filesystem is synced, and
    only then is the input moved to processed/."""
    inbox, outbox = (p.resolve() for p in folders)  # as the daemon and strace name them
    trace = tmp_path / "trace.txt"
    data = {f"o{i}.png": digit_png(i, blank=i == 3) for i in range(7)}
    d = DaemonProcess(
        inbox, outbox, "--batch-size", "3", "--workers", workers, prefix=traced(trace)
    )
    try:
        d.wait_ready(deadline=60)
        drop(inbox, "o0.png", data["o0.png"])  # a lone file, then a burst of two batches
        wait_for(lambda: len(processed(inbox)) == 1, 20, "the lone file archived")
        staging = stage(inbox, {n: b for n, b in data.items() if n != "o0.png"})
        for n in data:
            if n != "o0.png":
                (staging / n).rename(inbox / n)
        wait_for(lambda: len(processed(inbox)) == len(data), 20, "every file archived")
    finally:
        code = stop_traced(d)
    assert code == 0, d.log.read_text()
    calls = read_trace(trace)
    folders_synced = {str(outbox), str(inbox)}
    for path in processed(inbox):
        claim, name = path.name.split("~", 1)
        assert path.read_bytes() == data[name], "the input was changed"
        json_done = json_written(calls, outbox, name, claim)
        row = csv_row_written(calls, outbox, name)
        archive = archived(calls, inbox, path.name)
        assert json_done.end < row.start, f"{name}: CSV row before its JSON"
        assert_synced_between(calls, folders_synced, row, archive)
    assert {r["input"] for r in csv_rows(outbox)} == set(data)


# -- recovery --------------------------------------------------------------------------------


def _record(name: str) -> Record:
    return Record(
        input=name,
        sha256="0" * 64,
        status="ok",
        digit=4,
        confidence=0.91,
        uncertain=False,
        probabilities=None,
        error=None,
        model="an-older-model",
        width=28,
        height=28,
        elapsed_ms=1.0,
        detected_at="2026-01-01T00:00:00.000000+00:00",
        processed_at="2026-01-01T00:00:01.000000+00:00",
    )


@pytest.mark.slow
def test_recovery_adds_the_missing_row_from_the_json_then_syncs_then_archives(
    folders: tuple[Path, Path], tmp_path: Path, strace: None
) -> None:
    """A dead daemon's claim whose JSON is written but whose CSV row is not: the row is
    made from that JSON (its original processed_at), the JSON itself is never rewritten,
    and the input is archived only after a sync."""
    inbox, outbox = (p.resolve() for p in folders)  # as the daemon and strace name them
    peer = inbox / ".digitwatch" / "work" / "999999-dead00"
    peer.mkdir(parents=True)
    (peer / ".lock").touch()
    stored = "0001-aa0~had_json.png"
    (peer / stored).write_bytes(digit_png(1))
    record = _record("had_json.png")
    # Formatted unlike the service's own JSON, so even a rewrite of the same record shows.
    json_path = outbox / "had_json.png.0001-aa0.json"
    json_path.write_text(json.dumps(record.to_dict(), indent=3, sort_keys=True) + "\n")
    before = (json_path.read_bytes(), json_path.stat())

    trace = tmp_path / "trace.txt"
    d = DaemonProcess(inbox, outbox, prefix=traced(trace))
    try:
        d.wait_ready(deadline=60)
        wait_for(lambda: len(processed(inbox)) == 1, 20, "the claim archived")
    finally:
        code = stop_traced(d)
    assert code == 0, d.log.read_text()
    after = json_path.stat()
    assert json_path.read_bytes() == before[0], "the JSON was rewritten"
    assert (after.st_ino, after.st_mtime_ns) == (before[1].st_ino, before[1].st_mtime_ns)
    assert [p.name for p in outbox.glob("*.json")] == [json_path.name], "answered again"
    (row,) = csv_rows(outbox)
    assert row["input"] == "had_json.png"
    assert row["processed_at"] == record.processed_at
    assert row["model"] == record.model and row["digit"] == "4"
    calls = read_trace(trace)
    csv_row = csv_row_written(calls, outbox, "had_json.png")
    archive = archived(calls, inbox, stored)
    assert_synced_between(calls, {str(outbox), str(inbox)}, csv_row, archive)


@pytest.mark.slow
def test_rows_are_appended_only_under_the_csv_lock(folders: tuple[Path, Path]) -> None:
    """Several daemons share results.csv: each appends (and repairs a torn tail) holding
    an exclusive flock, so a reader or a peer holding it sees no row arrive."""
    inbox, outbox = (p.resolve() for p in folders)  # as the daemon and strace name them
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        drop(inbox, "first.png", digit_png(1))
        wait_for(lambda: len(processed(inbox)) == 1, 10, "the first answer settled")
        with (outbox / "results.csv").open("rb") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            drop(inbox, "second.png", digit_png(2))
            wait_for(lambda: bool(list(outbox.glob("second.png.*.json"))), 10, "its JSON")
            time.sleep(0.5)  # the row would be written within ms of the JSON
            assert [r["input"] for r in csv_rows(outbox)] == ["first.png"]
        wait_for(lambda: len(csv_rows(outbox)) == 2, 10, "the row once the lock is free")
    finally:
        assert d.stop() == 0, d.log.read_text()


# -- the same-name rule -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_name_in_flight_is_not_read_again_until_its_answer_is_written(
    folders: tuple[Path, Path], tmp_path: Path, strace: None
) -> None:
    """(input, processed_at) names a CSV row on recovery, and two workers can stamp the same
    microsecond: so a second file of a name is claimed while the first is in the workers,
    but no worker opens it before the first one's JSON is written."""
    inbox, outbox = (p.resolve() for p in folders)  # as the daemon and strace name them
    trace = tmp_path / "trace.txt"
    # The first is slow to decode (~0.3 s): the second arrives while it is in a worker,
    # and the other worker is idle, so only the rule keeps it from being read at once.
    first = digit_png(1, size=5000)
    second = digit_png(2)
    d = DaemonProcess(inbox, outbox, "--workers", "2", prefix=traced(trace))
    try:
        d.wait_ready(deadline=60)
        drop(inbox, "same.png", first)
        work = inbox / ".digitwatch" / "work"
        wait_for(lambda: any(work.rglob("*~same.png")), 10, "the first claimed")
        drop(inbox, "same.png", second)
        wait_for(lambda: len(processed(inbox)) == 2, 30, "both answered")
    finally:
        code = stop_traced(d)
    assert code == 0, d.log.read_text()
    calls = read_trace(trace)
    (a, b) = processed(inbox)  # claim ids sort by time: a was claimed first
    claim_a = a.name.split("~")[0]
    assert a.read_bytes() == first and b.read_bytes() == second
    json_a = json_written(calls, outbox, "same.png", claim_a)
    claimed_b = one(
        [c for c in renames(calls) if c.paths[-1:] and c.paths[-1].endswith(f"/{b.name}")][:1],
        "the claim of the second",
    )
    opened_b = [
        c for c in calls if c.name == "openat" and any(p.endswith(f"/{b.name}") for p in c.paths)
    ]
    assert claimed_b.end < json_a.start, "the second was not claimed while the first was answered"
    assert opened_b, "the second was never read"
    assert all(json_a.end < c.start for c in opened_b), "read while the same name was in flight"
    # Every read of a claimed file refuses symlinks and never blocks on a FIFO.
    for c in opened_b:
        assert "O_NOFOLLOW" in c.args and "O_NONBLOCK" in c.args, c.args


# -- the README's table -----------------------------------------------------------------------


def _table_rows(path: Path, header: str) -> list[tuple[str, str]]:
    """(guarantee, tested by) for each row of the guarantees table under `header`."""
    text = path.read_text()
    start = text.index(header)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append((cells[0], cells[-1]))
    return rows


def _guarantee_rows() -> list[tuple[str, str]]:
    """Both tables: the README's (the tests) and docs/service.md's (how each is held)."""
    short = _table_rows(REPO / "README.md", "| guarantee | tested by |")
    long = _table_rows(REPO / "docs" / "service.md", "| guarantee | how it is held | tested by |")
    assert [g for g, _ in short] == [g for g, _ in long], "the two tables list the same rows"
    return short + long


def test_every_test_the_guarantees_table_names_exists() -> None:
    """A renamed test must not leave a guarantee pointing at nothing.

    In the "tested by" cell, `file.py` names a test file and the `fragments` after it name
    tests in that file (… stands for any text); `make x` and `python script` name commands;
    text in parentheses says what the test does and is not checked.
    """
    rows = _guarantee_rows()
    assert len(rows) >= 10
    makefile = (REPO / "Makefile").read_text()
    for guarantee, tested_by in rows:
        cell = tested_by
        while (bare := re.sub(r"\([^()]*\)", "", cell)) != cell:
            cell = bare
        refs = re.findall(r"`([^`]+)`", cell)
        assert refs, f"no test named for: {guarantee}"
        tests: list[str] | None = None
        for ref in refs:
            if ref.startswith("make "):
                assert re.search(rf"^{ref.split()[1]}:", makefile, re.M), ref
            elif ref.startswith("python "):
                assert (REPO / ref.split()[1]).is_file(), ref
            elif ref.endswith(".py"):
                source = REPO / "tests" / ref
                assert source.is_file(), f"{ref}: no such test file"
                tests = re.findall(r"^def (test_\w+)", source.read_text(), re.M)
            else:
                assert tests is not None, f"{ref}: name its test file first ({guarantee})"
                pattern = ".*".join(re.escape(part) for part in ref.split("…"))
                assert any(re.search(pattern, t) for t in tests), f"{ref}: no such test"
