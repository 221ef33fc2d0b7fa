"""Host memory for long runs: how glibc's malloc serves the tensors a forward pass allocates and frees."""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h) and the values keep_host_memory sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (half its 64 MB heap size)
TRIM_THRESHOLD = 1 << 30


def keep_host_memory() -> bool:
    """Have glibc's malloc serve blocks up to 32 MB from its heap and keep freed memory for reuse, instead of
    mapping each large tensor fresh and unmapping it when freed. Every forward pass allocates and frees tens of
    MB of activations, and every decoded batch its pixels; with glibc's defaults a fresh mapping is zero-filled
    page by page on first touch. ``lowshot extract`` on 960 photos (ViT-S/16, 2 cores): 708,717 page faults and
    2.8 s of kernel time with the defaults, 200,175 and 1.25 s with these (benchmarks/extract_speed.py measures
    the whole process with them). The cost: memory freed after the peak stays with the process. The CLI calls this
    at start (``LOWSHOT_MALLOC=default`` keeps glibc's defaults); library users may. Returns whether it applied
    (glibc on Linux only)."""
    if sys.platform != "linux" or os.environ.get("LOWSHOT_MALLOC", "") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no-op mallopt; others none)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the order matters: a fixed mmap threshold first (it also stops glibc's own adjustment of both thresholds)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
