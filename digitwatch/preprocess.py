"""Preprocess stage: any gray image to a 28x28 MNIST-like digit (bright ink, centered).

0. Fast path: an image of at most CLEAN_SIDE px whose outermost pixels are even (an
   MNIST file, an icon-sized drawing) has no paper to remove: its ink is its distance
   from that ground, and it goes straight to step 8.
1. Working size: images over WORK_SIDE px are shrunk by area averaging, the ink first
   thickened by the factor when it is 2x or more (a 1-2 px line keeps its darkness);
   images under MIN_SIDE px are enlarged by a whole factor
   so a 16x16 scan or a 28x28 file has enough pixels to measure strokes on.
2. Polarity: light ink on an evenly dark border (a drawing app's canvas, an MNIST
   file) is taken as is; anything else is dark ink on paper, however deep the shadow.
3. Paper: a gray closing (max then min filter; an opening for a dark canvas) with a
   window a third of the image wide is the paper with its shadows and uneven light.
   The window is far wider than any stroke, so thick strokes are not hollowed out.
   Ink = (paper - pixel) / paper: a stroke in shadow is as strong as one in the light.
   Once step 5 has found the digit, the paper is modelled again with a window
   STROKE_WINDOW times its stroke width (at least MIN_WINDOW px), which follows a
   shadow's edge closely enough that faint ink stands above it, and steps 4-5 rerun.
4. No digit: the ink's peak must stand MIN_CONTRAST above the paper, and when Otsu's
   threshold marks much of the image, a one-pixel blur must leave the ink standing
   (MIN_SNR): that rejects noise and bare textured paper.
5. Mask at half the pen's peak level (the 98th percentile of what Otsu marks; ruled
   and squared lines are fainter than ink and fall below), minus thin runs that cross
   the image (lines, tilted up to LINE_TILT px). Connected components: the biggest
   piece near the middle is the digit, and pieces near it are added while they are
   not specks (the bar of a 5, the halves of a 4); page-long hairlines, dashes and
   far marks are dropped. Hysteresis then grows the digit: weak ink (WEAK_FRACTION of
   the peak, or WEAK_SIGMAS times the paper's noise) that connects to it is part of
   it, after lines and grain thinner than the pen are opened out of the weak mask, so a
   stroke the pen pressed lightly stays whole.
6. Crop the digit's box from the ink map, scale its longer side to DIGIT_SIDE px and
   scale each part of the stroke by its own local peak (at most LOCAL_GAIN times), so
   blur, contrast and uneven pressure no longer matter; faint residue under a quarter
   of that level is cleared.
7. Stroke width: 2 * area / perimeter of the half-peak mask. When it falls outside
   MNIST's own spread (WIDTH_BAND, relative to the digit's longer side) the image is
   dilated (1-px lines) or eroded (thick brushes) toward MNIST's median, TARGET_WIDTH.
8. Fit into 20x20 with the aspect ratio kept (area averaging gives MNIST's anti-aliased
   edges), centre the mass in 28x28 by a whole-pixel shift.
9. Deskew: shear the digit upright by its second moments (`deskew`). Training and
   evaluation apply the same function to MNIST, so the model is trained on exactly this.
   The classifier then normalizes with the mean and std from the weights' metadata.

The constants below are the knobs these steps name.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from digitwatch.codec import Gray

Labels = npt.NDArray[Any]  # connected-component labels, uint16 or int32

WORK_SIDE = 256
CLEAN_SIDE = 40  # images up to this side on an even ground take the fast path
CLEAN_BORDER_SPREAD = 16  # most minus least of the outermost pixels: an even ground
MIN_SIDE = 64
DIGIT_SIDE = 64
MIN_CONTRAST = 24.0
MIN_SNR = 5.5
LINE_SPAN = 0.95
LINE_TILT = 4
PEAK_PERCENTILE = 98
LINE_THICK = 3
MIN_FILL = 0.02  # a digit's pixels fill at least this share of its box (a 1-px 7: ~3%)
EDGE_BAND = 0.15  # page structure along an edge: within this share of the side ...
EDGE_COVER = 0.9  # ... covering this share of a row (a paper edge, a shadow line)
TABLE_LEVEL = 0.65  # an edge row this much darker than the paper is the table beyond it
TABLE_STEP = 0.2  # ... when the paper's edge is a sharp step of this share of the paper
STROKE_WINDOW = 4  # the second paper model's window, in stroke widths ...
MIN_WINDOW = 9  # ... and at least this many px
WEAK_FRACTION = 0.2  # hysteresis: weak ink joins the digit down to this share of the peak
WEAK_SIGMAS = 6.0  # ... and at least this many times the paper's noise above the paper
LOCAL_GAIN = 4.0  # a faint part of a stroke is raised at most this many times
# MNIST's stroke width relative to the digit's longer side, measured with
# `stroke_width` on 2,000 MNIST test digits: median 0.110, 10th-90th percentile
# 0.083-0.153 (tests/test_preprocess.py checks the median stays in the band).
TARGET_WIDTH = 0.11
WIDTH_BAND = (0.08, 0.155)


def _percentiles(values: Gray, qs: tuple[float, ...]) -> list[float]:
    """Percentiles of uint8 values from their histogram: far cheaper than a sort."""
    cum = np.cumsum(np.bincount(values.ravel(), minlength=256))
    found = np.searchsorted(cum, np.asarray(qs) * (cum[-1] / 100))
    return [float(v) for v in found]


def _fit(gray: Gray, dark_paper: bool | None = None) -> Gray:
    """`gray` at working size; when it shrinks by 2x or more and the polarity is known,
    the ink is thickened first by the shrink factor (a min filter for dark ink, a max
    filter for light), so a 1-2 px pen line on a big canvas keeps its full darkness
    instead of being averaged into the paper."""
    h, w = gray.shape
    side = max(h, w)
    if side > WORK_SIDE:
        s = WORK_SIDE / side
        f = int(1 / s)
        if dark_paper is not None and f >= 2:
            k = cv2.getStructuringElement(cv2.MORPH_RECT, (f, f))
            gray = np.asarray(cv2.dilate(gray, k) if dark_paper else cv2.erode(gray, k), np.uint8)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        return np.asarray(cv2.resize(gray, size, interpolation=cv2.INTER_AREA), np.uint8)
    if side < MIN_SIDE:
        f = -(-MIN_SIDE // side)
        size = (w * f, h * f)
        return np.asarray(cv2.resize(gray, size, interpolation=cv2.INTER_CUBIC), np.uint8)
    return gray


def _dark_paper(img: Gray) -> bool:
    """True when the ink is lighter than the paper (a white-on-black canvas).

    The border is mostly background. Light ink on a dark ground is a drawing app's
    canvas, an MNIST file or a blackboard: an evenly dark border. A photographed page in
    deep shadow can have a dark border too, but never an even one, and its ink is still
    the darkest thing on it, so an uneven border means paper.
    """
    h, w = img.shape
    b = max(1, min(h, w) // 16)
    border = np.concatenate(
        [img[:b].ravel(), img[-b:].ravel(), img[:, :b].ravel(), img[:, -b:].ravel()]
    )
    p10, paper, p60 = _percentiles(border, (10, 50, 60))
    if paper >= 128 or p60 - p10 > 30:
        return False
    # Dim paper in a dim room has an even, dark border too. What tells the two apart is
    # which way the strokes stand out from their surroundings: a box blur a third of the
    # image wide (the paper window of `_ink_map`) follows light and shadow but not a
    # stroke, so the ink leaves the longer one-sided tail of deviations from it.
    k = max(3, min(h, w) // 3)
    near = cv2.blur(img, (k, k), borderType=cv2.BORDER_REPLICATE)
    lighter = _percentiles(np.asarray(cv2.subtract(img, near), np.uint8), (99.5,))[0]
    darker = _percentiles(np.asarray(cv2.subtract(near, img), np.uint8), (99.5,))[0]
    return bool(lighter > darker)


def _is_dark_row(row: Gray, level: float) -> bool:
    """True when EDGE_COVER of the row's pixels are darker than `level`."""
    return bool(np.count_nonzero(row < level) >= EDGE_COVER * row.size)


def _trim_edges(img: Gray) -> Gray:
    """`img` without the dark rows and columns at its edges that are beyond the paper.

    A crop cut from a photographed sheet often shows the table past the paper's edge:
    rows from the border inward that are dark (under TABLE_LEVEL of the paper) across
    EDGE_COVER of their length, and at most EDGE_BAND of the side. The paper model
    would take such a strip for ink, and where the digit touches it, for a part of the
    digit; a stroke never darkens a whole row.
    """
    (paper,) = _percentiles(img, (90,))  # the lit paper: most of the image, and lighter
    cut = []
    for side in (img, img[::-1], img.T, img.T[::-1]):
        # Rows from this edge inward: dark across their length, up to the paper's edge,
        # which is a step of at least TABLE_STEP of the paper's level within 3 rows (a
        # shadow's edge is soft: its darkness fades over many rows, and it stays).
        n, limit = len(side), round(EDGE_BAND * len(side))
        k = 0
        while k < limit and _is_dark_row(side[k], TABLE_LEVEL * paper):
            k += 1
        if k and k + 1 < n:
            level = np.median(side[[max(0, k - 2), k + 1]], axis=1)
            if level[1] - level[0] < TABLE_STEP * paper:
                k = 0
        cut.append(k)
    h, w = img.shape
    return img[cut[0] : h - cut[1], cut[2] : w - cut[3]]


def _ink_map(img: Gray, dark_paper: bool, k: int = 0) -> Gray:
    """Ink strength 0-255 with the paper, its shadows and uneven light taken out."""
    # A window a third of the image wide is far wider than any stroke, so thick strokes
    # stay solid (a median filter narrower than the stroke would hollow them out).
    # Computed at full working size: a background shrunk and enlarged again misses the
    # sharp edge of a shadow by a few pixels, and that edge then reads as ink.
    k = (k or max(3, min(img.shape) // 3)) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
    # Closing keeps the light paper and fills in dark ink narrower than the window (an
    # opening does the same for a dark canvas).
    op = cv2.MORPH_OPEN if dark_paper else cv2.MORPH_CLOSE
    bg = cv2.morphologyEx(img, op, kernel, borderType=cv2.BORDER_REPLICATE)
    if dark_paper:
        return np.asarray(cv2.subtract(img, bg), np.uint8)
    # Ink darkens paper by a fraction of its brightness; dividing by the local paper
    # level makes a stroke in shadow as strong as one in full light.
    return np.asarray(cv2.divide(cv2.subtract(bg, img), np.maximum(bg, 1), scale=255), np.uint8)


def _lines(mask: Gray) -> Gray:
    """Pixels of ruled or squared paper: thin runs along a band that crosses the image.

    A band is where a run of LINE_SPAN of the image fits once the mask is smeared
    across by LINE_TILT px, so lines tilted by a camera still count. Within the band
    only pixels whose crosswise run is at most LINE_THICK px go; a pen stroke lying
    along a line is thicker and stays, and so does a stroke that crosses a line.
    """
    h, w = mask.shape
    out = np.zeros_like(mask)
    for horizontal in (True, False):
        n = w if horizontal else h
        along = (max(3, int(n * LINE_SPAN)), 1)
        across = (1, 2 * LINE_TILT + 1)
        run = (1, LINE_THICK + 1)
        if not horizontal:
            along, across, run = along[::-1], across[::-1], run[::-1]
        smeared = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_RECT, across))
        band = open_line(np.asarray(smeared, np.uint8), max(along), horizontal=horizontal)
        if band is None:
            continue  # nothing runs across: no line this way
        thick = cv2.morphologyEx(
            mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, run)
        )
        thin = cv2.subtract(mask, thick)
        out |= np.asarray(cv2.bitwise_and(thin, band), np.uint8)
    return out


def _edge_bands(mask: Gray) -> Gray:
    """Pixels of the page's structure along the image's edges: a paper edge with the
    table beyond it, a shadow line or a fold, running across the whole image within
    EDGE_BAND of its side.

    Such a band may be as thick as a stroke and touch a digit that fills a small crop,
    so neither the line test nor the component test sees it; a hand-drawn stroke never
    covers EDGE_COVER of a row. Rows are counted after a smear of 2% of the image, so
    a band tilted by the camera still counts.
    """
    out = np.zeros_like(mask)
    for horizontal in (True, False):
        m = mask if horizontal else mask.T
        rows_n, cols_n = m.shape
        tilt = max(1, round(0.02 * rows_n))
        smear = cv2.getStructuringElement(cv2.MORPH_RECT, (1, 2 * tilt + 1))
        cover = np.count_nonzero(cv2.dilate(m, smear), axis=1) / cols_n
        edge = max(1, round(EDGE_BAND * rows_n))
        full = cover >= EDGE_COVER
        full[edge : rows_n - edge] = False
        if not full.any():
            continue
        # The band's blurred fringe: rows at least half covered next to it.
        band = full.copy()
        for _ in range(edge):
            grown = band | ((np.roll(band, 1) | np.roll(band, -1)) & (cover >= 0.5))
            if (grown == band).all():
                break
            band = grown
        band = np.convolve(band, np.ones(2 * tilt + 1), "same") > 0
        # Only what is no taller than the band goes: a stroke that crosses it, or lies
        # along it and is thicker, stays.
        tall = cv2.getStructuringElement(cv2.MORPH_RECT, (1, int(band.sum()) + 3))
        thin = cv2.subtract(m, cv2.morphologyEx(m, cv2.MORPH_OPEN, tall))
        hit = np.zeros_like(m)
        hit[band] = thin[band]
        out |= hit if horizontal else np.ascontiguousarray(hit.T)
    return out


def open_line(mask: Gray, length: int, *, horizontal: bool) -> Gray | None:
    """cv2.morphologyEx(mask, MORPH_OPEN, a `length`-pixel line), or None when it is empty.

    The opening is computed only on the rows (or columns) that can keep a pixel: the
    erosion keeps a pixel only when every pixel of its window, clipped to the image, is
    set, so a row with fewer set pixels than the shortest clipped window keeps none, and
    a line kernel never mixes rows. A page-long opening cost ~1 ms on a 400x300 photo;
    most photos have no row to open at all, and ruled paper a few.
    """
    n = mask.shape[1] if horizontal else mask.shape[0]
    start = np.arange(n) - length // 2  # OpenCV's anchor: the window starts length // 2 before
    shortest = int((np.clip(start + length, 0, n) - np.clip(start, 0, n)).min())
    rows = np.flatnonzero(np.count_nonzero(mask, axis=1 if horizontal else 0) >= shortest)
    if rows.size == 0:
        return None
    size = (length, 1) if horizontal else (1, length)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, size)
    out = np.zeros_like(mask)
    if horizontal:
        out[rows] = cv2.morphologyEx(np.ascontiguousarray(mask[rows]), cv2.MORPH_OPEN, kernel)
    else:
        part = np.ascontiguousarray(mask[:, rows])
        out[:, rows] = cv2.morphologyEx(part, cv2.MORPH_OPEN, kernel)
    return out


def _select(mask: Gray) -> tuple[tuple[int, int, int, int], Labels, Gray] | None:
    """The digit's box (x0, y0, x1, y1), the labels and a table of the labels it keeps.

    `table[labels]` is the digit's mask; the caller looks it up only in the crop it takes
    (over the whole 400x300 labels the lookup was ~0.3 ms of a photo's ~3.5 ms).
    None when there is no digit.
    """
    h, w = mask.shape
    # 16-bit labels whenever every possible component fits (8-connected, at most one per
    # 2x2 cell): the same labels, stats and centroids, and OpenCV takes ~0.27 ms instead
    # of ~0.88 on a 400x300 photo (its 32-bit path is the slower algorithm here).
    ltype = cv2.CV_16U if -(-h // 2) * -(-w // 2) < 65535 else cv2.CV_32S
    n, labels, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=ltype)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    # A mark running across nearly the whole page with strokes a hair thin for its size
    # is a margin line, the rest of a grid or the page's edge, never a digit: a 1 or 7
    # filling a 16x16 scan or a small crop is drawn with a pen many times thicker.
    cw, ch = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
    page_line = np.zeros(len(areas), bool)
    for i in np.nonzero((ch >= 0.9 * h) | (cw >= 0.9 * w))[0]:
        one = (labels == i + 1).astype(np.uint8) * 255
        page_line[i] = stroke_width(one) < 0.015 * max(cw[i], ch[i])
    areas[page_line] = 0
    # A flat dash (a piece of a ruled line) can join a digit, as the bar of a 5 does,
    # but is never the digit itself.
    dash = cw > 5 * ch
    if not (areas * ~dash).any():
        return None
    if not areas.any():
        return None
    # Prefer big components near the middle: marks at the edge of a photo are rarely the digit.
    d = np.hypot((cents[1:, 0] - w / 2) / w, (cents[1:, 1] - h / 2) / h)
    main = int(np.argmax(areas * (1.2 - d) * ~dash))
    if areas[main] < 0.25 * areas.max():
        return None  # only dashes and bits of them: a ruled page without a digit
    # Grow a box from the main component: a piece is part of the digit when it is not
    # a speck and its box touches the digit's box widened by a third of its size (the
    # detached bar of a 5, the halves of a 4, a stroke broken by faint ink).
    box = stats[1:, :4].astype(np.float64)
    box[:, 2:] += box[:, :2]
    keep = [main]
    x0, y0, x1, y1 = box[main]
    candidates = set(np.nonzero(areas >= 0.05 * areas.max())[0]) - {main}
    grown = True
    while grown:
        grown = False
        reach = max(x1 - x0, y1 - y0) / 3
        for i in sorted(candidates):
            bx0, by0, bx1, by1 = box[i]
            if bx0 <= x1 + reach and bx1 >= x0 - reach and by0 <= y1 + reach and by1 >= y0 - reach:
                keep.append(int(i))
                candidates.discard(i)
                x0, y0, x1, y1 = min(x0, bx0), min(y0, by0), max(x1, bx1), max(y1, by1)
                grown = True
    boxes = stats[1 + np.array(keep)]
    bx0 = int(boxes[:, 0].min())
    by0 = int(boxes[:, 1].min())
    bx1 = int((boxes[:, 0] + boxes[:, 2]).max())
    by1 = int((boxes[:, 1] + boxes[:, 3]).max())
    if max(bx1 - bx0, by1 - by0) < 0.04 * max(h, w) or areas[keep].sum() < 12:
        return None
    mx0, my0, mx1, my1 = box[main]
    grown_area = (bx1 - bx0) * (by1 - by0)
    if grown_area > 4 * (mx1 - mx0) * (my1 - my0) and areas[keep].sum() < MIN_FILL * grown_area:
        return None  # a speck that gathered scattered bits of ruled lines across the page
    table = np.zeros(n, np.uint8)
    table[1 + np.array(keep)] = 255
    return (bx0, by0, bx1, by1), labels, table


def _grow(ink: Gray, seeds: Gray, peak: float) -> Gray:
    """The digit's strokes whole: weak ink kept where it connects to the digit's seeds.

    Hysteresis, as in Canny's edge detector: a pen rarely presses evenly, and the stem
    of a 6 or the top of an 8 at a third of the pen's level is cut off by the half-peak
    mask. The weak level is WEAK_FRACTION of the peak, or WEAK_SIGMAS times the paper's
    own noise above it when that is higher (ink only a few levels darker than grainy
    paper), measured on a one-pixel blur that also joins pencil grain. Lines and grain
    thinner than the pen are opened out of the weak mask first, so a ruled line
    crossing the digit does not join it.
    """
    b: Gray = np.asarray(cv2.GaussianBlur(ink, (0, 0), 1.0), np.uint8)
    # Mostly paper: its median, and its spread from below (ruled lines, shadow residue
    # and the ink itself are all on the upper side, and can cover a sixth of the page).
    lower, paper = _percentiles(b, (16, 50))
    level = max(WEAK_FRACTION * peak, paper + WEAK_SIGMAS * max(1.0, paper - lower))
    if level >= 0.5 * peak:
        return seeds
    weak = np.asarray((b > level).astype(np.uint8) * 255)
    # A faint part of a stroke is about as wide as the rest of the pen's stroke; ruled
    # lines, the rest of a grid and paper grain are thinner, and an opening by a disc
    # half the seeds' stroke width takes them out of the weak mask, tilted or broken as
    # they may be. The seeds are put back after, so no strong ink is lost to it.
    r = max(1, round(0.25 * stroke_width(seeds)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    weak = np.asarray(cv2.morphologyEx(weak, cv2.MORPH_OPEN, disc), np.uint8)
    # A shadow line along the edge is only partly over half the peak, and the part that
    # touches the digit came in with the seeds: at the weak level it is whole and found.
    bands = _edge_bands(weak)
    seeds = np.asarray(cv2.subtract(seeds, bands), np.uint8)
    weak = np.asarray(cv2.subtract(weak, bands), np.uint8) | seeds
    n, labels = cv2.connectedComponents(weak, connectivity=8)
    table = np.zeros(n, np.uint8)
    table[np.unique(labels[seeds > 0])] = 255
    table[0] = 0
    return np.asarray(table[labels], np.uint8)


def _structured(ink: Gray) -> bool:
    """False for noise: ink must stand out from the paper after a slight blur.

    A blur of one pixel leaves strokes standing but averages noise away, so on the
    blurred map white noise of any strength scores about 4.5-5 and every digit kind of
    the test corpus at least 6.3 (MIN_SNR sits between).
    """
    b: Gray = np.asarray(cv2.GaussianBlur(ink, (0, 0), 1.0), np.uint8)
    _, m = cv2.threshold(b, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    fg, bg = b[m > 0], b[m == 0]
    if fg.size == 0 or bg.size == 0:
        return False
    snr = (_percentiles(fg, (PEAK_PERCENTILE,))[0] - float(bg.mean())) / (float(bg.std()) + 1)
    return snr >= MIN_SNR


def stroke_width(mask: Gray) -> float:
    """Mean stroke width of a binary mask: twice its area over its perimeter."""
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    area = float(cv2.countNonZero(mask))
    return 2 * area / perimeter if perimeter > 0 else 0.0


def _render(mask: Gray) -> Gray | None:
    # The box is the pen's edge (over half its level), not its faint fringe.
    bx, by, w, h = cv2.boundingRect(cv2.threshold(mask, 127, 255, cv2.THRESH_BINARY)[1])
    if w == 0:
        return None
    crop = mask[by : by + h, bx : bx + w]
    s = 20.0 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA)
    m = cv2.moments(small)
    if m["m00"] <= 0:
        return None
    # Place the 20x20 fit so its centre of mass lands on (14, 14), to the whole pixel,
    # clipped at the frame as a shift of the centred fit would be.
    y0, x0 = (28 - nh) // 2, (28 - nw) // 2
    dx = round(14 - (x0 + m["m10"] / m["m00"]))
    dy = round(14 - (y0 + m["m01"] / m["m00"]))
    top, left = y0 + dy, x0 + dx
    out = np.zeros((28, 28), np.uint8)
    out[max(0, top) : min(28, top + nh), max(0, left) : min(28, left + nw)] = small[
        max(0, -top) : min(nh, 28 - top), max(0, -left) : min(nw, 28 - left)
    ]
    if top >= 0 and top + nh <= 28 and left >= 0 and left + nw <= 28:
        # Nothing clipped: the placed digit's central moments are the fit's own.
        return _shear(out, m["mu11"], m["mu02"], top + m["m01"] / m["m00"])
    return deskew(out)


def _clean_small(gray: Gray) -> Gray | None | bool:
    """Fast path for a small image on an even ground (an MNIST file, an icon-sized drawing).

    Returns False when the image is not one (the full path runs), else what `to_mnist`
    returns. Such an image has no paper, shadow, ruled line or stroke width to correct,
    so the ink is its distance from the ground; this skips the enlargement and the
    morphology that cost ~1 ms on a 28x28 file.
    """
    h, w = gray.shape
    if max(h, w) > CLEAN_SIDE or min(h, w) < 8:
        return False
    # Per call this path is mostly fixed costs of small numpy and OpenCV calls, so the
    # cheapest form of each is used (minMaxLoc, no subtract on a black ground, TOZERO).
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    lo, hi, _, _ = cv2.minMaxLoc(border)
    if hi - lo > CLEAN_BORDER_SPREAD:
        return False
    # The median (np.median is ~10x slower than a sort of these few pixels).
    ground = int(lo) if hi == lo else int(np.sort(border)[border.size // 2])
    ink = gray  # light ink on black (MNIST's own files): the ink is the pixel
    if ground:
        flat = np.full_like(gray, ground)
        ink = np.asarray(
            cv2.subtract(gray, flat) if ground < 128 else cv2.subtract(flat, gray), np.uint8
        )
    peak = cv2.minMaxLoc(ink)[1]
    if peak < MIN_CONTRAST:
        return None
    soft = cv2.convertScaleAbs(ink, alpha=255.0 / peak)
    # As the full path: under a quarter of the pen's level is not ink.
    soft = cv2.threshold(soft, 63, 255, cv2.THRESH_TOZERO)[1]
    return _render(np.asarray(soft, np.uint8))


def _seeds(ink: Gray) -> tuple[Gray, float] | None:
    """The digit's strong strokes in `ink` and the pen's peak level, or None for no digit."""
    t_otsu, otsu = cv2.threshold(ink, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    mask: Gray = np.asarray(otsu, np.uint8)
    fg = ink[mask > 0]  # the paper is not gathered: its mean comes from sums below
    if fg.size == 0 or fg.size == ink.size:
        return None
    peak = _percentiles(fg, (PEAK_PERCENTILE,))[0]
    # Integer sums are exact in float64, so this is bg.mean() to the bit.
    paper = (cv2.sumElems(ink)[0] - float(fg.sum())) / (ink.size - fg.size)
    if peak - paper < MIN_CONTRAST:
        return None
    # Otsu cuts noise about in half; a digit, even one filling a 16x16 scan, covers
    # less than that, and a page with a little ink needs no noise test at all.
    if fg.size > 0.15 * ink.size and not _structured(ink):
        return None
    # Otsu separates paper from everything drawn on it, squared-paper lines included,
    # which can outnumber the ink twenty to one; the pen's stroke is the strongest part
    # of that, and its edge is at half its level.
    # Notebook lines are fainter than ink and mostly fall below.
    if 0.5 * peak > t_otsu:
        mask = np.asarray((ink > 0.5 * peak).astype(np.uint8) * 255)
    mask = np.asarray(cv2.subtract(mask, _lines(mask)), np.uint8)
    mask = np.asarray(cv2.subtract(mask, _edge_bands(mask)), np.uint8)
    found = _select(mask)
    if found is None:
        return None
    _, labels, table = found
    return np.asarray(table[labels], np.uint8), peak


def to_mnist(gray: Gray) -> Gray | None:
    """Return the 28x28 image the model sees, or None when there is no digit."""
    quick = _clean_small(gray)
    if quick is not False:
        return quick  # type: ignore[return-value]
    f = max(gray.shape) // WORK_SIDE
    if f >= 2:
        # The polarity decides how the ink is thickened before the shrink, so it is read
        # first, from every f-th pixel: an area-averaged shrink only to find it took
        # ~0.5 ms of a 640x480 photo, and on the corpus's 2,081 images of 512 px or more
        # (seed 1) the two polarities agree on every one.
        dark = _dark_paper(_fit(np.ascontiguousarray(gray[::f, ::f])))
        img = _fit(gray, dark)
    else:
        img = _fit(gray)
        dark = _dark_paper(img)
    if not dark:
        img = _trim_edges(img)
    ink = _ink_map(img, dark)
    found = _seeds(ink)
    if found is None:
        return None
    seeds, peak = found
    # The paper again, with a window from the digit's own stroke width: a third of the
    # image lifts the soft knee of a shadow's edge and the dark side of a fold into the
    # ink map, where faint ink (25-50 grey levels) cannot outshine them. A window
    # STROKE_WINDOW strokes wide still fills every stroke and joint, and follows the
    # shadow closely. (The first pass's stroke width is of its half-peak mask.)
    k = max(MIN_WINDOW, round(STROKE_WINDOW * stroke_width(seeds)))
    if k < 0.7 * (min(img.shape) // 3):
        narrow = _ink_map(img, dark, k)
        again = _seeds(narrow)
        if again is not None:
            ink, (seeds, peak) = narrow, again
    whole = _grow(ink, seeds, peak)
    x0, y0, bw, bh = cv2.boundingRect(whole)
    x1, y1 = x0 + bw, y0 + bh
    h, w = ink.shape
    pad = max(2, (max(x1 - x0, y1 - y0)) // 8)
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    crop = ink[y0:y1, x0:x1]
    keep = whole[y0:y1, x0:x1]
    ch, cw = crop.shape
    s = DIGIT_SIDE / max(ch, cw)
    size = (max(1, round(cw * s)), max(1, round(ch * s)))
    crop = np.asarray(
        cv2.resize(crop, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR),
        np.uint8,
    )
    keep = np.asarray(cv2.resize(keep, size, interpolation=cv2.INTER_NEAREST), np.uint8)
    vals = crop[keep > 0]
    if vals.size == 0:
        return None
    (peak,) = _percentiles(vals, (90,))
    # Each part of the stroke is scaled by its own level (the most ink within a stroke's
    # width of it), so a part drawn at a third of the pen's pressure comes out as solid
    # as the rest: MNIST's strokes are all saturated. Only the digit's own pixels are
    # looked at, so shadow and paper around it are never boosted, and no part is raised
    # more than LOCAL_GAIN times. The stroke's core is its local maximum, so a level
    # of 0.9 of it is full ink, and the anti-aliased edge 2 px around the mask is kept.
    reach = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (DIGIT_SIDE // 8 + 1,) * 2)
    local = cv2.dilate(cv2.bitwise_and(crop, keep), reach)
    local = np.maximum(local.astype(np.float32), peak / LOCAL_GAIN)
    soft = np.asarray(np.clip(crop * (255.0 / 0.9) / local, 0, 255), np.uint8)
    near = cv2.dilate(keep, np.ones((3, 3), np.uint8), iterations=2)
    soft = np.asarray(cv2.bitwise_and(soft, near), np.uint8)
    # Below a quarter of the stroke's level is paper grain or a notebook line, not ink.
    soft[soft < 64] = 0
    digit = np.asarray((soft > 127).astype(np.uint8) * 255)
    if cv2.countNonZero(digit) == 0:
        return None
    ys, xs = np.nonzero(digit)
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    width = stroke_width(digit)
    # MNIST's own widths spread over WIDTH_BAND; only strokes outside it change.
    ratio = width / side
    r = 0
    if not WIDTH_BAND[0] <= ratio <= WIDTH_BAND[1]:
        r = round((TARGET_WIDTH * side - width) / 2)
    if r > 0:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        soft = np.asarray(cv2.dilate(np.pad(soft, r), disc), np.uint8)
    elif r < 0:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (-2 * r + 1, -2 * r + 1))
        eroded = cv2.erode(soft, disc)
        if cv2.countNonZero(eroded) > 0.3 * cv2.countNonZero(soft):
            soft = np.asarray(eroded, np.uint8)
    return _render(np.asarray(soft, np.uint8))


def deskew(img: Gray) -> Gray:
    """Shear a centred 28x28 digit upright by its second moments (mu11 / mu02).

    The last step of `to_mnist`, and applied to MNIST itself for training and
    evaluation, so the model sees exactly what the pipeline hands it: slant is the
    largest variation left in a mass-centred digit, and an MLP has no tolerance for it.
    """
    m = cv2.moments(img)
    if m["m00"] <= 0:
        return img
    return _shear(img, m["mu11"], m["mu02"], m["m01"] / m["m00"])


def _shear(img: Gray, mu11: float, mu02: float, cy: float) -> Gray:
    """`deskew` from the moments: shear about the centre of mass row cy, which stays put."""
    if abs(mu02) < 1e-2:
        return img
    skew = mu11 / mu02
    shear = np.array([[1, skew, -skew * cy], [0, 1, 0]], np.float32)
    flags = cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR
    return np.asarray(cv2.warpAffine(img, shear, (28, 28), flags=flags), np.uint8)


def deskew_all(images: Gray) -> Gray:
    """`deskew` over an (N, 28, 28) stack."""
    return np.stack([deskew(img) for img in images]) if len(images) else images
