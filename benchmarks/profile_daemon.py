"""Profile the real `digitwatch run` under a burst with py-spy; print where the time goes.

Starts the daemon under `py-spy record` (pip install py-spy), renames N 28x28 PNGs into
its inbox, waits for every result, stops it, and folds the sampled stacks into stages:
CPU microseconds per image, by thread and by stage (the innermost matching frame wins).
Usage: python benchmarks/profile_daemon.py [-n 5000] [--kind png28|jpeg640|jpeg12mp]
       [--rate 500] [--daemon-args "..."]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import (
    STUB_PREPROCESS,
    Arrivals,
    bench_parent,
    clean_start,
    create_cost_us,
    stage_files,
    workload,
)

# (stage, substring of a "function (file:line)" frame); checked innermost frame first.
STAGES = [
    ("preprocess", "(digitwatch/preprocess.py)"),
    ("codec", "(digitwatch/codec.py)"),
    ("classify", "(digitwatch/classify.py)"),
    ("structlog", "(structlog/"),
    ("results.py", "(digitwatch/results.py)"),
    ("watchdog", "(watchdog/"),
    ("pipeline", "(digitwatch/pipeline.py)"),
    ("workers", "(digitwatch/workers.py)"),
    ("watch", "(digitwatch/watch/"),
    ("daemon", "(digitwatch/service/"),
]
_LINE = re.compile(r":\d+\)$")


def _stage(frames: list[str]) -> str:
    """The innermost frame of ours or of a library we call, as "stage: function"."""
    for frame in reversed(frames):
        for name, needle in STAGES:
            if needle in frame:
                return f"{name}: {frame.split(' (', 1)[0]}"
    return "other: " + (frames[-1].split(" (", 1)[0] if frames else "?")


def _cpu_ticks(pid: int) -> dict[int, int]:
    """utime + stime per thread id, in clock ticks, for `pid` and its child processes."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            children = (task / "children").read_text().split()
        except OSError:
            continue
        out[int(task.name)] = int(fields[11]) + int(fields[12])
        for child in children:
            out.update(_cpu_ticks(int(child)))
    return out


def fold(raw: Path, cpu_us: dict[int, float], images: int, own: set[int]) -> None:
    """Spread each thread's measured CPU time over its sampled stacks, per image.

    py-spy counts a thread as busy while it waits for the GIL or for a core (this box is
    shared), so samples give proportions within a thread and /proc gives the CPU time.
    """
    stacks: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    names: dict[int, str] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        while frames and frames[0].startswith("process "):  # --subprocesses: parent, child
            frames = frames[1:]
        if not frames:
            continue
        head = frames[0]  # "thread (tid): name"
        tid = int(head.split("(", 1)[1].split(")", 1)[0])
        where = "daemon" if tid in own else "worker"
        names.setdefault(tid, f"{where} {tid}: {head.partition(': ')[2]}")
        stacks[tid][_stage(frames[1:])] += int(count)
    by_stage: dict[str, float] = collections.defaultdict(float)
    total = sum(cpu_us.values()) / images
    print(f"CPU per image (all threads, /proc): {total:.0f} us\n")
    print("| thread | CPU us/image |\n| --- | --- |")
    for tid, us in sorted(cpu_us.items(), key=lambda kv: -kv[1]):
        print(f"| {names.get(tid, tid)} | {us / images:.0f} |")
        samples = sum(stacks[tid].values())
        for stage, n in stacks[tid].items():
            by_stage[stage] += us / images * n / samples
    coarse: dict[str, float] = collections.defaultdict(float)
    for name, us in by_stage.items():
        coarse[name.partition(":")[0]] += us
    print("\n| stage | CPU us/image |\n| --- | --- |")
    for name, us in sorted(coarse.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {us:.0f} |")
    print("\n| stage: innermost function | CPU us/image |\n| --- | --- |")
    for name, us in sorted(by_stage.items(), key=lambda kv: -kv[1])[:30]:
        print(f"| {name} | {us:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--kind", default="png28", choices=["png28", "jpeg640", "jpeg12mp"])
    ap.add_argument("--daemon-args", default="")
    ap.add_argument(
        "--stub-preprocess",
        action="store_true",
        help="replace to_mnist with a plain resize, to see the daemon's own costs",
    )
    ap.add_argument("--keep", type=Path, help="save py-spy's raw stacks here")
    ap.add_argument("--log", type=Path, help="save the daemon's JSON log lines here")
    args = ap.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    blobs = workload(args.kind, args.n)
    root = Path(tempfile.mkdtemp(prefix="prof-", dir=bench_parent()))
    try:
        stage, inbox, outbox = (root / s for s in ("stage", "inbox", "outbox"))
        for d in (stage, inbox, outbox):
            d.mkdir()
        names = stage_files(stage, blobs, "png" if args.kind == "png28" else "jpg")
        clean_start()
        print(f"creating a small file here: {create_cost_us(outbox):.0f} us (median)")
        sock_path = root / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(30)
        cmd = [sys.executable, "-m", "digitwatch", "run", "--inbox", str(inbox)]
        if args.stub_preprocess:
            cmd[1:3] = ["-c", f"exec({STUB_PREPROCESS!r})"]  # one line: py-spy prints cmdlines
        cmd += ["--outbox", str(outbox), "--log-format", "json", *args.daemon_args.split()]
        daemon = subprocess.Popen(
            cmd,
            env=os.environ | {"NOTIFY_SOCKET": str(sock_path)},
            stdout=subprocess.DEVNULL,
            stderr=args.log.open("wb") if args.log else subprocess.DEVNULL,
        )
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
        finally:
            sock.close()
        raw = root / "stacks.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(daemon.pid), "--rate", str(args.rate)]
            + ["--format", "raw", "--threads", "--subprocesses", "--nonblocking", "-o", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # let py-spy attach
        before = _cpu_ticks(daemon.pid)
        stat0 = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
        arrivals = Arrivals(outbox)
        t0 = time.perf_counter()
        for name in names:
            os.rename(stage / name, inbox / name)  # noqa: PTH104 (the producer: keep it fast)
        t1 = arrivals.wait(args.n, timeout=600)
        arrivals.close()
        after = _cpu_ticks(daemon.pid)
        stat1 = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
        delta = [int(b) - int(a) for a, b in zip(stat0, stat1, strict=True)]
        print(f"machine idle during the burst: {100 * (delta[3] + delta[4]) / sum(delta):.0f}%")
        own = {int(t.name) for t in Path(f"/proc/{daemon.pid}/task").iterdir()}
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=15)
        print(f"{args.n} images in {t1 - t0:.2f} s = {args.n / (t1 - t0):.0f}/s\n")
        if args.keep:
            shutil.copy(raw, args.keep)
        tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
        cpu = {t: (v - before.get(t, 0)) * tick_us for t, v in after.items()}
        fold(raw, {t: us for t, us in cpu.items() if us > 0}, args.n, own)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
