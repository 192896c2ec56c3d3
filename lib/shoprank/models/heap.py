"""Keep freed activation memory in the process instead of handing it back to the kernel.

glibc serves a large allocation with its own mmap (above a threshold that starts at 128 KiB)
and trims the heap's free top past 128 KiB, so every forward pass gets its 10-50 MB
activations as fresh pages the kernel must zero and fault in, again and again. Serving them
from the heap, with room kept at its top, made catalog embedding 1.2-1.4x faster on this
machine (RESULTS.md, "Catalog embedding: the heap"). Process-wide, set once, before the first
model loads; a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt(3) parameter numbers (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, never from a mmap of their own.
MMAP_THRESHOLD = 1 << 30
# Free memory kept at the heap's top when it shrinks: a few passes' activations.
TOP_PAD = 256 << 20


@functools.cache
def keep_heap() -> bool:
    """Set glibc's allocator to reuse freed blocks; True if it took the settings."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt; macOS no libc.so)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TOP_PAD, TOP_PAD))
