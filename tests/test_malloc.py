"""fix_malloc_thresholds: a heap that glibc trims and faults in again on every round stops doing so."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from hq_lightning.utils.malloc import MAX_MMAP_THRESHOLD, fix_malloc_thresholds

# A step's pattern in C calls, without torch: one freed mapping sets glibc's thresholds to 1 MiB
# (mmap) and 2 MiB (trim); then each round fills 8 MiB of heap and frees it, and the free block at
# the top of the heap passes the trim threshold.
_ROUNDS = """
import ctypes, json, resource, sys
sys.path.insert(0, {root!r})
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if {fix}:
    from hq_lightning.utils.malloc import fix_malloc_thresholds
    assert fix_malloc_thresholds()
libc.free(libc.malloc(1 << 20))
faults = []
for _ in range(4):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(512 << 10) for _ in range(16)]
    for block in blocks:
        libc.memset(block, 1, 512 << 10)
    for block in reversed(blocks):
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps(faults))
"""


def _faults_per_round(fix: bool) -> list[int]:
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    # no GLIBC_TUNABLES from the caller's environment: the default thresholds are the baseline
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", _ROUNDS.format(root=root, fix=fix)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_fixed_thresholds_stop_the_heap_being_trimmed_and_faulted_in_again():
    default = _faults_per_round(fix=False)
    fixed = _faults_per_round(fix=True)
    assert all(count >= 1500 for count in default)  # 8 MiB faulted in again every round
    assert fixed[0] >= 1500 and fixed[1:] == [0, 0, 0]  # faulted in once, then kept


@pytest.mark.parametrize(
    "kwargs", [{"mmap_threshold": MAX_MMAP_THRESHOLD + 1}, {"mmap_threshold": 0}, {"trim_threshold": 2**31}, {"trim_threshold": 1.5}]
)
def test_thresholds_out_of_range_are_refused(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"Expected `{name}` to be a number of bytes"):
        fix_malloc_thresholds(**kwargs)
