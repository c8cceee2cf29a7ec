"""A running summary of results.csv, kept beside it, so `status` never reads a million rows.

The writer of results.csv calls `advance` after each append, while it still holds the
CSV's flock, so several daemons keep one consistent summary. The summary records how
many bytes of the CSV it covers (always a row boundary); a reader adds whatever rows lie
beyond that, so a summary that is stale (a crash between the append and its update) or
missing (an outbox from an older version) costs time, never a wrong count.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_NAME = ".results.csv.summary"  # hidden, and no .json: never taken for a result
SUMMARY_VERSION = 1
MINUTES_KEPT = 90  # per-minute counts kept for "the last hour", with room for clock skew
STATUSES = ("ok", "no_digit", "error")
MAX_REASONS = 100
OTHER_REASONS = "(other reasons)"


@dataclass
class Summary:
    """Counts over the first `csv_size` bytes of results.csv (inode `csv_inode`)."""

    csv_inode: int = 0
    csv_size: int = 0
    rows: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    uncertain: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error reason -> rows
    per_minute: dict[str, dict[str, int]] = field(default_factory=dict)  # "YYYY-MM-DDTHH:MM"
    last_answer_at: str | None = None

    def add(self, rows: Iterable[Sequence[str]], columns: Sequence[str]) -> None:
        """Count CSV rows (field lists in the order of `columns`)."""
        i_status, i_unc = columns.index("status"), columns.index("uncertain")
        i_err, i_at = columns.index("error"), columns.index("processed_at")
        width = max(i_status, i_unc, i_err, i_at) + 1
        for row in rows:
            if len(row) < width:
                continue  # not a row this version wrote
            status, at = row[i_status], row[i_at]
            self.rows += 1
            self.counts[status] = self.counts.get(status, 0) + 1
            self.uncertain += row[i_unc] == "true"
            if status == "error":
                reason = row[i_err] or "unknown"
                if reason not in self.errors and len(self.errors) >= MAX_REASONS:
                    reason = OTHER_REASONS  # reasons carry sizes and names: keep the file small
                self.errors[reason] = self.errors.get(reason, 0) + 1
            minute = self.per_minute.setdefault(at[:16], {})
            minute[status] = minute.get(status, 0) + 1
            if self.last_answer_at is None or at > self.last_answer_at:
                self.last_answer_at = at
        self._trim()

    def _trim(self) -> None:
        if len(self.per_minute) > MINUTES_KEPT:
            for key in sorted(self.per_minute)[:-MINUTES_KEPT]:
                del self.per_minute[key]

    def since(self, start: dt.datetime) -> dict[str, int]:
        """Answers by status from whole minutes at or after `start` (UTC)."""
        first = start.strftime("%Y-%m-%dT%H:%M")
        out = dict.fromkeys(STATUSES, 0)
        for minute, counts in self.per_minute.items():
            if minute >= first:
                for status, n in counts.items():
                    out[status] = out.get(status, 0) + n
        return out

    def to_json(self) -> str:
        return json.dumps({"version": SUMMARY_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Summary | None:
        try:
            data: dict[str, Any] = json.loads(text)
            if data.pop("version", None) != SUMMARY_VERSION:
                return None
            return cls(**data)
        except (ValueError, TypeError):
            return None


def summary_path(outbox: Path) -> Path:
    return outbox / SUMMARY_NAME


def read_rows(fd: int, start: int, end: int) -> tuple[list[str], list[list[str]]]:
    """The header and the rows in bytes [start, end) of the CSV open at `fd`."""
    header_bytes = os.pread(fd, 65536, 0).split(b"\n", 1)[0]
    header = next(csv.reader([header_bytes.decode("utf-8", "replace").rstrip("\r")]), [])
    if start == 0:
        start = len(header_bytes) + 1
    chunks = []
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(end - pos, 8 << 20), pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    text = b"".join(chunks).decode("utf-8", "replace")
    return header, list(csv.reader(io.StringIO(text, newline="")))


def load(outbox: Path, csv_stat: os.stat_result) -> Summary | None:
    """The stored summary if it still describes a prefix of this results.csv, else None."""
    try:
        s = Summary.from_json(summary_path(outbox).read_text())
    except OSError:
        return None
    if s is None or s.csv_inode != csv_stat.st_ino or s.csv_size > csv_stat.st_size:
        return None  # another file, or cut back below what it counted (a torn-row repair)
    return s


def current(outbox: Path, fd: int) -> Summary:
    """The summary of the whole CSV open at `fd`: the stored one plus the rows beyond it."""
    st = os.fstat(fd)
    s = load(outbox, st) or Summary(csv_inode=st.st_ino)
    if s.csv_size < st.st_size:
        header, rows = read_rows(fd, s.csv_size, st.st_size)
        if header:
            s.add(rows, header)
        s.csv_size = st.st_size
    return s


def advance(outbox: Path, fd: int) -> None:
    """Bring the stored summary up to the CSV's end; call it holding the CSV's flock.

    Best effort: a summary that cannot be written (a full disk) is only a slower
    `status`, never a failed batch.
    """
    path = summary_path(outbox)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(current(outbox, fd).to_json())
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
