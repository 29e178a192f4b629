"""What the device check's parent and its checks share: JSON records, constants, the bf16 peaks.

Nothing here imports JAX (or numpy): the parent process (runner.py) imports this
module too, and a JAX runtime there would hold device memory that the checks need.
What needs JAX (the machine's description) is in `child_common`, which only the
checks' modules import.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import sys
import time
import types
from typing import Any, Optional

# The mnist check's variant of configs/mnist_dit_s2.py (the parent's --mnist-variant default).
DEFAULT_MNIST_VARIANT = "log_kde_gauss"
RELEASE_CLASSES = 64
# Classes the ablation step tries first on one device (halved until it fits). The
# release's 64 classes are its batch over all devices, and on one they cannot fit: the
# MAE-256 extractor's 85 feature groups hold 2.47M floats (9.9 MB in fp32) per sample,
# so the 64 x (64 + 64 + 16) samples' features alone take about 90 GB. With remat,
# 16 classes (a 4-GPU host's share) should fit 80 GB. Without it the first H200 run
# measured ~16 GB per class (62 GiB at 4 classes; 127 GB at 8, which does not fit the
# H200's 135 GB and cost the check its budget in one compile), so 4.
# Here, not in ablation.py, because the parent's --ablation-classes help names them.
FIRST_CLASSES = {True: 16, False: 4}

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
  trainer writers that do not need it. `runner.run_child` calls this before it
  imports a check's module (those import the trainer, and so clu, at their top).
  """
  if "clu.metric_writers" in sys.modules:
    return
  stub = types.ModuleType("clu.metric_writers.summary_writer")

  class SummaryWriter:
    def __init__(self, *a, **k):
      raise RuntimeError("the device check registered no TensorBoard writer (see _clu_without_tensorflow)")

  stub.SummaryWriter = SummaryWriter
  sys.modules.setdefault("clu.metric_writers.summary_writer", stub)
