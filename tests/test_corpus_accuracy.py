"""Accuracy on the generated realistic corpus, per kind, and on MNIST test digits as files.

Issue 3's numbers: >= 97% on every kind and >= 98.8% on MNIST test digits given as
files. The corpus is seeded, so these are fixed numbers for given weights; a smaller
sample than benchmarks/corpus_accuracy.py keeps the suite quick.
"""

from __future__ import annotations

from pathlib import Path

import corpus
import numpy as np
import pytest

from digitwatch import pipeline
from digitwatch.classify import load_weights
from digitwatch.codec import Limits
from digitwatch.mnist import load_mnist
from digitwatch.pipeline import Input, Pipeline

PER_KIND = 200  # at 100 a kind swings +-2 points on which digits are drawn
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mnist_test(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(mnist_dir, train=False, download=False)


@pytest.fixture(scope="module")
def pipe(weights_path: Path) -> Pipeline:
    return Pipeline(load_weights(weights_path), limits=Limits(), uncertain_below=0.0)


def _accuracy(pipe: Pipeline, samples: list[corpus.Sample]) -> float:
    results = pipe.run([Input(s.name, s.data) for s in samples])
    errors = [r.record.error for r in results if r.record.status == "error"]
    assert not errors, errors[:3]
    return float(
        np.mean([r.record.digit == s.label for r, s in zip(results, samples, strict=True)])
    )


FIRST_KINDS = sorted(
    k for k in corpus.KINDS if k not in corpus.ADDED and not k.startswith("mnist_")
)


@pytest.mark.parametrize("kind", FIRST_KINDS)
def test_every_kind_reaches_97_percent(
    kind: str, pipe: Pipeline, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = mnist_test
    idx = corpus.pick(labels, PER_KIND, seed=0)
    acc = _accuracy(pipe, corpus.make_kind(kind, images[idx], labels[idx], seed=0))
    assert acc >= 0.97, f"{kind}: {acc:.1%} on {PER_KIND}"


# Floors for the kinds issue 12 added, each two to four points under the lowest of seeds
# 0, 1 and 2 (n=200, shipped weights, preprocessing version 4; benchmarks/corpus_accuracy.py
# --seed N --n 200), so they hold on any seed and fail when a change loses a class of
# photos. Seed 1 tuned the preprocessing; this test runs seed 0. Issue 12's aim is 98% on
# every kind: raise each floor as the preprocessing and the model get there. The
# continental kinds are the model's to fix (a flag on a 1 reads as 7).
ADDED_FLOORS = {
    "photo_faint_stroke": 0.93,  # seeds 0 / 1 / 2: 96.0 / 98.0 / 97.5%
    "photo_pencil": 0.89,  # 92.0 / 93.5 / 92.0%
    "photo_low_contrast": 0.80,  # 88.5 / 88.0 / 83.5%
    "crop_filled": 0.90,  # 93.5 / 96.5 / 97.5%
    "canvas_thin_big": 0.94,  # 97.0 / 98.0 / 98.0%
    "continental_photo": 0.83,  # 87.0 / 87.0 / 88.5%
    "continental_canvas": 0.82,  # 87.0 / 85.5 / 89.5%
}


def test_every_added_kind_has_a_floor() -> None:
    assert set(ADDED_FLOORS) == set(corpus.ADDED)


@pytest.mark.parametrize("kind", sorted(ADDED_FLOORS))
def test_harsh_kinds_stay_above_their_floor(
    kind: str, pipe: Pipeline, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = mnist_test
    idx = corpus.pick(labels, PER_KIND, seed=0, kind=kind)
    acc = _accuracy(pipe, corpus.make_kind(kind, images[idx], labels[idx], seed=0))
    assert acc >= ADDED_FLOORS[kind], f"{kind}: {acc:.1%} on {PER_KIND}"


@pytest.mark.parametrize("kind", ["mnist_28", "mnist_upscaled"])
def test_mnist_test_digits_as_files_reach_98_8_percent(
    kind: str, pipe: Pipeline, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = mnist_test  # all 10,000: the margin over 98.8% is a tenth of a point
    acc = _accuracy(pipe, corpus.make_kind(kind, images, labels, seed=0))
    assert acc >= 0.988, f"{kind}: {acc:.2%} on {len(labels)}"


def test_generated_corpus_is_reproducible(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist_test
    a = corpus.make_kind("photo_ruled", images[:3], labels[:3], seed=0)
    b = corpus.make_kind("photo_ruled", images[:3], labels[:3], seed=0)
    assert [s.data for s in a] == [s.data for s in b]


def test_runs_of_any_size_give_the_same_answers_in_order(
    pipe: Pipeline,
    mnist_test: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunk is prepared stage by stage over runs; where a run ends changes no answer."""
    images, labels = mnist_test
    idx = corpus.pick(labels, 4, seed=1)
    files = {
        s.name: s.data
        for k in ("photo_ruled", "scan_16", "mnist_28")
        for s in corpus.make_kind(k, images[idx], labels[idx], seed=1)
    }
    files |= corpus.hostile()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    inputs = [Input(n, path=str(tmp_path / n)) for n in sorted(files)]
    inputs.insert(3, Input("missing.png", path=str(tmp_path / "missing.png")))

    def answers() -> list[tuple[object, ...]]:
        return [
            (r.record.input, r.record.sha256, r.record.status, r.record.digit, r.record.error)
            for r in pipe.run(inputs)
        ]

    whole = answers()
    monkeypatch.setattr(pipeline, "_RUN_BYTES", 1)
    monkeypatch.setattr(pipeline, "_RUN_PIXELS", 1)
    assert answers() == whole
    assert [a[0] for a in whole] == [i.name for i in inputs]
    statuses = {a[0]: a[2] for a in whole}
    assert statuses["missing.png"] == "error" and statuses["empty"] == "error"
    assert sum(s == "ok" for s in statuses.values()) >= 12
