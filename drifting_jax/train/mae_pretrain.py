"""MAE pretraining job: the feature encoder the drifting loss is computed with.

This is the release's MAE recipe (its `train_mae.py` with `configs/mae/*.yaml`) on the
project's data and infrastructure: random square-patch masking of the inputs, masked
reconstruction loss, optional classification fine-tuning at the end, AdamW after
global-norm clipping, lr warmup from ~0 then constant (or cosine), and a constant-
decay EMA of the parameters, whose final value is the artifact.

Layout under the workdir (it may be shared with the generator run that uses it):

    mae/{ema_params.msgpack, metadata.json}     the EMA encoder (config.mae.out_dir)
    mae_pretrain/checkpoints/<step>/            resumable train state (orbax)
    mae_pretrain/metrics.jsonl, events files    logs (clu)

`config.feature.mae_path=<workdir>/mae` then trains a generator on these features.
Batches are consecutive slices of per-epoch shuffles of this host's data, keyed by
(seed, epoch), so a resumed run sees the same stream.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from drifting_jax import checkpointing, config_defaults, errors, partitioning, paths, writers
from drifting_jax.models import artifacts, mae
from drifting_jax.train import data as train_data, optim, program as program_lib, run as run_lib

SCHEDULES = optim.SCHEDULES


# --------------------------------------------------------------------------- config


def model_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The MAE's `model_config`: a named size with overrides; the data fix channels and classes."""
  overrides = dict(config.mae.model_overrides.to_dict()) if config.mae.model_overrides else {}
  overrides.update(in_channels=int(config.data.channels), num_classes=int(config.data.num_classes))
  return mae.model_config_for(config.mae.model, **overrides)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks that cannot wait until the first step."""
  m = config.mae
  problems = []
  for key in ("batch_size", "total_steps", "save_every", "log_every"):
    if int(m[key]) < 1:
      problems.append(f"mae.{key} must be >= 1, got {m[key]}")
  if m.batch_size % jax.device_count():
    problems.append(f"mae.batch_size={m.batch_size} must be a multiple of the device count {jax.device_count()}")
  if not 0.0 <= m.ema_decay < 1.0:
    problems.append(f"mae.ema_decay must be in [0, 1), got {m.ema_decay}")
  if not 0.0 <= m.mask_ratio_min <= m.mask_ratio_max <= 1.0:
    problems.append(f"need 0 <= mae.mask_ratio_min <= mae.mask_ratio_max <= 1, got {m.mask_ratio_min}, "
                    f"{m.mask_ratio_max}")
  if m.schedule not in SCHEDULES:
    problems.append(f"mae.schedule must be one of {SCHEDULES}, got {m.schedule!r}")
  if m.warmup_steps < 0 or m.finetune_last_steps < 0 or m.warmup_finetune < 0:
    problems.append("mae.warmup_steps, mae.finetune_last_steps and mae.warmup_finetune must be >= 0")
  if problems:
    raise errors.UsageError("invalid MAE pretraining config: " + "; ".join(problems))
  mae.build_module(model_config(config))  # bad sizes fail here, not after loading data


def learning_rate_schedule(m: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from `warmup_init` to the peak, then constant or cosine (the release's).

  The cosine decays over `schedule_steps - warmup_steps` steps to 1e-6 of the peak
  (the release sizes it separately from the run's length).
  """
  lr, warmup = float(m.learning_rate), int(m.warmup_steps)
  if m.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(int(m.schedule_steps) - warmup, 1), alpha=1e-6)
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(float(m.warmup_init), lr, warmup), main], [warmup])


def make_optimizer(m: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(m)
  tx = optim.clipped_adamw(schedule, max_grad_norm=m.max_grad_norm, b1=m.b1, b2=m.b2, weight_decay=m.weight_decay)
  return tx, schedule


def lambda_cls_at(step: int, m: ml_collections.ConfigDict) -> float:
  """Weight of the classification loss: `lambda_cls`, ramped to `finetune_cls` over
  `warmup_finetune` steps once the last `finetune_last_steps` steps begin."""
  start = int(m.total_steps) - int(m.finetune_last_steps)
  if not m.finetune_last_steps or step < start:
    return float(m.lambda_cls)
  return float(m.finetune_cls) * min(1.0, (step - start) / max(1, int(m.warmup_finetune)))


# --------------------------------------------------------------------------- data


class BatchStream:
  """This host's rows of the global batch at any step (a pure function of the step)."""

  def __init__(self, data: train_data.TrainingData, global_batch: int, *, seed: int, hflip: bool):
    self.data, self.seed, self.hflip = data, int(seed), bool(hflip)
    self.per_host = global_batch // jax.process_count()
    # Replicated data: every host draws the global batch and keeps its slice.
    # Sharded data: each host draws from its own shard with its own stream.
    self.draw_size = global_batch if data.replicated else self.per_host
    self.stream = 0 if data.replicated else data.process_index + 1
    self._permutation: tuple[int, np.ndarray] | None = None

  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    if self._permutation is None or self._permutation[0] != epoch:
      n = self.data.samples.shape[0]
      self._permutation = (epoch, np.random.default_rng([self.seed, self.stream, epoch]).permutation(n))
    return self._permutation[1]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    n = self.data.samples.shape[0]
    positions = np.arange(step * self.draw_size, (step + 1) * self.draw_size, dtype=np.int64)
    index = np.empty_like(positions)
    for epoch in np.unique(positions // n):
      rows = positions // n == epoch
      index[rows] = self._epoch_permutation(int(epoch))[positions[rows] % n]
    if self.data.replicated:
      index = index[jax.process_index() * self.per_host:(jax.process_index() + 1) * self.per_host]
    images = np.asarray(self.data.samples[index], np.float32)
    if self.hflip:
      flip = np.random.default_rng([self.seed, self.stream, step, 1]).random(self.draw_size) < 0.5
      if self.data.replicated:
        flip = flip[jax.process_index() * self.per_host:(jax.process_index() + 1) * self.per_host]
      if self.data.flipped is not None:  # the mirror image's own latent (a flipped cache, as the release's)
        images[flip] = self.data.flipped[index[flip]]
      else:  # pixels, or a cache without mirror views: mirror the array itself
        images[flip] = images[flip, :, ::-1]
    return {"images": images, "labels": np.asarray(self.data.labels[index], np.int32)}


# --------------------------------------------------------------------------- artifact


def write_artifact(path: pathlib.Path, module: mae.MAEResNet, ema_params: Any, step: int,
                   config: ml_collections.ConfigDict) -> None:
  """The EMA encoder as an artifact of kind "mae" (written by process 0)."""
  host_params = multihost_utils.process_allgather(ema_params, tiled=True)
  if jax.process_index() == 0:
    artifacts.save(path, module, host_params, kind="mae", extra_metadata={
        "step": int(step), "ema_decay": float(config.mae.ema_decay),
        "mask_ratio": [float(config.mae.mask_ratio_min), float(config.mae.mask_ratio_max)],
        "data": str(config.data.name)})


# --------------------------------------------------------------------------- the program


@dataclasses.dataclass
class MaeProgram:
  """The MAE pretraining step on one mesh, built once for the run and the compile mode.

  `jitted(state, batch, lambda_cls) -> (state, metrics)`, the state donated and laid
  out by the partition rules; `args()` its abstract inputs with their shardings (the
  batch: `images` [B, H, W, C] float32 and `labels` [B] int32, `batch_spec`).
  """
  module: Any
  step: Any
  jitted: Any
  state_shardings: Any
  abstract_state: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  abstract_lambda: jax.ShapeDtypeStruct
  _make_state: Any

  def init(self):
    return jax.jit(self._make_state, out_shardings=self.state_shardings)()

  def args(self):
    return self.abstract_state, self.abstract_batch, self.abstract_lambda

  def compile(self, compiler_options=None):
    return self.jitted.lower(*self.args()).compile(compiler_options=compiler_options)


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The MAE step's batch: global shapes and dtypes (`BatchStream` yields a host's share)."""
  b, side = int(config.mae.batch_size), int(config.data.image_size)
  return {"images": jax.ShapeDtypeStruct((b, side, side, int(config.data.channels)), jnp.float32),
          "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}


def build_program(config: ml_collections.ConfigDict, mesh) -> MaeProgram:
  """The MAE pretraining step of `config.mae` on `mesh` (`train_mae` and `--mode=compile` both call it)."""
  config_defaults.complete(config)
  m = config.mae
  module = mae.build_module(model_config(config))
  tx, schedule = make_optimizer(m)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  make_state = lambda: mae.init_train_state(module, tx, int(m.seed), shape)
  state_shape = jax.eval_shape(make_state)
  shardings = partitioning.tree_shardings(state_shape, mesh)
  step = mae.make_train_step(module, tx, ema_decay=m.ema_decay, mask_ratio_min=m.mask_ratio_min,
                             mask_ratio_max=m.mask_ratio_max, schedule=schedule)
  replicated = partitioning.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(shardings, None, replicated), out_shardings=(shardings, replicated),
                   donate_argnums=(0,))
  batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=partitioning.global_batch_sharding(s.shape, mesh))
           for k, s in batch_spec(config).items()}
  return MaeProgram(module=module, step=step, jitted=jitted, state_shardings=shardings,
                    abstract_state=partitioning.with_shardings(state_shape, shardings),
                    abstract_batch=batch, abstract_lambda=jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
                    _make_state=make_state)


# --------------------------------------------------------------------------- loop


def train_mae(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """Pretrains the MAE to `config.mae.total_steps` (resuming) and returns the artifact folder."""
  validate_config(config)
  m = config.mae
  workdir_path = paths.as_path(workdir)  # absolute, or a bucket URL as given
  run_dir = workdir_path / "mae_pretrain"
  run_dir.mkdir(parents=True, exist_ok=True)
  out_dir = paths.as_path(m.out_dir) if m.out_dir else workdir_path / "mae"

  mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp)
  # Built as the compile mode builds it, compiled before any data is read: a step that
  # cannot fit the devices stops here with the compile mode's verdict.
  program = build_program(config, mesh)
  step_fn = program.compile()
  program_lib.check_fits(step_fn, mesh, "the MAE pretraining step")
  module = program.module
  data = train_data.load_training_data(config)
  expected = tuple(batch_spec(config)["images"].shape[1:])
  if data.sample_shape != expected or data.sample_shape[-1] != module.in_channels:
    raise ValueError(f"the MAE step takes {expected} samples (data.image_size, data.channels), the data have "
                     f"{data.sample_shape}")
  if int(data.labels.max()) >= module.num_classes:
    raise ValueError(f"data labels reach {int(data.labels.max())}, the MAE head has {module.num_classes} classes")
  batches = BatchStream(data, m.batch_size, seed=m.seed, hflip=m.hflip)

  state_shardings = program.state_shardings
  state = program.init()
  lambda_sharding = program.abstract_lambda.sharding
  finetune_start = m.total_steps - m.finetune_last_steps if m.finetune_last_steps else None

  ckpt = checkpointing.Checkpointer(run_dir, keep_last=m.keep_last, keep_every=m.keep_every,
                                    async_save=m.async_save)
  with run_lib.Run(ckpt, writers.make_writer(str(run_dir)), name="MAE pretraining", loss_name="MAE loss",
                   hint="Lower mae.learning_rate or check the data.") as run:
    start_step, state = run.restore_or_init(state, state_shardings.params, init_from=m.init_from, kind="mae")

    def save(step: int) -> None:
      run.save(step, state)
      write_artifact(out_dir, module, state.ema_params, step, config)

    for step in range(start_step, m.total_steps):
      batch = partitioning.batch_to_global(batches(step), mesh)
      state, metrics = step_fn(state, batch, jax.device_put(np.float32(lambda_cls_at(step, m)), lambda_sharding))
      done = step + 1
      if done % m.log_every == 0 or done == m.total_steps:
        run.record(done, metrics)
        run.writer.write_scalars(done, run.fetch_checked(metrics))
      if done % m.save_every == 0 or done == m.total_steps or done == finetune_start:
        save(done)
      if run.preempted(done, save):
        break
    if start_step >= m.total_steps and not (out_dir / artifacts.PARAMS_FILE).exists():
      write_artifact(out_dir, module, state.ema_params, start_step, config)
  return out_dir
