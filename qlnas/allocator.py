"""Keep freed activation memory in the process, so CPU training does not page-fault it back.

glibc serves every allocation above 32 MiB (a stage-1 activation at batch 32 is exactly that)
with a fresh ``mmap`` and unmaps it on free, so each training step faults every page of those
tensors in again and the kernel zeroes them: about 10 ms per 32 MiB tensor on the 2-core CI
machine, a third of an Eq.(3) step's element-wise time. `keep_freed_memory` turns that off
(``mallopt``: no mmap for large blocks, no trimming of the heap), as jemalloc or tcmalloc would,
but without preloading a library. The price: the process keeps its peak heap until it exits.
``QLNAS_MALLOC=system`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_applied = False


def keep_freed_memory() -> bool:
    """Apply the setting once per process; True if it is in effect (glibc on Linux)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("QLNAS_MALLOC", "tuned") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20)))
    if not ok:
        log.warning("mallopt refused the allocator settings; keeping glibc's defaults")
    _applied = ok
    return ok
