"""Radial kernels and their sharp and flat companions, evaluated in log space.

Notation follows Franz, Hoffmann & Martius (2026), "Drifting Fields are not
Conservative" (FHM below). A radial kernel is k(x, y) = phi(|x - y|^2 / s^2) with
bandwidth s. Its *sharp* kernel k# is the radial function whose gradient is the
kernel-weighted displacement that drifting fields are built from:

    grad_x k#(x, y) = k(x, y) (y - x)            (FHM Def. of k#, Table 1)

which for a radial profile integrates to

    k#(r) = 1/2 * integral_{r^2}^{inf} phi(t / s^2) dt
          = s^2 / 2 * integral_{r^2/s^2}^{inf} phi(u) du.

The *flat* kernel k_flat goes the other way: it is the kernel whose sharp is k, so
grad_x k(x, y) = k_flat(x, y) (y - x), i.e. k_flat(r) = -(1/r) dk/dr.

Closed forms (FHM Table 1), r = |x - y|:

    name                k(r)                      k#(r)                 k_flat(r)
    gaussian            exp(-r^2 / (2 s^2))       s^2 k                 k / s^2
    laplace             exp(-r / s)               s (r + s) k           k / (s r)
    rational_quadratic  (1 + r^2 / s^2)^-2        s^2 / 2 k^(1/2)       4 / s^2 k^(3/2)

Everything is returned as a logarithm so that kernel values of exp(-1e7) (distance
1e4 at bandwidth 1e-3) stay finite inside a logsumexp.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LogProfile = Callable[[Array], Array]

KERNEL_NAMES = ("gaussian", "laplace", "rational_quadratic")
_ALIASES = {"gauss": "gaussian", "rq": "rational_quadratic", "rational-quadratic": "rational_quadratic"}


@dataclasses.dataclass(frozen=True)
class Kernel:
  """A radial kernel of bandwidth `bandwidth`, with its sharp and flat companions.

  All three methods take Euclidean distances r >= 0 (any shape) and return the
  natural logarithm of the kernel value elementwise.

  The closed-form kernels also give the ratios of neighbouring kernels, k#/k and
  k/k_flat, as plain (not log) functions of r, or None where unknown. With them an
  objective evaluates a kernel and its neighbour from one exp (of log_k) and a
  multiplication, instead of two logs and a derivative.
  """

  name: str
  bandwidth: float
  log_k: Callable[[Array], Array]
  log_sharp: Callable[[Array], Array]
  log_flat: Callable[[Array], Array]
  sharp_over_k: Callable[[Array], Array] | None = None
  k_over_flat: Callable[[Array], Array] | None = None

  def __repr__(self) -> str:
    return f"Kernel({self.name!r}, bandwidth={self.bandwidth:g})"


def _check_bandwidth(bandwidth) -> float:
  try:
    s = float(bandwidth)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(
        f"kernel bandwidth must be a concrete Python/NumPy number (it fixes the kernel's "
        f"shape at trace time), got {bandwidth!r}") from e
  if not math.isfinite(s) or s <= 0:
    raise ValueError(f"kernel bandwidth must be a finite number > 0, got {bandwidth!r}")
  return s


def gaussian(bandwidth: float) -> Kernel:
  """k(r) = exp(-r^2 / (2 s^2)); k# = s^2 k; k_flat = k / s^2."""
  s = _check_bandwidth(bandwidth)
  log_s2 = 2.0 * math.log(s)

  def log_k(r):
    return -0.5 * jnp.square(r / s)

  s2 = s * s
  return Kernel("gaussian", s, log_k, lambda r: log_k(r) + log_s2, lambda r: log_k(r) - log_s2,
                sharp_over_k=lambda r: jnp.full_like(r, s2), k_over_flat=lambda r: jnp.full_like(r, s2))


def laplace(bandwidth: float) -> Kernel:
  """k(r) = exp(-r / s); k# = s (r + s) k; k_flat = k / (s r) (infinite at r = 0)."""
  s = _check_bandwidth(bandwidth)
  log_s = math.log(s)

  def log_k(r):
    return -r / s

  def log_sharp(r):
    return log_s + jnp.log(r + s) - r / s

  def log_flat(r):
    return -r / s - log_s - jnp.log(r)

  return Kernel("laplace", s, log_k, log_sharp, log_flat, sharp_over_k=lambda r: s * (r + s),
                k_over_flat=lambda r: s * r)


def rational_quadratic(bandwidth: float) -> Kernel:
  """k(r) = (1 + r^2/s^2)^-2; k# = s^2/2 k^(1/2); k_flat = 4/s^2 k^(3/2).

  The exponent 2 is the one for which the sharp kernel is again a power of k
  (FHM Table 1); `radial_kernel` builds any other rational-quadratic exponent
  alpha > 1 numerically.
  """
  s = _check_bandwidth(bandwidth)
  log_half_s2 = 2.0 * math.log(s) - math.log(2.0)
  log_four_over_s2 = math.log(4.0) - 2.0 * math.log(s)

  def log_k(r):
    return -2.0 * jnp.log1p(jnp.square(r / s))

  s2 = s * s
  return Kernel(
      "rational_quadratic", s, log_k,
      lambda r: log_half_s2 + 0.5 * log_k(r),
      lambda r: log_four_over_s2 + 1.5 * log_k(r),
      sharp_over_k=lambda r: 0.5 * (s2 + jnp.square(r)),  # s^2/2 k^(-1/2)
      k_over_flat=lambda r: 0.25 * (s2 + jnp.square(r)),  # s^2/4 k^(-1/2)
  )


_CLOSED_FORM = {"gaussian": gaussian, "laplace": laplace, "rational_quadratic": rational_quadratic}


def get_kernel(name: str | Kernel, bandwidth: float | None = None) -> Kernel:
  """Returns the closed-form kernel `name` ("gaussian", "laplace", "rational_quadratic").

  A `Kernel` instance passes through unchanged (and must then not be given a bandwidth).
  """
  if isinstance(name, Kernel):
    if bandwidth is not None and float(bandwidth) != name.bandwidth:
      raise ValueError(f"{name!r} already has a bandwidth; got another one: {bandwidth}")
    return name
  if not isinstance(name, str):
    raise TypeError(f"kernel must be a name or a Kernel, got {type(name).__name__}")
  key = _ALIASES.get(name.lower(), name.lower())
  if key not in _CLOSED_FORM:
    raise ValueError(f"unknown kernel {name!r}; known kernels: {', '.join(KERNEL_NAMES)} "
                     f"(or build one with radial_kernel)")
  if bandwidth is None:
    raise ValueError(f"kernel {name!r} needs a bandwidth")
  return _CLOSED_FORM[key](bandwidth)


# ---------------------------------------------------------------------------------
# Generic radial kernels with a numerically computed sharp.
# ---------------------------------------------------------------------------------

# Gauss-Legendre nodes on [0, 1) for the tail integral; 96 nodes integrate the
# smooth integrands produced by the substitution below to ~1e-7 relative error.
_QUAD_NODES, _QUAD_WEIGHTS = np.polynomial.legendre.leggauss(96)
_QUAD_NODES = 0.5 * (_QUAD_NODES + 1.0)
_QUAD_WEIGHTS = 0.5 * _QUAD_WEIGHTS


def _log_tail_integral(log_profile: LogProfile, a: Array) -> Array:
  """log of Phi(a) = integral_a^inf phi(u) du, elementwise in a >= 0.

  Substituting u = a + c v / (1 - v), v in [0, 1), with c the local e-folding
  length of phi just past a (c = -1 / (d log phi / du)(a + 1); the +1 keeps c finite
  for profiles like exp(-sqrt(u)) whose slope is infinite at 0) makes the integrand smooth and
  O(1)-scaled for exponential, stretched-exponential and power-law profiles alike,
  so a fixed Gauss-Legendre rule suffices. Computed as a logsumexp for range.
  """
  a = jnp.asarray(a, jnp.float32)
  slope = jax.vmap(jax.grad(lambda t: log_profile(t)))((a + 1.0).reshape(-1)).reshape(a.shape)
  # Guard against flat or increasing profiles locally (slope >= 0): fall back to c = 1 + a.
  c = jnp.where(slope < 0, -1.0 / jnp.minimum(slope, -1e-30), 1.0 + a)
  c = jnp.clip(c, 1e-12, 1e30)
  v = jnp.asarray(_QUAD_NODES, jnp.float32)
  log_w = jnp.log(jnp.asarray(_QUAD_WEIGHTS, jnp.float32))
  u = a[..., None] + c[..., None] * (v / (1.0 - v))
  log_integrand = log_profile(u) + jnp.log(c)[..., None] - 2.0 * jnp.log1p(-v)
  return jax.nn.logsumexp(log_integrand + log_w, axis=-1)


def _decay_exponent_at_infinity(log_profile: LogProfile) -> float:
  """Estimates p in phi(t) ~ t^-p over the last decades of t in [1e2, 1e14].

  Exponential decay shows up as a large, growing p. The tail integral of phi
  converges iff p > 1 (for power-law-like tails), which is how the existence of
  the sharp kernel is decided.
  """
  t = np.logspace(2, 14, 13)
  with jax.ensure_compile_time_eval():
    log_phi = np.asarray(log_profile(jnp.asarray(t, jnp.float32)), np.float64)
  if not np.all(np.isfinite(log_phi) | (log_phi == -np.inf)):
    raise ValueError("radial kernel profile returned NaN or +inf at large arguments")
  if np.all(log_phi[-3:] == -np.inf):
    return np.inf  # Compact support or underflow: the tail integral trivially exists.
  exponents = -np.diff(log_phi) / np.diff(np.log(t))
  return float(np.min(exponents[-3:]))


def radial_kernel(log_profile: LogProfile, bandwidth: float, name: str = "radial") -> Kernel:
  """A radial kernel k(r) = phi(r^2 / s^2) given log phi, with k# computed numerically.

  k#(r) = s^2/2 * integral_{r^2/s^2}^inf phi(u) du (the radial form of FHM's sharp
  kernel definition) and k_flat(r) = -(1/r) dk/dr = (2 / s^2) (-phi'(r^2/s^2)).

  Args:
    log_profile: t -> log phi(t), written with jax.numpy, for t >= 0, with phi
      non-increasing (a positive-definite radial profile).
    bandwidth: s > 0.
    name: a label for reprs and error messages.

  Raises:
    ValueError: where the sharp kernel does not exist, i.e. the tail integral of phi
      diverges (phi decays like t^-p with p <= 1, e.g. the inverse multiquadric
      (1 + t)^-1/2).
  """
  s = _check_bandwidth(bandwidth)
  exponent = _decay_exponent_at_infinity(log_profile)
  if not exponent > 1.0 + 1e-3:
    raise ValueError(
        f"the sharp of kernel {name!r} does not exist: its profile phi(t) decays like "
        f"t^-{exponent:.3g} at infinity, so integral_r^2^inf phi diverges (needs decay faster "
        f"than t^-1)")
  log_half_s2 = 2.0 * math.log(s) - math.log(2.0)
  log_two_over_s2 = math.log(2.0) - 2.0 * math.log(s)
  d_log_profile = jax.grad(lambda t: log_profile(t))

  def log_k(r):
    return log_profile(jnp.square(r / s))

  def log_sharp(r):
    return log_half_s2 + _log_tail_integral(log_profile, jnp.square(r / s))

  def log_flat(r):
    t = jnp.square(jnp.asarray(r, jnp.float32) / s)
    slope = jnp.vectorize(d_log_profile)(t)  # d log phi / dt, negative
    return log_two_over_s2 + log_profile(t) + jnp.log(-slope)

  return Kernel(name, s, log_k, log_sharp, log_flat)


# Profiles of the closed-form kernels, in the form radial_kernel expects; used to
# validate the numerical sharp against Table 1.
PROFILES: dict[str, LogProfile] = {
    "gaussian": lambda t: -0.5 * t,
    "laplace": lambda t: -jnp.sqrt(t),
    "rational_quadratic": lambda t: -2.0 * jnp.log1p(t),
}
