"""glibc's allocator set up for training batches: freed tensor memory is kept for the next step.

A training step of a few hundred series allocates and frees dozens of (K, B, W) tensors of
~16 MB each. glibc serves blocks that large with mmap, or trims them off the heap top when
they are freed, so every step faulted its ~90 MB of working memory in again: 22,900 page
faults per step at 538 series, 7-15 % of the step (benchmarks/scale.py's training share of
the matmul peak, issue 11). With the mmap threshold at glibc's maximum and a trim threshold
above a step's working set, the blocks stay in the heap between steps (0 faults per step);
`release` hands the free memory back after each batch, so the steady RSS does not keep the
training peak.

Elsewhere than glibc (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: larger blocks are always mmapped
TRIM_THRESHOLD = 1 << 30  # free memory at the heap top kept before trimming
TOP_PAD = 256 << 20  # extra heap grown per sbrk, so a step's growth is not many small ones


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_for_training() -> bool:
    """Set the thresholds above (process-wide, all arenas); True where glibc took them."""
    libc = _libc()
    if libc is None:
        return False
    ok = all(libc.mallopt(p, v) == 1 for p, v in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    if not ok:
        log.warning("malloc thresholds not taken: training steps fault their memory in again")
    return ok


def release() -> bool:
    """Give free heap memory back to the system (after a training batch, after models move
    into the bank): True if some was."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
