"""`digitwatch retry`: put inputs that got an error record back into the inbox.

A producer that pauses longer than `--quiet-period` (one the daemon cannot take a read
lease for: another user's) gets an error record for a half-written file, and then
finishes writing it where it now is, in `.digitwatch/failed/`. Moving it back answers it
again: a new claim, a new JSON and a new CSV row beside the old ones, which stay.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from digitwatch.errors import FolderError
from digitwatch.watch import STATE_DIR


@dataclass
class Retried:
    moved: list[str] = field(default_factory=list)  # input names, back in the inbox
    taken: list[str] = field(default_factory=list)  # left in failed/: the inbox has that name


def _failed(folder: Path) -> Iterator[tuple[str, Path]]:
    """(input name relative to the inbox, stored path) for every file in failed/."""
    for dirpath, _dirs, files in os.walk(folder):
        sub = os.path.relpath(dirpath, folder)
        for stored in sorted(files):
            claim, sep, name = stored.partition("~")
            if not sep or not name:
                continue  # not a name the daemon archives under
            yield (name if sub == "." else f"{sub}/{name}"), Path(dirpath) / stored


def retry_failed(inbox: Path, patterns: Sequence[str] = ()) -> Retried:
    """Move failed inputs (all, or those whose name matches a pattern) back into the inbox.

    Never overwrites: a file is linked under its name and then unlinked from failed/, so a
    name already in the inbox (the producer sent it again) leaves it where it was.
    """
    if not inbox.is_dir():
        raise FolderError(f"inbox {inbox} does not exist or is not a folder")
    out = Retried()
    for rel, stored in sorted(_failed(inbox / STATE_DIR / "failed")):
        if patterns and not any(
            fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(rel.rpartition("/")[2], p)
            for p in patterns
        ):
            continue
        target = inbox / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(stored, target)
        except FileExistsError:
            out.taken.append(rel)
            continue
        except OSError as e:
            raise FolderError(f"cannot move {stored} back to {target}: {e.strerror or e}") from None
        stored.unlink()
        out.moved.append(rel)
    return out
