"""log-KDE (FHM Eq. 19) and MMD (FHM Prop. 7): true objectives, plain autodiff.

Both are differences of kernel density estimates at the generated samples, with
the release's grouped signature (see `drifting_jax.losses.objectives`). Their
values and gradients are computed in one pass and handed to autodiff through a
custom VJP (`_with_precomputed_gradient`), which saves a second pass over the
pairwise kernel matrix.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from drifting_jax.losses import _common, fused_kde, statistics as statistics_lib
from drifting_jax.losses.groups import (_MIN_DISTANCE_SCALE, Info, _distance_scale, _generated_probabilities, _Groups,
                                        _kernels, _nan_if_invalid, _per_row, _prepare, per_feature_group)
from drifting_jax.losses.kernels import Kernel

Array = jax.Array


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


def _kde_operands(groups: _Groups, normalize_distances: bool, distance_scale,
                  batch_scale=None) -> tuple[_KDEOperands, list[tuple[Array, Array]]]:
  """The KDEs' operands, and the distance blocks of the batch-mean scale (for `BatchSums`)."""
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
  blocks = [(dist_q, w_q), (dist_p, groups.w_pos)]
  scale = _distance_scale(groups, None, normalize_distances, distance_scale, distances=blocks,
                          batch_scale=batch_scale)
  inv_scale = 1.0 / scale[:, None, None]
  log_w_q = _common.safe_log(w_q)
  # q's references exclude the sample itself: weight 0 on the diagonal.
  total_q = jnp.sum(w_q, -1, keepdims=True) - groups.w_gen
  q = _Side(points_q, dist_q * inv_scale, jnp.where(is_self, -jnp.inf, log_w_q[:, None, :]),
            jnp.max(log_w_q, -1, keepdims=True), _common.safe_log(total_q))
  log_w_p = _common.safe_log(groups.w_pos)
  p = _Side(groups.pos, dist_p * inv_scale, log_w_p[:, None, :], jnp.max(log_w_p, -1, keepdims=True),
            jnp.log(jnp.sum(groups.w_pos, -1, keepdims=True)))
  return _KDEOperands(q, p, _generated_probabilities(groups), scale), blocks


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

  def entries(self, r: Array, log_weights: Array, shift: Array) -> tuple[Array, Array]:
    """(w K(r) / exp(shift), w K'(r) / exp(shift)) from one exp, at distances r (the
    XLA path's and the Pallas kernels' one rule, `fused_kde`)."""
    e = jnp.exp(self.log_base(r) + log_weights - shift)
    value = e
    if self.value_over_base is not None:
      # Entries that are masked or underflowed (e = 0) add exactly 0, even where the ratio
      # overflows (0 * inf = NaN). The select also keeps XLA:CPU from fusing the product
      # into the reduction, which its YNNPACK backend then runs several times slower.
      value = jnp.where(e > 0, e * self.value_over_base(r), 0.0)
    return value, (e if self.grad_over_base is None else e * self.grad_over_base(r))


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
  """One KDE at every generated sample: (log KDE [G, Cg], gradient-kernel entries w K' / exp(shift)
  [G, Cg, N], sum_j w K / exp(shift)).

  The logsumexp's shift is log base(r_min) + log max_j w_j, r_min the distance to the
  nearest reference of nonzero weight. The kernels decrease with r (radial profiles;
  a sharp kernel is a tail integral), so every e_ij <= 1 and the nearest one is
  >= w_nearest / w_max; the KDE's terms are e times K / base, a moderate factor
  (k#/k = s (r + s) for the Laplace kernel). So no overflow, and no underflow short of
  weight ratios of ~1e30. One min over r serves all bandwidths: unlike a max-shifted
  logsumexp, no max pass per bandwidth.
  """
  shift = pair.log_base(r_min) + side.log_max_weight
  value, grad = pair.entries(side.distances, side.log_weights, shift[..., None])
  total = jnp.sum(value, axis=-1)
  return shift + jnp.log(total) - side.log_norm, grad, total


def _kde_values_and_gradients(gen: Array, ops: _KDEOperands, *, kernels: Sequence[Kernel], sharp: bool,
                              take_log: bool, normalize_gradients: bool, field_mean_square: Array | None = None):
  """Per-bandwidth values [H, G], the gradient of sum_h value_h[g] w.r.t. gen [G, Cg, S], and
  each bandwidth's summed squared gradient [H] (zeros without `normalize_gradients`).

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
    log_q, grad_q, total_q = _kde_side(pair, q, r_min_q)
    log_p, grad_p, total_p = _kde_side(pair, p, r_min_p)
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
    coefficients.append((grad_q * row_q[..., None], grad_p * row_p[..., None]))

  def to_gen(c_q, c_p):  # sum_j c_ij (x_i - y_j) / c^2 over both sides
    rows = jnp.sum(c_q, -1, keepdims=True) + jnp.sum(c_p, -1, keepdims=True)
    products = jnp.einsum("gim,gms->gis", c_q, q.points) + jnp.einsum("gim,gms->gis", c_p, p.points)
    return (rows * gen - products) / jnp.square(ops.scale)[:, None, None]

  if normalize_gradients:
    grads = [to_gen(c_q, c_p) for c_q, c_p in coefficients]
    field_square = jnp.stack([jnp.sum(jnp.square(g)) for g in grads])
    # Each bandwidth's gradient divided by its RMS over the batch: these groups', or
    # the whole batch's where they are a chunk of it (statistics.BatchStatistics).
    mean_squares = ([jnp.mean(jnp.square(g)) for g in grads] if field_mean_square is None
                    else list(field_mean_square))
    unit = sum(g / jnp.maximum(jnp.sqrt(ms), 1e-30) for g, ms in zip(grads, mean_squares))
    gradient = unit / (gen.shape[1] * gen.shape[2])
  else:
    gradient = to_gen(sum(c for c, _ in coefficients), sum(c for _, c in coefficients))
    field_square = jnp.zeros((len(kernels),), gradient.dtype)
  return jnp.stack(values), gradient, field_square


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _with_precomputed_gradient(values_and_gradient_fn: Callable, gen: Array, operands: Any):
  """(sum_h values[h], values, field_square) as a function of gen, differentiated with the precomputed gradient.

  `values_and_gradient_fn(gen, operands) -> (values [H, G], gradient [G, Cg, S],
  field_square [H])`, the gradient of sum_h values[h, g] for every g at once. Returns
  the total [G], the per-bandwidth values [H, G] and the squared gradients' sums from
  one evaluation. Only the total is differentiated: the cotangents of the others are
  ignored, so callers must stop their gradient (they are for logging and batch
  statistics). The operands get a zero cotangent. First-order only.
  """
  values, _, field_square = values_and_gradient_fn(gen, operands)
  return jnp.sum(values, axis=0), values, field_square


def _precomputed_fwd(values_and_gradient_fn, gen, operands):
  values, gradient, field_square = values_and_gradient_fn(gen, operands)
  return (jnp.sum(values, axis=0), values, field_square), (gradient, operands)


def _precomputed_bwd(values_and_gradient_fn, residuals, cotangents):
  gradient, operands = residuals
  cotangent = cotangents[0]  # the other outputs' cotangents are ignored, see above
  return (cotangent[:, None, None] * gradient).astype(gradient.dtype), jax.tree.map(jnp.zeros_like, operands)


_with_precomputed_gradient.defvjp(_precomputed_fwd, _precomputed_bwd)


IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")


def _kde_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, *, kernel, bandwidths,
                   normalize_distances, distance_scale, normalize_gradients, sharp, take_log, statistics,
                   return_batch_sums, implementation="xla", batch_sharding=None):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  groups = _prepare(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg)
  if groups.gen.shape[1] + groups.neg.shape[1] < 2:
    raise ValueError("the model KDE q needs a reference besides the sample itself: use Cg >= 2 "
                     "generated samples per group or pass fixed_neg")
  kernels = _kernels(kernel, bandwidths)
  statistics = statistics_lib.check_statistics(statistics, len(kernels))
  if implementation != "xla" and fused_kde.supports(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg,
                                                    distance_scale) is None:
    # `groups` above only validated the inputs: XLA drops its unused transposed copies.
    return _fused_kde_objective(gen, fixed_pos, fixed_neg, weight_neg, kernels=kernels, sharp=sharp,
                                take_log=take_log, normalize_distances=normalize_distances,
                                distance_scale=distance_scale, normalize_gradients=normalize_gradients,
                                statistics=statistics, return_batch_sums=return_batch_sums,
                                interpret=implementation == "pallas_interpret", batch_sharding=batch_sharding)
  ops, blocks = _kde_operands(groups, normalize_distances, distance_scale, statistics.distance_scale)
  fn = functools.partial(_kde_values_and_gradients, kernels=kernels, sharp=sharp, take_log=take_log,
                         normalize_gradients=normalize_gradients, field_mean_square=statistics.field_mean_square)
  total, per_bandwidth, field_square = _with_precomputed_gradient(fn, groups.gen, ops)
  per_bandwidth = jax.lax.stop_gradient(per_bandwidth)
  loss = _per_row(groups, _nan_if_invalid(groups, total))
  info = {"scale": jnp.mean(ops.scale)}
  for kern, term in zip(kernels, per_bandwidth):
    info[f"loss_{kern.bandwidth:g}"] = jnp.mean(term)
  if not return_batch_sums:
    return loss, info
  sums = statistics_lib.batch_sums(blocks, None, len(kernels))
  if normalize_gradients:
    sums = sums._replace(field_square=jax.lax.stop_gradient(field_square),
                         field_count=jnp.asarray(float(groups.gen.size), sums.field_count.dtype))
  return loss, info, sums


def _fused_kde_objective(gen, fixed_pos, fixed_neg, weight_neg, *, kernels, sharp, take_log, normalize_distances,
                         distance_scale, normalize_gradients, statistics, return_batch_sums, interpret,
                         batch_sharding):
  """`_kde_objective` by the Pallas kernels of `fused_kde` (same values and gradients, to float32 rounding).

  Passes over the inputs: the scale's (where the batch mean is needed), the values'
  (with each bandwidth's squared gradient sums under `normalize_gradients`), and in the
  backward pass the gradient's.
  """
  sg = jax.lax.stop_gradient
  gen = jnp.asarray(gen, jnp.float32)
  fixed_pos = sg(jnp.asarray(fixed_pos, jnp.float32))
  fixed_neg = None if fixed_neg is None or fixed_neg.shape[1] == 0 else sg(jnp.asarray(fixed_neg, jnp.float32))
  weight_neg = None if fixed_neg is None or weight_neg is None else sg(jnp.asarray(weight_neg, jnp.float32))
  inputs = fused_kde.FusedInputs(sg(gen), fixed_pos, fixed_neg, weight_neg)
  shape = inputs.shape
  groups = shape.classes * shape.tokens
  references = shape.generated + shape.negatives + shape.positives
  pairs = tuple(_kernel_pair(k, sharp) for k in kernels)

  # The distance scale: given, none, or the batch mean of the distances (the scale pass).
  # The weights' sums are known without a pass: q's are 1 per generated sample and w_neg,
  # p's 1 per positive, for every token.
  w_neg_sum = jnp.sum(inputs.w_neg) if shape.negatives else 0.0
  distance_sums = None
  if return_batch_sums or (normalize_distances and distance_scale is None and statistics.distance_scale is None):
    distance_sums = statistics_lib.DistanceSums(
        jnp.sum(fused_kde.weighted_distance_sums(inputs, interpret=interpret, batch_sharding=batch_sharding)),
        jnp.asarray(float(groups * shape.generated * references), jnp.float32),
        jnp.asarray(shape.tokens * (shape.classes * (shape.generated + shape.positives) + w_neg_sum), jnp.float32),
        jnp.asarray(float(groups * references), jnp.float32))
  if distance_scale is not None:
    scale = sg(jnp.asarray(distance_scale, jnp.float32))
  elif not normalize_distances:
    scale = jnp.ones((), jnp.float32)
  else:
    raw = statistics.distance_scale
    if raw is None:
      raw = statistics_lib.mean_distance(*distance_sums)
    scale = sg(jnp.maximum(jnp.asarray(raw, jnp.float32), _MIN_DISTANCE_SCALE))

  # The values (and each bandwidth's squared gradient sums, for its RMS): one pass; the
  # gradient pass runs in the backward pass (`fused_kde.objective`).
  call = fused_kde.Call(pairs, take_log, normalize_gradients=normalize_gradients, interpret=interpret,
                        batch_sharding=batch_sharding)
  total, per_bandwidth, field_terms = fused_kde.objective(
      call, gen, (fixed_pos, fixed_neg, weight_neg, scale, statistics.field_mean_square))
  field_square = sg(jnp.sum(field_terms, axis=(1, 2)))
  per_bandwidth = sg(per_bandwidth)
  loss = jnp.mean(total, axis=1)  # [B]: the mean over a row's token groups, as `_per_row`
  bad = None if weight_neg is None else _common.invalid_weight_mask(weight_neg)
  if bad is not None:
    loss = jnp.where(bad, jnp.nan, loss)
  info = {"scale": jnp.mean(jnp.broadcast_to(scale, (shape.classes,)))}
  for kern, term in zip(kernels, per_bandwidth):
    info[f"loss_{kern.bandwidth:g}"] = jnp.mean(term)
  if not return_batch_sums:
    return loss, info
  sums = statistics_lib.BatchSums(
      *distance_sums, field_square if normalize_gradients else jnp.zeros((len(pairs),), jnp.float32),
      jnp.asarray(float(gen.size) if normalize_gradients else 0.0, jnp.float32))
  return loss, info, sums


@per_feature_group
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
    statistics: statistics_lib.BatchStatistics | None = None,
    return_batch_sums: bool = False,
    implementation: str = "xla",
    batch_sharding: tuple | None = None,
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
    statistics: the whole batch's distance scale and gradient mean squares where
      these groups are a chunk of it (`losses.statistics`); None: their own.
    return_batch_sums: also return this call's `BatchSums` (one feature group only).
    implementation: "xla", or "pallas": the Pallas TPU kernels of `fused_kde` (one
      pass per statistic over the inputs, nothing [G, Cg, M] in HBM) where they take
      the call (`fused_kde.supports`), else XLA; "pallas_interpret": those kernels in
      the Pallas interpreter, on any platform (tests).
    batch_sharding: (mesh, its axes of the class axis B) where the inputs are split
      over devices: the Pallas kernels then run per device (XLA cannot partition them).

  Returns:
    loss [B] and info {"scale", "loss_<s>" for each bandwidth} (and the `BatchSums`).
  """
  return _kde_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, kernel=kernel,
                        bandwidths=bandwidths, normalize_distances=normalize_distances,
                        distance_scale=distance_scale, normalize_gradients=normalize_gradients,
                        sharp=True, take_log=True, statistics=statistics, return_batch_sums=return_batch_sums,
                        implementation=implementation, batch_sharding=batch_sharding)


@per_feature_group
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
    statistics: statistics_lib.BatchStatistics | None = None,
    return_batch_sums: bool = False,
    implementation: str = "xla",
    batch_sharding: tuple | None = None,
) -> tuple[Array, Info]:
  """The MMD objective in witness form: loss[b] = sum_i w_i (q_hat(x_i) - p_hat(x_i)).

  q_hat and p_hat are the (unnormalized-kernel) KDEs built like `log_kde_loss`'s.
  The gradient with respect to x_i is half that of the U-statistic MMD^2 between
  the generated samples and the data. With `sharp=True` the kernel is k#, and the
  gradient is -w_i times the unnormalized drifting field of k (FHM Prop. 7).
  `statistics`, `return_batch_sums`, `implementation` and `batch_sharding` as in `log_kde_loss`.
  """
  return _kde_objective(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg, kernel=kernel,
                        bandwidths=bandwidths, normalize_distances=normalize_distances,
                        distance_scale=distance_scale, normalize_gradients=normalize_gradients,
                        sharp=sharp, take_log=False, statistics=statistics, return_batch_sums=return_batch_sums,
                        implementation=implementation, batch_sharding=batch_sharding)
