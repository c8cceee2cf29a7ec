"""The service's main loop: signals, pings and status, rescans, and when to start a batch.

A batch commits in this order: every JSON (temp + rename, written by the worker that
answered the file, outbox.WriteJson), then all its CSV rows in one append under flock
(outbox.Results), then one sync and the archive of its inputs on the settle thread
(settle.py), which covers every batch waiting with one sync.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import structlog

from digitwatch.errors import FolderError, WatcherDied
from digitwatch.metrics import Metrics
from digitwatch.sdnotify import Notifier
from digitwatch.service.claims import Batch, Claimer, Hold, InFlight
from digitwatch.service.layout import Claim, Layout
from digitwatch.service.outbox import Results, WriteJson
from digitwatch.service.recovery import recover
from digitwatch.service.settle import Settler
from digitwatch.settings import Settings
from digitwatch.watch import (
    DIRECTORY,
    OVERFLOW,
    RESERVED_FOLDERS,
    SCAN,
    Gate,
    Ignore,
    Watcher,
    scan,
)
from digitwatch.workers import Workers

log = structlog.get_logger()

_STOP = ("", "stop")
_LOG_STATUS = ("", "log-status")  # SIGUSR1: the loop logs its state (not in the handler)
_BATCH_DONE = ("", "batch-done")  # wakes the main loop: a batch's workers are through
_STATUS_EVERY = 1.0
# Signals that stop the service as SIGTERM does (README: Signals). SIGHUP has nothing to
# reload (logs go to stdout, settings are read once) and means a closed terminal or a
# `kill -HUP`; SIGQUIT is a terminal's Ctrl-\. SIGUSR1 logs the state; SIGUSR2 is ignored.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# How often a wait for the workers wakes to ping the watchdog and check the stop bound.
_WAIT_TICK = 0.2
# Batches left in the workers while the main thread collects an older one.
_DEPTH = 2


class Daemon:
    def __init__(
        self,
        settings: Settings,
        inbox: Path,
        outbox: Path,
        workers: Workers,
        notifier: Notifier,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.s = settings
        self.inbox = inbox
        self.outbox = outbox
        self.workers = workers
        self.notifier = notifier
        self.metrics = metrics or Metrics(model=workers.model_id, workers=settings.workers)
        self.results = Results(outbox, fsync=settings.fsync)
        self.write_json = WriteJson(
            outbox, settings.review_path.resolve() if settings.review else None
        )
        self.layout = Layout(inbox, delete_answered=settings.on_success == "delete")
        self.daemon_id = self.layout.daemon_id
        self.queue: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.gate = Gate(settings.quiet_period, use_leases=settings.poll <= 0)
        self.ready: dict[str, float] = {}  # path -> detected_at, in arrival order
        self.first_ready = 0.0
        self.inflight = InFlight()
        self.hold = Hold()
        self.settler = Settler(self.results, self.layout, self.metrics, (outbox, inbox))
        self.reserved_seen: set[str] = set()  # reserved subfolder names already logged
        self.stopping = False
        self.stop_by = float("inf")  # monotonic: stop waiting for the workers after this
        self.stopping_sent = False
        self.next_ping = 0.0
        self.inbox_ino = -1
        self.next_rescan = float("inf")
        self.ignore = Ignore(settings.ignore)
        self.watcher = Watcher(
            inbox,
            recursive=settings.recursive,
            poll=settings.poll,
            sink=self.queue.put,
            ignore=self.ignore,
        )
        self.claimer = Claimer(self.layout, self.watcher.filter.relative)
        if workers.inline:
            # The batch runs in this thread: each finished step is the loop's chance to ping.
            workers.on_progress = self._ping

    def run(self, *, restore_signals: bool = True) -> int:
        """Serve until SIGTERM/SIGINT.

        `restore_signals=False` (the service process) ignores further SIGTERM/SIGINT once
        stopping: we are already on the way out, and CPython resets Python-level handlers
        to the default (die) while finalizing, which would turn a repeated SIGTERM into a
        kill instead of exit 0.
        """
        t0 = time.monotonic()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_status_signal)
        # Default actions kill the process: SIGUSR2 has no meaning here, and a lease
        # break would deliver SIGIO.
        previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        previous[signal.SIGIO] = signal.signal(signal.SIGIO, signal.SIG_IGN)
        try:
            self.inbox_ino = self.inbox.stat().st_ino
            self.layout.make()
            self._recover()
            self.settler.start()
            self.watcher.start()  # before the scan, so nothing lands unseen in between
            for path in scan(self.inbox, recursive=self.s.recursive, ignore=self.ignore):
                self._offer(path, SCAN)
            self._warn_reserved()
            self.next_rescan = time.monotonic() + self.s.rescan_interval
            self.notifier.ready(self._status())
            log.info(
                "ready",
                inbox=str(self.inbox),
                outbox=str(self.outbox),
                model=self.workers.model_id,
                daemon=self.daemon_id,
                backlog=len(self.ready) + len(self.gate.pending) + len(self.inflight.backlog),
                ms=round((time.monotonic() - t0) * 1000, 1),
            )
            self._loop()
        finally:
            if not restore_signals:
                for sig in _STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_IGN)
            self._send_stopping()
            self.watcher.stop()
            self.settler.stop()
            self.layout.release()
            if restore_signals:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            self.notifier.close()
        log.info("stopped", **self.settler.counts)
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stop_by = time.monotonic() + self.s.stop_timeout
        self.stopping = True
        self.queue.put(_STOP)  # SimpleQueue.put is reentrant: safe in a signal handler

    def _on_status_signal(self, signum: int, frame: FrameType | None) -> None:
        self.queue.put(_LOG_STATUS)

    def _send_stopping(self) -> None:
        """STOPPING=1 once, as soon as the stop begins (before the batches in hand end)."""
        if not self.stopping_sent:
            self.stopping_sent = True
            self.notifier.stopping(self._status())

    def _recover(self) -> None:
        queued = self.inflight.queued_ids()
        self.inflight.backlog += recover(
            self.layout, self.results, (self.outbox, self.inbox), queued
        )

    def _loop(self) -> None:
        ping_every = self.notifier.watchdog_every
        next_status = 0.0
        q = self.queue
        flight, hold = self.inflight, self.hold
        while not self.stopping:
            now = time.monotonic()
            self._ping()
            if now >= next_status:
                self.notifier.status(self._status())
                next_status = now + _STATUS_EVERY
                self._check_inbox()
            if not self.watcher.alive():
                raise WatcherDied("the filesystem observer stopped; exiting so it can restart")
            self.settler.check()
            if now >= self.next_rescan:
                self._rescan()
            for path, detected in self.gate.due(now):
                self._mark_ready(path, detected)
            if flight.batches:
                self._drain()  # so the next batch can start while these are answered
            held = now < hold.retry_at  # the outbox failed: claim nothing until the retry
            if held:
                if flight.batches:
                    self._advance([])
                    continue
            elif flight.backlog:
                self._advance(flight.next_from_backlog(self.s.batch_size))
                continue
            # Idle workers take what is ready at once (a lone file need not wait for
            # company); while a batch is in flight the next one fills, for at most
            # max_delay_ms, so batches grow with the load. The loop never sits waiting
            # for a batch's answers: a file arriving meanwhile is claimed and queued to
            # the workers at once (a 12 MP batch takes ~0.2 s), and the batch's last
            # worker wakes the loop (_BATCH_DONE) to commit it.
            # Nothing new is claimed until a held batch commits (hold.since is cleared),
            # even while its retry is in the workers.
            elif (
                self.ready
                and not hold.held
                and (
                    not flight.batches
                    or len(self.ready) >= self.s.batch_size
                    or now >= self.first_ready + self.s.max_delay_ms / 1000
                )
            ):
                self._advance(self.claimer.claim_batch(self.ready, self.s.batch_size))
                continue
            elif flight.batches and flight.batches[0].done.is_set():
                self._advance([])  # commit the oldest batch: its answers are all in
                continue
            wake = min(now + 1.0, self.next_rescan, self.gate.next_check(), next_status)
            if ping_every is not None:
                wake = min(wake, self.next_ping)
            if held:
                wake = min(wake, hold.retry_at)
            elif self.ready and not hold.held:
                wake = min(wake, self.first_ready + self.s.max_delay_ms / 1000)
            try:
                item = q.get(timeout=max(0.0, wake - now))
            except queue.Empty:
                continue
            self._take(item)
            self._drain()
        self._stop()

    def _stop(self) -> None:
        """Commit the batches in hand that finish within --stop-timeout; leave the rest.

        A batch left behind stays claimed in our work folder, and the next start answers
        it as it does after a crash: a file with a JSON gets its CSV row, one without is
        answered again. The workers are killed, so none writes a JSON after we exit.
        """
        self._send_stopping()
        self._flush()
        files = self.inflight.files()
        if files:
            if self.inflight.batches:
                self.inflight.batches.clear()
                self.workers.abandon()
            log.warning("stop_left_claimed", files=files, stop_timeout_s=self.s.stop_timeout)

    def _ping(self) -> None:
        """WATCHDOG=1 every half period, unless the workers are stuck.

        From the main loop and its waits only. Stuck means batches in the workers and no
        file through any step (read, decode, preprocess) for a whole watchdog period: a
        slow batch of large images keeps the pings going, a hung worker stops them and
        systemd restarts the service.
        """
        every = self.notifier.watchdog_every
        now = time.monotonic()
        if every is None or now < self.next_ping:
            return
        self.next_ping = now + every
        if self.inflight.batches:
            last = max(self.workers.last_progress(), self.inflight.batches[0].submitted)
            if now - last > 2 * every:
                return
        self.notifier.watchdog()

    def _wait(self, batch: Batch) -> bool:
        """Wait for a batch's workers, pinging meanwhile; False once a stop is out of time."""
        while not batch.done.wait(_WAIT_TICK):
            self._ping()
            if self.stopping:
                self._send_stopping()  # at once, not when this wait ends
                if time.monotonic() >= self.stop_by:
                    return False
        return True

    def _drain(self) -> None:
        """Take what is already queued without blocking: a burst fills whole batches."""
        q = self.queue
        while len(self.ready) < self.s.batch_size and not self.stopping:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            self._take(item)

    def _check_inbox(self) -> None:
        """A removed, renamed or unmounted inbox leaves inotify watching nothing: exit."""
        try:
            ino = self.inbox.stat().st_ino
        except OSError:
            ino = -1
        if ino != self.inbox_ino:
            raise FolderError(f"inbox {self.inbox} disappeared while being watched")
        self.layout.check()

    def _take(self, item: tuple[str, str]) -> None:
        path, hint = item
        if item is _STOP:
            self.stopping = True
        elif item is _LOG_STATUS:
            log.info(
                "status",
                status=self._status(),
                in_flight=sum(len(b.claims) for b in self.inflight.batches),
                held=self.hold.held,
                **self.settler.counts,
            )
        elif item is _BATCH_DONE:
            pass  # it only woke the loop
        elif hint == DIRECTORY:
            for p in scan(Path(path), recursive=True, inbox=False, ignore=self.ignore):
                self._offer(p, SCAN)
        elif hint == OVERFLOW:
            self.next_rescan = 0.0  # inotify dropped events: only a scan finds those files
        else:
            self._offer(path, hint)

    def _offer(self, path: str, hint: str) -> None:
        if path in self.ready:
            return
        detected = self.gate.offer(path, hint, time.monotonic(), time.time())
        if detected is not None:
            self._mark_ready(path, detected)

    def _mark_ready(self, path: str, detected: float) -> None:
        if not self.ready:
            self.first_ready = time.monotonic()
        self.ready.setdefault(path, detected)

    def _rescan(self) -> None:
        """Catch what inotify dropped (queue overflow is silent) and adopt dead peers' work."""
        # Recovery answers whatever sits unanswered in our work folder: our own batches
        # in flight must be committed and archived first, or they would be answered twice.
        self.layout.check()
        self._flush()
        if self.inflight.batches:
            return  # a stop ran out of time in the flush: those claims are left for later
        self._recover()
        for path in scan(self.inbox, recursive=self.s.recursive, ignore=self.ignore):
            self._offer(path, SCAN)
        self._warn_reserved()
        self.next_rescan = time.monotonic() + self.s.rescan_interval

    def _warn_reserved(self) -> None:
        """Say once that an inbox subfolder named like the outbox's own files is not read."""
        if not self.s.recursive:
            return
        for name in sorted(RESERVED_FOLDERS):
            folder = self.inbox / name
            if name not in self.reserved_seen and folder.is_dir() and not folder.is_symlink():
                self.reserved_seen.add(name)
                log.warning(
                    "skipped",
                    input=f"{name}/",
                    reason=f"the outbox keeps its own {name} there; the folder's files "
                    "are left in place (rename the folder to have them read)",
                )

    def _status(self) -> str:
        c = self.settler.counts
        waiting = len(self.ready) + len(self.gate.pending) + len(self.inflight.backlog)
        self.metrics.queue(waiting, self._oldest_waiting_s(), held=self.hold.held)
        return f"{c['ok']} ok, {c['no_digit']} no digit, {c['error']} errors; {waiting} waiting"

    def _oldest_waiting_s(self) -> float:
        seen = [*self.ready.values(), *(p.detected_at for p in self.gate.pending.values())]
        seen += self.inflight.detected()
        return max(0.0, time.time() - min(seen)) if seen else 0.0

    def _advance(self, claims: list[Claim]) -> None:
        """Start answering `claims`; then, if the workers hold enough, commit the oldest batch.

        Up to _DEPTH batches stay in the workers (read, decode, preprocess, classify, write
        each JSON) while this thread appends the oldest batch's CSV rows and hands it to
        the settle thread, so the workers have queued work through the sync. With no
        claims the oldest batch is committed. Batches commit in the order they were claimed.
        """
        flight = self.inflight
        now = flight.startable(claims) if claims else []
        if now:
            flight.batches.append(self._start(now))
        oldest = flight.batches[0] if flight.batches else None
        if oldest is not None and (len(flight.batches) > _DEPTH or not now) and self._wait(oldest):
            self._commit(flight.batches.popleft())

    def _flush(self) -> None:
        """Commit every batch in hand, through its archive (a stop out of time: some)."""
        while self.inflight.batches and self._wait(self.inflight.batches[0]):
            self._commit(self.inflight.batches.popleft())
        self.settler.join()

    def _start(self, claims: list[Claim]) -> Batch:
        t0 = time.perf_counter()
        done = threading.Event()

        def on_done() -> None:
            done.set()
            self.queue.put(_BATCH_DONE)

        results = self.workers.submit(claims, finish=self.write_json, on_done=on_done)
        return Batch(claims, results, t0, done, time.monotonic())

    def _commit(self, batch: Batch) -> None:
        """Collect a batch's records (each JSON is written), append its CSV rows, settle it.

        When writing fails (a full disk) nothing of the batch is committed: a failed CSV
        append is cut back (`Results.append_csv`), and a JSON already written is kept as
        it is when the file is answered again (`WriteJson`), so its readers never see a
        second version. The files stay claimed and are answered first when writing works.
        """
        t1 = time.perf_counter()
        try:
            batch.records = [r.record for r in batch.results()]  # the workers wrote each JSON
            t2 = time.perf_counter()
            self.results.append_csv(batch.records)
        except OSError as e:
            self.inflight.backlog[:0] = batch.claims
            self.hold.failed(str(self.outbox), e, len(self.inflight.backlog))
            return
        self.hold.succeeded(str(self.outbox))
        batch.wait_ms = (t2 - t1) * 1000
        self.settler.put(batch)
