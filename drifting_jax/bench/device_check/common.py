"""What the device check's parent and its checks share: JSON records and the machine's description.

Nothing here imports JAX at module level: the parent process (runner.py) imports
this module too, and a JAX runtime there would hold device memory that the checks
need.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
import types
from importlib import metadata
from typing import Any, Optional

# Dense bf16 peak of one device, TFLOP/s (vendor figures, without sparsity); the
# first entry whose words all occur in jax's device_kind wins.
PEAK_BF16_TFLOPS = (
    (("h100", "pcie"), 756.0),
    (("h100",), 989.0),
    (("h200",), 989.0),
    (("gh200",), 989.0),
    (("a100",), 312.0),
    (("tpu", "v5p"), 459.0),
    (("tpu", "v5", "lite"), 197.0),
    (("tpu", "v4"), 275.0),
)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomically(path: pathlib.Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(_jsonable(obj), indent=1, allow_nan=False))
  os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
  """JSON-ready copy: numpy scalars to Python, non-finite floats to None (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / jax scalars
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


class _Record:
  """A check's record in the work dir, rewritten after every phase (a timeout keeps what was done)."""

  def __init__(self, path: pathlib.Path, budget: float):
    self.path = path
    self.start = time.monotonic()
    self.budget = budget
    self.data: dict[str, Any] = {"status": "running", "result": {}, "phases": []}

  @property
  def result(self) -> dict:
    return self.data["result"]

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def remaining(self) -> float:
    return self.budget - self.elapsed()

  def phase(self, name: str, **values) -> None:
    self.result.update(values)
    self.data["phases"].append({"phase": name, "at_s": round(self.elapsed(), 2)})
    print(f"  {name} at {self.elapsed():.1f} s" + (f": {_short(values)}" if values else ""), flush=True)
    self.save()

  def save(self) -> None:
    _write_json_atomically(self.path, self.data)


def _short(values: dict) -> str:
  parts = []
  for k, v in values.items():
    if isinstance(v, float):
      parts.append(f"{k}={v:.4g}")
    elif isinstance(v, (int, str, bool)) or v is None:
      parts.append(f"{k}={v}")
  return ", ".join(parts)


def _machine() -> dict:
  import jax
  device = jax.devices()[0]
  versions = {}
  for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections"):
    try:
      versions[name.replace("-", "_")] = metadata.version(name)
    except Exception:
      versions[name.replace("-", "_")] = None
  stats = _memory_stats(device)
  kind = str(getattr(device, "device_kind", device.platform))
  try:
    precision = str(jax.config.jax_default_matmul_precision)
  except Exception:
    precision = None
  return {"device_kind": kind, "platform": device.platform, "backend": jax.default_backend(),
          "num_devices": jax.device_count(), "jax": jax.__version__, **versions,
          "python": platform.python_version(), "host_cpus": os.cpu_count(),
          "memory_bytes_limit": stats.get("bytes_limit"), "peak_bf16_tflops": _peak_for(kind),
          "default_matmul_precision": precision}


def _memory_stats(device) -> dict:
  try:
    return dict(device.memory_stats() or {})
  except Exception:  # not every backend reports memory
    return {}


def _peak_for(device_kind: str) -> Optional[float]:
  kind = device_kind.lower()
  for words, peak in PEAK_BF16_TFLOPS:
    if all(w in kind for w in words):
      return peak
  return None


def _clu_without_tensorflow() -> None:
  """Lets `clu.metric_writers` (and so the trainer) import without TensorFlow.

  clu imports TensorFlow for its TensorBoard SummaryWriter. The checks write no
  TensorBoard files (the trainer's metrics.jsonl and logs are what they read), the
  lent GPU image has no TensorFlow and its wheel is far too large to carry, and
  importing it costs about 8 s of CPU per check. So a stand-in SummaryWriter module
  that refuses to be used is registered first; `mnist._plain_writers` gives the
  trainer writers that do not need it.
  """
  if "clu.metric_writers" in sys.modules:
    return
  stub = types.ModuleType("clu.metric_writers.summary_writer")

  class SummaryWriter:
    def __init__(self, *a, **k):
      raise RuntimeError("the device check registered no TensorBoard writer (see _clu_without_tensorflow)")

  stub.SummaryWriter = SummaryWriter
  sys.modules.setdefault("clu.metric_writers.summary_writer", stub)
