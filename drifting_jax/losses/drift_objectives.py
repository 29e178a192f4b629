"""Stop-gradient objectives: loss = |x - sg(x + V(x))|^2 (FHM Eq. 1).

The drift field V is the corrected one (FHM Eq. 3), Deng's joint one (their
Algorithm 2) or the official release's exact variant of the joint one; the loss
only moves each generated sample towards its goal, so its gradient is -V.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from drifting_jax.losses import _common, statistics as statistics_lib
from drifting_jax.losses.groups import (_MASKED_LOGIT, Info, _distance_scale, _generated_probabilities, _kernels,
                                        _nan_if_invalid, _per_row, _prepare, _reference_distances, _References,
                                        _references, per_feature_group)
from drifting_jax.losses.kernels import Kernel
from drifting_jax.losses.normalization import batch_distance_scale

Array = jax.Array


def _rms_normalize_field(field: Array, mean_square: Array | None = None) -> Array:
  """field / RMS(field) over the whole batch (the release's force normalization).

  `mean_square`: the whole batch's where `field` is a chunk of it; None: the field's own.
  """
  if mean_square is None:
    mean_square = jnp.mean(jnp.square(field))
  return field / jnp.sqrt(jnp.maximum(mean_square, 1e-8))


def _corrected_coefficients(log_k: Array, refs: _References) -> Array:
  """Eq. 3: softmax over q's references and over p's, separately (Z_q, Z_p)."""
  logits = log_k + _common.safe_log(refs.weights)[:, None, :]
  logits = jnp.where(refs.self_mask[None], -jnp.inf, logits)
  n = refs.num_negative
  a_q = jax.nn.softmax(logits[..., :n], axis=-1)
  a_p = jax.nn.softmax(logits[..., n:], axis=-1)
  return jnp.concatenate([-a_q, a_p], axis=-1)


def _joint_coefficients(log_k: Array, refs: _References, affinity_floor: float = 0.0) -> Array:
  """Deng et al.'s Algorithm 2 (FHM App. D), with the release's reference weights.

  A = sqrt(softmax over references * softmax over generated samples) * w;
  positive coefficients A_p * sum(A_q), negative ones -A_q * sum(A_p).
  """
  logits = jnp.where(refs.self_mask[None], _MASKED_LOGIT, log_k)
  product = jax.nn.softmax(logits, axis=-1) * jax.nn.softmax(logits, axis=-2)
  affinity = jnp.sqrt(jnp.maximum(product, affinity_floor)) * refs.weights[:, None, :]
  n = refs.num_negative
  a_q, a_p = affinity[..., :n], affinity[..., n:]
  return jnp.concatenate([-a_q * jnp.sum(a_p, -1, keepdims=True), a_p * jnp.sum(a_q, -1, keepdims=True)],
                         axis=-1)


def _apply_coefficients(coef: Array, x: Array, refs: Array) -> Array:
  """V(x_i) = sum_j c_ij (y_j - x_i) = c @ Y - (sum_j c_ij) x_i."""
  return jnp.einsum("gim,gms->gis", coef, refs) - jnp.sum(coef, -1, keepdims=True) * x


def _stop_gradient_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, *, kernel,
                             bandwidths, normalize_distances, distance_scale, normalize_gradients,
                             coefficients_fn, statistics=None, return_batch_sums=False):
  groups = _prepare(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg)
  refs = _references(groups)
  kernels = _kernels(kernel, bandwidths)
  statistics = statistics_lib.check_statistics(statistics, len(kernels))
  blocks = _reference_distances(groups, refs)
  scale = _distance_scale(groups, refs, normalize_distances, distance_scale, distances=blocks,
                          batch_scale=statistics.distance_scale)
  x = groups.gen / scale[:, None, None]
  x_sg = jax.lax.stop_gradient(x)
  ref_points = refs.points / scale[:, None, None]
  r = _common.pairwise_distances(x_sg, ref_points)
  field = jnp.zeros_like(x_sg)
  info = {"scale": jnp.mean(scale)}
  fields = []
  for h, kern in enumerate(kernels):
    field_s = _apply_coefficients(coefficients_fn(kern.log_k(r), refs), x_sg, ref_points)
    fields.append(field_s)
    info[f"field_rms_{kern.bandwidth:g}"] = jnp.sqrt(jnp.mean(jnp.square(field_s)))
    if normalize_gradients:
      mean_square = None if statistics.field_mean_square is None else statistics.field_mean_square[h]
      field_s = _rms_normalize_field(field_s, mean_square)
    field = field + field_s
  goal = jax.lax.stop_gradient(x_sg + field)
  per_sample = jnp.mean(jnp.square(x - goal), axis=-1)
  loss = jnp.sum(_generated_probabilities(groups) * per_sample, axis=-1)
  loss = _per_row(groups, _nan_if_invalid(groups, loss))
  if not return_batch_sums:
    return loss, info
  return loss, info, statistics_lib.batch_sums(blocks, fields if normalize_gradients else None, len(kernels))


@per_feature_group
def corrected_drift_loss(
    gen: Array,
    fixed_pos: Array,
    fixed_neg: Array | None = None,
    weight_gen: Array | None = None,
    weight_pos: Array | None = None,
    weight_neg: Array | None = None,
    *,
    kernel: str | Kernel = "laplace",
    bandwidths: float | Sequence[float] = (0.02, 0.05, 0.2),
    normalize_distances: bool = True,
    distance_scale: Array | float | None = None,
    normalize_gradients: bool = False,
    statistics: statistics_lib.BatchStatistics | None = None,
    return_batch_sums: bool = False,
) -> tuple[Array, Info]:
  """The stop-gradient objective (FHM Eq. 1) with the corrected field of FHM Eq. 3.

  V(x) = sum_j softmax_p(log w+ k(x, y))_j (y_j - x) - sum_j softmax_q(...)_j (y_j - x),
  the p- and q-sides normalized separately; loss[b] = sum_i w_i mean_s (x_i - sg(x_i + V))^2
  in coordinates divided by the distance scale. Memory is O(Cg (Cp + Cn)) per group:
  the [N, Npos, Nneg] tensor of a literal double-expectation implementation is
  never formed, because the field factorizes into one softmax per side.
  `normalize_gradients` divides each bandwidth's field by its batch RMS. `statistics`:
  the whole batch's distance scale and field mean squares where these groups are a
  chunk of it (`losses.statistics`); `return_batch_sums` also returns this call's
  `BatchSums` (one feature group only).
  """
  return _stop_gradient_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, kernel=kernel,
                                  bandwidths=bandwidths, normalize_distances=normalize_distances,
                                  distance_scale=distance_scale, normalize_gradients=normalize_gradients,
                                  coefficients_fn=_corrected_coefficients, statistics=statistics,
                                  return_batch_sums=return_batch_sums)


@per_feature_group
def joint_drift_loss(
    gen: Array,
    fixed_pos: Array,
    fixed_neg: Array | None = None,
    weight_gen: Array | None = None,
    weight_pos: Array | None = None,
    weight_neg: Array | None = None,
    *,
    kernel: str | Kernel = "laplace",
    bandwidths: float | Sequence[float] = (0.02, 0.05, 0.2),
    normalize_distances: bool = True,
    distance_scale: Array | float | None = None,
    normalize_gradients: bool = True,
    statistics: statistics_lib.BatchStatistics | None = None,
    return_batch_sums: bool = False,
) -> tuple[Array, Info]:
  """The stop-gradient objective with Deng et al.'s Algorithm 2 field as printed.

  The joint normalization analysed in FHM Appendix D: one softmax over all references
  of a sample and one over the generated samples, combined by a geometric mean; the
  positive coefficients are scaled by the negative mass and vice versa. With
  `normalize_gradients` (default, as in the release) each bandwidth's field has unit RMS.
  `statistics` and `return_batch_sums` as in `corrected_drift_loss`.
  """
  return _stop_gradient_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, kernel=kernel,
                                  bandwidths=bandwidths, normalize_distances=normalize_distances,
                                  distance_scale=distance_scale, normalize_gradients=normalize_gradients,
                                  coefficients_fn=_joint_coefficients, statistics=statistics,
                                  return_batch_sums=return_batch_sums)


@per_feature_group
def release_drift_loss(
    gen: Array,
    fixed_pos: Array,
    fixed_neg: Array | None = None,
    weight_gen: Array | None = None,
    weight_pos: Array | None = None,
    weight_neg: Array | None = None,
    *,
    R_list: Sequence[float] = (0.02, 0.05, 0.2),
    kernel: str = "laplace",
    statistics: statistics_lib.BatchStatistics | None = None,
    return_batch_sums: bool = False,
) -> tuple[Array, Info]:
  """The official release's `drift_loss`, reproduced to fp32 tolerance.

  Its field is the joint one (Algorithm 2) with the release's details: one batch-wide
  distance scale; distances divided by it and coordinates by scale / sqrt(S); the
  self-distance raised by 100 (not removed); softmax products floored at 1e-6 before
  the square root; each temperature's force divided by its batch RMS and the forces
  summed; loss = mean over samples and coordinates of (x - sg(x + F))^2. The temperature
  R is the Laplace bandwidth (logits -d/R); `kernel="gaussian"` swaps the logits
  for -d^2/(2R^2), the "Drifting-Gauss" variant. `statistics`: the whole batch's
  scale and forces' mean squares where these groups are a chunk of it
  (`losses.statistics`; the scale replaces the batch mean here, floors and all);
  `return_batch_sums` also returns this call's `BatchSums` (one feature group only).

  Returns:
    loss [B] and info {"scale", "loss_<R>" (mean squared force before normalization)}.
  """
  groups = _prepare(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg)
  refs = _references(groups)
  kernels = _kernels(kernel, R_list)
  statistics = statistics_lib.check_statistics(statistics, len(kernels))
  num_features = groups.gen.shape[-1]
  x_sg = jax.lax.stop_gradient(groups.gen)
  dist = _common.pairwise_distances(x_sg, refs.points)
  scale = statistics.distance_scale
  if scale is None:
    scale = batch_distance_scale(dist, refs.weights)
  scale = jax.lax.stop_gradient(scale)
  coordinate_scale = jnp.maximum(scale / math.sqrt(num_features), 1e-3)
  r = dist / jnp.maximum(scale, 1e-3) + 100.0 * refs.self_mask[None]
  x_scaled = x_sg / coordinate_scale
  refs_scaled = refs.points / coordinate_scale
  no_self_removal = refs._replace(self_mask=jnp.zeros_like(refs.self_mask))
  force = jnp.zeros_like(x_scaled)
  info = {"scale": scale}
  forces = []
  for h, kern in enumerate(kernels):
    coef = _joint_coefficients(kern.log_k(r), no_self_removal, affinity_floor=1e-6)
    force_r = _apply_coefficients(coef, x_scaled, refs_scaled)
    forces.append(force_r)
    mean_square = jnp.mean(jnp.square(force_r))
    info[f"loss_{kern.bandwidth:g}"] = mean_square
    if statistics.field_mean_square is not None:
      mean_square = statistics.field_mean_square[h]
    force = force + force_r / jnp.sqrt(jnp.maximum(mean_square, 1e-8))
  goal = jax.lax.stop_gradient(x_scaled + force)
  loss = jnp.mean(jnp.square(groups.gen / coordinate_scale - goal), axis=(-1, -2))
  loss = _per_row(groups, _nan_if_invalid(groups, loss))
  if not return_batch_sums:
    return loss, info
  return loss, info, statistics_lib.batch_sums([(dist, refs.weights)], forces, len(kernels))
