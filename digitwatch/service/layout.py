"""The service's folders inside the inbox, the names it gives claimed files, and `Claim`.

    inbox/x.png                                    dropped by a producer
    inbox/.digitwatch/work/<daemon>/<claim>~x.png  claimed (renamed) before it is read
    inbox/.digitwatch/work/<daemon>/.lock          flocked by that daemon for its life
    inbox/.digitwatch/processed/<claim>~x.png      answered (failed/ when status is error)

Every move is a rename inside the watched tree, on the inbox's filesystem: atomic, and
one inotify event (docs/design.md).
"""

from __future__ import annotations

import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog

from digitwatch.errors import FolderError
from digitwatch.pipeline import Input
from digitwatch.watch import STATE_DIR

log = structlog.get_logger()

NAME_MAX = 255  # bytes in one file name on Linux filesystems


@dataclass(frozen=True, kw_only=True)
class Claim(Input):
    """A file claimed into a work folder: `name` is its path relative to the inbox (the
    record's `input`), `path` where it is now."""

    claim_id: str
    detected_at: float  # wall clock

    @property
    def subdir(self) -> Path:
        """The inbox subfolder it came from (`.` for the inbox itself)."""
        return Path(self.name).parent

    @property
    def filename(self) -> str:
        return Path(self.name).name

    @property
    def stored_name(self) -> str:
        return f"{self.claim_id}~{self.filename}"


class Layout:
    """This daemon's work folder (locked for its life) and the shared archive folders."""

    def __init__(self, inbox: Path, *, delete_answered: bool) -> None:
        state = inbox / STATE_DIR
        self.state = state
        self.work_root = state / "work"
        self.archive_dirs = {"ok": state / "processed", "failed": state / "failed"}
        self.daemon_id = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.work = self.work_root / self.daemon_id
        self.claim_tag = self.daemon_id.rsplit("-", 1)[1]  # in every claim id of ours
        self.delete_answered = delete_answered
        self._lock_fd: int | None = None
        self._work_ino = -1  # gone or another when .digitwatch is removed or renamed
        self._dirs: set[Path] = set()  # folders known to exist

    def make(self) -> None:
        """Make the folders and our work folder, locked before any peer can see it."""
        try:
            self.work_root.mkdir(parents=True, exist_ok=True)
            for folder in self.archive_dirs.values():
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
        self._work_ino = self.work.stat().st_ino
        # Known to exist: never made again behind our back (a removed one is an error).
        self._dirs.update([self.work, *self.archive_dirs.values()])

    def release(self) -> None:
        """Unlock our work folder; whatever is still claimed stays for the next start."""
        if self._lock_fd is None:
            return
        try:
            if not any(p.name != ".lock" for p in self.work.iterdir()):
                (self.work / ".lock").unlink(missing_ok=True)
                self.work.rmdir()
        except OSError:
            pass  # the inbox itself is gone: the error that stopped us says so
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def check(self) -> None:
        """`.digitwatch` removed or renamed under us: claims would fail, exit instead.

        Our claimed files went with it (or are gone), so a new one made here would not
        recover them; a restart makes the folders anew and adopts what is there.
        """
        try:
            ino = self.work.stat().st_ino
        except OSError:
            ino = -1
        if ino != self._work_ino:
            raise FolderError(
                f"{self.state} was removed or renamed while running; "
                "exiting so that a restart makes it again"
            )

    def ensure_dir(self, folder: Path) -> None:
        if folder not in self._dirs:
            folder.mkdir(parents=True, exist_ok=True)
            self._dirs.add(folder)

    def forget_dir(self, folder: Path) -> None:
        """`folder` was removed under us: made again when next needed."""
        self._dirs.discard(folder)

    def archive(self, claim: Claim, status: str) -> None:
        """Move an answered claim to processed/ (failed/ for an error), or delete it."""
        assert claim.path is not None
        try:
            if self.delete_answered and status != "error":
                Path(claim.path).unlink()
                return
            folder = self.archive_dirs["failed" if status == "error" else "ok"] / claim.subdir
            self.ensure_dir(folder)
            Path(claim.path).rename(folder / claim.stored_name)
        except OSError as e:
            log.error("archive_failed", input=claim.name, claim=claim.claim_id, error=str(e))
