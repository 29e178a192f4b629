"""Point-wise drifting fields, the log-KDE potential and the curl, for one group.

Inputs are generated points x [N, D], data ("positive") samples y_pos [M, D] with
weights weight_pos [M], and samples of the current model ("negatives") y_neg [K, D]
with weights weight_neg [K]. Weights default to 1 and are normalized to a
probability per side. With k a radial kernel and k# its sharp (see `kernels`):

* "none"   V(x)  = E_p[k(x,y)(y - x)] - E_q[k(x,y)(y - x)]            (MMD field)
* "naive"  V(x)  = E_p[k(x,y)(y - x)] / Z_p - E_q[k(x,y)(y - x)] / Z_q,
           Z_p = E_p k(x, .), Z_q = E_q k(x, .)                        (FHM Eq. 3)
* "sharp"  V#(x) = E_p[k(x,y)(y - x)] / E_p k#(x, .) - (same for q)     (FHM Eq. 18)
           = grad log p#(x) - grad log q#(x)
* "joint"  Deng et al.'s Algorithm 2 as printed (FHM Appendix D): one softmax over
           the concatenated [positives, negatives] logits log k, geometric mean with
           the softmax over the generated points, positive weights scaled by the
           negative row mass and vice versa.

FHM results these functions make checkable: "none" is the gradient of the MMD
witness with kernel k# (Prop. 7); "naive" = s^2 "sharp" for the Gaussian (Prop. 8);
"sharp" is -grad of `log_kde_potential` (Eq. 5, 18) and therefore curl-free, while
"naive" with the Laplace or rational-quadratic kernel has a non-zero curl (Fig. 1).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from drifting_jax.losses import _common
from drifting_jax.losses.kernels import Kernel, get_kernel

Array = jax.Array
NORMALIZATIONS = ("none", "naive", "sharp", "joint")


def _check_point_inputs(x, y_pos, y_neg, weight_pos, weight_neg):
  _common.check_rank("x", x, 2, "[N, D]")
  _common.check_rank("y_pos", y_pos, 2, "[M, D]")
  _common.check_rank("y_neg", y_neg, 2, "[K, D]")
  d = x.shape[-1]
  for name, y in (("y_pos", y_pos), ("y_neg", y_neg)):
    if y.shape[-1] != d:
      raise ValueError(f"{name} has feature dimension {y.shape[-1]}, but x has {d}")
  _common.check_weights("weight_pos", weight_pos, (y_pos.shape[0],), require_positive_total=True)
  _common.check_weights("weight_neg", weight_neg, (y_neg.shape[0],), require_positive_total=True)
  if y_pos.shape[0] == 0 or y_neg.shape[0] == 0:
    raise ValueError("y_pos and y_neg must each hold at least one sample")


def _log_probabilities(weight, n: int, dtype) -> Array:
  """log of the weights normalized to sum 1 (uniform when None)."""
  if weight is None:
    return jnp.full((n,), -jnp.log(float(n)), dtype)
  w = jnp.asarray(weight, dtype)
  return _common.safe_log(w) - jnp.log(jnp.sum(w))


def _log_probabilities_excluding_self(weight, n: int, k: int, exclude_self: bool, dtype) -> Array:
  """[N, K] (or [K]) log reference probabilities; with exclude_self, row i renormalizes
  over the references other than point i itself (which then has probability 0)."""
  if not exclude_self:
    return _log_probabilities(weight, k, dtype)
  w = jnp.ones((k,), dtype) if weight is None else jnp.asarray(weight, dtype)
  own = w[:n]
  total = jnp.sum(w) - own  # [N]
  return _common.safe_log(w)[None, :] - jnp.log(total)[:, None] + _self_mask(n, k, True)


def _self_mask(n: int, k: int, exclude_self: bool) -> Array:
  """-inf at [i, i] for i < n: y_neg starts with the n query points themselves."""
  if not exclude_self:
    return jnp.zeros((n, k))
  if k < n:
    raise ValueError(f"exclude_self needs y_neg to start with x itself (K >= N), got N={n}, K={k}")
  return jnp.where(jnp.eye(n, k, dtype=bool), -jnp.inf, 0.0)


def drift_field(
    x: Array,
    y_pos: Array,
    y_neg: Array,
    weight_pos: Array | None = None,
    weight_neg: Array | None = None,
    *,
    kernel: str | Kernel,
    bandwidth: float | None = None,
    normalization: str = "sharp",
    exclude_self: bool = False,
) -> Array:
  """The drifting field V(x) [N, D] with the given normalization (see module doc).

  Args:
    exclude_self: y_neg starts with x itself (then, optionally, further negatives);
      drop each point's own term, as training does.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
  _check_point_inputs(x, y_pos, y_neg, weight_pos, weight_neg)
  kern = get_kernel(kernel, bandwidth)
  dtype = _common.compute_dtype(x, y_pos, y_neg)
  x, y_pos, y_neg = (jnp.asarray(a, dtype) for a in (x, y_pos, y_neg))
  r_pos = _common.pairwise_distances(x, y_pos)
  r_neg = _common.pairwise_distances(x, y_neg)
  if normalization == "joint":
    log_k_neg = kern.log_k(r_neg) + _self_mask(x.shape[0], y_neg.shape[0], exclude_self)
    coef_pos, coef_neg = _joint_coefficients(kern.log_k(r_pos), log_k_neg, weight_pos, weight_neg)
  else:
    log_pp = _log_probabilities(weight_pos, y_pos.shape[0], dtype)
    log_pq = _log_probabilities_excluding_self(weight_neg, x.shape[0], y_neg.shape[0], exclude_self, dtype)
    log_a_pos = log_pp + kern.log_k(r_pos)
    log_a_neg = log_pq + kern.log_k(r_neg)
    if normalization == "naive":  # Z_p, Z_q: kernel mass of each side.
      log_a_pos = log_a_pos - jax.nn.logsumexp(log_a_pos, axis=-1, keepdims=True)
      log_a_neg = log_a_neg - jax.nn.logsumexp(log_a_neg, axis=-1, keepdims=True)
    elif normalization == "sharp":  # p#(x), q#(x): sharp-kernel mass of each side.
      log_a_pos = log_a_pos - jax.nn.logsumexp(log_pp + kern.log_sharp(r_pos), axis=-1, keepdims=True)
      log_a_neg = log_a_neg - jax.nn.logsumexp(log_pq + kern.log_sharp(r_neg), axis=-1, keepdims=True)
    coef_pos, coef_neg = jnp.exp(log_a_pos), jnp.exp(log_a_neg)
  # sum_j a_j (y_j - x) = a @ y - (sum_j a_j) x, per side.
  return (coef_pos @ y_pos - jnp.sum(coef_pos, -1, keepdims=True) * x
          - coef_neg @ y_neg + jnp.sum(coef_neg, -1, keepdims=True) * x)


def _joint_coefficients(log_k_pos, log_k_neg, weight_pos, weight_neg):
  """Coefficients of Deng et al.'s Algorithm 2 (the joint normalization, FHM App. D).

  A = sqrt(softmax_row(logits) * softmax_col(logits)) over the concatenated
  [positives, negatives] logits, times the sample weights; the positive part is
  scaled by the row's negative mass and the negative part by its positive mass.
  """
  m = log_k_pos.shape[-1]
  logits = jnp.concatenate([log_k_pos, log_k_neg], axis=-1)
  log_affinity = 0.5 * (jax.nn.log_softmax(logits, axis=-1) + jax.nn.log_softmax(logits, axis=-2))
  affinity = jnp.exp(log_affinity)
  a_pos, a_neg = affinity[:, :m], affinity[:, m:]
  if weight_pos is not None:
    a_pos = a_pos * jnp.asarray(weight_pos, a_pos.dtype)
  if weight_neg is not None:
    a_neg = a_neg * jnp.asarray(weight_neg, a_neg.dtype)
  return (a_pos * jnp.sum(a_neg, -1, keepdims=True), a_neg * jnp.sum(a_pos, -1, keepdims=True))


def log_kde_potential(
    x: Array,
    y_pos: Array,
    y_neg: Array,
    weight_pos: Array | None = None,
    weight_neg: Array | None = None,
    *,
    kernel: str | Kernel,
    bandwidth: float | None = None,
    exclude_self: bool = False,
) -> Array:
  """log q#(x) - log p#(x) [N], with p#, q# the sharp-kernel KDEs (FHM Eq. 19 integrand).

  Its gradient is -V#(x), the sharp-normalized drifting field (Eq. 18). The kernel's
  normalizing constant cancels in the difference and is left out.
  """
  _check_point_inputs(x, y_pos, y_neg, weight_pos, weight_neg)
  kern = get_kernel(kernel, bandwidth)
  dtype = _common.compute_dtype(x, y_pos, y_neg)
  x, y_pos, y_neg = (jnp.asarray(a, dtype) for a in (x, y_pos, y_neg))
  log_p = jax.nn.logsumexp(
      _log_probabilities(weight_pos, y_pos.shape[0], dtype) + kern.log_sharp(_common.pairwise_distances(x, y_pos)),
      axis=-1)
  log_q = jax.nn.logsumexp(
      _log_probabilities_excluding_self(weight_neg, x.shape[0], y_neg.shape[0], exclude_self, dtype)
      + kern.log_sharp(_common.pairwise_distances(x, y_neg)), axis=-1)
  return log_q - log_p


def curl(field_fn: Callable[[Array], Array], x: Array) -> Array:
  """The curl J - J^T of a field R^n -> R^n at each point (FHM Def. 5).

  Args:
    field_fn: maps one point [n] to a vector [n].
    x: points [..., n].

  Returns:
    [..., n, n] antisymmetric matrices; all zero exactly when the field is locally a
    gradient (conservative).
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError("curl needs points of shape [..., n]")
  jac = jax.jacfwd(field_fn)
  flat = x.reshape(-1, x.shape[-1])
  j = jax.vmap(jac)(flat)
  if j.shape[-2:] != (x.shape[-1], x.shape[-1]):
    raise ValueError(f"field_fn must map R^{x.shape[-1]} to R^{x.shape[-1]}, got Jacobian {j.shape[-2:]}")
  return (j - jnp.swapaxes(j, -1, -2)).reshape(*x.shape, x.shape[-1])
