"""glibc malloc's two thresholds, fixed for a training process.

glibc's malloc gives memory back to the system when the free block at the top of its heap outgrows
its *trim threshold*, and it adjusts that threshold (and the *mmap threshold* above which a block
gets its own mapping) from the sizes freed so far. A training step frees what its forward saved
for backward; in about half of the processes the free block then passes the threshold on every
step, and the next step faults every page in again: ResNet-18's QAT step at 32x32 on 2 threads
faults 38-66 MB a step, 10-25 ms, and reads 1.44-1.75x the float step instead of 1.22-1.30x
(bench/results/qat_step.md). Fixing both thresholds keeps freed memory for the next step; the
process holds its peak heap instead of giving it back.

The same as starting the process with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824``,
but callable from a running process (a notebook, the Hydra app). Fixing only the trim threshold
is worse than the defaults: it turns the adaptive mmap threshold off, and every block over
128 kB gets mapped and faulted in again.

Example:
    >>> import platform
    >>> fix_malloc_thresholds() == (platform.libc_ver()[0] == "glibc")
    True
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["MAX_MMAP_THRESHOLD", "fix_malloc_thresholds"]

#: glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB).
MAX_MMAP_THRESHOLD = 32 * 2**20

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def fix_malloc_thresholds(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 2**30) -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process.

    Args:
        mmap_threshold: blocks of at least this many bytes get their own mapping (at most
            :data:`MAX_MMAP_THRESHOLD`, glibc's limit).
        trim_threshold: the heap gives memory back to the system only when this many bytes are
            free at its top.

    Returns:
        True when set; False where the C library is not glibc (nothing changes).

    Raises:
        ValueError: a threshold out of range.
    """
    for name, value, limit in (
        ("mmap_threshold", mmap_threshold, MAX_MMAP_THRESHOLD),
        ("trim_threshold", trim_threshold, 2**31 - 1),  # mallopt takes a C int
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise ValueError(f"Expected `{name}` to be a number of bytes in (0, {limit}], but got {value!r}.")
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
