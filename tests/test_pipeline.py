"""Pipeline: reading a claimed file safely, and what `uncertain` means."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from daemon_helpers import digit_png

from digitwatch.codec import encode_png
from digitwatch.pipeline import read_file
from digitwatch.predict import predict_paths
from digitwatch.settings import Settings

# -- read_file ---------------------------------------------------------------------------


def test_read_file_never_follows_a_symlink_nor_blocks_on_a_fifo(tmp_path: Path) -> None:
    """A claimed file swapped for a symlink or a FIFO after its lstat is not followed or read."""
    secret = tmp_path / "outside.png"
    secret.write_bytes(digit_png(1))
    link = tmp_path / "link.png"
    link.symlink_to(secret)
    data, error = read_file(str(link), 1 << 20)
    assert data is None and error is not None and error.startswith("cannot open file"), error

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    out: list[tuple[bytes | None, str | None]] = []
    reader = threading.Thread(target=lambda: out.append(read_file(str(fifo), 1 << 20)))
    reader.start()
    reader.join(5)
    if reader.is_alive():  # unblock it: a writer end lets the open return
        with fifo.open("wb"):
            pass
        reader.join(5)
        pytest.fail("read_file blocked on a FIFO")
    assert out == [(None, "not a regular file")]
    assert read_file(str(secret), 1 << 20) == (secret.read_bytes(), None)


# -- uncertain ------------------------------------------------------------------------------


def test_uncertain_follows_the_threshold_at_0_and_1(tmp_path: Path) -> None:
    """`uncertain` is confidence under --uncertain-below, and always true for no digit."""
    rng = np.random.default_rng(0)
    scribble = np.full((60, 60), 255, np.uint8)
    scribble[20:40, 20:40] = rng.integers(0, 2, (20, 20), dtype=np.uint8) * 255
    files = {
        "seven.png": digit_png(1),
        "scribble.png": encode_png(scribble),
        "blank.png": digit_png(0, blank=True),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [tmp_path / n for n in files]
    for threshold in (0.0, 1.0):
        records = [r.record for r in predict_paths(paths, Settings(uncertain_below=threshold))]
        by_name = {r.input: r for r in records}
        assert by_name["blank.png"].status == "no_digit" and by_name["blank.png"].uncertain
        ok = [r for r in records if r.status == "ok"]
        assert len(ok) == 2, records
        for r in ok:
            assert r.confidence is not None
            assert r.uncertain == (r.confidence < threshold), (threshold, r)
        if threshold == 1.0:
            assert any(r.confidence is not None and r.confidence < 1.0 for r in ok)
