"""Recovery: adopt dead peers' work folders, and finish every claim found in ours.

A claim still in a work folder has either no JSON (it is answered again: the JSON name
is fixed by the claim id) or a JSON whose CSV row may be missing (the row is appended,
unless present). Each daemon flocks `work/<daemon>/.lock` for its life; a work folder
whose lock can be taken belonged to a dead daemon and is adopted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

import structlog

from digitwatch.results import Record
from digitwatch.service.layout import Claim, Layout
from digitwatch.service.outbox import Results, published

log = structlog.get_logger()

_NEW_DIR_GRACE = 60.0  # seconds a half-made work folder (.new-*) is left to its maker


def recover(
    layout: Layout, results: Results, sync: tuple[Path, ...], queued: set[str]
) -> list[Claim]:
    """Adopt dead peers' claims, commit those already answered; return the rest to answer.

    `queued` are claim ids of ours already waiting for a batch: left alone. `sync` are the
    folders synced before an answered claim is archived.
    """
    adopted = 0
    for peer in list(layout.work_root.iterdir()):
        if peer == layout.work or not peer.is_dir():
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
            adopted += _move_claims(layout, peer)
            (peer / ".lock").unlink(missing_ok=True)
            _remove_empty_tree(peer)
        finally:
            if fd >= 0:
                os.close(fd)
    if adopted:
        log.info("recovered", files=adopted)
    return _finish(layout, results, sync, queued)


def _move_claims(layout: Layout, peer: Path) -> int:
    moved = 0
    for dirpath, _dirs, files in os.walk(peer):
        folder = Path(dirpath)
        for name in files:
            if name == ".lock" or "~" not in name:
                continue
            target = layout.work / folder.relative_to(peer) / name
            layout.ensure_dir(target.parent)
            try:
                (folder / name).rename(target)
                moved += 1
            except FileNotFoundError:
                continue  # another daemon adopted it first
    return moved


def _finish(
    layout: Layout, results: Results, sync: tuple[Path, ...], queued: set[str]
) -> list[Claim]:
    """Claims in our work folder: archive those already answered, return the rest."""
    answered: list[tuple[Claim, Record]] = []
    unanswered: list[Claim] = []
    for dirpath, _dirs, files in os.walk(layout.work):
        folder = Path(dirpath)
        for name in files:
            if name == ".lock" or "~" not in name:
                continue
            claim_id, base = name.split("~", 1)
            if claim_id in queued:
                continue  # ours, held: its next attempt keeps any JSON it published
            rel = str(folder.relative_to(layout.work) / base)
            claim = Claim(
                name=rel, path=str(folder / name), claim_id=claim_id, detected_at=time.time()
            )
            record = published(results.json_path(claim)) or published(
                results.fallback_json_path(claim)
            )
            if record is None:
                unanswered.append(claim)
                continue
            answered.append((claim, record))
    if not answered:
        return unanswered
    try:
        added = results.append_csv([r for _, r in answered], unless_present=True)
        results.sync(*sync)
    except OSError as e:
        # A full outbox: they stay claimed, and the next rescan tries again.
        log.warning("recovery_deferred", files=len(answered), error=e.strerror or str(e))
        return unanswered
    for claim, record in answered:
        layout.archive(claim, record.status)
    log.info("recovered_answers", files=len(answered), csv_rows_added=added)
    return unanswered


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _remove_empty_tree(root: Path) -> None:
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            Path(dirpath).rmdir()
