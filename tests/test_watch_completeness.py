"""watch.completeness: the lease probe and the gate that holds a file until it is complete."""

from __future__ import annotations

import time
from pathlib import Path

from digitwatch.watch.completeness import Gate, writer_open
from digitwatch.watch.hints import CLOSED, CREATED, MOVED, QUIET, SCAN


def test_lease_probe_sees_an_open_writer(tmp_path: Path) -> None:
    path = tmp_path / "w.png"
    with path.open("wb") as f:
        f.write(b"half")
        assert writer_open(str(path)) is True
    assert writer_open(str(path)) is False


def test_gate_holds_a_file_being_written_until_its_close(tmp_path: Path) -> None:
    gate = Gate(quiet_period=0.05, use_leases=True)
    path = tmp_path / "w.png"
    with path.open("wb"):
        assert gate.offer(str(path), CREATED, time.monotonic(), 100.0) is None
        time.sleep(0.1)
        assert gate.due(time.monotonic()) == []  # still open: no quiet period applies
    assert gate.offer(str(path), CLOSED, time.monotonic(), 200.0) == 100.0
    assert not gate.pending


def test_gate_takes_a_finished_rename_in_at_once(tmp_path: Path) -> None:
    gate = Gate(quiet_period=10.0, use_leases=True)
    path = tmp_path / "r.png"
    path.write_bytes(b"data")
    assert gate.offer(str(path), CREATED, time.monotonic(), 5.0) == 5.0
    assert gate.offer(str(path), MOVED, time.monotonic(), 6.0) == 6.0


def test_gate_without_leases_waits_for_a_quiet_period(tmp_path: Path) -> None:
    gate = Gate(quiet_period=0.2, use_leases=False)
    path = tmp_path / "p.png"
    path.write_bytes(b"a")
    t0 = time.monotonic()
    assert gate.offer(str(path), QUIET, t0, 1.0) is None
    with path.open("ab") as f:
        f.write(b"b")  # changed within the quiet period: the clock restarts
    assert gate.due(t0 + 0.1) == []
    assert gate.due(t0 + 0.21) == []
    assert gate.due(t0 + 0.3) == []
    assert gate.due(t0 + 0.45) == [(str(path), 1.0)]


def test_gate_drops_a_file_that_vanished(tmp_path: Path) -> None:
    gate = Gate(quiet_period=0.01, use_leases=False)
    path = tmp_path / "gone.png"
    path.write_bytes(b"a")
    assert gate.offer(str(path), SCAN, 0.0, 1.0) is None
    path.unlink()
    assert gate.due(1.0) == [] and not gate.pending
