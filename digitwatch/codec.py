"""Decode stage: image bytes to an 8-bit gray array, with limits checked before decoding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from digitwatch.errors import InputError

Gray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 40_000_000
    max_bytes: int = 50 * 1024 * 1024


def decode(data: bytes, limits: Limits) -> Gray:
    """Return the image as 2-D uint8 gray; raise InputError with a one-line reason."""
    if not data:
        raise InputError("empty file")
    if len(data) > limits.max_bytes:
        raise InputError(f"file is {len(data)} bytes, over the {limits.max_bytes} byte limit")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise InputError("not a readable image")
    return np.asarray(img, dtype=np.uint8)


def encode_png(image: Gray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("cannot encode image as PNG")
    return bytes(buf.tobytes())


def write_png(path: Path, image: Gray) -> None:
    path.write_bytes(encode_png(image))


def contact_sheet(images: list[Gray], captions: list[str], *, columns: int = 20) -> Gray:
    """Tile 28x28 digits, each enlarged 3x with its caption underneath, into one image."""
    cell_w, cell_h, scale = 84, 100, 3
    rows = max(1, -(-len(images) // columns))
    sheet = np.full((rows * cell_h, columns * cell_w), 255, np.uint8)
    for i, (img, caption) in enumerate(zip(images, captions, strict=False)):
        y, x = (i // columns) * cell_h, (i % columns) * cell_w
        big = cv2.resize(img, (28 * scale, 28 * scale), interpolation=cv2.INTER_NEAREST)
        sheet[y : y + 84, x : x + 84] = 255 - big  # dark ink on white reads best
        cv2.putText(sheet, caption, (x + 4, y + 96), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
    return sheet
