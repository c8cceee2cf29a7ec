"""A realistic corpus generated from MNIST test digits: every kind of file issue 3 lists.

Nothing here is committed as an image: `make_corpus` renders each digit as the kind of
file people drop in the inbox (a phone photo of paper, a paint-app canvas, a 16x16 scan,
an alpha-only PNG, ...) and returns encoded bytes with the true label. It is seeded, so
a kind's accuracy is a fixed number for a given set of weights.

The generator imitates, it does not certify: real photographs and scans are the final
measure, so the preprocessing must not rely on anything that only holds here.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
Rng = np.random.Generator


@dataclass(frozen=True)
class Sample:
    kind: str
    name: str  # file names may lie about the format on purpose
    data: bytes
    label: int


# --- strokes ---------------------------------------------------------------------------


def _thin(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Zhang-Suen thinning, vectorized: a 1-px skeleton of a binary mask."""
    img = np.pad(mask.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = img
            n = [
                p[:-2, 1:-1],
                p[:-2, 2:],
                p[1:-1, 2:],
                p[2:, 2:],
                p[2:, 1:-1],
                p[2:, :-2],
                p[1:-1, :-2],
                p[:-2, :-2],
            ]  # P2..P9 clockwise from north
            b = sum(x.astype(np.int32) for x in n)
            seq = n + [n[0]]
            a = sum(((seq[i] == 0) & (seq[i + 1] == 1)).astype(np.int32) for i in range(8))
            c = p[1:-1, 1:-1] == 1
            if step == 0:
                m1 = (n[0] * n[2] * n[4]) == 0
                m2 = (n[2] * n[4] * n[6]) == 0
            else:
                m1 = (n[0] * n[2] * n[6]) == 0
                m2 = (n[0] * n[4] * n[6]) == 0
            kill = c & (b >= 2) & (b <= 6) & (a == 1) & m1 & m2
            if kill.any():
                img[1:-1, 1:-1][kill] = 0
                changed = True
        if not changed:
            return img[1:-1, 1:-1].astype(bool)


def _digit_box(d28: U8) -> U8:
    ys, xs = np.nonzero(d28 > 30)
    return d28[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def skeleton(d28: U8, size: int) -> npt.NDArray[np.bool_]:
    """The digit's centre line, 1 px wide, with its longer side `size` px."""
    return _skeleton(d28.tobytes(), size)


@functools.lru_cache(maxsize=4096)
def _skeleton(raw: bytes, size: int) -> npt.NDArray[np.bool_]:
    d28 = np.frombuffer(raw, np.uint8).reshape(28, 28)
    box = _digit_box(d28)
    h, w = box.shape
    s = size / max(h, w)
    up = cv2.resize(
        box, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_CUBIC
    )
    return _thin(up > 110)


def stroke(d28: U8, size: int, width: float, rng: Rng) -> F32:
    """Ink coverage in [0, 1]: the digit redrawn with a round pen `width` px wide.

    The skeleton is traced at up to 100 px, its 8-neighbour links are drawn as line
    segments at the target scale, and a distance transform gives each pixel's coverage
    (anti-aliased edges, any width, in one pass).
    """
    base = min(size, 100)
    sk = skeleton(d28, base)
    f = size / base
    h, w = sk.shape
    pad = int(width) + 4
    ys, xs = np.nonzero(sk)
    segs = []
    for dy, dx in ((0, 1), (1, 1), (1, 0), (1, -1)):
        y2, x2 = ys + dy, xs + dx
        ok = (y2 < h) & (x2 >= 0) & (x2 < w)
        ok[ok] = sk[y2[ok], x2[ok]]
        a = np.stack([xs[ok], ys[ok]], 1)
        b = np.stack([x2[ok], y2[ok]], 1)
        segs.append(np.stack([a, b], 1))
    pts = np.concatenate(segs)
    if len(pts) == 0:
        pts = np.stack([np.stack([xs, ys], 1)] * 2, 1)
    scaled = ((pts + 0.5) * f + pad) * 16  # 4 fractional bits for cv2's sub-pixel lines
    canvas = np.zeros((int(h * f) + 2 * pad, int(w * f) + 2 * pad), np.uint8)
    cv2.polylines(
        canvas, list(scaled.astype(np.int32).reshape(-1, 2, 1, 2)), False, 255, 1, cv2.LINE_8, 4
    )
    dist = cv2.distanceTransform(255 - canvas, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.clip(width / 2 + 0.5 - dist, 0, 1).astype(np.float32)


def pen_stroke(d28: U8, size: int, width: float) -> F32:
    """Pixel-art stroke without anti-aliasing: a paint app's pencil (width 1 = 1-px lines)."""
    sk = skeleton(d28, size).astype(np.uint8)
    k = max(1, int(round(width)))
    if k > 1:
        sk = cv2.dilate(sk, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return np.pad(sk.astype(np.float32), k + 1)


def place(canvas_hw: tuple[int, int], ink: F32, rng: Rng, *, center: bool = False) -> F32:
    """Put the coverage map somewhere on a canvas (near the middle when `center`)."""
    H, W = canvas_hw
    h, w = ink.shape
    out = np.zeros((H, W), np.float32)
    if h > H or w > W:
        s = min(H / h, W / w)
        ink = cv2.resize(ink, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA)
        h, w = ink.shape
    if center:
        y = (H - h) // 2 + int(rng.integers(-(H - h) // 6 - 1, (H - h) // 6 + 2))
        x = (W - w) // 2 + int(rng.integers(-(W - w) // 6 - 1, (W - w) // 6 + 2))
    else:
        y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    y, x = min(max(0, y), H - h), min(max(0, x), W - w)
    out[y : y + h, x : x + w] = ink
    return out


# --- paper, light and camera ----------------------------------------------------------

PAPERS = {  # BGR
    "white": (244, 246, 247),
    "beige": (198, 222, 238),
    "pink": (222, 212, 246),
}
INKS = {  # BGR
    "black": (35, 35, 40),
    "blue": (150, 60, 25),
    "red": (45, 40, 175),
    "green": (60, 120, 30),
    "pencil": (95, 95, 100),
}


def paper(hw: tuple[int, int], rng: Rng, color: str | None = None) -> F32:
    H, W = hw
    name = color or str(rng.choice(list(PAPERS)))
    base = np.array(PAPERS[name], np.float32) + rng.normal(0, 4, 3).astype(np.float32)
    img = np.empty((H, W, 3), np.float32)
    img[:] = base
    coarse = rng.normal(0, 1, (max(2, H // 40), max(2, W // 40))).astype(np.float32)
    coarse = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.standard_normal((H, W), dtype=np.float32), (0, 0), 1.2)
    tex = coarse * rng.uniform(1.5, 4) + fine * rng.uniform(2, 6)
    img += tex[:, :, None]
    return img


def rule_lines(img: F32, rng: Rng, *, squared: bool, spacing: float) -> None:
    """Ruled (horizontal) or squared (grid) notebook lines, light blue or gray, in place."""
    H, W = img.shape[:2]
    color = np.array(
        [(225, 185, 150), (190, 190, 190), (215, 200, 175)][int(rng.integers(0, 3))], np.float32
    )
    th = int(rng.integers(1, 3 if squared else 4))
    lines = np.zeros((H, W), np.uint8)
    off = rng.uniform(0, spacing)
    y = off
    while y < H:
        cv2.line(lines, (0, int(y)), (W - 1, int(y)), 255, th)
        y += spacing
    if squared:
        x = rng.uniform(0, spacing)
        while x < W:
            cv2.line(lines, (int(x), 0), (int(x), H - 1), 255, th)
            x += spacing
    elif rng.random() < 0.5:  # the red margin
        x = int(rng.uniform(0.05, 0.2) * W)
        cv2.line(lines, (x, 0), (x, H - 1), 255, th + 1)
    a = cv2.GaussianBlur(lines, (0, 0), 0.7).astype(np.float32)[:, :, None] / 255.0
    a *= rng.uniform(0.5, 0.9)
    img *= 1 - a
    img += a * color


def ink_on(img: F32, cover: F32, color: tuple[int, int, int], opacity: float) -> None:
    a = (cover * opacity)[:, :, None]
    img *= 1 - a
    img += a * np.array(color, np.float32)


def lighting(img: F32, rng: Rng, strength: float) -> F32:
    """A gradient across the page and a soft-edged shadow, as a phone over paper casts."""
    H, W = img.shape[:2]
    h, w = max(2, H // 8), max(2, W // 8)  # light varies slowly: compute it small
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy *= H / h
    xx *= W / w
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * xx / W + np.sin(ang) * yy / H) + 1
    ramp = ramp / max(float(ramp.max()), 1e-6)
    light = 1 - strength * rng.uniform(0.2, 0.45) * (1 - ramp)
    if rng.random() < 0.5 + 0.5 * strength:
        # Shadow: a half-plane with a blurred edge, darker by up to 45%.
        ang2 = rng.uniform(0, 2 * np.pi)
        c = rng.uniform(0.2, 0.8)
        d = np.cos(ang2) * (xx / W - c) + np.sin(ang2) * (yy / H - c)
        soft = rng.uniform(0.02, 0.12)
        shade = 1 / (1 + np.exp(-d / soft))
        light *= 1 - strength * rng.uniform(0.2, 0.45) * shade
    light = cv2.resize(light.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    return np.asarray(img * light[:, :, None], np.float32)


def perspective(img: F32, rng: Rng, amount: float) -> F32:
    H, W = img.shape[:2]
    src = np.float32([[0, 0], [W, 0], [W, H], [0, H]])
    jitter = rng.uniform(-amount, amount, (4, 2)).astype(np.float32) * np.float32([W, H])
    m = cv2.getPerspectiveTransform(src, src + jitter)
    return np.asarray(
        cv2.warpPerspective(img, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT),
        np.float32,
    )


def camera(img: F32, rng: Rng, blur: float, noise: float) -> U8:
    if blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    img = img + noise * rng.standard_normal(img.shape[:2], dtype=np.float32)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(img: U8, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return bytes(buf.tobytes())


def png(img: npt.NDArray[np.generic]) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return bytes(buf.tobytes())


# --- the kinds --------------------------------------------------------------------------


def _photo(
    d28: U8,
    rng: Rng,
    *,
    lines: str | None = None,
    light: float = 0.5,
    blur: tuple[float, float] = (0.4, 1.2),
    quality: tuple[int, int] = (70, 93),
    ink: str | None = None,
    warp: float = 0.04,
    size: tuple[int, int] = (420, 800),
    digit: tuple[float, float] = (0.25, 0.6),
) -> U8:
    W = int(rng.integers(*size))
    H = int(W * rng.uniform(0.7, 1.35))
    dsize = int(min(H, W) * rng.uniform(*digit))
    marker = rng.random() < 0.35
    width = dsize * (rng.uniform(0.08, 0.14) if marker else rng.uniform(0.045, 0.08))
    img = paper((H, W), rng)
    if lines is not None:
        rule_lines(img, rng, squared=lines == "squared", spacing=dsize * rng.uniform(0.2, 0.4))
    cover = place((H, W), stroke(d28, dsize, width, rng), rng, center=True)
    ink_name = ink or str(rng.choice(["black", "blue", "blue", "pencil", "red"]))
    ink_on(img, cover, INKS[ink_name], rng.uniform(0.75, 0.97))
    img = lighting(img, rng, light)
    if warp > 0:
        img = perspective(img, rng, warp)
    return camera(img, rng, rng.uniform(*blur) * W / 1000, rng.uniform(1.5, 4))


def photo_paper(d28: U8, rng: Rng) -> bytes:
    return jpeg(_photo(d28, rng), int(rng.integers(75, 95)))


def photo_ruled(d28: U8, rng: Rng) -> bytes:
    return jpeg(_photo(d28, rng, lines="ruled"), int(rng.integers(75, 95)))


def photo_squared(d28: U8, rng: Rng) -> bytes:
    return jpeg(_photo(d28, rng, lines="squared"), int(rng.integers(75, 95)))


def photo_shadow(d28: U8, rng: Rng) -> bytes:
    return jpeg(_photo(d28, rng, light=1.0), int(rng.integers(75, 95)))


def photo_blur_jpeg(d28: U8, rng: Rng) -> bytes:
    return jpeg(_photo(d28, rng, blur=(1.2, 2.5)), int(rng.integers(30, 60)))


def photo_colored_ink(d28: U8, rng: Rng) -> bytes:
    ink = str(rng.choice(["blue", "red", "green"]))
    return jpeg(_photo(d28, rng, ink=ink), int(rng.integers(75, 95)))


def photo_perspective(d28: U8, rng: Rng) -> bytes:
    return jpeg(_photo(d28, rng, warp=0.12), int(rng.integers(75, 95)))


def crop_small(d28: U8, rng: Rng) -> bytes:
    """A 40-90 px crop cut out of a photographed sheet: blurry, low contrast, JPEG."""
    lines = [None, None, "ruled", "squared"][int(rng.integers(0, 4))]
    big = _photo(d28, rng, lines=lines, size=(260, 360), digit=(0.55, 0.75), warp=0.03)
    H, W = big.shape[:2]
    side = int(min(H, W) * rng.uniform(0.8, 1.0))
    y = (H - side) // 2 + int(rng.integers(-H // 20, H // 20 + 1))
    x = (W - side) // 2 + int(rng.integers(-W // 20, W // 20 + 1))
    y, x = min(max(0, y), H - side), min(max(0, x), W - side)
    crop = big[y : y + side, x : x + side]
    out = int(rng.integers(40, 91))
    small = cv2.resize(crop, (out, out), interpolation=cv2.INTER_AREA).astype(np.float32)
    small = cv2.GaussianBlur(small, (0, 0), rng.uniform(0.3, 0.9))
    lo = rng.uniform(0.35, 0.7)  # keep only part of the contrast
    mean = small.mean()
    small = mean + (small - mean) * lo
    return jpeg(np.clip(small, 0, 255).astype(np.uint8), int(rng.integers(50, 85)))


def paint_thin(d28: U8, rng: Rng) -> bytes:
    """A small paint-app canvas (50-150 px) with 1-px pencil lines, black on white."""
    side = int(rng.integers(50, 151))
    ink = pen_stroke(d28, int(side * rng.uniform(0.6, 0.85)), 1)
    cover = place((side, side), ink, rng, center=True)
    return png((255 - cover * 255).astype(np.uint8))


def tablet_thin(d28: U8, rng: Rng) -> bytes:
    """A 1200x900 tablet canvas with a thin stroke using a small part of it."""
    H, W = 900, 1200
    dsize = int(H * rng.uniform(0.15, 0.35))
    cover = place((H, W), stroke(d28, dsize, rng.uniform(2, 5), rng), rng)
    color = INKS[str(rng.choice(["black", "blue"]))]
    img = np.full((H, W, 3), 255, np.float32)
    ink_on(img, cover, color, 1.0)
    return png(img.astype(np.uint8))


def brush_thick(d28: U8, rng: Rng) -> bytes:
    """A 1080x1080 canvas with a thick round brush, as a drawing app's marker."""
    side = 1080
    dsize = int(side * rng.uniform(0.5, 0.85))
    cover = place((side, side), stroke(d28, dsize, dsize * rng.uniform(0.14, 0.2), rng), rng)
    img = np.full((side, side), 255, np.float32) * (1 - cover) + 20 * cover
    return png(img.astype(np.uint8))


def inverted_canvas(d28: U8, rng: Rng) -> bytes:
    """White (or light) strokes on a black canvas, any size."""
    side = int(rng.integers(100, 700))
    dsize = int(side * rng.uniform(0.4, 0.85))
    cover = place((side, side), stroke(d28, dsize, dsize * rng.uniform(0.06, 0.16), rng), rng)
    bg, fg = rng.uniform(0, 35), rng.uniform(200, 255)
    img = bg + (fg - bg) * cover
    return png(img.astype(np.uint8))


def alpha_only(d28: U8, rng: Rng) -> bytes:
    """Strokes only in the alpha channel over a fully transparent background."""
    side = int(rng.integers(120, 800))
    dsize = int(side * rng.uniform(0.4, 0.85))
    cover = place((side, side), stroke(d28, dsize, dsize * rng.uniform(0.05, 0.15), rng), rng)
    rgba = np.zeros((side, side, 4), np.uint8)
    if rng.random() < 0.5:  # some apps keep a color under the transparent pixels
        rgba[:, :, :3] = rng.integers(0, 256, 3).astype(np.uint8)
    rgba[:, :, 3] = (cover * 255).astype(np.uint8)
    return png(rgba)


def scan_16(d28: U8, rng: Rng) -> bytes:
    """A 16x16 gray scan whose digit fills the frame (aspect kept), dark on light."""
    box = _digit_box(d28).astype(np.float32)
    h, w = box.shape
    s = 16 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = cv2.resize(box, (nw, nh), interpolation=cv2.INTER_AREA)
    img = np.zeros((16, 16), np.float32)
    y, x = (16 - nh) // 2, (16 - nw) // 2
    img[y : y + nh, x : x + nw] = small
    paper_level, ink_level = rng.uniform(200, 250), rng.uniform(10, 80)
    out = paper_level + (ink_level - paper_level) * img / 255 + rng.normal(0, 3, (16, 16))
    return png(np.clip(out, 0, 255).astype(np.uint8))


def _clean_digit(d28: U8, rng: Rng) -> U8:
    """A plain scan-like image (BGR) for the file-format kinds."""
    side = int(rng.integers(150, 500))
    dsize = int(side * rng.uniform(0.5, 0.8))
    img = paper((side, side), rng, "white")
    cover = place((side, side), stroke(d28, dsize, dsize * rng.uniform(0.06, 0.13), rng), rng)
    ink_on(img, cover, INKS[str(rng.choice(["black", "blue"]))], 0.95)
    return np.clip(img, 0, 255).astype(np.uint8)


def png_16bit(d28: U8, rng: Rng) -> bytes:
    img = _clean_digit(d28, rng).astype(np.uint16) * 257
    if rng.random() < 0.5:
        return png(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    return png(img)


def tiff(d28: U8, rng: Rng) -> bytes:
    ok, buf = cv2.imencode(".tiff", _clean_digit(d28, rng))
    assert ok
    return bytes(buf.tobytes())


def bmp(d28: U8, rng: Rng) -> bytes:
    ok, buf = cv2.imencode(".bmp", _clean_digit(d28, rng))
    assert ok
    return bytes(buf.tobytes())


def webp(d28: U8, rng: Rng) -> bytes:
    ok, buf = cv2.imencode(".webp", _clean_digit(d28, rng), [cv2.IMWRITE_WEBP_QUALITY, 80])
    assert ok
    return bytes(buf.tobytes())


def jpeg_exif(d28: U8, rng: Rng) -> bytes:
    """A phone JPEG stored sideways with an EXIF orientation tag that turns it upright."""
    from PIL import Image

    upright = _photo(d28, rng, size=(500, 800))
    tag = int(rng.choice([3, 6, 8]))
    # Stored pixels are the upright image turned the other way; the tag undoes it.
    stored = {3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}[tag]
    exif = Image.Exif()
    exif[0x0112] = tag
    buf = io.BytesIO()
    rgb = cv2.cvtColor(np.ascontiguousarray(stored), cv2.COLOR_BGR2RGB)
    Image.fromarray(rgb).save(buf, "JPEG", quality=88, exif=exif.tobytes())
    return buf.getvalue()


def mnist_28(d28: U8, rng: Rng) -> bytes:
    """An MNIST digit as it is: a 28x28 white-on-black PNG."""
    return png(d28)


def mnist_upscaled(d28: U8, rng: Rng) -> bytes:
    """An MNIST digit enlarged (56-280 px) and inverted to dark on white."""
    side = int(rng.integers(56, 281))
    big = cv2.resize(d28, (side, side), interpolation=cv2.INTER_CUBIC)
    return png(255 - big)


# --- harsher kinds: what real photos have that the kinds above lack ---------------------


def pressure(cover: F32, rng: Rng, low: tuple[float, float] = (0.3, 0.6)) -> F32:
    """Uneven pen pressure: part of the digit at 30-60% of the peak darkness.

    A ramp across the digit in a random direction (the stem of a 6, the top loop of an
    8, one side of a 4 drawn lighter) times a slow wobble along the strokes.
    """
    H, W = cover.shape
    ys, xs = np.nonzero(cover > 0.5)
    if len(ys) == 0:
        return cover
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    t = np.cos(ang) * (xx - (x0 + x1) / 2) / max(1, x1 - x0)
    t += np.sin(ang) * (yy - (y0 + y1) / 2) / max(1, y1 - y0)
    edge = rng.uniform(-0.15, 0.15)
    ramp = 1 / (1 + np.exp(-(t - edge) / rng.uniform(0.04, 0.12)))
    faint = rng.uniform(*low)
    level = faint + (1 - faint) * ramp
    g = max(2, max(y1 - y0, x1 - x0) // 12)
    wobble = rng.uniform(0.75, 1.0, (max(2, H // g), max(2, W // g))).astype(np.float32)
    wobble = cv2.resize(wobble, (W, H), interpolation=cv2.INTER_CUBIC)
    return np.asarray(cover * np.clip(level * wobble, faint * 0.9, 1), np.float32)


def grain(cover: F32, rng: Rng, width: float) -> F32:
    """Pencil graphite: the stroke broken into specks where the paper's tooth shows."""
    speck = rng.random(cover.shape).astype(np.float32)
    speck = cv2.GaussianBlur(speck, (0, 0), max(0.5, width / 8))
    speck = (speck - speck.mean()) / (speck.std() + 1e-6)
    keep = np.clip(0.75 + 0.35 * speck, 0.15, 1)
    return np.asarray(cover * keep, np.float32)


def _flat_photo(
    cover: F32,
    rng: Rng,
    paper_hw: tuple[int, int],
    *,
    ink_delta: tuple[float, float] | None,
    line_spacing: float | None = None,
) -> F32:
    """Tinted, textured paper under uneven light, with `cover` drawn on it (BGR float).

    Ruled or squared lines (every `line_spacing` px) are printed on the paper, and a dim
    exposure darkens paper, lines and ink alike: in a photo each is its reflectance times
    the light, so a shadow or a dim room never leaves a line or the ink brighter.
    """
    img = paper(paper_hw, rng, str(rng.choice(["beige", "pink", "white", "white"])))
    if line_spacing is not None:
        rule_lines(img, rng, squared=rng.random() < 0.5, spacing=line_spacing)
    # Tinted paper (grey office paper, a yellow pad) and a dim exposure (a dim room).
    img *= np.array(rng.uniform(0.7, 1.0, 3), np.float32)
    exposure = rng.uniform(0.7, 1.0)
    if ink_delta is None:
        ink_on(img, cover, INKS[str(rng.choice(["black", "blue", "pencil"]))], 0.9)
    else:
        # Ink only `ink_delta` grey levels darker than the paper at full coverage, as
        # the camera sees it (after the exposure).
        level = float(img.mean()) * exposure
        delta = rng.uniform(*ink_delta)
        color = tuple(int(max(0, c * (1 - delta / level))) for c in img.mean((0, 1)))
        ink_on(img, cover, color, 1.0)  # type: ignore[arg-type]
    img *= exposure
    return lighting(img, rng, 1.0)


def _hard_photo(d28: U8, rng: Rng, *, faint: bool, pencil: bool, low: bool) -> bytes:
    W = int(rng.integers(420, 800))
    H = int(W * rng.uniform(0.7, 1.35))
    dsize = int(min(H, W) * rng.uniform(0.25, 0.6))
    width = dsize * rng.uniform(0.04, 0.09)
    cover = place((H, W), stroke(d28, dsize, width, rng), rng, center=True)
    if faint:
        cover = pressure(cover, rng)
    if pencil:
        cover = grain(cover, rng, width)
    spacing = dsize * rng.uniform(0.25, 0.4) if rng.random() < 0.5 else None
    img = _flat_photo(cover, rng, (H, W), ink_delta=(25, 50) if low else None, line_spacing=spacing)
    img = perspective(img, rng, 0.04)
    return jpeg(camera(img, rng, rng.uniform(0.4, 1.2) * W / 1000, rng.uniform(1.5, 3.5)), 85)


def photo_faint_stroke(d28: U8, rng: Rng) -> bytes:
    """Ballpoint pressure fading along and between strokes: parts at 30-60% darkness."""
    return _hard_photo(d28, rng, faint=True, pencil=False, low=False)


def photo_pencil(d28: U8, rng: Rng) -> bytes:
    """Pencil: grainy, uneven strokes on tinted paper."""
    return _hard_photo(d28, rng, faint=rng.random() < 0.5, pencil=True, low=False)


def photo_low_contrast(d28: U8, rng: Rng) -> bytes:
    """Ink only 25-50 grey levels darker than the paper, with uneven pressure on some."""
    return _hard_photo(d28, rng, faint=rng.random() < 0.3, pencil=False, low=True)


def crop_filled(d28: U8, rng: Rng) -> bytes:
    """A 40-90 px low-quality JPEG crop that the digit fills, touching its edge.

    Tinted paper under uneven light, and often a paper edge (the table beyond it) or a
    shadow line across one side, as crops cut from a photographed sheet show.
    """
    side = int(rng.integers(160, 260))
    dsize = int(side * rng.uniform(0.85, 1.0))
    width = dsize * rng.uniform(0.05, 0.1)
    ink = stroke(d28, dsize, width, rng)
    h, w = ink.shape
    # Cut the stroke map's pad off so the digit really reaches the crop's edge.
    pad = int(width) + 4
    ink = ink[pad // 2 : h - pad // 2, pad // 2 : w - pad // 2]
    cover = place((side, side), ink, rng, center=True)
    if rng.random() < 0.5:
        cover = pressure(cover, rng, (0.45, 0.8))
    img = _flat_photo(cover, rng, (side, side), ink_delta=None)
    what = rng.random()
    if what < 0.4:  # the paper's edge: a dark table beyond one side
        edge = int(side * rng.uniform(0.02, 0.1))
        table = np.float32(rng.uniform(30, 110))
        sidesel = int(rng.integers(0, 4))
        region = [np.s_[:edge, :], np.s_[-edge:, :], np.s_[:, :edge], np.s_[:, -edge:]][sidesel]
        img[region] = table
    elif what < 0.8:  # a shadow line or a fold across the crop
        line = np.zeros((side, side), np.uint8)
        horizontal = rng.random() < 0.5
        at = int(side * rng.choice([rng.uniform(0.03, 0.15), rng.uniform(0.85, 0.97)]))
        a, b = (0, at), (side - 1, at + int(rng.integers(-8, 9)))
        if not horizontal:
            a, b = a[::-1], b[::-1]
        cv2.line(line, a, b, 255, int(rng.integers(1, 4)))
        a_ = cv2.GaussianBlur(line, (0, 0), 1.0).astype(np.float32)[:, :, None] / 255
        img *= 1 - a_ * rng.uniform(0.3, 0.6)
    img = camera(img, rng, rng.uniform(0.5, 1.2), rng.uniform(1.5, 3))
    out = int(rng.integers(40, 91))
    small = cv2.resize(img, (out, out), interpolation=cv2.INTER_AREA)
    return jpeg(small, int(rng.integers(35, 75)))


def canvas_thin_big(d28: U8, rng: Rng) -> bytes:
    """A 900-1800 px drawing canvas with a 1-2 px pen line."""
    side = int(rng.integers(900, 1801))
    H, W = side, int(side * rng.uniform(0.75, 1.33))
    dsize = int(min(H, W) * rng.uniform(0.3, 0.8))
    cover = place((H, W), stroke(d28, dsize, rng.uniform(1.0, 2.0), rng), rng)
    img = np.full((H, W, 3), 255, np.float32)
    ink_on(img, cover, INKS[str(rng.choice(["black", "blue"]))], 1.0)
    return png(img.astype(np.uint8))


def _continental(sk: npt.NDArray[np.bool_], label: int, rng: Rng) -> npt.NDArray[np.bool_]:
    """A 1 with a flag before its stem (sometimes a foot), or a 7 with a crossbar."""
    out = np.pad(sk, 12).astype(np.uint8)
    ys, xs = np.nonzero(out)
    h = ys.max() - ys.min() + 1
    if label == 1:
        top = int(np.argmin(ys))
        tx, ty = int(xs[top]), int(ys[top])
        length = h * rng.uniform(0.25, 0.45)
        ang = np.deg2rad(rng.uniform(20, 55))  # below the horizontal, to the left
        end = (int(tx - length * np.cos(ang)), int(ty + length * np.sin(ang)))
        cv2.line(out, (tx, ty), end, 1, 1)
        if rng.random() < 0.4:
            bot = int(np.argmax(ys))
            bx, by = int(xs[bot]), int(ys[bot])
            half = int(h * rng.uniform(0.15, 0.3))
            cv2.line(out, (bx - half, by), (bx + half, by), 1, 1)
    elif label == 7:
        mid = int(ys.min() + h * rng.uniform(0.45, 0.6))
        row = np.nonzero(out[mid])[0]
        if row.size:
            cx = int(row.mean())
            half = int(h * rng.uniform(0.12, 0.22))
            cv2.line(out, (cx - half, mid), (cx + half, mid + int(rng.integers(-2, 3))), 1, 1)
    return out.astype(bool)


def _continental_cover(d28: U8, label: int, rng: Rng, size: int, width: float) -> F32:
    sk = _continental(skeleton(d28, 100), label, rng)
    if rng.random() < 0.5:  # slanted writing, as many hands slant
        s = rng.uniform(-0.35, 0.35)
        h, w = sk.shape
        m = np.float32([[1, s, -s * h / 2 + abs(s) * h / 2], [0, 1, 0]])
        sk = cv2.warpAffine(sk.astype(np.uint8), m, (w + int(abs(s) * h), h)) > 0
    img = cv2.resize(sk.astype(np.uint8) * 255, None, fx=size / 100, fy=size / 100)
    dist = cv2.distanceTransform(
        255 - (img > 0).astype(np.uint8) * 255, cv2.DIST_L2, cv2.DIST_MASK_PRECISE
    )
    return np.clip(width / 2 + 0.5 - dist, 0, 1).astype(np.float32)


def continental_photo(d28: U8, rng: Rng, label: int) -> bytes:
    """Continental 1s (flag, sometimes a foot) and crossed 7s on paper, photographed."""
    W = int(rng.integers(420, 800))
    H = int(W * rng.uniform(0.7, 1.35))
    dsize = int(min(H, W) * rng.uniform(0.25, 0.5))
    cover = place(
        (H, W), _continental_cover(d28, label, rng, dsize, dsize * 0.07), rng, center=True
    )
    img = paper((H, W), rng)
    ink_on(img, cover, INKS[str(rng.choice(["black", "blue", "pencil"]))], 0.9)
    img = lighting(img, rng, 0.5)
    return jpeg(camera(img, rng, 0.8 * W / 1000, 2.5), 85)


def continental_canvas(d28: U8, rng: Rng, label: int) -> bytes:
    """The same styles drawn on a white app canvas."""
    side = int(rng.integers(200, 900))
    dsize = int(side * rng.uniform(0.4, 0.8))
    cover = place((side, side), _continental_cover(d28, label, rng, dsize, dsize * 0.08), rng)
    return png((255 - cover * 235).astype(np.uint8))


Maker = Callable[[U8, Rng], bytes]

KINDS: dict[str, tuple[Maker, str]] = {
    "photo_paper": (photo_paper, ".jpg"),
    "photo_ruled": (photo_ruled, ".jpg"),
    "photo_squared": (photo_squared, ".jpg"),
    "photo_shadow": (photo_shadow, ".jpg"),
    "photo_blur_jpeg": (photo_blur_jpeg, ".jpg"),
    "photo_colored_ink": (photo_colored_ink, ".jpg"),
    "photo_perspective": (photo_perspective, ".jpg"),
    "crop_small": (crop_small, ".jpg"),
    "paint_thin": (paint_thin, ".png"),
    "tablet_thin": (tablet_thin, ".png"),
    "brush_thick": (brush_thick, ".png"),
    "inverted_canvas": (inverted_canvas, ".png"),
    "alpha_only": (alpha_only, ".png"),
    "scan_16": (scan_16, ".png"),
    "png_16bit": (png_16bit, ".png"),
    "tiff": (tiff, ".tif"),
    "bmp": (bmp, ".bmp"),
    "webp": (webp, ".webp"),
    "jpeg_exif": (jpeg_exif, ".jpg"),
    "lying_extension": (webp, ".png"),  # WebP bytes named .png; magic bytes decide
    "photo_faint_stroke": (photo_faint_stroke, ".jpg"),
    "photo_pencil": (photo_pencil, ".jpg"),
    "photo_low_contrast": (photo_low_contrast, ".jpg"),
    "crop_filled": (crop_filled, ".jpg"),
    "canvas_thin_big": (canvas_thin_big, ".png"),
    "mnist_28": (mnist_28, ".png"),
    "mnist_upscaled": (mnist_upscaled, ".png"),
}

# Kinds drawn for some labels only, made from the label as well as the digit.
LabelledMaker = Callable[[U8, Rng, int], bytes]
LABELLED: dict[str, tuple[LabelledMaker, str, tuple[int, ...]]] = {
    "continental_photo": (continental_photo, ".jpg", (1, 7)),
    "continental_canvas": (continental_canvas, ".png", (1, 7)),
}


# Kinds added after the first corpus draw from their own random streams, so the first
# kinds keep the files (and the figures) they always had.
ADDED = (
    "photo_faint_stroke",
    "photo_pencil",
    "photo_low_contrast",
    "crop_filled",
    "canvas_thin_big",
    *LABELLED,
)


def _stream(kind: str) -> int:
    if kind in ADDED:
        return 1000 + zlib.crc32(kind.encode())
    return sorted(k for k in KINDS if k not in ADDED).index(kind)


def kinds() -> list[str]:
    return [*KINDS, *LABELLED]


def make_kind(kind: str, images: U8, labels: npt.NDArray[np.int64], seed: int = 0) -> list[Sample]:
    """Render every digit as a file of one kind; the same seed gives the same bytes."""
    if kind in LABELLED:
        lmaker, ext, _ = LABELLED[kind]
        rng = np.random.default_rng([seed, _stream(kind)])
        return [
            Sample(kind, f"{kind}-{i:05d}{ext}", lmaker(img, rng, int(lab)), int(lab))
            for i, (img, lab) in enumerate(zip(images, labels, strict=True))
        ]
    maker, ext = KINDS[kind]
    rng = np.random.default_rng([seed, _stream(kind)])
    return [
        Sample(kind, f"{kind}-{i:05d}{ext}", maker(img, rng), int(lab))
        for i, (img, lab) in enumerate(zip(images, labels, strict=True))
    ]


def pick(
    labels: npt.NDArray[np.int64], n: int, seed: int = 0, kind: str | None = None
) -> npt.NDArray[np.int64]:
    """Indices of n test digits, chosen the same way every time (of its labels for `kind`)."""
    pool = np.arange(len(labels))
    if kind in LABELLED:
        pool = pool[np.isin(labels, LABELLED[kind][2])]
    return np.sort(np.random.default_rng(seed).choice(pool, n, replace=False))


# --- hostile files ------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid all-black gray PNG of width x height that compresses to well under 1 MB.

    Built in a fraction of a second: after a full flush deflate restarts from scratch,
    so one compressed band of rows can be repeated and only the checksum is summed.
    """
    rows = 100
    band = bytes((width + 1) * rows)  # filter byte 0 then zeros, per row
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(band) + c.flush(zlib.Z_FULL_FLUSH)
    n, rest = divmod(height, rows)
    adler = 1
    for _ in range(n):
        adler = zlib.adler32(band, adler)
    tail = b""
    if rest:
        part = bytes((width + 1) * rest)
        c2 = zlib.compressobj(9, zlib.DEFLATED, -15)
        tail = c2.compress(part) + c2.flush(zlib.Z_FULL_FLUSH)
        adler = zlib.adler32(part, adler)
    stream = b"\x78\xda" + block * n + tail + b"\x03\x00" + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", stream)
        + _chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming any size (zero included), with no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is rewritten to claim another size."""
    data = bytearray(jpeg(np.full((16, 16), 200, np.uint8), 90))
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@functools.lru_cache(maxsize=2)
def hostile(seed: int = 0) -> dict[str, bytes]:
    """Files that must each give an error record quickly and without a big allocation."""
    rng = np.random.default_rng(seed)
    good_png = png(np.full((64, 64), 255, np.uint8))
    good_jpeg = jpeg(rng.integers(0, 256, (256, 256), dtype=np.uint8), 90)
    return {
        "empty": b"",
        "text": b"hello, this is not an image\n" * 10,
        "random": rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes(),
        "truncated_png": good_png[: len(good_png) // 2],
        "truncated_jpeg": good_jpeg[: len(good_jpeg) // 2],
        "png_signature_only": good_png[:8],
        "zero_width_png": png_header_only(0, 100),
        "zero_height_png": png_header_only(100, 0),
        "gigantic_png_header": png_header_only(2**31 - 1, 2**31 - 1),
        "jpeg_claiming_65000": jpeg_claiming(65_000, 65_000),
        "png_signature_random": good_png[:8] + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "jpeg_marker_random": b"\xff\xd8\xff"
        + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "png_bomb_900mp": png_bomb(30_000, 30_000),
        # Inputs `make fuzz` found (tests/fuzz_decode.py), kept as they were found.
        **{
            f"fuzz_{p.stem}": p.read_bytes()
            for p in sorted((Path(__file__).parent / "fuzz_regressions").iterdir())
        },
    }
