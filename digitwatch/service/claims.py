"""Claiming ready files, the batches in the workers, and the hold after a failed write."""

from __future__ import annotations

import collections
import itertools
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from digitwatch.pipeline import Result
from digitwatch.results import Record, input_text
from digitwatch.service.layout import NAME_MAX, Claim, Layout

log = structlog.get_logger()

# A full, read-only or vanished outbox: the batch's files stay claimed and are answered
# again after a pause that doubles from _RETRY_MIN to _RETRY_MAX seconds; meanwhile no
# new file is claimed, and the failure is logged at most once per _HOLD_LOG_EVERY.
_RETRY_MIN = 0.5
_RETRY_MAX = 30.0
_HOLD_LOG_EVERY = 60.0


class Claimer:
    """Renames ready files into our work folder, each under a new claim id."""

    def __init__(self, layout: Layout, relative: Callable[[str], str | None]) -> None:
        self.layout = layout
        self.relative = relative  # a watched path -> its name relative to the inbox
        self._counter = itertools.count()
        self._skipped: dict[str, int] = {}  # paths already logged as skipped, by inode

    def claim(self, path: str, detected: float) -> Claim | None:
        """Rename the file into our work folder; None if it is gone or not a regular file."""
        rel = self.relative(path)
        if rel is None:
            return None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("skipped", input=input_text(rel)[0], reason=e.strerror)
            return None
        claim_id = f"{time.time_ns():x}-{self.layout.claim_tag}{next(self._counter):x}"
        name = Path(rel).name
        reason = None
        if not stat.S_ISREG(st.st_mode):
            reason = "not a regular file; left in place"
        elif len(os.fsencode(name)) + len(claim_id) + 1 > NAME_MAX:
            # Its claimed name `<claim>~<name>` would not fit. (A result name that does not
            # fit, `<name>.<claim>.json`, is written as `<claim>.json`: see WriteJson.)
            reason = (
                f"name too long: over {NAME_MAX - len(claim_id) - 1} bytes, its claimed"
                " name would not fit; left in place"
            )
        if reason is not None:
            if self._skipped.get(path) != st.st_ino:
                self._skipped[path] = st.st_ino
                log.warning("skipped", input=input_text(rel)[0], reason=reason)
            return None
        folder = self.layout.work / Path(rel).parent
        self.layout.ensure_dir(folder)
        target = folder / f"{claim_id}~{name}"
        try:
            Path(path).rename(target)
        except FileNotFoundError:
            if not os.path.lexists(path):
                return None  # a peer claimed it first
            # The file is there, so the target folder is not: ours, or a subfolder of it.
            self.layout.check()
            self.layout.forget_dir(folder)  # a subfolder of it was removed
            return None
        except OSError as e:
            log.warning("skipped", input=input_text(rel)[0], reason=f"cannot claim: {e.strerror}")
            return None
        return Claim(
            name=rel, path=str(target), size=st.st_size, claim_id=claim_id, detected_at=detected
        )

    def claim_batch(self, ready: dict[str, float], size: int) -> list[Claim]:
        """Claim up to `size` of the `ready` paths (path -> detected_at), oldest first."""
        claims: list[Claim] = []
        while ready and len(claims) < size:
            path = next(iter(ready))
            claim = self.claim(path, ready.pop(path))
            if claim is not None:
                claims.append(claim)
        return claims


@dataclass
class Batch:
    """Claims answered together: in the workers, then committed, then settled."""

    claims: list[Claim]
    results: Callable[[], list[Result]]  # waits for the workers
    started: float  # perf_counter
    done: threading.Event  # set when results() no longer waits
    submitted: float  # time.monotonic(), for the watchdog's progress check
    records: list[Record] = field(default_factory=list)  # once its CSV rows are written
    wait_ms: float = 0.0  # how long the main thread waited for the workers


class InFlight:
    """The claims this daemon holds: batches in the workers, and claims waiting a turn."""

    def __init__(self) -> None:
        self.batches: collections.deque[Batch] = collections.deque()  # in claim order
        self.backlog: list[Claim] = []  # claimed, not yet in a batch: answered first

    def files(self) -> int:
        return sum(len(b.claims) for b in self.batches) + len(self.backlog)

    def queued_ids(self) -> set[str]:
        return {c.claim_id for c in self.backlog}

    def detected(self) -> list[float]:
        """When each waiting claim (and each batch's oldest) was detected."""
        return [c.detected_at for c in self.backlog] + [
            b.claims[0].detected_at for b in self.batches if b.claims
        ]

    def startable(self, claims: list[Claim]) -> list[Claim]:
        """The claims that may start now; the others wait in the backlog.

        An input name waits while a file of the same name is being answered, so the
        workers never stamp one name twice in the same microsecond (see outbox._stamp).
        """
        names = {c.name for b in self.batches for c in b.claims}
        now: list[Claim] = []
        later: list[Claim] = []
        for c in claims:
            (later if c.name in names else now).append(c)
            names.add(c.name)
        self.backlog[:0] = later  # claimed already: answered by the next batches
        return now

    def next_from_backlog(self, size: int) -> list[Claim]:
        batch, self.backlog = self.backlog[:size], self.backlog[size:]
        return batch


class Hold:
    """Writing results failed (a full disk): claim nothing new until a retry commits."""

    def __init__(self) -> None:
        self.since: float | None = None  # when writing results first failed
        self.retry_at = 0.0
        self.backoff = 0.0
        self._next_log = 0.0

    @property
    def held(self) -> bool:
        return self.since is not None

    def failed(self, outbox: str, error: OSError, files_waiting: int) -> None:
        now = time.monotonic()
        self.backoff = min(_RETRY_MAX, self.backoff * 2 or _RETRY_MIN)
        self.retry_at = now + self.backoff
        if self.since is None:
            self.since = now
        if now >= self._next_log:
            log.error(
                "outbox_unwritable",
                outbox=outbox,
                error=error.strerror or str(error),
                files_waiting=files_waiting,
                retry_in_s=self.backoff,
            )
            self._next_log = now + _HOLD_LOG_EVERY

    def succeeded(self, outbox: str) -> None:
        if self.since is not None:
            log.warning(
                "outbox_writable", outbox=outbox, after_s=round(time.monotonic() - self.since, 1)
            )
            self.since, self.backoff, self._next_log = None, 0.0, 0.0
