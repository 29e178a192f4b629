"""Records where a test run's processes spend their time compiling (not imported by the project).

Put this folder on PYTHONPATH with SUITE_PROFILE_DIR set, and every Python process the
run starts (pytest, its xdist workers, the processes tests launch, which inherit the
environment) appends one JSON line per jax timing event to SUITE_PROFILE_DIR/<pid>.jsonl:
tracing, lowering to MLIR and XLA's compile (`backend_compile_duration`, which for a
persistent-cache hit is the cache read), each with the function's name and the test
that was running (PYTEST_CURRENT_TEST, inherited by child processes); a line per
persistent-cache hit; and at exit the process's CPU seconds and command line.
`python -m scripts.suite_profile.report DIR` sums them per test file.

The listener is registered when jax's monitoring module is first imported (an import
hook), so importing this file does not import jax: a process's JAX_PLATFORMS and
XLA_FLAGS, set after start-up by conftest.py or a launcher, still take effect.
"""
import atexit
import importlib.abc
import importlib.util
import json
import os
import resource
import sys
import time

_DIR = os.environ.get("SUITE_PROFILE_DIR")
_out = None


def _write(record):
  global _out
  if _out is None:
    _out = open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), "a", buffering=1)
  _out.write(json.dumps(record) + "\n")


def _on_duration(event, duration, **kwargs):
  _write({"event": event, "seconds": duration, "function": kwargs.get("fun_name"),
          "test": os.environ.get("PYTEST_CURRENT_TEST", "")})


def _on_event(event, **kwargs):
  if event.endswith("/cache_hits"):
    _write({"event": event, "test": os.environ.get("PYTEST_CURRENT_TEST", "")})


class _RegisterOnImport(importlib.abc.MetaPathFinder):
  """Loads jax._src.monitoring as usual, then registers the listeners on it."""

  def find_spec(self, name, path, target=None):
    if name != "jax._src.monitoring":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    exec_module = spec.loader.exec_module

    def exec_and_register(module):
      exec_module(module)
      module.register_event_duration_secs_listener(_on_duration)
      module.register_event_listener(_on_event)

    spec.loader.exec_module = exec_and_register
    return spec


if _DIR:
  sys.meta_path.insert(0, _RegisterOnImport())
  _started = time.time()

  @atexit.register
  def _on_exit():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _write({"exit": True, "argv": sys.argv[:4], "wall": time.time() - _started,
            "cpu": usage.ru_utime + usage.ru_stime, "tensorflow": "tensorflow" in sys.modules,
            "test": os.environ.get("PYTEST_CURRENT_TEST", "")})
