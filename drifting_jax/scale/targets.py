"""TPU slices and GPU hosts by the names they are sold under, and the facts of their chips.

TPU: one table: a generation's chip (HBM capacity, dense bf16 peak, HBM bandwidth), how
the slice name counts (chips, or TensorCores at two per chip), how its chips are
laid out (2D torus for v5e/v6e, 3D for v4/v5p) and how many chips one host drives.
`Target.devices()` gives the slice's devices from libtpu's topology description,
with no TPU present, for `jax.jit(...).lower(...).compile()`.

Chip facts are Google Cloud's published per-chip numbers (the TPU system
architecture pages of each generation); bandwidths are the HBM's, not the ICI's.

GPU: "h100x8" is one host with 8 H100 SXM GPUs, "h100x16" two such hosts, and so
on ("h100x1".."h100x4": part of one host). Their devices come from the CUDA PJRT
plugin (`pip install jax-cuda12-plugin==<jax version>`; no GPU and no CUDA libraries
needed), which compiles for a GPU it cannot see from an XLA `GpuTargetConfigProto`:
`gpu_target_config` writes that text from `GpuSpec`, a few of NVIDIA's published
facts of the GPU (its datasheet and the H100 architecture whitepaper).

The plugins' options and environment variables, the CUDA plugin's private version
module and the XLA option used here are in `xla_internals`, with the versions they
were checked against.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Sequence

import jax

from drifting_jax import errors
from drifting_jax.scale import xla_internals

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
  platform: str = "tpu"      # "tpu" (libtpu describes it) or "cuda" (the CUDA plugin does)

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
    if self.chip.platform == "cuda":  # the CUDA plugin's "partitions x hosts x GPUs per host"
      return f"1x{self.grid[0]}x{self.grid[1]}"
    return f"{self.chip.generation}:{'x'.join(str(d) for d in self.grid)}"

  @property
  def num_devices(self) -> int:
    return self.chips * self.chip.devices_per_chip

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.chips_per_host_bounds)

  def devices(self) -> list:
    """The slice's devices (one per chip; two per v4 chip), from libtpu; no TPU needed (see `compile_environment`)."""
    if self.chip.platform == "cuda":
      return gpu_devices(self)
    compile_environment()  # libtpu is loaded by the first description asked for
    return _described_devices(
        self, "libtpu", lambda: xla_internals.describe_tpu_topology(self.topology_name, self.chips_per_host_bounds),
        lambda e: (f"cannot describe the TPU slice {self.name} ({self.topology_name}): {e}. The compile mode "
                   "needs libtpu: pip install 'libtpu==0.0.52' (requirements.txt; 0.0.42, which "
                   "jax[tpu]==0.10.2 pins, crashes compiling our step for v6e at small per-chip batches: "
                   "docs/scaling.md)"),
        per_chip=f" ({self.chip.devices_per_chip} per chip)")

  def to_dict(self) -> dict:
    return {"name": self.name, "topology": self.topology_name, "chips": self.chips, "devices": self.num_devices, "hosts": self.hosts,
            "chips_per_host_bounds": list(self.chips_per_host_bounds), "hbm_gib": self.chip.hbm_bytes / GIB,
            "peak_bf16_tflops": self.chip.peak_bf16_flops / 1e12,
            "hbm_tb_per_s": self.chip.hbm_bytes_per_s / 1e12}


def compile_environment() -> None:
  """Lets libtpu describe a slice on a machine without TPUs and without asking the network.

  The environment variables libtpu reads for that: `xla_internals.LIBTPU_COMPILE_ENVIRONMENT`.
  """
  xla_internals.libtpu_compile_environment()


# --------------------------------------------------------------------------- GPU hosts


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """Published facts of an NVIDIA GPU: what XLA's GPU compiler asks of a device it cannot see."""
  name: str                          # the device name CUDA reports
  compute_capability: tuple[int, int]
  arch_specific_features: bool       # sm_90a (Hopper's wgmma/TMA): XLA may emit them for 9.0
  sm_count: int
  fp32_lanes_per_sm: int
  boost_clock_ghz: float
  memory_bytes: int
  memory_bytes_per_s: float
  l2_cache_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  nvlink_links: int
  pcie_bytes_per_s: float            # one direction
  # Limits of every compute capability from 7.0 to 9.0 (CUDA C++ Programming Guide,
  # "Features and Technical Specifications").
  shared_memory_per_block: int = 48 * 1024
  registers_per_sm: int = 64 * 1024
  registers_per_block: int = 64 * 1024
  threads_per_sm: int = 2048
  threads_per_block: int = 1024
  threads_per_warp: int = 32
  block_dims: tuple[int, int, int] = (2**31 - 1, 65535, 65535)
  thread_dims: tuple[int, int, int] = (1024, 1024, 64)


# NVIDIA H100 SXM5 80GB (H100 datasheet; "NVIDIA H100 Tensor Core GPU Architecture"
# whitepaper): 132 SMs of 128 FP32 lanes, 1.98 GHz boost, 80 GB HBM3 at 3.35 TB/s,
# 50 MB L2, 228 KB shared memory per SM of which 227 KB for one block, 18 NVLink 4
# links, PCIe Gen5 x16 (128 GB/s both directions).
H100_SXM = GpuSpec(name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), arch_specific_features=True,
                   sm_count=132, fp32_lanes_per_sm=128, boost_clock_ghz=1.98, memory_bytes=80 * GIB,
                   memory_bytes_per_s=3.35e12, l2_cache_bytes=50 * 2**20, shared_memory_per_sm=228 * 1024,
                   shared_memory_per_block_optin=227 * 1024, nvlink_links=18, pcie_bytes_per_s=64e9)

# Chip facts for the report (dense bf16 Tensor Core peak, without sparsity).
GPU_CHIPS: dict[str, Chip] = {
    "h100": Chip("h100", H100_SXM.memory_bytes, 989e12, H100_SXM.memory_bytes_per_s, name_counts_cores=False,
                 torus_dims=0, single_host_chips=8, platform="cuda"),
}
GPU_SPECS: dict[str, GpuSpec] = {"h100": H100_SXM}
GPUS_PER_HOST = 8
_GPU_NAME = re.compile(r"^(h100)x(\d+)$")
_GPU_HOST_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)  # hosts of 8 GPUs the table lists


def gpu_target_config(spec: GpuSpec) -> str:
  """`spec` as an XLA GpuTargetConfigProto in text format (the CUDA plugin's `target_config`)."""
  # The plugin's CUDA and cuDNN build versions (its private `_versions`: xla_internals).
  cuda, cudnn = xla_internals.cuda_library_versions()
  major, minor = spec.compute_capability
  features = " feature_extension: ACCELERATED_FEATURES" if spec.arch_specific_features else ""
  version = lambda v: f"{v[0]}.{v[1]}.{v[2]}"  # noqa: E731
  info = {
      "threads_per_block_limit": spec.threads_per_block, "threads_per_warp": spec.threads_per_warp,
      "shared_memory_per_block": spec.shared_memory_per_block, "shared_memory_per_core": spec.shared_memory_per_sm,
      "threads_per_core_limit": spec.threads_per_sm, "core_count": spec.sm_count,
      "fpus_per_core": spec.fp32_lanes_per_sm,
      "block_dim_limit_x": spec.block_dims[0], "block_dim_limit_y": spec.block_dims[1],
      "block_dim_limit_z": spec.block_dims[2],
      "memory_bandwidth": int(spec.memory_bytes_per_s), "l2_cache_size": spec.l2_cache_bytes,
      "clock_rate_ghz": spec.boost_clock_ghz, "device_memory_size": spec.memory_bytes,
      "shared_memory_per_block_optin": spec.shared_memory_per_block_optin,
      "registers_per_core_limit": spec.registers_per_sm, "registers_per_block_limit": spec.registers_per_block,
      "thread_dim_limit_x": spec.thread_dims[0], "thread_dim_limit_y": spec.thread_dims[1],
      "thread_dim_limit_z": spec.thread_dims[2],
      "pcie_bandwidth": int(spec.pcie_bytes_per_s),
  }
  lines = ["gpu_device_info {"] + [f"  {k}: {v}" for k, v in info.items()] + [
      f"  cuda_compute_capability {{ major: {major} minor: {minor}{features} }}",
      f'  device_vendor: "NVIDIA Corporation"',
      f'  name: "{spec.name}"',
      f'  runtime_version: "{version(cuda)}"',
      f'  dnn_version: "{version(cudnn)}"',
      f"  device_interconnect_info {{ active_links: {spec.nvlink_links} }}",
      "}",
      'platform_name: "CUDA"',
      f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}",
      f"runtime_version {{ major: {cuda[0]} minor: {cuda[1]} patch: {cuda[2]} }}",
      f'device_description_str: "{spec.name}"',
  ]
  return "\n".join(lines) + "\n"


# What XLA's GPU compiler needs to compile without a GPU, passed with each compile
# (`compile_mode._compile`). Triton GEMMs off: with no device to autotune on, XLA's
# Triton GEMM emitter fails on some dots of our step ("Couldn't find output tile
# sizes", jax-ml/jax#34010); with it off every matmul is a cuBLAS(Lt) call, as XLA
# picks with autotuning off. As a compile option rather than in XLA_FLAGS: XLA reads
# XLA_FLAGS once per process, by the time JAX has started a backend (the CPU one is
# up before any target is parsed), so putting it into os.environ from here is too
# late (tried: the same failure); a compile option applies to that compile whatever
# ran before, in main, in a test or in a notebook. Exporting
# XLA_FLAGS=--xla_gpu_enable_triton_gemm=false before Python starts works too.
GPU_COMPILER_OPTIONS = {xla_internals.TRITON_GEMM_OPTION: False}


def compiler_options(target: Target) -> dict | None:
  """Extra XLA options for compiling for `target` (None: the compiler's defaults)."""
  return dict(GPU_COMPILER_OPTIONS) if target.chip.platform == "cuda" else None


def gpu_devices(target: Target) -> list:
  """The GPU host's (or hosts') devices, from the CUDA plugin's topology description; no GPU needed."""
  try:
    import jax_cuda12_plugin  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise errors.UsageError(
        f"compiling for {target.name} needs the CUDA plugin (no GPU or CUDA libraries needed): "
        f"pip install jax-cuda12-plugin=={jax.__version__}") from None
  if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
    # The plugin describes GPUs it cannot see only while JAX itself runs on the CPU; this
    # takes effect if no backend has started yet (launch/compile_check.sh sets it anyway).
    jax.config.update("jax_platforms", "cpu")
  spec = GPU_SPECS[target.chip.generation]
  return _described_devices(
      target, "the CUDA plugin", lambda: xla_internals.describe_cuda_topology(
          gpu_target_config(spec), target.topology_name),
      lambda e: (f"the CUDA plugin cannot describe {target.name} ({target.topology_name}): "
                 f"{str(e).splitlines()[0]}. Run with JAX_PLATFORMS=cpu (launch/compile_check.sh sets it): "
                 "the plugin describes GPUs it cannot see only when JAX itself runs on the CPU"))


def _described_devices(target: Target, describer: str, describe, failure, per_chip: str = "") -> list:
  """The devices of `describe()` (a compiler plugin's topology description), checked
  against the target's count; a description that fails is a one-line `failure(error)`."""
  try:
    topology = describe()
  except Exception as e:  # noqa: BLE001  (plugin missing, or a shape it refuses)
    raise errors.UsageError(failure(e)) from None
  devices = list(topology.devices)
  if len(devices) != target.num_devices:
    raise errors.UsageError(f"{describer} describes {len(devices)} devices for {target.name}, "
                            f"expected {target.num_devices}{per_chip}")
  return devices


def parse_gpu(name: str) -> Target | None:
  """`Target` of a GPU host name such as "h100x8" (one host) or "h100x16" (two hosts of 8); None if not one."""
  match = _GPU_NAME.match(name.strip())
  if not match:
    return None
  chip = GPU_CHIPS[match.group(1)]
  gpus = int(match.group(2))
  if gpus <= GPUS_PER_HOST and gpus in (1, 2, 4, 8):
    hosts, per_host = 1, gpus
  elif gpus % GPUS_PER_HOST == 0 and gpus > 0:
    hosts, per_host = gpus // GPUS_PER_HOST, GPUS_PER_HOST
  else:
    raise errors.UsageError(f"no {chip.generation} host layout for {name!r}: 1, 2, 4 or 8 GPUs (one host) or "
                            f"a multiple of {GPUS_PER_HOST} (hosts of 8), e.g. h100x8, h100x16, h100x64")
  return Target(name=name.strip(), chip=chip, chips=gpus, grid=(hosts, per_host), chips_per_host_bounds=(per_host, 1, 1))


def known_names() -> list[str]:
  names = []
  for gen, chip in CHIPS.items():
    grids = _GRIDS_3D if chip.torus_dims == 3 else _GRIDS_2D
    names += [f"{gen}-{c * (2 if chip.name_counts_cores else 1)}" for c in sorted(grids)]
  for gen in GPU_CHIPS:
    names += [f"{gen}x{GPUS_PER_HOST * hosts}" for hosts in _GPU_HOST_COUNTS]
  return names


def parse(name: str) -> Target:
  """`Target` of a slice name such as "v6e-64", "v5p-128", "v5e-256", "v4-32", or a GPU host's: "h100x8"."""
  gpu = parse_gpu(name)
  if gpu is not None:
    return gpu
  match = _NAME.match(name.strip())
  if not match:
    raise errors.UsageError(f"unknown TPU slice {name!r}: expected <generation>-<size> with generation one of "
                            f"{sorted(CHIPS)}, e.g. v6e-64, v5p-128, v5e-256, v4-32 (or GPU hosts: h100x8, "
                            "h100x16, ...)")
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
