"""TPU slices by the names the cloud sells them under, and the facts of their chips.

One table: a generation's chip (HBM capacity, dense bf16 peak, HBM bandwidth), how
the slice name counts (chips, or TensorCores at two per chip), how its chips are
laid out (2D torus for v5e/v6e, 3D for v4/v5p) and how many chips one host drives.
`Target.devices()` gives the slice's devices from libtpu's topology description,
with no TPU present, for `jax.jit(...).lower(...).compile()`.

Chip facts are Google Cloud's published per-chip numbers (the TPU system
architecture pages of each generation); bandwidths are the HBM's, not the ICI's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Sequence

from jax.experimental import topologies

from drifting_jax import errors

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str            # the topology name's prefix: "v6e", "v5p", ...
  hbm_bytes: int             # HBM per chip
  peak_bf16_flops: float     # dense bf16 FLOP/s per chip
  hbm_bytes_per_s: float     # HBM bandwidth per chip
  name_counts_cores: bool    # "v5p-64" counts TensorCores (2 per chip), "v6e-64" counts chips
  torus_dims: int            # 2 (v5e, v6e) or 3 (v4, v5p)
  single_host_chips: int     # the largest slice one host drives alone (its chips_per_host_bounds)
  # JAX devices per chip in libtpu's topology description: v4's two TensorCores
  # appear as two devices there (no megacore), each with half the chip's HBM and peak.
  devices_per_chip: int = 1

  @property
  def device_hbm_bytes(self) -> int:
    return self.hbm_bytes // self.devices_per_chip

  @property
  def device_peak_flops(self) -> float:
    return self.peak_bf16_flops / self.devices_per_chip

  @property
  def device_hbm_bytes_per_s(self) -> float:
    return self.hbm_bytes_per_s / self.devices_per_chip


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1.2e12, name_counts_cores=True, torus_dims=3, single_host_chips=4,
               devices_per_chip=2),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 0.819e12, name_counts_cores=False, torus_dims=2, single_host_chips=8),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2.765e12, name_counts_cores=True, torus_dims=3, single_host_chips=4),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1.64e12, name_counts_cores=False, torus_dims=2, single_host_chips=8),
}

# Chip grids of the standard slice shapes (chips -> topology), as the cloud provisions them.
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8)}
# Multi-host slices: 4 chips per host (a 2x2 tray).
_MULTI_HOST_BOUNDS = (2, 2, 1)

_NAME = re.compile(r"^(v4|v5e|v5p|v6e)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Target:
  """One TPU slice: its name, chip, chip grid and host layout."""
  name: str
  chip: Chip
  chips: int
  grid: tuple[int, ...]
  chips_per_host_bounds: tuple[int, int, int]

  @property
  def topology_name(self) -> str:
    return f"{self.chip.generation}:{'x'.join(str(d) for d in self.grid)}"

  @property
  def num_devices(self) -> int:
    return self.chips * self.chip.devices_per_chip

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.chips_per_host_bounds)

  def devices(self) -> list:
    """The slice's devices (one per chip; two per v4 chip), from libtpu; no TPU needed (see `compile_environment`)."""
    compile_environment()  # libtpu is loaded by the first description asked for
    try:
      topology = topologies.get_topology_desc(topology_name=self.topology_name, platform="tpu",
                                              chips_per_host_bounds=self.chips_per_host_bounds, num_slices=1)
    except Exception as e:  # libtpu missing, or a shape it refuses
      raise errors.UsageError(
          f"cannot describe the TPU slice {self.name} ({self.topology_name}): {e}. The compile mode needs "
          "libtpu: pip install 'libtpu==0.0.42.*' (the version jax[tpu]==0.10.2 pins)") from None
    devices = list(topology.devices)
    if len(devices) != self.num_devices:
      raise errors.UsageError(f"libtpu describes {len(devices)} devices for {self.name}, expected "
                              f"{self.num_devices} ({self.chip.devices_per_chip} per chip)")
    return devices

  def to_dict(self) -> dict:
    return {"name": self.name, "topology": self.topology_name, "chips": self.chips, "devices": self.num_devices, "hosts": self.hosts,
            "chips_per_host_bounds": list(self.chips_per_host_bounds), "hbm_gib": self.chip.hbm_bytes / GIB,
            "peak_bf16_tflops": self.chip.peak_bf16_flops / 1e12,
            "hbm_tb_per_s": self.chip.hbm_bytes_per_s / 1e12}


def compile_environment() -> None:
  """Lets libtpu describe a slice on a machine without TPUs and without asking the network.

  TPU_SKIP_MDS_QUERY: never query a cloud metadata server for the VM's TPU.
  ALLOW_MULTIPLE_LIBTPU_LOAD: skip libtpu's one-process-per-machine lock, which
  protects real chips; with none present it would only stop two compiles side by side.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def known_names() -> list[str]:
  names = []
  for gen, chip in CHIPS.items():
    grids = _GRIDS_3D if chip.torus_dims == 3 else _GRIDS_2D
    names += [f"{gen}-{c * (2 if chip.name_counts_cores else 1)}" for c in sorted(grids)]
  return names


def parse(name: str) -> Target:
  """`Target` of a slice name such as "v6e-64", "v5p-128", "v5e-256", "v4-32"."""
  match = _NAME.match(name.strip())
  if not match:
    raise errors.UsageError(f"unknown TPU slice {name!r}: expected <generation>-<size> with generation one of "
                            f"{sorted(CHIPS)}, e.g. v6e-64, v5p-128, v5e-256, v4-32")
  chip = CHIPS[match.group(1)]
  size = int(match.group(2))
  chips = size // 2 if chip.name_counts_cores else size
  grids = _GRIDS_3D if chip.torus_dims == 3 else _GRIDS_2D
  if (chip.name_counts_cores and size % 2) or chips not in grids:
    raise errors.UsageError(f"no standard {chip.generation} slice named {name!r}; known: "
                            f"{', '.join(n for n in known_names() if n.startswith(chip.generation))}")
  grid = grids[chips]
  if chips <= chip.single_host_chips:
    bounds = tuple(grid) + (1,) * (3 - len(grid))
  else:
    bounds = _MULTI_HOST_BOUNDS
  return Target(name=name.strip(), chip=chip, chips=chips, grid=tuple(grid), chips_per_host_bounds=bounds)


def table(names: Sequence[str] | None = None) -> list[dict]:
  """The rows of the target table (docs and --help)."""
  return [parse(n).to_dict() for n in (names or known_names())]
