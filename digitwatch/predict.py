"""`digitwatch predict`: the pipeline over files named on the command line."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from digitwatch.classify import load_weights
from digitwatch.codec import Limits, write_png
from digitwatch.pipeline import Input, Pipeline, Result
from digitwatch.results import CSV_COLUMNS
from digitwatch.settings import Settings

CHUNK = 64
_NAME_MAX = 255  # bytes in one file name on Linux filesystems


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _folder(folder: str, recursive: bool) -> Iterator[Input]:
    """The files of a folder as the daemon sees an inbox: regular files are read; a
    symbolic link (a loop, or a link to /etc/shadow) is never followed and a FIFO, socket
    or device never opened, each an error record; hidden names are left out."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        yield Input(Path(folder).name, error=f"cannot list folder: {e.strerror or e}")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError as e:
            yield Input(entry.name, error=f"cannot stat file: {e.strerror or e}")
            continue
        if stat.S_ISLNK(mode):
            yield Input(entry.name, error="a symbolic link inside a folder: not followed")
        elif stat.S_ISDIR(mode):
            if recursive:
                yield from _folder(entry.path, recursive)
        elif stat.S_ISREG(mode):
            # Opened with O_NOFOLLOW (`read_file`): a link swapped in meanwhile is refused.
            yield Input(entry.name, path=entry.path)
        else:
            yield Input(entry.name, error=f"{_kind(mode)}: not read")


def _inputs(paths: list[Path], recursive: bool) -> Iterator[Input]:
    for path in paths:
        if path.is_dir():
            yield from _folder(str(path), recursive)
        else:
            # Named on the command line, so a symlink is followed: the user chose it. A
            # missing file becomes an error record.
            yield Input(path.name, path=str(path.resolve()))


_DEBUG_SUFFIX = ".28x28.png"


def _debug_name(name: str) -> str:
    """`<name>.28x28.png`, or, for a name too long to take the suffix (Linux allows 255
    bytes), its first bytes and a hash of the whole: still told apart, never refused."""
    raw = os.fsencode(name)
    if len(raw) + len(_DEBUG_SUFFIX) <= _NAME_MAX:
        return name + _DEBUG_SUFFIX
    digest = hashlib.sha256(raw).hexdigest()[:12]
    keep = _NAME_MAX - len(_DEBUG_SUFFIX) - len(digest) - 1
    return os.fsdecode(raw[:keep]) + f"~{digest}{_DEBUG_SUFFIX}"


def predict_paths(
    paths: list[Path], settings: Settings, *, debug_dir: Path | None = None
) -> list[Result]:
    limits = Limits(settings.max_pixels, settings.max_file_bytes, settings.max_decode_bytes)
    inputs = list(_inputs(paths, settings.recursive))
    results: list[Result] = []
    with Pipeline(
        load_weights(settings.weights),
        limits=limits,
        uncertain_below=settings.uncertain_below,
    ) as pipe:
        for i in range(0, len(inputs), CHUNK):
            chunk = inputs[i : i + CHUNK]
            out = pipe.run(chunk)  # read by the pipeline: size limit, regular files only
            if debug_dir is not None:
                debug_dir.mkdir(parents=True, exist_ok=True)
                for item, r in zip(chunk, out, strict=False):
                    if r.image is not None:
                        write_png(debug_dir / _debug_name(item.name), r.image)
            results.extend(out)
    return results


def render(results: list[Result], fmt: str) -> str:
    records = [r.record for r in results]
    if fmt == "json":
        return json.dumps([r.to_dict() for r in records], indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(r.to_json() + "\n" for r in records)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS[:-1] + ("width", "height", "elapsed_ms"))
        for r in records:
            writer.writerow(r.csv_fields()[:-1] + [r.width, r.height, r.elapsed_ms])
        return buf.getvalue()
    rows = [("input", "status", "digit", "confidence", "note")]
    for r in records:
        note = r.error or ("uncertain" if r.uncertain and r.status == "ok" else "")
        conf = f"{r.confidence:.3f}" if r.confidence is not None else "-"
        digit = str(r.digit) if r.digit is not None else "-"
        rows.append((r.input, r.status, digit, conf, note))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"
