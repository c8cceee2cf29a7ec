"""The curve `--uncertain-below` is chosen from: flagged shares of wrong and right answers.

    .venv/bin/python benchmarks/uncertainty_curve.py [--n 200] [--kinds a,b] [--weights W]

Every generated corpus kind (tests/corpus.py, as benchmarks/corpus_accuracy.py makes
them) goes through the pipeline once; then, for each threshold, the share of the wrong
answers whose confidence is under it (they would carry `uncertain: true`) and the share
of the right answers under it. A no_digit answer counts as wrong and always flagged, as
the pipeline flags it. The MNIST test digits as PNG files are reported beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import corpus  # noqa: E402
from corpus_accuracy import _mnist  # noqa: E402

from digitwatch.classify import load_weights  # noqa: E402
from digitwatch.codec import Limits, encode_png  # noqa: E402
from digitwatch.pipeline import Input, Pipeline  # noqa: E402
from digitwatch.settings import DEFAULT_WEIGHTS, Settings  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)

Answers = tuple[np.ndarray, np.ndarray]  # (confidence, right), one entry per file


def answers(items: list[Input], labels: np.ndarray, weights_path: Path) -> Answers:
    with Pipeline(load_weights(weights_path), limits=Limits(), uncertain_below=0.0) as pipe:
        records = [r.record for r in pipe.run(items)]
    conf = np.array([-1.0 if r.confidence is None else r.confidence for r in records])
    digits = np.array([-1 if r.digit is None else r.digit for r in records])
    return conf, digits == labels


def run_kind(args: tuple[str, int, int, str]) -> tuple[str, Answers]:
    kind, n, seed, weights_path = args
    images, labels = _mnist()
    idx = corpus.pick(labels, n, seed, kind)
    samples = corpus.make_kind(kind, images[idx], labels[idx], seed)
    items = [Input(s.name, s.data) for s in samples]
    return kind, answers(items, np.array([s.label for s in samples]), Path(weights_path))


def shares(a: Answers, threshold: float) -> tuple[float, float]:
    conf, right = a
    flagged = conf < threshold  # no_digit (-1) is always flagged
    return (
        float((flagged & ~right).sum() / max(1, (~right).sum())),
        float((flagged & right).sum() / max(1, right.sum())),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="digits per kind")
    ap.add_argument("--seed", type=int, default=1, help="corpus seed (tests use 0)")
    ap.add_argument("--kinds", default="", help="comma-separated kinds (default: all)")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-mnist", action="store_true", help="skip the 10,000 MNIST PNG files")
    a = ap.parse_args()
    kinds = a.kinds.split(",") if a.kinds else corpus.kinds()
    jobs = [(k, a.n, a.seed, str(a.weights)) for k in kinds if not k.startswith("mnist_")]
    with ProcessPoolExecutor(a.jobs) as pool:
        per_kind = dict(pool.map(run_kind, jobs))
    conf = np.concatenate([c for c, _ in per_kind.values()])
    right = np.concatenate([r for _, r in per_kind.values()])
    corpus_all = (conf, right)
    mnist_all = None
    if not a.no_mnist:
        images, labels = _mnist()
        items = [Input(f"{i}.png", encode_png(img)) for i, img in enumerate(images)]
        mnist_all = answers(items, labels, a.weights)

    print(f"weights: {a.weights}; {len(jobs)} corpus kinds x {a.n} (seed {a.seed})")
    print(
        f"corpus: {int(right.sum())}/{len(right)} right; "
        + (f"MNIST test as PNG: {mnist_all[1].mean():.2%} right" if mnist_all else "")
    )
    print(f"default today: --uncertain-below {Settings().uncertain_below}")
    print()
    print("| uncertain below | corpus: wrong flagged | corpus: right flagged |", end="")
    print(" MNIST: wrong flagged | MNIST: right flagged |" if mnist_all else "")
    print("| ---: | ---: | ---: |" + (" ---: | ---: |" if mnist_all else ""))
    for t in THRESHOLDS:
        w, r = shares(corpus_all, t)
        row = f"| {t:g} | {w:.1%} | {r:.2%} |"
        if mnist_all:
            mw, mr = shares(mnist_all, t)
            row += f" {mw:.1%} | {mr:.2%} |"
        print(row)
    print()
    t = Settings().uncertain_below
    print(f"per kind at {t:g}: | kind | right | wrong flagged | right flagged |")
    for kind, ans in per_kind.items():
        w, r = shares(ans, t)
        print(f"| {kind} | {ans[1].mean():.1%} | {w:.0%} of {int((~ans[1]).sum())} | {r:.1%} |")


if __name__ == "__main__":
    main()
