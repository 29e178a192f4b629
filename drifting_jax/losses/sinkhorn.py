"""The Sinkhorn-divergence objective, a Wasserstein-flow drift built on ott-jax.

The companion paper ("drift as score difference") reads drifting as a Wasserstein
gradient flow of a divergence between the generated distribution q and the data p,
a template for new drifts that it instantiates with the Sinkhorn divergence.
`sinkhorn_loss` is that objective: the debiased Sinkhorn divergence (Feydy et al.
2019)

    S_eps(q, p) = OT_eps(q, p) - (OT_eps(q, q) + OT_eps(p, p)) / 2,

    OT_eps(a, b) = min_P <P, C> + eps KL(P | a x b)   over couplings P of a and b,

between the weighted generated samples and the weighted positives of each group.
It is a scalar function of the sample positions, so its gradient is a conservative
field by construction; S_eps >= 0 with equality iff q = p, it tends to the exact
optimal-transport cost as eps -> 0 and to the MMD with kernel -C as eps -> inf
(for C = |x - y|: half the energy distance).

Layout, weights and distance scale follow `groups.py` (`_prepare`,
`_distance_scale`): gen [B, Cg, S] (or [B, Cg, T, S], or a dict of feature groups),
fixed_pos [B, Cp, S], optional fixed_neg [B, Cn, S] and weights; loss [B]. Like the
log-KDE loss it is a true objective (plain gradient descent on it is the flow), not
a regression onto a stop-gradient target. Coordinates are divided by the distance
scale (the batch-mean scale or an explicit one, e.g. the top-k EMA scale), and
epsilon is in units of the cost of the scaled coordinates. The ground cost is
|x - y| ("euclidean", default) or |x - y|^2 ("sqeuclidean"); Euclidean costs are
exact in value, with the library's floored gradient at coincident points.

Negatives (CFG). The other objectives' negative KDE is the mixture of the generated
samples and the weighted unconditional negatives, q_mix = (sum_i w_i d_{x_i} +
sum_k v_k d_{u_k}) / (W + V), which with the release's weights is q/alpha +
(1 - 1/alpha) p_uncond. The Sinkhorn analogue replaces q by q_mix in the
divergence: loss = S_eps(q_mix, p) / m, m = W / (W + V) the generated share of
q_mix. Gradients move only the generated samples (the negatives are data). This
keeps the guided fixed point of the KDE objectives, q_mix = p, i.e.
q = alpha p - (alpha - 1) p_uncond, and S_eps stays convex in q, since q_mix is
affine in q. Dividing by m makes the gradient on x_i equal to w_i / W times the
gradient of the divergence's first variation at x_i, the same per-sample scale as
without negatives (the log-KDE loss also weights sample i by w_i / W). Negatives of
weight zero (alpha = 1) change nothing.

The self-term OT_eps(q, q) depends on the generated samples through both of its
marginals: its gradient has both contributions (the plan is symmetric, so twice the
one-sided gradient), and a sample's distance to itself is exactly 0. No sample is
excluded: the debiasing removes the self-coupling bias that the KDE objectives
remove by self-exclusion.

Solver and differentiation (ott-jax's `Sinkhorn` through
`ott.tools.sinkhorn_divergence`, on cost matrices):

* log-domain (`lse_mode=True`): costs are O(1) in scaled units and eps may be 0.01,
  so exp(-C/eps) underflows float32 in the kernel (scaling) mode;
* stopping rule: the L1 error of the marginals below `threshold` (default 1e-3 of
  the unit mass), checked every 10 iterations, at most `max_iterations` (1000);
* the two symmetric problems use ott's symmetric updates (averaged parallel updates,
  Feydy et al. 2019, Eq. 25), the cross problem the standard alternating ones;
* differentiation by the envelope (Danskin) theorem, neither implicit nor unrolled:
  the solver runs on stop-gradient costs and the gradient is <P, dC> with the
  solver's plan P, exact at convergence because the dual objective is stationary
  in the potentials. It costs one product with the cost gradient (like the forward
  distances), no linear solve (implicit differentiation) and no tape of the
  iterations (unrolling); first-order gradients are all training needs;
* one jax.vmap over the B (x T) groups: a batched while-loop runs until the slowest
  group has converged. `info` reports the largest iteration count and the
  fraction of converged problems;
* the whole objective is jitted once per shape and option set (epsilon, cost and
  the stopping rule are static), so eager calls do not re-compile the loops.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from drifting_jax.losses import _common, statistics as statistics_lib
from drifting_jax.losses.groups import (Info, _distance_scale, _Groups, _nan_if_invalid, _per_row, _prepare,
                                        per_feature_group)

Array = jax.Array

COSTS = ("euclidean", "sqeuclidean")


def _check_number(name: str, value, *, integer: bool = False) -> float:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a concrete Python number, not a traced value")
  try:
    number = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a number, got {value!r}") from e
  if not np.isfinite(number) or number <= 0:
    raise ValueError(f"{name} must be finite and > 0, got {value!r}")
  if integer and number != int(number):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  return number


def check_options(*, epsilon, cost: str, threshold, max_iterations) -> dict:
  """The solver options, validated (ValueError otherwise) and as Python numbers."""
  if cost not in COSTS:
    raise ValueError(f"unknown Sinkhorn cost {cost!r}; expected one of {COSTS}")
  return dict(epsilon=_check_number("epsilon", epsilon), cost=cost,
              threshold=_check_number("threshold", threshold),
              max_iterations=int(_check_number("max_iterations", max_iterations, integer=True)))


def options_from_config(loss_config, feature_normalization: str) -> dict:
  """sinkhorn_loss's options from a loss config (`registry.OBJECTIVE_TABLE` reads them through this).

  No kernel or bandwidths: `loss.sinkhorn_epsilon` is relative to the same distance
  scale as the kernels' widths (batch mean, or the trainer's top-k EMA).
  """
  if loss_config.normalize_gradients:
    raise ValueError("loss.normalize_gradients (per-bandwidth RMS) does not apply to objective=sinkhorn")
  options = check_options(epsilon=loss_config.sinkhorn_epsilon, cost=loss_config.sinkhorn_cost,
                          threshold=loss_config.sinkhorn_threshold,
                          max_iterations=loss_config.sinkhorn_max_iterations)
  return {"normalize_distances": feature_normalization == "batch_mean", **options}


def _distance(sq: Array) -> Array:
  """sqrt(sq) in value, with the library's floored gradient 1 / (2 sqrt(max(sq, floor))).

  `pairwise_distances` floors the value too, which would leave S_eps ~ 1e-4 (raw
  units) on identical clouds; the floor is only needed to keep the gradient finite.
  """
  floored = jnp.sqrt(jnp.maximum(sq, _common.SQUARED_DISTANCE_EPS))
  return floored + jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(sq, 0.0)) - floored)


def _cost_matrices(mix: Array, pos: Array, cost: str):
  """Costs [G, M, M], [G, M, Cp], [G, Cp, Cp] and the distances [G, M, M], [G, M, Cp] of the scale."""
  def squared(x, y):
    return (jnp.sum(jnp.square(x), -1)[..., :, None] + jnp.sum(jnp.square(y), -1)[..., None, :]
            - 2.0 * jnp.einsum("gnd,gmd->gnm", x, y))

  sq_mm, sq_mp, sq_pp = squared(mix, mix), squared(mix, pos), squared(pos, pos)
  eye_m = jnp.eye(mix.shape[1], dtype=bool)
  eye_p = jnp.eye(pos.shape[1], dtype=bool)
  if cost == "euclidean":
    c_mm, c_mp, c_pp = _distance(sq_mm), _distance(sq_mp), _distance(sq_pp)
  else:
    c_mm, c_mp, c_pp = (jnp.maximum(sq, 0.0) for sq in (sq_mm, sq_mp, sq_pp))
  # A point's cost to itself is exactly 0 (|x|^2 + |x|^2 - 2 x.x leaves rounding noise).
  c_mm, c_pp = jnp.where(eye_m, 0.0, c_mm), jnp.where(eye_p, 0.0, c_pp)
  # The scale statistic uses the library's distances: floored, sqrt(floor) to itself.
  floor = _common.SQUARED_DISTANCE_EPS
  dist_mm = jnp.where(eye_m, math.sqrt(floor), jnp.sqrt(jnp.maximum(sq_mm, floor)))
  dist_mp = jnp.sqrt(jnp.maximum(sq_mp, floor))
  return c_mm, c_mp, c_pp, dist_mm, dist_mp


def _solve_group(c_mp, c_mm, c_pp, a, b, *, epsilon: float, solve_kwargs: dict):
  """One group's divergence and the plans of its two gen-dependent problems (constants)."""
  # Imported here: ott-jax takes about a second to import, which only users of this
  # objective should pay.
  from ott.geometry import geometry as ott_geometry
  from ott.tools import sinkhorn_divergence as ott_divergence

  divergence, out = ott_divergence.sinkhorn_divergence(
      ott_geometry.Geometry, c_mp, c_mm, c_pp, a=a, b=b, epsilon=epsilon, solve_kwargs=solve_kwargs)
  (f_mp, g_mp), (f_mm, g_mm), _ = out.potentials
  geom_mp, geom_mm, _ = out.geoms
  plan_mp = geom_mp.transport_from_potentials(f_mp, g_mp)
  plan_mm = geom_mm.transport_from_potentials(f_mm, g_mm)
  iterations = jnp.max(jnp.stack([jnp.asarray(n) for n in out.n_iters]))
  converged = jnp.mean(jnp.stack([jnp.asarray(c) for c in out.converged]).astype(jnp.float32))
  return divergence, plan_mp, plan_mm, iterations, converged


@per_feature_group
def sinkhorn_loss(
    gen: Array,
    fixed_pos: Array,
    fixed_neg: Array | None = None,
    weight_gen: Array | None = None,
    weight_pos: Array | None = None,
    weight_neg: Array | None = None,
    *,
    epsilon: float = 0.1,
    cost: str = "euclidean",
    normalize_distances: bool = True,
    distance_scale: Array | float | None = None,
    threshold: float = 1e-3,
    max_iterations: int = 1000,
    statistics: statistics_lib.BatchStatistics | None = None,
    return_batch_sums: bool = False,
) -> tuple[Array, Info]:
  """Debiased Sinkhorn divergence S_eps(q, p) per group (see the module docstring).

  loss[b] = S_eps(q_b, p_b) with q_b = sum_i w_i d_{x_i} / W (the generated samples)
  and p_b = sum_j w+_j d_{y_j} / W+ (the positives). With fixed_neg, q_b is the
  mixture with the weighted negatives and the loss is divided by the generated share
  of its mass (CFG; see the module docstring). Gradients reach `gen` only.

  Args:
    epsilon: entropic regularization, in units of the cost of the scaled
      coordinates x / scale: for cost "euclidean" (C = |x - y|) eps * scale is the
      blur length; for "sqeuclidean" (C = |x - y|^2) eps * scale^2 is the
      regularization in squared units, a blur length of sqrt(eps) * scale.
    cost: "euclidean" (|x - y|, the Wasserstein-1 geometry; the eps -> inf limit is
      half the energy distance) or "sqeuclidean" (|x - y|^2, Wasserstein-2).
    normalize_distances: divide coordinates by the batch-mean weighted distance of
      the generated samples to all references (the release's scale, stop-gradient,
      as the other objectives), so eps is relative.
    distance_scale: an explicit scale (scalar or [B], e.g. the top-k EMA scale);
      overrides `normalize_distances`. Neither: raw coordinates, eps absolute.
    threshold: Sinkhorn stops once the L1 marginal error is below it (the measures
      have unit mass).
    max_iterations: Sinkhorn iteration cap; groups that hit it are counted in
      info["sinkhorn_converged"] (their gradient is that of the unconverged dual).
    statistics: the whole batch's distance scale where these groups are a chunk of
      it (`losses.statistics`); None: their own.
    return_batch_sums: also return this call's `BatchSums` (one feature group only).

  Returns:
    loss [B] and info {"scale", "divergence" (mean S_eps of the groups, before the
    division by the generated share), "sinkhorn_iterations" (largest count over
    the groups and the three problems), "sinkhorn_converged" (fraction converged)}.
  """
  options = check_options(epsilon=epsilon, cost=cost, threshold=threshold, max_iterations=max_iterations)
  groups = _prepare(gen, fixed_pos, fixed_neg, weight_gen, weight_pos, weight_neg)
  statistics = statistics_lib.check_statistics(statistics, 1)
  if distance_scale is not None:  # a scalar as [B]: one compiled variant for both
    distance_scale = jnp.asarray(distance_scale)
    if distance_scale.ndim == 0:
      distance_scale = jnp.broadcast_to(distance_scale, (groups.rows,))
  # One jitted function per shape and options: eager calls would otherwise re-trace
  # and re-compile the solver's loops every time.
  loss, info, sums = _sinkhorn_groups(groups.gen, groups.pos, groups.neg, groups.w_gen, groups.w_pos, groups.w_neg,
                                      distance_scale, statistics.distance_scale, rows=groups.rows,
                                      tokens=groups.tokens, normalize_distances=bool(normalize_distances), **options)
  return (loss, info, sums) if return_batch_sums else (loss, info)


@functools.partial(jax.jit, static_argnames=("rows", "tokens", "normalize_distances", "epsilon", "cost",
                                             "threshold", "max_iterations"))
def _sinkhorn_groups(gen, pos, neg, w_gen, w_pos, w_neg, distance_scale, batch_scale, *, rows, tokens,
                     normalize_distances, epsilon, cost, threshold, max_iterations):
  # Where the data are compile-time constants (closed over by a caller's jit), XLA
  # would constant-fold the positives' own cost matrix, which takes minutes at
  # Cp = 4096 on CPU; the barrier keeps them runtime values.
  pos, neg, w_gen, w_pos, w_neg = jax.lax.optimization_barrier((pos, neg, w_gen, w_pos, w_neg))
  groups = _Groups(gen, pos, neg, w_gen, w_pos, w_neg, rows, tokens)
  cg = groups.gen.shape[1]
  sg = jax.lax.stop_gradient
  # The measure compared with p: generated samples (differentiable) and negatives.
  mix = jnp.concatenate([groups.gen, sg(groups.neg)], axis=1)
  pos = sg(groups.pos)
  w_mix = sg(jnp.concatenate([groups.w_gen, groups.w_neg], axis=1))
  w_pos = sg(groups.w_pos)
  c_mm, c_mp, c_pp, dist_mm, dist_mp = _cost_matrices(mix, pos, cost)
  blocks = [(sg(dist_mm[:, :cg]), w_mix), (sg(dist_mp[:, :cg]), w_pos)]
  scale = _distance_scale(groups, None, normalize_distances, distance_scale, distances=blocks,
                          batch_scale=batch_scale)
  unit = scale if cost == "euclidean" else jnp.square(scale)
  c_mm, c_mp, c_pp = (c / unit[:, None, None] for c in (c_mm, c_mp, c_pp))

  total_mix = jnp.sum(w_mix, axis=-1, keepdims=True)
  a = w_mix / total_mix
  b = w_pos / jnp.sum(w_pos, axis=-1, keepdims=True)
  gen_share = jnp.sum(groups.w_gen, axis=-1) / total_mix[:, 0]

  solve_kwargs = dict(lse_mode=True, threshold=threshold, max_iterations=max_iterations)
  solve = jax.vmap(lambda *args: _solve_group(*args, epsilon=epsilon, solve_kwargs=solve_kwargs))
  divergence, plan_mp, plan_mm, iterations, converged = solve(sg(c_mp), sg(c_mm), c_pp, a, b)
  plan_mp, plan_mm, divergence = sg(plan_mp), sg(plan_mm), sg(divergence)
  # Envelope theorem: d S = <P_qp, dC_qp> - <P_qq, dC_qq> / 2 at the optimal potentials.
  # The terms are zero in value and carry that gradient; C_qq is differentiated in
  # both of its arguments.
  danskin = (jnp.sum(plan_mp * (c_mp - sg(c_mp)), axis=(1, 2))
             - 0.5 * jnp.sum(plan_mm * (c_mm - sg(c_mm)), axis=(1, 2)))
  loss = (divergence + danskin) / sg(gen_share)
  info = {"scale": jnp.mean(scale), "divergence": jnp.mean(divergence),
          "sinkhorn_iterations": jnp.max(iterations).astype(jnp.float32),
          "sinkhorn_converged": jnp.mean(converged)}
  # No field normalization here: the sums carry the distances only (one unused field slot).
  return _per_row(groups, _nan_if_invalid(groups, loss)), info, statistics_lib.batch_sums(blocks, None, 1)
