"""Shared fixtures: MNIST location, shipped weights, tmp inbox/outbox, thread-leak guard."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from digitwatch.settings import DEFAULT_WEIGHTS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The MNIST folder from DIGITWATCH_DATA_DIR (CI sets it), or skip with the reason."""
    raw = os.environ.get("DIGITWATCH_DATA_DIR")
    candidates = [Path(raw)] if raw else []
    candidates.append(REPO.parent / "shared" / "data" / "mnist")
    for c in candidates:
        if (c / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
            return c
    pytest.skip("MNIST not found: set DIGITWATCH_DATA_DIR to a torchvision MNIST folder")


@pytest.fixture(scope="session")
def weights_path() -> Path:
    return DEFAULT_WEIGHTS


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    return inbox, outbox


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail a test that leaves threads running, as watchdog's own suite does."""
    before = set(threading.enumerate())
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.name.startswith("pydevd")
    ]
    for t in leaked:
        t.join(timeout=2.0)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads leaked: {still}"
