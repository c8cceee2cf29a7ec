"""The worker processes: a killed worker costs only its culprit, the one-by-one retry, stops."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
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
    stage,
    wait_for,
)
from test_daemon import assert_exactly_once, state

from digitwatch import pipeline
from digitwatch.classify import load_weights
from digitwatch.codec import Limits
from digitwatch.pipeline import Input, Pipeline
from digitwatch.workers import Workers

# The in-process tests fork workers from the test process. Other test files load torch,
# whose OpenMP threads make a forked child deadlock on their locks (the service never
# imports torch), so those tests run in a new interpreter, started by the test below.
_FRESH = os.environ.get("DIGITWATCH_TEST_FRESH_PROCESS") == "1"
fresh = pytest.mark.skipif(
    not _FRESH, reason="forks: run by test_in_process_tests_in_a_new_interpreter"
)


def test_in_process_tests_in_a_new_interpreter() -> None:
    if _FRESH:
        pytest.skip("this is that interpreter")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            __file__,
        ],
        env=os.environ | {"DIGITWATCH_TEST_FRESH_PROCESS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"\b4 passed", out.stdout), out.stdout


@pytest.fixture
def pipe(weights_path: Path) -> Pipeline:
    return Pipeline(load_weights(weights_path), limits=Limits(), uncertain_below=0.5)


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A worker that reads a file named `poison*` dies on it, as on a decoder crash."""
    parent = os.getpid()
    real = pipeline.read_file

    def read_file(path: str, limit: int) -> tuple[bytes | None, str | None]:
        if Path(path).name.startswith("poison") and os.getpid() != parent:
            os._exit(70)
        return real(path, limit)

    monkeypatch.setattr(pipeline, "read_file", read_file)  # inherited by the forked workers
    yield


def _files(tmp_path: Path, names: list[str]) -> list[Input]:
    for i, n in enumerate(names):
        (tmp_path / n).write_bytes(digit_png(i % 10))
    return [Input(n, path=str(tmp_path / n)) for n in names]


@fresh
def test_a_worker_that_dies_costs_only_its_culprit_an_error(
    pipe: Pipeline, poison: None, tmp_path: Path
) -> None:
    names = ["a.png", "b.png", "poison.png", "c.png", "d.png"]
    with Workers(pipe, 2) as workers:
        before = sorted(children(os.getpid()))
        records = [r.record for r in workers.submit(_files(tmp_path, names))()]
        by_name = {r.input: r for r in records}
        assert [r.input for r in records] == names, "in the order given"
        assert by_name["poison.png"].status == "error"
        assert by_name["poison.png"].error == "the decoder crashed on this file"
        assert by_name["poison.png"].sha256 is not None, "the record still names the bytes"
        assert {by_name[n].status for n in names if n != "poison.png"} == {"ok"}
        # The one-by-one retry ran each file in a fresh pool; the last one serves on.
        assert sorted(children(os.getpid())) != before
        again = workers.submit(_files(tmp_path, ["e.png"]))()
        assert [r.record.status for r in again] == ["ok"]


@fresh
def test_a_worker_killed_while_idle_is_replaced_on_the_next_batch(
    pipe: Pipeline, tmp_path: Path
) -> None:
    with Workers(pipe, 2) as workers:
        first = children(os.getpid())
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: first[0] not in children(os.getpid()), 5, "the worker gone")
        records = [r.record for r in workers.submit(_files(tmp_path, ["a.png", "b.png"]))()]
        assert [r.status for r in records] == ["ok", "ok"]


@fresh
def test_abandon_kills_busy_workers_at_once(pipe: Pipeline, tmp_path: Path) -> None:
    """A bounded stop: workers stopped mid-file are killed, not waited for."""
    workers = Workers(pipe, 2)
    done = workers.submit(_files(tmp_path, ["a.png"]))
    assert [r.record.status for r in done()] == ["ok"]
    for pid in children(os.getpid()):
        os.kill(pid, signal.SIGSTOP)  # as stuck as a worker gets
    pending = workers.submit(_files(tmp_path, ["b.png", "c.png"]))
    t0 = time.monotonic()
    workers.abandon()
    assert time.monotonic() - t0 < 5
    assert children(os.getpid()) == []
    del pending
    workers.close()


@fresh
def test_one_worker_answers_in_the_callers_thread(pipe: Pipeline, tmp_path: Path) -> None:
    calls: list[str] = []
    with Workers(pipe, 1) as workers:
        assert workers.inline and children(os.getpid()) == []
        workers.on_progress = lambda: calls.append("step")
        wait = workers.submit(_files(tmp_path, ["a.png"]), on_done=lambda: calls.append("done"))
        assert calls[-1] == "done", "done before submit returns"
        assert calls.count("step") == 3, "read, decode, preprocess"
        (result,) = wait()
        assert result.record.status == "ok" and result.image is not None


@pytest.mark.slow
def test_a_worker_killed_mid_batch_costs_no_file(folders: tuple[Path, Path]) -> None:
    """The OOM killer or a decoder crash takes a worker: its files are answered again."""
    inbox, outbox = folders
    names = [f"big{i:02d}.png" for i in range(24)]
    # ~10 ms each to prepare
    staging = stage(inbox, {n: digit_png(i, size=1400) for i, n in enumerate(names)})
    d = DaemonProcess(inbox, outbox, "--batch-size", "24", "--max-delay-ms", "200")
    try:
        d.wait_ready()
        workers = children(d.proc.pid)
        assert len(workers) == 2, workers
        for n in names:
            (staging / n).rename(inbox / n)
        wait_for(lambda: len(state(inbox, "work")) > 0, 10, "a batch claimed")
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: len(csv_rows(outbox)) >= len(names), 60, "every file answered")
        drop(inbox, "after.png", digit_png(99))  # the service still answers new files
        wait_for(lambda: len(csv_rows(outbox)) == len(names) + 1, 10, "a file after the kill")
        assert sorted(children(d.proc.pid)) != sorted(workers), "the pool was renewed"
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert_exactly_once(outbox, {*names, "after.png"})
    assert {r["status"] for r in results(outbox)} == {"ok"}, "the files did not cause the crash"
    assert not state(inbox, "work")
