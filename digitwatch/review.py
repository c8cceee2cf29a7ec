"""The review queue: answers the service doubts, kept for a person to accept, correct or reject.

Layout (the queue lives in the outbox by default, `--review-dir` moves it):

    review/<claim>/input<.ext>    the input as answered (a hard link when possible, else a copy)
    review/<claim>/seen.png       the 28x28 image the model saw (absent when nothing was found)
    review/<claim>/record.json    the result record
    review/decided/<claim>/...    the same, once decided: never queued again
    review/labels.csv             one row per decision (input, sha256, model digit, human digit)

An item is built under a hidden name and renamed into place, so a listing never sees half
of one; a decision appends its row under an exclusive flock, then moves the item.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digitwatch.errors import DigitwatchError, ExitCode
from digitwatch.results import Record

DECIDED = "decided"
LABELS = "labels.csv"
LABEL_COLUMNS = ("input", "sha256", "model_digit", "human_digit", "decided_at", "image")
RECORD = "record.json"
SEEN = "seen.png"


class ReviewError(DigitwatchError):
    exit_code = ExitCode.REVIEW


def wanted(record: Record) -> bool:
    """Doubtful answers go to a person: uncertain ones and pages where no digit was found."""
    return record.status == "no_digit" or (record.status == "ok" and record.uncertain)


def add(
    review_dir: Path, item_id: str, record: Record, input_path: Path, seen: bytes | None
) -> bool:
    """Queue one answer; False when the item exists already (queued or decided): never twice."""
    final, decided = review_dir / item_id, review_dir / DECIDED / item_id
    if final.exists() or decided.exists():
        return False
    tmp = review_dir / f".new-{item_id}"
    shutil.rmtree(tmp, ignore_errors=True)  # a half-built item from a crash
    tmp.mkdir(parents=True)
    target = tmp / ("input" + input_path.suffix.lower()[:16])
    try:
        os.link(input_path, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(input_path, target)
    if seen is not None:
        (tmp / SEEN).write_bytes(seen)
    (tmp / RECORD).write_text(record.to_json() + "\n")
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False  # queued meanwhile by a peer answering the same claim
    return True


@dataclass(frozen=True)
class Item:
    id: str
    folder: Path
    record: dict[str, Any]

    @property
    def image(self) -> Path:
        return next(self.folder.glob("input*"))


def _read(folder: Path) -> Item | None:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return Item(folder.name, folder, record)


def item(review_dir: Path, item_id: str) -> Item | None:
    """The queued item `item_id` (a plain name, as `items` lists it), or None."""
    return _read(review_dir / item_id)


def items(review_dir: Path) -> list[Item]:
    """The queue, newest first."""
    found: list[Item] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(review_dir):
            if entry.name.startswith(".") or entry.name == DECIDED or not entry.is_dir():
                continue
            item = _read(Path(entry.path))
            if item is not None:
                found.append(item)
    return sorted(found, key=lambda i: str(i.record.get("processed_at") or ""), reverse=True)


def decide(
    review_dir: Path, item_id: str, human_digit: int | None, *, accept: bool = False
) -> tuple[Item, int | None]:
    """Record a person's answer (None: not a digit) in labels.csv; the item leaves the queue."""
    if "/" in item_id or item_id in {"", ".", "..", DECIDED}:
        raise ReviewError(f"no review item {item_id!r}")
    item = _read(review_dir / item_id)
    if item is None:
        if (review_dir / DECIDED / item_id).exists():
            raise ReviewError(f"review item {item_id} is decided already")
        raise ReviewError(f"no review item {item_id!r} in {review_dir}")
    model_digit = item.record.get("digit")
    if accept:
        if model_digit is None:
            raise ReviewError(f"{item_id}: the model found no digit; use reject or correct")
        human_digit = int(model_digit)
    decided_dir = review_dir / DECIDED
    decided_dir.mkdir(exist_ok=True)
    image = f"{DECIDED}/{item_id}/{item.image.name}"
    row = [
        item.record.get("input", ""),
        item.record.get("sha256") or "",
        "" if model_digit is None else str(model_digit),
        "none" if human_digit is None else str(human_digit),
        dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        image,
    ]
    _append_label(review_dir / LABELS, row)
    item.folder.rename(decided_dir / item_id)
    return item, human_digit


def _append_label(path: Path, row: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out = io.StringIO()
        writer = csv.writer(out)
        if os.fstat(fd).st_size == 0:
            writer.writerow(LABEL_COLUMNS)
        writer.writerow(row)
        os.write(fd, out.getvalue().encode("utf-8", "surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)


def labels(path: Path) -> Iterator[tuple[Path, int | None]]:
    """(image, human digit or None for "not a digit") for every decision in a labels.csv."""
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            human = row["human_digit"]
            yield path.parent / row["image"], None if human == "none" else int(human)
