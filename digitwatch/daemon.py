"""`digitwatch run`: claim ready files, answer them in batches, exactly once.

Layout (all renames stay on one filesystem and inside the watched tree):

    inbox/x.png                                   dropped by a producer
    inbox/.digitwatch/work/<daemon>/<claim>~x.png  claimed (renamed) before it is read
    inbox/.digitwatch/processed/<claim>~x.png      answered (failed/ when status is error)
    outbox/x.png.<claim>.json                      one result per claim, never overwritten
    outbox/results.csv                             one row per claim, appended under flock

A batch commits in this order: every JSON (temp + rename, written by the worker that
answered the file), then all CSV rows in one O_APPEND write under an exclusive flock,
then one sync, then the inputs are archived. The sync and the archive run on a second
thread ("settle"), which covers every batch waiting with one sync, so the main thread
claims the next files while the disk flushes.
A file still in a work folder therefore has either no JSON (answer it again: the JSON
name is fixed by the claim id, so the rewrite replaces a partial attempt), or a JSON
whose CSV row may be missing (append it). Each daemon flocks `work/<daemon>/.lock` for
its lifetime; a work folder whose lock can be taken belonged to a dead daemon and is
adopted, at start and at every rescan.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import ctypes
import datetime as dt
import errno
import fcntl
import gc
import itertools
import json
import os
import queue
import secrets
import signal
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from digitwatch import review, summary
from digitwatch.classify import load_weights
from digitwatch.codec import Limits, encode_png
from digitwatch.errors import FolderError, WatcherDied
from digitwatch.logs import info_lines
from digitwatch.metrics import Exporter, Metrics
from digitwatch.pipeline import Input, Pipeline, Result
from digitwatch.results import CSV_NAME, Record, csv_lines, input_text, write_json_atomic
from digitwatch.sdnotify import Notifier
from digitwatch.settings import Settings
from digitwatch.watch import (
    DIRECTORY,
    OVERFLOW,
    RESERVED_FOLDERS,
    SCAN,
    STATE_DIR,
    Gate,
    Ignore,
    Watcher,
    check_watchable,
    scan,
)

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
# Batches whose CSV rows are written, waiting for their sync and archive: when the
# settle thread falls this far behind (a disk that stopped answering), the main loop
# blocks, its watchdog pings stop, and systemd restarts the service.
_SETTLE_BACKLOG = 4
# A full, read-only or vanished outbox: the batch's files stay claimed and are answered
# again after a pause that doubles from _RETRY_MIN to _RETRY_MAX seconds; meanwhile no
# new file is claimed, and the failure is logged at most once per _HOLD_LOG_EVERY.
_RETRY_MIN = 0.5
_RETRY_MAX = 30.0
_HOLD_LOG_EVERY = 60.0
_NAME_MAX = 255  # bytes in one file name on Linux filesystems
_NEW_DIR_GRACE = 60.0  # seconds a half-made work folder (.new-*) is left to its maker


def check_folders(settings: Settings) -> tuple[Path, Path]:
    """Resolve and validate inbox and outbox, or raise FolderError with one line."""
    inbox, outbox = settings.inbox.resolve(), settings.outbox.resolve()
    for role, folder in (("inbox", inbox), ("outbox", outbox)):
        if not folder.is_dir():
            raise FolderError(f"{role} {folder} does not exist or is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FolderError(f"{role} {folder} is not writable")
    if outbox == inbox or outbox.is_relative_to(inbox):
        raise FolderError(f"outbox {outbox} is the inbox or inside it: results would be read back")
    queue_dir = settings.review_path.resolve()
    if settings.review and queue_dir.is_relative_to(inbox):
        raise FolderError(f"review folder {queue_dir} is inside the inbox: it would be read back")
    if settings.recursive and inbox.is_relative_to(outbox):
        raise FolderError(
            f"inbox {inbox} is inside outbox {outbox}: --recursive would mirror results into it"
        )
    return inbox, outbox


def serve(settings: Settings, *, check_only: bool = False) -> int:
    """Validate, then (unless `check_only`) run the service until SIGTERM/SIGINT."""
    inbox, outbox = check_folders(settings)
    weights = load_weights(settings.weights)
    if check_only:
        check_watchable(inbox, poll=settings.poll)
        print(f"digitwatch: ok: inbox {inbox}, outbox {outbox}, model {weights.model_id}")
        return 0
    # Everything loaded so far lives as long as the process: keep the collector from
    # walking it again on every full collection, and keep the pages shared by the
    # forked workers from being written by it (reference counts aside).
    gc.freeze()
    pipeline = Pipeline(
        weights,
        limits=Limits(settings.max_pixels, settings.max_file_bytes, settings.max_decode_bytes),
        uncertain_below=settings.uncertain_below,
        workers=settings.workers,
    )
    metrics = Metrics(model=weights.model_id, workers=settings.workers)
    exporter = Exporter(
        metrics,
        path=Path(settings.metrics_file) if settings.metrics_file else None,
        port=settings.metrics_port or None,
    )
    exporter.start()
    try:
        with pipeline:
            daemon = Daemon(
                settings, inbox, outbox, pipeline, Notifier.from_environ(), metrics=metrics
            )
            return daemon.run(restore_signals=False)
    finally:
        exporter.stop()  # after the last commit, so the file ends with the final counts


@dataclass
class Claim:
    rel: str  # the input's path relative to the inbox: the record's `input`
    claim_id: str
    work: str  # where the claimed file is now
    detected_at: float  # wall clock
    size: int = 0  # bytes when claimed

    @property
    def subdir(self) -> str:
        return self.rel.rpartition("/")[0]

    @property
    def name(self) -> str:
        return self.rel.rpartition("/")[2]

    @property
    def stored_name(self) -> str:
        return f"{self.claim_id}~{self.name}"


@dataclass
class _Batch:
    claims: list[Claim]
    results: Callable[[], list[Result]]  # waits for the pipeline
    started: float  # perf_counter
    done: threading.Event  # set when results() no longer waits
    submitted: float  # time.monotonic(), for the watchdog's progress check


@dataclass
class _Settle:
    """A batch with its JSON files and CSV rows written: to sync, then archive."""

    claims: list[Claim]
    records: list[Record]
    started: float  # perf_counter
    wait_ms: float  # how long the main thread waited for the workers


_second = (-1, "")  # the last whole second formatted by _iso, and its text


def _iso(wall_us: int) -> str:
    """ISO 8601 UTC with microseconds, as datetime.isoformat writes it, ~15x cheaper."""
    global _second  # noqa: PLW0603 (a one-entry cache)
    sec, us = divmod(wall_us, 1_000_000)
    if _second[0] != sec:
        _second = (sec, dt.datetime.fromtimestamp(sec, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{us:06d}+00:00"


_last_us = 0  # this process's last processed_at


def _stamp() -> str:
    """processed_at, strictly increasing in this process.

    With `input` it names a CSV row on recovery. Two workers can stamp the same
    microsecond, but never for the same input: a daemon does not start an input name
    while an earlier file of that name is still being answered (`Daemon._advance`).
    """
    global _last_us  # noqa: PLW0603 (one clock per process)
    _last_us = max(time.time_ns() // 1000, _last_us + 1)
    return _iso(_last_us)


@dataclass(frozen=True)
class WriteJson:
    """The daemon's Finisher: stamp each record and write its JSON, in the worker.

    Each input's tag is (JSON path, detected_at). A missing folder below the outbox is
    made (results mirrored from inbox subfolders, --recursive); a missing outbox is not
    (an unmounted share): the error holds the batch until it is back.

    A claim whose JSON is already there keeps that JSON and its record: a published
    result never changes, however often its claim is answered again (a held batch's
    retries, the one-by-one rerun after a worker died, an adopted claim). The check costs
    a new file one access() call (~2 us).
    """

    outbox: str
    review_dir: str | None = None  # doubtful answers are queued there too (review.py)

    def __call__(self, items: Sequence[Input], results: list[Result]) -> list[Record]:
        # Texts first, then files: one stage at a time keeps each in the caches.
        out = [
            r.record.stamped(item.tag[1], _stamp()) for item, r in zip(items, results, strict=True)
        ]
        for k, (item, text) in enumerate(zip(items, [r.to_json() for r in out], strict=True)):
            path = item.tag[0]
            published = _published(path)
            if published is not None:
                out[k] = published
                continue
            try:
                self._write(path, text)
            except OSError as e:
                if e.errno not in _NAME_REFUSED:
                    raise  # the outbox's fault (full, read-only, gone): hold the batch
                # The outbox's filesystem refuses this name (an SMB share refuses ':' or
                # '?', another has a shorter limit or takes UTF-8 only): the result goes
                # under its claim id alone rather than holding every batch it is in.
                fallback = fallback_json_path(path)
                published = _published(fallback)
                if published is not None:
                    out[k] = published
                    continue
                self._write(fallback, text)
        if self.review_dir is not None:
            for item, rec, result in zip(items, out, results, strict=True):
                if review.wanted(rec):
                    self._queue(item, rec, result)
        return out

    def _queue(self, item: Input, rec: Record, result: Result) -> None:
        """Queue a doubtful answer for a person; a failure here never holds the batch."""
        assert self.review_dir is not None and item.path is not None
        seen = None if result.image is None else encode_png(result.image)
        claim_id = item.tag[0].rsplit(".", 2)[1]
        try:
            review.add(Path(self.review_dir), claim_id, rec, Path(item.path), seen)
        except OSError as e:
            log.warning("review_failed", input=rec.input, claim=claim_id, error=str(e))

    def _write(self, path: str, text: str) -> None:
        tmp = _tmp_name(path)
        try:
            write_json_atomic(path, text, tmp_name=tmp)
        except FileNotFoundError:
            folder = Path(path).parent
            if folder == Path(self.outbox) or not Path(self.outbox).is_dir():
                raise
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, text, tmp_name=tmp)


# What a filesystem answers for a name it will not take (not for a full or read-only one).
_NAME_REFUSED = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})


def fallback_json_path(json_path: str) -> str:
    """`<claim>.json` beside `<name>.<claim>.json`: the result's name when the outbox
    refuses the input's name. The record inside still names the input."""
    folder, _, name = json_path.rpartition("/")
    return f"{folder}/{name.rsplit('.', 2)[1]}.json"


def _tmp_name(json_path: str) -> str:
    """`.tmp-<claim>` for `<name>.<claim>.json` (or `<claim>.json`): shorter than the
    result's name, and hidden and without `.json`, so a reader globbing for results
    never opens it."""
    return f".tmp-{json_path.rsplit('.', 2)[-2].rpartition('/')[2]}"


def _published(path: str) -> Record | None:
    """The record in the complete JSON at `path`, or None when there is none to keep."""
    if not os.access(path, os.F_OK):
        return None  # the usual case, a new claim: ~2 us, a failed open() costs ~7
    try:
        with open(path, encoding="utf-8") as f:  # noqa: PTH123 (plain strings, see Daemon)
            return Record(**json.loads(f.read()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # Unreadable or cut short (a power cut before the sync): never published whole.
        return None


def _load_syncfs() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


_syncfs = _load_syncfs()


class Results:
    """The outbox: where each JSON goes, the shared CSV, and the one sync per batch."""

    def __init__(self, outbox: Path, *, fsync: bool) -> None:
        self.outbox = outbox
        self._outbox = str(outbox)
        self.csv = outbox / CSV_NAME
        self.fsync = fsync
        # (inode, offset) of the end of the last row this process wrote: a row boundary
        # for as long as the file only grows, so the torn-row check reads only beyond it.
        self._boundary: tuple[int, int] | None = None

    def _row_boundary(self, fd: int) -> int:
        """An offset of the open CSV known to end a whole row (0, the start, at worst)."""
        st = os.fstat(fd)
        if self._boundary is not None:
            ino, end = self._boundary
            if ino == st.st_ino and end <= st.st_size:
                return end
        # The summary covers whole rows only (it is advanced after each whole append).
        known = summary.load(self.outbox, st)
        return known.csv_size if known is not None else 0

    def json_path(self, claim: Claim) -> str:
        sub = claim.subdir
        folder = f"{self._outbox}/{sub}" if sub else self._outbox
        return f"{folder}/{claim.name}.{claim.claim_id}.json"

    def append_csv(self, records: list[Record], *, unless_present: bool = False) -> int:
        """Append rows in one write under an exclusive flock; returns how many were written."""
        fd = os.open(self.csv, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = _repair_tail(fd, self._row_boundary(fd))
            if unless_present and size:
                present = _csv_keys(fd)
                records = [r for r in records if (r.input, r.processed_at) not in present]
            if records:
                # A name with bytes that are not UTF-8 is escaped in its record
                # (`input_text`); a JSON from before that rule must not stop the writer.
                data = csv_lines(records, header=size == 0).encode("utf-8", "backslashreplace")
                view = memoryview(data)
                try:
                    while view:
                        view = view[os.write(fd, view) :]
                except OSError:
                    # A full disk mid-write: rows left behind would be answered twice.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
                summary.advance(self.outbox, fd)  # for `digitwatch status`, under the flock
            self._boundary = (os.fstat(fd).st_ino, size + len(data) if records else size)
            return len(records)
        finally:
            os.close(fd)  # releases the flock

    def sync(self, *folders: Path) -> None:
        """One sync per batch: syncfs on each filesystem involved (fsync of each file is ~3 ms)."""
        if not self.fsync:
            return
        seen: set[int] = set()
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                dev = os.fstat(fd).st_dev
                if dev in seen:
                    continue
                seen.add(dev)
                if _syncfs is None or _syncfs(fd) != 0:
                    os.sync()
            finally:
                os.close(fd)


def _repair_tail(fd: int, known: int = 0) -> int:
    """Cut a row torn by a crash mid-write; return the file size.

    `known` is an offset that ends a whole row. A row ends at a line break outside
    quotes (RFC 4180): an input name may hold line breaks inside its quoted field, so a
    file that ends in a newline may still end inside a row. The bytes after `known` are
    read with their quotes counted, and the file is cut after the last line break that
    follows an even number of them.
    """
    size = os.fstat(fd).st_size
    if known > size:
        known = 0
    keep = _whole_rows_end(fd, known, size)
    if keep == size:
        return size
    os.ftruncate(fd, keep)
    log.warning("csv_repaired", dropped_bytes=size - keep)
    return keep


def _whole_rows_end(fd: int, start: int, end: int) -> int:
    """The end of the last whole row in bytes [start, end) of the CSV; `start` ends one."""
    pos, inside, last = start, False, start
    while pos < end:
        chunk = os.pread(fd, min(end - pos, 1 << 20), pos)
        if not chunk:
            break
        at = pos
        for k, part in enumerate(chunk.split(b'"')):
            if k:
                inside = not inside  # a quote before this part: "" toggles twice
            if not inside:
                j = part.rfind(b"\n")
                if j >= 0:
                    last = at + j + 1
            at += len(part) + 1
        pos += len(chunk)
    return last


def _csv_keys(fd: int) -> set[tuple[str, str]]:
    # A byte that is not UTF-8 (a row written by another tool) must not stop recovery.
    with os.fdopen(os.dup(fd), "r", newline="", encoding="utf-8", errors="replace") as f:
        f.seek(0)
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            return set()
        i, j = header.index("input"), header.index("processed_at")
        return {(row[i], row[j]) for row in reader if len(row) > max(i, j)}


class Daemon:
    def __init__(
        self,
        settings: Settings,
        inbox: Path,
        outbox: Path,
        pipeline: Pipeline,
        notifier: Notifier,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.s = settings
        self.inbox = inbox
        self.outbox = outbox
        self.pipeline = pipeline
        self.notifier = notifier
        self.metrics = metrics or Metrics(model=pipeline.model_id, workers=settings.workers)
        self.results = Results(outbox, fsync=settings.fsync)
        self.write_json = WriteJson(
            str(outbox), str(settings.review_path.resolve()) if settings.review else None
        )
        state = inbox / STATE_DIR
        self.work_root = state / "work"
        self.archive = {"ok": state / "processed", "failed": state / "failed"}
        self.daemon_id = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.work = self.work_root / self.daemon_id
        # Plain strings for the per-file paths: pathlib costs a few us per operation.
        self._work = str(self.work)
        self._archive_to = {status: str(folder) for status, folder in self.archive.items()}
        self._claim_tag = self.daemon_id.rsplit("-", 1)[1]
        self._lock_fd: int | None = None
        self._counter = itertools.count()
        self._dirs: set[str] = set()
        self.queue: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.gate = Gate(settings.quiet_period, use_leases=settings.poll <= 0)
        self.ready: dict[str, float] = {}  # path -> detected_at, in arrival order
        self.first_ready = 0.0
        self.backlog: list[Claim] = []  # adopted claims that still need an answer
        self.inflight: collections.deque[_Batch] = collections.deque()  # in the workers
        self.settling: queue.Queue[_Settle | None] = queue.Queue(_SETTLE_BACKLOG)
        self.settle_error: BaseException | None = None
        self.settler = threading.Thread(target=self._settle_loop, name="digitwatch-settle")
        self.skipped: dict[str, int] = {}  # non-regular paths already logged, by inode
        self.reserved_seen: set[str] = set()  # reserved subfolder names already logged
        self.counts = {"ok": 0, "no_digit": 0, "error": 0}
        self.stopping = False
        self.stop_by = float("inf")  # monotonic: stop waiting for the workers after this
        self.stopping_sent = False
        self.next_ping = 0.0
        self.held_since: float | None = None  # when writing results first failed
        self.retry_at = 0.0
        self.backoff = 0.0
        self.next_hold_log = 0.0
        self.inbox_ino = -1
        self.work_ino = -1  # our work folder's inode: gone or another when .digitwatch is
        self.next_rescan = float("inf")
        self.ignore = Ignore(settings.ignore)
        self.watcher = Watcher(
            inbox,
            recursive=settings.recursive,
            poll=settings.poll,
            sink=self.queue.put,
            ignore=self.ignore,
        )
        if pipeline.inline:
            # The batch runs in this thread: each finished step is the loop's chance to ping.
            pipeline.on_progress = self._ping

    # -- lifecycle ---------------------------------------------------------------------

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
            self._make_folders()
            self.work_ino = self.work.stat().st_ino
            self._adopt_dead_peers()
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
                model=self.pipeline.model_id,
                daemon=self.daemon_id,
                backlog=len(self.ready) + len(self.gate.pending) + len(self.backlog),
                ms=round((time.monotonic() - t0) * 1000, 1),
            )
            self._loop()
        finally:
            if not restore_signals:
                for sig in _STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_IGN)
            self._send_stopping()
            self.watcher.stop()
            self._stop_settler()
            self._release_folders()
            if restore_signals:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            self.notifier.close()
        log.info("stopped", **self.counts)
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

    def _make_folders(self) -> None:
        try:
            self.work_root.mkdir(parents=True, exist_ok=True)
            for folder in self.archive.values():
                folder.mkdir(exist_ok=True)
            # Build the work folder under a hidden name and rename it into place with its
            # lock held, so a peer never sees it unlocked and adopts it.
            tmp = self.work_root / f".new-{self.daemon_id}"
            tmp.mkdir()
            self._lock_fd = os.open(tmp / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            tmp.rename(self.work)
        except OSError as e:
            raise FolderError(f"cannot create {self.work_root}: {e.strerror or e}") from None

    def _release_folders(self) -> None:
        if self._lock_fd is None:
            return
        # Whatever is still claimed stays for the next start; an empty folder goes.
        try:
            if not any(p.name != ".lock" for p in self.work.iterdir()):
                (self.work / ".lock").unlink(missing_ok=True)
                self.work.rmdir()
        except OSError:
            pass  # the inbox itself is gone: the error that stopped us says so
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- recovery ----------------------------------------------------------------------

    def _adopt_dead_peers(self) -> None:
        """Move a dead daemon's claims into our work folder and finish them."""
        adopted = 0
        for peer in list(self.work_root.iterdir()):
            if peer == self.work or not peer.is_dir():
                continue
            if peer.name.startswith(".") and not _older_than(peer, _NEW_DIR_GRACE):
                continue  # a peer still between mkdir and flock: not ours to judge yet
            try:
                fd = os.open(peer / ".lock", os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1  # a crash before the lock existed
            except OSError:
                continue
            try:
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # alive
                adopted += self._move_claims(peer)
                (peer / ".lock").unlink(missing_ok=True)
                _remove_empty_tree(peer)
            finally:
                if fd >= 0:
                    os.close(fd)
        if adopted:
            log.info("recovered", files=adopted)
        self._finish_recovered()

    def _move_claims(self, peer: Path) -> int:
        moved = 0
        for dirpath, _dirs, files in os.walk(peer):
            sub = os.path.relpath(dirpath, peer)
            for name in files:
                if name == ".lock" or "~" not in name:
                    continue
                target = self.work / sub / name if sub != "." else self.work / name
                self._ensure_dir(str(target.parent))
                try:
                    (Path(dirpath) / name).rename(target)
                    moved += 1
                except FileNotFoundError:
                    continue  # another daemon adopted it first
        return moved

    def _finish_recovered(self) -> None:
        """Adopted claims: archive those already answered, queue the rest for a batch."""
        answered: list[tuple[Claim, Record]] = []
        queued = {c.claim_id for c in self.backlog}  # ours, waiting for a retry or a turn
        for dirpath, _dirs, files in os.walk(self.work):
            sub = os.path.relpath(dirpath, self.work)
            for name in files:
                if name == ".lock" or "~" not in name:
                    continue
                claim_id, base = name.split("~", 1)
                if claim_id in queued:
                    continue  # ours, held: its next attempt keeps any JSON it published
                rel = base if sub == "." else f"{sub}/{base}"
                claim = Claim(rel, claim_id, f"{dirpath}/{name}", time.time())
                path = self.results.json_path(claim)
                record = _published(path) or _published(fallback_json_path(path))
                if record is None:
                    self.backlog.append(claim)
                    continue
                answered.append((claim, record))
        if not answered:
            return
        try:
            added = self.results.append_csv([r for _, r in answered], unless_present=True)
            self.results.sync(self.outbox, self.inbox)
        except OSError as e:
            # A full outbox: they stay claimed, and the next rescan tries again.
            log.warning("recovery_deferred", files=len(answered), error=e.strerror or str(e))
            return
        for claim, record in answered:
            self._archive(claim, record.status)
        log.info("recovered_answers", files=len(answered), csv_rows_added=added)

    # -- main loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        ping_every = self.notifier.watchdog_every
        next_status = 0.0
        q = self.queue
        while not self.stopping:
            now = time.monotonic()
            self._ping()
            if now >= next_status:
                self.notifier.status(self._status())
                next_status = now + _STATUS_EVERY
                self._check_inbox()
            if not self.watcher.alive():
                raise WatcherDied("the filesystem observer stopped; exiting so it can restart")
            self._check_settled()
            if now >= self.next_rescan:
                self._rescan()
            for path, detected in self.gate.due(now):
                self._mark_ready(path, detected)
            if self.inflight:
                self._drain()  # so the next batch can start while these are answered
            held = now < self.retry_at  # the outbox failed: claim nothing until the retry
            if held:
                if self.inflight:
                    self._advance([])
                    continue
            elif self.backlog:
                batch, self.backlog = (
                    self.backlog[: self.s.batch_size],
                    self.backlog[self.s.batch_size :],
                )
                self._advance(batch)
                continue
            # Idle workers take what is ready at once (a lone file need not wait for
            # company); while a batch is in flight the next one fills, for at most
            # max_delay_ms, so batches grow with the load. The loop never sits waiting
            # for a batch's answers: a file arriving meanwhile is claimed and queued to
            # the workers at once (a 12 MP batch takes ~0.2 s), and the batch's last
            # worker wakes the loop (_BATCH_DONE) to commit it.
            # Nothing new is claimed until a held batch commits (held_since is cleared),
            # even while its retry is in the workers.
            elif (
                self.ready
                and self.held_since is None
                and (
                    not self.inflight
                    or len(self.ready) >= self.s.batch_size
                    or now >= self.first_ready + self.s.max_delay_ms / 1000
                )
            ):
                self._advance(self._claim_batch())
                continue
            elif self.inflight and self.inflight[0].done.is_set():
                self._advance([])  # commit the oldest batch: its answers are all in
                continue
            wake = min(now + 1.0, self.next_rescan, self.gate.next_check(), next_status)
            if ping_every is not None:
                wake = min(wake, self.next_ping)
            if held:
                wake = min(wake, self.retry_at)
            elif self.ready and self.held_since is None:
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
        if self.inflight or self.backlog:
            files = sum(len(b.claims) for b in self.inflight) + len(self.backlog)
            if self.inflight:
                self.inflight.clear()
                self.pipeline.abandon()
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
        if self.inflight:
            last = max(self.pipeline.last_progress(), self.inflight[0].submitted)
            if now - last > 2 * every:
                return
        self.notifier.watchdog()

    def _wait(self, batch: _Batch) -> bool:
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
        self._check_state()

    def _check_state(self) -> None:
        """`.digitwatch` removed or renamed under us: claims would fail, exit instead.

        Our claimed files went with it (or are gone), so a new one made here would not
        recover them; a restart makes the folders anew and adopts what is there.
        """
        try:
            ino = self.work.stat().st_ino
        except OSError:
            ino = -1
        if ino != self.work_ino:
            raise FolderError(
                f"{self.inbox / STATE_DIR} was removed or renamed while running; "
                "exiting so that a restart makes it again"
            )

    def _take(self, item: tuple[str, str]) -> None:
        path, hint = item
        if item is _STOP:
            self.stopping = True
        elif item is _LOG_STATUS:
            log.info(
                "status",
                status=self._status(),
                in_flight=sum(len(b.claims) for b in self.inflight),
                held=self.held_since is not None,
                **self.counts,
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
        self._check_state()
        self._flush()
        if self.inflight:
            return  # a stop ran out of time in the flush: those claims are left for later
        self._adopt_dead_peers()
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
        c = self.counts
        waiting = len(self.ready) + len(self.gate.pending) + len(self.backlog)
        self.metrics.queue(waiting, self._oldest_waiting_s(), held=self.held_since is not None)
        return f"{c['ok']} ok, {c['no_digit']} no digit, {c['error']} errors; {waiting} waiting"

    def _oldest_waiting_s(self) -> float:
        seen = [*self.ready.values(), *(p.detected_at for p in self.gate.pending.values())]
        seen += [c.detected_at for c in self.backlog]
        seen += [b.claims[0].detected_at for b in self.inflight if b.claims]
        return max(0.0, time.time() - min(seen)) if seen else 0.0

    # -- one batch ---------------------------------------------------------------------

    def _claim_batch(self) -> list[Claim]:
        claims: list[Claim] = []
        while self.ready and len(claims) < self.s.batch_size:
            path = next(iter(self.ready))
            detected = self.ready.pop(path)
            claim = self._claim(path, detected)
            if claim is not None:
                claims.append(claim)
        return claims

    def _advance(self, claims: list[Claim]) -> None:
        """Start answering `claims`; then, if the workers hold enough, commit the oldest batch.

        Up to _DEPTH batches stay in the workers (read, decode, preprocess, classify, write
        each JSON) while this thread appends the oldest batch's CSV rows, syncs and archives
        it, so the workers have queued work through the sync. With no claims the oldest
        batch is committed. Commit order per batch is unchanged, and batches commit in the
        order they were claimed.
        """
        now: list[Claim] = []
        if claims:
            # An input name waits while a file of the same name is being answered, so the
            # workers never stamp one name twice in the same microsecond (see _stamp).
            names = {c.rel for b in self.inflight for c in b.claims}
            later: list[Claim] = []
            for c in claims:
                (later if c.rel in names else now).append(c)
                names.add(c.rel)
            self.backlog[:0] = later  # claimed already: answered by the next batches
        if now:
            self.inflight.append(self._start(now))
        oldest = self.inflight[0] if self.inflight else None
        if oldest is not None and (len(self.inflight) > _DEPTH or not now) and self._wait(oldest):
            self._answer(self.inflight.popleft())

    def _flush(self) -> None:
        """Commit every batch in hand, through its archive (a stop out of time: some)."""
        while self.inflight and self._wait(self.inflight[0]):
            self._answer(self.inflight.popleft())
        if self.settler.is_alive():
            self.settling.join()
        self._check_settled()

    def _claim(self, path: str, detected: float) -> Claim | None:
        """Rename the file into our work folder; None if it is gone or not a regular file."""
        rel = self.watcher.filter.relative(path)
        if rel is None:
            return None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("skipped", input=input_text(rel)[0], reason=e.strerror)
            return None
        claim_id = f"{time.time_ns():x}-{self._claim_tag}{next(self._counter):x}"
        sub, _, name = rel.rpartition("/")
        reason = None
        if not stat.S_ISREG(st.st_mode):
            reason = "not a regular file; left in place"
        elif len(os.fsencode(name)) + len(claim_id) + 1 > _NAME_MAX:
            # Its claimed name `<claim>~<name>` would not fit. (A result name that does not
            # fit, `<name>.<claim>.json`, is written as `<claim>.json`: see WriteJson.)
            reason = (
                f"name too long: over {_NAME_MAX - len(claim_id) - 1} bytes, its claimed"
                " name would not fit; left in place"
            )
        if reason is not None:
            if self.skipped.get(path) != st.st_ino:
                self.skipped[path] = st.st_ino
                log.warning("skipped", input=input_text(rel)[0], reason=reason)
            return None
        folder = self._work
        if sub:
            folder = f"{folder}/{sub}"
            self._ensure_dir(folder)
        target = f"{folder}/{claim_id}~{name}"
        try:
            os.rename(path, target)  # noqa: PTH104 (per file: plain strings, see __init__)
        except FileNotFoundError:
            if not os.path.lexists(path):
                return None  # a peer claimed it first
            # The file is there, so the target folder is not: ours, or a subfolder of it.
            self._check_state()
            self._dirs.discard(folder)  # a subfolder of it was removed: made again next time
            return None
        except OSError as e:
            log.warning("skipped", input=input_text(rel)[0], reason=f"cannot claim: {e.strerror}")
            return None
        return Claim(rel, claim_id, target, detected, st.st_size)

    def _start(self, claims: list[Claim]) -> _Batch:
        t0 = time.perf_counter()
        inputs = [
            Input(
                c.rel,
                path=c.work,
                size=c.size,
                tag=(self.results.json_path(c), _iso(int(c.detected_at * 1_000_000))),
            )
            for c in claims
        ]
        done = threading.Event()

        def on_done() -> None:
            done.set()
            self.queue.put(_BATCH_DONE)

        results = self.pipeline.submit(inputs, finish=self.write_json, on_done=on_done)
        return _Batch(claims, results, t0, done, time.monotonic())

    def _answer(self, batch: _Batch) -> None:
        """Collect a batch's records (each JSON is written) and append its CSV rows."""
        t1 = time.perf_counter()
        try:
            records = [r.record for r in batch.results()]  # the workers wrote each JSON
            t2 = time.perf_counter()
            self.results.append_csv(records)
        except OSError as e:
            self._hold(batch.claims, e)
            return
        if self.held_since is not None:
            log.warning(
                "outbox_writable",
                outbox=str(self.outbox),
                after_s=round(time.monotonic() - self.held_since, 1),
            )
            self.held_since, self.backoff, self.next_hold_log = None, 0.0, 0.0
        self._settle(_Settle(batch.claims, records, batch.started, (t2 - t1) * 1000))

    def _hold(self, claims: list[Claim], error: OSError) -> None:
        """Writing results failed (a full disk): keep the files claimed, retry later.

        Nothing of the batch is committed: a failed CSV append is cut back
        (`Results.append_csv`), and a JSON already written is kept as it is when the file
        is answered again (`WriteJson`), so its readers never see a second version. The
        files are answered first when writing works again.
        """
        now = time.monotonic()
        self.backlog[:0] = claims
        self.backoff = min(_RETRY_MAX, self.backoff * 2 or _RETRY_MIN)
        self.retry_at = now + self.backoff
        if self.held_since is None:
            self.held_since = now
        if now >= self.next_hold_log:
            log.error(
                "outbox_unwritable",
                outbox=str(self.outbox),
                error=error.strerror or str(error),
                files_waiting=len(self.backlog),
                retry_in_s=self.backoff,
            )
            self.next_hold_log = now + _HOLD_LOG_EVERY

    def _settle(self, item: _Settle) -> None:
        while True:
            self._check_settled()
            try:
                self.settling.put(item, timeout=1.0)
                return
            except queue.Full:
                continue  # the disk is slow: no pings while we wait (see _SETTLE_BACKLOG)

    def _check_settled(self) -> None:
        if self.settle_error is not None:
            e = self.settle_error
            if isinstance(e, OSError):
                raise FolderError(f"cannot sync {self.outbox}: {e.strerror or e}") from e
            raise e

    def _stop_settler(self) -> None:
        if self.settler.is_alive():
            self.settling.put(None)
            self.settler.join()

    def _settle_loop(self) -> None:
        """The settle thread: one sync for every batch waiting, then archive and log them."""
        q = self.settling
        while True:
            items = [q.get()]
            while items[-1] is not None:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            batches = [i for i in items if i is not None]
            try:
                if batches and self.settle_error is None:
                    self.results.sync(self.outbox, self.inbox)
                    for b in batches:
                        self._archive_batch(b)
            except BaseException as e:  # noqa: BLE001 (handed to the main thread)
                self.settle_error = e  # the claims stay in the work folder for a restart
            finally:
                for _ in items:
                    q.task_done()
            if items[-1] is None:
                return

    def _archive_batch(self, batch: _Settle) -> None:
        records = batch.records
        lines = []
        for c, rec in zip(batch.claims, records, strict=True):
            self._archive(c, rec.status)
            self.counts[rec.status] += 1
            lines.append(
                {
                    "input": rec.input,
                    "status": rec.status,
                    "digit": rec.digit,
                    "confidence": rec.confidence,
                    "ms": rec.elapsed_ms,
                    "error": rec.error,
                    "claim": c.claim_id,
                }
            )
        info_lines("image", lines)
        self.metrics.committed(records, [c.detected_at for c in batch.claims])
        log.info(
            "batch",
            files=len(records),
            ms=round((time.perf_counter() - batch.started) * 1000, 3),
            pipeline_ms=round(batch.wait_ms, 3),
            **{k: sum(r.status == k for r in records) for k in self.counts},
        )

    def _archive(self, claim: Claim, status: str) -> None:
        try:
            if self.s.on_success == "delete" and status != "error":
                os.unlink(claim.work)  # noqa: PTH108 (per file: plain strings)
                return
            folder = self._archive_to["failed" if status == "error" else "ok"]
            sub = claim.subdir
            if sub:
                folder = f"{folder}/{sub}"
                self._ensure_dir(folder)
            os.rename(claim.work, f"{folder}/{claim.stored_name}")  # noqa: PTH104
        except OSError as e:
            log.error("archive_failed", input=claim.rel, claim=claim.claim_id, error=str(e))

    def _ensure_dir(self, folder: str) -> None:
        if folder not in self._dirs:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self._dirs.add(folder)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _remove_empty_tree(root: Path) -> None:
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            Path(dirpath).rmdir()
