"""glibc allocator tuning for the CPU inference paths (no-ops where glibc is not the allocator).

Importing this module makes every thread allocate from glibc's main heap
(``M_ARENA_MAX`` 1, see below). ``reuse_freed_memory`` makes the whole-image
fast path faster; ``return_freed_memory`` keeps the tiled path within ``--max_memory``.
"""
import ctypes

GIB = 1024 ** 3
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8       # glibc's mallopt parameters


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()
_MALLOC_TUNED = []

# One heap for every thread, set on import, before OpenCV's, PyTorch's and the
# workers' threads first allocate: a thread's own arena (64 MB heaps) hands
# large tensors fresh pages from the kernel each time. 16 x 1 MP end to end:
# 1.1 million page faults -> 0.43 million, 2-5 s of system time less.
if _LIBC is not None and hasattr(_LIBC, "mallopt"):
    _LIBC.mallopt(_M_ARENA_MAX, 1)


def reuse_freed_memory():
    """Let glibc keep freed blocks of up to 1 GiB for reuse (once per process).

    By default tensors over 32 MB get fresh pages from the kernel each time,
    and every page is then faulted in and zeroed: about 7% of the fast path's
    CPU time at 1 MP (measured: 0.85 s -> 0.4 s system time for 8 x 1 MP),
    for about 10% more peak memory.
    """
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED.append(True)
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, GIB)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)      # mallopt takes a C int: the largest


def return_freed_memory():
    """Give the allocator's free pages back to the kernel (glibc ``malloc_trim``).

    The tiled path calls it after every chunk of the feature extractor and
    every GRU tile: without it, freed blocks stay resident in glibc's heaps
    (one per worker thread) and the process went up to 20% above
    ``--max_memory`` (30 x 1.5 MP under 2 GiB: peak RSS 2.55 GB without,
    1.94 GB with; docs/performance.md).
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def then_return_freed_memory(job):
    """Run ``job()``, then ``return_freed_memory``; returns the job's result."""
    result = job()
    return_freed_memory()
    return result


def available_bytes():
    """Memory the kernel can give this process now (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
