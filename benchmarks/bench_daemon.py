"""Benchmark the real `digitwatch run` against the per-event baseline, in one run.

Both run as subprocesses on temporary folders; images are dropped by atomic rename from
a staging folder on the same filesystem and everything is measured from outside:

- burst drain rate: N files renamed in at once, time until N results exist;
- paced latency: files dropped at a fixed rate, drop -> result file appearing (inotify):
  28x28 PNGs at 50/s, 12 MP photos at 30/s;
- ready time: spawn -> READY=1 on a NOTIFY_SOCKET (digitwatch) / "ready" on stdout (baseline);
- peak RSS (VmHWM) and RSS growth over a long run.

Absolute numbers drift on a shared machine; the ratio measured in the same run is the
figure to trust, so each burst runs as --repeat pairs (digitwatch, then the baseline)
and the pair with the median ratio is shown with the range. Results are counted from
inotify events on the outbox, not by listing it. Usage:
python benchmarks/bench_daemon.py [--quick] [--repeat 3] [--only png28,...] [--long 50000]
"""

from __future__ import annotations

import os

# Before numpy loads: an idle OpenBLAS server thread in this process (the producer) took
# ~2% of the machine from both contestants under perf.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import array
import atexit
import contextlib
import ctypes
import fcntl
import platform
import select
import shutil
import signal
import socket
import statistics
import struct
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

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights" / "mnist-mlp.safetensors"

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
    """MNIST test digits when DIGITWATCH_DATA_DIR has them, else handwriting-like strokes.

    Read straight from the IDX file: importing torch (torchvision) here would leave this
    process, the producer, with a heap that makes each garbage collection slow.
    """
    data_dir = os.environ.get("DIGITWATCH_DATA_DIR")
    idx = Path(data_dir or "-") / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    if idx.is_file():
        images = np.frombuffer(idx.read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)
        return [images[i % len(images)] for i in range(n)]
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
        return proc_status(self.popen.pid, "VmHWM") / 1024

    def tree_peak_mb(self) -> float:
        """Peak RSS of the process plus its child processes (digitwatch's workers)."""
        return sum(proc_status(p, "VmHWM") for p in tree_pids(self.popen.pid)) / 1024

    def rss_mb(self) -> float:
        """Current RSS of the process and its workers together."""
        return sum(proc_status(p, "VmRSS") for p in tree_pids(self.popen.pid)) / 1024

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def tree_pids(pid: int) -> list[int]:
    """The process and its child processes (digitwatch's workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def proc_status(pid: int, key: str) -> int:
    """A number field of /proc/PID/status (kB for the Vm* fields), 0 when absent."""
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


_ROOTS: list[Path] = []
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def bench_parent() -> Path:
    """`$BENCH_TMP/dwbench` (default: the temp folder), marked as a top of directory tree.

    On ext4 the allocator places a new folder in its parent's block group and a file's
    inode near its folder, and on a journal-less ext4 (this machine's) it skips, one by
    one, every inode of the group deleted in the last 1-6 minutes (`recently_deleted`,
    seen with perf): after a test run deleted thousands of files in /tmp, creating a file
    there cost ~1 ms instead of ~30 us, for both sides, which squeezed the ratio toward 1.
    With the TOPDIR flag (chattr +T) each run's folder is spread to another block group,
    as top-level folders are. Best effort: other filesystems ignore or refuse the flag.
    """
    parent = Path(os.environ.get("BENCH_TMP") or tempfile.gettempdir()) / "dwbench"
    parent.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = array.array("l", [0])
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
            if not flags[0] & _FS_TOPDIR_FL:
                flags[0] |= _FS_TOPDIR_FL
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
        finally:
            os.close(fd)
    return parent


@contextlib.contextmanager
def folders() -> Iterator[tuple[Path, Path, Path]]:
    """Fresh folders per run, removed only when the script ends (deletions slow creates)."""
    root = Path(tempfile.mkdtemp(prefix="run-", dir=bench_parent()))
    _ROOTS.append(root)
    for sub in ("stage", "inbox", "outbox"):
        (root / sub).mkdir()
    yield root / "stage", root / "inbox", root / "outbox"


def _cleanup() -> None:
    for root in _ROOTS:
        shutil.rmtree(root, ignore_errors=True)


atexit.register(_cleanup)


class Arrivals(threading.Thread):
    """Results appearing in an outbox, from inotify: the time each key was first seen.

    A result counts when its name is complete: renamed into place (digitwatch, IN_MOVED_TO)
    or closed after writing (the baseline, IN_CLOSE_WRITE). Reading events costs a few us
    per file, where listing a growing outbox every few ms cost the daemon a core's share.
    """

    _MASK = 0x08 | 0x80  # IN_CLOSE_WRITE | IN_MOVED_TO
    _EVENT = struct.Struct("iIII")

    def __init__(self, outbox: Path) -> None:
        super().__init__(daemon=True)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, bytes(outbox), self._MASK) < 0:
            raise OSError(ctypes.get_errno(), "inotify")
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self.done = False
        self.start()

    def run(self) -> None:
        while not self.done:
            select.select([self.fd], [], [], 0.1)
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            now = time.perf_counter()
            i, keys = 0, []
            while i < len(buf):
                _wd, _mask, _cookie, length = self._EVENT.unpack_from(buf, i)
                name = buf[i + 16 : i + 16 + length].rstrip(b"\0").decode()
                i += 16 + length
                if name.endswith(".json") and not name.startswith("."):
                    keys.append(name.split(".", 1)[0])  # img000123
            with self.cond:
                for k in keys:
                    self.seen.setdefault(k, now)
                self.cond.notify_all()

    def wait(self, n: int, timeout: float) -> float:
        """Block until n distinct results were seen; the time the n-th one appeared."""
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.seen) >= n, timeout):
                raise TimeoutError(f"{len(self.seen)} of {n} results after {timeout} s")
            return sorted(self.seen.values())[n - 1]

    def close(self) -> None:
        self.done = True
        self.join()
        os.close(self.fd)


# ---------------------------------------------------------------- measurements


def stage_files(stage: Path, blobs: list[bytes], ext: str) -> list[str]:
    """Write the workload into the staging folder; the names, in the order to drop them."""
    names = [f"img{i:06d}.{ext}" for i in range(len(blobs))]
    for name, blob in zip(names, blobs, strict=True):
        (stage / name).write_bytes(blob)
    return names


def clean_start() -> None:
    """Write back what is dirty before a contender starts, so each starts from a clean cache.

    Without it digitwatch's first sync per batch (syncfs: the whole filesystem) also wrote
    back the files just staged for it (132 MB for the 12 MP burst) and the previous
    baseline's results, which the baseline itself never syncs: work of the harness and of
    the other contender, charged to digitwatch alone.
    """
    os.sync()


def burst(start: Starter, blobs: list[bytes], ext: str) -> dict[str, float]:
    with folders() as (stage, inbox, outbox):
        names = stage_files(stage, blobs, ext)
        create_us = create_cost_us(outbox)
        clean_start()
        proc = start(inbox, outbox)
        arrivals = Arrivals(outbox)
        try:
            t0 = time.perf_counter()
            for name in names:
                os.rename(stage / name, inbox / name)  # noqa: PTH104 (the producer: keep it fast)
            t1 = arrivals.wait(len(names), timeout=600)
            return {
                "create_us": create_us,
                "rate": len(names) / (t1 - t0),
                "seconds": t1 - t0,
                "ready_s": proc.ready,
                "peak_rss_mb": proc.rss_peak_mb(),
                "tree_rss_mb": proc.tree_peak_mb(),
            }
        finally:
            arrivals.close()
            proc.stop()


def paced(start: Starter, blobs: list[bytes], ext: str, rate: float) -> dict[str, float]:
    with folders() as (stage, inbox, outbox):
        names = stage_files(stage, blobs, ext)
        clean_start()
        proc = start(inbox, outbox)
        arrivals = Arrivals(outbox)
        dropped: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            for i, name in enumerate(names):
                due = t0 + i / rate
                while (now := time.perf_counter()) < due:
                    time.sleep(min(0.002, due - now))
                dropped[name.split(".", 1)[0]] = time.perf_counter()
                os.rename(stage / name, inbox / name)  # noqa: PTH104 (the producer: keep it fast)
            arrivals.wait(len(names), timeout=60)
        finally:
            arrivals.close()
            proc.stop()
        lat = sorted((arrivals.seen[k] - t) * 1000 for k, t in dropped.items())
        q = statistics.quantiles(lat, n=100)
        return {"p50": q[49], "p90": q[89], "p99": q[98], "max": lat[-1], "n": len(lat)}


def long_run(blobs: list[bytes], total: int, extra: list[str]) -> dict[str, float]:
    """Feed `total` images in rounds; RSS after the first 10% vs at the end."""
    with folders() as (stage, inbox, outbox):
        clean_start()
        proc = start_digitwatch(inbox, outbox, extra)
        arrivals = Arrivals(outbox)
        try:
            rounds = 10
            per = total // rounds
            rss: list[float] = []
            for r in range(rounds):
                for i in range(per):
                    name = f"r{r:02d}i{i:06d}.png"
                    (stage / name).write_bytes(blobs[i % len(blobs)])
                    os.rename(stage / name, inbox / name)  # noqa: PTH104 (the producer: keep it fast)
                arrivals.wait(per * (r + 1), timeout=600)
                rss.append(proc.rss_mb())
            return {
                "images": per * rounds,
                "rss_first_mb": rss[0],
                "rss_last_mb": rss[-1],
                "growth_pct": 100 * (rss[-1] - rss[0]) / rss[0],
                "peak_rss_mb": proc.rss_peak_mb(),
                "tree_rss_mb": proc.tree_peak_mb(),
            }
        finally:
            arrivals.close()
            proc.stop()


# ---------------------------------------------------------------- report


def create_cost_us(folder: Path, n: int = 300) -> float:
    """Median cost of creating (and writing) one small file in a new folder beside `folder`."""
    probe = folder.parent / "probe"
    probe.mkdir()
    times = []
    for i in range(n):
        t = time.perf_counter()
        fd = os.open(probe / f"p{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"{}")
        os.close(fd)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


SLOW_CREATE = """
WARNING: creating a file was slow in some run (> 150 us). Every result is a new file
for both sides, so this squeezes the ratio toward 1. On a journal-less ext4 (this
machine's) the kernel skips inodes deleted in the last 1-6 minutes one by one (see
bench_parent): run later, or elsewhere with BENCH_TMP=/path.
"""


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
    ap.add_argument("--only", default="", help="comma list: png28,jpeg640,jpeg12mp,paced,paced12mp")
    ap.add_argument("--daemon-args", default="", help="extra arguments for digitwatch run")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="burst pairs (digitwatch, then baseline) per workload; the median ratio is shown",
    )
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
    only = set(args.only.split(",")) if args.only else set(sizes) | {"paced", "paced12mp"}
    dw: Starter = lambda i, o: start_digitwatch(i, o, extra, stub=args.stub_preprocess)  # noqa: E731
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"folders: {bench_parent()}; create = median us to create a small file there\n")
    if args.stub_preprocess:
        print("NOTE: preprocessing stubbed (to_mnist = resize): not a product figure\n")
    print(
        "| workload | digitwatch | baseline | ratio: median pair (range) "
        "| digitwatch ready / peak RSS | create us (dw / base) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, n in sizes.items():
        if kind not in only:
            continue
        blobs = workload(kind, n)
        ext = "png" if kind == "png28" else "jpg"
        pairs = [
            (burst(dw, blobs, ext), burst(start_baseline, blobs, ext)) for _ in range(args.repeat)
        ]
        pairs.sort(key=lambda pair: pair[0]["rate"] / pair[1]["rate"])
        d, b = pairs[len(pairs) // 2]  # the median pair
        lo, hi = (pairs[i][0]["rate"] / pairs[i][1]["rate"] for i in (0, -1))
        spread = f" ({lo:.2f}-{hi:.2f})" if len(pairs) > 1 else ""
        print(
            f"| burst {n} x {kind} | {d['rate']:.0f}/s | {b['rate']:.0f}/s "
            f"| {d['rate'] / b['rate']:.2f}x{spread} "
            f"| {d['ready_s']:.2f} s / {d['peak_rss_mb']:.0f} MB, "
            f"{d['tree_rss_mb']:.0f} MB with workers "
            f"(baseline {b['ready_s']:.2f} s / {b['peak_rss_mb']:.0f} MB) "
            f"| {d['create_us']:.0f} / {b['create_us']:.0f} |",
            flush=True,
        )
        if max(max(d["create_us"], b["create_us"]) for d, b in pairs) > 150:
            print(SLOW_CREATE, flush=True)
    # Paced drops: 28x28 PNGs at the 50/s, and 12 MP photos at 30/s, over half of
    # what digitwatch drains in a burst and more than the baseline can (~20/s): a photo
    # arrives while others are in the workers.
    paced_runs = {"paced": ("png28", 1000, 50.0), "paced12mp": ("jpeg12mp", 200, 30.0)}
    for key, (kind, n, rate) in paced_runs.items():
        if key not in only:
            continue
        n = n // 4 if args.quick else n
        blobs = workload(kind, n)
        ext = "png" if kind == "png28" else "jpg"
        d = paced(dw, blobs, ext, rate)
        b = paced(start_baseline, blobs, ext, rate)
        for name, r in (("digitwatch", d), ("baseline", b)):
            print(
                f"| paced {rate:.0f}/s, {n} x {kind}, {name} | p50 {r['p50']:.1f} ms "
                f"| p90 {r['p90']:.1f} ms | p99 {r['p99']:.1f} ms | max {r['max']:.1f} ms |",
                flush=True,
            )
    if args.long:
        r = long_run(workload("png28", 1000), args.long, extra)
        print(
            f"| long run {r['images']:.0f} x png28 | RSS with workers {r['rss_first_mb']:.0f} MB "
            "after 10% "
            f"| {r['rss_last_mb']:.0f} MB at end | growth {r['growth_pct']:.1f}% "
            f"| peak {r['peak_rss_mb']:.0f} MB ({r['tree_rss_mb']:.0f} MB with workers) |"
        )


if __name__ == "__main__":
    main()
