"""Test session setup: eight virtual CPU devices, and one compilation cache per run.

The suite runs toy sizes, where XLA's compilation, not the computation, is most of
the time (about 80% of its CPU: docs/benchmarks.md, "Test suite time"), and some tests
build the same programs again (a resumed run's step, above all). One persistent
compilation cache, shared by the xdist workers of a run and the subprocesses they
start, compiles each such program once (41 hits over the whole suite when profiled:
most of the tests' programs are distinct). The
cache lives in a temporary folder made for the run and removed at its end, so every
run starts cold and measures the same thing; set JAX_COMPILATION_CACHE_DIR to keep
one. A cached program is the program compiled, so results are bit for bit the same.

XLA's cheaper CPU code generation (`--xla_backend_optimization_level=0`, which the
accelerator check's `--cpu-smoke` uses) would save another half-minute on 2 cores,
but it changes results in the last bits: the release's noise draw is then no longer
bit-exact. The suite tests the numerics users get, so it keeps XLA's default flags.
"""
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Programs that compile in under this many seconds are not worth a disk round trip.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# A size limit turns on jax's file lock, which concurrent workers need: without it a
# worker can read an entry another is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pathlib

import pytest

from drifting_jax import host_memory

# As main and the demo do: XLA's per-step temporaries are reused, not re-faulted.
host_memory.keep_freed_memory()

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
_run_cache_dir = None  # set in the controlling process only


def pytest_configure(config):
  """In the controlling process: a fresh cache folder, inherited by the xdist workers."""
  global _run_cache_dir
  if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  _run_cache_dir = tempfile.mkdtemp(prefix="drifting_jax_test_jit_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _run_cache_dir


def pytest_unconfigure(config):
  global _run_cache_dir
  if _run_cache_dir is not None:
    shutil.rmtree(_run_cache_dir, ignore_errors=True)
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    _run_cache_dir = None


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
