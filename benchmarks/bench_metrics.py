"""What the Prometheus metrics cost the service, as a share of a 28x28 burst's time per image.

The daemon counts each committed batch (`Metrics.committed`, on its settle thread) and
renders the registry every 5 s for `--metrics-file` or per scrape for `--metrics-port`.
This times both on real `Record`s and sets the per-answer cost against the time per image
of the 28x28 PNG burst (`--rate`, images/s, from `bench_daemon.py --only png28`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import prometheus_client

from digitwatch.metrics import Metrics
from digitwatch.results import Record


def _records(n: int) -> list[Record]:
    return [
        Record(
            input=f"{i}.png",
            sha256="0" * 64,
            status="ok" if i % 10 else "no_digit",
            digit=i % 10,
            confidence=0.99,
            uncertain=i % 7 == 0,
            probabilities=[0.1] * 10,
            error=None,
            model="mlp",
            width=28,
            height=28,
            elapsed_ms=0.3,
        )
        for i in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=float, default=2783.0, help="28x28 burst, images/s")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()

    m = Metrics(model="mlp-784-128-64-10@bench", workers=2)
    records = _records(args.batch)
    seen = [time.time()] * args.batch
    per_answer = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            m.committed(records, seen)
        per_answer.append((time.perf_counter() - t0) / (args.rounds * args.batch))
    answer_us = statistics.median(per_answer) * 1e6

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "digitwatch.prom")
        t0 = time.perf_counter()
        for _ in range(200):
            prometheus_client.write_to_textfile(path, m.registry)
        write_ms = (time.perf_counter() - t0) / 200 * 1000

    budget_us = 1e6 / args.rate
    print(f"per answer: {answer_us:.2f} us (median of 5 x {args.rounds} batches of {args.batch})")
    print(f"textfile write / scrape: {write_ms:.2f} ms, every 5 s")
    print(
        f"share of a 28x28 burst at {args.rate:.0f}/s ({budget_us:.0f} us per image): "
        f"{answer_us / budget_us:.1%} + {write_ms / 5000:.3%} for the file"
    )


if __name__ == "__main__":
    main()
