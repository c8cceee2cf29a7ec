"""Prometheus metrics of the real daemon: the textfile and /metrics agree with what was dropped."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, csv_rows, digit_png, drop, wait_for
from prometheus_client.parser import text_string_to_metric_families

from digitwatch.metrics import Metrics
from digitwatch.results import Record, Status


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(text: str, name: str, **labels: str) -> float | None:
    return _samples(text).get((name, tuple(sorted(labels.items()))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _drop_mix(inbox: Path) -> None:
    drop(inbox, "a.png", digit_png(1))
    drop(inbox, "b.png", digit_png(2))
    drop(inbox, "blank.png", digit_png(blank=True))
    drop(inbox, "bad.png", b"not an image")


@pytest.mark.slow
def test_metrics_file_counts_every_answer_by_status(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    prom = outbox.parent / "digitwatch.prom"
    d = DaemonProcess(inbox, outbox, "--metrics-file", str(prom))
    try:
        d.wait_ready()
        assert prom.exists(), "the textfile is written at start"
        assert _value(prom.read_text(), "digitwatch_images_total", status="ok") == 0
        _drop_mix(inbox)
        wait_for(lambda: len(csv_rows(outbox)) == 4, 20, "four CSV rows")
        assert d.stop() == 0
    finally:
        d.close()
    # The final write happens after the last commit: the file holds every answer.
    text = prom.read_text()
    assert _value(text, "digitwatch_images_total", status="ok") == 2
    assert _value(text, "digitwatch_images_total", status="no_digit") == 1
    assert _value(text, "digitwatch_images_total", status="error") == 1
    assert _value(text, "digitwatch_latency_seconds_count") == 4
    assert _value(text, "digitwatch_batch_size_sum") == 4
    assert (_value(text, "digitwatch_last_answer_timestamp_seconds") or 0) > 0
    uncertain = sum(r["uncertain"] == "true" for r in csv_rows(outbox))
    assert _value(text, "digitwatch_uncertain_total") == uncertain
    info = [s for s in _samples(text) if s[0] == "digitwatch_model_info"]
    assert len(info) == 1 and dict(info[0][1])["model"]
    assert not list(prom.parent.glob("*.tmp*")), "the file is replaced atomically"


@pytest.mark.slow
def test_metrics_port_serves_the_same_counts_and_waiting_files(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    port = _free_port()
    # A long quiet period keeps a file that was written in place waiting, visibly.
    d = DaemonProcess(inbox, outbox, "--metrics-port", str(port), "--quiet-period", "30")
    try:
        d.wait_ready()
        _drop_mix(inbox)
        wait_for(lambda: len(csv_rows(outbox)) == 4, 20, "four CSV rows")
        with (inbox / "slow.png").open("wb") as f:
            f.write(digit_png(3))  # still open: its close is not seen, it waits

            def scrape() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return str(r.read().decode())

            wait_for(
                lambda: _value(scrape(), "digitwatch_waiting_files") == 1, 10, "one file waiting"
            )
            text = scrape()
        assert _value(text, "digitwatch_images_total", status="ok") == 2
        assert _value(text, "digitwatch_images_total", status="error") == 1
        assert (_value(text, "digitwatch_oldest_waiting_seconds") or 0) >= 0
        assert d.stop() == 0
    finally:
        d.close()


def test_metrics_refuse_a_textfile_in_a_missing_folder(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    d = DaemonProcess(inbox, outbox, "--metrics-file", str(outbox.parent / "no" / "m.prom"))
    try:
        assert d.proc.wait(20) != 0
    finally:
        d.close()
    assert "metrics-file" in d.log.read_text()


def test_counts_and_batch_histogram_in_process() -> None:
    def answer(status: Status, uncertain: bool) -> Record:
        return Record("x", None, status, None, None, uncertain, None, None, "m", None, None, 0.0)

    m = Metrics(model="abc", workers=2)
    answers = [answer("ok", True), answer("ok", False), answer("error", False)]
    m.committed(answers, [0.0, 0.0, 0.0])
    text = m.text().decode()
    assert _value(text, "digitwatch_images_total", status="ok") == 2
    assert _value(text, "digitwatch_images_total", status="no_digit") == 0
    assert _value(text, "digitwatch_uncertain_total") == 1
    assert _value(text, "digitwatch_batch_size_bucket", le="2.0") == 0
    assert _value(text, "digitwatch_batch_size_bucket", le="4.0") == 1
