"""Keep freed host memory in the process (glibc malloc settings), so the CPU backend stops re-faulting it.

XLA's CPU client allocates each execution's temporary buffer afresh and frees it
after the step. The demo's train step needs 447 MiB of temporaries; glibc serves a
block that large with mmap and returns it with munmap, so every step touches 114k
new pages that the kernel must zero first: measured on the demo (150 steps), 17.4M
minor page faults and 30 s of system time against 107 s of user time.

`keep_freed_memory()` tells glibc, before any thread starts, to serve every block
from one heap that it does not trim (`M_ARENA_MAX` 1, `M_MMAP_MAX` 0, and
`M_TRIM_THRESHOLD` 2 GiB, the largest mallopt takes): the step's buffer is then reused, step after step (0.7M page
faults, 2.6 s of system time on the same run). The process keeps its peak heap
size until it ends, which is what a training or evaluation job wants anyway. The
arithmetic is untouched: the same programs run on the same values.

Entry points (`drifting_jax.main`, `drifting_jax.demo`) call it first thing;
`DRIFTING_JAX_MALLOC=default` leaves glibc as it is. It does nothing where the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int
OPT_OUT = "DRIFTING_JAX_MALLOC"


def keep_freed_memory() -> bool:
  """Applies the settings above; True if glibc took all three. Call before JAX starts its threads."""
  if os.environ.get(OPT_OUT, "") == "default":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in
             ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)))
