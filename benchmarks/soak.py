"""Soak: run the real daemon for a long time at a steady rate with good and hostile files.

Every --sample seconds it records, for the daemon and its workers together, RSS, open
file descriptors and threads, and prints them as a table; at the end it checks that
every file dropped has exactly one CSV row and one JSON result, and prints first, last
and peak of each series. A flat series is the pass mark (RSS growth under 10%, no
descriptor or thread growth). Usage:

    python benchmarks/soak.py --minutes 30 --rate 20 [--hostile-every 10]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import corpus
from bench_daemon import (
    Arrivals,
    bench_parent,
    proc_status,
    start_digitwatch,
    tree_pids,
    workload,
)


def sample(pid: int) -> dict[str, float]:
    pids = tree_pids(pid)
    return {
        "rss_mb": sum(proc_status(p, "VmRSS") for p in pids) / 1024,
        "fds": sum(sum(1 for _ in Path(f"/proc/{p}/fd").iterdir()) for p in pids),
        "threads": sum(proc_status(p, "Threads") for p in pids),
        "processes": len(pids),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=float, default=20, help="files per second")
    ap.add_argument("--hostile-every", type=int, default=10, help="1 hostile file in N")
    ap.add_argument("--sample", type=float, default=60, help="seconds between samples")
    ap.add_argument("--keep", action="store_true", help="keep the folders (else removed)")
    args = ap.parse_args()

    good = workload("png28", 500) + workload("jpeg640", 4)
    hostile = list(corpus.hostile(seed=1).values())
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="soak-", dir=bench_parent()))
    stage, inbox, outbox = root / "stage", root / "inbox", root / "outbox"
    for d in (stage, inbox, outbox):
        d.mkdir()
    proc = start_digitwatch(inbox, outbox, [])
    arrivals = Arrivals(outbox)
    pid = proc.popen.pid
    print(f"soak: {args.minutes} min at {args.rate}/s, 1 hostile in {args.hostile_every}")
    print(f"folders: {root}\n")
    print("| minute | files | RSS MB (all processes) | open fds | threads | processes |")
    print("| --- | --- | --- | --- | --- | --- |")
    series: list[dict[str, float]] = []
    sent = 0
    t0 = time.monotonic()
    next_sample = t0
    end = t0 + args.minutes * 60
    try:
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                s = sample(pid)
                series.append(s)
                print(
                    f"| {(now - t0) / 60:.1f} | {sent} | {s['rss_mb']:.0f} | {s['fds']:.0f} "
                    f"| {s['threads']:.0f} | {s['processes']:.0f} |",
                    flush=True,
                )
                next_sample += args.sample
            due = t0 + sent / args.rate
            if now < due:
                time.sleep(min(0.05, due - now))
                continue
            hostile_turn = sent % args.hostile_every == args.hostile_every - 1
            data = hostile[rng.integers(len(hostile))] if hostile_turn else good[sent % len(good)]
            name = f"f{sent:07d}.{'png' if hostile_turn else 'img'}"
            (stage / name).write_bytes(data)
            (stage / name).rename(inbox / name)
            sent += 1
        arrivals.wait(sent, timeout=120)
        series.append(sample(pid))
        with (outbox / "results.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
    finally:
        arrivals.close()
        proc.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    inputs = [r["input"] for r in rows]
    errors = sum(r["status"] == "error" for r in rows)
    distinct = len(set(inputs))
    print(f"\n{sent} files sent; {len(rows)} CSV rows ({distinct} distinct), {errors} errors")
    for key in ("rss_mb", "fds", "threads", "processes"):
        values = [s[key] for s in series]
        first, last = values[min(1, len(values) - 1)], values[-1]
        growth = 100 * (last - first) / first if first else 0.0
        print(f"{key}: first {first:.0f}, last {last:.0f}, peak {max(values):.0f} ({growth:+.1f}%)")
    ok = len(rows) == sent == len(set(inputs))
    print("exactly once:", "yes" if ok else "NO")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
