"""Generator loading for evaluation, and the `sample` mode (samples.npz + PNG grid).

A generator comes from an artifact (`eval.source`) or from a training checkpoint,
of which only the EMA parameters are restored (a partial restore whose target is
built from the generator model alone: no optimizer, train state or feature network).
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from drifting_jax import checkpointing, errors, partitioning, paths
from drifting_jax.data import images
from drifting_jax.models import artifacts, generator as generator_lib


def load_generator(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(module, EMA params, step or None) to evaluate.

  Source, in order: `config.eval.source` (an artifact folder or hf://NAME); the
  checkpoint at `step` (or config.eval.step >= 0); the latest checkpoint of the
  workdir. A missing or corrupt checkpoint is a clear error.
  """
  source = config.eval.source
  if source:
    module, params, _ = artifacts.load(source, kind="gen")
    return module, params, None
  step = config.eval.step if step is None and config.eval.step >= 0 else step
  directory = paths.as_path(workdir) / "checkpoints"
  # Checked first: opening a Checkpointer creates the folder, and a mistyped
  # workdir should not be left behind as an empty run.
  ckpt = checkpointing.Checkpointer(workdir, async_save=False) if directory.is_dir() else None
  if ckpt is None or ckpt.latest_step() is None:
    raise checkpointing.CheckpointError(
        f"no checkpoint in {directory}: train first, or set --config.eval.source to a params_ema "
        f"folder or hf://NAME")
  # Only the EMA parameters are read: their structure comes from the generator alone,
  # so neither the optimizer, the training state nor the feature network is built.
  model_config = generator_lib.model_config_from_run(config)
  module = generator_lib.build_module(model_config)
  mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp)
  abstract = {"ema_params": artifacts.abstract_params("gen", model_config)}
  # The same path names as in the train state, so each parameter gets its training sharding.
  shardings = partitioning.tree_shardings(abstract, mesh)
  abstract = partitioning.with_shardings(abstract, shardings)
  restored_step, restored = ckpt.restore_subtree(abstract, step)
  return module, restored["ema_params"], restored_step


# The mesh axes of the two sampling layouts. `host_local_params`: this host's devices,
# over which `generate` splits each batch (replicated params and an unsplit batch
# would have every device compute the whole batch). `global_params`: every device of
# every host, ordered by host, so that one program samples all hosts' batches at once.
_HOST_AXIS = "host_devices"
_GLOBAL_AXIS = "all_devices"

# `eval.sampling_layout`, and the layout "auto" picks where per-host programs are refused.
LAYOUTS = ("auto", "per_host", "global")


def _on_this_host(params) -> bool:
  """Whether this process holds every device of every array (numpy arrays: yes)."""
  return all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(params))


def resolve_layout(layout: str, device_kind: str, process_count: int) -> str:
  """"per_host" or "global" for `eval.sampling_layout`.

  "auto" is per-host, except on a multi-host TPU v5e (v5 lite) slice: libtpu refuses
  a program over part of such a slice ("limited ICI routing ... should include all
  slice devices", found compiling for v5e-256, docs/scaling.md), so there every host
  joins one program over all chips.
  """
  if layout not in LAYOUTS:
    raise errors.UsageError(f"eval.sampling_layout must be one of {LAYOUTS}, got {layout!r}")
  if layout != "auto":
    return layout
  v5e = "v5 lite" in device_kind.lower() or "v5e" in device_kind.lower()
  return "global" if v5e and process_count > 1 else "per_host"


def layout_params(params, layout: str):
  """`params` placed for `generate` in `layout` (see `resolve_layout`); a collective with
  several processes: every process calls it at the same point."""
  layout = resolve_layout(layout, jax.devices()[0].device_kind, jax.process_count())
  return global_params(params) if layout == "global" else host_local_params(params)


def _whole_on_this_host(params):
  """Every array in full on this process (gathered from the others where it is split)."""
  if _on_this_host(params):
    return params
  return multihost_utils.process_allgather(params, tiled=True)


def host_local_params(params):
  """`params` as arrays this process can use on its own devices, without the other hosts.

  A checkpoint restored on several processes holds global arrays (sharded by fsdp
  over every host's devices). Sampling from them with each host's own labels would be
  one program over all hosts whose inputs differ between hosts, which jax takes to
  be one replicated value: each host would get samples for some other host's labels.
  So with more than one process they are gathered in full (a collective: every
  process calls this at the same point) and replicated over this host's devices. On
  one process, or for arrays every device of which this process holds, nothing moves.
  """
  if _on_this_host(params):
    return params
  local = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.local_devices()), (_HOST_AXIS,)),
                                     jax.sharding.PartitionSpec())
  return jax.device_put(_whole_on_this_host(params), local)


def global_mesh(devices=None) -> jax.sharding.Mesh:
  """Every device (default: `jax.devices()`), ordered by host: host p's devices hold
  block p of a batch split over the mesh."""
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
  per_host = collections.Counter(d.process_index for d in devices)
  if len(set(per_host.values())) > 1:
    raise ValueError(f"the global sampling layout needs as many devices on every host, got {dict(per_host)}")
  return jax.sharding.Mesh(np.asarray(devices), (_GLOBAL_AXIS,))


def global_params(params):
  """`params` replicated on every device of every host, for the global sampling layout.

  The same placement as `host_local_params`, but as global arrays: one program over all
  chips then samples every host's batch at once, each host's rows on its own chips (no
  collective inside it). This is the layout for slices whose compiler refuses a program
  over one host's chips (`resolve_layout`). A collective with several processes.
  """
  whole = _whole_on_this_host(params)
  replicated = jax.sharding.NamedSharding(global_mesh(), jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), replicated,
                                                             lambda index, x=np.asarray(x): x[index]), whole)


def _batch_sharding(params):
  """(layout, sharding that splits a batch) for params from `host_local_params` or
  `global_params`; ("plain", None) for params used as they are."""
  leaves = jax.tree.leaves(params)
  sharding = getattr(leaves[0], "sharding", None) if leaves else None
  if isinstance(sharding, jax.sharding.NamedSharding):
    for layout, axis in (("per_host", _HOST_AXIS), ("global", _GLOBAL_AXIS)):
      if sharding.mesh.axis_names == (axis,):
        return layout, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(axis))
  return "plain", None


def _noise_rows(module, key, batch_size: int, temperature: float, rows: np.ndarray, cache: dict) -> dict:
  """The noise of list rows `rows` (global indices): row g is row g % batch_size of the
  draw for batch g // batch_size, drawn with (seed, that batch index) alone."""
  parts = []
  for batch in np.unique(rows // batch_size):
    if batch not in cache:
      cache.clear()  # rows come in order: only the current draw is used again
      cache[batch] = jax.tree.map(np.asarray, generator_lib.draw_noise(
          module, jax.random.fold_in(key, int(batch)), batch_size, temperature))
    picked = rows[rows // batch_size == batch] % batch_size
    parts.append(jax.tree.map(lambda x: x[picked], cache[batch]))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def generate(module, params, labels: np.ndarray, cfg_scale: float, seed: int, batch_size: int = 500,
             temperature: float = 1.0, *, first_index: int = 0) -> np.ndarray:
  """fp32 samples for `labels`, in batches of one compiled shape (partial batches padded).

  `labels` are rows `first_index ...` of a longer list that several hosts share out
  (0: the whole list). Sample g of the list gets row g % batch_size of the noise drawn
  for batch g // batch_size with (seed, that batch index) alone, so the samples do
  not depend on how the list was split over processes or on the layout, and samples
  at different `temperature`s (the Gaussian noise's scale) are the same draws, scaled.
  `params` must be usable by this process alone (`host_local_params`), or be laid
  out over every host (`global_params`: then every process calls this together).
  """
  layout, split = _batch_sharding(params)
  if layout == "global":
    return _generate_global(module, params, split, labels, cfg_scale, seed, batch_size, temperature,
                            first_index=first_index)
  if not _on_this_host(params):
    raise ValueError("generate() needs parameters on this process's devices; with several processes "
                     "pass them through host_local_params() or global_params() first")
  labels = np.asarray(labels, np.int32)
  if not len(labels):  # a host with no share of the list
    return np.zeros((0, module.input_size, module.input_size, module.out_channels), np.float32)
  start, end = int(first_index), int(first_index) + len(labels)
  key = jax.random.PRNGKey(seed)
  # Split over this host's devices, a batch is padded to a multiple of their number;
  # the noise is drawn for `batch_size` rows all the same, so padding changes no sample.
  rows_per_call = batch_size if split is None else -(-batch_size // split.mesh.size) * split.mesh.size
  out = []
  for batch in range(start // batch_size, -(-end // batch_size)):
    lo, hi = max(start, batch * batch_size), min(end, (batch + 1) * batch_size)
    rows = slice(lo - batch * batch_size, hi - batch * batch_size)
    padded = np.zeros(rows_per_call, np.int32)  # rows outside this part of the list: label 0, dropped
    padded[rows] = labels[lo - start:hi - start]
    noise = generator_lib.draw_noise(module, jax.random.fold_in(key, batch), batch_size, temperature)
    if split is not None:
      noise = jax.tree.map(lambda x: jax.device_put(
          jnp.pad(x, [(0, rows_per_call - batch_size)] + [(0, 0)] * (x.ndim - 1)), split), noise)
      padded = jax.device_put(padded, split)
    samples = generator_lib.sample(module, params, padded, cfg_scale, noise=noise)
    out.append(np.asarray(samples)[rows])
  return np.concatenate(out)


def _generate_global(module, params, split, labels, cfg_scale, seed, batch_size, temperature, *,
                     first_index: int) -> np.ndarray:
  """`generate` in the global layout: one program over every host's chips per call, in
  which each host samples up to `batch_size` rows of its own share on its own chips.

  Every process makes the same number of calls (the most any host needs; a host with
  fewer rows pads), and each host's inputs become its block of the global batch
  (`make_array_from_process_local_data`), so no host's labels reach another's rows.
  """
  labels = np.asarray(labels, np.int32)
  local_devices = split.mesh.size // jax.process_count()
  rows_per_call = -(-batch_size // local_devices) * local_devices
  most = int(np.max(multihost_utils.process_allgather(np.int32(len(labels)))))
  start, key, cache, out = int(first_index), jax.random.PRNGKey(seed), {}, []
  for call in range(-(-most // batch_size)):
    lo, hi = min(len(labels), call * batch_size), min(len(labels), (call + 1) * batch_size)
    rows = np.arange(start + lo, start + hi)
    padded = np.zeros(rows_per_call, np.int32)  # padding: label 0, noise of the first row, dropped
    padded[:hi - lo] = labels[lo:hi]
    noise = _noise_rows(module, key, batch_size, temperature, rows if len(rows) else np.zeros(1, int), cache)
    noise = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:1], rows_per_call - len(x), 0)]), noise)
    generator_lib.check_labels(padded, module.num_classes)  # here: `sample` cannot read the global array
    cfg = np.full(rows_per_call, cfg_scale, np.float32)
    global_labels, global_cfg, global_noise = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(split, x), (padded, cfg, noise))
    samples = generator_lib.sample(module, params, global_labels, global_cfg, noise=global_noise)
    shards = sorted(samples.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    out.append(np.concatenate([np.asarray(shard.data) for shard in shards])[:hi - lo])
  if not out:
    return np.zeros((0, module.input_size, module.input_size, module.out_channels), np.float32)
  return np.concatenate(out)


# --------------------------------------------------------------------------- the sampling program


@dataclasses.dataclass
class SampleProgram:
  """Evaluation's sampling step on a slice: `generator.sample_program` (the function
  `generate` calls) with abstract inputs laid out as evaluation lays them out."""
  module: Any
  args: tuple
  samples_per_call: int
  devices_per_program: int
  samplers: int          # programs running at once over the slice (one per host, or one)
  description: str

  def lower(self):
    return generator_lib.sample_program.lower(self.module, *self.args)

  def compile(self, compiler_options=None):
    return self.lower().compile(compiler_options=compiler_options)

  def fn(self, params, labels, cfg, noise):
    """The sampled function itself, for counting its FLOPs."""
    return self.module.apply({"params": params}, labels, cfg, noise=noise)["samples"].astype(jnp.float32)


def build_sample_program(config: ml_collections.ConfigDict, mesh, hosts: int) -> SampleProgram:
  """The sampling step of `eval.batch_size` samples from the EMA params, over `mesh` of `hosts` hosts.

  On one host: the params as in training, the batch split over the mesh. On several,
  in `eval.sampling_layout` (`resolve_layout`): per host, each host samples its own
  share on its own devices, from params gathered to it and replicated over its
  devices, each batch split over them (one host's program; the slice's rate is the
  hosts'); global, the same placement in one program over every chip, each host's
  batch on its own chips.
  """
  model_config = generator_lib.model_config_from_run(config)
  module = generator_lib.build_module(model_config)
  params = artifacts.abstract_params("gen", model_config)
  n = int(config.eval.batch_size)
  layout = resolve_layout(config.eval.sampling_layout, mesh.devices.flat[0].device_kind, hosts)
  if hosts > 1:
    if layout == "global":
      program_mesh, samplers = global_mesh(list(mesh.devices.flat)), 1
      per_host = program_mesh.size // hosts
      n = hosts * (-(-n // per_host) * per_host)
      description = (f"global: params replicated over all {program_mesh.size} devices, each of the "
                     f"{hosts} hosts' batches split over its own devices, in one program")
    else:
      first_host = mesh.devices.flat[0].process_index
      program_mesh = jax.sharding.Mesh(
          np.asarray([d for d in mesh.devices.flat if d.process_index == first_host]), (_HOST_AXIS,))
      n = -(-n // program_mesh.size) * program_mesh.size  # generate pads each batch to a multiple of the devices
      samplers = hosts
      description = (f"per host: params replicated over the host's {program_mesh.size} devices, each batch "
                     f"split over them; {hosts} hosts sample at once")
    param_shardings = jax.tree.map(lambda _: partitioning.replicated(program_mesh), params)
    batch = jax.sharding.NamedSharding(program_mesh, jax.sharding.PartitionSpec(program_mesh.axis_names[0]))
  else:
    program_mesh, samplers = mesh, 1
    param_shardings = partitioning.tree_shardings(params, mesh)
    batch = partitioning.global_batch_sharding((n,), mesh)
    description = "one host: params as in training, the batch split over the mesh"
  noise = jax.eval_shape(lambda: generator_lib.draw_noise(module, jax.random.PRNGKey(0), n))
  args = (partitioning.with_shardings(params, param_shardings),
          jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch), jax.ShapeDtypeStruct((n,), jnp.float32, sharding=batch),
          jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch), noise))
  return SampleProgram(module=module, args=args, samples_per_call=n, devices_per_program=program_mesh.size,
                       samplers=samplers, description=description)


def sample_to_files(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """Writes samples.npz (images or latents, labels) and a PNG grid; returns the folder."""
  module, params, step = load_generator(config, workdir)
  # Every host draws the same samples (in the global layout, one program over all
  # chips draws them once for every host); process 0 writes them.
  params = layout_params(params, config.eval.sampling_layout)
  classes = np.asarray(config.sample.classes or range(config.data.num_classes), np.int32)
  labels = np.repeat(classes, config.sample.per_class)
  samples = generate(module, params, labels, float(config.sample.cfg_scale), int(config.sample.seed),
                     batch_size=min(int(config.eval.batch_size), len(labels)),
                     temperature=float(config.sample.temperature))
  out = paths.as_path(workdir)
  if jax.process_index() == 0:
    if samples.shape[-1] in (1, 3):
      pixels = images.model_to_uint8(samples)
      paths.save_npz(out / "samples.npz", {"images": pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
                                           "labels": labels})
      per_row = min(config.sample.per_class, 20)
      shown = np.concatenate([pixels[labels == c][:per_row] for c in classes])
      images.save_png(out / "samples.png", images.grid(shown, rows=len(classes)))
    else:
      paths.save_npz(out / "samples.npz", {"latents": samples, "labels": labels})
  return out


def sample_mode(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """The `sample` mode: `sample_to_files`, and where the files went (process 0)."""
  path = sample_to_files(config, workdir)
  if jax.process_index() == 0:
    print(f"samples written to {path}")
  return path
