"""Every command has help; expected failures are one line with their exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from digitwatch.cli import app
from digitwatch.codec import encode_png
from digitwatch.errors import ExitCode

runner = CliRunner()
COMMANDS = ["train", "evaluate", "predict", "run", "status", "retry", "serve"]
GROUPS = ["review"]
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_top_level_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS + GROUPS:
        assert name in result.output


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_and_its_commands_have_help_and_documentation(group: str) -> None:
    info = next(g for g in app.registered_groups if g.name == group)
    assert info.typer_instance is not None
    for cmd in info.typer_instance.registered_commands:
        assert cmd.callback is not None and cmd.callback.__doc__
        result = runner.invoke(app, [group, str(cmd.name), "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, result.output
        assert f"digitwatch {group} {cmd.name}" in README
    assert runner.invoke(app, [group, "--help"]).exit_code == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_documentation(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    cmd = next(c for c in app.registered_commands if c.callback and c.callback.__name__ == command)
    assert cmd.callback is not None and cmd.callback.__doc__
    assert f"digitwatch {command}" in README


def _digit_png(path: Path) -> Path:
    img = np.full((60, 60), 255, np.uint8)
    img[10:50, 28:33] = 0  # a dark vertical bar: a "1"
    path.write_bytes(encode_png(img))
    return path


def test_predict_formats_and_exit_codes(tmp_path: Path) -> None:
    good = _digit_png(tmp_path / "one.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = runner.invoke(app, ["predict", str(good), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["input"] == "one.png" and record["status"] == "ok" and record["digit"] == 1
    result = runner.invoke(app, ["predict", str(tmp_path), "--format", "json"])
    assert result.exit_code == ExitCode.INPUT_FAILED
    records = {r["input"]: r for r in json.loads(result.output)}
    assert records["bad.png"]["status"] == "error" and records["bad.png"]["error"]
    assert records["one.png"]["digit"] == 1
    result = runner.invoke(app, ["predict", str(good)])
    assert "one.png" in result.output and "ok" in result.output


def test_predict_writes_debug_images(tmp_path: Path) -> None:
    good = _digit_png(tmp_path / "one.png")
    debug = tmp_path / "debug"
    result = runner.invoke(app, ["predict", str(good), "--debug-dir", str(debug)])
    assert result.exit_code == 0, result.output
    assert (debug / "one.png.28x28.png").stat().st_size > 0


def test_bad_weights_exit_with_their_code(tmp_path: Path) -> None:
    good = _digit_png(tmp_path / "one.png")
    result = runner.invoke(app, ["predict", str(good), "--weights", str(tmp_path / "x.pt")])
    assert result.exit_code == ExitCode.WEIGHTS
    assert "x.pt: cannot read weights" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_evaluate_json(mnist_dir: Path, weights_path: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "errors.png"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--json",
            "--data-dir",
            str(mnist_dir),
            "--no-download",
            "--sheet",
            str(sheet),
            "--uncertain-below",
            "0.9",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["accuracy"] >= 0.99
    # the flagged shares of wrong and right answers, at the threshold asked for
    assert report["uncertain_below"] == 0.9
    assert 0.3 < report["wrong_flagged"] <= 1.0
    assert 0.0 < report["right_flagged"] < 0.05
    assert len(report["per_class"]) == 10
    assert sum(map(sum, report["confusion"])) == 10000
    assert report["errors"] == 10000 - sum(report["confusion"][c][c] for c in range(10))
    assert sheet.stat().st_size > 0


def test_evaluate_without_mnist_is_a_data_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--data-dir", str(tmp_path), "--no-download"])
    assert result.exit_code == ExitCode.DATA
    assert "not found" in result.output
