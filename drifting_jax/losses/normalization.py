"""Feature-space distance normalizations, as pure functions usable under jit.

Two schemes are in use:

* `batch_distance_scale`: the official release's scale, the weighted mean of all
  generated-to-reference distances in the batch; dividing distances by it makes
  bandwidths relative (a bandwidth of 0.05 means 5% of the typical distance).
* The per-class top-k EMA scale of FHM's pixel-space experiments: for each class,
  the mean L2 distance of each data sample to its k nearest neighbours among the
  class's samples in the batch, smoothed across steps with an EMA (beta = 0.99,
  k = 5). It is state-in/state-out so it can live in the train state and be
  checkpointed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from drifting_jax.losses import _common

Array = jax.Array


def batch_distance_scale(distances: Array, target_weights: Array) -> Array:
  """mean(distances * w) / mean(w) over the whole batch (the release's scale).

  Args:
    distances: [B, N, M] generated-to-reference distances.
    target_weights: [B, M] reference weights.

  Returns:
    A scalar. It is a statistic of the batch, so callers stop its gradient.
  """
  if distances.ndim != 3 or target_weights.shape != (distances.shape[0], distances.shape[2]):
    raise ValueError(f"expected distances [B, N, M] and weights [B, M], got {distances.shape} and "
                     f"{target_weights.shape}")
  return jnp.mean(distances * target_weights[:, None, :]) / jnp.mean(target_weights)


class TopKScaleState(NamedTuple):
  """EMA of each class's top-k neighbour distance."""

  scale: Array        # [num_classes] float32
  initialized: Array  # [num_classes] bool: False until a class has been seen once


def topk_scale_init(num_classes: int) -> TopKScaleState:
  return TopKScaleState(jnp.ones((num_classes,), jnp.float32), jnp.zeros((num_classes,), bool))


def topk_mean_distance(samples: Array, k: int = 5) -> Array:
  """Mean distance of each sample to its k nearest other samples, averaged per class.

  Args:
    samples: [C, P, D], P >= k + 1 data samples of each of C classes.

  Returns:
    [C] mean k-NN distances.
  """
  _common.check_rank("samples", samples, 3, "[C, P, D]")
  p = samples.shape[1]
  if not 1 <= k < p:
    raise ValueError(f"top-k scale needs 1 <= k < samples per class, got k={k} with {p} samples")
  x = samples.astype(jnp.float32)
  dist = _common.pairwise_distances(x, x)
  dist = jnp.where(jnp.eye(p, dtype=bool), jnp.inf, dist)
  nearest = -jax.lax.top_k(-dist, k)[0]  # [C, P, k], the k smallest
  return jnp.mean(nearest, axis=(1, 2))


def topk_scale_update(state: TopKScaleState, samples: Array, class_ids: Array, *, k: int = 5,
                      beta: float = 0.99) -> tuple[TopKScaleState, Array]:
  """One EMA step of the per-class top-k scale; returns (new state, scale [C]).

  The first observation of a class sets its scale directly (no bias towards the
  arbitrary initial value). Duplicate class ids in one call: the last one wins.
  """
  return topk_scale_apply(state, topk_mean_distance(samples, k), class_ids, beta=beta)


def topk_scale_apply(state: TopKScaleState, value: Array, class_ids: Array, *,
                     beta: float = 0.99) -> tuple[TopKScaleState, Array]:
  """`topk_scale_update` from its statistic `value` [C] (`topk_mean_distance`), computed beforehand.

  A trainer that sees a step's classes in chunks gathers their statistics first, then
  applies them in one update, as if it had seen the whole batch at once.
  """
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
  value = jax.lax.stop_gradient(value)
  old = state.scale[class_ids]
  new = jnp.where(state.initialized[class_ids], beta * old + (1.0 - beta) * value, value)
  return TopKScaleState(state.scale.at[class_ids].set(new), state.initialized.at[class_ids].set(True)), new
