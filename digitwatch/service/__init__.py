"""`digitwatch run`: claim ready files, answer them in batches, exactly once.

Where each part lives (docs/design.md has the protocol and why it is safe):

- layout.py: the folders inside the inbox, claim names, `Claim`;
- claims.py: claiming files, the batches in the workers, the hold after a failed write;
- outbox.py: each result's JSON, results.csv under flock with its repair, the sync;
- recovery.py: dead peers' work folders, claims answered but not committed;
- settle.py: the thread that syncs, archives and logs committed batches;
- loop.py: the main loop (signals, watchdog pings, status, rescans, when to batch).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from digitwatch.classify import load_weights
from digitwatch.codec import Limits
from digitwatch.errors import FolderError
from digitwatch.metrics import Exporter, Metrics
from digitwatch.pipeline import Pipeline
from digitwatch.sdnotify import Notifier
from digitwatch.service.loop import Daemon
from digitwatch.settings import Settings
from digitwatch.watch import check_watchable
from digitwatch.workers import Workers

__all__ = ["Daemon", "check_folders", "serve"]


def check_folders(settings: Settings) -> tuple[Path, Path]:
    """Resolve and validate inbox and outbox, or raise FolderError with one line."""
    inbox, outbox = settings.inbox.resolve(), settings.outbox.resolve()
    for role, folder in (("inbox", inbox), ("outbox", outbox)):
        if not folder.is_dir():
            raise FolderError(f"{role} {folder} does not exist or is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FolderError(f"{role} {folder} is not writable")
    if outbox == inbox or outbox.is_relative_to(inbox):
        raise FolderError(f"outbox {outbox} is the inbox or inside it: results would be read back")
    queue_dir = settings.review_path.resolve()
    if settings.review and queue_dir.is_relative_to(inbox):
        raise FolderError(f"review folder {queue_dir} is inside the inbox: it would be read back")
    if settings.recursive and inbox.is_relative_to(outbox):
        raise FolderError(
            f"inbox {inbox} is inside outbox {outbox}: --recursive would mirror results into it"
        )
    return inbox, outbox


def serve(settings: Settings, *, check_only: bool = False) -> int:
    """Validate, then (unless `check_only`) run the service until SIGTERM/SIGINT."""
    inbox, outbox = check_folders(settings)
    weights = load_weights(settings.weights)
    if check_only:
        check_watchable(inbox, poll=settings.poll)
        print(f"digitwatch: ok: inbox {inbox}, outbox {outbox}, model {weights.model_id}")
        return 0
    # Everything loaded so far lives as long as the process: keep the collector from
    # walking it again on every full collection, and keep the pages shared by the
    # forked workers from being written by it (reference counts aside).
    gc.freeze()
    pipeline = Pipeline(
        weights,
        limits=Limits(settings.max_pixels, settings.max_file_bytes, settings.max_decode_bytes),
        uncertain_below=settings.uncertain_below,
    )
    # Forked here, before any thread starts, sharing the weights' pages.
    workers = Workers(pipeline, settings.workers)
    metrics = Metrics(model=weights.model_id, workers=settings.workers)
    exporter = Exporter(
        metrics,
        path=Path(settings.metrics_file) if settings.metrics_file else None,
        port=settings.metrics_port or None,
    )
    exporter.start()
    try:
        with workers:
            daemon = Daemon(
                settings, inbox, outbox, workers, Notifier.from_environ(), metrics=metrics
            )
            return daemon.run(restore_signals=False)
    finally:
        exporter.stop()  # after the last commit, so the file ends with the final counts
