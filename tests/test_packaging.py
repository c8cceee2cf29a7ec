"""A wheel built from the repository runs the service in a fresh venv without torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import digit_png, drop, wait_for

REPO = Path(__file__).resolve().parent.parent
CORE_VENV_LIMIT_MB = 400  # issue 14: the core install, a fresh venv, on disk


def _du_mb(path: Path) -> float:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 1e6


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`pip install <wheel>` into a new venv: the core dependencies only."""
    root = tmp_path_factory.mktemp("packaging")
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dist), str(REPO)], check=True)
    (wheel,) = dist.glob("digitwatch-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        + ["install", str(wheel)],
        check=True,
    )
    yield venv


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
    env.pop("NOTIFY_SOCKET", None)
    return env


@pytest.mark.slow
def test_the_core_install_is_small_and_has_no_torch(core_venv: Path) -> None:
    py = str(core_venv / "bin" / "python")
    for module in ("torch", "torchvision"):
        found = subprocess.run(
            [py, "-c", f"import importlib.util as u; print(u.find_spec('{module}') is None)"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert found.stdout.strip() == "True", f"{module} came with the core install"
    size = _du_mb(core_venv)
    assert size <= CORE_VENV_LIMIT_MB, f"core venv is {size:.0f} MB"


@pytest.mark.slow
def test_a_wheel_predicts_and_serves_with_its_shipped_weights(
    core_venv: Path, tmp_path: Path
) -> None:
    exe = str(core_venv / "bin" / "digitwatch")
    image = tmp_path / "seven.png"
    image.write_bytes(digit_png())
    out = subprocess.run(
        [exe, "predict", str(image), "--format", "json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: the weights must come from the wheel
        env=_env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    (record,) = json.loads(out.stdout)
    assert record["status"] == "ok" and record["digit"] == 7
    cnn = next(
        (core_venv / "lib").glob("python*/site-packages/digitwatch/weights/mnist-cnn.safetensors")
    )
    out = subprocess.run(
        [exe, "predict", str(image), "--format", "json", "--weights", str(cnn)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr  # the shipped CNN too, without torch
    (record,) = json.loads(out.stdout)
    assert record["digit"] == 7 and record["model"].startswith("cnn-")

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [exe, "run", "--inbox", str(inbox), "--outbox", str(outbox), "--log-format", "json"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=_env(),
    )
    try:
        drop(inbox, "dropped.png", digit_png(1))
        wait_for(lambda: any(outbox.glob("dropped.png.*.json")), 30, "the dropped file's JSON")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    (result,) = outbox.glob("dropped.png.*.json")
    assert json.loads(result.read_text())["digit"] == 7


@pytest.mark.slow
def test_train_without_torch_says_what_to_install(core_venv: Path, tmp_path: Path) -> None:
    for command in ("train", "evaluate"):
        out = subprocess.run(
            [str(core_venv / "bin" / "digitwatch"), command],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=_env(),
            timeout=60,
        )
        assert out.returncode == 11, out.stderr
        assert out.stderr.strip().splitlines() == [
            f"digitwatch: error: {command} needs torch and torchvision: "
            "pip install 'digitwatch[train]'"
        ]


@pytest.mark.slow
def test_a_wheel_serves_its_page_and_api(core_venv: Path, tmp_path: Path) -> None:
    """The page's files are package data: `serve` from the wheel answers /, its script, the API."""
    from serve_helpers import request

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    log_path = tmp_path / "serve.log"
    cmd = [str(core_venv / "bin" / "digitwatch"), "serve", "--port", "0", "--log-format", "json"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--inbox", str(inbox), "--outbox", str(outbox)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,  # not the checkout: the page must come from the wheel
            env=_env(),
        )
        try:

            def url() -> str:
                lines = [json.loads(x) for x in log_path.read_text().splitlines() if x[:1] == "{"]
                return next((e["url"] for e in lines if e.get("event") == "serving"), "")

            wait_for(lambda: bool(url()) or proc.poll() is not None, 30, "serving")
            assert proc.poll() is None, log_path.read_text()
            code, _, page = request(url() + "/")
            assert code == 200 and b"/static/predict.js" in page
            assert request(url() + "/static/predict.js")[0] == 200
            assert request(url() + "/review")[0] == 200
            code, _, body = request(url() + "/v1/predict", digit_png(1))
            assert code == 200 and json.loads(body)["digit"] == 7
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
