"""The outbox: each result's JSON file (written once, never rewritten), the shared CSV
under flock with its torn-row repair, and the one sync per group of batches."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import errno
import fcntl
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from digitwatch import libc, review, summary
from digitwatch.codec import encode_png
from digitwatch.pipeline import Input, Result
from digitwatch.results import CSV_NAME, Record, csv_lines, write_json_atomic
from digitwatch.service.layout import Claim

log = structlog.get_logger()

# What a filesystem answers for a name it will not take (not for a full or read-only one).
_NAME_REFUSED = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _iso(wall_us: int) -> str:
    """ISO 8601 UTC with microseconds (exact: integer microseconds, no float)."""
    return (_EPOCH + dt.timedelta(microseconds=wall_us)).isoformat(timespec="microseconds")


_last_us = 0  # this process's last processed_at


def _stamp() -> str:
    """processed_at, strictly increasing in this process.

    With `input` it names a CSV row on recovery. Two workers can stamp the same
    microsecond, but never for the same input: the service does not start an input name
    while an earlier file of that name is still being answered (`claims.InFlight`).
    """
    global _last_us  # one clock per process
    _last_us = max(time.time_ns() // 1000, _last_us + 1)
    return _iso(_last_us)


def json_path(outbox: Path, claim: Claim) -> Path:
    """`outbox/<subdir>/<name>.<claim>.json`: one result per claim, never overwritten."""
    return outbox / claim.subdir / f"{claim.filename}.{claim.claim_id}.json"


def fallback_json_path(outbox: Path, claim: Claim) -> Path:
    """`<claim>.json` beside `<name>.<claim>.json`: the result's name when the outbox
    refuses the input's name. The record inside still names the input."""
    return outbox / claim.subdir / f"{claim.claim_id}.json"


def _tmp_name(claim: Claim) -> str:
    """`.tmp-<claim>`: shorter than the result's name, and hidden and without `.json`,
    so a reader globbing for results never opens it."""
    return f".tmp-{claim.claim_id}"


def published(path: Path) -> Record | None:
    """The record in the complete JSON at `path`, or None when there is none to keep."""
    # access(), not Path.exists(): it answers False for a name this filesystem refuses
    # (exists() raises ENAMETOOLONG), and a new claim (the usual case) costs ~2 us, where
    # a failed open costs ~7.
    if not os.access(path, os.F_OK):
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        return Record(**json.loads(text))
    except (ValueError, TypeError):
        return None  # cut short (a power cut before the sync): never published whole


@dataclass(frozen=True)
class WriteJson:
    """The service's Finisher: stamp each record and write its JSON, in the worker.

    A missing folder below the outbox is made (results mirrored from inbox subfolders,
    --recursive); a missing outbox is not (an unmounted share): the error holds the
    batch until it is back.

    A claim whose JSON is already there keeps that JSON and its record: a published
    result never changes, however often its claim is answered again (a held batch's
    retries, the one-by-one rerun after a worker died, an adopted claim). The check costs
    a new file one access() call (~2 us).
    """

    outbox: Path
    review_dir: Path | None = None  # doubtful answers are queued there too (review.py)

    def __call__(self, items: Sequence[Input], results: list[Result]) -> list[Record]:
        claims: list[Claim] = [c for c in items if isinstance(c, Claim)]
        assert len(claims) == len(items), "the service answers claims only"
        # Texts first, then files: one stage at a time keeps each in the caches.
        out = [
            dataclasses.replace(
                r.record, detected_at=_iso(int(c.detected_at * 1_000_000)), processed_at=_stamp()
            )
            for c, r in zip(claims, results, strict=True)
        ]
        for k, (claim, text) in enumerate(zip(claims, [r.to_json() for r in out], strict=True)):
            path = json_path(self.outbox, claim)
            kept = published(path)
            if kept is not None:
                out[k] = kept
                continue
            try:
                self._write(path, text, _tmp_name(claim))
            except OSError as e:
                if e.errno not in _NAME_REFUSED:
                    raise  # the outbox's fault (full, read-only, gone): hold the batch
                # The outbox's filesystem refuses this name (an SMB share refuses ':' or
                # '?', another has a shorter limit or takes UTF-8 only): the result goes
                # under its claim id alone rather than holding every batch it is in.
                fallback = fallback_json_path(self.outbox, claim)
                kept = published(fallback)
                if kept is not None:
                    out[k] = kept
                    continue
                self._write(fallback, text, _tmp_name(claim))
        if self.review_dir is not None:
            for claim, rec, result in zip(claims, out, results, strict=True):
                if review.wanted(rec):
                    self._queue(claim, rec, result)
        return out

    def _queue(self, claim: Claim, rec: Record, result: Result) -> None:
        """Queue a doubtful answer for a person; a failure here never holds the batch."""
        assert self.review_dir is not None and claim.path is not None
        seen = None if result.image is None else encode_png(result.image)
        try:
            review.add(self.review_dir, claim.claim_id, rec, Path(claim.path), seen)
        except OSError as e:
            log.warning("review_failed", input=rec.input, claim=claim.claim_id, error=str(e))

    def _write(self, path: Path, text: str, tmp: str) -> None:
        try:
            write_json_atomic(path, text, tmp_name=tmp)
        except FileNotFoundError:
            folder = path.parent
            if folder == self.outbox or not self.outbox.is_dir():
                raise
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, text, tmp_name=tmp)


class Results:
    """The outbox's shared files: results.csv (appended under flock) and the sync."""

    def __init__(self, outbox: Path, *, fsync: bool) -> None:
        self.outbox = outbox
        self.csv = outbox / CSV_NAME
        self.fsync = fsync
        # (inode, offset) of the end of the last row this process wrote: a row boundary
        # for as long as the file only grows, so the torn-row check reads only beyond it.
        self._boundary: tuple[int, int] | None = None

    def _row_boundary(self, fd: int) -> int:
        """An offset of the open CSV known to end a whole row (0, the start, at worst)."""
        st = os.fstat(fd)
        if self._boundary is not None:
            ino, end = self._boundary
            if ino == st.st_ino and end <= st.st_size:
                return end
        # The summary covers whole rows only (it is advanced after each whole append).
        known = summary.load(self.outbox, st)
        return known.csv_size if known is not None else 0

    def json_path(self, claim: Claim) -> Path:
        return json_path(self.outbox, claim)

    def fallback_json_path(self, claim: Claim) -> Path:
        return fallback_json_path(self.outbox, claim)

    def append_csv(self, records: list[Record], *, unless_present: bool = False) -> int:
        """Append rows in one write under an exclusive flock; returns how many were written."""
        fd = os.open(self.csv, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = _repair_tail(fd, self._row_boundary(fd))
            if unless_present and size:
                present = _csv_keys(fd)
                records = [r for r in records if (r.input, r.processed_at) not in present]
            if records:
                # A name with bytes that are not UTF-8 is escaped in its record
                # (`input_text`); a JSON from before that rule must not stop the writer.
                data = csv_lines(records, header=size == 0).encode("utf-8", "backslashreplace")
                view = memoryview(data)
                try:
                    while view:
                        view = view[os.write(fd, view) :]
                except OSError:
                    # A full disk mid-write: rows left behind would be answered twice.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
                summary.advance(self.outbox, fd)  # for `digitwatch status`, under the flock
            self._boundary = (os.fstat(fd).st_ino, size + len(data) if records else size)
            return len(records)
        finally:
            os.close(fd)  # releases the flock

    def sync(self, *folders: Path) -> None:
        """One sync per batch: syncfs on each filesystem involved (fsync of each file is ~3 ms)."""
        if not self.fsync:
            return
        seen: set[int] = set()
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                dev = os.fstat(fd).st_dev
                if dev in seen:
                    continue
                seen.add(dev)
                libc.syncfs(fd)
            finally:
                os.close(fd)


def _repair_tail(fd: int, known: int = 0) -> int:
    """Cut a row torn by a crash mid-write; return the file size.

    `known` is an offset that ends a whole row. A row ends at a line break outside
    quotes (RFC 4180): an input name may hold line breaks inside its quoted field, so a
    file that ends in a newline may still end inside a row. The bytes after `known` are
    read with their quotes counted, and the file is cut after the last line break that
    follows an even number of them.
    """
    size = os.fstat(fd).st_size
    if known > size:
        known = 0
    keep = _whole_rows_end(fd, known, size)
    if keep == size:
        return size
    os.ftruncate(fd, keep)
    log.warning("csv_repaired", dropped_bytes=size - keep)
    return keep


def _whole_rows_end(fd: int, start: int, end: int) -> int:
    """The end of the last whole row in bytes [start, end) of the CSV; `start` ends one."""
    pos, inside, last = start, False, start
    while pos < end:
        chunk = os.pread(fd, min(end - pos, 1 << 20), pos)
        if not chunk:
            break
        at = pos
        for k, part in enumerate(chunk.split(b'"')):
            if k:
                inside = not inside  # a quote before this part: "" toggles twice
            if not inside:
                j = part.rfind(b"\n")
                if j >= 0:
                    last = at + j + 1
            at += len(part) + 1
        pos += len(chunk)
    return last


def _csv_keys(fd: int) -> set[tuple[str, str]]:
    # A byte that is not UTF-8 (a row written by another tool) must not stop recovery.
    with os.fdopen(os.dup(fd), "r", newline="", encoding="utf-8", errors="replace") as f:
        f.seek(0)
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            return set()
        i, j = header.index("input"), header.index("processed_at")
        return {(row[i], row[j]) for row in reader if len(row) > max(i, j)}
