"""Decode stage: image bytes to an 8-bit gray array, with limits checked before decoding.

The format comes from the magic bytes, never from the file name. Width and height are
read from the header in pure Python and checked against `Limits` before OpenCV sees
the data: OpenCV's own cap is 2^30 pixels, so a 30000x30000 PNG of under 1 MB would
otherwise decode to 1.8 GB. Formats whose size cannot be read from the header are
refused rather than decoded blind. The memory a decode will take is estimated from the
header too (`decode_cost`) and held to `Limits.max_decode_bytes`.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from digitwatch.errors import InputError

Gray = npt.NDArray[np.uint8]

# A corrupt file becomes an error record; OpenCV's own warnings on stderr would only
# repeat it, out of order with our logs.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

# JPEG decoding is cheapest when libjpeg scales the DCT (IMREAD_REDUCED_*). A factor is
# used only while the reduced shorter side stays at or above this many pixels: a digit
# covering a tenth of such an image still gets about 40 px, far more than the 20 px box
# it ends in, so the answer does not change (benchmarks/corpus_accuracy.py measures it).
REDUCED_MIN_SIDE = 360
_REDUCED_FLAGS = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
)


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 40_000_000
    max_bytes: int = 50 * 1024 * 1024
    max_decode_bytes: int = 600 * 1024 * 1024  # settings.py explains the default


@dataclass(frozen=True)
class Header:
    """What the header says: format, size, whether pixels may carry transparency, and
    the bytes per pixel OpenCV decodes with IMREAD_UNCHANGED (channels x sample size)."""

    format: str
    width: int
    height: int
    alpha: bool
    pixel_bytes: int = 4


# Holds `nbytes` of the decode budget for the duration of one decode: the workers share
# one budget (pipeline.py), so two large files are decoded one after the other.
Hold = Callable[[int], AbstractContextManager[None]]


def _no_hold(nbytes: int) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def _png(data: bytes) -> Header:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise InputError("truncated PNG header")
    width, height, depth, color_type = struct.unpack(">IIBB", data[16:26])
    alpha = color_type in (4, 6)
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(color_type, 4)
    # Every chunk is walked (a few per small file, ~1 us each): OpenCV's PNG reader
    # allocates what a chunk's length field claims before reading it, so a 66-byte file
    # claiming a 4 GB chunk took 4.1 GB of RAM (found by `make fuzz`). A chunk must fit
    # in the file. A tRNS chunk (before the first IDAT) makes a gray, RGB or palette
    # image transparent.
    pos, end, seen_idat = 33, len(data), False
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if pos + 12 + length > end and not (kind == b"IEND" and pos + 8 + length <= end):
            raise InputError(f"truncated or corrupt PNG: a {length}-byte chunk runs past the end")
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            seen_idat = True
        elif kind == b"tRNS" and not seen_idat:
            alpha = True
            channels = 4 if color_type in (2, 3) else 2  # OpenCV adds an alpha channel
        pos += 12 + length
    return Header("PNG", width, height, alpha, channels * (2 if depth == 16 else 1))


# Start-of-frame markers carry the size; C4 (huffman tables), C8 and CC are not frames.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(data: bytes) -> Header:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise InputError("corrupt JPEG header")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return Header("JPEG", width, height, False, 3)
        if marker == 0xDA or length < 2:  # scan data before any frame header
            break
        pos += 2 + length
    raise InputError("truncated JPEG header (no frame size found)")


def _gif(data: bytes) -> Header:
    if len(data) < 10:
        raise InputError("truncated GIF header")
    width, height = struct.unpack("<HH", data[6:10])
    return Header("GIF", width, height, False)


def _bmp(data: bytes) -> Header:
    if len(data) < 26:
        raise InputError("truncated BMP header")
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<hh", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    # Height is negative for top-down rows. 32-bit BMPs often hold garbage in the
    # fourth byte and OpenCV drops it anyway, so BMP is read as opaque.
    return Header("BMP", abs(width), abs(height), False)


def _webp(data: bytes) -> Header:
    if len(data) < 30:
        raise InputError("truncated WebP header")
    chunk = data[12:16]
    if chunk == b"VP8X":
        flags = data[20]
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return Header("WebP", width, height, bool(flags & 0x10))
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise InputError("corrupt WebP lossless header")
        (bits,) = struct.unpack("<I", data[21:25])
        width = 1 + (bits & 0x3FFF)
        height = 1 + ((bits >> 14) & 0x3FFF)
        return Header("WebP", width, height, bool(bits >> 28 & 1))
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise InputError("corrupt WebP lossy header")
        width, height = struct.unpack("<HH", data[26:30])
        return Header("WebP", width & 0x3FFF, height & 0x3FFF, False)
    raise InputError("unknown WebP variant")


def _tiff(data: bytes) -> Header:
    end = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(end + "I", data[4:8])
        (count,) = struct.unpack(end + "H", data[ifd : ifd + 2])
        tags: dict[int, int] = {}
        for i in range(count):
            entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, kind, n = struct.unpack(end + "HHI", entry[:8])
            if kind == 3:  # SHORT: value left-justified in the 4-byte field
                (value,) = struct.unpack(end + "H", entry[8:10])
            elif kind == 4:  # LONG
                (value,) = struct.unpack(end + "I", entry[8:12])
            else:
                continue
            if n == 1 or tag == 338:
                tags[tag] = value
    except struct.error:
        raise InputError("truncated TIFF header") from None
    if 256 not in tags or 257 not in tags:
        raise InputError("TIFF header has no image size")
    # ExtraSamples (338) marks an alpha channel; 2 samples means gray + alpha.
    # Four samples with PhotometricInterpretation 5 are CMYK, not RGBA.
    alpha = 338 in tags or (tags.get(277, 1) in (2, 4) and tags.get(262) != 5)
    # Samples may be 16-bit or float (the sizes sit behind an offset): assume 4 x 16 bits.
    return Header("TIFF", tags[256], tags[257], alpha, 8)


def image_format(data: bytes) -> str | None:
    """The supported format the magic bytes name (before any header is read), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


_HEADERS = {"PNG": _png, "JPEG": _jpeg, "GIF": _gif, "BMP": _bmp, "WebP": _webp, "TIFF": _tiff}
UNSUPPORTED = "not an image in a supported format (PNG, JPEG, GIF, BMP, WebP, TIFF)"


def read_header(data: bytes) -> Header:
    """Identify the format by its magic bytes and read the size; InputError otherwise."""
    fmt = image_format(data)
    if fmt is None:
        raise InputError(UNSUPPORTED)
    return _HEADERS[fmt](data)


def _to_8bit(img: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    if img.dtype == np.uint8:
        return np.asarray(img, dtype=np.uint8)
    if img.dtype == np.uint16:
        return np.asarray(np.right_shift(img, 8), dtype=np.uint8)
    f = img.astype(np.float32)
    if f.size and float(np.nanmax(f)) <= 1.0:  # float TIFF scaled to [0, 1]
        f *= 255.0
    return np.asarray(np.clip(np.nan_to_num(f), 0, 255), dtype=np.uint8)


# Strips converted at a time by _flatten: each conversion step makes a temporary array,
# and on a whole 36 MP 16-bit RGBA image they added ~500 MB to the decoder's 288 MB.
_STRIP_PIXELS = 1 << 20


def _flatten(raw: npt.NDArray[Any]) -> Gray:
    """`_flatten_alpha`, a strip of rows at a time, so the temporaries stay small."""
    if raw.dtype == np.uint8 and raw.ndim == 2:
        return raw
    height, width = raw.shape[:2]
    rows = max(1, _STRIP_PIXELS // max(1, width))
    out = np.empty((height, width), np.uint8)
    for top in range(0, height, rows):
        out[top : top + rows] = _flatten_alpha(raw[top : top + rows])
    return out


def _flatten_alpha(raw: npt.NDArray[Any]) -> Gray:
    """Any channel count and depth to 8-bit gray, with transparency composited onto white."""
    img = _to_8bit(raw)
    if img.ndim == 2:
        return img
    channels = img.shape[2]
    if channels == 1:
        return np.ascontiguousarray(img[:, :, 0])
    if channels == 3:
        return np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
    alpha = img[:, :, -1]
    gray: Gray = (
        img[:, :, 0]
        if channels == 2
        else np.asarray(cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY))
    )
    # gray*a + 255*(1-a) in integers: strokes drawn only in the alpha channel (any
    # color, even black under full transparency) become dark ink on white paper.
    a = alpha.astype(np.uint16)
    out = (gray.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return np.asarray(out, dtype=np.uint8)


def decode(data: bytes, limits: Limits) -> Gray:
    """Return the image as 2-D uint8 gray; raise InputError with a one-line reason."""
    return decode_with_header(data, limits)[0]


def decode_cost(head: Header, flag: int) -> int:
    """Bytes of memory decoding `head` with `flag` takes at its peak, an upper estimate.

    OpenCV's decoders hold a second copy of the pixels while decoding (a 36 MP 16-bit
    RGBA PNG, 288 MB of pixels, raised peak RSS by 556 MB; as 8-bit gray, 36 MB of
    pixels, by 74 MB), and an image with more than one byte per pixel is then made
    8-bit gray beside it (`_flatten`, a strip at a time). Formats other than PNG and
    JPEG are decoded in color before OpenCV makes them gray.
    """
    width, height, per_pixel = head.width, head.height, 1
    if flag == cv2.IMREAD_UNCHANGED:
        per_pixel = head.pixel_bytes
    else:
        for factor, reduced in _REDUCED_FLAGS:
            if flag == reduced:
                width, height = -(-width // factor), -(-height // factor)
    if head.format not in ("PNG", "JPEG"):
        per_pixel = max(per_pixel, head.pixel_bytes)
    pixels = width * height
    return 2 * pixels * per_pixel + (pixels if per_pixel > 1 else 0)


def decode_with_header(data: bytes, limits: Limits, hold: Hold = _no_hold) -> tuple[Gray, Header]:
    """Decode as `decode` does, and also return the header: the file's own size.

    A large JPEG is decoded reduced, so the array's shape is not the file's size; a
    result record that reports the input's width and height should take the header's
    (stored orientation, before any EXIF rotation).
    """
    if not data:
        raise InputError("empty file")
    if len(data) > limits.max_bytes:
        raise InputError(f"file is {len(data)} bytes, over the {limits.max_bytes} byte limit")
    head = read_header(data)
    if head.width <= 0 or head.height <= 0:
        raise InputError(f"{head.format} header gives a {head.width}x{head.height} image")
    if head.width * head.height > limits.max_pixels:
        raise InputError(
            f"{head.format} is {head.width}x{head.height} pixels, "
            f"over the {limits.max_pixels} pixel limit"
        )
    buf = np.frombuffer(data, np.uint8)
    flag = cv2.IMREAD_GRAYSCALE  # applies the EXIF orientation; UNCHANGED would not
    if head.alpha:
        flag = cv2.IMREAD_UNCHANGED  # keeps alpha (and depth) to composite below
    elif head.format == "JPEG":
        for factor, reduced in _REDUCED_FLAGS:
            if min(head.width, head.height) // factor >= REDUCED_MIN_SIDE:
                flag = reduced
                break
    cost = decode_cost(head, flag)
    if cost > limits.max_decode_bytes:
        raise InputError(
            f"{head.format} is {head.width}x{head.height} pixels: decoding would take "
            f"~{-(-cost >> 20)} MB, over the {limits.max_decode_bytes >> 20} MB "
            "decode budget (--max-decode-mb)"
        )
    with hold(cost):
        try:
            img = cv2.imdecode(buf, flag)
        except cv2.error as e:
            raise InputError(
                f"cannot decode {head.format}: {str(e).strip().splitlines()[-1]}"
            ) from None
        if img is None or img.size == 0:
            raise InputError(f"cannot decode {head.format} (corrupt or truncated)")
        return _flatten(img), head


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
