r"""The theory of FHM (2026), measured with drifting_jax.losses: `make figures`.

    python -m scripts.theory_figures [--out docs/figures] [--grid 101] [--no-plots] [--markdown]

FHM = Franz, Hoffmann & Martius (2026), "Drifting Fields are not Conservative".
Writes to `--out`

  fig1_curl.png             FHM Fig. 1: curl J_12 - J_21 of the drift field (normalization
                            "naive", Deng et al.'s field) and of the sharp-normalized field
                            for the Gaussian, Laplace and rational-quadratic kernels on a 2-D
                            Gaussian mixture (positives) against other samples (negatives).
  fig3_field_magnitude.png  FHM Fig. 3: |V(x)| along a line in 1-D for the normalizations
                            none (MMD), naive, sharp and joint, per kernel.
  appendix_d_fields.png     FHM App. D: the release's field, the corrected field (Eq. 3)
                            and Algorithm 2 as printed (joint) on a 2-D toy, and the angles
                            between them on release-shaped groups.
  theory.json               every number below,

and prints a summary. The numbers: the curl maps' maxima; Table 1 (closed-form
sharp and flat kernels against the numerical ones of `radial_kernel`, and the
defining identity grad_x k#(x, y) = k(x, y)(y - x) by autodiff); the gradient
identity grad log_kde_loss = -V# / N (Eq. 5/18) in float64; the angles and
magnitude ratios between the three drift fields of Appendix D.

The numeric parts (`curl_maps`, `field_profiles`, `table1_check`,
`gradient_identity`, `appendix_d`) are separate from the plots so tests can run
them on small inputs; `--markdown` prints the tables of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from drifting_jax import losses

KERNELS = losses.KERNEL_NAMES
KERNEL_LABELS = {"gaussian": "Gaussian", "laplace": "Laplace", "rational_quadratic": "rational quadratic"}
# Closed forms of FHM Table 1 (k#, k_flat), for the table in the docs.
TABLE1 = {
    "gaussian": ("exp(-r^2/(2s^2))", "s^2 k", "k / s^2"),
    "laplace": ("exp(-r/s)", "s (r + s) k", "k / (s r)"),
    "rational_quadratic": ("(1 + r^2/s^2)^-2", "s^2/2 k^(1/2)", "4/s^2 k^(3/2)"),
}
# Bandwidth of Figure 1: about the spread of a mixture component. The arrows still
# resolve the three components, and the Laplace and RQ drift fields' curl is
# 0.4-0.6 of their largest Jacobian entry (similar at s = 0.3 and s = 1).
CURL_BANDWIDTH = 0.5
CURL_EXTENT = 3.0
# Colour limit of a kernel's curl maps: the larger |curl| of its two fields, but at
# least this fraction of the drift field's largest Jacobian entry, so that a
# curl-free pair (the Gaussian's) shows its float64 round-off as white instead of
# stretching 1e-14 over the whole colour scale.
CURL_COLOUR_FLOOR = 0.25


def _stats(values) -> dict:
  v = np.asarray(values, np.float64).ravel()
  return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "median": float(np.median(v))}


# ---------------------------------------------------------------------------------
# Figure 1: curl maps.
# ---------------------------------------------------------------------------------


def mixture_2d(seed: int = 0, per_component: int = 30, num_negative: int = 60):
  """Positives: a 3-component 2-D Gaussian mixture; negatives: one broad Gaussian."""
  rng = np.random.default_rng(seed)
  centers = np.array([[-1.5, 1.0], [1.5, 1.0], [0.0, -1.5]])
  y_pos = np.concatenate([c + 0.35 * rng.normal(size=(per_component, 2)) for c in centers])
  y_neg = rng.normal(size=(num_negative, 2)) + [0.3, 0.2]
  return y_pos, y_neg


def curl_maps(grid_size: int = 101, bandwidth: float = CURL_BANDWIDTH, extent: float = CURL_EXTENT) -> dict:
  """Curl J_12 - J_21 of the naive (drift) and sharp fields on a grid, in float64.

  Returns {"axis": [G], "y_pos", "y_neg", "maps": {kernel: {normalization: [G, G]}},
  "fields": same layout, [G, G, 2], "numbers": {kernel: {normalization: {...}}}} where
  the numbers are max |curl|, max |J| and their ratio (0 for a conservative field
  up to round-off), and for the Gaussian max |V_naive - s^2 V_sharp| / max |V_naive|
  (FHM Prop. 8).
  """
  y_pos, y_neg = mixture_2d()
  axis = np.linspace(-extent, extent, grid_size)
  grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
  variants = [(name, normalization) for name in KERNELS for normalization in ("naive", "sharp")]

  # One jit for all six fields (compilation dominates at small grids); the data are
  # arguments, not closed-over constants, so XLA does not constant-fold them.
  @jax.jit
  def evaluate(grid, y_pos, y_neg):
    out = {}
    for name, normalization in variants:
      field_fn = lambda x, n=normalization, k=name: losses.drift_field(
          x[None], y_pos, y_neg, kernel=k, bandwidth=bandwidth, normalization=n)[0]
      out[name, normalization] = (losses.curl(field_fn, grid), jax.vmap(jax.jacfwd(field_fn))(grid),
                                  jax.vmap(field_fn)(grid))
    return out

  maps, fields_out, numbers = ({name: {} for name in KERNELS} for _ in range(3))
  with jax.enable_x64(True):
    evaluated = jax.tree.map(np.asarray, evaluate(*(jnp.asarray(a, jnp.float64) for a in (grid, y_pos, y_neg))))
  for name, normalization in variants:
    curl, jac, field = evaluated[name, normalization]
    scalar = curl[:, 0, 1]  # dV_1/dx_2 - dV_2/dx_1
    maps[name][normalization] = scalar.reshape(grid_size, grid_size)
    fields_out[name][normalization] = field.reshape(grid_size, grid_size, 2)
    max_curl, max_jac = float(np.abs(scalar).max()), float(np.abs(jac).max())
    numbers[name][normalization] = {
        "max_abs_curl": max_curl, "max_abs_jacobian": max_jac, "curl_over_jacobian": max_curl / max_jac,
        "mean_abs_curl": float(np.abs(scalar).mean()),
        # losses.curl is J - J^T: check it against the Jacobian computed here.
        "curl_vs_jacobian_antisymmetric_part": float(np.abs(curl - (jac - np.swapaxes(jac, -1, -2))).max()),
    }
  naive = fields_out["gaussian"]["naive"]
  sharp = fields_out["gaussian"]["sharp"]
  numbers["gaussian"]["naive_minus_s2_sharp_rel"] = float(
      np.abs(naive - bandwidth**2 * sharp).max() / np.abs(naive).max())
  return {"axis": axis, "y_pos": y_pos, "y_neg": y_neg, "bandwidth": bandwidth, "maps": maps,
          "fields": fields_out, "numbers": numbers}


# ---------------------------------------------------------------------------------
# Figure 3: field magnitude in 1-D.
# ---------------------------------------------------------------------------------


def field_profiles(num_points: int = 401, bandwidth: float = 1.0, extent: float = 12.0) -> dict:
  """|V(x)| along x in 1-D for p = N(+1.5, 0.5^2), q = N(-1.5, 0.5^2) (64 quantiles each).

  "joint" is Algorithm 2 with the query point as the only generated sample: its
  column softmax over generated samples is then trivial and the field is a function
  of x alone (with a batch of queries it would depend on the other queries).
  """
  from scipy import stats  # Only here: quantiles make p and q deterministic.
  probs = (np.arange(64) + 0.5) / 64
  y_pos = stats.norm.ppf(probs, loc=1.5, scale=0.5)[:, None]
  y_neg = stats.norm.ppf(probs, loc=-1.5, scale=0.5)[:, None]
  x = np.linspace(-extent, extent, num_points)[:, None]
  far_x = np.array([[50.0], [100.0]])

  @jax.jit
  def evaluate(points, y_pos, y_neg):
    out = {}
    for name in KERNELS:
      for normalization in losses.NORMALIZATIONS:
        one = lambda xi, n=normalization, k=name: losses.drift_field(
            xi[None], y_pos, y_neg, kernel=k, bandwidth=bandwidth, normalization=n)[0]
        out[name, normalization] = jax.vmap(one)(points)[:, 0]
    return out

  with jax.enable_x64(True):
    evaluated = evaluate(*(jnp.asarray(a, jnp.float64) for a in (np.concatenate([x, far_x]), y_pos, y_neg)))
  profiles, numbers = {name: {} for name in KERNELS}, {name: {} for name in KERNELS}
  for name, normalization in ((k, n) for k in KERNELS for n in losses.NORMALIZATIONS):
    values = np.asarray(evaluated[name, normalization])
    v, far = values[:num_points], values[num_points:]
    profiles[name][normalization] = v
    # Decay exponent of |V| far away: d log|V| / d log x between x = 50 and 100 (0:
    # constant, -1: 1/x, very negative or None (underflow): exponential decay).
    with np.errstate(divide="ignore", invalid="ignore"):
      slope = (np.log(abs(far[1])) - np.log(abs(far[0]))) / math.log(2.0)
    at = lambda value: float(abs(v[np.argmin(np.abs(x[:, 0] - value))]))
    numbers[name][normalization] = {
        "max_abs": float(np.abs(v).max()), "abs_at_0": at(0.0), "abs_at_3": at(3.0), "abs_at_6": at(6.0),
        f"abs_at_{extent:g}": at(extent), "abs_at_50": float(abs(far[0])), "abs_at_100": float(abs(far[1])),
        "log_log_slope_50_to_100": float(slope) if np.isfinite(slope) else None,
        # +1: pointing away from q. Beyond p the fields ascend the density ratio p/q, which
        # keeps growing there, so they point outwards, not back towards p.
        "sign_at_6": float(np.sign(v[np.argmin(np.abs(x[:, 0] - 6.0))])),
    }
  return {"x": x[:, 0], "y_pos": y_pos[:, 0], "y_neg": y_neg[:, 0], "bandwidth": bandwidth,
          "profiles": profiles, "numbers": numbers}


# ---------------------------------------------------------------------------------
# Table 1.
# ---------------------------------------------------------------------------------


def table1_check(bandwidths=(0.3, 1.0, 2.5), num_pairs: int = 64, seed: int = 0) -> dict:
  """Closed-form k#, k_flat vs `radial_kernel`'s numerical ones, and the defining identities.

  Relative errors are of the kernel values (|exp(log a - log b) - 1|), on distances
  r / s in [1e-3, 20] (k# also at r = 0). The identities grad_x k#(x, y) = k(x, y)(y - x)
  and grad_x k(x, y) = k_flat(x, y)(y - x) are checked by autodiff at random pairs in
  R^3: the closed forms in float64, the numerical sharp (a float32 quadrature) in float32.
  Error = max over pairs of |grad - rhs| / |rhs|.
  """
  rng = np.random.default_rng(seed)
  rel = np.concatenate([[0.0], np.logspace(-3, math.log10(20.0), 60)])
  pairs = rng.normal(size=(num_pairs, 2, 3))

  def identity_errors(kern, x, y):
    dist = lambda a, b: jnp.sqrt(jnp.sum(jnp.square(a - b)))
    grad_sharp = jax.vmap(jax.grad(lambda a, b: jnp.exp(kern.log_sharp(dist(a, b)))))(x, y)
    grad_k = jax.vmap(jax.grad(lambda a, b: jnp.exp(kern.log_k(dist(a, b)))))(x, y)
    r = jax.vmap(dist)(x, y)
    rhs_sharp = jnp.exp(kern.log_k(r))[:, None] * (y - x)
    rhs_k = jnp.exp(kern.log_flat(r))[:, None] * (y - x)
    err = lambda g, h: jnp.max(jnp.linalg.norm(g - h, axis=-1) / jnp.linalg.norm(h, axis=-1))
    return err(grad_sharp, rhs_sharp), err(grad_k, rhs_k)

  closed = {(name, s): losses.get_kernel(name, s) for name in KERNELS for s in bandwidths}
  numeric = {(name, s): losses.radial_kernel(losses.PROFILES[name], s, name=f"numeric {name}")
             for name in KERNELS for s in bandwidths}

  # One jit per precision: the closed forms' identities in float64, the numerical
  # kernels (a float32 quadrature) in float32.
  @jax.jit
  def closed_identities(x, y):
    return {key: identity_errors(kern, x, y) for key, kern in closed.items()}

  @jax.jit
  def numeric_checks(x, y, rel):
    out = {}
    for (name, s), kern in numeric.items():
      r = rel * s
      # |k_numeric / k_closed - 1| for k# (r >= 0) and k_flat (r > 0).
      sharp_err = jnp.max(jnp.abs(jnp.expm1(kern.log_sharp(r) - closed[name, s].log_sharp(r))))
      flat_err = jnp.max(jnp.abs(jnp.expm1(kern.log_flat(r[1:]) - closed[name, s].log_flat(r[1:]))))
      out[name, s] = (sharp_err, flat_err, *identity_errors(kern, x, y))
    return out

  with jax.enable_x64(True):
    closed_errors = closed_identities(jnp.asarray(pairs[:, 0], jnp.float64), jnp.asarray(pairs[:, 1], jnp.float64))
  numeric_errors = numeric_checks(*(jnp.asarray(a, jnp.float32) for a in (pairs[:, 0], pairs[:, 1], rel)))
  out = {}
  for name in KERNELS:
    row = dict.fromkeys(("sharp_rel_err", "flat_rel_err", "identity_sharp_closed_f64", "identity_flat_closed_f64",
                         "identity_sharp_numeric_f32", "identity_flat_numeric_f32"), 0.0)
    for s in bandwidths:
      values = (*numeric_errors[name, s][:2], *closed_errors[name, s], *numeric_errors[name, s][2:])
      for key, value in zip(("sharp_rel_err", "flat_rel_err", "identity_sharp_closed_f64",
                             "identity_flat_closed_f64", "identity_sharp_numeric_f32",
                             "identity_flat_numeric_f32"), values):
        row[key] = max(row[key], float(value))
    out[name] = row
  return {"bandwidths": list(bandwidths), "relative_distances": [0.0, 1e-3, 20.0], "num_pairs": num_pairs,
          "kernels": out}


# ---------------------------------------------------------------------------------
# The gradient identity (Eq. 5/18).
# ---------------------------------------------------------------------------------


def gradient_identity(b: int = 2, cg: int = 16, cp: int = 12, cn: int = 4, s: int = 8, seed: int = 0) -> dict:
  """grad of log_kde_loss vs -V#/N in float64, per kernel, in two settings.

  "raw": one bandwidth (0.8), raw distances, the negatives at weight 0: d loss[b] / d x_i
  = -V#(x_i) / Cg with q = the other generated samples (self excluded).
  "scaled_cfg": three bandwidths, the batch distance scale c (stop-gradient) and
  CFG weights on Cn unconditional negatives: d loss / d x_i = -sum_h V#_h(x_i / c) / (Cg c).
  Also the MMD identity (FHM Prop. 7): grad of mmd_loss(sharp=True) = -V_none / Cg.
  """
  rng = np.random.default_rng(seed)
  gen = rng.normal(size=(b, cg, s))
  pos = rng.normal(size=(b, cp, s)) + 0.5
  neg = rng.normal(size=(b, cn, s)) - 0.3
  w_neg = np.full((b, cn), (2.0 - 1.0) * (cg - 1) / cn)  # CFG alpha = 2
  bandwidths = (0.05, 0.2, 0.5)

  def expected(gen, pos, neg, name, bandwidths, scale, normalization, weights):
    """-sum_h V_h(x / c) / (Cg c), V from drift_field group by group."""
    v = []
    for i in range(b):
      refs_q = jnp.concatenate([gen[i], neg[i]]) / scale
      w_q = jnp.concatenate([jnp.ones(cg, gen.dtype), weights[i]])
      v.append(sum(losses.drift_field(gen[i] / scale, pos[i] / scale, refs_q, None, w_q, kernel=name, bandwidth=h,
                                      normalization=normalization, exclude_self=True) for h in bandwidths))
    return -jnp.stack(v) / (cg * scale)

  @jax.jit
  def evaluate(gen, pos, neg, w):
    zero = jnp.zeros_like(w)
    out = {}
    for name in KERNELS:
      grad = jax.grad(lambda g: losses.log_kde_loss(g, pos, neg, None, None, zero, kernel=name, bandwidths=0.8,
                                                    normalize_distances=False)[0].sum())(gen)
      out[name, "raw"] = (grad, expected(gen, pos, neg, name, (0.8,), 1.0, "sharp", zero))
      loss_fn = lambda g: losses.log_kde_loss(g, pos, neg, None, None, w, kernel=name, bandwidths=bandwidths)
      grad, info = jax.grad(lambda g: (loss_fn(g)[0].sum(), loss_fn(g)[1]), has_aux=True)(gen)
      out[name, "scaled_cfg"] = (grad, expected(gen, pos, neg, name, bandwidths, info["scale"], "sharp", w))
      grad = jax.grad(lambda g: losses.mmd_loss(g, pos, neg, None, None, w, kernel=name, bandwidths=0.8,
                                                sharp=True, normalize_distances=False)[0].sum())(gen)
      out[name, "mmd_sharp_vs_none_field"] = (grad, expected(gen, pos, neg, name, (0.8,), 1.0, "none", w))
    return out

  with jax.enable_x64(True):
    evaluated = evaluate(*(jnp.asarray(a, jnp.float64) for a in (gen, pos, neg, w_neg)))
  out = {name: {} for name in KERNELS}
  for name, setting in ((k, t) for k in KERNELS for t in ("raw", "scaled_cfg", "mmd_sharp_vs_none_field")):
    got, want = (np.asarray(a) for a in evaluated[name, setting])
    out[name][setting] = {"max_abs_err": float(np.abs(got - want).max()),
                          "max_rel_err": float(np.abs(got - want).max() / np.abs(want).max()),
                          "max_abs_grad": float(np.abs(want).max()), "dtype": str(got.dtype)}
  return {"shape": dict(B=b, Cg=cg, Cp=cp, Cn=cn, S=s), "dtype": "float64", "kernels": out}


# ---------------------------------------------------------------------------------
# Appendix D: release vs corrected vs joint.
# ---------------------------------------------------------------------------------


def _fields_from_objectives(gen, pos, neg, w_neg, bandwidths, normalized: bool) -> dict:
  """The three fields on the same inputs, recovered from the objectives' gradients.

  Each objective is a stop-gradient regression (x - sg(x + V))^2 averaged over the
  Cg samples and S coordinates of a group, in coordinates divided by a scale c, so
  d loss / d gen = -2 V / (Cg S c). Raw fields (one bandwidth, `normalized` False)
  are returned in the coordinates x / c with c the batch distance scale, the
  corrected and joint fields' own units; the release's force lives in
  x / (c / sqrt(S)) and is divided by sqrt(S) to match, after its RMS normalization
  is undone with info["loss_R"] (the force's mean square). `normalized` is the
  training setting: each bandwidth's field divided by its batch RMS in its own
  coordinates and summed (the release always does this); those sums of unit-RMS
  fields are compared as they are.
  """
  cg, s = gen.shape[1], gen.shape[2]
  out = {}
  for name, fn, kwargs in (
      ("corrected", losses.corrected_drift_loss, dict(kernel="laplace", bandwidths=bandwidths,
                                                      normalize_gradients=normalized)),
      ("joint", losses.joint_drift_loss, dict(kernel="laplace", bandwidths=bandwidths,
                                              normalize_gradients=normalized)),
      ("release", losses.release_drift_loss, dict(R_list=bandwidths))):

    def objective(g, fn=fn, kwargs=kwargs):
      loss, info = fn(g, pos, neg, None, None, w_neg, **kwargs)
      return loss.sum(), info

    grad, info = jax.grad(objective, has_aux=True)(gen)
    if name == "release":
      coordinate_scale = jnp.maximum(info["scale"] / math.sqrt(s), 1e-3)
      force = -grad * cg * s * coordinate_scale / 2
      if not normalized:  # one temperature: undo the RMS normalization, go to x / c
        force = force * jnp.sqrt(info[f"loss_{bandwidths[0]:g}"]) / math.sqrt(s)
      out[name] = force
    else:
      out[name] = -grad * cg * s * info["scale"] / 2
      out["scale"] = info["scale"]
  return out


def _compare(fields: dict) -> dict:
  """Per-point angle (degrees) and magnitude ratio for each pair of fields.

  Algorithm 2's field can vanish exactly at a point (in float32): when every
  reference is much closer to some other generated sample, the column softmax over
  generated samples underflows for the whole row. Such points have no direction;
  they are counted in "zero_field_points" and left out of the statistics.
  """
  out = {}
  for a, b in (("release", "corrected"), ("release", "joint"), ("joint", "corrected")):
    u = fields[a].reshape(-1, fields[a].shape[-1])
    v = fields[b].reshape(-1, fields[b].shape[-1])
    nu, nv = np.linalg.norm(u, axis=-1), np.linalg.norm(v, axis=-1)
    tiny = lambda n: n <= 1e-30 * max(float(n.max()), 1e-300)
    zero = tiny(nu) | tiny(nv)
    keep = ~zero
    cosine = np.clip(np.sum(u[keep] * v[keep], -1) / (nu[keep] * nv[keep]), -1.0, 1.0)
    ratio = nu[keep] / nv[keep]
    out[f"{a}_vs_{b}"] = {"angle_deg": _stats(np.degrees(np.arccos(cosine))), "cosine": _stats(cosine),
                          "magnitude_ratio": _stats(ratio),
                          "magnitude_ratio_cv": float(ratio.std() / ratio.mean()),
                          "points": int(len(nu)), "zero_field_points": int(zero.sum()),
                          f"zero_{a}_points": int(tiny(nu).sum()), f"zero_{b}_points": int(tiny(nv).sum())}
  return out


def release_shaped_groups(b: int = 8, cg: int = 64, cp: int = 64, cn: int = 16, s: int = 64, alpha: float = 2.0,
                          seed: int = 0):
  """Random groups with the release's ablation layout and CFG weights on the negatives."""
  rng = np.random.default_rng(seed)
  gen = rng.normal(size=(b, cg, s))
  shift = rng.normal(size=(b, 1, s)) * 0.3
  pos = rng.normal(size=(b, cp, s)) + shift
  neg = rng.normal(size=(b, cn, s)) * 1.2
  w_neg = np.full((b, cn), (alpha - 1.0) * (cg - 1) / cn)
  return tuple(jnp.asarray(a, jnp.float32) for a in (gen, pos, neg, w_neg))


def toy_2d(num_gen: int = 64, seed: int = 1):
  """One 2-D group: generated samples from a broad Gaussian, positives from `mixture_2d`."""
  rng = np.random.default_rng(seed)
  y_pos, _ = mixture_2d(seed=seed, per_component=22)
  gen = rng.normal(size=(num_gen, 2)) * 1.2
  neg = rng.normal(size=(8, 2)) * 2.0
  w_neg = np.full((8,), (2.0 - 1.0) * (num_gen - 1) / 8)
  return tuple(jnp.asarray(a[None], jnp.float32) for a in (gen, y_pos, neg, w_neg))


def _recovery_check(gen, pos, neg, w_neg, fields: dict, bandwidth: float) -> dict:
  """Relative error of the fields recovered from the corrected and joint objectives'
  gradients (one group, one bandwidth, raw) against `drift_field` ("naive" = Eq. 3,
  "joint") on the same points; validates the gradient-to-field conversion that the
  release's force also uses."""
  scale = fields["scale"]
  refs_q = jnp.concatenate([gen[0], neg[0]]) / scale
  w_q = jnp.concatenate([jnp.ones(gen.shape[1], gen.dtype), w_neg[0]])
  out = {}
  for name, normalization in (("corrected", "naive"), ("joint", "joint")):
    want = losses.drift_field(gen[0] / scale, pos[0] / scale, refs_q, None, w_q, kernel="laplace",
                              bandwidth=bandwidth, normalization=normalization, exclude_self=True)
    out[f"{name}_vs_drift_field_{normalization}"] = jnp.max(jnp.abs(fields[name][0] - want)) / jnp.max(
        jnp.abs(want))
  return out


def appendix_d(groups=None, toy=None, temperatures=(0.02, 0.05, 0.2)) -> dict:
  """Angles and magnitude ratios between the release, corrected and joint fields.

  Settings: each temperature alone (raw fields), and all three with per-temperature
  RMS normalization summed (as trained), on release-shaped groups and on a 2-D toy.
  The 2-D toy's fields (at the largest R, raw, and normalized) are returned for plotting.
  """
  groups = groups if groups is not None else release_shaped_groups()
  toy = toy if toy is not None else toy_2d()
  temperatures = tuple(temperatures)
  settings = {f"R={r:g}": ((r,), False) for r in temperatures}
  settings["all_R_normalized"] = (temperatures, True)

  @jax.jit  # one compilation per data set for all settings and objectives
  def evaluate(gen, pos, neg, w_neg):
    fields = {label: _fields_from_objectives(gen, pos, neg, w_neg, bandwidths, normalized)
              for label, (bandwidths, normalized) in settings.items()}
    check = _recovery_check(gen, pos, neg, w_neg, fields[f"R={max(temperatures):g}"], max(temperatures))
    return fields, check

  out = {"shapes": {"release_groups": dict(zip(("B", "Cg", "S"), map(int, groups[0].shape))) | {
      "Cp": int(groups[1].shape[1]), "Cn": int(groups[2].shape[1])},
      "toy_2d": {"Cg": int(toy[0].shape[1]), "Cp": int(toy[1].shape[1]), "Cn": int(toy[2].shape[1])}}}
  for label, inputs in (("release_groups", groups), ("toy_2d", toy)):
    fields, check = jax.tree.map(lambda a: np.asarray(a, np.float64), evaluate(*inputs))
    out[label] = {setting: _compare(fields[setting]) for setting in settings}
    if label == "toy_2d":
      out["recovery_check"] = {k: float(v) for k, v in check.items()}
      out["toy_fields"] = {"raw": fields[f"R={max(temperatures):g}"], "normalized": fields["all_R_normalized"]}
  out["toy_inputs"] = toy
  out["temperatures"] = list(temperatures)
  return out


# ---------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------


def plot_curl(curl: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  axis, maps, numbers = curl["axis"], curl["maps"], curl["numbers"]
  extent = (axis[0], axis[-1], axis[0], axis[-1])
  fig, axes = plt.subplots(2, 3, figsize=(13, 8.6), constrained_layout=True)
  titles = {"naive": "drift field (naive)", "sharp": "sharp-normalized field"}
  for col, name in enumerate(KERNELS):
    vmax = max(max(numbers[name][n]["max_abs_curl"] for n in ("naive", "sharp")),
               CURL_COLOUR_FLOOR * numbers[name]["naive"]["max_abs_jacobian"])
    for row, normalization in enumerate(("naive", "sharp")):
      ax = axes[row, col]
      image = ax.imshow(maps[name][normalization], origin="lower", extent=extent, cmap="RdBu_r",
                        vmin=-vmax, vmax=vmax, interpolation="bilinear")
      field = curl["fields"][name][normalization]
      step = max(1, len(axis) // 16)
      sub = slice(step // 2, None, step)
      ax.quiver(axis[sub], axis[sub], field[sub, sub, 0], field[sub, sub, 1], color="0.35", alpha=0.7,
                angles="xy", pivot="mid", width=0.003)
      ax.scatter(*curl["y_pos"].T, s=7, c="tab:green", edgecolors="none", label="positives (data)")
      ax.scatter(*curl["y_neg"].T, s=7, c="k", marker="x", linewidths=0.6, label="negatives")
      n = numbers[name][normalization]
      ax.set_title(f"{KERNEL_LABELS[name]}: {titles[normalization]}\n"
                   f"max|curl| = {n['max_abs_curl']:.2g}, max|curl|/max|J| = {n['curl_over_jacobian']:.1e}",
                   fontsize=9.5)
      ax.set_xlim(extent[:2])
      ax.set_ylim(extent[2:])
      ax.set_aspect("equal")
      ax.tick_params(labelsize=7)
      if row == 1:
        fig.colorbar(image, ax=axes[:, col], shrink=0.6, location="bottom",
                     label=f"curl $J_{{12}} - J_{{21}}$ ({KERNEL_LABELS[name]}, shared scale)")
  axes[0, 0].legend(loc="lower left", fontsize=7, framealpha=0.8)
  fig.suptitle(f"FHM Fig. 1: curl of drifting fields, bandwidth s = {curl['bandwidth']:g} (float64)")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_profiles(prof: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # The naive curve is drawn wide underneath: for the Gaussian at s = 1 it equals the sharp one.
  styles = {"naive": ("naive (drifting)", "tab:red", "-", 3.5, 0.5), "none": ("none (MMD)", "tab:gray", "-", 1.5, 1),
            "sharp": ("sharp (log-KDE)", "tab:blue", "-", 1.5, 1),
            "joint": ("joint (Alg. 2, one query)", "tab:orange", "--", 1.5, 1)}
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
  x = prof["x"]
  for ax, name in zip(axes, KERNELS):
    top = 0.0
    for normalization, (label, colour, ls, lw, alpha) in styles.items():
      v = np.abs(prof["profiles"][name][normalization])
      top = max(top, v.max())
      ax.semilogy(x, np.maximum(v, 1e-30), ls, color=colour, label=label, lw=lw, alpha=alpha)
    ax.set_ylim(1e-8, 5 * top)
    for y, c in ((prof["y_pos"], "tab:green"), (prof["y_neg"], "k")):
      ax.plot(y, np.full_like(y, 2e-8), "|", color=c, ms=8, alpha=0.5)
    ax.set_title(f"{KERNEL_LABELS[name]}, s = {prof['bandwidth']:g}")
    ax.set_xlabel("x")
    ax.grid(alpha=0.3, which="both", lw=0.4)
  axes[0].set_ylabel("|V(x)|")
  axes[0].legend(fontsize=8, loc="lower left")
  fig.suptitle("FHM Fig. 3: field magnitude in 1-D, p = N(1.5, 0.5²) (green ticks), q = N(-1.5, 0.5²) (black)")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_appendix_d(app: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  gen, pos, neg, _ = (np.asarray(a[0]) for a in app["toy_inputs"])
  colours = {"release": "tab:purple", "corrected": "tab:blue", "joint": "tab:orange"}
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), constrained_layout=True)
  for ax, setting, title in ((axes[0], "raw", f"R = {max(app['temperatures']):g}, raw fields (unit-RMS arrows)"),
                             (axes[1], "normalized", "all R, per-R RMS-normalized and summed")):
    ax.scatter(*pos.T, s=8, c="tab:green", label="positives")
    ax.scatter(*neg.T, s=8, c="0.6", marker="x", label="unconditional negatives")
    ax.scatter(*gen.T, s=8, c="k", label="generated")
    for name in ("corrected", "joint", "release"):
      field = app["toy_fields"][setting][name]
      f = field[0] / np.sqrt(np.mean(np.sum(np.square(field[0]), -1)))  # same visual scale for all three
      ax.quiver(gen[:, 0], gen[:, 1], f[:, 0], f[:, 1], color=colours[name], angles="xy", scale_units="xy",
                scale=2.5, width=0.004, alpha=0.8, label=name)
    ax.set_title(f"2-D toy: {title}", fontsize=10)
    ax.set_aspect("equal")
    ax.set_ylim(-4.6, 3.4)  # room for the legend below the points
    ax.legend(fontsize=7, loc="lower center", ncol=3)
  ax = axes[2]
  labels, means, lows, highs = [], [], [], []
  for setting, rows in app["release_groups"].items():
    for pair, row in rows.items():
      labels.append(f"{pair.replace('_vs_', ' vs ')}\n{setting}")
      a = row["angle_deg"]
      means.append(a["mean"])
      lows.append(a["mean"] - a["min"])
      highs.append(a["max"] - a["mean"])
  y = np.arange(len(labels))
  pair_colours = ["0.25", "0.55", "0.8"] * (len(labels) // 3)
  ax.barh(y, means, xerr=[lows, highs], color=pair_colours, ecolor="tab:red", capsize=2)
  ax.set_yticks(y, labels, fontsize=6)
  ax.invert_yaxis()
  ax.set_xlabel("angle between fields (degrees): mean, bar = min..max over points")
  shape = app["shapes"]["release_groups"]
  ax.set_title(f"release-shaped groups B={shape['B']}, Cg={shape['Cg']}, Cp={shape['Cp']}, Cn={shape['Cn']}, "
               f"S={shape['S']}", fontsize=9)
  fig.suptitle("FHM App. D: the release's field vs the corrected field (Eq. 3) vs Algorithm 2 as printed (joint)")
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------


def compute(grid_size: int = 101, profile_points: int = 401) -> dict:
  """All numeric results (arrays for the plots included) and each part's seconds."""
  timings = {}
  results = {}
  parts = {
      "curl": lambda: curl_maps(grid_size),
      "profiles": lambda: field_profiles(profile_points),
      "table1": table1_check,
      "gradient_identity": gradient_identity,
      "appendix_d": appendix_d,
  }
  for key, fn in parts.items():
    start = time.perf_counter()
    results[key] = fn()
    timings[key] = time.perf_counter() - start
  results["seconds"] = timings
  return results


def numbers_only(results: dict) -> dict:
  """The JSON-serializable numbers of `compute`'s results (no arrays)."""
  app = results["appendix_d"]
  return {
      "fig1_curl": {"bandwidth": results["curl"]["bandwidth"], "grid": len(results["curl"]["axis"]),
                    "extent": CURL_EXTENT, "kernels": results["curl"]["numbers"]},
      "fig3_profiles": {"bandwidth": results["profiles"]["bandwidth"], "kernels": results["profiles"]["numbers"]},
      "table1": results["table1"],
      "gradient_identity": results["gradient_identity"],
      "appendix_d": {k: v for k, v in app.items() if k not in ("toy_fields", "toy_inputs")},
      "seconds": results["seconds"],
  }


def summary(numbers: dict) -> str:
  lines = ["Fig. 1 (curl, max|curl| / max|J|, float64):"]
  for name, row in numbers["fig1_curl"]["kernels"].items():
    lines.append(f"  {name:19s} naive {row['naive']['curl_over_jacobian']:.2e}   "
                 f"sharp {row['sharp']['curl_over_jacobian']:.2e}")
  lines.append("Fig. 3 (d log|V| / d log x between x = 50 and 100):")
  for name, row in numbers["fig3_profiles"]["kernels"].items():
    lines.append(f"  {name:19s} " + "  ".join(
        f"{n} {'-inf' if r['log_log_slope_50_to_100'] is None else format(r['log_log_slope_50_to_100'], '.2f')}"
        for n, r in row.items()))
  lines.append("Table 1 (max relative errors):")
  for name, row in numbers["table1"]["kernels"].items():
    lines.append(f"  {name:19s} " + "  ".join(f"{k} {v:.1e}" for k, v in row.items()))
  lines.append("Gradient identity grad log_kde_loss = -V#/N (float64, max rel err):")
  for name, row in numbers["gradient_identity"]["kernels"].items():
    lines.append(f"  {name:19s} " + "  ".join(f"{k} {v['max_rel_err']:.1e}" for k, v in row.items()))
  lines.append("App. D (angle in degrees, mean [min, max]):")
  for label in ("release_groups", "toy_2d"):
    for setting, rows in numbers["appendix_d"][label].items():
      lines.append(f"  {label} {setting}: " + "; ".join(
          f"{pair} {r['angle_deg']['mean']:.1f} [{r['angle_deg']['min']:.1f}, {r['angle_deg']['max']:.1f}]"
          + (f" ({r['zero_field_points']}/{r['points']} zero)" if r["zero_field_points"] else "")
          for pair, r in rows.items()))
  return "\n".join(lines)


def markdown(numbers: dict) -> str:
  """The tables of docs/results.md ("Theory, measured"), from `numbers_only`'s output."""
  fmt = lambda v: "n/a" if v is None else f"{v:.1e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e3)) else f"{v:.3g}"
  out = []
  curl = numbers["fig1_curl"]
  out += [f"**Figure 1** (curl on a {curl['grid']}x{curl['grid']} grid over [-{curl['extent']:g}, "
          f"{curl['extent']:g}]^2, bandwidth s = {curl['bandwidth']:g}, float64):", "",
          "| kernel | drift field (naive): max abs curl | max abs curl / max abs J | sharp field: max abs curl "
          "| max abs curl / max abs J |", "|---|---|---|---|---|"]
  for name, row in curl["kernels"].items():
    n, sh = row["naive"], row["sharp"]
    out.append(f"| {KERNEL_LABELS[name]} | {fmt(n['max_abs_curl'])} | {fmt(n['curl_over_jacobian'])} | "
               f"{fmt(sh['max_abs_curl'])} | {fmt(sh['curl_over_jacobian'])} |")
  out += ["", f"Gaussian: max abs(V_naive - s^2 V_sharp) / max abs V_naive = "
          f"{fmt(curl['kernels']['gaussian']['naive_minus_s2_sharp_rel'])} (FHM Prop. 8).", ""]
  prof = numbers["fig3_profiles"]
  out += [f"**Figure 3** (1-D, s = {prof['bandwidth']:g}): |V| at x = 0, 6 and 100, and the far-field exponent "
          "d log abs V / d log x between x = 50 and 100 (0: constant; -inf: underflow, i.e. exponential decay):", "",
          "| kernel | normalization | abs V(0) | abs V(6) | abs V(100) | exponent |", "|---|---|---|---|---|---|"]
  for name, rows in prof["kernels"].items():
    for normalization, r in rows.items():
      slope = r["log_log_slope_50_to_100"]
      out.append(f"| {KERNEL_LABELS[name]} | {normalization} | {fmt(r['abs_at_0'])} | {fmt(r['abs_at_6'])} | "
                 f"{fmt(r['abs_at_100'])} | {'-inf' if slope is None else f'{slope:.2f}'} |")
  table = numbers["table1"]
  out += ["", f"**Table 1** (bandwidths {', '.join(f'{s:g}' for s in table['bandwidths'])}; kernel values at "
          f"r / s in [1e-3, 20] (k# also at 0); identities at {table['num_pairs']} random pairs in R^3; "
          "max relative errors):", "",
          "| kernel | k(r) | k# | k_flat | k# numeric vs closed | k_flat numeric vs closed | "
          "grad k# = k (y-x), closed, f64 | grad k = k_flat (y-x), closed, f64 | grad k# = k (y-x), numeric, f32 | "
          "grad k = k_flat (y-x), numeric, f32 |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in table["kernels"].items():
    k, sharp, flat = TABLE1[name]
    out.append(f"| {KERNEL_LABELS[name]} | `{k}` | `{sharp}` | `{flat}` | {fmt(r['sharp_rel_err'])} | "
               f"{fmt(r['flat_rel_err'])} | {fmt(r['identity_sharp_closed_f64'])} | "
               f"{fmt(r['identity_flat_closed_f64'])} | {fmt(r['identity_sharp_numeric_f32'])} | "
               f"{fmt(r['identity_flat_numeric_f32'])} |")
  grad = numbers["gradient_identity"]
  shape = ", ".join(f"{k}={v}" for k, v in grad["shape"].items())
  out += ["", f"**Gradient identity** (Eq. 5/18; {shape}; float64): max abs error and max abs error / max abs "
          "gradient of", "",
          "* raw: d log_kde_loss / d x_i vs -V#(x_i) / Cg (one bandwidth 0.8, raw distances);",
          "* scaled, CFG: the same with bandwidths (0.05, 0.2, 0.5), the batch distance scale c and CFG "
          "weights on the unconditional negatives, vs -sum_h V#_h(x_i / c) / (Cg c);",
          "* MMD: d mmd_loss(sharp=True) / d x_i vs -V_none(x_i) / Cg (FHM Prop. 7).", "",
          "| kernel | raw | scaled, CFG | MMD |", "|---|---|---|---|"]
  for name, rows in grad["kernels"].items():
    out.append(f"| {KERNEL_LABELS[name]} | " + " | ".join(
        f"{fmt(rows[k]['max_abs_err'])} / {fmt(rows[k]['max_rel_err'])}"
        for k in ("raw", "scaled_cfg", "mmd_sharp_vs_none_field")) + " |")
  app = numbers["appendix_d"]
  out += ["", "**Appendix D**: angle between the fields at each generated sample (degrees, mean [min, max]) and "
          "the ratio of their magnitudes (median [min, max]; CV = std / mean of the ratio, 0 when the fields "
          "are proportional). Laplace kernel; R = one temperature, raw fields; all R = the three temperatures "
          "(0.02, 0.05, 0.2), each RMS-normalized, summed (as trained). Recovery check: the fields taken from "
          "the corrected and joint objectives' gradients match `drift_field` to "
          + ", ".join(f"{fmt(v)}" for v in app["recovery_check"].values()) + " (relative).", ""]
  for label, title in (("release_groups", "release-shaped groups ({B} x Cg={Cg}, Cp={Cp}, Cn={Cn}, S={S}, "
                                          "CFG weight (alpha-1)(Cg-1)/Cn at alpha = 2)"),
                       ("toy_2d", "2-D toy (Cg={Cg}, Cp={Cp}, Cn={Cn})")):
    out += [f"*{title.format(**app['shapes'][label])}*", "",
            "| setting | pair | angle mean [min, max] | magnitude ratio median [min, max] | CV | zero-field points |",
            "|---|---|---|---|---|---|"]
    for setting, rows in app[label].items():
      for pair, r in rows.items():
        a, m = r["angle_deg"], r["magnitude_ratio"]
        out.append(f"| {setting} | {pair.replace('_vs_', ' vs ')} | {a['mean']:.1f} [{a['min']:.1f}, "
                   f"{a['max']:.1f}] | {fmt(m['median'])} [{fmt(m['min'])}, {fmt(m['max'])}] | "
                   f"{r['magnitude_ratio_cv']:.2f} | {r['zero_field_points']}/{r['points']} |")
    out.append("")
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/figures")
  parser.add_argument("--grid", type=int, default=101, help="curl grid points per axis")
  parser.add_argument("--no-plots", action="store_true")
  parser.add_argument("--markdown", action="store_true", help="also print the tables of docs/results.md")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  results = compute(grid_size=args.grid)
  numbers = numbers_only(results)
  if not args.no_plots:
    plot_curl(results["curl"], out / "fig1_curl.png")
    plot_profiles(results["profiles"], out / "fig3_field_magnitude.png")
    plot_appendix_d(results["appendix_d"], out / "appendix_d_fields.png")
  numbers["seconds"]["total"] = time.perf_counter() - start
  (out / "theory.json").write_text(json.dumps(numbers, indent=1))
  print(summary(numbers))
  if args.markdown:
    print(markdown(numbers))
  print(f"wrote {out}/theory.json" + ("" if args.no_plots else " and 3 figures") +
        f" in {numbers['seconds']['total']:.0f} s")


if __name__ == "__main__":
  main()
