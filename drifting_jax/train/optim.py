"""Optimizer and learning-rate schedule from a config (optax)."""

from __future__ import annotations

import ml_collections
import optax

from drifting_jax import errors

SCHEDULES = ("const", "cosine")


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """0 for `noop_steps`, a linear ramp over `warmup_steps`, then constant or cosine to 0.

  The no-op phase (FHM Table 3: 300 steps) lets the EMA, the memory banks and the
  feature scale settle before the generator moves.
  """
  if optim.schedule not in SCHEDULES:
    raise errors.UsageError(f"optim.schedule must be one of {SCHEDULES}, got {optim.schedule!r}")
  lr = float(optim.learning_rate)
  noop, warmup = int(optim.noop_steps), int(optim.warmup_steps)
  if noop < 0 or warmup < 0:
    raise errors.UsageError("optim.noop_steps and optim.warmup_steps must be >= 0")
  pieces, boundaries = [optax.constant_schedule(0.0)] if noop else [], []
  if noop:
    boundaries.append(noop)
  if warmup:
    pieces.append(optax.linear_schedule(0.0, lr, warmup))
    boundaries.append(noop + warmup)
  remaining = max(1, int(total_steps) - noop - warmup)
  pieces.append(optax.cosine_decay_schedule(lr, remaining) if optim.schedule == "cosine"
                else optax.constant_schedule(lr))
  if len(pieces) == 1:
    return pieces[0]
  return optax.join_schedules(pieces, boundaries)


def clipped_adamw(schedule: optax.Schedule, *, max_grad_norm: float, b1: float, b2: float,
                  weight_decay: float) -> optax.GradientTransformation:
  """Global-norm clipping (none when max_grad_norm <= 0), then AdamW: the optimizer of every trainer here."""
  return optax.chain(
      optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay),
  )


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, max_grad_norm: float):
  """The generator's optimizer and its schedule: (clipped AdamW, schedule)."""
  schedule = learning_rate_schedule(optim, total_steps)
  tx = clipped_adamw(schedule, max_grad_norm=max_grad_norm, b1=optim.b1, b2=optim.b2,
                     weight_decay=optim.weight_decay)
  return tx, schedule
