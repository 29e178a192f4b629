"""Shared numerics and input checks of the loss library (private)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Squared distances are clipped here before the square root, as the official
# release does: it keeps d sqrt / d sq finite for coincident points.
SQUARED_DISTANCE_EPS = 1e-8


def pairwise_distances(x: Array, y: Array) -> Array:
  """Euclidean distances between the rows of x [..., N, D] and y [..., M, D] -> [..., N, M].

  Uses |x|^2 + |y|^2 - 2 x.y so the cost is one matrix multiply.
  """
  sq = (jnp.sum(jnp.square(x), axis=-1)[..., :, None]
        + jnp.sum(jnp.square(y), axis=-1)[..., None, :]
        - 2.0 * jnp.einsum("...nd,...md->...nm", x, y))
  return jnp.sqrt(jnp.maximum(sq, SQUARED_DISTANCE_EPS))


def compute_dtype(*arrays):
  """float32, or float64 when an input already is (low precision is always upcast)."""
  dtypes = [jnp.asarray(a).dtype for a in arrays if a is not None]
  return jnp.float64 if any(d == jnp.float64 for d in dtypes) else jnp.float32


def safe_log(w: Array) -> Array:
  """log w with log 0 = -inf, and a zero (not NaN) gradient at w = 0."""
  positive = w > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, w, 1.0)), -jnp.inf)


def is_concrete(*arrays) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)


def check_rank(name: str, a, rank: int, layout: str) -> None:
  if a is None:
    return
  if jnp.ndim(a) != rank:
    raise ValueError(f"{name} must have shape {layout}, got shape {jnp.shape(a)}")


def check_weights(name: str, w, expected_shape: Sequence[int], *, require_positive_total: bool) -> None:
  """Shape check at trace time; value checks where the weights are concrete.

  Under jit the values are tracers and cannot be inspected: the objectives then map
  invalid groups to a NaN loss instead (see `invalid_weight_mask`), which the
  trainer's NaN guard turns into a stop with a message.
  """
  if w is None:
    return
  if tuple(jnp.shape(w)) != tuple(expected_shape):
    raise ValueError(f"{name} must have shape {tuple(expected_shape)}, got {tuple(jnp.shape(w))}")
  if is_concrete(w):
    w_np = np.asarray(jax.device_get(w), np.float64)
    if not np.all(np.isfinite(w_np)):
      raise ValueError(f"{name} contains NaN or inf")
    if np.any(w_np < 0):
      raise ValueError(f"{name} must be non-negative; found min {w_np.min():g}")
    if require_positive_total and w_np.ndim and np.any(w_np.sum(axis=-1) <= 0):
      bad = np.nonzero(w_np.sum(axis=-1) <= 0)[0][:8].tolist()
      raise ValueError(f"{name} sums to zero in group(s) {bad}: a KDE needs a positive total weight")


def invalid_weight_mask(*weights: Array) -> Array:
  """True for the rows (last axis reduced) that hold a negative or non-finite weight."""
  bad = None
  for w in weights:
    if w is None or w.shape[-1] == 0:
      continue
    row_bad = jnp.any((w < 0) | ~jnp.isfinite(w), axis=-1)
    bad = row_bad if bad is None else bad | row_bad
  return bad


def as_bandwidth_tuple(bandwidths) -> tuple[float, ...]:
  if isinstance(bandwidths, (int, float, np.floating, np.integer)):
    bandwidths = (bandwidths,)
  try:
    out = tuple(float(b) for b in bandwidths)
  except TypeError as e:
    raise TypeError(f"bandwidths must be a number or a sequence of numbers, got {bandwidths!r}") from e
  if not out:
    raise ValueError("bandwidths must not be empty")
  for b in out:
    if not np.isfinite(b) or b <= 0:
      raise ValueError(f"bandwidths must be finite and > 0, got {bandwidths!r}")
  return out
