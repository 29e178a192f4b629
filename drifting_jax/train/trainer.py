"""The generator's training loop: positive source -> jitted step -> logs and checkpoints.

The loop itself is the algorithm's outline; the positive source owns the memory
banks (`train.data`), the run scaffold owns resume, writers, the NaN stop and the
preemption save (`train.run`, shared with the MAE pretraining).

Host work (drawing the step's data from the positive source: memory banks or fresh
draws; logging; checkpointing) runs while the device executes the previous step:
the loop never waits for a step's result except at log and checkpoint steps, where
the pending losses are checked for NaN/inf.

The logged `host_fraction` is the share of wall time spent in host work proper
(data, banks, log writing, checkpoint calls), excluding the time the host spends
waiting for the device (transfers that queue behind a running step, fetching
metrics), so it measures what the host adds, not what the device takes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import periodic_actions
from jax.experimental import multihost_utils

from drifting_jax import checkpointing, errors, losses, partitioning, paths, writers
from drifting_jax.data import images, sources
from drifting_jax.models import artifacts, features, generator as generator_lib
from drifting_jax.train import data as train_data, optim, run as run_lib
from drifting_jax.train import train_step as train_step_lib
from drifting_jax.train.train_step import TrainState


# --------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks that cannot wait until the first step (shapes, names, divisibility)."""
  t = config.train
  problems = []
  for key in ("classes_per_step", "gen_per_class", "pos_per_class", "total_steps", "positive_bank_size"):
    if int(t[key]) < 1:
      problems.append(f"train.{key} must be >= 1, got {t[key]}")
  if t.neg_per_class < 0:
    problems.append("train.neg_per_class must be >= 0")
  sampler = t.get("positive_sampler", "bank")
  if sampler not in train_data.POSITIVE_SAMPLERS:
    problems.append(f"train.positive_sampler must be one of {train_data.POSITIVE_SAMPLERS}, got {sampler!r}")
  if sampler == "bank" and t.neg_per_class and t.negative_bank_size < 1:
    problems.append("train.negative_bank_size must be >= 1 when neg_per_class > 0")
  if t.classes_per_step > config.data.num_classes:
    problems.append(f"train.classes_per_step={t.classes_per_step} exceeds data.num_classes={config.data.num_classes}")
  if t.classes_per_step % jax.process_count():
    problems.append(f"train.classes_per_step={t.classes_per_step} must divide among {jax.process_count()} processes")
  if not 0.0 <= t.ema_decay < 1.0:
    problems.append(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  if t.cfg_min < 1.0 or t.cfg_max < t.cfg_min:
    problems.append(f"need 1 <= train.cfg_min <= train.cfg_max, got {t.cfg_min}, {t.cfg_max}")
  if t.cfg_max > 1.0 and not t.neg_per_class:
    problems.append("CFG (train.cfg_max > 1) needs unconditional negatives: set train.neg_per_class > 0")
  if config.loss.feature_normalization == "topk_ema" and t.pos_per_class <= config.loss.topk_k:
    problems.append(f"top-k feature normalization needs train.pos_per_class > loss.topk_k={config.loss.topk_k}")
  if problems:
    raise errors.UsageError("invalid config: " + "; ".join(problems))
  train_step_lib.objective_from_config(config.loss)  # unknown objective/kernel/normalization
  sources.get(config)  # an unknown data set, or one whose shape or classes the config contradicts


# --------------------------------------------------------------------------- pieces


def build_features(config: ml_collections.ConfigDict, *, mae_module=None, mae_params=None):
  """(apply(params, x) -> {name: [N, T, D]}, params, compute dtype) for the configured feature space.

  The MAE comes from `feature.mae_path`, unless a module and params are given (the
  compile mode passes the architecture with abstract params).
  """
  if config.feature.kind == "pixels":
    fn = features.pixel_features(patch_stats_sizes=tuple(config.feature.patch_stats_sizes))
    return fn.__call__, fn.params, jnp.float32
  if config.feature.kind == "mae":
    if mae_module is None:
      mae_module, mae_params, _ = artifacts.load(config.feature.mae_path, kind="mae")
    fn = features.mae_features(mae_module, mae_params, include_input=bool(config.feature.get("include_input", True)),
                               **config.feature.activation_kwargs.to_dict())
    return fn.__call__, fn.params, mae_module.dtype
  raise errors.UsageError(f"feature.kind must be 'pixels' or 'mae', got {config.feature.kind!r}")


def state_factory(config, module, tx, feature_names: list[str]):
  """`make() -> TrainState` at step 0: fresh params (EMA equal to them), optimizer, rng, feature scales."""
  args, kwargs = generator_lib.example_inputs(module_config(module), batch_size=1)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))

  def make():
    params = module.init({"params": init_rng}, *args, **kwargs)["params"]
    scales = ({name: losses.topk_scale_init(config.data.num_classes) for name in feature_names}
              if config.loss.feature_normalization == "topk_ema" else {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), rng=train_rng, feature_scale=scales)

  return make


def init_state(config, module, tx, mesh, feature_names: list[str]) -> tuple[TrainState, Any]:
  """A freshly initialized, sharded TrainState and its shardings."""
  make = state_factory(config, module, tx, feature_names)
  shardings = partitioning.tree_shardings(jax.eval_shape(make), mesh)
  return jax.jit(make, out_shardings=shardings)(), shardings


def frozen_feature_params(params: Any, feature_dtype) -> Any:
  """The frozen feature network's params as the trainer stores them on the devices.

  When the network computes in bfloat16, its conv and dense kernels (every leaf of
  2 or more dimensions) are stored in bfloat16: flax casts them to the compute
  dtype at each use, so the features are bit-identical and the copy is half the
  size. Norm scales and biases (1-D) stay float32, as flax reads them in float32.
  """
  if feature_dtype != jnp.bfloat16:
    return params
  return jax.tree.map(lambda p: p.astype(jnp.bfloat16) if getattr(p, "ndim", 0) >= 2 else p, params)


def feature_param_shardings(params: Any, mesh, placement: str = "fsdp") -> Any:
  """Where the frozen network's params live: "fsdp" follows the generator's partition
  rules (split over fsdp, replicated over data: least memory, but gathered for each
  of the step's three passes through the network), "replicated" keeps a whole copy
  on every device (no gathers)."""
  if placement == "replicated":
    return jax.tree.map(lambda _: partitioning.replicated(mesh), params)
  if placement != "fsdp":
    raise errors.UsageError(f"feature.param_placement must be 'fsdp' or 'replicated', got {placement!r}")
  return partitioning.tree_shardings(params, mesh)


def jit_train_step(step, state_shardings, feature_shardings, mesh):
  """The jitted step, with the state donated and laid out by the partition rules (train and compile share it)."""
  return jax.jit(step, in_shardings=(state_shardings, feature_shardings, None),
                 out_shardings=(state_shardings, partitioning.replicated(mesh)), donate_argnums=(0,))


def module_config(module) -> dict[str, Any]:
  return {k: getattr(module, k) for k in generator_lib.CONFIG_KEYS if k not in generator_lib.RUNTIME_ONLY_KEYS}


def write_params_ema_artifact(workdir, module, ema_params) -> None:
  """The release's `params_ema/` folder, so its tools can read our runs (process 0)."""
  host_params = multihost_utils.process_allgather(ema_params, tiled=True)
  if jax.process_index() == 0:
    artifacts.save(paths.as_path(workdir) / "params_ema", module, host_params, kind="gen")


def write_sample_grid(path, module, ema_params, num_classes: int, per_class: int, seed: int) -> None:
  labels = np.repeat(np.arange(num_classes), per_class)
  # The same labels and key on every host: one program over the global params is right
  # here, but its output may be split over hosts, and every host takes part in the gather.
  samples = generator_lib.sample(module, ema_params, labels, 1.0, rng=jax.random.PRNGKey(seed))
  samples = np.asarray(samples if samples.is_fully_addressable
                       else multihost_utils.process_allgather(samples, tiled=True))
  if jax.process_index() == 0 and samples.shape[-1] in (1, 3):
    images.save_png(path, images.grid(images.model_to_uint8(samples), rows=num_classes))


# --------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains until train.total_steps (resuming from the workdir), returns the final state.

  (The name is flax's; evaluation runs beside training, in the evaluate and watch modes.)
  """
  validate_config(config)
  workdir = str(paths.as_path(workdir))  # absolute, or a bucket URL as given
  paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp)
  t = config.train

  model_config = generator_lib.model_config_from_run(config)
  module = generator_lib.build_module({**model_config, "remat": bool(config.model.remat)})
  feature_apply, feature_params, feature_dtype = build_features(config)
  data = train_data.load_training_data(config)
  feature_names = sorted(jax.eval_shape(feature_apply, feature_params,
                                        jnp.zeros((1, *data.sample_shape), jnp.float32)))
  tx, schedule = optim.make_optimizer(config.optim, t.total_steps, t.max_grad_norm)
  state, state_shardings = init_state(config, module, tx, mesh, feature_names)
  feature_params = frozen_feature_params(feature_params, feature_dtype)
  feature_shardings = feature_param_shardings(feature_params, mesh, config.feature.get("param_placement", "fsdp"))
  feature_params = jax.device_put(feature_params, feature_shardings)
  source = train_data.make_source(config, data)
  step_fn = jit_train_step(
      train_step_lib.make_train_step(generator=module, tx=tx, schedule=schedule, feature_apply=feature_apply,
                                     config=config, mesh=mesh),
      state_shardings, feature_shardings, mesh)

  ckpt = checkpointing.Checkpointer(workdir, keep_last=config.checkpoint.keep_last,
                                    keep_every=config.checkpoint.keep_every,
                                    async_save=config.checkpoint.async_save)
  with run_lib.Run(ckpt, writers.make_writer(workdir), name="generator", loss_name="loss",
                   hint="Lower optim.learning_rate or check the data and features.") as run:
    start_step, state = run.restore_or_init(state, state_shardings.params, init_from=config.init_from, kind="gen",
                                            load_host_state=source.load_state_dict)
    if start_step == 0 and jax.process_index() == 0:
      run.writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})
    progress = periodic_actions.ReportProgress(num_train_steps=t.total_steps, writer=run.writer,
                                               every_steps=config.log.every_steps)

    def save(step: int) -> None:
      run.save(step, state, source.state_dict())
      write_params_ema_artifact(workdir, module, state.ema_params)

    # Host work (drawing data, saving) overlaps the device's previous step: the loop
    # waits for a step only at log and checkpoint steps.
    host_time = run_lib.HostTime()
    for step in range(start_step, t.total_steps):
      with host_time.measure():  # this step's classes, their positives, the unconditional negatives
        batch = source.draw(step)
      # Not host work: on a CPU backend the transfer may wait for the previous step.
      state, metrics = step_fn(state, feature_params, partitioning.batch_to_global(batch, mesh))
      run.record(step, metrics)
      done = step + 1
      progress(done)
      if done % config.log.every_steps == 0 or done == t.total_steps:
        scalars = run.fetch_checked(metrics)  # waits for the step: not host work either
        run.writer.write_scalars(done, {**scalars, "host_fraction": host_time.end_window()})
      if config.log.sample_grid_every and done % config.log.sample_grid_every == 0:  # device work
        write_sample_grid(paths.as_path(workdir) / "samples" / f"step_{done}.png", module, state.ema_params,
                          min(config.data.num_classes, 10), 10, config.seed)
      with host_time.measure():
        if done % config.checkpoint.every_steps == 0 or done == t.total_steps:
          save(done)
        if run.preempted(done, save):
          break
    run.check_finite()
  return state


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out
