"""The one pipeline: decode -> preprocess -> classify -> result record.

`digitwatch predict`, `digitwatch run` and `digitwatch evaluate --pipeline` all call
`Pipeline.run`; nothing else chains the stages.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitwatch.classify import Classifier, Weights
from digitwatch.codec import Gray, Limits, decode
from digitwatch.errors import InputError
from digitwatch.preprocess import to_mnist
from digitwatch.results import Record


@dataclass(frozen=True)
class Input:
    """An input's name and bytes, or the reason its bytes could not be read."""

    name: str
    data: bytes | None
    error: str | None = None


@dataclass(frozen=True)
class Result:
    record: Record
    image: Gray | None  # the 28x28 image the model saw, for --debug-dir


@dataclass(frozen=True)
class _Prepared:
    name: str
    sha256: str | None
    width: int | None
    height: int | None
    image: Gray | None
    error: str | None
    ms: float


def read_input(path: Path, limits: Limits) -> Input:
    """Read a file's bytes for the pipeline, refusing oversized files before reading them."""
    try:
        with path.open("rb") as f:
            size = Path(f.name).stat().st_size
            if size > limits.max_bytes:
                return Input(path.name, None, f"file is {size} bytes, over the limit")
            return Input(path.name, f.read(limits.max_bytes + 1))
    except OSError as e:
        return Input(path.name, None, f"cannot read file: {e.strerror or e}")


class Pipeline:
    def __init__(
        self,
        weights: Weights,
        *,
        limits: Limits,
        uncertain_below: float,
        workers: int = 1,
    ) -> None:
        self.classifier = Classifier(weights)
        self.model_id = weights.model_id
        self.limits = limits
        self.uncertain_below = uncertain_below
        self._pool = ThreadPoolExecutor(workers, "digitwatch-prep") if workers > 1 else None
        self._workers = workers

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self, item: Input) -> _Prepared:
        t0 = time.perf_counter()
        sha = hashlib.sha256(item.data).hexdigest() if item.data is not None else None
        width = height = None
        image = None
        error = item.error
        if item.data is not None:
            try:
                gray = decode(item.data, self.limits)
                height, width = gray.shape
                image = to_mnist(gray)
            except InputError as e:
                error = str(e)
            except Exception as e:  # one bad file must never stop a batch
                error = f"{type(e).__name__}: {e}"
        return _Prepared(
            item.name, sha, width, height, image, error, (time.perf_counter() - t0) * 1000
        )

    def _prepare_chunk(self, items: Sequence[Input]) -> list[_Prepared]:
        return [self._prepare(i) for i in items]

    def prepare_all(self, items: Sequence[Input]) -> list[_Prepared]:
        if self._pool is None or len(items) < 2:
            return self._prepare_chunk(items)
        # One chunk per worker: cv2 releases the GIL, and a task per chunk keeps the
        # executor's overhead off small images.
        n = min(self._workers, len(items))
        chunks = [items[i::n] for i in range(n)]
        done = list(self._pool.map(self._prepare_chunk, chunks))
        out: list[_Prepared] = [None] * len(items)  # type: ignore[list-item]
        for i, chunk in enumerate(done):
            out[i::n] = chunk
        return out

    def run(self, items: Sequence[Input]) -> list[Result]:
        """Answer every input; errors become records, never exceptions."""
        prepared = self.prepare_all(items)
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
        results = []
        for p in prepared:
            elapsed = round(p.ms + (share if id(p) in by_name else 0.0), 3)
            common = dict(
                input=p.name,
                sha256=p.sha256,
                model=self.model_id,
                width=p.width,
                height=p.height,
                elapsed_ms=elapsed,
            )
            if p.error is not None:
                rec = Record(
                    status="error",
                    digit=None,
                    confidence=None,
                    uncertain=False,
                    probabilities=None,
                    error=p.error,
                    **common,  # type: ignore[arg-type]
                )
            elif p.image is None:
                rec = Record(
                    status="no_digit",
                    digit=None,
                    confidence=None,
                    uncertain=True,
                    probabilities=None,
                    error=None,
                    **common,  # type: ignore[arg-type]
                )
            else:
                row = probs[by_name[id(p)]]
                digit = int(row.argmax())
                confidence = round(float(row[digit]), 6)
                rec = Record(
                    status="ok",
                    digit=digit,
                    confidence=confidence,
                    uncertain=confidence < self.uncertain_below,
                    probabilities=[round(float(v), 6) for v in row],
                    error=None,
                    **common,  # type: ignore[arg-type]
                )
            results.append(Result(rec, p.image))
        return results
