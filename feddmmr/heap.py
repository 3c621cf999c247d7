"""Give freed heap memory back to the system between the phases of a round.

glibc keeps the pages of freed tensors mapped: a round's vmapped groups and its validation pass
free and re-allocate tensors of ever different shapes, the heap fragments, and the process's peak
RSS grows with the number of groups in a round rather than with the largest one.
``malloc_trim(0)`` returns every free page at the cost of one walk over the heap, so it runs at
phase boundaries; trimming on every free (``MALLOC_TRIM_THRESHOLD_=0``) or mmapping large blocks
pays a page fault for every fresh block (docs/scale.md compares them). Elsewhere than glibc it does
nothing.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Return the heap's free pages to the system (glibc), or nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
