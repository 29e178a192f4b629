"""The `ablation_step`, `ablation_levers` and `ablation_release_batch` checks: the ImageNet latent ablation's step.

configs/imagenet_latent_ablation.py with random weights and synthetic latents:
DiT-B/2 making 32x32x4 latents, latent-MAE-256 features, the log-KDE loss, the
clipped AdamW update and the EMA, at as many classes as fit in device memory;
with each of the step's levers (attention kernel, remat policies) beside the defaults;
at the release's batch with microbatches. Measures step time, XLA-counted FLOPs, MFU, peak memory and the
loss's share of the step. JAX and the trainer are imported at the top: only the
checks' child processes import this module (`runner.run_child`, from
`runner.CHECK_FUNCTIONS`), never the parent, which must not start a JAX runtime.
`run_child` registers clu's TensorFlow-free stand-in
(`common._clu_without_tensorflow`) first: the trainer module, imported for its
pieces, imports `clu.metric_writers`.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from configs import imagenet_latent_ablation  # configs/ is found from the repository root, the check's cwd
from drifting_jax import partitioning
from drifting_jax.bench.device_check.child_common import _machine
# RELEASE_CLASSES and FIRST_CLASSES (classes tried first, halved until the step fits)
# live in common: the parent's --ablation-classes help names them.
from drifting_jax.bench.device_check.common import FIRST_CLASSES, RELEASE_CLASSES, _memory_stats, _Record
from drifting_jax.models import generator as generator_lib
from drifting_jax.train import data as train_data, program as program_lib, trainer
from drifting_jax.train import train_step as train_step_lib


def _cost_flops(stage) -> Optional[float]:
  """FLOPs from XLA's cost analysis of a Lowered or Compiled stage (None where unavailable)."""
  try:
    cost = stage.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  flops = float(cost.get("flops", 0.0))
  return flops if flops > 0 else None


def _memory_analysis(compiled) -> dict:
  try:
    stats = compiled.memory_analysis()
  except Exception:
    return {}
  if stats is None:
    return {}
  out = {k: int(getattr(stats, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _is_out_of_memory(e: BaseException) -> bool:
  text = f"{type(e).__name__}: {e}"
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _ablation_config(args, remat: bool, classes: int, microbatches: int = 1, overrides: Optional[dict] = None):
  config = imagenet_latent_ablation.get_config()
  for key, value in (overrides or {}).items():  # a lever: "section.field" -> value
    section, field = key.split(".")
    config[section][field] = value
  config.train.microbatches = int(microbatches)
  config.data.name = "synthetic_latents"
  config.model.remat = bool(remat)
  config.train.classes_per_step = int(classes)
  config.mesh.data, config.mesh.fsdp = -1, 1  # one accelerator (the release's fsdp 8 is for its v6e-64)
  mae_name = "latent-256"
  if args.cpu_smoke:
    config.model.overrides = dict(depth=1, hidden_size=32, cond_dim=32, num_heads=2, patch_size=4,
                                  n_cls_tokens=2, noise_classes=8, noise_coords=4)
    config.data.num_classes = 10
    config.train.gen_per_class, config.train.pos_per_class, config.train.neg_per_class = 8, 8, 4
    # 6 feature groups instead of the release extractor's 85: a smaller program to compile.
    config.feature.activation_kwargs.patch_mean_size = ()
    config.feature.activation_kwargs.patch_std_size = ()
    config.feature.activation_kwargs.use_std = False
    config.feature.activation_kwargs.use_mean = False
    config.feature.activation_kwargs.every_k_block = 0
    config.loss.bandwidths = (0.2,)
    mae_name = "tiny"
  return config, mae_name


def _random_params(abstract: Any, key) -> Any:
  """Random parameters of the shapes in `abstract`, made in one small jitted program.

  As tests/tiny_artifacts.py does for its stand-in networks: fan-in scaled normal
  kernels (gain sqrt(2), for ReLU networks), norm scales near 1, small biases. Flax's
  own `init` would compile the network's forward pass, which takes longer than
  this whole check allows on a CPU.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

  sizes = [math.prod(spec.shape) for _, spec in leaves]

  def make(key):
    # One draw for all leaves: a much smaller program than one random op per leaf.
    noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
    values, offset = [], 0
    for (path, spec), size in zip(leaves, sizes):
      name = str(getattr(path[-1], "key", path[-1]))
      leaf = noise[offset:offset + size].reshape(spec.shape)
      offset += size
      if name == "kernel" and len(spec.shape) >= 2:
        value = leaf * (math.sqrt(2.0) / math.sqrt(math.prod(spec.shape[:-1])))
      elif name in ("scale", "var"):
        value = 1.0 + 0.1 * jnp.abs(leaf)
      else:
        value = 0.02 * leaf
      values.append(value.astype(spec.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)

  return jax.jit(make)(key)


def _ablation_batch(config, work: pathlib.Path, classes: int):
  """The step's batch (`train.program.batch_spec`) drawn from synthetic latents."""
  config.data.data_dir = str(work / "synthetic_latents")
  config.data.synthetic_per_class = 2  # the step's shapes are what count, not the data
  data = train_data.load_training_data(config)
  rng = np.random.default_rng(0)
  t = config.train
  labels = np.sort(rng.choice(config.data.num_classes, size=classes, replace=False)).astype(np.int32)
  by_class = {c: np.flatnonzero(data.labels == c) for c in labels}
  positives = np.stack([data.samples[rng.choice(by_class[c], t.pos_per_class)] for c in labels])
  negatives = data.samples[rng.integers(0, len(data.labels), (classes, t.neg_per_class))]
  batch = {"labels": labels, "positives": positives.astype(np.float32), "negatives": negatives.astype(np.float32)}
  program_lib.check_host_batch(batch, config, processes=1)
  return batch


_trivial_objective = train_step_lib.trivial_objective


class _AblationStep:
  """The compiled train step of the ablation at a number of classes: the run's own program
  (`train.program.build_train_program`, so `feature.param_placement` and every other
  setting the trainer honours apply), with random MAE weights of the named size."""

  def __init__(self, args, remat: bool, classes: int, objective_override: Optional[Callable] = None,
               microbatches: int = 1, overrides: Optional[dict] = None):
    config, mae_name = _ablation_config(args, remat, classes, microbatches, overrides)
    trainer.validate_config(config)
    self.config, self.classes = config, classes
    config.compile.mae_model = mae_name  # the architecture when feature.mae_path is not on this machine
    mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp)
    self.program = program_lib.build_train_program(config, mesh, abstract_features=True,
                                                   objective=objective_override)
    network = self.program.features
    self.feature_apply = network.apply
    self.feature_names = self.program.feature_names
    module = self.program.generator
    self.model_dtype = str(module.dtype.__name__ if hasattr(module.dtype, "__name__") else module.dtype)
    self.mae_dtype = "bfloat16" if network.dtype == jnp.bfloat16 else "float32"
    self.state = self.program.init()
    # Random weights in the layout the trainer keeps (bf16 kernels; placed by feature.param_placement).
    mae_params = _random_params(network.params, jax.random.key(1))
    self.feature_params = jax.device_put(mae_params, self.program.feature_shardings)
    self.params = self.program.generator_params
    self.mae_params_count = int(sum(x.size for x in jax.tree.leaves(mae_params)))
    host = _ablation_batch(config, pathlib.Path(args.work_dir), classes)
    self.batch = {k: partitioning.host_to_global(v, mesh) for k, v in host.items()}

  def compile(self) -> dict:
    start = time.perf_counter()
    lowered = self.program.lower()
    self.compiled = lowered.compile()
    return {"compile_s": time.perf_counter() - start, "flops_xla": _cost_flops(self.compiled),
            "flops_lowered": _cost_flops(lowered), "compiled_memory": _memory_analysis(self.compiled)}

  def run(self, steps: int) -> float:
    """Runs `steps` steps back to back; returns the mean seconds per step and checks the loss."""
    start = time.perf_counter()
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.feature_params, self.batch)
    jax.block_until_ready((self.state, metrics))
    seconds = (time.perf_counter() - start) / steps
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
      raise FloatingPointError(f"the ablation step's loss is {loss}")
    self.last_loss = loss
    return seconds


def _fits(memory: dict, device) -> tuple[bool, Optional[float]]:
  """Whether the compiled step's buffers fit next to what is already allocated; the
  fraction of its temporaries that would fit (to scale the batch down) where known."""
  stats = _memory_stats(device)
  limit = stats.get("bytes_limit")
  if not limit or not memory:
    return True, None
  available = limit - stats.get("bytes_in_use", 0)
  needed = memory["temp"] + memory["output"] - memory["alias"]
  return needed <= 0.95 * available, (0.9 * available) / max(1, needed)


def _timed_steps(step: _AblationStep, rec: _Record, share: float, most: int = 30) -> tuple[float, int]:
  """One warm-up step, then as many timed steps as `share` of the remaining budget allows (2 to `most`)."""
  first_start = time.perf_counter()
  step.run(1)
  first = time.perf_counter() - first_start
  wanted = int(max(0.0, share * rec.remaining()) / max(first, 1e-6))
  n = max(2, min(most, wanted))
  return step.run(n), n


def _loss_alone_seconds(step: _AblationStep, rec: _Record) -> dict:
  """value-and-grad of the objective over every feature group, at the step's shapes."""
  config = step.config
  t = config.train
  side, channels = config.data.image_size, config.data.channels
  shapes = jax.eval_shape(step.feature_apply, step.feature_params,
                          jax.ShapeDtypeStruct((step.classes, side, side, channels), jnp.float32))
  objective = train_step_lib.objective_from_config(config.loss)

  @jax.jit
  def inputs(key):  # one program for every group's random features
    def make(count, shift):
      return {name: jax.random.normal(jax.random.fold_in(key, i + shift), (step.classes, count, *s.shape[1:]),
                                      jnp.float32) for i, (name, s) in enumerate(sorted(shapes.items()))}
    return make(t.gen_per_class, 0), make(t.pos_per_class, 1000), make(t.neg_per_class, 2000)

  gen, pos, neg = inputs(jax.random.key(3))
  weight_neg = jnp.full((step.classes, t.neg_per_class),
                        train_step_lib.unconditional_weight(2.0, t.gen_per_class, t.neg_per_class), jnp.float32)

  # Every array an argument: a closure's arrays become constants of the program (the
  # first H200 run captured 3.17 GB of them, and the compile ran out of budget).
  def total(g, pos, neg, weight_neg):
    return sum(jnp.mean(objective(g[k], pos[k], neg[k] if t.neg_per_class else None,
                                  weight_neg=weight_neg if t.neg_per_class else None)[0]) for k in sorted(g))

  fn = jax.jit(jax.value_and_grad(total))
  start = time.perf_counter()
  jax.block_until_ready(fn(gen, pos, neg, weight_neg))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(10):
    if times and rec.remaining() < 5:
      break
    start = time.perf_counter()
    jax.block_until_ready(fn(gen, pos, neg, weight_neg))
    times.append(time.perf_counter() - start)
  times.sort()
  groups = {name: list(s.shape[1:]) for name, s in shapes.items()}
  return {"loss_alone_s": times[len(times) // 2], "loss_alone_compile_s": compile_s,
          "feature_groups": len(groups), "feature_floats_per_sample": int(sum(a * b for a, b in groups.values()))}


def check_ablation(rec: _Record, args, remat: bool) -> None:
  device = jax.devices()[0]
  rec.result["machine"] = machine = _machine()
  peak = machine["peak_bf16_tflops"]
  classes = 4 if args.cpu_smoke else (args.ablation_classes or FIRST_CLASSES[bool(remat)])
  notes = []
  attempts = []
  step = None
  while True:
    build_start = time.perf_counter()
    step = _AblationStep(args, remat, classes)
    built_s = time.perf_counter() - build_start
    info = step.compile()
    fits, scale = _fits(info["compiled_memory"], device)
    attempts.append({"classes": classes, "build_s": built_s, **info, "fits": fits})
    rec.phase(f"compiled at {classes} classes", attempts=attempts)
    if fits:
      try:
        step_s, n = _timed_steps(step, rec, 0.25, 2 if args.cpu_smoke else 30)
        break
      except Exception as e:  # out of memory at run time: retry smaller, anything else is an error
        if not _is_out_of_memory(e):
          raise
        attempts[-1]["fits"] = False
        attempts[-1]["error"] = str(e).splitlines()[0][:300]
        scale = 0.5
    smaller = 2 ** int(math.floor(math.log2(max(1.0, classes * min(scale or 0.5, 0.5)))))
    smaller = min(smaller, classes // 2)
    if smaller < 1:
      raise MemoryError(f"the ablation step does not fit in device memory even at 1 class: {attempts[-1]}")
    if rec.remaining() < 1.3 * (built_s + info["compile_s"]):
      raise TimeoutError(f"the step at {classes} classes does not fit in memory and the budget left "
                         f"({rec.remaining():.0f} s) is too short to compile it at {smaller}")
    notes.append(f"{classes} classes did not fit in device memory; measured at {smaller}")
    del step
    classes = smaller
  t = step.config.train
  flops = info["flops_xla"] or info["flops_lowered"]
  stats = _memory_stats(device)
  gen_samples = classes * t.gen_per_class
  if classes != RELEASE_CLASSES and not args.cpu_smoke:
    notes.append(f"the release's batch is {RELEASE_CLASSES} classes per step over all its devices; this is "
                 f"{classes} classes on one device, the share of {max(1, RELEASE_CLASSES // classes)} devices")
  rec.phase("timed", remat=bool(remat), classes=classes, gen_per_class=t.gen_per_class,
            pos_per_class=t.pos_per_class, neg_per_class=t.neg_per_class, timed_steps=n, step_s=step_s,
            steps_per_s=1.0 / step_s, generated_samples_per_s=gen_samples / step_s,
            tflop_per_step_xla=flops / 1e12 if flops else None,
            flops_source="compiled" if info["flops_xla"] else ("lowered" if flops else None),
            achieved_tflops=flops / step_s / 1e12 if flops else None,
            mfu=flops / step_s / (peak * 1e12) if flops and peak else None,
            peak_memory_gib=stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
            compiled_memory_gib=info["compiled_memory"].get("total", 0) / 2**30 or None,
            compile_s=info["compile_s"], loss=step.last_loss, generator_params=step.params,
            mae_params=step.mae_params_count, generator_dtype=step.model_dtype, mae_dtype=step.mae_dtype,
            objective=f"{step.config.loss.objective} ({step.config.loss.kernel}#, bandwidths "
                      f"{tuple(step.config.loss.bandwidths)})",
            data="synthetic_latents (random weights; no pretrained MAE or generator)",
            note="; ".join(notes) or None)

  # At toy sizes one variant runs the loss-share measurements (they cost compilations).
  if args.cpu_smoke and remat:
    rec.phase("loss share skipped (--cpu-smoke measures it with remat off only)", loss_share_alone=None,
              loss_share_trivial=None)
    return
  try:
    alone = _loss_alone_seconds(step, rec)
    rec.phase("loss alone", **alone, loss_share_alone=alone["loss_alone_s"] / step_s)
  except Exception as e:  # its random features may not fit beside the step: keep going
    if not _is_out_of_memory(e):
      raise
    rec.phase("loss alone out of memory", loss_share_alone=None, loss_alone_error=str(e).splitlines()[0][:300])

  # The same step with the loss replaced by a trivial one: a second full compilation.
  compile_cost = attempts[-1]["build_s"] + attempts[-1]["compile_s"]
  if rec.remaining() > 1.5 * compile_cost + 6 * step_s + 5:
    del step
    trivial = _AblationStep(args, remat, classes, objective_override=_trivial_objective)
    trivial.compile()
    try:
      trivial_s, _ = _timed_steps(trivial, rec, 0.5, 2 if args.cpu_smoke else 30)
    except Exception as e:
      if not _is_out_of_memory(e):
        raise
      rec.phase("trivial-loss step out of memory", trivial_loss_step_s=None, loss_share_trivial=None,
                trivial_error=str(e).splitlines()[0][:300])
      return
    rec.phase("trivial-loss step", trivial_loss_step_s=trivial_s,
              loss_share_trivial=max(0.0, (step_s - trivial_s) / step_s))
  else:
    rec.phase("trivial-loss step skipped", trivial_loss_step_s=None, loss_share_trivial=None,
              trivial_skipped_reason=f"{rec.remaining():.0f} s left, a second compilation takes about "
                                     f"{compile_cost:.0f} s")


def check_ablation_step(rec: _Record, args) -> None:
  """The `ablation_step` check: remat off."""
  check_ablation(rec, args, remat=False)


# The step's levers (issue #35), each a change of the config's defaults. "old defaults"
# is the step as it was before the levers existed; a lever for another platform, or one
# that leaves the step as the defaults compute it here, is not timed (said so).
LEVERS: dict[str, dict[str, Any]] = {
    "old defaults": {"model.attention_impl": "xla", "model.remat_policy": "none", "feature.remat_policy": "none",
                     "loss.kde_impl": "xla"},
    "attention cudnn": {"model.attention_impl": "cudnn"},
    "attention splash": {"model.attention_impl": "splash"},
    "attention whole_sequence": {"model.attention_impl": "whole_sequence"},
    "attention xla": {"model.attention_impl": "xla"},
    "generator remat dots": {"model.remat_policy": "dots"},
    "generator remat full": {"model.remat_policy": "full"},
    "MAE remat dots": {"feature.remat_policy": "dots"},
    "loss pallas": {"loss.kde_impl": "pallas"},
    "loss xla": {"loss.kde_impl": "xla"},
}
_LEVER_PLATFORMS = {"attention cudnn": ("gpu", "cuda"), "attention splash": ("tpu",),
                    "attention whole_sequence": ("tpu",), "loss pallas": ("tpu",)}


def _computed_as(config, mesh) -> dict[str, str]:
  """How the step computes on `mesh` under `config`: the resolved attention kernel, the remat
  policies and the log-KDE's implementation."""
  module = generator_lib.module_for_run(config, mesh.devices)
  objective = train_step_lib.objective_from_config(config.loss, mesh)
  return {"attention_impl": module.attention_impl, "remat_policy": module.remat_policy,
          "feature_remat_policy": str(config.feature.remat_policy),
          "kde_impl": objective.options.get("implementation", "n/a")}


def check_ablation_levers(rec: _Record, args) -> None:
  """The `ablation_levers` check: the step with the config's defaults, then with each lever
  (`LEVERS`) that changes how it computes on this device, timed side by side in one
  process at the same classes; each variant's time, memory and loss against the defaults'."""
  device = jax.devices()[0]
  rec.result["machine"] = _machine()
  classes = 4 if args.cpu_smoke else (args.ablation_classes or FIRST_CLASSES[False])
  mesh = partitioning.make_mesh(-1, 1)
  platform = device.platform
  base_config, _ = _ablation_config(args, False, classes)
  defaults = _computed_as(base_config, mesh)
  plan, skipped = ["defaults"], {}
  for name, overrides in LEVERS.items():
    if platform not in _LEVER_PLATFORMS.get(name, (platform,)):
      skipped[name] = f"not for {platform} devices"
      continue
    computed = _computed_as(_ablation_config(args, False, classes, overrides=overrides)[0], mesh)
    if computed == defaults:
      skipped[name] = "computes as the defaults do on this device"
      continue
    plan.append(name)
  if args.cpu_smoke:  # two variants keep the smoke run short
    plan, skipped = plan[:2], {**skipped, **{n: "not timed at --cpu-smoke" for n in plan[2:]}}
  rec.phase("planned", classes=classes, defaults_computed_as=defaults, planned=plan, skipped=skipped)
  variants: dict[str, dict] = {}
  for name in plan:
    if variants and rec.remaining() < 1.3 * variants["defaults"]["build_and_compile_s"] + 10:
      skipped[name] = f"the budget left ({rec.remaining():.0f} s) is shorter than a compile and timing"
      continue
    start = time.perf_counter()
    step = _AblationStep(args, False, classes, overrides=LEVERS.get(name))
    info = step.compile()
    row: dict[str, Any] = {"overrides": LEVERS.get(name, {}), "computed_as": _computed_as(step.config, mesh),
                           "build_and_compile_s": time.perf_counter() - start,
                           "compiled_memory_gib": info["compiled_memory"].get("total", 0) / 2**30 or None}
    fits, _ = _fits(info["compiled_memory"], device)
    if fits:
      try:
        row["step_s"], row["timed_steps"] = _timed_steps(step, rec, 0.2, 2 if args.cpu_smoke else 20)
        row["loss"] = step.last_loss
      except Exception as e:  # out of memory at run time: that is this lever's result
        if not _is_out_of_memory(e):
          raise
        row["error"] = str(e).splitlines()[0][:300]
    else:
      row["error"] = "does not fit in device memory at these classes"
    base = variants.get("defaults", row)
    if row.get("step_s") and base.get("step_s"):
      row["step_over_defaults"] = row["step_s"] / base["step_s"]
    variants[name] = row
    rec.phase(f"timed {name}", variants=variants, skipped=skipped)
    del step
  rec.phase("done", classes=classes, variants=variants, skipped=skipped,
            note="ratios to the defaults measured in this one process, one after the other")


def check_ablation_release_batch(rec: _Record, args) -> None:
  """The `ablation_release_batch` check: the release's batch (64 classes x (64, 64, 16)) on this
  one device, with the microbatch count `train.microbatches="auto"` would pick.

  Like the run's pre-flight, counts are compiled from the smallest until one fits 95% of
  the device's free memory, and the step is timed at it: first with the whole batch's
  features kept (`train.microbatch_features="keep"`), then, once the counts tried say no
  larger one can fit so (`program.keep_cannot_fit`: one GPU holds no such floor of
  ~122 GiB), with them recomputed. Counts below the one that puts `FIRST_CLASSES[False]`
  classes in a chunk are skipped (the first H200 run measured ~16 GB of activations per
  class; each compile here takes about two minutes); the record says so. Where no count
  fits, the record holds each count's compiled memory.
  """
  device = jax.devices()[0]
  rec.result["machine"] = _machine()
  classes = 4 if args.cpu_smoke else RELEASE_CLASSES
  config, _ = _ablation_config(args, False, classes)
  mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp)
  counts = program_lib.microbatch_counts(config, mesh)
  first = 1 if args.cpu_smoke else next((c for c in counts if classes // c <= FIRST_CLASSES[False]), counts[-1])
  skipped = [c for c in counts if c < first]
  tried, notes = [], []
  if skipped:
    notes.append(f"counts {skipped} skipped: at ~16 GB of activations per class (first H200 run) they cannot fit")
  limit = (_memory_stats(device).get("bytes_limit") or 0) * 0.95
  for features in ("keep", "recompute"):
    kept_counts, kept_totals = [], []
    for count in (c for c in counts if c >= first and (features == "keep" or c > 1)):
      start = time.perf_counter()
      step = _AblationStep(args, False, classes, microbatches=count,
                           overrides={"train.microbatch_features": features})
      info = step.compile()
      fits, _ = _fits(info["compiled_memory"], device)
      total = info["compiled_memory"].get("total", 0)
      tried.append({"microbatches": count, "microbatch_features": features, "fits": fits,
                    "build_and_compile_s": time.perf_counter() - start,
                    "compiled_memory_gib": total / 2**30 or None, "flops_xla": info["flops_xla"]})
      rec.phase(f"compiled with {count} microbatches, features {features}", tried=tried, notes=notes)
      if fits:
        step_s, n = _timed_steps(step, rec, 0.5, 2 if args.cpu_smoke else 20)
        t = step.config.train
        rec.phase("timed", classes=classes, microbatches=count, microbatch_features=features, timed_steps=n,
                  step_s=step_s, generated_samples_per_s=classes * t.gen_per_class / step_s, loss=step.last_loss,
                  peak_memory_gib=(_memory_stats(device).get("peak_bytes_in_use") or 0) / 2**30 or None,
                  auto_pick=f"train.microbatches=auto: {count} with train.microbatch_features={features} (the "
                            f"smallest tried count whose compiled step fits 95% of this device's free memory)")
        return
      del step
      if rec.remaining() < 1.3 * tried[-1]["build_and_compile_s"]:
        break
      kept_counts.append(count)
      kept_totals.append(total)
      if features == "keep" and limit and program_lib.keep_cannot_fit(kept_counts, kept_totals, int(limit)):
        notes.append(f"no count above {count} can fit with the features kept (the memory counts {kept_counts} "
                     "saved): on to recomputed features")
        break
    if tried and rec.remaining() < 1.3 * tried[-1]["build_and_compile_s"]:
      break
  rec.phase("no count fits", classes=classes, microbatches=None, step_s=None,
            auto_pick=f"no tried count fits this device at {classes} classes: "
                      + ", ".join(f"{t['microbatches']} ({t['microbatch_features']}): "
                                  f"{t['compiled_memory_gib']:.1f} GiB" for t in tried))
