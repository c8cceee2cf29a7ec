"""Systematic defences (issue 13): any file name through run and predict, and every commit
step failing once. The cases found one by one (odd bytes, long names, a full disk) were
each a class; these tests walk the class."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, csv_rows, digit_png, drop, results, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_daemon import assert_exactly_once, state

from digitwatch.results import input_text
from digitwatch.watch import STATE_DIR, ignored_name

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
_NAME_MAX = 255


def _kernel_name(raw: bytes) -> bytes:
    """Any bytes but / and NUL: what Linux takes as one file name."""
    return raw.replace(b"/", b"_").replace(b"\0", b"_")


# Short names and names near the limit, from raw bytes and from Unicode text.
names = (
    st.one_of(
        st.binary(min_size=1, max_size=40),
        st.binary(min_size=200, max_size=_NAME_MAX),
        st.text(min_size=1, max_size=60).map(
            lambda t: t.encode("utf-8", "surrogatepass")[:_NAME_MAX]
        ),
    )
    .map(_kernel_name)
    .filter(lambda n: n not in (b".", b"..", STATE_DIR.encode()) and len(n) > 0)
)


def _place(folder: Path, name: bytes, data: bytes, staging: Path) -> None:
    """Write `name` in `staging`, then rename it into `folder` (a complete file at once)."""
    tmp = staging / os.fsdecode(name)  # Python keeps the bytes as surrogates: exact
    tmp.write_bytes(data)
    tmp.rename(folder / os.fsdecode(name))


def test_any_file_name_is_answered_once_or_left_with_a_reason(
    folders: tuple[Path, Path],
) -> None:
    """Every name the kernel takes: answered exactly once, or left in place (hidden and
    temporary names wait for a rename; a name too long for its result is skipped with one
    log line); the service never stops, never holds, and predict answers them all."""
    inbox, outbox = folders
    staging = inbox.parent / "staging"
    staging.mkdir()
    everything = inbox.parent / "predict-me"
    everything.mkdir()
    d = DaemonProcess(inbox, outbox, log=inbox.parent / "daemon.log")
    answered: collections.Counter[str] = collections.Counter()
    left: set[bytes] = set()

    def rows_for(text: str) -> int:
        return sum(r["input"] == text for r in csv_rows(outbox))

    def skips_for(text: str) -> int:
        return sum(e.get("event") == "skipped" and e.get("input") == text for e in d.events())

    @settings(
        max_examples=120,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(name=names)
    def one_name(name: bytes) -> None:
        text, escaped = input_text(os.fsdecode(name))
        assert escaped == (name != name.decode("utf-8", "replace").encode("utf-8"))
        rows, skips = rows_for(text), skips_for(text)
        _place(inbox, name, digit_png(len(name)), staging)
        _place(everything, name, digit_png(len(name)), staging)
        if ignored_name(os.fsdecode(name)):
            left.add(name)  # waits for a rename that never comes
            return
        wait_for(
            lambda: rows_for(text) > rows or skips_for(text) > skips or d.proc.poll() is not None,
            10,
            f"an answer or a skip for {name!r}",
        )
        assert d.proc.poll() is None, d.log.read_text()[-3000:]
        if rows_for(text) > rows:
            answered[text] += 1
            # `<claim>~<name>` must fit; the claim id is 24 bytes and its counter's digits.
            assert len(name) <= _NAME_MAX - 1 - 24, f"answered, yet too long: {len(name)}"
        else:
            left.add(name)
            assert len(name) > _NAME_MAX - 1 - 27, f"skipped, yet it fits: {len(name)}"

    try:
        d.wait_ready()
        one_name()
        drop(inbox, "sentinel.png", digit_png(0))
        wait_for(lambda: rows_for("sentinel.png") == 1, 10, "the service still answers")
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    answered["sentinel.png"] += 1
    assert not d.has_event("outbox_unwritable"), "a name is never the outbox's fault"
    jsons = collections.Counter(str(r["input"]) for r in results(outbox))
    assert jsons == answered
    assert collections.Counter(r["input"] for r in csv_rows(outbox)) == answered
    assert not state(inbox, "work"), "nothing left claimed"
    in_inbox = {os.fsencode(p.name) for p in inbox.iterdir() if p.name != STATE_DIR}
    assert in_inbox == left, "what was not answered is still in the inbox, untouched"
    for line in d.log.read_text().splitlines():
        if line.startswith("{"):
            json.loads(line)  # every log line stays valid JSON

    # predict, the other way in: every name in a folder it is given (dotfiles aside).
    debug = inbox.parent / "debug"
    done = subprocess.run(
        [sys.executable, "-m", "digitwatch", "predict", str(everything), "--format", "jsonl"]
        + ["--debug-dir", str(debug)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    records = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    expected = {input_text(p.name)[0] for p in everything.iterdir() if not p.name.startswith(".")}
    assert {r["input"] for r in records} == expected
    assert all(r["status"] == "ok" for r in records), [r for r in records if r["status"] != "ok"]
    assert len(list(debug.iterdir())) == len(expected), "one debug image per input"


@pytest.mark.parametrize("step", ["json", "worker", "csv", "sync", "archive"])
def test_every_commit_step_failing_once_loses_and_repeats_nothing(
    folders: tuple[Path, Path], step: str
) -> None:
    """A commit step fails once, as a broken disk would make it: the service holds, retries
    or exits for a restart (sync: 4), and in the end every input has one JSON, one CSV row
    and its archived file; a JSON, once published, is never written again."""
    inbox, outbox = folders
    marker = inbox.parent / "fault-injected"
    launcher = [sys.executable, str(HERE / "faulty_run.py"), step, str(marker), "--"]
    names = [f"c{i:02d}.png" for i in range(8)]
    d = DaemonProcess(
        inbox, outbox, "--rescan-interval", "1", prefix=launcher, log=inbox.parent / "d1.log"
    )
    first_seen: dict[str, tuple[int, int]] = {}

    def watch_jsons() -> None:
        for p in outbox.glob("*.json"):
            st_ = p.stat()
            first_seen.setdefault(p.name, (st_.st_ino, st_.st_mtime_ns))

    try:
        d.wait_ready()
        for i, n in enumerate(names):
            drop(inbox, n, digit_png(i))

        def settled_or_exited() -> bool:
            watch_jsons()
            return d.proc.poll() is not None or (
                len(csv_rows(outbox)) == len(names) and not state(inbox, "work")
            )

        wait_for(settled_or_exited, 20, "every file settled, or an exit for a restart")
        assert marker.exists(), "the fault was injected"
        code = d.proc.poll()
    finally:
        if d.proc.poll() is None:
            assert d.stop() == 0, d.log.read_text()[-3000:]
        d.close()
    text = d.log.read_text()
    assert "Traceback" not in text, text[-3000:]
    if step == "sync":
        assert code == 4 and "cannot sync" in text, text[-3000:]
        d = DaemonProcess(inbox, outbox, log=inbox.parent / "d2.log")
        try:
            d.wait_ready()
            wait_for(
                lambda: len(csv_rows(outbox)) == len(names) and not state(inbox, "work"),
                20,
                "recovered after the restart",
            )
            watch_jsons()
        finally:
            assert d.stop() == 0, d.log.read_text()[-3000:]
    else:
        assert code is None, f"exited {code}: {text[-3000:]}"
    assert_exactly_once(outbox, set(names))
    assert len(state(inbox, "processed")) == len(names), "every input archived once"
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outbox.glob("*.json")}
    assert now == first_seen, "a published JSON was written again"
    assert not [p for p in outbox.iterdir() if p.name.startswith(".tmp-")]
