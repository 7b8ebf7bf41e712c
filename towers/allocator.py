"""Process memory settings for CPU training: keep freed heap memory (no page faults each step) and
back the large tables by huge pages (fewer TLB misses)."""

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


# madvise advice values (asm-generic/mman-common.h)
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25  # Linux >= 6.1: back already-touched pages by huge pages now
_HUGE_PAGE = 2 * 1024 * 1024


def advise_huge_pages(tensors, min_bytes: int = 16 * 1024 * 1024) -> int:
    """Ask Linux to back large CPU tensors (embedding tables, their optimizer moments) by 2 MiB pages.

    A training step reads and writes a few thousand random rows of each 1M-row table; with 4 KiB
    pages nearly every row is a TLB miss, which costs a full page walk (two levels of them in a
    VM). With transparent huge pages in ``madvise`` mode (the common default) the kernel uses 2 MiB
    pages only where asked. ``MADV_HUGEPAGE`` marks the 2 MiB-aligned part of each tensor's
    memory and ``MADV_COLLAPSE`` moves the pages already written into huge pages at once (Linux
    6.1 and newer; on older kernels the marked memory is collapsed in the background). The data
    and its addresses do not change. On this project's 2-core VMs a batch-1024 step on two 1M-row
    tables took 23% less time (``benchmarks/bench_training.py``).

    Best effort: a no-op for tensors smaller than ``min_bytes``, not on the CPU, or where madvise
    is missing or refuses (not Linux, THP disabled).

    Args:
        tensors: iterable of tensors.
        min_bytes: skip smaller tensors (a few MiB already fit the TLB's reach).
    Returns:
        How many storages were marked (views of one storage count once).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    seen = set()
    for t in tensors:
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if t.device.type != "cpu" or size < min_bytes or start in seen:
            continue
        seen.add(start)  # views of one storage are marked once
        lo = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        hi = (start + size) // _HUGE_PAGE * _HUGE_PAGE
        if hi <= lo or madvise(lo, hi - lo, _MADV_HUGEPAGE) != 0:
            continue
        madvise(lo, hi - lo, _MADV_COLLAPSE)  # EINVAL before 6.1, EAGAIN without free huge pages: fine
        done += 1
    return done
