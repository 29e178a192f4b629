"""drifting_jax.host_memory: freed host memory is reused instead of re-faulted, and the opt-out works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from drifting_jax import host_memory

# A process that frees and reallocates a 256 MiB buffer, as XLA's CPU client does with a
# step's temporaries, and reports its minor page faults over those rounds.
# (C malloc, as XLA's allocator calls it: numpy would ask for transparent huge pages.)
_PROBE = """
import ctypes, json, resource
from drifting_jax import host_memory
applied = host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size, faults = 256 << 20, []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)   # every page written, as a kernel writing its output
  libc.free(buffer)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(setting: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != host_memory.OPT_OUT}
  if setting:
    env[host_memory.OPT_OUT] = setting
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True,
                       timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_step_buffer_is_reused_not_refaulted():
  default, kept = _probe("default"), _probe("")
  pages = (256 << 20) // 4096
  assert not default["applied"] and kept["applied"]
  # glibc's default: every round maps the buffer afresh and faults in all its pages.
  assert all(f >= 0.9 * pages for f in default["faults"]), default
  # Kept: the first round faults the pages in, every later one reuses them.
  assert kept["faults"][0] >= 0.9 * pages and max(kept["faults"][1:]) < 0.05 * pages, kept


def test_the_opt_out_leaves_glibc_alone(monkeypatch):
  monkeypatch.setenv(host_memory.OPT_OUT, "default")
  assert host_memory.keep_freed_memory() is False
