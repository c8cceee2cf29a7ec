"""The service against careless and hostile producers (issue 13): data and exactly-once."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, csv_rows, digit_png, drop, results, wait_for
from test_daemon import assert_exactly_once, state

from digitwatch.errors import ExitCode

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def _jsons(outbox: Path) -> dict[str, tuple[int, int, str]]:
    """Each result file's (inode, mtime_ns, text): any rewrite changes the first two."""
    out = {}
    for p in outbox.rglob("*.json"):
        if p.name.startswith(".") or p.relative_to(outbox).parts[0] == "review":
            continue  # a temp file, gone again; the review queue's copies of records
        st = p.stat()
        out[str(p.relative_to(outbox))] = (st.st_ino, st.st_mtime_ns, p.read_text())
    return out


def _held_for(d: DaemonProcess, seconds: float) -> bool:
    first = next(e for e in d.events() if e.get("event") == "outbox_unwritable")
    t0 = dt.datetime.fromisoformat(str(first["timestamp"]))
    return (dt.datetime.now(dt.UTC) - t0).total_seconds() > seconds


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_held_batch_never_rewrites_its_published_results(
    folders: tuple[Path, Path], workers: str
) -> None:
    """results.csv turned into a folder holds the batch; its JSONs stay as first written."""
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox, "--workers", workers, log=inbox.parent / "daemon.log")
    try:
        d.wait_ready()
        drop(inbox, "first.png", digit_png(0))
        wait_for(lambda: len(state(inbox, "processed")) == 1, 10, "the first answer settled")
        (outbox / "results.csv").rename(inbox.parent / "results.csv.saved")
        (outbox / "results.csv").mkdir()
        names = [f"h{i}.png" for i in range(4)]
        for i, n in enumerate(names):
            drop(inbox, n, digit_png(i))
        wait_for(lambda: d.has_event("outbox_unwritable"), 10, "the hold logged")
        # The held batch's JSONs are out; the files not yet claimed stay in the inbox
        # (nothing new is claimed while held), so their JSONs come after the hold.
        wait_for(lambda: len(_jsons(outbox)) >= 2, 10, "the held batch's JSONs published")
        published = _jsons(outbox)
        # Retries 0.5, 1 and 2 s apart: three more attempts at the batch.
        wait_for(lambda: _held_for(d, 4.0), 10, "several retries")
        assert d.proc.poll() is None, "the service stays up"
        assert _jsons(outbox) == published, "a held batch rewrote its published results"
        (outbox / "results.csv").rmdir()
        (inbox.parent / "results.csv.saved").rename(outbox / "results.csv")
        wait_for(lambda: len(csv_rows(outbox)) == len(names) + 1, 20, "caught up")
        wait_for(lambda: not state(inbox, "work"), 10, "all archived")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, {"first.png", *names})
    final = _jsons(outbox)
    assert {k: final[k] for k in published} == published, "committed as first published"
    assert sum(e.get("event") == "outbox_unwritable" for e in d.events()) == 1
    assert not [p for p in outbox.iterdir() if p.name.startswith(".tmp-")]


def _drop_bytes(inbox: Path, name: bytes, data: bytes) -> None:
    """`drop` for a name given as bytes (not UTF-8, or of an exact length)."""
    staging = inbox.parent / "staging"
    staging.mkdir(exist_ok=True)
    tmp = staging / os.fsdecode(name)  # Python keeps the bytes as surrogates: exact
    tmp.write_bytes(data)
    tmp.rename(inbox / os.fsdecode(name))


def _by_input(outbox: Path) -> dict[str, dict[str, object]]:
    return {str(r["input"]): r for r in results(outbox)}


def test_names_that_are_not_utf8_are_answered_escaped_and_recovered(
    folders: tuple[Path, Path],
) -> None:
    """Linux names are bytes: a Latin-1 name is answered, and recovery of one never crashes."""
    inbox, outbox = folders
    latin1 = b"caf\xe9.png"
    odd = b"\xff\\x41-\xfe.png"  # also a literal backslash: escaped as \\ so it reads back
    d = DaemonProcess(inbox, outbox, log=inbox.parent / "daemon1.log")
    try:
        d.wait_ready()
        _drop_bytes(inbox, latin1, digit_png(1))
        wait_for(lambda: len(state(inbox, "processed")) == 1, 10, "the Latin-1 name answered")
        # Now one held with its JSON published, then a crash: recovery appends its row.
        (outbox / "results.csv").rename(inbox.parent / "results.csv.saved")
        (outbox / "results.csv").mkdir()
        _drop_bytes(inbox, odd, digit_png(2))
        wait_for(lambda: len(results(outbox)) == 2, 10, "the second JSON published")
        assert d.proc.poll() is None, d.log.read_text()
    finally:
        d.kill()
    (outbox / "results.csv").rmdir()
    (inbox.parent / "results.csv.saved").rename(outbox / "results.csv")
    d = DaemonProcess(inbox, outbox, log=inbox.parent / "daemon2.log")
    try:
        d.wait_ready()
        wait_for(lambda: len(csv_rows(outbox)) == 2, 10, "the recovered row")
    finally:
        assert d.stop() == 0, d.log.read_text()
    shown = {"caf\\xe9.png": latin1, "\\xff\\\\x41-\\xfe.png": odd}
    assert_exactly_once(outbox, set(shown))
    for text, raw in shown.items():
        r = _by_input(outbox)[text]
        assert r["status"] == "ok" and r["input_escaped"] is True, r
        assert _unescape(text) == raw
    stored = {os.fsencode(p.name).split(b"~", 1)[1] for p in state(inbox, "processed")}
    assert stored == {latin1, odd}, "the inputs keep their own bytes"
    jsons = {os.fsencode(p.name) for p in outbox.glob("*.json")}
    assert all(n.startswith((latin1, odd)) for n in jsons), jsons


def _unescape(text: str) -> bytes:
    """The README's rule for an escaped input: \\\\ is a backslash, \\xNN a byte."""
    out, i = bytearray(), 0
    while i < len(text):
        if text.startswith("\\\\", i):
            out += b"\\"
            i += 2
        elif text.startswith("\\x", i):
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out += text[i].encode()
            i += 1
    return bytes(out)


def test_predict_answers_names_that_are_not_utf8(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(digit_png(1))
    for fmt in ("table", "json", "jsonl", "csv"):
        done = subprocess.run(
            [sys.executable, "-m", "digitwatch", "predict", str(folder), "--format", fmt],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (fmt, done.stderr.decode())
        out = done.stdout.decode("utf-8")  # valid UTF-8 in every format
        assert "caf\\xe9.png" in out.replace("\\\\", "\\"), (fmt, out)
    rows = json.loads(
        subprocess.run(
            [sys.executable, "-m", "digitwatch", "predict", str(folder), "--format", "json"],
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert rows[0]["input"] == "caf\\xe9.png" and rows[0]["input_escaped"] is True
    assert rows[0]["status"] == "ok"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_name_length_is_answered_or_skipped_once(
    folders: tuple[Path, Path], workers: str
) -> None:
    """Names up to the kernel's 255 bytes: answered, or one logged skip; never a hold."""
    inbox, outbox = folders
    lengths = [*range(215, 235), 254, 255]
    names = {n: (b"x" * (n - 4)) + b".png" for n in lengths}
    d = DaemonProcess(inbox, outbox, "--workers", workers, log=inbox.parent / "d1.log")
    try:
        d.wait_ready()
        for i, name in enumerate(names.values()):
            _drop_bytes(inbox, name, digit_png(i))
        drop(inbox, "short.png", digit_png(9))
        skips = lambda: [e for e in d.events() if e.get("event") == "skipped"]  # noqa: E731
        wait_for(
            lambda: len(csv_rows(outbox)) + len(skips()) == len(names) + 1,
            15,
            "every name answered or skipped",
        )
        answered = {r["input"] for r in csv_rows(outbox)}
        assert "short.png" in answered
        # Up to ~230 bytes: `<claim>~<name>` fits (the result may be `<claim>.json`).
        assert {len(os.fsencode(n)) for n in answered} >= set(range(215, 229))
        for e in skips():
            assert "too long" in str(e["reason"]), e
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert not d.has_event("outbox_unwritable"), "a long name is not the outbox's fault"
    assert len(skips()) == len(names) + 1 - len(answered), "each skip logged once"
    assert_exactly_once(outbox, answered)
    assert not state(inbox, "work")
    # The skipped ones stay in the inbox, and a restart neither crashes nor holds on them.
    left = {os.fsencode(p.name) for p in inbox.iterdir() if p.is_file()}
    assert left == {n for n in names.values() if n.decode() not in answered}
    d = DaemonProcess(inbox, outbox, "--workers", workers, log=inbox.parent / "d2.log")
    try:
        d.wait_ready()
        wait_for(lambda: len(skips()) == len(left), 10, "the skips logged again, once each")
        drop(inbox, "after.png", digit_png(3))
        wait_for(lambda: len(csv_rows(outbox)) == len(answered) + 1, 10, "answered after")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert not d.has_event("outbox_unwritable")


def test_one_worker_holds_on_a_vanished_outbox_like_two(folders: tuple[Path, Path]) -> None:
    """--workers 1 writes each JSON in the main process: a failure holds, never exits 1."""
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox, "--workers", "1", log=inbox.parent / "daemon.log")
    try:
        d.wait_ready()
        outbox.rmdir()
        names = [f"v{i}.png" for i in range(5)]
        for i, n in enumerate(names):
            drop(inbox, n, digit_png(i))
        wait_for(
            lambda: d.has_event("outbox_unwritable") or d.proc.poll() is not None,
            10,
            "the failure logged",
        )
        assert d.proc.poll() is None, d.log.read_text()
        outbox.mkdir()
        wait_for(lambda: len(csv_rows(outbox)) == len(names), 20, "caught up")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, set(names))


def test_recursive_never_mirrors_a_subfolder_onto_results_csv(folders: tuple[Path, Path]) -> None:
    """An inbox subfolder named results.csv is the outbox's own name: reserved, logged once."""
    inbox, outbox = folders
    (inbox / "results.csv").mkdir()
    drop(inbox / "results.csv", "early.png", digit_png(1), staging=inbox.parent / "s1")
    (inbox / "sub").mkdir()
    drop(inbox / "sub", "nested.png", digit_png(2), staging=inbox.parent / "s2")
    drop(inbox, "top.png", digit_png(3))
    d = DaemonProcess(inbox, outbox, "--recursive", "--rescan-interval", "1")
    try:
        d.wait_ready()
        wait_for(lambda: len(csv_rows(outbox)) == 2, 10, "the other two answered")
        assert (outbox / "results.csv").is_file(), "never a folder outbox/results.csv"
        # Another file there while running, then later batches: never held behind it.
        drop(inbox / "results.csv", "late.png", digit_png(4), staging=inbox.parent / "s1")
        wait_for(lambda: d.has_event("batch"), 5, "a batch")
        names = [f"after{i}.png" for i in range(3)]
        for i, n in enumerate(names):
            drop(inbox, n, digit_png(i))
        wait_for(lambda: len(csv_rows(outbox)) == 5, 10, "later files answered")
        wait_for(lambda: _rescans(d) >= 2, 10, "two rescans")  # the warning stays single
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert not d.has_event("outbox_unwritable")
    assert_exactly_once(outbox, {"top.png", "sub/nested.png", *names})
    assert sorted(p.name for p in (inbox / "results.csv").iterdir()) == ["early.png", "late.png"]
    skips = [e for e in d.events() if e.get("event") == "skipped"]
    assert [e["input"] for e in skips] == ["results.csv/"], skips


def _rescans(d: DaemonProcess) -> int:
    ready = next(e for e in d.events() if e.get("event") == "ready")
    t0 = dt.datetime.fromisoformat(str(ready["timestamp"]))
    return int((dt.datetime.now(dt.UTC) - t0).total_seconds())


def test_a_row_torn_inside_a_quoted_name_is_cut_on_recovery(folders: tuple[Path, Path]) -> None:
    """A crash right after the newline of a quoted name: the next rows must not merge into it."""
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        drop(inbox, "before.png", digit_png(0))
        wait_for(lambda: len(csv_rows(outbox)) == 1, 10, "the first answer")
    finally:
        assert d.stop() == 0, d.log.read_text()
    with (outbox / "results.csv").open("ab") as f:
        f.write(b'"new\n')  # what a kill -9 mid-append of "new\nline.png" can leave
    drop(inbox, "after.png", digit_png(1))
    drop(inbox, "new\nline.png", digit_png(2))
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        wait_for(lambda: len(results(outbox)) == 3, 10, "the others answered")
        wait_for(lambda: not state(inbox, "work"), 10, "settled")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert d.has_event("csv_repaired")
    assert_exactly_once(outbox, {"before.png", "after.png", "new\nline.png"})


@pytest.mark.parametrize("how", ["renamed", "removed"])
def test_a_vanished_state_folder_ends_the_service_with_one_line(
    folders: tuple[Path, Path], how: str
) -> None:
    """.digitwatch renamed or removed while running: exit 4 with one line, then recover."""
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox, "--rescan-interval", "1")
    try:
        d.wait_ready()
        drop(inbox, "first.png", digit_png(0))
        wait_for(lambda: len(state(inbox, "processed")) == 1, 10, "the first answer settled")
        if how == "renamed":
            (inbox / ".digitwatch").rename(inbox.parent / "moved-state")
        else:
            shutil.rmtree(inbox / ".digitwatch")
        drop(inbox, "second.png", digit_png(1))
        code = d.proc.wait(10)
    finally:
        d.close()
    text = d.log.read_text()
    assert code == int(ExitCode.FOLDER), text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("digitwatch: error:")]
    assert len(errors) == 1 and ".digitwatch was removed or renamed" in errors[0], text
    assert (inbox / "second.png").exists(), "the file waits in the inbox, not silently lost"
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        wait_for(lambda: len(csv_rows(outbox)) == 2, 10, "answered after the restart")
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, {"first.png", "second.png"})


def _inotify_limited(instances: int | None = None, watches: int | None = None) -> list[str]:
    """A wrapper running the command in a user namespace with its own inotify limits."""
    sets = []
    if instances is not None:
        sets.append(f"echo {instances} > /proc/sys/user/max_inotify_instances")
    if watches is not None:
        sets.append(f"echo {watches} > /proc/sys/user/max_inotify_watches")
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", " && ".join(sets)], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with its own limits here: {probe.stderr.decode()}")
    return ["unshare", "-U", "-r", "sh", "-c", " && ".join([*sets, 'exec "$@"']), "sh"]


def test_no_inotify_instance_left_is_one_line_and_its_exit_code(
    folders: tuple[Path, Path],
) -> None:
    inbox, outbox = folders
    prefix = _inotify_limited(instances=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
    for extra in (["--check"], []):
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "digitwatch", "run", "--inbox", str(inbox)]
            + ["--outbox", str(outbox), "--log-format", "json", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert done.returncode == int(ExitCode.WATCH_LIMIT), (extra, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        lines = [x for x in done.stderr.splitlines() if x.startswith("digitwatch: error:")]
        assert len(lines) == 1 and "inotify instance limit" in lines[0], done.stderr
        assert "max_user_instances" in lines[0] and "--poll" in lines[0]
    assert not list((inbox / ".digitwatch" / "work").iterdir()), "no work folder left behind"


def test_no_inotify_watch_left_for_subfolders_warns_and_the_rescan_answers(
    folders: tuple[Path, Path],
) -> None:
    inbox, outbox = folders
    subs = [f"sub{i}" for i in range(4)]
    for s in subs:
        (inbox / s).mkdir()
    d = DaemonProcess(
        inbox,
        outbox,
        "--recursive",
        "--rescan-interval",
        "1",
        prefix=_inotify_limited(watches=2),  # the inbox and one subfolder
    )
    try:
        d.wait_ready()
        for i, s in enumerate(subs):
            drop(inbox / s, f"f{i}.png", digit_png(i), staging=inbox.parent / "staging")
        wait_for(lambda: len(csv_rows(outbox)) == len(subs), 15, "answered by events or rescan")
    finally:
        assert d.stop() == 0, d.log.read_text()
    text = d.log.read_text()
    assert text.count("inotify watch limit is reached") == 1, text
    assert_exactly_once(outbox, {f"{s}/f{i}.png" for i, s in enumerate(subs)})


def test_recovery_reads_a_csv_with_bytes_that_are_not_utf8(folders: tuple[Path, Path]) -> None:
    """A row another tool wrote in Latin-1 must not crash every start in recovery."""
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        drop(inbox, "first.png", digit_png(0))
        wait_for(lambda: len(csv_rows(outbox)) == 1, 10, "the first answer")
        # Held with its JSON published, then a crash: recovery must check the CSV's rows.
        (outbox / "results.csv").rename(inbox.parent / "results.csv.saved")
        (outbox / "results.csv").mkdir()
        drop(inbox, "second.png", digit_png(1))
        wait_for(lambda: len(results(outbox)) == 2, 10, "the second JSON published")
    finally:
        d.kill()
    (outbox / "results.csv").rmdir()
    saved = inbox.parent / "results.csv.saved"
    saved.write_bytes(saved.read_bytes() + b"caf\xe9.png,,error,,,false,by hand,m,x\r\n")
    saved.rename(outbox / "results.csv")
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        wait_for(lambda: not state(inbox, "work"), 10, "recovered")
    finally:
        assert d.stop() == 0, d.log.read_text()
    rows = [r["input"] for r in csv_rows_latin1(outbox)]
    assert rows == ["first.png", "caf\xe9.png", "second.png"], rows


def csv_rows_latin1(outbox: Path) -> list[dict[str, str]]:
    import csv

    with (outbox / "results.csv").open(newline="", encoding="latin-1") as f:
        return list(csv.DictReader(f))


def test_a_name_the_outbox_refuses_gets_its_result_under_the_claim_id(
    folders: tuple[Path, Path],
) -> None:
    """An outbox on an SMB share refuses 'what?.png.<claim>.json': that one result is
    named by its claim id alone, the batch around it is never held, and recovery finds it."""
    inbox, outbox = folders
    launcher = [sys.executable, str(HERE / "faulty_run.py"), "smb-names", "-", "--"]
    d = DaemonProcess(inbox, outbox, prefix=launcher)
    try:
        d.wait_ready()
        for i, n in enumerate(["a:b.png", "plain.png"]):
            drop(inbox, n, digit_png(i))
        wait_for(lambda: len(csv_rows(outbox)) == 2, 10, "both answered")
        wait_for(lambda: not state(inbox, "work"), 10, "settled")
        assert not d.has_event("outbox_unwritable"), "a refused name is not the outbox's fault"
        # Then one held with its result published under the claim id, and a crash.
        (outbox / "results.csv").rename(inbox.parent / "results.csv.saved")
        (outbox / "results.csv").mkdir()
        drop(inbox, "what?.png", digit_png(2))
        wait_for(lambda: len(results(outbox)) == 3, 10, "the third JSON published")
    finally:
        d.kill()
    (outbox / "results.csv").rmdir()
    (inbox.parent / "results.csv.saved").rename(outbox / "results.csv")
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        wait_for(lambda: len(csv_rows(outbox)) == 3, 10, "the recovered row")
        wait_for(lambda: not state(inbox, "work"), 10, "settled")
    finally:
        assert d.stop() == 0, d.log.read_text()
    names = {"a:b.png", "plain.png", "what?.png"}
    assert_exactly_once(outbox, names)
    by_file = {p.name: json.loads(p.read_text())["input"] for p in outbox.glob("*.json")}
    for name, shown in by_file.items():
        if shown == "plain.png":
            assert name.startswith("plain.png."), name
        else:
            assert name.count(".") == 1 and ":" not in name and "?" not in name, name
