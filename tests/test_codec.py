"""Decode stage: every format by its magic bytes, alpha, depth, EXIF, limits, hostile files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import corpus
import cv2
import numpy as np
import pytest
from daemon_helpers import rgba16_png

from digitwatch.codec import Limits, decode, decode_with_header, read_header
from digitwatch.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def _stroke_image(h: int = 60, w: int = 80) -> np.ndarray:
    img = np.full((h, w), 255, np.uint8)
    img[10:50, 30:38] = 0  # a dark bar: the "ink"
    return img


def _encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return bytes(buf.tobytes())


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp"])
@pytest.mark.parametrize("color", [False, True])
def test_formats_decode_to_gray_with_the_header_size(ext: str, color: bool) -> None:
    img = _stroke_image()
    if color:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    data = _encode(ext, img)
    head = read_header(data)
    assert (head.width, head.height) == (80, 60)
    out = decode(data, Limits())
    assert out.dtype == np.uint8 and out.shape == (60, 80)
    assert out[30, 34] < 60 and out[30, 5] > 200


def test_gif_decodes() -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_stroke_image()).save(buf, "GIF")
    assert decode(buf.getvalue(), Limits()).shape == (60, 80)


def test_magic_bytes_decide_not_the_name() -> None:
    webp = _encode(".webp", _stroke_image())
    assert read_header(webp).format == "WebP"  # whatever the file was called


def test_16_bit_png_becomes_8_bit() -> None:
    img16 = _stroke_image().astype(np.uint16) * 257
    out = decode(_encode(".png", img16), Limits())
    assert out.dtype == np.uint8 and out[30, 34] == 0 and out[30, 5] == 255
    rgb16 = cv2.cvtColor(img16, cv2.COLOR_GRAY2BGR)
    assert decode(_encode(".png", rgb16), Limits())[30, 5] == 255


@pytest.mark.parametrize("under", [0, 255])
def test_alpha_only_strokes_are_composited_onto_white(under: int) -> None:
    rgba = np.full((60, 80, 4), under, np.uint8)  # color under the transparency
    rgba[:, :, :3] = 0 if under == 0 else 255
    rgba[:, :, 3] = 0
    rgba[10:50, 30:38, 3] = 255
    rgba[10:50, 30:38, :3] = 0
    data = _encode(".png", rgba)
    assert read_header(data).alpha
    out = decode(data, Limits())
    assert out[30, 5] == 255  # transparent -> white paper
    assert out[30, 34] == 0  # opaque black stroke


def test_gray_alpha_and_palette_transparency() -> None:
    from PIL import Image

    gray = Image.fromarray(np.zeros((60, 80), np.uint8))
    alpha = np.zeros((60, 80), np.uint8)
    alpha[10:50, 30:38] = 255
    buf = io.BytesIO()
    Image.merge("LA", [gray, Image.fromarray(alpha)]).save(buf, "PNG")
    out = decode(buf.getvalue(), Limits())
    assert out[30, 5] == 255 and out[30, 34] == 0
    pal = Image.fromarray(np.where(alpha > 0, 0, 255).astype(np.uint8)).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=pal.getpixel((5, 30)))
    assert read_header(buf.getvalue()).alpha  # tRNS chunk
    out = decode(buf.getvalue(), Limits())
    assert out[30, 5] == 255 and out[30, 34] == 0


def test_alpha_webp_and_tiff() -> None:
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[10:50, 30:38, 3] = 255
    for ext, params in ((".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]), (".tiff", [])):
        data = _encode(ext, rgba, params)
        assert read_header(data).alpha, ext
        out = decode(data, Limits())
        assert out[30, 5] == 255 and out[30, 34] < 30, ext


@pytest.mark.parametrize("tag", [3, 6, 8])
def test_jpeg_exif_orientation_is_applied(tag: int) -> None:
    from PIL import Image

    upright = np.full((100, 60), 255, np.uint8)
    upright[5:25, 5:25] = 0  # ink in the top-left corner when upright
    stored = {3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}[tag]
    exif = Image.Exif()
    exif[0x0112] = tag
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = decode(buf.getvalue(), Limits())
    assert out.shape == (100, 60)
    assert out[15, 15] < 60 and out[85, 45] > 200


def test_large_jpeg_is_decoded_reduced_and_upright() -> None:
    big = np.full((3000, 4000), 255, np.uint8)
    cv2.circle(big, (2000, 1500), 600, 0, 80)
    out, head = decode_with_header(corpus.jpeg(big, 85), Limits())
    assert max(out.shape) < 4000 and min(out.shape) >= 360
    assert out.shape[1] * 3 == out.shape[0] * 4
    assert (head.width, head.height) == (4000, 3000)  # the file's size, for the record


def test_limits_are_configurable_and_checked_before_decoding() -> None:
    data = _encode(".png", _stroke_image())
    with pytest.raises(InputError, match="pixel limit"):
        decode(data, Limits(max_pixels=80 * 60 - 1))
    with pytest.raises(InputError, match="byte limit"):
        decode(data, Limits(max_bytes=len(data) - 1))
    assert decode(data, Limits(max_pixels=80 * 60, max_bytes=len(data))).shape == (60, 80)


@pytest.mark.parametrize("name", sorted(corpus.hostile()))
def test_hostile_files_raise_input_error_quickly(name: str) -> None:
    data = corpus.hostile()[name]
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err:
        decode(data, Limits())
    assert time.perf_counter() - t0 < 0.5
    assert "\n" not in str(err.value) and str(err.value)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_hostile_files_stay_small_in_memory() -> None:
    """All hostile files in a fresh process: peak RSS stays near the import cost."""
    code = """
import json, sys
sys.path.insert(0, sys.argv[1])
import corpus
from digitwatch.codec import Limits, decode
from digitwatch.errors import InputError
files = corpus.hostile()
def peak_kib():
    # VmHWM starts afresh at exec; ru_maxrss would carry over pytest's own peak.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
before = peak_kib()
errors = 0
for data in files.values():
    try:
        decode(data, Limits())
    except InputError:
        errors += 1
after = peak_kib()
print(json.dumps({"n": len(files), "errors": errors, "before": before, "after": after}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "tests")],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout)
    assert r["errors"] == r["n"]
    assert r["after"] < 300 * 1024, r  # KiB: a few hundred MB at most, in fact ~70 MB


def test_decode_cost_bounds_the_peak_memory_of_a_large_alpha_png(tmp_path: Path) -> None:
    """The estimate from the header is at or above what decoding a 36 MP 16-bit RGBA PNG
    really takes (peak RSS above the process's baseline), and not far above."""
    path = tmp_path / "big.png"
    path.write_bytes(rgba16_png(6000, 6000))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
    script = """
import sys, cv2
from pathlib import Path
from digitwatch.codec import Limits, decode_cost, decode_with_header
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
data = Path(sys.argv[1]).read_bytes()
base = hwm()
gray, head = decode_with_header(data, Limits())
print(hwm() - base, decode_cost(head, cv2.IMREAD_UNCHANGED), gray.shape)
"""
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split(maxsplit=2)
    used, cost = int(out[0]), int(out[1])
    assert out[2].strip() == "(6000, 6000)"
    assert used <= cost <= 1.3 * used, (used, cost)


def test_decode_budget_refuses_before_decoding() -> None:
    img = np.zeros((1000, 1000, 4), np.uint16)
    data = _encode(".png", img)
    # 2 copies of 8 bytes per pixel, plus the gray result: 17 MB
    with pytest.raises(InputError, match=r"~17 MB, over the 15 MB decode budget"):
        decode(data, Limits(max_decode_bytes=15 << 20))
    assert decode(data, Limits(max_decode_bytes=17 << 20)).shape == (1000, 1000)
