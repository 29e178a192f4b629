"""Which JAX backends to start: keeps a machine without TPUs from probing for them.

With `libtpu` installed (the compile mode needs it to describe TPU slices), JAX
tries to start a TPU backend on every machine: on one without TPU chips that takes
libtpu's process lock (/tmp/libtpu_lockfile, so a second JAX process is refused
the TPU) and prints libtpu's warnings about worker hostnames into every job's
output. `skip_absent_tpu()` limits JAX to the backends the machine has, unless the
user chose (JAX_PLATFORMS set); the compile mode still reaches the TPU compiler
through libtpu's topology description, which needs no TPU backend.

It runs when `drifting_jax` is imported, before JAX starts a backend.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys


def _has_tpu_chips() -> bool:
  # TPU VMs expose their chips as /dev/accel* (v2-v4, v5e) or /dev/vfio/<n> (v5p, v6e).
  return bool(glob.glob("/dev/accel*") or [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()])


def _has_nvidia_gpu() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*"))


def skip_absent_tpu() -> str | None:
  """Sets JAX's platforms to those present when libtpu is installed but no TPU is; returns what it set."""
  if os.environ.get("JAX_PLATFORMS") or os.environ.get("DRIFTING_JAX_PLATFORMS") == "default":
    return None
  if _has_tpu_chips() or importlib.util.find_spec("libtpu") is None:
    return None
  platforms = "cuda,cpu" if _has_nvidia_gpu() else "cpu"
  if "jax" in sys.modules:  # imported already: its config read the environment; set the flag instead
    sys.modules["jax"].config.update("jax_platforms", platforms)
  else:
    os.environ["JAX_PLATFORMS"] = platforms
  return platforms
