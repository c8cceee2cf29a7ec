"""The real `digitwatch run` with one commit step made to fail once: a fault-injection seam.

    python tests/faulty_run.py STEP MARKER -- <python> -m digitwatch run ...

STEP is json (a result file's write), worker (a worker dies right after publishing one
result), csv (the rows' append, cut half-way), sync or archive (an input's move to
processed/), or smb-names (an outbox that refuses every name with ':' or '?', as an
SMB share does: not once, always). "Once" is across the daemon and its forked
workers: the first to create MARKER fails. Nothing in the package reads a variable or a
flag for this; the fault is put in from outside, as a broken disk would.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any


def _first(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


def _inject(step: str, marker: str) -> None:
    import digitwatch.service.outbox as daemon

    if step == "json":
        real_json = daemon.write_json_atomic

        def write_json(path: Any, text: str, **kw: Any) -> None:
            if _first(marker):
                raise OSError(errno.EIO, "injected: JSON write failed", str(path))
            real_json(path, text, **kw)

        daemon.write_json_atomic = write_json  # type: ignore[assignment]
    elif step == "worker":
        real_json = daemon.write_json_atomic
        parent = os.getpid()

        def publish_then_die(path: Any, text: str, **kw: Any) -> None:
            real_json(path, text, **kw)
            if os.getpid() != parent and _first(marker):
                os._exit(70)  # a worker killed between two of its batch's JSON writes

        daemon.write_json_atomic = publish_then_die  # type: ignore[assignment]
    elif step == "csv":
        real_write = os.write

        def write(fd: int, data: Any) -> int:
            try:
                target = str(Path(f"/proc/self/fd/{fd}").readlink())
            except OSError:
                target = ""
            if target.endswith("/results.csv") and len(data) > 1 and _first(marker):
                real_write(fd, bytes(data[: len(data) // 2]))  # a torn half, then the error
                raise OSError(errno.ENOSPC, "injected: no space left mid-append")
            return real_write(fd, data)

        os.write = write
    elif step == "sync":
        real_sync = daemon.Results.sync

        def sync(self: Any, *folders: Any) -> None:
            if _first(marker):
                raise OSError(errno.EIO, "injected: sync failed")
            real_sync(self, *folders)

        daemon.Results.sync = sync  # type: ignore[method-assign]
    elif step == "archive":
        real_rename = os.rename

        def rename(src: Any, dst: Any, **kw: Any) -> None:
            if "/.digitwatch/processed/" in os.fsdecode(dst) and _first(marker):
                raise OSError(errno.EIO, "injected: archive failed", os.fsdecode(dst))
            real_rename(src, dst, **kw)

        os.rename = rename
    elif step == "smb-names":
        # Not once: an outbox on an SMB share refuses every name with ':' or '?' in it.
        real_replace = os.replace

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            if any(c in os.fsdecode(dst).rpartition("/")[2] for c in ":?"):
                raise OSError(errno.EINVAL, "Invalid argument", os.fsdecode(dst))
            real_replace(src, dst, **kw)

        os.replace = replace
    else:
        raise SystemExit(f"unknown step {step}")


if __name__ == "__main__":
    step, marker, sep, *command = sys.argv[1:]
    assert sep == "--" and command[1:3] == ["-m", "digitwatch"], sys.argv
    _inject(step, marker)
    from digitwatch.cli import main

    sys.argv = ["digitwatch", *command[3:]]
    main()
