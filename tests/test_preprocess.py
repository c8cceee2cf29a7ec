"""Preprocess stage: polarity, background, lines, stroke width, fitting, and no_digit."""

from __future__ import annotations

from pathlib import Path

import corpus
import cv2
import numpy as np
import pytest

from digitwatch import preprocess
from digitwatch.mnist import load_mnist
from digitwatch.preprocess import to_mnist


def _ring(side: int, thickness: int, *, ink: int = 0, paper: int = 255) -> np.ndarray:
    img = np.full((side, side), paper, np.uint8)
    cv2.circle(img, (side // 2, side // 2), side // 3, ink, thickness, cv2.LINE_AA)
    return img


def _width_28(out: np.ndarray) -> float:
    return preprocess.stroke_width((out > 127).astype(np.uint8) * 255)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two 28x28 digits, over whole-pixel shifts of up to one
    (centring rounds the centre of mass to the pixel, so equal shapes can land 1 px apart)."""
    return min(
        float(np.abs(a.astype(int) - np.roll(b, (dy, dx), (0, 1)).astype(int)).mean())
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )


def _mass_center(out: np.ndarray) -> tuple[float, float]:
    m = cv2.moments(out)
    return m["m10"] / m["m00"], m["m01"] / m["m00"]


def test_output_is_28x28_uint8_fitted_in_20_and_centered_by_mass() -> None:
    out = to_mnist(_ring(300, 20))
    assert out is not None and out.shape == (28, 28) and out.dtype == np.uint8
    ys, xs = np.nonzero(out)
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 21
    cx, cy = _mass_center(out)
    assert abs(cx - 14) <= 0.75 and abs(cy - 14) <= 0.75


def _glyph(name: str, side: int) -> np.ndarray:
    """Dark strokes on white whose box centre is far from their mass centre (or a slant)."""
    img = np.full((300, 300), 255, np.uint8)
    strokes = {
        "L": [((80, 40), (80, 260)), ((80, 260), (230, 260))],
        "7": [((60, 50), (240, 50)), ((240, 50), (130, 260))],
        "slanted_bar": [((110, 40), (190, 260))],
    }[name]
    for a, b in strokes:
        cv2.line(img, a, b, 0, 24)
    if side != 300:  # a small file: the fast path (step 0) renders it
        img = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
    return img


@pytest.mark.parametrize("side", [300, 28])
@pytest.mark.parametrize("name", ["L", "7"])
def test_lopsided_glyphs_are_centred_by_mass_not_by_box(name: str, side: int) -> None:
    """MNIST centres the centre of mass, not the box: an L or a 7 shows the difference."""
    glyph = _glyph(name, side)
    ink = 255 - glyph
    ys, xs = np.nonzero(ink > 127)
    box = ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2)
    mass = _mass_center(ink)
    scale = 20 / (max(np.ptp(xs), np.ptp(ys)) + 1)
    # Centring the box instead would leave the mass centre over a pixel off (14, 14).
    assert max(abs(box[0] - mass[0]), abs(box[1] - mass[1])) * scale > 1.5
    out = to_mnist(glyph)
    assert out is not None
    cx, cy = _mass_center(out)
    assert abs(cx - 14) <= 0.75 and abs(cy - 14) <= 0.75, (cx, cy)


@pytest.mark.parametrize("side", [300, 28])
def test_a_slanted_bar_is_deskewed_upright(side: int) -> None:
    """The last step shears by mu11 / mu02, so what the model sees has no slant left."""
    glyph = _glyph("slanted_bar", side)
    before = cv2.moments(255 - glyph)
    assert abs(before["mu11"] / before["mu02"]) > 0.3
    out = to_mnist(glyph)
    assert out is not None
    m = cv2.moments(out)
    assert abs(m["mu11"] / m["mu02"]) < 0.02, m["mu11"] / m["mu02"]


def test_polarity_dark_on_light_and_light_on_dark_agree() -> None:
    a = to_mnist(_ring(200, 14))
    b = to_mnist(_ring(200, 14, ink=255, paper=0))
    assert a is not None and b is not None
    assert a.mean() > 20  # ink made bright
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 5


def test_dark_ink_on_dim_unevenly_lit_paper_is_dark_ink() -> None:
    """A small digit on dim gray paper lit from one side: an even, dark border, and
    lit paper brighter than the border by more than the few ink pixels are darker."""
    clean = np.full((400, 400), 255, np.uint8)
    cv2.circle(clean, (200, 200), 30, 0, 4, cv2.LINE_AA)
    light = 0.8 + 0.4 * np.mgrid[0:400, 0:400][1].astype(np.float32) / 400
    page = ((100 - 45 * (255 - clean.astype(np.float32)) / 255) * light).astype(np.uint8)
    a, b = to_mnist(clean), to_mnist(page)
    assert a is not None and b is not None
    assert _diff(a, b) < 8


def _faded(img: np.ndarray, level: float, *, paper: int = 235) -> np.ndarray:
    """A dark-on-light drawing whose left half is drawn at `level` of the pen's darkness,
    on paper with a little grain, as a ballpoint that lifts along a stroke."""
    ink = (255 - img.astype(np.float32)) / 255
    ink[:, : img.shape[1] // 2] *= level
    rng = np.random.default_rng(0)
    page = paper - (paper - 30) * ink + rng.normal(0, 2, img.shape)
    return np.asarray(cv2.GaussianBlur(np.clip(page, 0, 255), (0, 0), 0.8), np.uint8)


@pytest.mark.parametrize("level", [0.3, 0.45])
def test_faint_part_of_a_stroke_is_kept_whole(level: float) -> None:
    """A ring whose left half is at 30-45% of the pen's level reads as the whole ring, not
    as the right half (a 6 whose faint stem is dropped reads as 0, an 8 as 3)."""
    ring = _ring(400, 12)
    whole, faded = to_mnist(_faded(ring, 1.0)), to_mnist(_faded(ring, level))
    assert whole is not None and faded is not None
    left = faded[:, :14] > 127
    assert left.sum() > 0.35 * (whole > 127).sum()  # the faint half is there, and solid
    assert _diff(whole, faded) < 20


def test_ruled_lines_do_not_join_a_faint_stroke() -> None:
    """Hysteresis keeps weak ink that touches the digit; a notebook line as dark as the
    faint part touches it too, and must still be dropped."""
    ring = _ring(400, 12)
    lined = ring.copy()
    for y in range(20, 400, 40):
        cv2.line(lined, (0, y), (399, y + 5), 150, 2)
    a, b = to_mnist(_faded(ring, 0.4)), to_mnist(_faded(lined, 0.4))
    assert a is not None and b is not None
    assert _diff(a, b) < 10


def _three() -> np.ndarray:
    """A synthetic 28x28 "3", light on black as MNIST's files are (for corpus.stroke)."""
    d = np.zeros((28, 28), np.uint8)
    cv2.ellipse(d, (14, 9), (5, 5), 0, -180, 90, 255, 2)
    cv2.ellipse(d, (14, 19), (5, 5), 0, -90, 180, 255, 2)
    return d


def _drawn(side: int, size: int, width: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    cover = corpus.stroke(_three(), size, width, rng)
    canvas = np.full((side, side), 255, np.float32)
    h, w = cover.shape
    y, x = (side - h) // 3, (side - w) // 4
    canvas[y : y + h, x : x + w] -= 195 * cover
    return canvas.astype(np.uint8)


@pytest.mark.parametrize(("side", "size"), [(1800, 540), (1200, 400)])
def test_a_1_px_line_on_a_big_canvas_keeps_its_whole_stroke(side: int, size: int) -> None:
    """Area averaging a 1-px anti-aliased line 3-4.5x turns it into a dashed faint line
    whose pieces under half the peak were dropped (a 3 read as its top arc)."""
    a, b = to_mnist(_drawn(side, size, 1.0)), to_mnist(_drawn(400, 240, 24))
    assert a is not None and b is not None
    assert _diff(a, b) < 12


def _filled_crop(edge: str) -> np.ndarray:
    """A synthetic "3" filling a 64 px crop of gray paper and touching its top and
    bottom, with a paper edge (the dark table beyond it) or a shadow line along a side."""
    side = 64
    cover = corpus.stroke(_three(), 70, 7, np.random.default_rng(0))
    h, w = cover.shape
    cover = cover[(h - side) // 2 : (h - side) // 2 + side, (w - 44) // 2 : (w - 44) // 2 + 44]
    page = np.full((side, side), 170, np.float32)
    page[:, 10:54] -= 130 * cover
    if edge == "table":
        page[:, :5] = 60  # the table past the paper's left edge
    elif edge == "shadow":
        line = np.zeros((side, side), np.float32)
        cv2.line(line, (58, 0), (60, side - 1), 1.0, 3)  # beside the digit, tilted
        page *= 1 - 0.6 * cv2.GaussianBlur(line, (0, 0), 1.0)
    return np.clip(page, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("edge", ["table", "shadow"])
def test_a_digit_filling_its_crop_is_not_taken_for_page_structure(edge: str) -> None:
    """A paper edge or a shadow line along the side of a crop the digit fills joined the
    digit (a 3 with a bar under it, a 9 with a stroke beside it)."""
    a, b = to_mnist(_filled_crop("none")), to_mnist(_filled_crop(edge))
    assert a is not None and b is not None
    assert _diff(a, b) < 12


@pytest.mark.parametrize(("side", "thickness"), [(60, 1), (1200, 2), (1080, 150), (400, 30)])
def test_stroke_width_is_brought_toward_mnist(side: int, thickness: int) -> None:
    """1-px lines are thickened and brush strokes thinned: 28x28 widths end up alike."""
    out = to_mnist(_ring(side, thickness))
    assert out is not None
    assert 1.6 <= _width_28(out) <= 3.6


def test_thick_strokes_are_not_hollowed_out() -> None:
    img = np.full((1080, 1080), 255, np.uint8)
    cv2.line(img, (540, 150), (540, 930), 0, 200)  # a brush "1", 200 px wide
    out = to_mnist(img)
    assert out is not None
    row = out[14] > 127
    runs = np.count_nonzero(np.diff(row.astype(np.int8)) == 1)
    assert runs == 1, out[14]  # one solid run across the stroke, not two edges


def test_shadow_and_gradient_do_not_change_the_answer() -> None:
    base = _ring(400, 12).astype(np.float32)
    yy, xx = np.mgrid[0:400, 0:400].astype(np.float32)
    light = 0.55 + 0.45 * xx / 400
    light[:, :150] *= 0.6  # a hard shadow edge
    a = to_mnist(base.astype(np.uint8))
    b = to_mnist((base * light).astype(np.uint8))
    assert a is not None and b is not None
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 12


def _faint_by_a_soft_shadow() -> np.ndarray:
    """A ring only 25 grey levels darker than the paper, beside the soft edge of a
    shadow that darkens the left of the page by half: the knee of that edge is where a
    page-wide paper model lags."""
    ring = (255 - _ring(400, 10).astype(np.float32)) / 255
    xx = np.mgrid[0:400, 0:400][1].astype(np.float32)
    shade = 1 - 0.5 / (1 + np.exp((xx - 110) / 18))
    page = (200 - 25 * ring) * shade
    page += np.random.default_rng(0).normal(0, 2, page.shape)
    return np.asarray(np.clip(page, 0, 255), np.uint8)


@pytest.mark.parametrize("narrow", [True, False])
def test_faint_ink_beside_a_soft_shadow_edge_reads_as_itself(
    narrow: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper is modelled again at the stroke's own scale; with a window a third of
    the page wide the shadow's knee reads as ink joined to the ring."""
    if not narrow:
        monkeypatch.setattr(preprocess, "MIN_WINDOW", 10**6)  # the one page-wide pass
    clean, shaded = to_mnist(_ring(400, 10)), to_mnist(_faint_by_a_soft_shadow())
    assert clean is not None and shaded is not None
    if narrow:
        assert _diff(clean, shaded) < 10
    else:
        assert shaded is None or _diff(clean, shaded) >= 10


def test_ruled_lines_and_specks_are_dropped() -> None:
    clean = _ring(400, 10)
    lined = clean.copy()
    for y in range(15, 400, 36):
        cv2.line(lined, (0, y), (399, y + 6), 170, 2)  # faint, slightly tilted
    for x, y in [(20, 20), (380, 350), (30, 370)]:
        cv2.circle(lined, (x, y), 3, 0, -1)  # specks
    a, b = to_mnist(clean), to_mnist(lined)
    assert a is not None and b is not None
    assert _diff(a, b) < 8


def _blank_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    page = corpus.camera(corpus.paper((480, 640), rng), rng, 1.0, 3)
    page = corpus.lighting(page.astype(np.float32), rng, 1.0).astype(np.uint8)
    specks = np.full((300, 300), 250, np.uint8)
    specks[100, 100] = specks[200, 50] = 120
    return {
        "white": np.full((100, 100), 255, np.uint8),
        "black": np.zeros((28, 28), np.uint8),
        "gray": np.full((500, 500), 128, np.uint8),
        "uniform_noise": rng.integers(0, 256, (200, 200), dtype=np.uint8),
        "gaussian_noise": np.clip(rng.normal(128, 40, (300, 300)), 0, 255).astype(np.uint8),
        "paper_texture_with_shadow": cv2.cvtColor(page, cv2.COLOR_BGR2GRAY),
        "two_specks": specks,
        "one_pixel": np.full((1, 1), 7, np.uint8),
    }


@pytest.mark.parametrize("name", sorted(_blank_cases()))
def test_blank_and_near_blank_images_have_no_digit(name: str) -> None:
    assert to_mnist(_blank_cases()[name]) is None


def test_ruled_paper_without_a_digit_has_no_digit() -> None:
    rng = np.random.default_rng(1)
    for squared in (False, True):
        img = corpus.paper((400, 520), rng)
        corpus.rule_lines(img, rng, squared=squared, spacing=30)
        gray = cv2.cvtColor(corpus.camera(img, rng, 0.8, 2), cv2.COLOR_BGR2GRAY)
        assert to_mnist(gray) is None, squared


def test_target_width_matches_mnist(mnist_dir: Path) -> None:
    """TARGET_WIDTH and WIDTH_BAND are MNIST's own median and spread, as measured here."""
    images, _ = load_mnist(mnist_dir, train=False, download=False)
    ratios = []
    for img in images[:500]:
        up = cv2.resize(img, (84, 84), interpolation=cv2.INTER_CUBIC)
        mask = (up > 127).astype(np.uint8) * 255
        ys, xs = np.nonzero(mask)
        side = max(np.ptp(ys), np.ptp(xs)) + 1
        ratios.append(preprocess.stroke_width(mask) / side)
    lo, median, hi = np.percentile(ratios, (10, 50, 90))
    assert abs(median - preprocess.TARGET_WIDTH) < 0.01
    assert preprocess.WIDTH_BAND[0] <= lo and hi <= preprocess.WIDTH_BAND[1] + 0.01


def test_mnist_digits_pass_through_almost_unchanged(mnist_dir: Path) -> None:
    images, _ = load_mnist(mnist_dir, train=False, download=False)
    diffs = []
    for img in images[:200]:
        out = to_mnist(img)
        assert out is not None
        # to_mnist ends with the deskew that training applies to MNIST itself
        diffs.append(np.abs(out.astype(int) - preprocess.deskew(img).astype(int)).mean())
    assert np.median(diffs) < 12


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (1, 5000), (5000, 1), (3, 300), (2000, 20)])
def test_odd_shapes_never_raise(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    line = np.full(shape, 255, np.uint8)
    line[shape[0] // 2, :] = 0
    for img in (rng.integers(0, 256, shape, dtype=np.uint8), np.zeros(shape, np.uint8), line):
        out = to_mnist(img)
        assert out is None or (out.shape == (28, 28) and out.dtype == np.uint8)


def test_open_line_is_opencvs_opening_exactly() -> None:
    """open_line opens only the rows (columns) that can keep a pixel; nothing else may change."""
    rng = np.random.default_rng(0)
    empty = 0
    for trial in range(800):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = ((rng.random((h, w)) < rng.random()) * 255).astype(np.uint8)
        if trial % 2 == 0:
            mask[rng.integers(0, h), rng.integers(0, w) :] = 255  # a line from the middle out
            mask[: rng.integers(0, h + 1), rng.integers(0, w)] = 255
        for horizontal in (True, False):
            length = int(rng.integers(1, 2 * (w if horizontal else h) + 3))
            size = (length, 1) if horizontal else (1, length)
            kernel = cv2.getStructuringElement(cv2.MORPH_RECT, size)
            expected = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
            got = preprocess.open_line(mask, length, horizontal=horizontal)
            if got is None:
                empty += 1
                assert not expected.any(), (h, w, length, horizontal)
            else:
                assert np.array_equal(got, expected), (h, w, length, horizontal)
    assert 100 < empty < 1500  # both branches ran


def test_16_bit_component_labels_are_the_32_bit_ones() -> None:
    """_select asks OpenCV for 16-bit labels (a faster algorithm): the same answer, exactly."""
    rng = np.random.default_rng(1)
    for trial in range(500):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        mask = ((rng.random((h, w)) < rng.random()) * 255).astype(np.uint8)
        if trial % 2:
            mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))
        n32, lab32, st32, c32 = cv2.connectedComponentsWithStats(mask, connectivity=8)
        n16, lab16, st16, c16 = cv2.connectedComponentsWithStats(
            mask, connectivity=8, ltype=cv2.CV_16U
        )
        assert n16 == n32 and lab16.dtype == np.uint16
        assert np.array_equal(lab16, lab32) and np.array_equal(st16, st32)
        assert np.array_equal(c16, c32, equal_nan=True)
