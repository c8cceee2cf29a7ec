"""Write-result stage: the result record, its JSON file and its CSV row."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "no_digit", "error"]

CSV_NAME = "results.csv"  # in the outbox: one row per answer

CSV_COLUMNS = (
    "input",
    "sha256",
    "status",
    "digit",
    "confidence",
    "uncertain",
    "error",
    "model",
    "processed_at",
)


def utc_now() -> str:
    """ISO 8601 UTC with microseconds: processed_at also identifies a CSV row on recovery."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


# One encoder for every record: json.dumps with separators builds a new one per call
# (~5 of its ~18 us per record).
_ENCODER = json.JSONEncoder(separators=(", ", ": "))


@dataclass(frozen=True)
class Record:
    """One answer per input; the same schema for `predict` and `run` (README: Result record)."""

    input: str
    sha256: str | None
    status: Status
    digit: int | None
    confidence: float | None
    uncertain: bool
    probabilities: list[float] | None
    error: str | None
    model: str
    width: int | None
    height: int | None
    elapsed_ms: float
    detected_at: str | None = None  # daemon only
    processed_at: str | None = None  # daemon only
    input_escaped: bool = False  # `input` shows bytes that are not UTF-8 as \xNN (input_text)

    def to_dict(self) -> dict[str, Any]:
        # Shallow copy: dataclasses.asdict deep-copies field by field, ~50 us per record.
        d = dict(vars(self))
        if self.probabilities is not None:
            d["probabilities"] = list(self.probabilities)
        if self.detected_at is None and self.processed_at is None:
            del d["detected_at"], d["processed_at"]
        return d

    def to_json(self) -> str:
        if self.detected_at is None and self.processed_at is None:
            return _ENCODER.encode(self.to_dict())
        # The daemon's records: the fields in order, encoded without a copy.
        return _ENCODER.encode(vars(self))

    def csv_fields(self) -> list[str]:
        d = vars(self)
        return [_csv_text(d[c]) for c in CSV_COLUMNS]


def input_text(name: str) -> tuple[str, bool]:
    """A file name as the record's `input`, and whether it had to be escaped.

    Linux names are bytes; Python hands those that are not UTF-8 over with lone
    surrogates, which JSON readers refuse and no UTF-8 file can hold. Such a name is
    shown with each of those bytes as `\\xNN` and each backslash doubled, so the
    bytes can be recovered exactly (and the flag says to), while the usual name, valid
    UTF-8, is kept as it is.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = name.replace("\\", "\\\\").encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace"), True
    return name, False


def _csv_text(v: Any) -> str:
    if v is None:
        return ""
    if v is True or v is False:
        return "true" if v else "false"
    return str(v)


def csv_lines(records: list[Record], *, header: bool) -> str:
    """RFC 4180 text (CRLF line ends, minimal quoting) for these records."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    writer.writerows([r.csv_fields() for r in records])
    return buf.getvalue()


def write_json_atomic(path: str | Path, text: str, *, tmp_name: str | None = None) -> None:
    """Write beside the target and rename: readers see the whole file or none.

    The temp file is `.tmp-<name>`, or `tmp_name` (the daemon's, from the claim id, so
    that it is never longer than the result's own name: a name the filesystem takes for
    the result must never fail as a temp name).

    Not O_TMPFILE + linkat, though it is ~15 us cheaper per file: a linked file shows
    up in inotify only as IN_CREATE, never IN_MOVED_TO or IN_CLOSE_WRITE, so whatever
    watches the outbox for finished files (inotifywait, a tutorial handler) would miss it.
    """
    path = Path(path)
    tmp = path.with_name(tmp_name or f".tmp-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            data = (text + "\n").encode()
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
        finally:
            os.close(fd)  # once: a second close could hit a descriptor reused meanwhile
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # no partial file left behind: a full disk
        raise
