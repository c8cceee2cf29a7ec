"""`digitwatch predict` as a process: where its output goes, and what a folder may hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import digit_png

from digitwatch.errors import ExitCode
from digitwatch.settings import DEFAULT_WEIGHTS

PREDICT = [sys.executable, "-m", "digitwatch", "predict", "--weights", str(DEFAULT_WEIGHTS)]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "seven.png"
    path.write_bytes(digit_png(7))
    return path


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_predict_into_a_full_disk_is_one_line_and_exit_9(good: Path) -> None:
    with Path("/dev/full").open("w") as full:
        p = subprocess.run(
            [*PREDICT, str(good)], stdout=full, stderr=subprocess.PIPE, text=True, env=_env()
        )
    assert p.returncode == ExitCode.OUTPUT == 10
    assert _one_line(p.stderr) == (
        "digitwatch: error: cannot write the results: No space left on device"
    )


def test_predict_into_a_closed_pipe_is_one_line_and_exit_9(good: Path) -> None:
    p = subprocess.Popen(
        [*PREDICT, str(good)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader went away (`digitwatch predict ... | head -0`)
    stderr = p.stderr.read()
    p.stderr.close()
    assert p.wait(60) == ExitCode.OUTPUT
    assert _one_line(stderr) == "digitwatch: error: cannot write the results: Broken pipe"


def test_predict_with_stdout_closed_is_one_line_and_exit_9(good: Path) -> None:
    p = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *PREDICT, str(good)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert p.returncode == ExitCode.OUTPUT, p.stderr
    assert _one_line(p.stderr) == (
        "digitwatch: error: cannot write the results: standard output is closed"
    )


def test_predict_on_a_folder_follows_no_symlink_and_opens_no_fifo(
    tmp_path: Path, good: Path
) -> None:
    """Inside a folder, the daemon's rule: regular files are read; a symlink (to a secret
    outside, or a loop) is never followed and a FIFO never opened, and each gets an error
    record instead of vanishing from the output; hidden names are left out."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "seven.png").write_bytes(good.read_bytes())
    secret = tmp_path / "shadow.png"
    secret.write_bytes(digit_png(3))
    (folder / "link.png").symlink_to(secret)
    (folder / "shadow").symlink_to("/etc/shadow")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    os.mkfifo(folder / "pipe.png")
    (folder / ".hidden.png").write_bytes(digit_png(1))
    p = subprocess.run(
        [*PREDICT, str(folder), "--format", "jsonl"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert p.returncode == ExitCode.INPUT_FAILED, p.stderr
    records = {r["input"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert sorted(records) == ["link.png", "loop.png", "pipe.png", "seven.png", "shadow"]
    assert records["seven.png"]["status"] == "ok"
    for name in ("link.png", "loop.png", "shadow"):
        assert records[name]["status"] == "error"
        assert records[name]["error"] == "a symbolic link inside a folder: not followed"
        assert records[name]["sha256"] is None  # never read
    assert records["pipe.png"]["error"] == "a FIFO: not read"
