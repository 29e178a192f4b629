"""`--mode=compile`: the run's programs compiled for a TPU slice or GPU hosts, with no TPU, GPU, data or weights.

    python -m drifting_jax.main --mode=compile --config=configs/imagenet_latent_ablation.py \\
        --config.compile.target=v6e-64 --workdir=runs/compile/ablation_v6e64

The training step is built by the trainer's own functions (`trainer.state_factory`,
the partition rules, `trainer.jit_train_step`) from the same config, over a mesh of
the slice's devices as libtpu describes them (or the GPUs' as the CUDA plugin does:
`--config.compile.target=h100x8`, scale/targets.py); its inputs are abstract arrays
carrying the shardings `train` would give them. The TPU (or GPU) compiler then
reports, per device, what the step needs (memory) and what it does (FLOPs, bytes,
collectives).

The report (`compile_report.json` and a printed table) labels every time as the
compiler's estimate or a roofline: nothing here is measured on a chip.

Programs (`compile.programs`):
  train   the generator's training step (and, with `compile.loss_share`, the same step
          with the objective replaced by a trivial one: the loss's share of the step);
  sample  the evaluation's sampling step (EMA generator on `eval.batch_size` labels);
  mae     the MAE pretraining step (`config.mae`, configs/imagenet_mae_latent_256.py).
"""

from __future__ import annotations

import json
import pathlib
from importlib import metadata as importlib_metadata
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from drifting_jax import errors, partitioning
from drifting_jax.eval import sampling
from drifting_jax.models import artifacts, generator as generator_lib, mae as mae_lib
from drifting_jax.scale import analysis, flops as flops_lib, targets as targets_lib
from drifting_jax.train import mae_pretrain, optim, train_step as train_step_lib, trainer

GIB = 2**30
PROGRAMS = ("train", "sample", "mae")


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes(tree: Any) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def make_mesh(config: ml_collections.ConfigDict, target: targets_lib.Target) -> jax.sharding.Mesh:
  devices = target.devices()
  try:
    return partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
  except ValueError as e:
    raise errors.UsageError(f"mesh data={config.mesh.data} x fsdp={config.mesh.fsdp} does not fit "
                            f"{target.name} ({len(devices)} devices): {e}") from None


def mae_architecture(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(MAE module, abstract params) of `feature.mae_path`: from the artifact's metadata when
  it is on this machine, else from the named size `compile.mae_model` (no weights are read)."""
  path = str(config.feature.mae_path)
  folder = pathlib.Path(path).expanduser()
  if not path.startswith(artifacts.HF_SCHEME) and (folder / artifacts.METADATA_FILE).is_file():
    model_config = artifacts.read_metadata(folder)["model_config"]
    source = f"metadata of {folder}"
  else:  # never download 1.7 GB of weights for their shapes
    model_config = mae_lib.model_config_for(config.compile.mae_model)
    source = f"named size {config.compile.mae_model!r} (compile.mae_model; feature.mae_path={path})"
  logging.info("compile: MAE architecture from the %s", source)
  return mae_lib.build_module(model_config), artifacts.abstract_params("mae", model_config), source


# --------------------------------------------------------------------------- train step


class TrainProgram:
  """The training step of `config` over `mesh`: jitted function, abstract inputs, pieces for counting."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, objective=None):
    t = config.train
    self.config, self.mesh = config, mesh
    self.module = generator_lib.build_module({**generator_lib.model_config_from_run(config),
                                              "remat": bool(config.model.remat)})
    if config.feature.kind == "mae":
      mae_module, mae_params, self.mae_source = mae_architecture(config)
      self.feature_apply, feature_params, feature_dtype = trainer.build_features(
          config, mae_module=mae_module, mae_params=mae_params)
    else:
      self.feature_apply, feature_params, feature_dtype = trainer.build_features(config)
      self.mae_source = None
    feature_params = jax.eval_shape(lambda p: trainer.frozen_feature_params(p, feature_dtype), feature_params)
    self.sample_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    self.feature_names = sorted(jax.eval_shape(self.feature_apply, feature_params,
                                               jax.ShapeDtypeStruct((1, *self.sample_shape), jnp.float32)))
    self.tx, self.schedule = optim.make_optimizer(config.optim, t.total_steps, t.max_grad_norm)
    abstract_state = jax.eval_shape(trainer.state_factory(config, self.module, self.tx, self.feature_names))
    self.state_shardings = partitioning.tree_shardings(abstract_state, mesh)
    feature_shardings = trainer.feature_param_shardings(feature_params, mesh, config.feature.get("param_placement", "fsdp"))
    step = train_step_lib.make_train_step(generator=self.module, tx=self.tx, schedule=self.schedule,
                                          feature_apply=self.feature_apply, config=config, mesh=mesh,
                                          objective=objective)
    self.step = step
    self.jitted = trainer.jit_train_step(step, self.state_shardings, feature_shardings, mesh)
    b = t.classes_per_step
    shapes = {"labels": ((b,), jnp.int32), "positives": ((b, t.pos_per_class, *self.sample_shape), jnp.float32),
              "negatives": ((b, t.neg_per_class, *self.sample_shape), jnp.float32)}
    self.batch = {k: jax.ShapeDtypeStruct(s, d, sharding=partitioning.global_batch_sharding(s, mesh))
                  for k, (s, d) in shapes.items()}
    self.state = _abstract(abstract_state, self.state_shardings)
    self.feature_params = _abstract(feature_params, feature_shardings)
    self.generator_params = _count(abstract_state.params)
    self.feature_param_count = _count(feature_params)
    self.feature_param_bytes = _bytes(feature_params)

  def args(self):
    return self.state, self.feature_params, self.batch

  def analytical_flops(self) -> dict[str, float]:
    """Global matmul/conv FLOPs of one step by piece (`flops`), and of the whole traced step."""
    t, cfg = self.config.train, self.config
    n_gen = t.classes_per_step * t.gen_per_class
    n_data = t.classes_per_step * (t.pos_per_class + t.neg_per_class)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.state.params)
    fparams = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.feature_params)
    labels = jax.ShapeDtypeStruct((n_gen,), jnp.int32)
    scales = jax.ShapeDtypeStruct((n_gen,), jnp.float32)
    rng = jax.random.PRNGKey(0)

    def generate(p, l, c):
      return self.module.apply({"params": p}, l, c, rngs={"noise": rng})["samples"].astype(jnp.float32)

    def features_sum(x, fp):
      return sum(jnp.sum(v) for v in self.feature_apply(fp, x).values())

    # Each piece is its own traced program (its backward as JAX builds it: no weight
    # gradients through the frozen features, none to the generator's noise input).
    gen_fwd_bwd = flops_lib.program_flops(jax.grad(lambda p, l, c: jnp.sum(generate(p, l, c))), params, labels, scales)
    gen_samples = jax.ShapeDtypeStruct((n_gen, *self.sample_shape), jnp.float32)
    data_samples = jax.ShapeDtypeStruct((n_data, *self.sample_shape), jnp.float32)
    features_generated = flops_lib.program_flops(jax.grad(features_sum), gen_samples, fparams)
    features_data = flops_lib.program_flops(self.feature_apply, fparams, data_samples)
    feature_shapes = jax.eval_shape(self.feature_apply, fparams,
                                    jax.ShapeDtypeStruct((1, *self.sample_shape), jnp.float32))
    objective = train_step_lib.objective_from_config(cfg.loss)
    b = t.classes_per_step

    def loss_of(gen):
      total = 0.0
      for name, shape in feature_shapes.items():
        _, tokens, dim = shape.shape
        pos = jnp.zeros((b, t.pos_per_class, tokens, dim))
        neg = jnp.zeros((b, t.neg_per_class, tokens, dim)) if t.neg_per_class else None
        w = jnp.ones((b, t.neg_per_class)) if t.neg_per_class else None
        total = total + jnp.mean(objective(gen[name], pos, neg, weight_neg=w, distance_scale=None)[0])
      return total

    gen_features = {name: jax.ShapeDtypeStruct((b, t.gen_per_class, *s.shape[1:]), jnp.float32)
                    for name, s in feature_shapes.items()}
    loss = flops_lib.program_flops(jax.value_and_grad(loss_of), gen_features)
    pieces = {
        "generator_fwd_bwd": gen_fwd_bwd,
        # On generated samples: forward, and the backward to the input (the MAE's params are frozen).
        "features_generated_fwd_bwd": features_generated,
        "features_data_fwd": features_data,
        "loss_fwd_bwd": loss,
    }
    # Optimizer, EMA and clipping are elementwise: no matmuls.
    whole = flops_lib.program_flops(self.step, *[jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), x)
        for x in self.args()])
    return {"pieces": pieces, "sum_of_pieces": float(sum(pieces.values())), "traced_step": whole}


def _estimate_label(target: targets_lib.Target) -> str:
  if target.chip.platform == "cuda":  # the GPU compiler gives no time estimate (scale/analysis.py)
    return "roofline estimate (FLOPs and bytes from the compiled program), not a measurement"
  return "compiler's estimate, not a measurement"


class DoesNotFit(errors.UsageError):
  """The compiler refused the program for lack of HBM (the message is the one-line verdict)."""


# The compiler's two ways of saying it: "Used 40.1G of 31.25G hbm" and "memory required
# for HLO temporaries (1.33T) exceeds available HBM (15.75G)".
_HBM_NUMBERS = (re.compile(r"Used\s+([0-9.]+)([KMGT]?)\s+of\s+([0-9.]+)([KMGT]?)\s+hbm", re.IGNORECASE),
                re.compile(r"required for (HLO \w+) \(([0-9.]+)([KMGT]?)\) exceeds available HBM \(([0-9.]+)([KMGT]?)\)",
                           re.IGNORECASE))
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _compile(jitted, args, what: str, target: targets_lib.Target) -> tuple[Any, float]:
  start = time.perf_counter()
  logging.info("compile: lowering and compiling %s", what)
  try:
    compiled = jitted.lower(*args).compile(compiler_options=targets_lib.compiler_options(target))
  except Exception as e:  # noqa: BLE001  (XlaRuntimeError; its type moves between jax versions)
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise
    used, required = (pattern.search(text) for pattern in _HBM_NUMBERS)
    capacity = target.chip.device_hbm_bytes
    device = analysis.device_word(target)
    if used or required:
      number, unit = (used.group(1), used.group(2)) if used else (required.group(2), required.group(3))
      need = float(number) * _UNITS[unit.upper()]
      what_needs = "" if used else f" for {required.group(1).replace('HLO ', '')} alone"
      verdict = (f"{what} does not fit: needs {need / GIB:,.2f} GiB{what_needs} per {target.chip.generation} "
                 f"{device}, which has {capacity / GIB:.0f} GiB ({(need - capacity) / GIB:,.2f} GiB over; "
                 "the compiler ran out of HBM)")
    else:
      first = next((line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line), text.splitlines()[0])
      verdict = (f"{what} does not fit in the {capacity / GIB:.0f} GiB of a {target.chip.generation} {device}: "
                 f"{first.strip()[:300]}")
    raise DoesNotFit(verdict) from None
  seconds = time.perf_counter() - start
  logging.info("compile: %s compiled in %.1f s", what, seconds)
  return compiled, seconds


def train_flops(program: TrainProgram, devices: int, compiler_flops: float) -> dict[str, Any]:
  """The report's FLOP section of the training step: the compiler's count beside the analytical one."""
  counts = program.analytical_flops()
  analytical = counts["traced_step"] / devices
  return {
      "compiler_per_device": compiler_flops,
      "analytical_per_device": analytical,
      "analytical_pieces_global": counts["pieces"],
      "analytical_sum_of_pieces_global": counts["sum_of_pieces"],
      "analytical_traced_step_global": counts["traced_step"],
      "compiler_over_analytical": compiler_flops / analytical if analytical else None,
      "note": ("analytical = matmul and convolution FLOPs of the traced step (2 per multiply-add; "
               "a convolution's taps on padding not counted, as XLA does not), divided over the devices; "
               "the compiler also counts elementwise work"),
  }


def compile_train(config: ml_collections.ConfigDict, target: targets_lib.Target, mesh) -> dict[str, Any]:
  t = config.train
  program = TrainProgram(config, mesh)
  compiled, seconds = _compile(program.jitted, program.args(), "the training step", target)
  report = analysis.analyze(compiled, target)
  compiler_flops = report["flops_per_device"]
  report["flops"] = train_flops(program, mesh.size, compiler_flops)
  analytical = report["flops"]["analytical_per_device"]
  seconds_per_step = report["time"]["seconds"]
  images = t.classes_per_step * t.gen_per_class
  report["projection"] = {
      "label": _estimate_label(target),
      "step_seconds": seconds_per_step,
      "generated_images_per_second": images / seconds_per_step if seconds_per_step else None,
      "total_steps": int(t.total_steps),
      "run_hours": seconds_per_step * t.total_steps / 3600.0,
      "mfu": (analytical / (target.chip.device_peak_flops * seconds_per_step)) if seconds_per_step else None,
  }
  report.update(compile_seconds=seconds, generator_params=program.generator_params,
                feature_params=program.feature_param_count, feature_param_bytes=program.feature_param_bytes,
                mae_architecture=program.mae_source,
                batch={"classes_per_step": int(t.classes_per_step), "gen_per_class": int(t.gen_per_class),
                       "pos_per_class": int(t.pos_per_class), "neg_per_class": int(t.neg_per_class),
                       "generated_per_step": images})
  del compiled
  if config.compile.loss_share:
    trivial = TrainProgram(config, mesh, objective=train_step_lib.trivial_objective)
    compiled, trivial_seconds = _compile(trivial.jitted, trivial.args(), "the step with a trivial objective", target)
    trivial_report = analysis.analyze(compiled, target)
    without = trivial_report["time"]["seconds"]
    report["loss_share"] = {
        "label": _estimate_label(target),
        "step_seconds_trivial_objective": without,
        "time_trivial_objective": trivial_report["time"],
        "share": (seconds_per_step - without) / seconds_per_step if seconds_per_step else None,
        "flops_share": ((compiler_flops - trivial_report["flops_per_device"]) / compiler_flops
                        if compiler_flops else None),
        "memory_total_bytes_trivial_objective": trivial_report["memory"]["total_bytes"],
        "compile_seconds": trivial_seconds,
    }
  return report


# --------------------------------------------------------------------------- sampling and MAE


def compile_sample(config: ml_collections.ConfigDict, target: targets_lib.Target, mesh) -> dict[str, Any]:
  """The evaluation's sampling step: `eval.batch_size` samples from the EMA params, laid out
  as evaluation lays them out (eval/sampling.py).

  On one host: the params as in training, the batch split over the mesh. On several,
  in `eval.sampling_layout` (`sampling.resolve_layout`): per host, each host samples
  its own share on its own devices, from params gathered to it and replicated over its
  devices, each batch split over them (one host's program is compiled, and the slice's
  rate is the hosts'); global, the same placement in one program over every chip, each
  host's batch on its own chips.
  """
  module = generator_lib.build_module(generator_lib.model_config_from_run(config))
  params = artifacts.abstract_params("gen", generator_lib.model_config_from_run(config))
  n = int(config.eval.batch_size)
  layout = sampling.resolve_layout(config.eval.sampling_layout, mesh.devices.flat[0].device_kind, target.hosts)
  if target.hosts > 1:
    if layout == "global":
      program_mesh, samplers = sampling.global_mesh(list(mesh.devices.flat)), 1
      per_host = program_mesh.size // target.hosts
      n = target.hosts * (-(-n // per_host) * per_host)
      description = (f"global: params replicated over all {program_mesh.size} devices, each of the "
                     f"{target.hosts} hosts' batches split over its own devices, in one program")
    else:
      first_host = mesh.devices.flat[0].process_index
      program_mesh = jax.sharding.Mesh(
          np.asarray([d for d in mesh.devices.flat if d.process_index == first_host]), ("host_devices",))
      n = -(-n // program_mesh.size) * program_mesh.size  # generate pads each batch to a multiple of the devices
      samplers = target.hosts
      description = (f"per host: params replicated over the host's {program_mesh.size} devices, each batch "
                     f"split over them; {target.hosts} hosts sample at once")
    axis = program_mesh.axis_names[0]
    shardings = jax.tree.map(lambda _: partitioning.replicated(program_mesh), params)
    batch = jax.sharding.NamedSharding(program_mesh, jax.sharding.PartitionSpec(axis))
    out = jax.sharding.NamedSharding(program_mesh, jax.sharding.PartitionSpec(axis, None, None, None))
  else:
    shardings = partitioning.tree_shardings(params, mesh)
    batch = partitioning.global_batch_sharding((n,), mesh)
    out = partitioning.global_batch_sharding((n, 1, 1, 1), mesh)
    program_mesh, samplers = mesh, 1
    description = "one host: params as in training, the batch split over the mesh"

  def sample(p, labels, cfg, rng):
    return module.apply({"params": p}, labels, cfg, rngs={"noise": rng})["samples"].astype(jnp.float32)

  rng_sharding = partitioning.replicated(program_mesh)
  jitted = jax.jit(sample, in_shardings=(shardings, batch, batch, rng_sharding), out_shardings=out)
  args = (_abstract(params, shardings), jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch),
          jax.ShapeDtypeStruct((n,), jnp.float32, sharding=batch),
          jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rng_sharding))
  compiled, seconds = _compile(jitted, args, "the sampling step", target)
  report = analysis.analyze(compiled, target)
  analytical = flops_lib.program_flops(sample, *[jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
                                                 for x in args]) / program_mesh.size
  report["flops"] = {"compiler_per_device": report["flops_per_device"], "analytical_per_device": analytical,
                     "compiler_over_analytical": report["flops_per_device"] / analytical if analytical else None}
  s = report["time"]["seconds"]
  report["projection"] = {"label": _estimate_label(target), "step_seconds": s,
                          "generated_images_per_second": samplers * n / s if s else None,
                          "mfu": analytical / (target.chip.device_peak_flops * s) if s else None}
  report.update(compile_seconds=seconds, batch={"samples_per_step": n}, layout=description,
                devices_per_program=program_mesh.size)
  return report


def compile_mae(config: ml_collections.ConfigDict, target: targets_lib.Target, mesh) -> dict[str, Any]:
  """The MAE pretraining step of `config.mae` (imported here: only MAE configs have that section)."""
  if "mae" not in config:
    raise errors.UsageError("compile.programs names 'mae' but the config has no `mae` section "
                            "(use configs/imagenet_mae_latent_256.py)")
  step, jitted, args, abstract_state = mae_program(config, mesh)
  m, b = config.mae, int(config.mae.batch_size)
  compiled, seconds = _compile(jitted, args, "the MAE pretraining step", target)
  report = analysis.analyze(compiled, target)
  report["flops"] = mae_flops(step, args, mesh.size, report["flops_per_device"])
  analytical = report["flops"]["analytical_per_device"]
  s = report["time"]["seconds"]
  report["projection"] = {"label": _estimate_label(target), "step_seconds": s,
                          "images_per_second": b / s if s else None, "total_steps": int(m.total_steps),
                          "run_hours": s * m.total_steps / 3600.0,
                          "mfu": analytical / (target.chip.device_peak_flops * s) if s else None}
  report.update(compile_seconds=seconds, mae_params=_count(abstract_state.params), batch={"batch_size": b})
  return report


def mae_flops(step, args, devices: int, compiler_flops: float) -> dict[str, Any]:
  """The report's FLOP section of the MAE pretraining step: the compiler's count beside the analytical one."""
  analytical = flops_lib.program_flops(step, *args) / devices
  return {"compiler_per_device": compiler_flops, "analytical_per_device": analytical,
          "compiler_over_analytical": compiler_flops / analytical if analytical else None}


def mae_program(config: ml_collections.ConfigDict, mesh) -> tuple[Any, Any, tuple, Any]:
  """(step, jitted step, abstract args, abstract state) of the MAE pretraining step on `mesh`."""
  m = config.mae
  module = mae_lib.build_module(mae_pretrain.model_config(config))
  tx, schedule = mae_pretrain.make_optimizer(m)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  abstract_state = jax.eval_shape(lambda: mae_lib.init_train_state(module, tx, int(m.seed), shape))
  shardings = partitioning.tree_shardings(abstract_state, mesh)
  step = mae_lib.make_train_step(module, tx, ema_decay=m.ema_decay, mask_ratio_min=m.mask_ratio_min,
                                 mask_ratio_max=m.mask_ratio_max, schedule=schedule)
  jitted = jax.jit(step, out_shardings=(shardings, partitioning.replicated(mesh)), donate_argnums=(0,))
  b = int(m.batch_size)
  batch = {"images": jax.ShapeDtypeStruct((b, *shape), jnp.float32,
                                          sharding=partitioning.global_batch_sharding((b, *shape), mesh)),
           "labels": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=partitioning.global_batch_sharding((b,), mesh))}
  args = (_abstract(abstract_state, shardings), batch, jax.ShapeDtypeStruct((), jnp.float32))
  return step, jitted, args, abstract_state


COMPILERS = {"train": compile_train, "sample": compile_sample, "mae": compile_mae}


# --------------------------------------------------------------------------- report


def validate(config: ml_collections.ConfigDict, target: targets_lib.Target) -> None:
  programs = tuple(config.compile.programs)
  unknown = [p for p in programs if p not in PROGRAMS]
  if unknown or not programs:
    raise errors.UsageError(f"compile.programs must name some of {PROGRAMS}, got {programs}")
  if "train" in programs:
    trainer.validate_config(config)  # the train mode's own checks (process count: below, for the slice)
    if config.train.classes_per_step % target.hosts:
      raise errors.UsageError(f"train.classes_per_step={config.train.classes_per_step} must divide among the "
                              f"{target.hosts} hosts of {target.name}")


def _row(name: str, r: dict[str, Any]) -> list[str]:
  mem, time_, proj = r["memory"], r["time"], r.get("projection", {})
  flops = r.get("flops", {})
  ratio = flops.get("compiler_over_analytical")
  lines = [
      f"{name}: {mem['verdict']}",
      f"  memory per device: arguments {mem['arguments_bytes'] / GIB:.2f} GiB, outputs {mem['outputs_bytes'] / GIB:.2f}"
      f" (aliased {mem['aliased_bytes'] / GIB:.2f}), temporaries {mem['temporaries_bytes'] / GIB:.2f}, code "
      f"{mem['code_bytes'] / GIB:.3f}; total {mem['total_bytes'] / GIB:.2f} of {mem['capacity_bytes'] / GIB:.0f} GiB",
      f"  FLOPs per device: compiler {flops.get('compiler_per_device', 0) / 1e12:.3f} T, analytical "
      f"{flops.get('analytical_per_device', 0) / 1e12:.3f} T" + (f" (ratio {ratio:.3f})" if ratio else ""),
      f"  step time (estimate): {time_['seconds'] * 1e3:.1f} ms [{time_['source']}]; roofline "
      f"{time_['roofline_seconds'] * 1e3:.1f} ms ({time_['bound']}-bound)",
  ]
  if proj.get("run_hours") is not None:
    rate = proj.get("generated_images_per_second") or proj.get("images_per_second")
    lines.append(f"  projected (estimate): {rate:,.0f} images/s, {proj['total_steps']:,} steps in "
                 f"{proj['run_hours']:.1f} h, MFU {100 * (proj['mfu'] or 0):.1f}%")
  if "loss_share" in r:
    share = r["loss_share"]["share"]
    lines.append(f"  loss share (estimate, vs a trivial objective): {100 * share:.1f}% of the step time")
  coll = {k: v for k, v in r["collectives"].items() if v["count"]}
  lines.append("  collectives per step: " + (", ".join(f"{k} {v['count']}x {v['bytes'] / GIB:.3f} GiB"
                                                      for k, v in coll.items()) or "none"))
  for source in r.get("collective_sources", [])[:3]:  # the rest: compile_report.json
    lines.append(f"    {source['op']} {source['count']}x {source['bytes'] / GIB:.3f} GiB from {source['source'][:90]}")
  return lines


# libtpu's refusal of a program over part of a slice (found compiling the ablation's
# per-host sampling step for v5e-256; v5e-16, v6e and v5p slices accept it).
_LIMITED_ROUTING = "On platforms with limited ICI routing device assignment should include all slice devices"


def compile_mode(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Compiles `compile.programs` for `compile.target`; writes <workdir>/compile_report.json, prints a table."""
  target = targets_lib.parse(config.compile.target)
  validate(config, target)
  mesh = make_mesh(config, target)
  report: dict[str, Any] = {
      "target": target.to_dict(), "mesh": dict(mesh.shape), "jax": jax.__version__,
      "libtpu": _package_version("libtpu"), "config": {"model": config.model.name, "loss": config.loss.objective,
                                             "kernel": config.loss.kernel, "remat": bool(config.model.remat)},
      "label": "every time and rate is the compiler's estimate or a roofline, not a measurement",
      "programs": {},
  }
  if target.chip.platform == "cuda":
    report["jax_cuda12_plugin"] = _package_version("jax-cuda12-plugin")
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  refused = {}
  for name in config.compile.programs:
    try:
      report["programs"][name] = COMPILERS[name](config, target, mesh)
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError; its type moves between jax versions)
      if _LIMITED_ROUTING not in str(e):
        raise
      # The other programs' reports stand; this one cannot run as laid out on this slice.
      refused[name] = (f"the compiler refuses this program's device assignment on {target.name}: "
                       f"{_LIMITED_ROUTING} (a program over a subset of the slice's chips, as "
                       "evaluation's per-host sampling is; eval.sampling_layout='global' or 'auto' "
                       "samples in one program over every chip)")
      report["refused"] = refused
    (out / "compile_report.json").write_text(json.dumps(report, indent=2, default=float))
  compiler = (f"jax-cuda12-plugin {report['jax_cuda12_plugin']}" if target.chip.platform == "cuda"
              else f"libtpu {report['libtpu']}")
  lines = [f"{target.name} ({target.topology_name}, {target.hosts} hosts, {mesh.size} devices, mesh "
           f"{dict(mesh.shape)}); jax {report['jax']}, {compiler}"]
  for name, r in report["programs"].items():
    lines += _row(name, r)
  lines += [f"{name}: not compiled: {why}" for name, why in refused.items()]
  print("\n".join(lines), flush=True)
  too_big = [f"{name}: {r['memory']['verdict']}" for name, r in report["programs"].items() if not r["memory"]["fits"]]
  if too_big:  # the report is written; the exit status tells a launch script not to rent the slice
    raise DoesNotFit("; ".join(too_big) + f" (report: {out / 'compile_report.json'})")
  if refused:
    raise errors.UsageError("; ".join(f"{name}: {why}" for name, why in refused.items())
                            + f" (the other programs' report: {out / 'compile_report.json'})")
  return report


def _package_version(name: str) -> str:
  try:
    return importlib_metadata.version(name)
  except importlib_metadata.PackageNotFoundError:
    return "not installed"


def _libtpu_version() -> str:  # scripts/release_compile.py
  return _package_version("libtpu")
