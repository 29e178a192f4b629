"""What the checks share that needs JAX: the machine's description.

Only the checks' modules (mnist, ablation, loss_library) import this module, and
only the checks' child processes import those (`runner.run_child` resolves them
from `runner.CHECK_FUNCTIONS`): the parent process never imports JAX.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import jax

from drifting_jax.bench.device_check.common import _memory_stats, _peak_for


def _machine() -> dict:
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
