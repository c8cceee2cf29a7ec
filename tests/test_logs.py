"""The service's log lines: JSON lines off a terminal (the journal's format), one per event."""

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


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines()]


def test_json_lines_carry_the_fields_then_event_level_and_utc_time(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure("json")
    log = structlog.get_logger()
    for row in ROWS:
        log.info("image", **row)
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == len(ROWS)
    for line, row in zip(lines, ROWS, strict=True):
        assert list(line) == [*row, "event", "level", "timestamp"]
        assert {**line, "timestamp": ""} == {
            **row,
            "event": "image",
            "level": "info",
            "timestamp": "",
        }
        assert str(line["timestamp"]).endswith("Z")


def test_console_lines_are_not_json(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure("console")
    log = structlog.get_logger()
    for row in ROWS:
        log.info("image", **row)
    err = capsys.readouterr().err
    assert len(err.splitlines()) >= len(ROWS) and "a.png" in err
    with pytest.raises(json.JSONDecodeError):
        _lines(err)


def test_level_above_info_logs_nothing_below_it(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure("json", "warning")
    log = structlog.get_logger()
    log.info("image", **ROWS[0])
    log.warning("skipped", input="x.png")
    assert [line["event"] for line in _lines(capsys.readouterr().err)] == ["skipped"]
