"""Helpers for end-to-end daemon tests: a real `digitwatch run` subprocess and deadlines."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from digitwatch.codec import encode_png
from digitwatch.settings import DEFAULT_WEIGHTS


def wait_for(condition: Callable[[], bool], deadline: float = 10.0, what: str = "") -> None:
    """Poll `condition` until it holds, or fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    if condition():
        return
    raise AssertionError(f"timed out after {deadline} s waiting for {what or condition}")


def digit_png(seed: int = 0, *, blank: bool = False, size: int = 28) -> bytes:
    """A small dark-on-white PNG of a '7'-like stroke (status ok), or a blank page (no_digit)."""
    img = np.full((size, size), 255, np.uint8)
    if not blank:
        s = size / 28
        dx = int(np.random.default_rng(seed).integers(-2, 3) * s)
        width = int(2 * s) + 1
        top = int(6 * s)
        cv2.line(img, (int(8 * s) + dx, top), (int(20 * s) + dx, top), 0, width)
        cv2.line(img, (int(20 * s) + dx, top), (int(12 * s) + dx, int(23 * s)), 0, width)
    return encode_png(img)


def rgba16_png(width: int, height: int) -> bytes:
    """A 16-bit RGBA PNG: a '7' drawn only in the alpha channel over a color gradient."""
    img = np.zeros((height, width, 4), np.uint16)
    img[:, :, 0] = (np.arange(width, dtype=np.uint32) * 65535 // width).astype(np.uint16)
    img[:, :, 1:3] = 20000
    alpha = np.zeros((height, width), np.uint8)
    s = min(width, height) / 28
    pen = int(2 * s) + 1
    cv2.line(alpha, (int(8 * s), int(6 * s)), (int(20 * s), int(6 * s)), 255, pen)
    cv2.line(alpha, (int(20 * s), int(6 * s)), (int(12 * s), int(23 * s)), 255, pen)
    img[:, :, 3] = alpha.astype(np.uint16) * 257
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    return bytes(buf.tobytes())


def drop(inbox: Path, name: str, data: bytes, *, staging: Path | None = None) -> Path:
    """Write the file outside the inbox, then rename it in (how careful producers deliver)."""
    staging = staging or inbox.parent / "staging"
    staging.mkdir(exist_ok=True)
    tmp = staging / name
    tmp.write_bytes(data)
    target = inbox / name
    tmp.rename(target)
    return target


def stage(inbox: Path, files: dict[str, bytes]) -> Path:
    """Write `files` into staging/ beside the inbox, to be renamed in at once (a burst)."""
    staging = inbox.parent / "staging"
    staging.mkdir(exist_ok=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    return staging


def children(pid: int) -> list[int]:
    """The process's child processes (the daemon's workers)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def results(outbox: Path) -> list[dict[str, object]]:
    """Every result JSON in the outbox (the review queue's records are not results)."""
    paths = sorted(p for p in outbox.rglob("*.json") if "review" not in p.relative_to(outbox).parts)
    return [json.loads(p.read_text()) for p in paths]


def csv_rows(outbox: Path) -> list[dict[str, str]]:
    path = outbox / "results.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


class DaemonProcess:
    """`python -m digitwatch run` with JSON logs captured to a file."""

    def __init__(
        self,
        inbox: Path,
        outbox: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """`prefix` goes before the command (unshare, strace); `proc` is then its process."""
        self.log = log or outbox.parent / f"daemon-{time.monotonic_ns()}.log"
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "digitwatch",
            "run",
            "--inbox",
            str(inbox),
            "--outbox",
            str(outbox),
            "--weights",
            str(DEFAULT_WEIGHTS),
            "--log-format",
            "json",
            *extra,
        ]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=full_env
        )

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def has_event(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events())

    def wait_ready(self, deadline: float = 10.0) -> None:
        wait_for(lambda: self.has_event("ready") or self.proc.poll() is not None, deadline, "ready")
        assert self.proc.poll() is None, f"daemon exited early:\n{self.log.read_text()}"

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, deadline: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(deadline)
        finally:
            self.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()
