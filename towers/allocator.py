"""Keep freed heap memory in the training process, so each step does not page-fault it back in."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2, 32 MiB on 64-bit systems
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def retain_freed_memory(keep_bytes: int = 1 << 30) -> bool:
    """Make glibc serve blocks up to 32 MiB from its heaps and keep up to ``keep_bytes`` freed.

    A CPU training step allocates and frees the same few-megabyte tensors every step (logits,
    gradient rows, optimizer temporaries). glibc hands blocks above its mmap threshold (128 KiB at
    first, adapting up to 32 MiB) back to the kernel when they are freed and trims its heap top
    above twice that, so the next step page-faults every 4 KiB page in again: 2,450 faults per step
    of the issue's minimal loop here, half of its step time (``benchmarks/bench_training.py``).
    After this call blocks up to 32 MiB come from the heap and stay mapped; larger ones (whole
    tables, optimizer moments) are still mapped and unmapped on their own. The cost is that the
    process keeps up to ``keep_bytes`` of freed memory mapped.

    Process-wide and lasting; a no-op (returns False) where the C library is not glibc.

    Args:
        keep_bytes: free memory the heap may keep at its top before trimming it.
    Returns:
        Whether the settings were applied.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(min(keep_bytes, 2**31 - 1))) == 1 and ok
    if not ok:
        log.warning("mallopt refused the allocator settings; training runs with the C library's defaults")
    return ok
