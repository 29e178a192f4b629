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


import jax
import ml_collections
import numpy as np
from clu import periodic_actions
from jax.experimental import multihost_utils

from drifting_jax import checkpointing, config_defaults, errors, losses, partitioning, paths, writers
from drifting_jax.data import images, sources
from drifting_jax.models import artifacts, generator as generator_lib
from drifting_jax.train import data as train_data, program as program_lib, run as run_lib
from drifting_jax.train import train_step as train_step_lib
from drifting_jax.train.train_step import TrainState


# --------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks that cannot wait until the first step (shapes, names, divisibility)."""
  config_defaults.complete(config)
  t = config.train
  problems = []
  for key in ("classes_per_step", "gen_per_class", "pos_per_class", "total_steps", "positive_bank_size"):
    if int(t[key]) < 1:
      problems.append(f"train.{key} must be >= 1, got {t[key]}")
  if t.neg_per_class < 0:
    problems.append("train.neg_per_class must be >= 0")
  sampler = t.positive_sampler
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
  mb = t.microbatches
  if mb != "auto" and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1 or t.classes_per_step % mb):
    problems.append(f"train.microbatches must be 'auto' or a count >= 1 that divides train.classes_per_step="
                    f"{t.classes_per_step}, got {mb!r}")
  if t.microbatch_features not in train_step_lib.MICROBATCH_FEATURES:
    problems.append(f"train.microbatch_features must be one of {train_step_lib.MICROBATCH_FEATURES}, got "
                    f"{t.microbatch_features!r}")
  if t.cfg_min < 1.0 or t.cfg_max < t.cfg_min:
    problems.append(f"need 1 <= train.cfg_min <= train.cfg_max, got {t.cfg_min}, {t.cfg_max}")
  if t.cfg_max > 1.0 and not t.neg_per_class:
    problems.append("CFG (train.cfg_max > 1) needs unconditional negatives: set train.neg_per_class > 0")
  with errors.as_usage_error("bad loss config: "):
    scaling = losses.distance_scaling_from_config(config.loss)  # an unknown normalization, a bad top-k
  if t.pos_per_class < scaling.min_positives:
    problems.append(f"loss.feature_normalization={config.loss.feature_normalization!r} needs train.pos_per_class "
                    f">= {scaling.min_positives}, got {t.pos_per_class}")
  if problems:
    raise errors.UsageError("invalid config: " + "; ".join(problems))
  train_step_lib.objective_from_config(config.loss)  # unknown objective/kernel/normalization
  sources.get(config)  # an unknown data set, or one whose shape or classes the config contradicts


# --------------------------------------------------------------------------- pieces


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

  # The step, built as the compile mode builds it, and compiled before any data is
  # loaded or bank filled: a step that cannot fit the devices stops the run here, with
  # the compile mode's verdict. Every step then runs this executable.
  program, step_fn = program_lib.preflight(config, mesh)
  module, state_shardings = program.generator, program.state_shardings
  state = program.init()
  feature_params = program.place_feature_params()
  data = train_data.load_training_data(config)
  source = train_data.make_source(config, data)

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
        program_lib.check_host_batch(batch, config, jax.process_count())
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
