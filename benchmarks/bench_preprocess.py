"""Preprocessing cost: decode + to_mnist on one core, and hostile files' time and memory.

    .venv/bin/python benchmarks/bench_preprocess.py [--reps 2000] [--agree 6]

Issue 3's budget: <= 1 ms for a 28x28 PNG and <= 30 ms for a 12-megapixel JPEG photo.
OpenCV is held to one thread. Each hostile file is decoded in a fresh process so its
peak RSS (VmHWM) is its own. `--agree N` renders N phone photos at 12 MP and checks the
reduced JPEG decode gives the same digit as a full-resolution decode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import corpus  # noqa: E402

from digitwatch.classify import Classifier, load_weights  # noqa: E402
from digitwatch.codec import Limits, decode  # noqa: E402
from digitwatch.preprocess import to_mnist  # noqa: E402
from digitwatch.settings import DEFAULT_WEIGHTS  # noqa: E402


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def _time(fn: object, reps: int) -> tuple[float, float]:
    """(median, 95th percentile) milliseconds of fn() over reps calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def _digit(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((28, 28), np.uint8)
    cv2.ellipse(img, (14, 14), (6, 9), int(rng.integers(0, 30)), 0, 360, 255, 2, cv2.LINE_AA)
    return img


def _photo_12mp(d28: np.ndarray, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = corpus._photo(d28, rng, size=(4000, 4001), digit=(0.3, 0.5))
    img = cv2.resize(img, (4000, 3000), interpolation=cv2.INTER_AREA)
    return corpus.jpeg(img, 90)


def hostile_child(name: str) -> None:
    data = corpus.hostile()[name]
    before = _peak_kib()
    t0 = time.perf_counter()
    try:
        decode(data, Limits())
        outcome = "decoded?!"
    except Exception as e:  # the report shows whatever happened
        outcome = f"{type(e).__name__}: {e}"
    ms = (time.perf_counter() - t0) * 1000
    print(json.dumps({"ms": ms, "before_kib": before, "peak_kib": _peak_kib(), "outcome": outcome}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--agree", type=int, default=6, help="12 MP photos to compare decodes on")
    ap.add_argument("--hostile-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    cv2.setNumThreads(1)
    if a.hostile_child:
        hostile_child(a.hostile_child)
        return
    limits = Limits()

    small = [corpus.png(_digit(i)) for i in range(50)]
    it = iter(range(10**9))
    print("| input | step | median ms | p95 ms |")
    print("| --- | --- | ---: | ---: |")
    for label, fn in [
        ("decode", lambda: decode(small[next(it) % 50], limits)),
        ("decode + to_mnist", lambda: to_mnist(decode(small[next(it) % 50], limits))),
    ]:
        med, p95 = _time(fn, a.reps)
        print(f"| 28x28 PNG | {label} | {med:.3f} | {p95:.3f} |")

    from digitwatch.mnist import load_mnist

    images, labels = load_mnist(
        REPO.parent / "shared" / "data" / "mnist", train=False, download=False
    )
    photo = _photo_12mp(images[0], 0)
    g = decode(photo, limits)
    for label, fn in [
        ("decode (reduced)", lambda: decode(photo, limits)),
        ("to_mnist", lambda: to_mnist(g)),
        ("decode + to_mnist", lambda: to_mnist(decode(photo, limits))),
        (
            "full-size decode, for comparison",
            lambda: cv2.imdecode(np.frombuffer(photo, np.uint8), 0),
        ),
    ]:
        med, p95 = _time(fn, 20)
        print(f"| 4000x3000 JPEG ({len(photo) // 1024} KB) | {label} | {med:.2f} | {p95:.2f} |")

    if a.agree:
        clf = Classifier(load_weights(DEFAULT_WEIGHTS))
        same = right_reduced = right_full = 0
        for i in range(a.agree):
            data = _photo_12mp(images[i], i)
            full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
            outs = [to_mnist(decode(data, limits)), to_mnist(full)]
            preds = [
                -1 if o is None else int(clf.probabilities(clf.normalize(o[None])).argmax())
                for o in outs
            ]
            same += preds[0] == preds[1]
            right_reduced += preds[0] == labels[i]
            right_full += preds[1] == labels[i]
        print(
            f"\n12 MP photos, reduced vs full decode: same digit {same}/{a.agree}; "
            f"correct {right_reduced} (reduced) and {right_full} (full)"
        )

    print("\n| hostile file | bytes | ms | peak RSS MB | outcome |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, data in corpus.hostile().items():
        out = subprocess.run(
            [sys.executable, __file__, "--hostile-child", name],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout)
        print(
            f"| {name} | {len(data)} | {r['ms']:.2f} | {r['peak_kib'] / 1024:.0f} "
            f"| {r['outcome']} |"
        )


if __name__ == "__main__":
    main()
