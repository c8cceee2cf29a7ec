"""A review queue's decisions as training digits: each image through the same pipeline.

`digitwatch train --extra-labels review/labels.csv` adds them to MNIST's training split.
The images go through decode and preprocessing exactly as the service read them, so the
model learns the 28x28 it will see; decisions without a digit ("none") and images in
which no digit is found are counted and left out: a 10-class model has no "not a digit".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digitwatch import review
from digitwatch.classify import load_weights
from digitwatch.codec import Limits
from digitwatch.errors import ConfigError
from digitwatch.pipeline import Input, Pipeline

# The share of each epoch's samples the corrections make up (by repetition), so that a
# few hundred of them weigh against 55,000 MNIST digits; at most _MAX_REPEAT copies each.
SHARE = 0.02
_MAX_REPEAT = 500


@dataclass
class Corrections:
    images: np.ndarray  # (N, 28, 28) uint8, as preprocess.to_mnist makes them
    labels: np.ndarray  # (N,) int64
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> count

    def repeats(self, n_train: int) -> int:
        """Copies of each correction per epoch: SHARE of the epoch, at least one."""
        if not len(self.labels):
            return 0
        return int(min(_MAX_REPEAT, max(1, round(SHARE * n_train / len(self.labels)))))


def load(labels_csv: Path, weights: Path) -> Corrections:
    """Read a labels.csv and make each decided image into the 28x28 the model sees."""
    try:
        decisions = list(review.labels(labels_csv))
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"--extra-labels {labels_csv}: cannot read it ({e})") from None
    left_out: dict[str, int] = {}
    inputs, digits = [], []
    for image, digit in decisions:
        if digit is None:
            left_out["not a digit"] = left_out.get("not a digit", 0) + 1
            continue
        inputs.append(Input(str(image), path=str(image)))
        digits.append(digit)
    images, labels = [], []
    if inputs:
        with Pipeline(load_weights(weights), limits=Limits(), uncertain_below=0.0) as pipe:
            for result, digit in zip(pipe.run(inputs), digits, strict=True):
                if result.image is None:
                    reason = result.record.error or "no digit found"
                    left_out[reason] = left_out.get(reason, 0) + 1
                    continue
                images.append(result.image)
                labels.append(digit)
    return Corrections(
        np.stack(images) if images else np.zeros((0, 28, 28), np.uint8),
        np.asarray(labels, np.int64),
        left_out,
    )
