"""`digitwatch run`: claim ready files, answer them in batches, exactly once."""

from __future__ import annotations

from digitwatch.settings import Settings


def serve(settings: Settings, *, check_only: bool = False) -> int:
    raise NotImplementedError
