"""`digitwatch status --json` on an outbox whose results.csv has a million rows.

Times the whole command as a user runs it (a fresh process), with the summary the
service keeps beside the CSV, with a stale summary (the last 1,000 rows beyond it), and
without one (a full read of the CSV).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from digitwatch import summary

ROW = (
    "photo_{i:07d}.jpg,9f2c4e5b0a1d3c6f7e8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e,"
    "{status},{digit},0.998412,false,{error},mlp-784-128-64-10@6bdebfa9eeff,"
    "2026-11-25T04:12:01.131090+00:00\r\n"
)
HEADER = "input,sha256,status,digit,confidence,uncertain,error,model,processed_at\r\n"


def _rows(start: int, n: int) -> str:
    out = []
    for i in range(start, start + n):
        status = "error" if i % 97 == 0 else "ok"
        digit, error = ("", "cannot decode PNG") if status == "error" else (str(i % 10), "")
        out.append(ROW.format(i=i, status=status, digit=digit, error=error))
    return "".join(out)


def _time(inbox: Path, outbox: Path, reps: int) -> float:
    cmd = [sys.executable, "-m", "digitwatch", "status", "--json"]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(
            [*cmd, "--inbox", str(inbox), "--outbox", str(outbox)],
            check=True,
            capture_output=True,
        )
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inbox, outbox = Path(tmp) / "inbox", Path(tmp) / "outbox"
        inbox.mkdir()
        outbox.mkdir()
        csv_path = outbox / "results.csv"
        with csv_path.open("w", newline="") as f:
            f.write(HEADER)
            for start in range(0, args.rows - 1000, 100_000):
                f.write(_rows(start, min(100_000, args.rows - 1000 - start)))
        fd = os.open(csv_path, os.O_RDONLY)
        summary.advance(outbox, fd)
        os.close(fd)
        with csv_path.open("a", newline="") as f:
            f.write(_rows(args.rows - 1000, 1000))
        mb = csv_path.stat().st_size / 1e6
        print(f"results.csv: {args.rows} rows, {mb:.0f} MB; best of {args.reps}, wall time")
        print(f"| summary, 1,000 rows beyond it | {_time(inbox, outbox, args.reps):.2f} s |")
        fd = os.open(csv_path, os.O_RDONLY)
        summary.advance(outbox, fd)
        os.close(fd)
        print(f"| summary up to date | {_time(inbox, outbox, args.reps):.2f} s |")
        summary.summary_path(outbox).unlink()
        print(f"| no summary (full read) | {_time(inbox, outbox, 1):.2f} s |")


if __name__ == "__main__":
    main()
