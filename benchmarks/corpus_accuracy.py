"""Accuracy per kind of generated file: our pipeline against the starting point's.

    .venv/bin/python benchmarks/corpus_accuracy.py [--n 500] [--kinds a,b] [--mnist-files]

The corpus comes from tests/corpus.py (seeded, rendered from MNIST test digits). The
baseline is the student code this project started from: cv2.imdecode as gray, inverse
threshold at 128, the whole image resized to 28x28, then the same normalization and
the same shipped weights as ours. `--mnist-files` also scores all 10,000 MNIST test
digits as 28x28 white-on-black PNGs and as upscaled dark-on-white PNGs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import corpus  # noqa: E402

from digitwatch.classify import Classifier, load_weights  # noqa: E402
from digitwatch.codec import Limits  # noqa: E402
from digitwatch.pipeline import Input, Pipeline  # noqa: E402
from digitwatch.settings import DEFAULT_WEIGHTS, Settings  # noqa: E402


def baseline_image(data: bytes) -> np.ndarray | None:
    """The starting point's preprocessing: threshold at 128 and resize the whole image."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None
    _, inv = cv2.threshold(img, 128, 255, cv2.THRESH_BINARY_INV)
    return cv2.resize(inv, (28, 28))


Score = tuple[float, float, int, float, int, int, int, int]


def score(samples: list[corpus.Sample], weights_path: Path, uncertain_below: float) -> Score:
    """(ours, baseline, no_digit answers of ours, ms per image of ours, wrong answers,
    wrong answers flagged uncertain, right answers, right answers flagged uncertain)."""
    weights = load_weights(weights_path)
    labels = np.array([s.label for s in samples])
    with Pipeline(weights, limits=Limits(), uncertain_below=uncertain_below) as pipe:
        t0 = time.perf_counter()
        results = pipe.run([Input(s.name, s.data) for s in samples])
        ms = (time.perf_counter() - t0) * 1000 / len(samples)
    ours = np.array([-1 if r.record.digit is None else r.record.digit for r in results])
    no_digit = sum(r.record.status == "no_digit" for r in results)
    flagged = np.array([r.record.uncertain for r in results])
    right = ours == labels
    clf = Classifier(weights)
    base = np.full(len(samples), -1)
    imgs = [baseline_image(s.data) for s in samples]
    ok = [i for i, im in enumerate(imgs) if im is not None]
    if ok:
        probs = clf.probabilities(clf.normalize(np.stack([imgs[i] for i in ok])))
        base[ok] = probs.argmax(1)
    return (
        float(right.mean()),
        float((base == labels).mean()),
        no_digit,
        ms,
        int((~right).sum()),
        int((flagged & ~right).sum()),
        int(right.sum()),
        int((flagged & right).sum()),
    )


def run_kind(args: tuple[str, int, int, str, float]) -> tuple[str, int, Score]:
    kind, n, seed, weights_path, uncertain_below = args
    images, labels = _mnist()
    idx = corpus.pick(labels, n, seed, kind)
    samples = corpus.make_kind(kind, images[idx], labels[idx], seed)
    return kind, n, score(samples, Path(weights_path), uncertain_below)


_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    if "test" not in _CACHE:
        from digitwatch.mnist import load_mnist

        root = Path(
            os.environ.get("DIGITWATCH_DATA_DIR", REPO.parent / "shared" / "data" / "mnist")
        )
        _CACHE["test"] = load_mnist(root, train=False, download=False)
    return _CACHE["test"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="digits per kind")
    ap.add_argument("--seed", type=int, default=1, help="corpus seed (tests use 0)")
    ap.add_argument("--kinds", default="", help="comma-separated kinds (default: all)")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mnist-files", action="store_true", help="also all 10,000 test digits")
    ap.add_argument(
        "--uncertain-below", type=float, default=Settings().uncertain_below, help="flag threshold"
    )
    a = ap.parse_args()
    kinds = a.kinds.split(",") if a.kinds else corpus.kinds()
    if a.mnist_files:
        kinds = [k for k in kinds if not k.startswith("mnist_")]
    u = a.uncertain_below
    jobs = [(k, a.n, a.seed, str(a.weights), u) for k in kinds]
    if a.mnist_files:
        jobs += [(k, 10_000, a.seed, str(a.weights), u) for k in ("mnist_28", "mnist_upscaled")]
    print(f"weights: {a.weights} (seed {a.seed}, uncertain below {u})")
    print("| kind | N | ours | baseline | ours no_digit | wrong flagged | right flagged | ms/img |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 1.0
    totals = np.zeros(4, np.int64)
    with ProcessPoolExecutor(a.jobs) as pool:
        for kind, n, (ours, base, nd, ms, *counts) in pool.map(run_kind, jobs):
            worst = min(worst, ours)
            totals += counts
            wrong, wrong_f, right, right_f = counts
            print(
                f"| {kind} | {n} | {ours:.2%} | {base:.2%} | {nd} | {wrong_f}/{wrong} "
                f"| {right_f / max(1, right):.1%} | {ms:.2f} |",
                flush=True,
            )
    wrong, wrong_f, right, right_f = (int(v) for v in totals)
    print(f"worst kind: {worst:.2%}")
    print(
        f"all kinds: {wrong_f}/{wrong} wrong answers flagged uncertain "
        f"({wrong_f / max(1, wrong):.1%}), {right_f}/{right} right answers flagged "
        f"({right_f / max(1, right):.2%})"
    )


if __name__ == "__main__":
    main()
