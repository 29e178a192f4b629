"""Whole-batch statistics of the objectives, accumulated over chunks of groups.

Every objective treats its groups (one class, one feature location) independently
except for two normalizations that are statistics of the whole batch:

* the distance scale (`normalize_distances`, and always in the release's field):
  the weighted mean distance of the generated samples to their references,
  sum_{g,i,j} d_gij w_gj / #entries divided by sum_{g,j} w_gj / #weights
  (`normalization.batch_distance_scale`);
* the mean square of each bandwidth's field, or of its gradient for the log-KDE
  and MMD (`normalize_gradients`, and always in the release's field).

Both are ratios of sums over the groups, so they can be summed over disjoint chunks
of the batch (`BatchSums`, `add_sums`) and handed back to the objective evaluated on
one chunk (`statistics=`, a `BatchStatistics`): that chunk's loss and gradient are
then the ones it has inside the whole batch, to float32 rounding (the sums add the
same terms in another order). A trainer that cannot hold the whole batch's features
at once evaluates an objective in up to three passes over its chunks:

  1. `return_batch_sums=True`: the chunk's distance sums;
  2. with the batch's distance scale, `return_batch_sums=True`: its field sums
     (a field depends on the scale, so it needs the first pass);
  3. with both statistics: the loss and its gradient.

`ObjectiveSpec.batch_statistics` says which of the two an objective's options need,
so a pass nobody needs is skipped.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

DISTANCE_SCALE = "distance_scale"
FIELD = "field"


class BatchSums(NamedTuple):
  """Sums over some groups of a batch, from which its whole-batch statistics follow.

  Counts are floats: at pod batches they pass 2^31, which an int32 under jit cannot hold.
  """

  weighted_distance: Array  # sum_{g,i,j} d_gij w_gj over generated-to-reference distances
  distance_count: Array     # the number of (g, i, j) entries
  weight: Array             # sum_{g,j} w_gj over the references' weights
  weight_count: Array       # the number of (g, j) weights
  field_square: Array       # [H]: the sum of each bandwidth's squared field entries (zeros when unused)
  field_count: Array        # the number of entries of one bandwidth's field (0 when unused)


class DistanceSums(NamedTuple):
  """The distance part of `BatchSums` (its first four fields)."""

  weighted_distance: Array
  distance_count: Array
  weight: Array
  weight_count: Array


class BatchStatistics(NamedTuple):
  """A whole batch's normalizers, handed to an objective evaluated on part of the batch.

  distance_scale: the batch-mean scale before any floor (each objective floors it as
    it floors its own); None: the objective computes it from the groups it is given.
  field_mean_square: [H], each bandwidth's mean squared field (or gradient) entry over
    the batch; None: the objective's own groups'.
  """

  distance_scale: Array | None = None
  field_mean_square: Array | None = None


def distance_sums(blocks: Sequence[tuple[Array, Array]]) -> DistanceSums:
  """The `DistanceSums` of column blocks [(dist [G, N, M], weights [G, M])]."""
  weighted = sum(jnp.sum(d * w[:, None, :]) for d, w in blocks)
  weight = sum(jnp.sum(w) for _, w in blocks)
  dtype = blocks[0][0].dtype
  return DistanceSums(weighted, jnp.asarray(float(sum(d.size for d, _ in blocks)), dtype), weight,
                      jnp.asarray(float(sum(w.size for _, w in blocks)), dtype))


def mean_distance(weighted_distance, distance_count, weight, weight_count) -> Array:
  """The batch-mean scale from its sums: mean(d w) / mean(w) (before any floor)."""
  return (weighted_distance / distance_count) / (weight / weight_count)


def batch_sums(distance_blocks: Sequence[tuple[Array, Array]], fields: Sequence[Array] | None,
               num_bandwidths: int) -> BatchSums:
  """The `BatchSums` of one call: its distance blocks and, where the objective forms them, its fields."""
  weighted, distance_count, weight, weight_count = distance_sums(distance_blocks)
  dtype = weighted.dtype
  if fields:
    field_square = jnp.stack([jnp.sum(jnp.square(f)) for f in fields])
    field_count = jnp.asarray(float(fields[0].size), dtype)
  else:
    field_square, field_count = jnp.zeros((num_bandwidths,), dtype), jnp.zeros((), dtype)
  return BatchSums(weighted, distance_count, weight, weight_count, field_square, field_count)


def add_sums(a: BatchSums, b: BatchSums) -> BatchSums:
  return jax.tree.map(jnp.add, a, b)


def statistics_from_sums(sums: BatchSums, *, field: bool = True) -> BatchStatistics:
  """The batch's statistics from its summed `BatchSums` (field=False: the distance scale only)."""
  scale = mean_distance(*sums[:4])
  mean_square = sums.field_square / jnp.maximum(sums.field_count, 1.0) if field else None
  return BatchStatistics(jax.lax.stop_gradient(scale),
                         None if mean_square is None else jax.lax.stop_gradient(mean_square))


def check_statistics(statistics: BatchStatistics | None, num_bandwidths: int) -> BatchStatistics:
  """`statistics` (or an empty one), its field statistic checked against the bandwidths (trace time)."""
  if statistics is None:
    return BatchStatistics()
  if not isinstance(statistics, BatchStatistics):
    raise TypeError(f"statistics must be a losses.BatchStatistics, got {type(statistics).__name__}")
  if statistics.distance_scale is not None and jnp.ndim(statistics.distance_scale) != 0:
    raise ValueError(f"statistics.distance_scale must be a scalar (the batch's), got shape "
                     f"{jnp.shape(statistics.distance_scale)}")
  if statistics.field_mean_square is not None and jnp.shape(statistics.field_mean_square) != (num_bandwidths,):
    raise ValueError(f"statistics.field_mean_square must have one entry per bandwidth ({num_bandwidths}), got "
                     f"shape {jnp.shape(statistics.field_mean_square)}")
  return statistics
