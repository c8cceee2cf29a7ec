"""Preprocess stage: any gray image to a 28x28 MNIST-like digit (bright ink, centered)."""

from __future__ import annotations

import cv2
import numpy as np

from digitwatch.codec import Gray


def to_mnist(gray: Gray) -> Gray | None:
    """Return the 28x28 image the model sees, or None when there is no digit."""
    img = gray
    if np.median(img) > 127:
        img = 255 - img
    ys, xs = np.nonzero(img > 40)
    if len(xs) == 0:
        return None
    crop = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    s = 20.0 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA)
    out = np.zeros((28, 28), np.uint8)
    y0, x0 = (28 - nh) // 2, (28 - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = small
    m = cv2.moments(out)
    if m["m00"] > 0:
        dx, dy = 14 - m["m10"] / m["m00"], 14 - m["m01"] / m["m00"]
        shift = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
        return np.asarray(cv2.warpAffine(out, shift, (28, 28)), dtype=np.uint8)
    return out
