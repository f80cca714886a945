"""The worker's heap and the kernel: freed prompt cache states must leave the process.

glibc serves a large allocation with mmap, unmapped at free, but only up to its dynamic
threshold, which rises to 32 MiB after the first large free; from then on states of a few
MiB come from the heap, and freeing them leaves the pages in the process (RSS stays up,
and memory pressure is not relieved by emptying the cache). So the threshold is fixed
at 1 MiB, and after a shrink malloc_trim hands free heap pages back too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20


@cache
def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def large_allocations_mapped() -> bool:
    """Serve every allocation of MMAP_THRESHOLD or more with its own mapping; False
    without glibc."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def give_back() -> bool:
    """Return free heap pages to the kernel (after the cache let states go)."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))
