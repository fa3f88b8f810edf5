"""glibc malloc settings for a process that streams large messages and runs CPU models.

Uploads arrive as 2 MiB messages that live until they are hashed and staged. With
glibc's defaults the heap top is handed back to the kernel as soon as 128 KiB of it
is free and taken again for the next message: every byte then pays a page fault,
which doubled the server's CPU time per upload. A CPU model's activations are the
same story at a larger size: each block above the mmap threshold is mapped, faulted
in and unmapped on every run (resnet18 at batch 8: 6,400 faults and 19 ms of kernel
time per 200 ms run with a 16 MiB threshold, none with 32 MiB). Keeping up to
`TRIM_BYTES` of free heap, and serving blocks below `MMAP_BYTES` (the most glibc
allows) from it, makes the buffers reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

MMAP_BYTES = 32 << 20
TRIM_BYTES = 128 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_large_buffers() -> bool:
    """Applies the settings unless the environment sets malloc's own; False off glibc."""
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES)
    )
    log.debug("malloc: mmap threshold %d, trim threshold %d: %s", MMAP_BYTES, TRIM_BYTES, applied)
    return applied
