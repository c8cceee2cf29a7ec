"""The outbox: results.csv appends and their repair, and JSON results that never change."""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import signal
from pathlib import Path

import pytest

from digitwatch.pipeline import Result
from digitwatch.results import Record
from digitwatch.service.layout import Claim
from digitwatch.service.outbox import Results, WriteJson, _repair_tail, json_path


def _record(name: str) -> Record:
    return Record(
        input=name,
        sha256="0" * 64,
        status="ok",
        digit=4,
        confidence=0.91,
        uncertain=False,
        probabilities=None,
        error=None,
        model="an-older-model",
        width=28,
        height=28,
        elapsed_ms=1.0,
        detected_at="2026-01-01T00:00:00.000000+00:00",
        processed_at="2026-01-01T00:00:01.000000+00:00",
    )


def test_torn_csv_row_is_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_bytes(b"a,b\r\nwhole,row\r\ntorn,ro")
    fd = os.open(path, os.O_RDWR)
    try:
        assert _repair_tail(fd) == len(b"a,b\r\nwhole,row\r\n")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"a,b\r\nwhole,row\r\n"


@pytest.mark.parametrize(
    ("whole", "torn"),
    [
        (b"a,b\r\nwhole,row\r\n", b'"torn\n'),  # cut right after a newline inside quotes
        (b'a,b\r\n"x\r\ny",1\r\n', b'"new\r\n'),  # a CRLF inside quotes, then a torn one
        (b'a,b\r\n"q""\n",1\r\n', b'"a ""quoted"" \n'),  # doubled quotes inside
        (b"a,b\r\nwhole,row\r\n", b"torn,ro"),  # no final newline at all
        (b'a,b\r\n"new\nline.png",1\r\n', b""),  # whole: a newline inside quotes is kept
    ],
)
def test_torn_row_repair_follows_rfc4180_quoting(tmp_path: Path, whole: bytes, torn: bytes) -> None:
    path = tmp_path / "results.csv"
    path.write_bytes(whole + torn)
    fd = os.open(path, os.O_RDWR)
    try:
        assert _repair_tail(fd) == len(whole)
    finally:
        os.close(fd)
    assert path.read_bytes() == whole


def test_a_csv_append_cut_short_by_a_full_disk_leaves_no_partial_row(tmp_path: Path) -> None:
    """A failed append is cut back: rows left behind would be written again on the retry.

    RLIMIT_FSIZE stands in for a full disk: the first write takes what fits, the next
    fails (EFBIG), as ENOSPC does when a disk fills mid-write.
    """
    results = Results(tmp_path, fsync=False)
    results.append_csv([_record("first.png")])
    before = results.csv.read_bytes()
    rows = [_record(f"r{i:04d}.png") for i in range(200)]  # ~30 KB: part of it fits
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 4096, hard))
    try:
        with pytest.raises(OSError):
            results.append_csv(rows)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert results.csv.read_bytes() == before


def test_append_unless_present_adds_only_the_missing_rows(tmp_path: Path) -> None:
    results = Results(tmp_path, fsync=False)
    assert results.append_csv([_record("a.png")]) == 1
    assert results.append_csv([_record("a.png"), _record("b.png")], unless_present=True) == 1
    assert results.csv.read_bytes().count(b"\r\n") == 3  # the header and two rows


def _claim(tmp_path: Path, name: str) -> Claim:
    return Claim(name=name, path=str(tmp_path / name), claim_id="18e0-aa0", detected_at=0.0)


def test_a_published_json_is_kept_when_its_claim_is_answered_again(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    claim = _claim(tmp_path, "x.png")
    write = WriteJson(outbox)
    first = write([claim], [Result(_record("x.png"), None)])
    path = json_path(outbox, claim)
    assert path.name == "x.png.18e0-aa0.json"
    st = path.stat()
    changed = dataclasses.replace(_record("x.png"), digit=7)
    again = write([claim], [Result(changed, None)])
    assert again == first, "the published record, not the new answer"
    assert path.stat().st_ino == st.st_ino and path.stat().st_mtime_ns == st.st_mtime_ns
    assert first[0].detected_at == "1970-01-01T00:00:00.000000+00:00"
    assert not [p for p in outbox.iterdir() if p.name.startswith(".tmp-")]


def test_a_name_the_outbox_refuses_is_written_under_the_claim_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    real = os.replace

    def replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        if ":" in Path(dst).name:
            raise OSError(errno.EINVAL, "Invalid argument", os.fspath(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    (rec,) = WriteJson(outbox)([_claim(tmp_path, "a:b.png")], [Result(_record("a:b.png"), None)])
    assert [p.name for p in outbox.iterdir()] == ["18e0-aa0.json"]
    assert rec.input == "a:b.png"
