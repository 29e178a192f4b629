"""Device mesh and named partition rules (the MaxText way: one table, no scattered specs).

The mesh has two axes:

* ``data``: pure data parallelism; parameters are replicated along it.
* ``fsdp``: fully-sharded data parallelism; the batch is split along it as well, and
  each parameter (and its optimizer state) is split along one of its dimensions.

Parameters get their `PartitionSpec` from `PARAM_RULES`, an ordered list of
(regex on the "/"-joined parameter path, logical axis names per dimension). Logical
names map to mesh axes through `LOGICAL_AXIS_RULES`. A parameter matching no rule is
sharded over ``fsdp`` on its largest dimension divisible by the fsdp size, or
replicated when it is small. Activations are constrained through the same logical
names with `constrain`, at the few places the train step fixes a layout.
"""

from __future__ import annotations

import re
import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from drifting_jax import errors

MESH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes.
LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "fsdp": "fsdp",
    "replicated": None,
}

# (path regex, logical axes per dimension). First match wins.
PARAM_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    # Embedding tables: shard the (large) vocabulary axis.
    (r".*Embed_\d+/embedding$", ("fsdp", None)),
    (r".*noise_embeds_\d+/embedding$", ("fsdp", None)),
    # Norm scales and biases stay replicated: tiny, and read by every shard.
    (r".*/(scale|bias|weight)$", (None,)),
]

# Parameters with fewer elements than this are replicated: sharding them only adds
# collectives.
MIN_SHARDED_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 means "the rest" for the data axis."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise errors.UsageError(f"mesh fsdp={fsdp} must divide the device count {n}")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} != {n} devices")
  return Mesh(device_grid(data, fsdp, devices), MESH_AXES)


def device_grid(data: int, fsdp: int, devices: Sequence[Any]) -> np.ndarray:
  """The (data, fsdp) object array of `devices` (data * fsdp of them) that the mesh uses.

  CPU devices: in their order. TPU and GPU devices: as `mesh_utils` lays them out on the
  interconnect; a layout it cannot make is a `UsageError` naming the cause, except the one
  fallback that keeps the layout topology-aware (`_split_axes_grid`), which logs a warning.
  """
  devices = list(devices)
  platforms = sorted({d.platform for d in devices})
  if len(platforms) > 1:
    # No interconnect joins two platforms' devices: such a list is a bug in the caller.
    raise errors.UsageError(f"mesh devices must be of one platform, got {', '.join(platforms)} "
                            f"({len(devices)} devices): pass one platform's devices, e.g. jax.devices()")
  if platforms == ["cpu"]:
    # CPU devices share host memory and have no topology: any order is as good as another.
    return np.asarray(devices, dtype=object).reshape(data, fsdp)
  try:
    return _layout((data, fsdp), devices, split=False)
  except NotImplementedError as e:
    # Only TPU's torus assignment raises it: the axis sizes are no products of the slice's
    # physical axis sizes (e.g. fsdp=4 on a 16x16 v5e-256).
    return _split_axes_grid(data, fsdp, devices, e)
  except Exception as e:  # noqa: BLE001  (mesh_utils raises AssertionError, ValueError, ...)
    raise errors.UsageError(_layout_failure(data, fsdp, devices, e)) from e


def _layout(shape: tuple[int, int], devices: list, split: bool) -> np.ndarray:
  """`mesh_utils.create_device_mesh`, and by chip for TPU chips described as one device per core."""
  try:
    return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=split)
  except AssertionError:
    # mesh_utils lays out TPU v4 and later only with one device per chip (megacore), but
    # libtpu describes a v4 slice for the compile mode with one device per TensorCore.
    # Lay out the chips, then put each chip's cores side by side on the fsdp axis (on the
    # data axis when fsdp has no room for them): the on-chip link is the fastest one.
    chips = _devices_by_chip(devices)
    if chips is None:
      raise
    cores, (data, fsdp) = len(chips[0]), shape
    on_fsdp = fsdp % cores == 0
    if not on_fsdp and data % cores:
      raise
    chip_shape = (data, fsdp // cores) if on_fsdp else (data // cores, fsdp)
    by_first = {id(chip[0]): chip for chip in chips}
    chip_grid = mesh_utils.create_device_mesh(chip_shape, devices=[chip[0] for chip in chips],
                                              allow_split_physical_axes=split)
    grid = np.empty(shape, dtype=object)
    for (i, j), first in np.ndenumerate(chip_grid):
      for core, device in enumerate(by_first[id(first)]):
        grid[(i, j * cores + core) if on_fsdp else (i * cores + core, j)] = device
    return grid


def _devices_by_chip(devices: list) -> list[list] | None:
  """Each chip's devices by core, when every chip holds the same number (more than one) of them."""
  chips: dict[tuple, list] = {}
  for d in devices:
    if getattr(d, "coords", None) is None or getattr(d, "core_on_chip", None) is None:
      return None
    chips.setdefault((getattr(d, "slice_index", 0), tuple(d.coords)), []).append(d)
  sizes = {len(chip) for chip in chips.values()}
  if len(sizes) != 1 or sizes == {1}:
    return None
  return [sorted(chip, key=lambda d: d.core_on_chip) for chip in chips.values()]


def _split_axes_grid(data: int, fsdp: int, devices: list, cause: Exception) -> np.ndarray:
  """mesh_utils' layout that splits a physical axis of the TPU slice, with a warning.

  A safe fallback: it is still jax's topology-aware assignment (each mesh axis runs along
  ICI neighbours) and the program computes the same thing. What is lost is bandwidth: a
  mesh axis over part of a physical ring has no wraparound link.
  """
  try:
    grid = _layout((data, fsdp), devices, split=True)
  except Exception as e:  # noqa: BLE001
    raise errors.UsageError(_layout_failure(data, fsdp, devices, cause)) from e
  logging.warning(
      "mesh data=%d x fsdp=%d does not follow the physical axes of %s: laid out splitting a "
      "physical axis, so a mesh axis runs its collectives over part of an ICI ring, without its "
      "wraparound link (less bandwidth than whole rings). mesh.fsdp values that follow the axes: %s",
      data, fsdp, _describe(devices), ", ".join(map(str, _fitting_fsdp(devices))) or "none")
  return grid


def _fitting_fsdp(devices: list) -> list[int]:
  """The fsdp sizes whose (rest, fsdp) mesh mesh_utils lays out over `devices` as they are."""
  n, sizes = len(devices), []
  for fsdp in (f for f in range(1, n + 1) if n % f == 0):
    try:
      _layout((n // fsdp, fsdp), devices, split=False)
    except Exception:  # noqa: BLE001  (any refusal: this size does not fit)
      continue
    sizes.append(fsdp)
  return sizes


def _chip_span(devices: list) -> tuple[int, ...] | None:
  """The size of the box of chip coordinates the devices cover (None without coordinates)."""
  coords = [getattr(d, "coords", None) for d in devices]
  if not all(c is not None and len(c) for c in coords):
    return None
  return tuple(max(c[i] for c in coords) - min(c[i] for c in coords) + 1 for i in range(len(coords[0])))


def _describe(devices: list) -> str:
  """E.g. "16 tpu devices (TPU v6 lite, chips spanning 4x4x1)"."""
  first, span = devices[0], _chip_span(devices)
  where = f", chips spanning {'x'.join(map(str, span))}" if span else ""
  return f"{len(devices)} {first.platform} devices ({getattr(first, 'device_kind', 'unknown kind')}{where})"


def _layout_failure(data: int, fsdp: int, devices: list, e: Exception) -> str:
  """The one-line `UsageError` message of a layout mesh_utils refuses: what, why, and the fix."""
  fitting = _fitting_fsdp(devices)
  if fitting:
    fix = (f"set mesh.fsdp to a split this topology allows: one of {', '.join(map(str, fitting))} "
           "(mesh.data=-1 takes the rest)")
  else:
    fix = "no mesh.fsdp fits these devices either: pass all the devices of one slice or host (jax.devices())"
  detail = " ".join(str(e).split())  # one line, as main prints a UsageError
  if len(detail) > 300:  # jax's "hole" message lists every device
    detail = detail[:300] + " ..."
  span = _chip_span(devices)
  chips = len({(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}) if span else 0
  # mesh_utils' own words for this case are only a device list.
  hole = f"their {chips} chips do not fill that box (a slice with holes); " if chips and chips < np.prod(span) else ""
  return (f"cannot lay out the mesh data={data} x fsdp={fsdp} over {_describe(devices)}: {hole}"
          f"mesh_utils.create_device_mesh raised {type(e).__name__}: {detail}; {fix}")


def logical_to_mesh(logical: Sequence[str | None]) -> P:
  return P(*(LOGICAL_AXIS_RULES.get(name) if name else None for name in logical))


def _path_string(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh) -> P:
  """The PartitionSpec of one parameter (see module doc)."""
  fsdp = mesh.shape["fsdp"]
  for pattern, logical in PARAM_RULES:
    if re.fullmatch(pattern, path):
      spec = logical_to_mesh(logical[: len(shape)])
      return _drop_indivisible(spec, shape, mesh)
  if fsdp == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*(["fsdp" if d == dim else None for d in range(len(shape))]))
  return P()


def _drop_indivisible(spec: P, shape, mesh: Mesh) -> P:
  """Replicate along any dimension the mesh axes do not divide."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else (axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if size > 1 and dim % size == 0 else None)
  return P(*out)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a parameter-like tree (params, EMA, Adam moments)."""
  def leaf_sharding(path, leaf):
    shape = getattr(leaf, "shape", ())
    if not shape:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, param_spec(_path_string(path), shape, mesh))
  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis split over every device, the rest replicated."""
  return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1)))


def with_shardings(tree: Any, shardings: Any) -> Any:
  """Abstract arrays (`jax.ShapeDtypeStruct`) of `tree`'s shapes and dtypes carrying `shardings`:
  what a program is lowered for before any array exists."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x, mesh: Mesh, logical: Sequence[str | None]):
  """with_sharding_constraint through logical names, skipped when the axis does not divide."""
  spec = _drop_indivisible(logical_to_mesh(logical), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def global_batch_sharding(global_shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  """Where a global batch array lives: rows split over every device when they divide
  the device count, else replicated (see `host_to_global`; the compile mode lays out
  its abstract batch with the same rule)."""
  if len(global_shape) and global_shape[0] % mesh.size == 0:
    return batch_sharding(mesh, len(global_shape))
  return replicated(mesh)


# The mesh that models' activation constraints refer to, while a step is traced.
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh) -> Iterator[None]:
  """Within it, `constrain_activation` lays activations out on `mesh` (outside it, it is
  a no-op: single-device code, sampling and tests are unchanged)."""
  token = _ACTIVATION_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def activation_mesh() -> Mesh | None:
  """The mesh of the enclosing `activation_rules` (None outside one)."""
  return _ACTIVATION_MESH.get()


def constrain_activation(x, logical: Sequence[str | None]):
  """`constrain` on the mesh of the enclosing `activation_rules`, if any."""
  mesh = _ACTIVATION_MESH.get()
  return x if mesh is None or mesh.size == 1 else constrain(x, mesh, logical)


def host_to_global(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array from this process's rows (multi-host safe).

  The rows are split over every device when their global count divides the device
  count. Otherwise (e.g. 2 classes per step on 8 devices) the array is replicated:
  each process contributes its rows to a host-level all-gather first, so every
  process holds the same global batch; the train step's activation constraints
  then shard the much larger per-sample arrays it derives from it.
  """
  local = np.asarray(local)
  global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:]) if local.ndim else ()
  sharding = global_batch_sharding(global_shape, mesh)
  if sharding.spec != P():
    return jax.make_array_from_process_local_data(sharding, local)
  if jax.process_count() > 1:
    local = np.asarray(multihost_utils.process_allgather(local, tiled=True))
  return jax.make_array_from_process_local_data(replicated(mesh), local)


def batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Every array of a host batch as one global array (`host_to_global`)."""
  return {name: host_to_global(local, mesh) for name, local in batch.items()}
