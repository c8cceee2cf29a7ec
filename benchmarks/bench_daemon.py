"""Benchmark the real `digitwatch run` against the per-event baseline, in one run.

Both run as subprocesses on temporary folders; images are dropped by atomic rename from
a staging folder on the same filesystem and everything is measured from outside:

- burst drain rate: N files renamed in at once, time until N results exist;
- paced latency: files dropped at a fixed rate, drop -> result file appearing (inotify);
- ready time: spawn -> READY=1 on a NOTIFY_SOCKET (digitwatch) / "ready" on stdout (baseline);
- peak RSS (VmHWM) and RSS growth over a long run.

Absolute numbers drift on a shared machine; the ratio measured in the same run is the
figure to trust. Usage: python benchmarks/bench_daemon.py [--quick] [--long 50000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights" / "mnist-mlp.pt"

# `--stub-preprocess`: digitwatch with to_mnist replaced by the baseline's plain resize,
# to measure the daemon's own costs apart from preprocessing. Not a product figure.
STUB_PREPROCESS = """
import cv2, sys
import digitwatch.pipeline as p
p.to_mnist = lambda g: cv2.resize(g, (28, 28), interpolation=cv2.INTER_AREA)
sys.argv[0] = "digitwatch"
from digitwatch.cli import main
main()
"""


# ---------------------------------------------------------------- workloads


def _digit_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Handwriting-like strokes (white on black, MNIST format); MNIST itself when present."""
    data_dir = os.environ.get("DIGITWATCH_DATA_DIR")
    if data_dir:
        try:
            from digitwatch.mnist import load_mnist

            images, _ = load_mnist(Path(data_dir), train=False, download=False)
            return [images[i % len(images)] for i in range(n)]
        except Exception:
            pass
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.zeros((28, 28), np.uint8)
        pts = rng.integers(6, 22, size=(4, 2)).astype(np.int32)
        cv2.polylines(img, [pts], False, 255, 2, cv2.LINE_AA)
        out.append(img)
    return out


def _photo(width: int, height: int, digit: np.ndarray, seed: int) -> bytes:
    """A photo-like JPEG: beige paper, a light gradient, noise, a dark digit in the middle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paper = 215 + 25 * (xx / width) - 20 * (yy / height)
    paper += rng.normal(0, 4, size=(height, width)).astype(np.float32)
    side = min(width, height) // 2
    ink = cv2.resize(digit, (side, side), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    y0, x0 = (height - side) // 2, (width - side) // 2
    region = paper[y0 : y0 + side, x0 : x0 + side]
    paper[y0 : y0 + side, x0 : x0 + side] = region * (1 - ink / 255) + 40 * (ink / 255)
    bgr = cv2.merge([np.clip(paper * f, 0, 255).astype(np.uint8) for f in (0.9, 0.97, 1.0)])
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return bytes(buf.tobytes())


def workload(kind: str, n: int) -> list[bytes]:
    digits = _digit_images(min(n, 1000))
    if kind == "png28":
        blobs = []
        for d in digits:
            ok, buf = cv2.imencode(".png", d)
            assert ok
            blobs.append(bytes(buf.tobytes()))
        return [blobs[i % len(blobs)] for i in range(n)]
    size = {"jpeg640": (640, 480), "jpeg12mp": (4000, 3000)}[kind]
    variants = [_photo(*size, d, seed=i) for i, d in enumerate(digits[:4])]
    return [variants[i % len(variants)] for i in range(n)]


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    started: float
    ready: float  # seconds from spawn to ready

    def rss_peak_mb(self) -> float:
        return _status_kb(self.popen.pid, "VmHWM") / 1024

    def tree_peak_mb(self) -> float:
        """Peak RSS of the process plus its child processes (digitwatch's workers)."""
        pid = self.popen.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return self.rss_peak_mb() + sum(_status_kb(int(c), "VmHWM") for c in children) / 1024

    def rss_mb(self) -> float:
        return _status_kb(self.popen.pid, "VmRSS") / 1024

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def start_digitwatch(inbox: Path, outbox: Path, extra: list[str], *, stub: bool = False) -> Proc:
    sock_path = inbox.parent / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = os.environ | {"NOTIFY_SOCKET": str(sock_path)}
    cmd = [sys.executable, "-m", "digitwatch", "run", "--inbox", str(inbox)]
    if stub:
        cmd[1:3] = ["-c", f"exec({STUB_PREPROCESS!r})"]  # one line: py-spy shows cmdlines
    cmd += ["--outbox", str(outbox), "--log-format", "json", "--log-level", "warning", *extra]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
    finally:
        sock.close()
    return Proc("digitwatch", p, t0, time.perf_counter() - t0)


def start_baseline(inbox: Path, outbox: Path) -> Proc:
    cmd = [sys.executable, str(REPO / "benchmarks" / "baseline_handler.py")]
    cmd += [str(inbox), str(outbox), str(WEIGHTS)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == b"ready", line
    return Proc("baseline", p, t0, time.perf_counter() - t0)


Starter = Callable[[Path, Path], Proc]


@contextlib.contextmanager
def folders() -> Iterator[tuple[Path, Path, Path]]:
    root = Path(tempfile.mkdtemp(prefix="dwbench-", dir=os.environ.get("BENCH_TMP")))
    try:
        for sub in ("stage", "inbox", "outbox"):
            (root / sub).mkdir()
        yield root / "stage", root / "inbox", root / "outbox"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _count_results(outbox: Path) -> int:
    with os.scandir(outbox) as it:
        return sum(1 for e in it if e.name.endswith(".json") and not e.name.startswith("."))


def _wait_results(outbox: Path, n: int, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while True:
        if _count_results(outbox) >= n:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{_count_results(outbox)} of {n} results after {timeout} s")
        time.sleep(0.005)


# ---------------------------------------------------------------- measurements


def burst(start: Starter, blobs: list[bytes], ext: str) -> dict[str, float]:
    with folders() as (stage, inbox, outbox):
        names = [f"img{i:06d}.{ext}" for i in range(len(blobs))]
        for name, blob in zip(names, blobs, strict=True):
            (stage / name).write_bytes(blob)
        proc = start(inbox, outbox)
        try:
            t0 = time.perf_counter()
            for name in names:
                os.rename(stage / name, inbox / name)  # noqa: PTH104 (the producer: keep it fast)
            t1 = _wait_results(outbox, len(names), timeout=600)
            return {
                "rate": len(names) / (t1 - t0),
                "seconds": t1 - t0,
                "ready_s": proc.ready,
                "peak_rss_mb": proc.rss_peak_mb(),
                "tree_rss_mb": proc.tree_peak_mb(),
            }
        finally:
            proc.stop()


class _Arrivals(FileSystemEventHandler):
    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()

    def _note(self, path: str) -> None:
        name = os.path.basename(path)  # noqa: PTH119
        if name.endswith(".json") and not name.startswith("."):
            key = name.split(".", 2)[0]  # img000123
            with self.lock:
                self.seen.setdefault(key, time.perf_counter())

    def on_created(self, event: FileSystemEvent) -> None:
        self._note(str(event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        self._note(str(getattr(event, "dest_path", "")))


def paced(start: Starter, blobs: list[bytes], ext: str, rate: float) -> dict[str, float]:
    with folders() as (stage, inbox, outbox):
        names = [f"img{i:06d}.{ext}" for i in range(len(blobs))]
        for name, blob in zip(names, blobs, strict=True):
            (stage / name).write_bytes(blob)
        proc = start(inbox, outbox)
        arrivals = _Arrivals()
        observer = Observer()
        observer.schedule(arrivals, str(outbox), recursive=False)
        observer.start()
        dropped: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            for i, name in enumerate(names):
                due = t0 + i / rate
                while (now := time.perf_counter()) < due:
                    time.sleep(min(0.002, due - now))
                dropped[name.split(".", 1)[0]] = time.perf_counter()
                os.rename(stage / name, inbox / name)  # noqa: PTH104 (the producer: keep it fast)
            _wait_results(outbox, len(names), timeout=60)
            time.sleep(0.2)
        finally:
            observer.stop()
            observer.join()
            proc.stop()
        lat = sorted(
            (arrivals.seen[k] - t) * 1000 for k, t in dropped.items() if k in arrivals.seen
        )
        q = statistics.quantiles(lat, n=100)
        return {"p50": q[49], "p90": q[89], "p99": q[98], "max": lat[-1], "n": len(lat)}


def long_run(blobs: list[bytes], total: int, extra: list[str]) -> dict[str, float]:
    """Feed `total` images in rounds; RSS after the first 10% vs at the end."""
    with folders() as (stage, inbox, outbox):
        proc = start_digitwatch(inbox, outbox, extra)
        try:
            rounds = 10
            per = total // rounds
            rss: list[float] = []
            done = 0
            for r in range(rounds):
                for i in range(per):
                    name = f"r{r:02d}i{i:06d}.png"
                    (stage / name).write_bytes(blobs[i % len(blobs)])
                    os.rename(stage / name, inbox / name)  # noqa: PTH104 (the producer: keep it fast)
                done += per
                _wait_results(outbox, done, timeout=600)
                rss.append(proc.rss_mb())
                # keep the outbox small so counting stays cheap; results are not re-read
                for e in os.scandir(outbox):
                    if e.name.endswith(".json"):
                        os.unlink(e.path)  # noqa: PTH108
                done = 0
            return {
                "images": per * rounds,
                "rss_first_mb": rss[0],
                "rss_last_mb": rss[-1],
                "growth_pct": 100 * (rss[-1] - rss[0]) / rss[0],
                "peak_rss_mb": proc.rss_peak_mb(),
                "tree_rss_mb": proc.tree_peak_mb(),
            }
        finally:
            proc.stop()


# ---------------------------------------------------------------- report


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small workloads (a smoke run)")
    ap.add_argument("--long", type=int, default=0, help="images for the RSS-growth run")
    ap.add_argument("--only", default="", help="comma list: png28,jpeg640,jpeg12mp,paced,long")
    ap.add_argument("--daemon-args", default="", help="extra arguments for digitwatch run")
    ap.add_argument(
        "--stub-preprocess",
        action="store_true",
        help="digitwatch with to_mnist replaced by a resize: the daemon's own overhead",
    )
    args = ap.parse_args()
    extra = args.daemon_args.split()
    sizes = {"png28": 5000, "jpeg640": 500, "jpeg12mp": 60}
    if args.quick:
        sizes = {"png28": 1000, "jpeg640": 100, "jpeg12mp": 12}
    only = set(args.only.split(",")) if args.only else set(sizes) | {"paced"}
    dw: Starter = lambda i, o: start_digitwatch(i, o, extra, stub=args.stub_preprocess)  # noqa: E731
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    if args.stub_preprocess:
        print("NOTE: preprocessing stubbed (to_mnist = resize): not a product figure\n")
    print("| workload | digitwatch | baseline | ratio | digitwatch ready / peak RSS |")
    print("| --- | --- | --- | --- | --- |")
    for kind, n in sizes.items():
        if kind not in only:
            continue
        blobs = workload(kind, n)
        ext = "png" if kind == "png28" else "jpg"
        d = burst(dw, blobs, ext)
        b = burst(start_baseline, blobs, ext)
        print(
            f"| burst {n} x {kind} | {d['rate']:.0f}/s | {b['rate']:.0f}/s "
            f"| {d['rate'] / b['rate']:.2f}x | {d['ready_s']:.2f} s / {d['peak_rss_mb']:.0f} MB, "
            f"{d['tree_rss_mb']:.0f} MB with workers "
            f"(baseline {b['ready_s']:.2f} s / {b['peak_rss_mb']:.0f} MB) |",
            flush=True,
        )
    if "paced" in only:
        n = 300 if args.quick else 1000
        blobs = workload("png28", n)
        d = paced(dw, blobs, "png", 50)
        b = paced(start_baseline, blobs, "png", 50)
        for name, r in (("digitwatch", d), ("baseline", b)):
            print(
                f"| paced 50/s, {n} x png28, {name} | p50 {r['p50']:.1f} ms | p90 {r['p90']:.1f}"
                f" ms | p99 {r['p99']:.1f} ms | max {r['max']:.1f} ms |",
                flush=True,
            )
    if args.long:
        r = long_run(workload("png28", 1000), args.long, extra)
        print(
            f"| long run {r['images']:.0f} x png28 | RSS {r['rss_first_mb']:.0f} MB after 10% "
            f"| {r['rss_last_mb']:.0f} MB at end | growth {r['growth_pct']:.1f}% "
            f"| peak {r['peak_rss_mb']:.0f} MB ({r['tree_rss_mb']:.0f} MB with workers) |"
        )


if __name__ == "__main__":
    main()
