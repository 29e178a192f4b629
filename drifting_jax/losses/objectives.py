"""Grouped training objectives with the official release's `drift_loss` signature.

Every objective takes

    gen        [B, Cg, S]  generated features (differentiable)
    fixed_pos  [B, Cp, S]  data features of the group's class
    fixed_neg  [B, Cn, S]  extra negatives, e.g. unconditional data for CFG (optional)
    weight_gen [B, Cg], weight_pos [B, Cp], weight_neg [B, Cn]  (optional, default 1)

and returns `(loss [B], info)`, so it drops into the release's training loop. A
group b is one class (and one feature location); the objectives never mix groups
except through the batch-wide distance scale, which is a stop-gradient statistic.
Rank-4 inputs [B, C, T, S] treat T as T independent groups per row and average
their losses; a dict of such arrays (feature groups) sums the groups' losses, as
the release's trainer does (`sum_over_feature_groups`).

The negatives of the model distribution q are the *other* generated samples of
the group (stop-gradient, self excluded) plus `fixed_neg`, weighted. With the
release's CFG weights (generated 1, unconditional (alpha - 1)(Cg - 1)/Cn) the
negative KDE is q / alpha + (1 - 1/alpha) p_uncond, so guidance needs no special
case here.

Objectives (FHM = Franz, Hoffmann & Martius 2026; Deng = Deng et al. 2026):
  log_kde_loss          E_x[log q#(x) - log p#(x)], sharp kernel    (FHM Eq. 19)
  corrected_drift_loss  |x - sg(x + V)|^2, V = corrected field       (FHM Eq. 1, 3)
  joint_drift_loss      |x - sg(x + V)|^2, V = Deng's Algorithm 2    (FHM App. D)
  release_drift_loss    the official release's field, bit-compatible
  mmd_loss              E_x[q_hat(x) - p_hat(x)], MMD witness         (FHM Prop. 7)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from drifting_jax.losses import _common
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


def _distance_scale(groups: _Groups, refs: _References, normalize_distances: bool,
                    distance_scale) -> Array:
  """Per-group scale [G] that distances (and coordinates) are divided by."""
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
  dist = _common.pairwise_distances(jax.lax.stop_gradient(groups.gen), refs.points)
  scale = jnp.maximum(batch_distance_scale(dist, refs.weights), _MIN_DISTANCE_SCALE)
  return jax.lax.stop_gradient(jnp.broadcast_to(scale, (num_groups,)))


def _generated_probabilities(groups: _Groups) -> Array:
  return groups.w_gen / jnp.sum(groups.w_gen, axis=-1, keepdims=True)


def _kernels(kernel, bandwidths) -> tuple[Kernel, ...]:
  if isinstance(kernel, Kernel):
    return (kernel,)
  return tuple(get_kernel(kernel, s) for s in _common.as_bandwidth_tuple(bandwidths))


# ---------------------------------------------------------------------------------
# log-KDE (FHM Eq. 19) and MMD (FHM Prop. 7): true objectives, plain autodiff.
# ---------------------------------------------------------------------------------


class _KDEOperands(NamedTuple):
  refs: Array            # [G, M, S]
  log_weights: Array     # [G, Cg, M]: log of the reference weights, -inf at self
  log_norm_q: Array      # [G, Cg]: log total weight of q's references for each sample
  log_norm_p: Array      # [G]
  gen_prob: Array        # [G, Cg]
  scale: Array           # [G]


def _kde_operands(groups: _Groups, refs: _References, scale: Array) -> _KDEOperands:
  log_w = _common.safe_log(refs.weights)[:, None, :]
  log_w = jnp.where(refs.self_mask[None], -jnp.inf, log_w)
  total_q = jnp.sum(groups.w_gen, -1, keepdims=True) - groups.w_gen + jnp.sum(groups.w_neg, -1, keepdims=True)
  return _KDEOperands(refs.points, log_w, _common.safe_log(total_q),
                      jnp.log(jnp.sum(groups.w_pos, -1)), _generated_probabilities(groups), scale)


def _logsumexp_and_softmax(logits: Array) -> tuple[Array, Array]:
  """logsumexp over the last axis and the softmax, sharing one exp per entry."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.exp(logits - top)
  total = jnp.sum(e, axis=-1, keepdims=True)
  return (top + jnp.log(total))[..., 0], e / total


def _kde_values_and_gradients(gen: Array, ops: _KDEOperands, *, kernels: Sequence[Kernel], num_negative: int,
                              log_kernel: str, take_log: bool, normalize_gradients: bool):
  """Per-bandwidth values [H, G] and the gradient of sum_h value_h[g] w.r.t. gen [G, Cg, S].

  The gradient is formed analytically in the same pass as the values: with
  r_ij = |x_i - y_j| / c and L_ij = log k#(r_ij) + log w_j,

      d value / d x_i = sum_j a_ij (d log k# / dr)(r_ij) / r_ij * (x_i - y_j) / c^2,

  a_ij = +softmax_q(L)_ij on q's columns and -softmax_p(L)_ij on p's (for the log-KDE;
  the MMD witness uses the unnormalized exp(L_ij) / Z instead), times w_i. So the
  backward pass is one matrix product instead of autodiff's replay of every
  logsumexp. Groups are independent, hence the gradient of value[g] only touches
  gen[g] and a cotangent only rescales rows (see `_with_precomputed_gradient`).
  """
  r = _common.pairwise_distances(gen, ops.refs) / ops.scale[:, None, None]
  inv_r = 1.0 / r
  values, coefficients = [], []
  for kern in kernels:
    log_k, dlog_k_dr = jax.jvp(getattr(kern, log_kernel), (r,), (jnp.ones_like(r),))
    logits = log_k + ops.log_weights
    lse_q, soft_q = _logsumexp_and_softmax(logits[..., :num_negative])
    lse_p, soft_p = _logsumexp_and_softmax(logits[..., num_negative:])
    log_q = lse_q - ops.log_norm_q
    log_p = lse_p - ops.log_norm_p[:, None]
    if take_log:
      per_sample = log_q - log_p
      side = jnp.concatenate([soft_q, -soft_p], axis=-1)
    else:  # d exp(lse - log Z) / dL_j = exp(lse - log Z) softmax_j
      q_hat, p_hat = jnp.exp(log_q), jnp.exp(log_p)
      per_sample = q_hat - p_hat
      side = jnp.concatenate([soft_q * q_hat[..., None], -soft_p * p_hat[..., None]], axis=-1)
    values.append(jnp.sum(ops.gen_prob * per_sample, axis=-1))
    coefficients.append(side * (ops.gen_prob[..., None] * dlog_k_dr * inv_r))
  to_gen = lambda c: (jnp.sum(c, -1, keepdims=True) * gen - jnp.einsum("gim,gms->gis", c, ops.refs)) / (
      jnp.square(ops.scale)[:, None, None])
  if normalize_gradients:
    grads = [to_gen(c) for c in coefficients]
    unit = sum(g / jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(g))), 1e-30) for g in grads)
    gradient = unit / (gen.shape[1] * gen.shape[2])
  else:
    gradient = to_gen(sum(coefficients))
  return jnp.stack(values), gradient


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _with_precomputed_gradient(values_and_gradient_fn: Callable, gen: Array, operands: Any) -> Array:
  """sum_h values[h] as a function of gen, differentiated with the precomputed gradient.

  `values_and_gradient_fn(gen, operands) -> (values [H, G], gradient [G, Cg, S])`, the
  gradient of sum_h values[h, g] for every g at once. First-order only.
  """
  return jnp.sum(values_and_gradient_fn(gen, operands)[0], axis=0)


def _precomputed_fwd(values_and_gradient_fn, gen, operands):
  values, gradient = values_and_gradient_fn(gen, operands)
  return jnp.sum(values, axis=0), (gradient, operands)


def _precomputed_bwd(values_and_gradient_fn, residuals, cotangent):
  gradient, operands = residuals
  return (cotangent[:, None, None] * gradient).astype(gradient.dtype), jax.tree.map(jnp.zeros_like, operands)


_with_precomputed_gradient.defvjp(_precomputed_fwd, _precomputed_bwd)


def _kde_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, *, kernel, bandwidths,
                   normalize_distances, distance_scale, normalize_gradients, log_kernel, take_log):
  groups = _prepare(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg)
  refs = _references(groups)
  if refs.num_negative < 2:
    raise ValueError("the model KDE q needs a reference besides the sample itself: use Cg >= 2 "
                     "generated samples per group or pass fixed_neg")
  kernels = _kernels(kernel, bandwidths)
  scale = _distance_scale(groups, refs, normalize_distances, distance_scale)
  ops = _kde_operands(groups, refs, scale)
  fn = functools.partial(_kde_values_and_gradients, kernels=kernels, num_negative=refs.num_negative,
                         log_kernel=log_kernel, take_log=take_log, normalize_gradients=normalize_gradients)
  total = _with_precomputed_gradient(fn, groups.gen, ops)
  per_bandwidth = jax.lax.stop_gradient(fn(groups.gen, ops)[0])
  loss = _per_row(groups, _nan_if_invalid(groups, total))
  info = {"scale": jnp.mean(scale)}
  for kern, term in zip(kernels, per_bandwidth):
    info[f"loss_{kern.bandwidth:g}"] = jnp.mean(term)
  return loss, info


def log_kde_loss(
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
) -> tuple[Array, Info]:
  """The log-KDE loss with the sharp kernel (FHM Eq. 19), per group.

  loss[b] = sum_s sum_i w_i (log q#_s(x_i) - log p#_s(x_i)),   w_i = weight_gen / sum,

  where p#_s(x) = sum_j w+_j k#_s(x, y_j) / sum_j w+_j over the positives, and
  q#_s(x_i) is the same KDE over the other generated samples (stop-gradient, self
  excluded) and the fixed negatives with their weights: the weighted CFG mixture.
  Its gradient is -w_i V#(x_i), the sharp-normalized drifting field (Eq. 18), which
  is a true gradient, so the training dynamics have a loss (Eq. 5).

  Args:
    kernel: "gaussian", "laplace", "rational_quadratic" or a `Kernel` (then
      `bandwidths` is ignored).
    bandwidths: one or several s; the losses of several bandwidths add.
    normalize_distances: divide distances by the batch-mean weighted distance (the
      release's scale, stop-gradient), so bandwidths are relative.
    distance_scale: an explicit scale (scalar or [B], e.g. the top-k EMA scale);
      overrides `normalize_distances`.
    normalize_gradients: rescale each bandwidth's gradient to unit RMS (custom VJP),
      the analogue of the release's per-temperature force normalization. The loss
      value is unchanged.

  Returns:
    loss [B] and info {"scale", "loss_<s>" for each bandwidth}.
  """
  if isinstance(gen, Mapping):
    return sum_over_feature_groups(log_kde_loss, gen, fixed_pos, fixed_neg, weight_gen, weight_pos,
                                   weight_neg, kernel=kernel, bandwidths=bandwidths,
                                   normalize_distances=normalize_distances, distance_scale=distance_scale,
                                   normalize_gradients=normalize_gradients)
  return _kde_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, kernel=kernel,
                        bandwidths=bandwidths, normalize_distances=normalize_distances,
                        distance_scale=distance_scale, normalize_gradients=normalize_gradients,
                        log_kernel="log_sharp", take_log=True)


def mmd_loss(
    gen: Array,
    fixed_pos: Array,
    fixed_neg: Array | None = None,
    weight_gen: Array | None = None,
    weight_pos: Array | None = None,
    weight_neg: Array | None = None,
    *,
    kernel: str | Kernel = "gaussian",
    bandwidths: float | Sequence[float] = (0.02, 0.05, 0.2),
    sharp: bool = False,
    normalize_distances: bool = True,
    distance_scale: Array | float | None = None,
    normalize_gradients: bool = False,
) -> tuple[Array, Info]:
  """The MMD objective in witness form: loss[b] = sum_i w_i (q_hat(x_i) - p_hat(x_i)).

  q_hat and p_hat are the (unnormalized-kernel) KDEs built like `log_kde_loss`'s.
  The gradient with respect to x_i is half that of the U-statistic MMD^2 between
  the generated samples and the data. With `sharp=True` the kernel is k#, and the
  gradient is -w_i times the unnormalized drifting field of k (FHM Prop. 7).
  """
  if isinstance(gen, Mapping):
    return sum_over_feature_groups(mmd_loss, gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg,
                                   kernel=kernel, bandwidths=bandwidths, sharp=sharp,
                                   normalize_distances=normalize_distances, distance_scale=distance_scale,
                                   normalize_gradients=normalize_gradients)
  return _kde_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, kernel=kernel,
                        bandwidths=bandwidths, normalize_distances=normalize_distances,
                        distance_scale=distance_scale, normalize_gradients=normalize_gradients,
                        log_kernel="log_sharp" if sharp else "log_k", take_log=False)


# ---------------------------------------------------------------------------------
# Stop-gradient objectives: loss = |x - sg(x + V(x))|^2 (FHM Eq. 1).
# ---------------------------------------------------------------------------------


def _rms_normalize_field(field: Array) -> Array:
  """field / RMS(field) over the whole batch (the release's force normalization)."""
  return field / jnp.sqrt(jnp.maximum(jnp.mean(jnp.square(field)), 1e-8))


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
                             coefficients_fn):
  groups = _prepare(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg)
  refs = _references(groups)
  kernels = _kernels(kernel, bandwidths)
  scale = _distance_scale(groups, refs, normalize_distances, distance_scale)
  x = groups.gen / scale[:, None, None]
  x_sg = jax.lax.stop_gradient(x)
  ref_points = refs.points / scale[:, None, None]
  r = _common.pairwise_distances(x_sg, ref_points)
  field = jnp.zeros_like(x_sg)
  info = {"scale": jnp.mean(scale)}
  for kern in kernels:
    field_s = _apply_coefficients(coefficients_fn(kern.log_k(r), refs), x_sg, ref_points)
    info[f"field_rms_{kern.bandwidth:g}"] = jnp.sqrt(jnp.mean(jnp.square(field_s)))
    field = field + (_rms_normalize_field(field_s) if normalize_gradients else field_s)
  goal = jax.lax.stop_gradient(x_sg + field)
  per_sample = jnp.mean(jnp.square(x - goal), axis=-1)
  loss = jnp.sum(_generated_probabilities(groups) * per_sample, axis=-1)
  return _per_row(groups, _nan_if_invalid(groups, loss)), info


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
) -> tuple[Array, Info]:
  """The stop-gradient objective (FHM Eq. 1) with the corrected field of FHM Eq. 3.

  V(x) = sum_j softmax_p(log w+ k(x, y))_j (y_j - x) - sum_j softmax_q(...)_j (y_j - x),
  the p- and q-sides normalized separately; loss[b] = sum_i w_i mean_s (x_i - sg(x_i + V))^2
  in coordinates divided by the distance scale. Memory is O(Cg (Cp + Cn)) per group:
  the [N, Npos, Nneg] tensor of a literal double-expectation implementation is
  never formed, because the field factorizes into one softmax per side.
  `normalize_gradients` divides each bandwidth's field by its batch RMS.
  """
  if isinstance(gen, Mapping):
    return sum_over_feature_groups(corrected_drift_loss, gen, fixed_pos, fixed_neg, weight_gen, weight_pos,
                                   weight_neg, kernel=kernel, bandwidths=bandwidths,
                                   normalize_distances=normalize_distances, distance_scale=distance_scale,
                                   normalize_gradients=normalize_gradients)
  return _stop_gradient_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, kernel=kernel,
                                  bandwidths=bandwidths, normalize_distances=normalize_distances,
                                  distance_scale=distance_scale, normalize_gradients=normalize_gradients,
                                  coefficients_fn=_corrected_coefficients)


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
) -> tuple[Array, Info]:
  """The stop-gradient objective with Deng et al.'s Algorithm 2 field as printed.

  The joint normalization analysed in FHM Appendix D: one softmax over all references
  of a sample and one over the generated samples, combined by a geometric mean; the
  positive coefficients are scaled by the negative mass and vice versa. With
  `normalize_gradients` (default, as in the release) each bandwidth's field has unit RMS.
  """
  if isinstance(gen, Mapping):
    return sum_over_feature_groups(joint_drift_loss, gen, fixed_pos, fixed_neg, weight_gen, weight_pos,
                                   weight_neg, kernel=kernel, bandwidths=bandwidths,
                                   normalize_distances=normalize_distances, distance_scale=distance_scale,
                                   normalize_gradients=normalize_gradients)
  return _stop_gradient_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, kernel=kernel,
                                  bandwidths=bandwidths, normalize_distances=normalize_distances,
                                  distance_scale=distance_scale, normalize_gradients=normalize_gradients,
                                  coefficients_fn=_joint_coefficients)


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
) -> tuple[Array, Info]:
  """The official release's `drift_loss`, reproduced to fp32 tolerance.

  Its field is the joint one (Algorithm 2) with the release's details: one batch-wide
  distance scale; distances divided by it and coordinates by scale / sqrt(S); the
  self-distance raised by 100 (not removed); softmax products floored at 1e-6 before
  the square root; each temperature's force divided by its batch RMS and the forces
  summed; loss = mean over samples and coordinates of (x - sg(x + F))^2. The temperature
  R is the Laplace bandwidth (logits -d/R); `kernel="gaussian"` swaps the logits
  for -d^2/(2R^2), the "Drifting-Gauss" variant.

  Returns:
    loss [B] and info {"scale", "loss_<R>" (mean squared force before normalization)}.
  """
  if isinstance(gen, Mapping):
    return sum_over_feature_groups(release_drift_loss, gen, fixed_pos, fixed_neg, weight_gen, weight_pos,
                                   weight_neg, R_list=R_list, kernel=kernel)
  groups = _prepare(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg)
  refs = _references(groups)
  kernels = _kernels(kernel, R_list)
  num_features = groups.gen.shape[-1]
  x_sg = jax.lax.stop_gradient(groups.gen)
  dist = _common.pairwise_distances(x_sg, refs.points)
  scale = jax.lax.stop_gradient(batch_distance_scale(dist, refs.weights))
  coordinate_scale = jnp.maximum(scale / math.sqrt(num_features), 1e-3)
  r = dist / jnp.maximum(scale, 1e-3) + 100.0 * refs.self_mask[None]
  x_scaled = x_sg / coordinate_scale
  refs_scaled = refs.points / coordinate_scale
  no_self_removal = refs._replace(self_mask=jnp.zeros_like(refs.self_mask))
  force = jnp.zeros_like(x_scaled)
  info = {"scale": scale}
  for kern in kernels:
    coef = _joint_coefficients(kern.log_k(r), no_self_removal, affinity_floor=1e-6)
    force_r = _apply_coefficients(coef, x_scaled, refs_scaled)
    mean_square = jnp.mean(jnp.square(force_r))
    info[f"loss_{kern.bandwidth:g}"] = mean_square
    force = force + force_r / jnp.sqrt(jnp.maximum(mean_square, 1e-8))
  goal = jax.lax.stop_gradient(x_scaled + force)
  loss = jnp.mean(jnp.square(groups.gen / coordinate_scale - goal), axis=(-1, -2))
  return _per_row(groups, _nan_if_invalid(groups, loss)), info


# ---------------------------------------------------------------------------------
# Feature groups.
# ---------------------------------------------------------------------------------


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
