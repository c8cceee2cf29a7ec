"""The daemon's batch log lines read exactly as structlog would write them one by one."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from digitwatch import logs

ROWS = [
    {"input": "a.png", "status": "ok", "digit": 3, "confidence": 0.998877, "ms": 0.5},
    {"input": 'é "quoted".png', "status": "error", "digit": None, "error": "bad\nfile"},
]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logs._json_lines, logs._level = None, 20


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines()]


def test_json_lines_match_structlog(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure("json")
    log = structlog.get_logger()
    for row in ROWS:
        log.info("image", **row)
    expected = capsys.readouterr().err
    logs.info_lines("image", ROWS)
    got = capsys.readouterr().err
    assert len(got.splitlines()) == len(ROWS)
    for mine, theirs in zip(_lines(got), _lines(expected), strict=True):
        # Same keys in the same order, same values; only the timestamp differs.
        assert list(mine) == list(theirs)
        assert {**mine, "timestamp": ""} == {**theirs, "timestamp": ""}
        assert str(mine["timestamp"]).endswith("Z")


def test_console_lines_go_through_structlog(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure("console")
    logs.info_lines("image", ROWS)
    err = capsys.readouterr().err
    assert len(err.splitlines()) >= len(ROWS) and "a.png" in err
    with pytest.raises(json.JSONDecodeError):
        _lines(err)


def test_level_above_info_logs_nothing(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure("json", "warning")
    logs.info_lines("image", ROWS)
    assert capsys.readouterr().err == ""
