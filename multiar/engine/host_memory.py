"""The C heap's settings for a training process: keep the memory a step frees for the next step, rather than
give it back to the kernel and fault it in again.

glibc's malloc serves a block above a threshold (128 KiB, raised as big blocks are freed, up to 32 MiB)
with its own mmap, and hands the heap's free top back to the kernel past a trim threshold. A training
step allocates and frees the same activations every step; whatever went back to the kernel returns as
fresh zeroed pages, a page fault every 4 KiB. With every block below 32 MiB served from the heap and the
heap not trimmed, the 10.8M Lightning training step in bf16 ran 8% faster on a 2-core Xeon with AMX
(two pairs of runs: 6,105 / 5,892 -> 6,576 / 6,433 tokens/s; nanoGPT's +2%); in fp32 +0.4-2%, within the
noise (benchmarks/README.md, training). Setting the trim threshold alone is slower (it pins the mmap
threshold at 128 KiB); the mmap threshold alone changes nothing. The cost: the process keeps its peak
heap until it exits. Under a preloaded tcmalloc or jemalloc `mallopt` is theirs, which may accept and
ignore these. No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc takes on 64 bits
TRIM_THRESHOLD = 2**31 - 1  # mallopt's value is a C int: 2 GiB of free heap top before any is returned


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt


def keep_freed_memory() -> str | None:
    """Set glibc's malloc to keep freed memory for reuse (see above): a phrase for the log, or None where
    this is not glibc or glibc refused."""
    libc = _libc()
    if libc is None:
        return None
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if not done:
        return None
    return f"blocks below {MMAP_THRESHOLD >> 20} MiB from the heap, freed memory kept for reuse (glibc)"
