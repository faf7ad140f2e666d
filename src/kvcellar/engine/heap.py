"""Return the heap a finished request freed to the OS (glibc), so idle RSS is what is in use.

Why: a request's temporaries (activations, attention workspaces) are freed
into glibc's arenas, which keep part of them, so RSS before the next request
stood above what was in use (`kvcellar bench prefix-cache`, docs/benchmarks.md).
The engine trims after each CPU request, after its last
token and before its result is handed over (so whoever reads RSS after the
result sees it trimmed); the time is in neither its TTFT nor the next one's.

Operation: `trim_heap() -> bool` (False where the C library has no malloc_trim).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # 0: keep no padding at the top of the heap
    return True
