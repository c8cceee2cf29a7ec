"""Which paths can be input, from their names alone, and the scan that lists them."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from digitwatch.results import CSV_NAME

STATE_DIR = ".digitwatch"  # the service's own area inside the inbox; hidden, so never input

# The outbox's own names at its top level: an inbox subfolder of one of these names
# (--recursive) would be mirrored onto results.csv, so its files are never inputs.
# The review queue's default home is outbox/review/ (settings.review_path).
RESERVED_FOLDERS = frozenset({CSV_NAME, "review"})

# Names that are never input, in any folder (case-insensitive globs): hidden names
# (.DS_Store, ._resource forks, .syncthing.*.tmp, our .digitwatch), Office lock files,
# partial downloads and sync-tool temporaries, and desktop litter. A file whose name
# matches waits until it is renamed to a name that does not; a folder that matches is not
# entered. `--ignore GLOB` adds to these.
DEFAULT_IGNORE = (
    ".*",
    "~$*",
    "~syncthing~*",
    "*.part",
    "*.partial",
    "*.tmp",
    "*.crdownload",
    "@eaDir",
    "thumbs.db",
    "desktop.ini",
)


class Ignore:
    """Whether a file or folder name is never input: DEFAULT_IGNORE plus `extra` globs."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.patterns = DEFAULT_IGNORE + tuple(extra)
        regex = "|".join(fnmatch.translate(p.lower()) for p in self.patterns)
        self._match = re.compile(regex, re.DOTALL).match

    def __call__(self, name: str) -> bool:
        return self._match(name.lower()) is not None


ignored_name = Ignore()


class Filter:
    """Decide from a path string alone (no syscalls) whether it may be an input."""

    def __init__(self, root: Path, recursive: bool, ignore: Ignore = ignored_name) -> None:
        self.prefix = str(root) + "/"
        self.recursive = recursive
        self.ignore = ignore

    def relative(self, path: str) -> str | None:
        if not path.startswith(self.prefix):
            return None
        rel = path[len(self.prefix) :]
        if "/" in rel:
            if not self.recursive:
                return None
            parts = rel.split("/")
            if parts[0] in RESERVED_FOLDERS or any(self.ignore(p) for p in parts):
                return None
            return rel
        return None if self.ignore(rel) else rel


def reserved_folder(path: str, root: str) -> bool:
    """Whether `path` is one of the inbox's reserved top-level folders (RESERVED_FOLDERS)."""
    folder, _, name = path.rpartition("/")
    return name in RESERVED_FOLDERS and folder == root


def scan(
    root: Path, *, recursive: bool, inbox: bool = True, ignore: Ignore = ignored_name
) -> Iterator[str]:
    """Every candidate path now in the inbox (non-directories; the daemon lstats them).

    `inbox`: `root` is the inbox itself, not a folder below it, so its reserved folder
    names (RESERVED_FOLDERS) are skipped.
    """
    stack = [str(root)]
    inbox_root = str(root) if inbox else None
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            if ignore(entry.name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                reserved = inbox_root is not None and reserved_folder(entry.path, inbox_root)
                if recursive and not reserved:
                    stack.append(entry.path)
            else:
                yield entry.path
