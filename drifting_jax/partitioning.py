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
  try:
    grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
  except Exception:  # e.g. CPU devices without topology; a plain reshape is fine there.
    grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, MESH_AXES)


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
