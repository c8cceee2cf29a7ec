"""The service's worker processes: each answers its share of a batch with the Pipeline.

Decode + preprocess run in processes, not threads: preprocessing a small image is mostly
numpy calls on tiny arrays, which hold the GIL, and two threads ran slower than one
(28x28 PNG: 936 us serial, 1,228 us per image with two threads, 741 us with two
processes on a loaded 2-core box). The workers are forked when `Workers` is made, before
the service starts any thread, so they share the weights' pages; they ignore the signals
the service handles (`WORKER_IGNORES`) and die with their parent. A worker that dies (a
decoder crash) costs only the file that killed it an error record: the batch is answered
again one file at a time.

With one worker nothing is forked: `submit` answers in the caller's thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from digitwatch import libc
from digitwatch.codec import encode_png
from digitwatch.pipeline import Finisher, Input, Pipeline, Result
from digitwatch.results import Record

_KEEP_FREED = 16 << 20  # bytes of freed memory a worker keeps for the next file
_CHUNK_BYTES = 4 << 20  # most input bytes sent to a worker in one task
# Decodes estimated below this many bytes (`codec.decode_cost`) skip the shared budget:
# the lock would cost small files more than the decode, and two workers' worth of them
# fit in the margin that settings.py leaves beside --max-decode-mb.
_HOLD_FROM = 16 << 20

# Signals a worker ignores: the ones the service handles (a Ctrl-C, Ctrl-\ or kill -HUP
# to the whole group must not kill a worker by its default action).
WORKER_IGNORES = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

_PIPELINE: Pipeline | None = None  # in a worker process: the (forked) pipeline it runs


class _DecodeBudget:
    """The bytes of decoding all workers may hold at once (`Limits.max_decode_bytes`).

    Shared through fork: a counter in shared memory under a process-shared condition.
    A file's own cost never exceeds the total (codec refuses it first), so a waiter
    runs as soon as the decodes ahead of it are through. Made anew with every pool, so
    a worker killed while holding it cannot leave its share taken.
    """

    def __init__(self, total: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.total = total
        self._used = ctx.RawValue(ctypes.c_int64, 0)
        self._cond = ctx.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        if nbytes < _HOLD_FROM:
            yield
            return
        with self._cond:
            self._cond.wait_for(lambda: self._used.value + nbytes <= self.total)
            self._used.value += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used.value -= nbytes
                self._cond.notify_all()


def _worker_init(pipeline: Pipeline, budget: _DecodeBudget) -> None:
    global _PIPELINE  # one per worker process, set once at fork
    _PIPELINE = pipeline  # inherited through fork, not pickled: the weights are shared pages
    pipeline.hold = budget.hold
    # One OpenCV thread per worker: the workers are the parallelism, and on small images
    # cv2's own thread pool only adds hand-offs (to_mnist on 28x28: 1,340 -> 1,150 us CPU,
    # 2,144 -> 1,752 us wall per image). The one cv2 call outside codec/preprocess.
    import cv2  # noqa: TID251

    cv2.setNumThreads(1)
    # systemd and a terminal signal the whole group; the service decides what each means
    # (README: Signals) and stops its workers itself.
    for sig in WORKER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    libc.die_with_parent()  # even when the parent is SIGKILLed: no orphans holding memory
    # Every 12 MP photo's bytes and decoder buffers were fresh pages, faulted in and zeroed
    # again (worker system time per photo 1.8 -> 0.6 ms); larger blocks (a 40 MP image)
    # still go back at once.
    libc.keep_freed_memory(_KEEP_FREED)
    # One answer before the first real one, so the first file dropped does not pay for
    # the decoders' and numpy's first-call setup in this process (first file after
    # start, drop to result: 5.8-8.7 ms without, 4.5-6.4 ms with; 4 runs each).
    pipeline.answer([Input("warm-up", data=_warm_up_image())])


def _warm_up_image() -> bytes:
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:16] = 255  # a 1
    return encode_png(img)


def _answer_chunk(items: Sequence[Input], finish: Finisher | None) -> list[Record]:
    """A worker's task: answer its share of a batch; only the records travel back."""
    assert _PIPELINE is not None, "_answer_chunk runs in a worker process"
    return [r.record for r in _PIPELINE.answer(items, finish, keep_images=False)]


def _when_all_done(futures: list[Future[list[Record]]], call: Callable[[], object]) -> None:
    """Call `call` once, when the last of `futures` is done (by a result or an error)."""
    left = len(futures)
    lock = threading.Lock()

    def one_done(_: Future[list[Record]]) -> None:
        nonlocal left
        with lock:
            left -= 1
            last = left == 0
        if last:
            call()

    for future in futures:
        future.add_done_callback(one_done)


class Workers:
    """`count` forked processes running `pipeline`, or the caller's thread for one."""

    def __init__(self, pipeline: Pipeline, count: int) -> None:
        self.pipeline = pipeline
        self.model_id = pipeline.model_id
        self.count = count
        # When a worker last finished a step (read, decode, preprocess) of a file, on
        # the monotonic clock all processes share: the service's watchdog tells a slow
        # batch (steps still finishing) from a stuck one by it. In shared memory, made
        # before the first fork; one aligned double, written whole.
        self._progress = multiprocessing.get_context("fork").RawValue(
            ctypes.c_double, time.monotonic()
        )
        pipeline.on_progress = self._beat
        # Inline only (set it after the workers are forked, never for them): called after
        # each step, in the caller's thread, so a long inline batch can keep a watchdog fed.
        self.on_progress: Callable[[], object] | None = None
        self._pool: ProcessPoolExecutor | None = None
        if count > 1:
            self._pool = self._new_pool()

    @property
    def inline(self) -> bool:
        """True when files are answered in the caller's process (one worker)."""
        return self.count <= 1

    def last_progress(self) -> float:
        """time.monotonic() when any file last finished a step, in any process."""
        return float(self._progress.value)

    def _beat(self) -> None:
        self._progress.value = time.monotonic()
        if self.on_progress is not None:
            self.on_progress()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        budget = _DecodeBudget(self.pipeline.limits.max_decode_bytes)
        pool = ProcessPoolExecutor(
            self.count,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_worker_init,
            initargs=(self.pipeline, budget),
        )
        # With fork, the first submit starts every worker: do it now, while the caller
        # has no other thread, and so the first batch does not pay for it.
        pool.submit(int).result()
        return pool

    def _renew_pool(self) -> ProcessPoolExecutor:
        # A broken pool does not stop its surviving workers: one still busy with an
        # older chunk would write that chunk's JSON files again after they had been
        # answered anew (found by the killed-worker test). Kill them all first.
        self.abandon()
        self._pool = self._new_pool()
        return self._pool

    def abandon(self) -> None:
        """Kill the workers mid-task (a bounded stop): what they held is answered anew later."""
        if self._pool is None:
            return
        old, self._pool = self._pool, None
        # concurrent.futures has no public way to kill a pool's processes.
        procs = list((getattr(old, "_processes", None) or {}).values())
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.kill()
        old.shutdown(wait=True, cancel_futures=True)
        for proc in procs:
            proc.join()

    def _one_by_one(self, items: Sequence[Input], finish: Finisher | None) -> list[Result]:
        """After a worker died: each file in a fresh pool, so only the culprit fails."""
        out: list[Result] = []
        for item in items:
            pool = self._renew_pool()
            try:
                records = pool.submit(_answer_chunk, [item], finish).result()
                out += [Result(r, None) for r in records]
            except BrokenProcessPool:
                out += self.pipeline.crashed(item, finish)
        self._renew_pool()
        return out

    def submit(
        self,
        items: Sequence[Input],
        finish: Finisher | None = None,
        on_done: Callable[[], object] | None = None,
    ) -> Callable[[], list[Result]]:
        """Start answering `items`; the returned call waits for the results.

        With workers the results carry no 28x28 image (it stays in the worker); errors
        raised by `finish` (a full disk) are raised by the call. `on_done` is called once
        every worker is through with its share (the call then returns without waiting),
        from whichever thread saw that; inline, before `submit` returns.
        """
        if self._pool is None or not items:
            error: OSError | None = None
            done: list[Result] = []
            try:
                done = self.pipeline.answer(items, finish)
            except OSError as e:  # from `finish`: raised by the call, as with workers
                error = e
            if on_done is not None:
                on_done()

            def inline() -> list[Result]:
                if error is not None:
                    raise error
                return done

            return inline
        # One chunk per worker keeps the hand-off cost off small images; big files go in
        # more, smaller chunks so the workers stay evenly busy on a batch of 12 MP photos
        # and, for bytes sent inline, no pipe carries a whole batch of them at once.
        size = sum(len(i.data) if i.data is not None else i.size for i in items)
        n = min(len(items), max(self.count, -(-size // _CHUNK_BYTES)))
        chunks = [items[i::n] for i in range(n)]
        try:
            futures = [self._pool.submit(_answer_chunk, c, finish) for c in chunks]
        except BrokenProcessPool:  # a worker died while idle (say, the OOM killer)
            pool = self._renew_pool()
            futures = [pool.submit(_answer_chunk, c, finish) for c in chunks]
        if on_done is not None:
            _when_all_done(futures, on_done)

        def wait() -> list[Result]:
            out: list[Result] = [None] * len(items)  # type: ignore[list-item]
            for i, (future, chunk) in enumerate(zip(futures, chunks, strict=True)):
                try:
                    out[i::n] = [Result(r, None) for r in future.result()]
                except (BrokenProcessPool, CancelledError):
                    # A worker died; or one died under an earlier batch and its renewal
                    # cancelled this chunk, queued to the broken pool: answer it anew.
                    out[i::n] = self._one_by_one(chunk, finish)
            return out

        return wait
