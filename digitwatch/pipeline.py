"""The one pipeline: read -> decode -> preprocess -> classify -> record (-> the caller's write).

`Pipeline.run` answers a list of inputs in the calling process; `digitwatch predict`,
`evaluate --pipeline` and the review corrections call it, and the service runs the same
`Pipeline.answer` in its worker processes (workers.py). Nothing else chains the stages.

The last stage, writing the result, is the caller's `Finisher`: it runs where the records
are made, so each worker writes the JSON files of its share of a batch itself (the
service's main thread had spent ~40% of its time creating result files) and only the
finished records travel back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from digitwatch.classify import Classifier, Weights
from digitwatch.codec import Gray, Header, Hold, Limits, decode_with_header
from digitwatch.errors import InputError
from digitwatch.preprocess import to_mnist
from digitwatch.results import Record, Status, input_text


@dataclass(frozen=True)
class Input:
    """An input's name and bytes, or where to read them, or why they could not be read.

    With `path` (and no `data`), the file is read where it is answered, by `read_file`:
    the service sends claimed paths to its workers, not bytes. `size` (bytes, from a
    stat) only balances the work between workers.
    """

    name: str
    data: bytes | None = None
    error: str | None = None
    path: str | None = None
    size: int = 0


@dataclass(frozen=True)
class Result:
    record: Record
    image: Gray | None  # the 28x28 image the model saw, for --debug-dir


# Writes each result (it is handed the 28x28 images too) and returns the records as they
# are to be reported. With workers it runs in the worker that made them, so it must pickle
# (a module-level class instance); it is handed back the very inputs it was given.
Finisher = Callable[[Sequence[Input], list[Result]], list[Record]]

# Never follow a symlink, never block on a FIFO that replaced a claimed file.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def read_file(path: str, limit: int) -> tuple[bytes | None, str | None]:
    """The bytes of the regular file at `path`, or why they cannot be read."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        return None, f"cannot open file: {e.strerror or e}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > limit:
            return None, f"file is {st.st_size} bytes, over the limit"
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, max(st.st_size + 1 - total, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            return None, f"file grew past the {limit} byte limit"
        return b"".join(chunks), None
    except OSError as e:
        return None, f"cannot read file: {e.strerror or e}"
    finally:
        os.close(fd)


@dataclass
class _Work:
    """One file on its way through the stages: each fills its part and drops the last."""

    name: str
    data: bytes | None
    error: str | None
    sha256: str | None = None
    gray: Gray | None = None
    head: Header | None = None
    image: Gray | None = None  # 28x28, what the model sees
    seconds: float = 0.0


def _read(item: Input, limits: Limits) -> _Work:
    t0 = time.perf_counter()
    w = _Work(item.name, item.data, item.error)
    if item.data is None and item.error is None and item.path is not None:
        w.data, w.error = read_file(item.path, limits.max_bytes)
    if w.data is not None:
        w.sha256 = hashlib.sha256(w.data).hexdigest()
    w.seconds = time.perf_counter() - t0
    return w


def _decode(w: _Work, limits: Limits, hold: Hold) -> int:
    """Decode `w` in place; return the pixels it now holds."""
    if w.data is None:
        return 0
    t0 = time.perf_counter()
    try:
        # The header's size, not the array's: large JPEGs are decoded reduced.
        w.gray, w.head = decode_with_header(w.data, limits, hold)
    except Exception as e:  # one bad file must never stop a batch
        w.error = _reason(e)
    w.data = None
    w.seconds += time.perf_counter() - t0
    return 0 if w.gray is None else w.gray.size


def _preprocess(w: _Work) -> None:
    t0 = time.perf_counter()
    if w.gray is not None:
        try:
            w.image = to_mnist(w.gray)
        except Exception as e:  # one bad file must never stop a batch
            w.error = _reason(e)
        w.gray = None
    w.seconds += time.perf_counter() - t0


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"


# A batch is prepared one stage at a time over a run of files (read and hash them all,
# then decode them all, then preprocess them all), so each stage's code and tables stay
# in the CPU caches from one file to the next instead of being evicted by the other
# stages' (28x28 PNG, read to 28x28 image: 134 -> 103 us per file). A run ends after
# _RUN_BYTES read, and its decoding pauses for preprocessing after _RUN_PIXELS, so a
# run holds a few MB however large its files are.
_RUN_BYTES = 4 << 20
_RUN_PIXELS = 4 << 20


def _no_hold(nbytes: int) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


class Pipeline:
    """The stages for one model and one set of limits, run in the calling process."""

    def __init__(self, weights: Weights, *, limits: Limits, uncertain_below: float) -> None:
        self.classifier = Classifier(weights)
        self.model_id = weights.model_id
        self.limits = limits
        self.uncertain_below = uncertain_below
        # Set by workers.py: the decode budget all workers share, and a call after each
        # step of each file (read, decode, preprocess) for the service's watchdog.
        self.hold: Hold = _no_hold
        self.on_progress: Callable[[], object] | None = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __getstate__(self) -> None:
        raise TypeError("a Pipeline reaches its workers by fork, never by pickle")

    def run(self, items: Sequence[Input]) -> list[Result]:
        """Answer every input; errors become records, never exceptions."""
        return self.answer(items)

    def answer(
        self, items: Sequence[Input], finish: Finisher | None = None, *, keep_images: bool = True
    ) -> list[Result]:
        """Every stage for `items`, then `finish` (errors from it are raised)."""
        results = self.classify(self._prepare(items))
        return self.finish(items, results, finish, keep_images=keep_images)

    def crashed(self, item: Input, finish: Finisher | None) -> list[Result]:
        """The error record of a file whose decoder killed the worker that read it."""
        w = _read(item, self.limits)  # the record still carries its sha256
        w.data, w.error, w.seconds = None, "the decoder crashed on this file", 0.0
        return self.finish([item], self.classify([w]), finish, keep_images=False)

    def finish(
        self,
        items: Sequence[Input],
        results: list[Result],
        finish: Finisher | None,
        *,
        keep_images: bool,
    ) -> list[Result]:
        if finish is None and keep_images:
            return results
        records = [r.record for r in results] if finish is None else finish(items, results)
        return [
            Result(rec, r.image if keep_images else None)
            for rec, r in zip(records, results, strict=True)
        ]

    def _beat(self) -> None:
        if self.on_progress is not None:
            self.on_progress()

    def _prepare(self, items: Sequence[Input]) -> list[_Work]:
        """Read, decode and preprocess `items`, one stage at a time over each run."""
        out: list[_Work] = []
        i = 0
        while i < len(items):
            run: list[_Work] = []
            held = 0
            while i < len(items) and held < _RUN_BYTES:
                run.append(_read(items[i], self.limits))
                self._beat()
                held += len(run[-1].data or b"")
                i += 1
            j = 0
            while j < len(run):
                k, pixels = j, 0
                while k < len(run) and pixels < _RUN_PIXELS:
                    pixels += _decode(run[k], self.limits, self.hold)
                    self._beat()
                    k += 1
                for w in run[j:k]:
                    _preprocess(w)
                    self._beat()
                j = k
            out += run
        return out

    def classify(self, prepared: list[_Work]) -> list[Result]:
        """Classify the prepared images in one batch and make every record."""
        ready = [p for p in prepared if p.image is not None and p.error is None]
        t0 = time.perf_counter()
        probs = (
            self.classifier.probabilities(
                self.classifier.normalize(np.stack([p.image for p in ready]))  # type: ignore[misc]
            )
            if ready
            else np.zeros((0, 10), np.float32)
        )
        share = (time.perf_counter() - t0) * 1000 / max(1, len(ready))
        by_name = {id(p): i for i, p in enumerate(ready)}
        digits = probs.argmax(axis=1).tolist()  # the first highest
        # Six decimals for the whole batch at once, and Python floats at once (one by one,
        # round() and numpy scalars cost ~10 us per record). Bit-identical to round(v, 6):
        # a float32 times 1e6 is exact in float64, so rint sees the exact decimal value.
        rows = np.round(probs.astype(np.float64), 6).tolist()
        results = []
        for p in prepared:
            elapsed = round(p.seconds * 1000 + (share if id(p) in by_name else 0.0), 3)
            status: Status = "ok"
            digit = confidence = probabilities = None
            if p.error is not None:
                status = "error"
            elif p.image is None:
                status = "no_digit"
            else:
                i = by_name[id(p)]
                digit, probabilities = digits[i], rows[i]
                confidence = probabilities[digit]
            name, escaped = input_text(p.name)
            width, height = (p.head.width, p.head.height) if p.head is not None else (None, None)
            rec = Record(
                input=name,
                sha256=p.sha256,
                status=status,
                digit=digit,
                confidence=confidence,
                # no_digit is never a confident answer; an error is no answer at all
                uncertain=status == "no_digit"
                or (confidence is not None and confidence < self.uncertain_below),
                probabilities=probabilities,
                error=p.error,
                model=self.model_id,
                width=width,
                height=height,
                elapsed_ms=elapsed,
                input_escaped=escaped,
            )
            results.append(Result(rec, p.image))
        return results
