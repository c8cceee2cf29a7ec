"""Every libc call digitwatch makes, in one place (inotify is watchdog's, in digitwatch/watch/).

Each is best effort: where the call is missing (another libc, another OS) it does
nothing and says so by its return value, and the caller falls back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _syncfs_fn() -> Any:
    fn = getattr(_LIBC, "syncfs", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int]
    return fn


_SYNCFS = _syncfs_fn()


def syncfs(fd: int) -> None:
    """Flush the filesystem that holds `fd`; a whole `sync()` where syncfs is missing."""
    if _SYNCFS is None or _SYNCFS(fd) != 0:
        os.sync()


def die_with_parent() -> None:
    """This process is SIGKILLed when its parent dies, however the parent dies."""
    with contextlib.suppress(AttributeError):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def keep_freed_memory(nbytes: int) -> None:
    """glibc keeps freed blocks up to `nbytes` for reuse instead of returning them at once."""
    with contextlib.suppress(AttributeError):
        _LIBC.mallopt(_M_TRIM_THRESHOLD, nbytes)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes)


def single_threaded_blas() -> bool:
    """Pin the OpenBLAS that numpy ships to one thread (numpy's own matrix products).

    True if it worked. Measured here (2 cores): a (64, 784) @ (784, 128) float32 product
    takes ~0.2 ms on one thread and ~30 ms with OpenBLAS's default two, which wake and
    park per call. The batches are tiny, and decoding already uses the other core.
    """
    import numpy as np

    for lib in sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("*openblas*")):
        try:
            handle = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for name in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            fn = getattr(handle, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn(1)
                return True
    return False
