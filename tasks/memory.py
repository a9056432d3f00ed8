"""Freed memory handed back to the OS after a stage, so the next stage's peak does not stand on the last one's.

Arrow's default pool (mimalloc) and glibc's malloc both keep freed memory for reuse: after the fetch of 100,000
traces the flow process held ~400 MB it no longer used, and each evaluation worker ~100-200 MB after its batch,
all of it counted in the process tree's resident memory while the later stages ran.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Return the unused memory of Arrow's pool and of malloc's heap to the OS (a few milliseconds)."""
    pa.default_memory_pool().release_unused()
    if _TRIM is not None:
        _TRIM(0)
