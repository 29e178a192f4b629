"""Inputs of the grouped objectives: validation, groups, references, distance scale.

Every objective in `kde_objectives`, `drift_objectives` and `sinkhorn` starts the
same way: its `(gen, fixed_pos, fixed_neg, weight_*)` arguments are checked and
flattened to [G, C, S] groups (`prepare`), the negatives of q are assembled from
the other generated samples and `fixed_neg` (`references`), and distances are put
on one scale (`distance_scale`). Those shared steps live here, with
`sum_over_feature_groups`, which applies any objective to a dict of feature groups.
"""

from __future__ import annotations

import functools

from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from drifting_jax.losses import _common, statistics
from drifting_jax.losses.kernels import Kernel, get_kernel
from drifting_jax.losses.normalization import batch_distance_scale

Array = jax.Array
Info = dict[str, Array]

# The distance scale is floored here so identical inputs do not divide by zero.
_MIN_DISTANCE_SCALE = 1e-6
# Logit given to a generated sample's distance to itself in the softmax-based
# fields: finite (unlike -inf) so a column of all-masked entries cannot NaN.
_MASKED_LOGIT = -1e30


class _Groups(NamedTuple):
  """Validated float32 inputs, flattened to [G, C, S] groups."""

  gen: Array
  pos: Array
  neg: Array
  w_gen: Array
  w_pos: Array
  w_neg: Array
  rows: int          # B
  tokens: int | None  # T for rank-4 inputs, None for rank 3


def _prepare(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg) -> _Groups:
  """Checks shapes (at trace time) and concrete weight values; casts to float32."""
  rank = jnp.ndim(gen)
  if rank not in (3, 4):
    raise ValueError(f"gen must have shape [B, Cg, S] (or [B, Cg, T, S]), got {jnp.shape(gen)}")
  layout = "[B, C, S]" if rank == 3 else "[B, C, T, S]"
  _common.check_rank("fixed_pos", fixed_pos, rank, layout)
  _common.check_rank("fixed_neg", fixed_neg, rank, layout)
  b, cg = gen.shape[:2]
  tail = gen.shape[2:]
  for name, a in (("fixed_pos", fixed_pos), ("fixed_neg", fixed_neg)):
    if a is not None and (a.shape[0] != b or a.shape[2:] != tail):
      raise ValueError(f"{name} has shape {a.shape}, incompatible with gen {gen.shape}: batch and "
                       f"feature dimensions must match")
  if fixed_pos.shape[1] == 0:
    raise ValueError("fixed_pos must hold at least one positive sample per group")
  if fixed_neg is None:
    fixed_neg = jnp.zeros((b, 0, *tail), _common.compute_dtype(gen, fixed_pos))
  cp, cn = fixed_pos.shape[1], fixed_neg.shape[1]
  _common.check_weights("weight_gen", weight_gen, (b, cg), require_positive_total=True)
  _common.check_weights("weight_pos", weight_pos, (b, cp), require_positive_total=True)
  _common.check_weights("weight_neg", weight_neg, (b, cn), require_positive_total=False)

  dtype = _common.compute_dtype(gen, fixed_pos)

  def weights(w, c):
    return jnp.ones((b, c), dtype) if w is None else jnp.asarray(w, dtype)

  w_gen, w_pos, w_neg = weights(weight_gen, cg), weights(weight_pos, cp), weights(weight_neg, cn)
  arrays = [jnp.asarray(a, dtype) for a in (gen, fixed_pos, fixed_neg)]
  tokens = None
  if rank == 4:
    tokens = tail[0]
    # [B, C, T, S] -> [B*T, C, S]; weights repeat over T.
    arrays = [jnp.swapaxes(a, 1, 2).reshape(b * tokens, a.shape[1], tail[1]) for a in arrays]
    w_gen, w_pos, w_neg = (jnp.repeat(w, tokens, axis=0) for w in (w_gen, w_pos, w_neg))
  return _Groups(*arrays, w_gen, w_pos, w_neg, b, tokens)


def _per_row(groups: _Groups, per_group: Array) -> Array:
  """[G] group losses -> [B] row losses (mean over the T token groups of a row)."""
  if groups.tokens is None:
    return per_group
  return jnp.mean(per_group.reshape(groups.rows, groups.tokens), axis=-1)


def _nan_if_invalid(groups: _Groups, loss: Array) -> Array:
  """Traced weights cannot be checked at trace time: poison invalid groups with NaN."""
  bad = _common.invalid_weight_mask(groups.w_gen, groups.w_pos, groups.w_neg)
  return loss if bad is None else jnp.where(bad, jnp.nan, loss)


class _References(NamedTuple):
  """The reference set [sg(gen), fixed_neg, fixed_pos] (the release's order)."""

  points: Array          # [G, M, S], M = Cg + Cn + Cp
  weights: Array         # [G, M]
  num_negative: int      # Cg + Cn: columns [0, Cg + Cn) describe q, the rest p
  self_mask: Array       # [Cg, M] bool, True at a generated sample's own column


def _references(groups: _Groups) -> _References:
  cg = groups.gen.shape[1]
  points = jnp.concatenate([jax.lax.stop_gradient(groups.gen), groups.neg, groups.pos], axis=1)
  weights = jnp.concatenate([groups.w_gen, groups.w_neg, groups.w_pos], axis=1)
  self_mask = jnp.pad(jnp.eye(cg, dtype=bool), ((0, 0), (0, points.shape[1] - cg)))
  return _References(points, weights, cg + groups.neg.shape[1], self_mask)


def _reference_distances(groups: _Groups, refs: _References) -> list[tuple[Array, Array]]:
  """The generated-to-reference distances of the batch-mean scale, as one column block."""
  return [(_common.pairwise_distances(jax.lax.stop_gradient(groups.gen), refs.points), refs.weights)]


def _distance_scale(groups: _Groups, refs: _References | None, normalize_distances: bool, distance_scale,
                    distances: Sequence[tuple[Array, Array]] | None = None, batch_scale=None) -> Array:
  """Per-group scale [G] that distances (and coordinates) are divided by.

  `distances`: the generated-to-reference distances where the caller has them, as
  column blocks [(dist [G, Cg, Mb], weights [G, Mb])]; else computed from `refs`.
  `batch_scale`: the whole batch's batch-mean scale where these groups are part of
  it (`statistics.BatchStatistics`); it replaces theirs, floored the same way.
  """
  num_groups = groups.gen.shape[0]
  if distance_scale is not None:
    scale = jnp.asarray(distance_scale, groups.gen.dtype)
    if scale.ndim == 1 and groups.tokens is not None and scale.shape[0] == groups.rows:
      scale = jnp.repeat(scale, groups.tokens)
    if scale.ndim > 1 or (scale.ndim == 1 and scale.shape[0] != num_groups):
      raise ValueError(f"distance_scale must be a scalar or have shape [B], got {scale.shape}")
    return jax.lax.stop_gradient(jnp.broadcast_to(scale, (num_groups,)))
  if not normalize_distances:
    return jnp.ones((num_groups,), groups.gen.dtype)
  if batch_scale is not None:
    scale = jnp.maximum(jnp.asarray(batch_scale, groups.gen.dtype), _MIN_DISTANCE_SCALE)
    return jax.lax.stop_gradient(jnp.broadcast_to(scale, (num_groups,)))
  if distances is None:
    distances = _reference_distances(groups, refs)
  if len(distances) == 1:
    scale = batch_distance_scale(*distances[0])
  else:  # batch_distance_scale of the blocks side by side, without concatenating them
    scale = statistics.mean_distance(*statistics.distance_sums(distances))
  scale = jnp.maximum(scale, _MIN_DISTANCE_SCALE)
  return jax.lax.stop_gradient(jnp.broadcast_to(scale, (num_groups,)))


def _generated_probabilities(groups: _Groups) -> Array:
  return groups.w_gen / jnp.sum(groups.w_gen, axis=-1, keepdims=True)


def _kernels(kernel, bandwidths) -> tuple[Kernel, ...]:
  if isinstance(kernel, Kernel):
    return (kernel,)
  return tuple(get_kernel(kernel, s) for s in _common.as_bandwidth_tuple(bandwidths))


def sum_over_feature_groups(
    objective: Callable[..., tuple[Array, Info]],
    gen: Mapping[str, Array],
    fixed_pos: Mapping[str, Array],
    fixed_neg: Mapping[str, Array] | None = None,
    weight_gen: Array | Mapping[str, Array] | None = None,
    weight_pos: Array | Mapping[str, Array] | None = None,
    weight_neg: Array | Mapping[str, Array] | None = None,
    **objective_kwargs,
) -> tuple[Array, Info]:
  """Applies `objective` to each feature group and sums the group losses.

  Groups are {name: [B, C, S] or [B, C, T, S]}; all share B and the sample counts.
  Weights are either one [B, C] array shared by every group or a dict per group.
  Info keys become "<key>/<group>".
  """
  names = sorted(gen)
  if not names:
    raise ValueError("no feature groups given")
  for what, d in (("fixed_pos", fixed_pos), ("fixed_neg", fixed_neg)):
    if d is not None and sorted(d) != names:
      raise ValueError(f"{what} has feature groups {sorted(d)}, gen has {names}")

  def pick(w, name):
    return w[name] if isinstance(w, Mapping) else w

  total, info = None, {}
  for name in names:
    loss, group_info = objective(gen[name], fixed_pos[name], None if fixed_neg is None else fixed_neg[name],
                                 pick(weight_gen, name), pick(weight_pos, name), pick(weight_neg, name),
                                 **objective_kwargs)
    if total is not None and loss.shape != total.shape:
      raise ValueError(f"feature group {name!r} gives losses of shape {loss.shape}, others {total.shape}")
    total = loss if total is None else total + loss
    info.update({f"{k}/{name}": v for k, v in group_info.items()})
  return total, info


def per_feature_group(objective: Callable[..., tuple[Array, Info]]) -> Callable[..., tuple[Array, Info]]:
  """Lets a one-group objective also take dicts of feature groups: then it is `sum_over_feature_groups` of itself.

  The public objectives are written for one group `[B, C, S]` (or `[B, C, T, S]`);
  this decorator gives each of them the dict form with the same arguments.
  """

  @functools.wraps(objective)
  def dispatch(gen, fixed_pos, fixed_neg=None, weight_gen=None, weight_pos=None, weight_neg=None, **options):
    if isinstance(gen, Mapping):
      if options.get("return_batch_sums"):
        raise ValueError("return_batch_sums takes one feature group: call the objective per group")
      return sum_over_feature_groups(objective, gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg,
                                     **options)
    return objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, **options)

  return dispatch

