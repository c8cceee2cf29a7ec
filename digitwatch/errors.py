"""Exit codes and the exceptions that carry them, so expected failures print one line."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented process exit codes (README: Exit codes)."""

    OK = 0
    INTERNAL = 1  # a bug: traceback printed
    USAGE = 2  # bad command line (typer/click)
    CONFIG = 3  # bad option value or configuration file
    FOLDER = 4  # inbox/outbox missing, not writable, or outbox inside inbox
    WEIGHTS = 5  # weights missing, tampered, or not matching their metadata
    DATA = 6  # MNIST absent and not downloadable
    INPUT_FAILED = 7  # predict: at least one input got an error record
    WATCHER_DIED = 8  # run: the filesystem observer stopped; systemd should restart us
    WATCH_LIMIT = 9  # run: the inbox cannot be watched (inotify limits); raise them or --poll
    OUTPUT = 10  # predict: the results could not be written (closed stdout, full disk)
    MISSING_EXTRA = 11  # train/evaluate without the `train` extra (torch, torchvision)
    REVIEW = 12  # review: no such item in the queue, or decided already


class DigitwatchError(Exception):
    """An expected failure: one line for the user and its exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(DigitwatchError):
    exit_code = ExitCode.CONFIG


class FolderError(DigitwatchError):
    exit_code = ExitCode.FOLDER


class WeightsError(DigitwatchError):
    exit_code = ExitCode.WEIGHTS


class DataError(DigitwatchError):
    exit_code = ExitCode.DATA


class MissingExtra(DigitwatchError):
    exit_code = ExitCode.MISSING_EXTRA


class WatcherDied(DigitwatchError):
    exit_code = ExitCode.WATCHER_DIED


class WatchLimit(DigitwatchError):
    exit_code = ExitCode.WATCH_LIMIT


class OutputError(DigitwatchError):
    exit_code = ExitCode.OUTPUT


class InputError(DigitwatchError):
    """One input cannot be read; becomes an error record, never stops a batch."""

    exit_code = ExitCode.INPUT_FAILED
