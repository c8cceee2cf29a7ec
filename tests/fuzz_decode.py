"""Fuzz decode + preprocess with atheris (libFuzzer): `make fuzz` (FUZZ_SECONDS=300).

Every input must end in a 28x28 image, None (no digit) or InputError, within the
libFuzzer time limit and with no single allocation over 1 GB (both set by `make fuzz`);
anything else (another exception, a hang, a crash in a native decoder, a large
allocation) stops the run and leaves the input as `crash-*`, `timeout-*` or `oom-*` in
FUZZ_OUT. The whole process may reach 2 GB: the fuzzer's own corpus and coverage grow
over a run (a 5-minute run ended at 1,033 MB on an input that alone peaks at 44 MB,
and 164 corpus inputs decoded six times over stayed at 53 MB: no leak). Such inputs
belong in tests/fuzz_regressions/, which tests/test_codec.py replays on every `make test`.

The seed corpus is made here at start: one small image per format the codec reads,
plus headers that lie about the size.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from digitwatch.codec import Limits, decode_with_header, encode_png
    from digitwatch.errors import InputError
    from digitwatch.preprocess import to_mnist

# The daemon's defaults, smaller: the fuzzer must find size checks, not wait on big decodes.
LIMITS = Limits(max_pixels=4_000_000, max_bytes=2_000_000)


def seeds(folder: Path) -> None:
    import cv2

    img = np.full((40, 30), 255, np.uint8)
    cv2.line(img, (8, 8), (22, 30), 0, 3)
    for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp"):
        ok, buf = cv2.imencode(ext, img)
        if ok:
            (folder / f"seed{ext}").write_bytes(buf.tobytes())
    (folder / "seed8.png").write_bytes(encode_png(img))
    ok, buf = cv2.imencode(".png", img.astype(np.uint16) * 257)
    (folder / "seed16.png").write_bytes(buf.tobytes())
    rgba = np.dstack([img, img, img, 255 - img])
    ok, buf = cv2.imencode(".png", rgba)
    (folder / "seed-alpha.png").write_bytes(buf.tobytes())
    (folder / "gif").write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    (folder / "empty").write_bytes(b"")


def one_input(data: bytes) -> None:
    try:
        gray, head = decode_with_header(data, LIMITS)
    except InputError:
        return
    assert gray.ndim == 2 and gray.dtype == np.uint8, (gray.shape, gray.dtype)
    assert head.width > 0 and head.height > 0
    out = to_mnist(gray)
    assert out is None or (out.shape == (28, 28) and out.dtype == np.uint8)


def main() -> None:
    args = sys.argv[1:]
    corpus = next((a for a in args if not a.startswith("-")), None)
    if corpus is None:
        corpus = tempfile.mkdtemp(prefix="digitwatch-fuzz-")
        args.append(corpus)
    Path(corpus).mkdir(parents=True, exist_ok=True)
    seeds(Path(corpus))
    atheris.Setup([sys.argv[0], *args], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
