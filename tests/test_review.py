"""The review queue: doubtful answers of the real daemon land there; decisions leave it for good."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from daemon_helpers import DaemonProcess, csv_rows, digit_png, drop, results, wait_for
from typer.testing import CliRunner

from digitwatch import review
from digitwatch.cli import app
from digitwatch.codec import encode_png
from digitwatch.errors import ExitCode
from digitwatch.results import Record
from digitwatch.settings import DEFAULT_WEIGHTS

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def _record(name: str, digit: int | None, confidence: float | None, when: str) -> Record:
    status = "ok" if digit is not None else "no_digit"
    return Record(
        name, "ab" * 32, status, digit, confidence, True, None, None, "m", 28, 28, 1.0, when, when
    )


def _queue(tmp_path: Path) -> Path:
    folder = tmp_path / "review"
    for i, (digit, conf) in enumerate([(7, 0.41), (None, None), (3, 0.55)]):
        src = tmp_path / f"in{i}.png"
        src.write_bytes(digit_png(i))
        rec = _record(f"in{i}.png", digit, conf, f"2026-12-03T06:0{i}:00+00:00")
        assert review.add(folder, f"c{i}", rec, src, b"png")
    return folder


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["review", *args])
    return result.exit_code, result.output


def test_list_newest_first_then_decide_each_way(tmp_path: Path) -> None:
    folder = _queue(tmp_path)
    code, out = _cli("--review-dir", str(folder))
    assert code == 0, out
    lines = out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["c2", "c1", "c0"]
    code, out = _cli("--review-dir", str(folder), "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["c2", "c1", "c0"]

    assert _cli("accept", "c0", "--review-dir", str(folder))[0] == 0
    assert _cli("correct", "c2", "--digit", "0", "--review-dir", str(folder))[0] == 0
    code, out = _cli("reject", "c1", "--review-dir", str(folder))
    assert code == 0 and "not a digit" in out
    assert _cli("--review-dir", str(folder))[1].startswith("the review queue is empty")

    with (folder / review.LABELS).open(newline="") as f:
        rows = {r["input"]: r for r in csv.DictReader(f)}
    assert rows["in0.png"]["model_digit"] == "7" and rows["in0.png"]["human_digit"] == "7"
    assert rows["in2.png"]["human_digit"] == "0", "digit 0 is a digit, not 'none'"
    assert rows["in1.png"]["model_digit"] == "" and rows["in1.png"]["human_digit"] == "none"
    images = dict(review.labels(folder / review.LABELS))
    assert sorted(images.values(), key=str) == [0, 7, None]
    assert all(p.exists() for p in images)

    # Decided items never come back: not by a second decision, not by the service.
    code, out = _cli("accept", "c0", "--review-dir", str(folder))
    assert code == ExitCode.REVIEW and "decided already" in out
    rec = _record("in0.png", 7, 0.41, "2026-12-03T06:00:00+00:00")
    assert not review.add(folder, "c0", rec, tmp_path / "in0.png", None)
    assert _cli("accept", "nope", "--review-dir", str(folder))[0] == ExitCode.REVIEW
    assert _cli("accept", "c1", "--review-dir", str(folder))[0] == ExitCode.REVIEW


def test_accept_refuses_an_answer_without_a_digit(tmp_path: Path) -> None:
    folder = _queue(tmp_path)
    code, out = _cli("accept", "c1", "--review-dir", str(folder))
    assert code == ExitCode.REVIEW and "no digit" in out
    assert (folder / "c1").is_dir(), "a refused decision leaves the item queued"


@pytest.mark.slow
def test_the_daemon_queues_uncertain_and_no_digit_answers(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    # Threshold 1.0: every digit found is uncertain, so the clear 7 is queued too.
    d = DaemonProcess(inbox, outbox, "--uncertain-below", "1.0")
    try:
        d.wait_ready()
        drop(inbox, "seven.png", digit_png(1))
        drop(inbox, "blank.png", digit_png(blank=True))
        drop(inbox, "bad.png", b"not an image")
        wait_for(lambda: len(csv_rows(outbox)) == 3, 20, "three CSV rows")
        wait_for(lambda: len(review.items(outbox / "review")) == 2, 10, "two review items")
        assert d.stop() == 0
    finally:
        d.close()
    found = {i.record["input"]: i for i in review.items(outbox / "review")}
    assert set(found) == {"seven.png", "blank.png"}, "errors are not for review"
    seven = found["seven.png"]
    assert seven.image.read_bytes() == digit_png(1)
    assert (seven.folder / review.SEEN).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (found["blank.png"].folder / review.SEEN).exists(), "no digit: nothing was seen"
    assert seven.record["processed_at"] in {r["processed_at"] for r in csv_rows(outbox)}
    assert len(results(outbox)) == 3, "review records are not results"

    code, _ = _cli("correct", seven.id, "--digit", "1", "--outbox", str(outbox))
    assert code == 0
    d = DaemonProcess(inbox, outbox, "--uncertain-below", "1.0", "--no-review")
    try:
        d.wait_ready()
        drop(inbox, "again.png", digit_png(2))
        wait_for(lambda: len(csv_rows(outbox)) == 4, 20, "a fourth CSV row")
    finally:
        d.stop()
    assert {i.record["input"] for i in review.items(outbox / "review")} == {"blank.png"}


def _a_four_drawn_like_a_seven() -> bytes:
    """A writer's 4 with a closed top that the shipped model reads as 7."""
    img = np.full((200, 200), 255, np.uint8)
    cv2.line(img, (50, 40), (150, 40), 0, 14)
    cv2.line(img, (150, 40), (90, 170), 0, 14)
    cv2.line(img, (60, 110), (150, 110), 0, 14)
    return encode_png(img)


@pytest.mark.slow
def test_a_correction_retrains_the_model_to_read_that_image(
    folders: tuple[Path, Path], mnist_dir: Path, tmp_path: Path
) -> None:
    """Misread -> queued for review -> corrected -> train --extra-labels -> read right."""
    inbox, outbox = folders
    data = _a_four_drawn_like_a_seven()
    first = json.loads(_predict(tmp_path, data, DEFAULT_WEIGHTS))
    assert first["digit"] != 4, "the shipped model must misread it for this test to mean anything"
    d = DaemonProcess(inbox, outbox, "--uncertain-below", "1.0")
    try:
        d.wait_ready()
        drop(inbox, "odd.png", data)
        wait_for(lambda: len(review.items(outbox / "review")) == 1, 20, "queued for review")
    finally:
        d.stop()
    (item,) = review.items(outbox / "review")
    assert _cli("correct", item.id, "--digit", "4", "--outbox", str(outbox))[0] == 0
    out = tmp_path / "w" / "corrected.pt"
    out.parent.mkdir()
    result = runner.invoke(
        app,
        [
            "train",
            "--recipe",
            str(REPO / "train" / "recipe.toml"),
            "--extra-labels",
            str(outbox / "review" / review.LABELS),
            "--epochs",
            "3",
            "--limit",
            "5000",
            "--data-dir",
            str(mnist_dir),
            "--no-download",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1 corrected images" in result.output and "before" in result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"]["extra_labels"]["images"] == 1
    assert json.loads(_predict(tmp_path, data, out))["digit"] == 4


def _predict(tmp_path: Path, data: bytes, weights: Path) -> str:
    path = tmp_path / "probe.png"
    path.write_bytes(data)
    result = runner.invoke(
        app, ["predict", str(path), "--format", "jsonl", "--weights", str(weights)]
    )
    assert result.exit_code == 0, result.output
    return str(result.output)
