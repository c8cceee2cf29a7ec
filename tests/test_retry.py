"""`digitwatch retry`: failed inputs back into the inbox, never over a file already there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from daemon_helpers import DaemonProcess, csv_rows, digit_png, results, wait_for
from typer.testing import CliRunner

from digitwatch.cli import app

runner = CliRunner()


def failed_dir(inbox: Path) -> Path:
    return inbox / ".digitwatch" / "failed"


def test_retry_moves_failed_inputs_back_and_never_overwrites(folders: tuple[Path, Path]) -> None:
    inbox, _ = folders
    failed = failed_dir(inbox)
    (failed / "sub").mkdir(parents=True)
    (failed / "18c0-ab0~late.png").write_bytes(b"late")
    (failed / "18c1-ab1~again.png").write_bytes(b"old bytes")
    (failed / "sub" / "18c2-ab2~deep.jpg").write_bytes(b"deep")
    (inbox / "again.png").write_bytes(b"new bytes")  # the producer sent it again meanwhile

    result = runner.invoke(app, ["retry", "--inbox", str(inbox), "*.png"])
    assert result.exit_code == 0, result.output
    assert "retried late.png" in result.output
    assert "left again.png in failed/: the inbox already has that name" in result.output
    assert (inbox / "late.png").read_bytes() == b"late"
    assert (inbox / "again.png").read_bytes() == b"new bytes"
    assert (failed / "18c1-ab1~again.png").read_bytes() == b"old bytes"
    assert not (failed / "18c0-ab0~late.png").exists()
    assert (failed / "sub" / "18c2-ab2~deep.jpg").exists()  # not matched

    result = runner.invoke(app, ["retry", "--inbox", str(inbox)])
    assert result.exit_code == 0, result.output
    assert (inbox / "sub" / "deep.jpg").read_bytes() == b"deep"
    assert result.output.splitlines()[-1] == "1 moved back to the inbox, 1 left"


def test_retry_without_an_inbox_is_a_folder_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["retry", "--inbox", str(tmp_path / "nowhere")])
    assert result.exit_code == 4
    assert "does not exist" in result.output


def test_a_writer_that_paused_too_long_is_answered_after_retry(
    folders: tuple[Path, Path],
) -> None:
    """Polling (a share where neither close events nor leases work): a writer that pauses
    past --quiet-period gets an error record for half a PNG, then writes the rest into the
    file it still holds, now in failed/. `digitwatch retry` puts it back; it is answered
    again, and the first record stays."""
    inbox, outbox = folders
    data = digit_png(4, size=280)
    d = DaemonProcess(inbox, outbox, "--poll", "0.1", "--quiet-period", "0.3")
    try:
        d.wait_ready()
        with (inbox / "slow.png").open("wb") as writer:
            writer.write(data[: len(data) // 2])
            writer.flush()
            wait_for(lambda: len(csv_rows(outbox)) == 1, 10, "the error record")
            wait_for(lambda: any(failed_dir(inbox).iterdir()), 10, "the file in failed/")
            writer.write(data[len(data) // 2 :])  # through the descriptor it still holds
        (stored,) = failed_dir(inbox).iterdir()
        assert stored.read_bytes() == data
        p = subprocess.run(
            [sys.executable, "-m", "digitwatch", "retry", "--inbox", str(inbox)],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")},
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[0] == "retried slow.png"
        wait_for(lambda: len(csv_rows(outbox)) == 2, 10, "the second answer")
    finally:
        assert d.stop() == 0, d.log.read_text()
    first, second = sorted(results(outbox), key=lambda r: str(r["processed_at"]))
    assert first["input"] == second["input"] == "slow.png"
    assert first["status"] == "error" and second["status"] == "ok"
    assert not list(failed_dir(inbox).iterdir())
