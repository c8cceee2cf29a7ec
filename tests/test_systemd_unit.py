"""The shipped unit file: valid, hardened (exposure <= 2.0), and the daemon runs under it."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import csv_rows, digit_png, wait_for

from digitwatch.settings import DEFAULT_WEIGHTS, Settings

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "digitwatch.service"
WEB_UNIT = UNIT.with_name("digitwatch-web.service")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives(unit: Path = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    text = unit.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value.strip())
    return out


def local_copy(tmp_path: Path, source: Path = UNIT) -> Path:
    """The unit with ExecStart pointing at this checkout, so `verify` finds the binary."""
    binary = Path(sys.executable).parent / "digitwatch"
    unit = tmp_path / source.name
    text = source.read_text().replace("/opt/digitwatch/.venv/bin/digitwatch", str(binary))
    unit.write_text(text)
    return unit


def test_unit_declares_the_service_contract() -> None:
    d = directives()
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"]
    assert int(d["WatchdogSec"][0]) > 0
    assert "--log-format json" in d["ExecStart"][0]
    assert d["DynamicUser"] == ["yes"] and d["ProtectSystem"] == ["strict"]
    assert d["PrivateNetwork"] == ["yes"] and d["NoNewPrivileges"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX"]  # NOTIFY_SOCKET is AF_UNIX
    assert "@system-service" in d["SystemCallFilter"]
    assert d["ReadWritePaths"] == ["/var/lib/digitwatch"]
    # SIGTERM drains within 10 s; systemd must wait at least that long before SIGKILL.
    assert int(d["TimeoutStopSec"][0]) >= 10


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    p = subprocess.run(
        [str(ANALYZE), "verify", str(local_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "digitwatch.service" not in p.stderr, p.stderr


@needs_analyze
def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    p = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", str(local_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.0, p.stdout


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(66, 0, 0, 0, 0) >= 0)  # PR_GET_MDWE


@pytest.mark.slow
@pytest.mark.skipif(not _mdwe_supported(), reason="kernel lacks PR_SET_MDWE (Linux < 6.3)")
def test_daemon_runs_with_memory_deny_write_execute(folders: tuple[Path, Path]) -> None:
    """MemoryDenyWriteExecute=yes in the unit: numpy, OpenCV and ctypes must not need W+X."""
    inbox, outbox = folders
    (inbox / "seven.png").write_bytes(digit_png(7))
    launcher = (
        "import ctypes, os, sys\n"
        f"assert ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'digitwatch', *sys.argv[1:]])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            launcher,
            "run",
            "--inbox",
            str(inbox),
            "--outbox",
            str(outbox),
            "--weights",
            str(DEFAULT_WEIGHTS),
            "--log-format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        wait_for(lambda: len(csv_rows(outbox)) == 1 or proc.poll() is not None, 15, "answer")
        assert proc.poll() is None, proc.communicate()[1]
        assert csv_rows(outbox)[0]["status"] == "ok"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err


def _size_mb(text: str) -> float:
    units = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text) / 2**20


def test_unit_limits_and_the_defaults_agree() -> None:
    """The memory budget fits MemoryMax beside the processes, and the stop bound fits
    TimeoutStopSec with room for the commit and the exit after it."""
    d = directives()
    s = Settings()
    # Measured (benchmarks/bench_large.py, PSS): the daemon ~75 MB, a worker ~65 MB
    # before decoding, the files under the shared budget's 16 MB threshold per worker.
    main_mb, worker_mb, small_mb = 75, 65, 16
    needed = main_mb + s.workers * (worker_mb + small_mb) + s.max_decode_mb
    assert needed <= 0.9 * _size_mb(d["MemoryMax"][0]), needed
    assert s.stop_timeout + 5 <= 10 < int(d["TimeoutStopSec"][0])
    assert "--workers" not in d["ExecStart"][0] and "--max-decode-mb" not in d["ExecStart"][0]


def test_web_unit_listens_on_loopback_only_and_writes_only_the_review_queue() -> None:
    d = directives(WEB_UNIT)
    exec_start = d["ExecStart"][0].split()
    assert exec_start[1] == "serve" and "--log-format" in exec_start
    host, port = (
        exec_start[exec_start.index("--host") + 1],
        exec_start[exec_start.index("--port") + 1],
    )
    assert host == "127.0.0.1"
    # The network: only loopback addresses, only a bind to the one port it serves.
    assert "PrivateNetwork" not in d
    assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"]
    assert d["SocketBindAllow"] == [f"tcp:{port}"] and d["SocketBindDeny"] == ["any"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    # The main unit's transient user (its name is the unit's), so both use one state folder.
    assert d["User"] == ["digitwatch"] and d["DynamicUser"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["ReadOnlyPaths"] == ["/var/lib/private/digitwatch"]
    assert d["ReadWritePaths"] == ["/var/lib/private/digitwatch/outbox/review"]
    for key in ("NoNewPrivileges", "MemoryDenyWriteExecute", "ProtectHome", "PrivateUsers"):
        assert d[key] == ["yes"], key
    assert d["CapabilityBoundingSet"] == [""] and "@system-service" in d["SystemCallFilter"]
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    main = directives()
    assert main["StateDirectory"][0].split() == d["StateDirectory"][0].split()[:3]


@needs_analyze
def test_web_unit_verifies_and_its_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    unit = local_copy(tmp_path, WEB_UNIT)
    p = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True)
    assert p.returncode == 0 and WEB_UNIT.name not in p.stderr, p.stderr
    p = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.5, p.stdout
