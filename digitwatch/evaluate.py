"""Score weights on the MNIST test set: accuracy, per-class accuracy, confusion, errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from digitwatch.classify import Classifier, Weights, load_weights
from digitwatch.codec import Limits, contact_sheet, write_png
from digitwatch.mnist import load_mnist
from digitwatch.pipeline import Input, Pipeline
from digitwatch.preprocess import deskew_all

SHEET_LIMIT = 600  # a weak model's thousands of errors would make an unreadable sheet


@dataclass(frozen=True)
class Evaluation:
    weights: str
    model: str
    accuracy: float
    per_class: list[float]
    confusion: list[list[int]]  # confusion[true][predicted]
    errors: int
    uncertain_below: float
    wrong_flagged: float  # share of the wrong answers with a confidence under uncertain_below
    right_flagged: float  # share of the right answers flagged the same way
    pipeline_accuracy: float | None  # the same digits as PNG files through decode+preprocess
    pipeline_wrong_flagged: float | None
    pipeline_right_flagged: float | None
    sheet: str | None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _confusion(truth: npt.NDArray[np.int64], pred: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    m = np.zeros((10, 10), np.int64)
    np.add.at(m, (truth, pred), 1)
    return m


def flagged_shares(
    right: npt.NDArray[np.bool_], uncertain: npt.NDArray[np.bool_]
) -> tuple[float, float]:
    """(share of the wrong answers flagged uncertain, share of the right answers flagged)."""
    wrong = ~right
    return (
        float((uncertain & wrong).sum() / max(1, wrong.sum())),
        float((uncertain & right).sum() / max(1, right.sum())),
    )


def evaluate(
    weights_path: Path,
    data_dir: Path,
    *,
    download: bool = True,
    through_pipeline: bool = False,
    sheet_path: Path | None = None,
    uncertain_below: float = 0.0,
) -> Evaluation:
    weights = load_weights(weights_path)
    classifier = Classifier(weights)
    images, labels = load_mnist(data_dir, train=False, download=download)
    # The model's own score: MNIST's digits with the pipeline's last step (deskew) only.
    probs = classifier.probabilities(classifier.normalize(deskew_all(images)))
    pred = probs.argmax(1)
    wrong_flagged, right_flagged = flagged_shares(pred == labels, probs.max(1) < uncertain_below)
    conf = _confusion(labels, pred)
    wrong = np.nonzero(pred != labels)[0]
    sheet = None
    if sheet_path is not None:
        shown = wrong[:SHEET_LIMIT]
        captions = [f"{labels[i]}->{pred[i]}" for i in shown]
        write_png(sheet_path, contact_sheet([images[i] for i in shown], captions))
        sheet = str(sheet_path)
    pipeline: tuple[float | None, float | None, float | None] = (None, None, None)
    if through_pipeline:
        pipeline = _pipeline_accuracy(weights, images, labels, uncertain_below)
    return Evaluation(
        weights=str(weights_path),
        model=weights.model_id,
        accuracy=float((pred == labels).mean()),
        per_class=[float(conf[c, c] / conf[c].sum()) for c in range(10)],
        confusion=conf.tolist(),
        errors=len(wrong),
        uncertain_below=uncertain_below,
        wrong_flagged=wrong_flagged,
        right_flagged=right_flagged,
        pipeline_accuracy=pipeline[0],
        pipeline_wrong_flagged=pipeline[1],
        pipeline_right_flagged=pipeline[2],
        sheet=sheet,
    )


def _pipeline_accuracy(
    weights: Weights,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    uncertain_below: float,
) -> tuple[float, float, float]:
    """Encode each test digit as a PNG and send it through the product's pipeline:
    (accuracy, share of wrong answers flagged uncertain, share of right answers flagged)."""
    from digitwatch.codec import encode_png

    with Pipeline(weights, limits=Limits(), uncertain_below=uncertain_below) as pipe:
        results = pipe.run([Input(f"{i}.png", encode_png(img)) for i, img in enumerate(images)])
    digits = np.array([-1 if r.record.digit is None else r.record.digit for r in results])
    right = digits == labels
    flagged = np.array([r.record.uncertain for r in results])
    return (float(right.mean()), *flagged_shares(right, flagged))
