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


def _distance_scale(groups: _Groups, refs: _References | None, normalize_distances: bool, distance_scale,
                    distances: Sequence[tuple[Array, Array]] | None = None) -> Array:
  """Per-group scale [G] that distances (and coordinates) are divided by.

  `distances`: the generated-to-reference distances where the caller has them, as
  column blocks [(dist [G, Cg, Mb], weights [G, Mb])]; else computed from `refs`.
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
  if distances is None:
    distances = [(_common.pairwise_distances(jax.lax.stop_gradient(groups.gen), refs.points), refs.weights)]
  if len(distances) == 1:
    scale = batch_distance_scale(*distances[0])
  else:  # batch_distance_scale of the blocks side by side, without concatenating them
    entries = sum(d.size for d, _ in distances)
    weight_mean = sum(jnp.sum(w) for _, w in distances) / sum(w.size for _, w in distances)
    scale = sum(jnp.sum(d * w[:, None, :]) for d, w in distances) / entries / weight_mean
  scale = jnp.maximum(scale, _MIN_DISTANCE_SCALE)
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


class _Side(NamedTuple):
  """One KDE's references (q: the generated samples and fixed negatives; p: the positives)."""

  points: Array          # [G, N, S]
  distances: Array       # [G, Cg, N]: |x_i - y_j| / scale (stop-gradient)
  log_weights: Array     # [G, Cg, N] or [G, 1, N]: -inf for zero weights and for a sample itself
  log_max_weight: Array  # [G, 1]: max_j log w_j (for q over all columns: a bound for j != i)
  log_norm: Array        # [G, Cg] or [G, 1]: log sum_j w_j (for q, over j != i)


class _KDEOperands(NamedTuple):
  q: _Side
  p: _Side
  gen_prob: Array        # [G, Cg]
  scale: Array           # [G]


def _kde_operands(groups: _Groups, normalize_distances: bool, distance_scale) -> _KDEOperands:
  cg = groups.gen.shape[1]
  gen_sg = jax.lax.stop_gradient(groups.gen)
  points_q = jnp.concatenate([gen_sg, groups.neg], axis=1)
  w_q = jnp.concatenate([groups.w_gen, groups.w_neg], axis=1)
  is_self = jnp.arange(cg)[:, None] == jnp.arange(w_q.shape[1])[None, :]
  # A sample's distance to itself is exactly the floor: |x|^2 + |x|^2 - 2 x.x leaves
  # rounding noise there, which would enter the distance scale.
  dist_q = jnp.where(is_self, math.sqrt(_common.SQUARED_DISTANCE_EPS),
                     _common.pairwise_distances(gen_sg, points_q))
  dist_p = _common.pairwise_distances(gen_sg, groups.pos)
  scale = _distance_scale(groups, None, normalize_distances, distance_scale,
                          distances=[(dist_q, w_q), (dist_p, groups.w_pos)])
  inv_scale = 1.0 / scale[:, None, None]
  log_w_q = _common.safe_log(w_q)
  # q's references exclude the sample itself: weight 0 on the diagonal.
  total_q = jnp.sum(w_q, -1, keepdims=True) - groups.w_gen
  q = _Side(points_q, dist_q * inv_scale, jnp.where(is_self, -jnp.inf, log_w_q[:, None, :]),
            jnp.max(log_w_q, -1, keepdims=True), _common.safe_log(total_q))
  log_w_p = _common.safe_log(groups.w_pos)
  p = _Side(groups.pos, dist_p * inv_scale, log_w_p[:, None, :], jnp.max(log_w_p, -1, keepdims=True),
            jnp.log(jnp.sum(groups.w_pos, -1, keepdims=True)))
  return _KDEOperands(q, p, _generated_probabilities(groups), scale)


class _KernelPair(NamedTuple):
  """How one bandwidth's kernels are evaluated from a single exp per entry.

  `value` is the kernel K of the KDEs (k# or k) and `grad` its gradient kernel
  K' = -(1/r) dK/dr (k or k_flat, FHM Table 1). With e = exp(log_base(r)) (shifted),
  K = e * value_over_base(r) and K' = e * grad_over_base(r). Closed-form kernels give
  the ratios without transcendentals; others fall back to base = K and autodiff.
  """

  log_base: Callable[[Array], Array]
  value_over_base: Callable[[Array], Array] | None  # None: 1
  grad_over_base: Callable[[Array], Array] | None   # None: 1


def _kernel_pair(kern: Kernel, sharp: bool) -> _KernelPair:
  if sharp and kern.sharp_over_k is not None:  # K = k# = k * (k#/k), K' = k
    return _KernelPair(kern.log_k, kern.sharp_over_k, None)
  if not sharp and kern.k_over_flat is not None:  # K = k, K' = k_flat = k / (k/k_flat)
    return _KernelPair(kern.log_k, None, lambda r: 1.0 / kern.k_over_flat(r))
  log_value = kern.log_sharp if sharp else kern.log_k

  def grad_over_value(r):  # -(1/r) d log K / dr, by forward-mode autodiff
    return -jax.jvp(log_value, (r,), (jnp.ones_like(r),))[1] / r

  return _KernelPair(log_value, None, grad_over_value)


def _kde_side(pair: _KernelPair, side: _Side, r_min: Array) -> tuple[Array, Array, Array]:
  """One KDE at every generated sample: (log KDE [G, Cg], entries e [G, Cg, N], sum_j K / exp(shift)).

  The logsumexp's shift is log base(r_min) + log max_j w_j, r_min the distance to the
  nearest reference of nonzero weight. The kernels decrease with r (radial profiles;
  a sharp kernel is a tail integral), so every e_ij <= 1 and the nearest one is
  >= w_nearest / w_max; the KDE's terms are e times K / base, a moderate factor
  (k#/k = s (r + s) for the Laplace kernel). So no overflow, and no underflow short of
  weight ratios of ~1e30. One min over r serves all bandwidths: unlike a max-shifted
  logsumexp, no max pass per bandwidth.
  """
  shift = pair.log_base(r_min) + side.log_max_weight
  e = jnp.exp(pair.log_base(side.distances) + side.log_weights - shift[..., None])
  value = e
  if pair.value_over_base is not None:
    # Entries that are masked or underflowed (e = 0) add exactly 0, even where the ratio
    # overflows (0 * inf = NaN). The select also keeps XLA:CPU from fusing the product
    # into the reduction, which its YNNPACK backend then runs several times slower.
    value = jnp.where(e > 0, e * pair.value_over_base(side.distances), 0.0)
  total = jnp.sum(value, axis=-1)
  return shift + jnp.log(total) - side.log_norm, e, total


def _kde_values_and_gradients(gen: Array, ops: _KDEOperands, *, kernels: Sequence[Kernel], sharp: bool,
                              take_log: bool, normalize_gradients: bool):
  """Per-bandwidth values [H, G] and the gradient of sum_h value_h[g] w.r.t. gen [G, Cg, S].

  The gradient is formed analytically in the same pass as the values. With
  r_ij = |x_i - y_j| / c, K the KDE's kernel (k# for the log-KDE) and
  K'(r) = -(1/r) dK/dr its gradient kernel (k for K = k#, FHM Table 1),

      log q#(x_i) = log sum_{j in q} w_j K(r_ij) - log sum_{j in q} w_j,
      d log q#(x_i) / d x_i = -sum_{j in q} w_j K'(r_ij) (x_i - y_j) / (c^2 sum_{j in q} w_j K(r_ij)),

  and likewise for p (for the MMD witness, q_hat = exp(log q#) scales it). So the
  backward pass is one matrix product per side of the coefficients summed over
  bandwidths, instead of autodiff's replay of every logsumexp; K and K' come from
  one exp per entry and bandwidth (`_KernelPair`). Groups are independent, hence
  the gradient of value[g] only touches gen[g] and a cotangent only rescales rows
  (see `_with_precomputed_gradient`). The distances in `ops` are stop-gradient:
  this function's own gradient is the analytic one, not autodiff's.
  """
  q, p = ops.q, ops.p
  r_min_q = jnp.min(jnp.where(q.log_weights > -jnp.inf, q.distances, jnp.inf), axis=-1)
  r_min_p = jnp.min(jnp.where(p.log_weights > -jnp.inf, p.distances, jnp.inf), axis=-1)
  gen_prob = ops.gen_prob
  values, coefficients = [], []
  for kern in kernels:
    pair = _kernel_pair(kern, sharp)
    log_q, e_q, total_q = _kde_side(pair, q, r_min_q)
    log_p, e_p, total_p = _kde_side(pair, p, r_min_p)
    # coefficient_ij = gen_prob_i (d value_i / d log KDE) (d log KDE / d r_ij) / r_ij, and
    # (d log KDE / d r_ij) / r_ij = -w_j K'(r_ij) / sum_j w_j K(r_ij) = -e_ij grad_over_base / total.
    if take_log:
      per_sample = log_q - log_p
      row_q, row_p = -gen_prob / total_q, gen_prob / total_p
    else:  # d exp(log KDE) / d log KDE = KDE
      q_hat, p_hat = jnp.exp(log_q), jnp.exp(log_p)
      per_sample = q_hat - p_hat
      row_q, row_p = -gen_prob * q_hat / total_q, gen_prob * p_hat / total_p
    values.append(jnp.sum(gen_prob * per_sample, axis=-1))
    grad_q = e_q if pair.grad_over_base is None else e_q * pair.grad_over_base(q.distances)
    grad_p = e_p if pair.grad_over_base is None else e_p * pair.grad_over_base(p.distances)
    coefficients.append((grad_q * row_q[..., None], grad_p * row_p[..., None]))

  def to_gen(c_q, c_p):  # sum_j c_ij (x_i - y_j) / c^2 over both sides
    rows = jnp.sum(c_q, -1, keepdims=True) + jnp.sum(c_p, -1, keepdims=True)
    products = jnp.einsum("gim,gms->gis", c_q, q.points) + jnp.einsum("gim,gms->gis", c_p, p.points)
    return (rows * gen - products) / jnp.square(ops.scale)[:, None, None]

  if normalize_gradients:
    grads = [to_gen(c_q, c_p) for c_q, c_p in coefficients]
    unit = sum(g / jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(g))), 1e-30) for g in grads)
    gradient = unit / (gen.shape[1] * gen.shape[2])
  else:
    gradient = to_gen(sum(c for c, _ in coefficients), sum(c for _, c in coefficients))
  return jnp.stack(values), gradient


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _with_precomputed_gradient(values_and_gradient_fn: Callable, gen: Array, operands: Any):
  """(sum_h values[h], values) as a function of gen, differentiated with the precomputed gradient.

  `values_and_gradient_fn(gen, operands) -> (values [H, G], gradient [G, Cg, S])`, the
  gradient of sum_h values[h, g] for every g at once. Returns the total [G] and the
  per-bandwidth values [H, G] from one evaluation. Only the total is differentiated:
  the cotangent of the per-bandwidth values is ignored, so callers must stop their
  gradient (they are for logging). The operands get a zero cotangent. First-order only.
  """
  values = values_and_gradient_fn(gen, operands)[0]
  return jnp.sum(values, axis=0), values


def _precomputed_fwd(values_and_gradient_fn, gen, operands):
  values, gradient = values_and_gradient_fn(gen, operands)
  return (jnp.sum(values, axis=0), values), (gradient, operands)


def _precomputed_bwd(values_and_gradient_fn, residuals, cotangents):
  gradient, operands = residuals
  cotangent = cotangents[0]  # the per-bandwidth values' cotangent is ignored, see above
  return (cotangent[:, None, None] * gradient).astype(gradient.dtype), jax.tree.map(jnp.zeros_like, operands)


_with_precomputed_gradient.defvjp(_precomputed_fwd, _precomputed_bwd)


def _kde_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, *, kernel, bandwidths,
                   normalize_distances, distance_scale, normalize_gradients, sharp, take_log):
  groups = _prepare(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg)
  if groups.gen.shape[1] + groups.neg.shape[1] < 2:
    raise ValueError("the model KDE q needs a reference besides the sample itself: use Cg >= 2 "
                     "generated samples per group or pass fixed_neg")
  kernels = _kernels(kernel, bandwidths)
  ops = _kde_operands(groups, normalize_distances, distance_scale)
  fn = functools.partial(_kde_values_and_gradients, kernels=kernels, sharp=sharp, take_log=take_log,
                         normalize_gradients=normalize_gradients)
  total, per_bandwidth = _with_precomputed_gradient(fn, groups.gen, ops)
  per_bandwidth = jax.lax.stop_gradient(per_bandwidth)
  loss = _per_row(groups, _nan_if_invalid(groups, total))
  info = {"scale": jnp.mean(ops.scale)}
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
                        sharp=True, take_log=True)


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
                        sharp=sharp, take_log=False)


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
