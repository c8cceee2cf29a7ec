"""Prometheus metrics of the service: a textfile for node_exporter, or an HTTP /metrics.

The daemon counts an answer when its batch is committed (its CSV row synced), so the
counters agree with `results.csv`; the queue gauges are refreshed from the main loop with
the status line. Both exporters read one registry owned by `Metrics`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from digitwatch.errors import ConfigError
from digitwatch.results import Record

log = structlog.get_logger()

STATUSES = ("ok", "no_digit", "error")
# Drop-to-result: a quiet period of 2 s is in it when the writer gave no close event.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's metrics; every method is safe to call from any thread."""

    def __init__(self, *, model: str, workers: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.images = Counter(
            "digitwatch_images", "Inputs answered, by status.", ["status"], registry=r
        )
        # Every series exists from the start, at 0.
        self._by_status = {status: self.images.labels(status) for status in STATUSES}
        self.uncertain = Counter(
            "digitwatch_uncertain", "Answers flagged uncertain (status ok).", registry=r
        )
        self.latency = Histogram(
            "digitwatch_latency_seconds",
            "From the file being seen to its result committed.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "digitwatch_batch_size", "Files per committed batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.waiting = Gauge(
            "digitwatch_waiting_files", "Files seen and not yet answered.", registry=r
        )
        self.oldest = Gauge(
            "digitwatch_oldest_waiting_seconds",
            "Age of the oldest file seen and not yet answered (0 when none).",
            registry=r,
        )
        self.last_answer = Gauge(
            "digitwatch_last_answer_timestamp_seconds",
            "Unix time of the last committed answer (0 before the first).",
            registry=r,
        )
        self.held = Gauge(
            "digitwatch_outbox_held", "1 while results cannot be written (a full disk).", registry=r
        )
        Info("digitwatch_model", "The weights answering.", registry=r).info(
            {"model": model, "workers": str(workers)}
        )

    def committed(self, answers: Iterable[Record], detected_at: Iterable[float]) -> None:
        """One committed batch: its answers and the wall times their files were seen."""
        now = time.time()
        counts = dict.fromkeys(STATUSES, 0)
        uncertain = 0
        for answer, seen in zip(answers, detected_at, strict=True):
            counts[answer.status] += 1
            uncertain += answer.uncertain
            self.latency.observe(max(0.0, now - seen))
        n = sum(counts.values())
        if n:
            for status, count in counts.items():
                self._by_status[status].inc(count)
            self.uncertain.inc(uncertain)
            self.batch_size.observe(n)
            self.last_answer.set(now)

    def queue(self, waiting: int, oldest_s: float, *, held: bool) -> None:
        self.waiting.set(waiting)
        self.oldest.set(oldest_s)
        self.held.set(1 if held else 0)

    def text(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class Exporter:
    """Serves the metrics over HTTP and/or rewrites a textfile every `every` seconds."""

    def __init__(
        self, metrics: Metrics, *, path: Path | None, port: int | None, every: float = 5.0
    ) -> None:
        self.metrics = metrics
        self.path = path
        self.port = port
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: object | None = None

    def start(self) -> None:
        if self.port is not None:
            try:
                server, _ = prometheus_client.start_http_server(
                    self.port, registry=self.metrics.registry
                )
            except OSError as e:
                raise ConfigError(f"--metrics-port {self.port}: {e.strerror or e}") from None
            self._server = server
        if self.path is not None:
            self.write()  # a bad path fails at start, not in a thread
            self._thread = threading.Thread(target=self._loop, name="digitwatch-metrics")
            self._thread.start()

    def write(self) -> None:
        assert self.path is not None
        try:
            prometheus_client.write_to_textfile(str(self.path), self.metrics.registry)
        except OSError as e:
            raise ConfigError(f"--metrics-file {self.path}: {e.strerror or e}") from None

    def _loop(self) -> None:
        failing = False
        while not self._stop.wait(self.every):
            try:
                self.write()
            except ConfigError as e:  # a full disk: the next round rewrites the whole file
                if not failing:
                    log.warning("metrics_file_unwritable", error=str(e))
                failing = True
            else:
                failing = False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.write()  # the final counts, once the daemon has committed its last batch
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server.server_close()  # type: ignore[attr-defined]
