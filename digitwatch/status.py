"""`digitwatch status`: what the service is doing, read from its folders alone.

Nothing here talks to a running daemon, so the same answer comes while the service
runs, after a crash, and with several daemons on one inbox: files waiting in the
inbox, files claimed in each daemon's work folder (and whether that daemon still holds
its lock), and the answers counted from results.csv through its summary
(`digitwatch.summary`).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from digitwatch import summary
from digitwatch.errors import FolderError
from digitwatch.watch import STATE_DIR, Ignore, ignored_name, scan

CSV_NAME = "results.csv"
TOP_ERRORS = 10


@dataclass(frozen=True)
class WorkFolder:
    daemon: str
    alive: bool  # its daemon holds the lock; a dead one's files are adopted at the next rescan
    in_flight: int


@dataclass
class Status:
    inbox: str
    outbox: str
    waiting: int
    oldest_waiting_s: float | None
    in_flight: int
    daemons: list[WorkFolder]
    answered: dict[str, int]
    answered_last_hour: dict[str, int]
    uncertain: int
    errors: dict[str, int]  # the most frequent error reasons, with their counts
    failed_files: int  # inputs kept in .digitwatch/failed/
    last_answer_at: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def _alive(lock: Path) -> bool:
    """True while some process holds the flock on a work folder's `.lock`."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # a crash before the lock existed
    except OSError:
        return True  # not ours to probe (another user's): assume it lives
    try:
        # A shared lock is refused while the daemon holds its exclusive one, and never
        # blocks a daemon for longer than this call.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _count_files(root: Path) -> int:
    n = 0
    for _dirpath, _dirs, files in os.walk(root):
        n += sum(1 for f in files if f != ".lock" and "~" in f)
    return n


def _work_folders(inbox: Path) -> list[WorkFolder]:
    work = inbox / STATE_DIR / "work"
    try:
        entries = sorted(work.iterdir())
    except OSError:
        return []
    out = []
    for folder in entries:
        if folder.is_dir() and not folder.name.startswith("."):
            alive = _alive(folder / ".lock")
            out.append(WorkFolder(folder.name, alive, _count_files(folder)))
    return out


def _waiting(inbox: Path, recursive: bool, ignore: Ignore) -> tuple[int, float | None]:
    now = time.time()
    n, oldest = 0, None
    for path in scan(inbox, recursive=recursive, ignore=ignore):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            n += 1
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
    return n, None if oldest is None else round(max(0.0, now - oldest), 1)


def _answers(outbox: Path) -> summary.Summary:
    try:
        fd = os.open(outbox / CSV_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return summary.Summary()
    try:
        return summary.current(outbox, fd)
    finally:
        os.close(fd)


def collect(
    inbox: Path, outbox: Path, *, recursive: bool = False, ignore: Ignore = ignored_name
) -> Status:
    """Read the state of the inbox, the work folders and the outbox; FolderError if absent."""
    for role, folder in (("inbox", inbox), ("outbox", outbox)):
        if not folder.is_dir():
            raise FolderError(f"{role} {folder} does not exist or is not a folder")
    now = time.time()
    waiting, oldest = _waiting(inbox, recursive, ignore)
    daemons = _work_folders(inbox)
    s = _answers(outbox)
    hour_ago = dt.datetime.fromtimestamp(now - 3600, dt.UTC)
    top = sorted(s.errors.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ERRORS]
    return Status(
        inbox=str(inbox),
        outbox=str(outbox),
        waiting=waiting,
        oldest_waiting_s=oldest,
        in_flight=sum(d.in_flight for d in daemons),
        daemons=daemons,
        answered={k: s.counts.get(k, 0) for k in summary.STATUSES},
        answered_last_hour=s.since(hour_ago),
        uncertain=s.uncertain,
        errors=dict(top),
        failed_files=_count_files(inbox / STATE_DIR / "failed"),
        last_answer_at=s.last_answer_at,
    )


def render(st: Status) -> str:
    """The short block `digitwatch status` prints."""
    a, h = st.answered, st.answered_last_hour
    oldest = "" if st.oldest_waiting_s is None else f" (oldest {st.oldest_waiting_s:.0f} s)"
    lines = [
        f"inbox      {st.inbox}",
        f"outbox     {st.outbox}",
        f"waiting    {st.waiting}{oldest}",
        f"in flight  {st.in_flight}",
    ]
    for d in st.daemons:
        state = "alive" if d.alive else "dead: its files are adopted at the next rescan"
        lines.append(f"  daemon {d.daemon}: {d.in_flight} claimed, {state}")
    lines += [
        f"answered   {a['ok']} ok, {a['no_digit']} no digit, {a['error']} errors"
        f" ({st.uncertain} uncertain)",
        f"last hour  {h['ok']} ok, {h['no_digit']} no digit, {h['error']} errors",
        f"last answer {st.last_answer_at or '-'}",
        f"failed     {st.failed_files} files kept in {STATE_DIR}/failed",
    ]
    lines += [f"  {n:>6}  {reason}" for reason, n in st.errors.items()]
    return "\n".join(lines) + "\n"
