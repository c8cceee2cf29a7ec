"""Large images under load: memory, watchdog gaps and stop time on a 36 MP PNG backlog.

Starts the real daemon (two workers) on a backlog of 36-megapixel 16-bit RGBA PNGs,
samples the summed PSS of the daemon and its workers every 20 ms, records every
WATCHDOG=1 it sends (WATCHDOG_USEC as given), and prints the peak RSS, the largest gap
between pings, the backlog's time and, with --stop-after, how long a SIGTERM sent that
many seconds after READY takes to end the process. `--src` runs another checkout's
package (for a before/after pair: `git archive <commit> digitwatch | tar -x -C DIR`).

    python benchmarks/bench_large.py --files 8 [--batch-size 4] [--stop-after 2] [--src DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_daemon import bench_parent, tree_pids
from daemon_helpers import rgba16_png

from digitwatch.settings import DEFAULT_WEIGHTS


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages split among their sharers, so a sum over the
    daemon and its forked workers is what they hold together (what a cgroup limits)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _answered(outbox: Path) -> int:
    """CSV rows so far (names here have no newlines)."""
    try:
        return max(0, (outbox / "results.csv").read_text().count("\n") - 1)
    except FileNotFoundError:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--watchdog-usec", type=int, default=30_000_000)
    ap.add_argument("--stop-after", type=float, default=None, help="SIGTERM this long after READY")
    ap.add_argument("--src", type=Path, default=None, help="checkout whose package to run")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="large-", dir=bench_parent()))
    inbox, outbox, staging = root / "inbox", root / "outbox", root / "staging"
    for folder in (inbox, outbox, staging):
        folder.mkdir()
    data = rgba16_png(6000, 6000)
    names = [f"big{i:03d}.png" for i in range(args.files)]
    for name in names:
        (staging / name).write_bytes(data)
    for name in names:
        (staging / name).rename(inbox / name)

    sock_path = root / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.05)
    messages: list[tuple[float, str]] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                messages.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                continue

    listener = threading.Thread(target=listen)
    listener.start()
    env = os.environ | {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": str(args.watchdog_usec)}
    cwd = None
    if args.src is not None:  # `python -m` puts the working folder first on sys.path
        env["PYTHONPATH"] = cwd = str(args.src.resolve())
    cmd = [sys.executable, "-m", "digitwatch", "run", "--inbox", str(inbox)]
    cmd += ["--outbox", str(outbox), "--weights", str(DEFAULT_WEIGHTS), "--log-format", "json"]
    cmd += ["--batch-size", str(args.batch_size)]
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    peak, ready, sent, stop_s = 0.0, None, None, None
    t_end = time.monotonic() + 600
    try:
        while time.monotonic() < t_end and proc.poll() is None:
            if ready is None and any("READY=1" in m for _, m in messages):
                ready = time.monotonic()
            pids = tree_pids(proc.pid)
            with contextlib.suppress(OSError):  # a worker just replaced
                peak = max(peak, sum(pss_kb(p) for p in pids) / 1024)
            stop_due = args.stop_after is not None and ready is not None and sent is None
            if stop_due and time.monotonic() - ready >= args.stop_after:  # type: ignore[operator]
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)  # sampling goes on until the exit
            if sent is None and _answered(outbox) >= args.files:
                break
            time.sleep(0.02)
        finished = time.monotonic()
        if sent is not None:
            proc.wait(60)
            stop_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        done.set()
        listener.join()
        sock.close()
    pings = [t for t, m in messages if "WATCHDOG=1" in m.split("\n")]
    start = ready if ready is not None else finished
    marks = [start, *[t for t in pings if t >= start], finished]
    gap = max(b - a for a, b in zip(marks, marks[1:], strict=False))
    answered = _answered(outbox)
    print(f"files {args.files} x 36 MP 16-bit RGBA PNG ({len(data) / 1e6:.1f} MB each)")
    print(f"answered {answered} in {finished - start:.1f} s after READY")
    print(f"peak memory, daemon + workers (summed PSS): {peak:.0f} MB")
    print(f"largest gap between WATCHDOG=1 (WATCHDOG_USEC {args.watchdog_usec}): {gap:.1f} s")
    if stop_s is not None:
        print(f"SIGTERM to exit: {stop_s:.1f} s, exit code {proc.returncode}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
