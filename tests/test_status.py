"""`digitwatch status` reads the real daemon's folders: while it runs and after it died."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, csv_rows, digit_png, drop, wait_for
from typer.testing import CliRunner

from digitwatch.cli import app
from digitwatch.summary import MAX_REASONS, OTHER_REASONS, SUMMARY_NAME, Summary

runner = CliRunner()


def _status(inbox: Path, outbox: Path) -> dict[str, object]:
    result = runner.invoke(
        app, ["status", "--inbox", str(inbox), "--outbox", str(outbox), "--json"]
    )
    assert result.exit_code == 0, result.output
    out: dict[str, object] = json.loads(result.output)
    return out


@pytest.mark.slow
def test_status_counts_what_the_daemon_answered_and_sees_it_die(
    folders: tuple[Path, Path],
) -> None:
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox)
    try:
        d.wait_ready()
        drop(inbox, "a.png", digit_png(1))
        drop(inbox, "b.png", digit_png(2))
        drop(inbox, "blank.png", digit_png(blank=True))
        drop(inbox, "bad.png", b"not an image")
        wait_for(lambda: len(csv_rows(outbox)) == 4, 20, "four CSV rows")
        st = _status(inbox, outbox)
        assert st["answered"] == {"ok": 2, "no_digit": 1, "error": 1}
        assert st["answered_last_hour"] == {"ok": 2, "no_digit": 1, "error": 1}
        assert st["waiting"] == 0 and st["in_flight"] == 0
        assert st["failed_files"] == 1
        assert list(st["errors"].values()) == [1]  # type: ignore[union-attr]
        assert st["last_answer_at"] == max(r["processed_at"] for r in csv_rows(outbox))
        (daemon,) = st["daemons"]  # type: ignore[misc]
        assert daemon["alive"] is True
        # The summary the daemon keeps and a full read of the CSV agree.
        (outbox / SUMMARY_NAME).unlink()
        assert _status(inbox, outbox)["answered"] == st["answered"]
        # A file the daemon cannot see yet (a hidden name) is not waiting; a real one is,
        # once the daemon is gone.
        d.kill()
        (inbox / "late.png").write_bytes(digit_png(3))
        st = _status(inbox, outbox)
        assert st["waiting"] == 1 and st["oldest_waiting_s"] is not None
        assert all(not w["alive"] for w in st["daemons"])  # type: ignore[union-attr]
    finally:
        d.close()


def test_status_of_empty_folders_and_plain_output(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    st = _status(inbox, outbox)
    assert st["answered"] == {"ok": 0, "no_digit": 0, "error": 0}
    assert st["waiting"] == 0 and st["last_answer_at"] is None
    result = runner.invoke(app, ["status", "--inbox", str(inbox), "--outbox", str(outbox)])
    assert result.exit_code == 0 and "waiting    0" in result.output
    result = runner.invoke(app, ["status", "--inbox", str(inbox / "nope"), "--outbox", str(outbox)])
    assert result.exit_code == 4


def test_the_summary_keeps_a_bounded_list_of_error_reasons() -> None:
    cols = ["input", "sha256", "status", "digit", "confidence", "uncertain", "error"]
    cols += ["model", "processed_at"]
    s = Summary()
    at = "2026-12-02T21:00:00.000000+00:00"
    s.add(
        [["x", "", "error", "", "", "true", f"file is {i} bytes", "m", at] for i in range(300)],
        cols,
    )
    assert len(s.errors) == MAX_REASONS + 1 and s.errors[OTHER_REASONS] == 300 - MAX_REASONS
    assert s.counts["error"] == 300 and s.uncertain == 300
