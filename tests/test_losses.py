"""Tests of drifting_jax.losses against closed forms, autodiff identities, finite
differences, float64 NumPy loops and the official release's vectors."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from drifting_jax import losses
from drifting_jax.losses import fields, kernels

KERNELS = ("gaussian", "laplace", "rational_quadratic")


def rng(seed=0):
  return np.random.default_rng(seed)


def group(seed=0, b=2, cg=6, cp=5, cn=3, s=4, spread=1.0):
  r = rng(seed)
  gen = r.normal(size=(b, cg, s)).astype(np.float32) * spread
  pos = (r.normal(size=(b, cp, s)) + 0.7).astype(np.float32) * spread
  neg = (r.normal(size=(b, cn, s)) - 0.5).astype(np.float32) * spread
  return gen, pos, neg


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("bandwidth", [0.3, 1.0, 2.5])
def test_numerical_sharp_matches_table1(name, bandwidth):
  r = jnp.array([0.0, 1e-3, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0])
  closed = kernels.get_kernel(name, bandwidth)
  numeric = kernels.radial_kernel(kernels.PROFILES[name], bandwidth)
  np.testing.assert_allclose(numeric.log_sharp(r), closed.log_sharp(r), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(numeric.log_flat(r[1:]), closed.log_flat(r[1:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", KERNELS)
def test_sharp_gradient_is_kernel_weighted_displacement(name):
  """grad_x k#(x, y) = k(x, y) (y - x) and grad_x k(x, y) = k_flat(x, y) (y - x)."""
  kern = kernels.get_kernel(name, 0.7)
  x, y = jnp.array([0.3, -0.2, 0.5]), jnp.array([-0.4, 0.6, 0.1])
  r = jnp.linalg.norm(x - y)
  grad_sharp = jax.grad(lambda x: jnp.exp(kern.log_sharp(jnp.linalg.norm(x - y))))(x)
  np.testing.assert_allclose(grad_sharp, jnp.exp(kern.log_k(r)) * (y - x), rtol=1e-5)
  grad_k = jax.grad(lambda x: jnp.exp(kern.log_k(jnp.linalg.norm(x - y))))(x)
  np.testing.assert_allclose(grad_k, jnp.exp(kern.log_flat(r)) * (y - x), rtol=1e-5)


def test_numerical_sharp_of_other_rational_quadratic():
  """alpha = 3: k# = s^2/2 * integral (1+u)^-3 = s^2/4 (1 + r^2/s^2)^-2."""
  s = 0.8
  kern = kernels.radial_kernel(lambda t: -3.0 * jnp.log1p(t), s)
  r = jnp.linspace(0, 6, 13)
  expected = np.log(s**2 / 4) - 2 * np.log1p((np.asarray(r) / s) ** 2)
  np.testing.assert_allclose(kern.log_sharp(r), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("log_profile", [lambda t: -0.5 * jnp.log1p(t), lambda t: -jnp.log1p(t)])
def test_sharp_does_not_exist_for_slow_tails(log_profile):
  with pytest.raises(ValueError, match="does not exist"):
    kernels.radial_kernel(log_profile, 1.0)


def test_kernel_errors():
  with pytest.raises(ValueError, match="unknown kernel"):
    losses.get_kernel("cauchy", 1.0)
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="bandwidth"):
      losses.get_kernel("laplace", bad)
  with pytest.raises(ValueError, match="unknown kernel"):
    losses.log_kde_loss(*group(), kernel="epanechnikov", bandwidths=1.0)
  with pytest.raises(ValueError, match="bandwidths"):
    losses.log_kde_loss(*group(), bandwidths=(0.1, -0.2))


# ------------------------------------------------------------------------ point-wise fields


def point_cloud(seed=0, n=5, m=7, k=6, d=3):
  r = rng(seed)
  return (r.normal(size=(n, d)).astype(np.float32), (r.normal(size=(m, d)) + 1).astype(np.float32),
          r.normal(size=(k, d)).astype(np.float32))


def numpy_field(x, y_pos, y_neg, w_pos, w_neg, kernel_fn, sharp_fn, normalization):
  """Float64 loop over points and references: FHM Eq. 3 / Eq. 18 / MMD field."""
  out = np.zeros_like(x, dtype=np.float64)
  for i, xi in enumerate(x.astype(np.float64)):
    sides = []
    for ys, ws in ((y_pos, w_pos), (y_neg, w_neg)):
      ws = ws / ws.sum()
      num = np.zeros_like(xi)
      norm_k = norm_sharp = 0.0
      for yj, wj in zip(ys.astype(np.float64), ws):
        rij = np.linalg.norm(xi - yj)
        num += wj * kernel_fn(rij) * (yj - xi)
        norm_k += wj * kernel_fn(rij)
        norm_sharp += wj * sharp_fn(rij)
      sides.append({"none": num, "naive": num / norm_k, "sharp": num / norm_sharp}[normalization])
    out[i] = sides[0] - sides[1]
  return out


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("normalization", ["none", "naive", "sharp"])
def test_drift_field_against_float64_loop(name, normalization):
  x, y_pos, y_neg = point_cloud(1)
  w_pos, w_neg = rng(2).uniform(0.2, 2, size=7), rng(3).uniform(0.2, 2, size=6)
  s = 1.3
  kern = losses.get_kernel(name, s)
  k_fn = lambda r: float(np.exp(kern.log_k(jnp.float32(r))))
  sharp_fn = lambda r: float(np.exp(kern.log_sharp(jnp.float32(r))))
  expected = numpy_field(x, y_pos, y_neg, w_pos, w_neg, k_fn, sharp_fn, normalization)
  got = losses.drift_field(x, y_pos, y_neg, w_pos, w_neg, kernel=name, bandwidth=s, normalization=normalization)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("name", KERNELS)
def test_sharp_field_is_minus_gradient_of_log_kde_potential(name):
  """Eq. 5/18: V# = grad log p# - grad log q#, checked by autodiff and finite differences."""
  x, y_pos, y_neg = point_cloud(4)
  with jax.enable_x64(True):
    x64, p64, n64 = (jnp.asarray(a, jnp.float64) for a in (x, y_pos, y_neg))
    field = losses.drift_field(x64, p64, n64, kernel=name, bandwidth=0.9, normalization="sharp")
    potential = lambda x: losses.log_kde_potential(x, p64, n64, kernel=name, bandwidth=0.9)
    grad = jax.grad(lambda x: potential(x).sum())(x64)
    np.testing.assert_allclose(-grad, field, rtol=1e-4, atol=1e-6)
    eps = 1e-4
    for i, j in [(0, 0), (2, 1), (4, 2)]:
      dx = jnp.zeros_like(x64).at[i, j].set(eps)
      fd = (potential(x64 + dx)[i] - potential(x64 - dx)[i]) / (2 * eps)
      np.testing.assert_allclose(-fd, field[i, j], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_gaussian_naive_field_is_s2_times_sharp_field(s):
  """FHM Prop. 8."""
  x, y_pos, y_neg = point_cloud(5)
  naive = losses.drift_field(x, y_pos, y_neg, kernel="gaussian", bandwidth=s, normalization="naive")
  sharp = losses.drift_field(x, y_pos, y_neg, kernel="gaussian", bandwidth=s, normalization="sharp")
  np.testing.assert_allclose(naive, s**2 * sharp, rtol=1e-4, atol=1e-6)


def test_laplace_naive_field_is_not_proportional_to_sharp():
  x, y_pos, y_neg = point_cloud(5)
  naive = losses.drift_field(x, y_pos, y_neg, kernel="laplace", bandwidth=1.0, normalization="naive")
  sharp = losses.drift_field(x, y_pos, y_neg, kernel="laplace", bandwidth=1.0, normalization="sharp")
  ratios = np.linalg.norm(naive, axis=1) / np.linalg.norm(sharp, axis=1)
  assert np.std(ratios) / np.mean(ratios) > 0.02


def mixture_2d():
  r = rng(7)
  y_pos = np.concatenate([r.normal(size=(12, 2)) * 0.5 + [1.5, 0], r.normal(size=(12, 2)) * 0.4 - [1, 1]])
  y_neg = r.normal(size=(20, 2)) * 1.2
  grid = np.stack(np.meshgrid(np.linspace(-2, 2, 7), np.linspace(-2, 2, 7)), -1).reshape(-1, 2)
  return grid.astype(np.float32), y_pos.astype(np.float32), y_neg.astype(np.float32)


def max_curl(name, normalization, bandwidth=0.8):
  grid, y_pos, y_neg = mixture_2d()
  field = lambda x: losses.drift_field(x[None], y_pos, y_neg, kernel=name, bandwidth=bandwidth,
                                       normalization=normalization)[0]
  c = losses.curl(field, grid)
  assert c.shape == (grid.shape[0], 2, 2)
  np.testing.assert_allclose(c, -np.swapaxes(c, -1, -2), atol=1e-6)
  scale = np.abs(np.asarray(jax.vmap(jax.jacfwd(field))(grid))).max()
  return float(np.abs(c).max() / scale)


@pytest.mark.parametrize("name,normalization", [("gaussian", "naive"), ("gaussian", "sharp"),
                                                ("laplace", "sharp"), ("rational_quadratic", "sharp"),
                                                ("laplace", "none")])
def test_conservative_fields_have_zero_curl(name, normalization):
  assert max_curl(name, normalization) < 1e-4


@pytest.mark.parametrize("name", ["laplace", "rational_quadratic"])
def test_non_gaussian_drift_fields_have_curl(name):
  """FHM Fig. 1: the naive (drifting) field of non-Gaussian kernels is not a gradient."""
  assert max_curl(name, "naive") > 1e-2


def test_curl_of_a_rotation_field():
  c = losses.curl(lambda x: jnp.array([-x[1], x[0]]), jnp.zeros((3, 2)))
  np.testing.assert_allclose(c[0], [[0, -2], [2, 0]])


@pytest.mark.parametrize("normalization", fields.NORMALIZATIONS)
def test_field_antisymmetry_and_equilibrium(normalization):
  x, y_pos, y_neg = point_cloud(8)
  kw = dict(kernel="laplace", bandwidth=0.7, normalization=normalization)
  v_pq = losses.drift_field(x, y_pos, y_neg, **kw)
  v_qp = losses.drift_field(x, y_neg, y_pos, **kw)
  np.testing.assert_allclose(v_pq, -v_qp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.drift_field(x, y_pos, y_pos, **kw), 0.0, atol=1e-6)
  assert np.abs(v_pq).max() > 1e-3


def test_joint_field_is_algorithm2():
  """Deng et al.'s Algorithm 2 written out literally with a [N, Npos, Nneg] tensor."""
  x, y_pos, y_neg = point_cloud(9, n=5, m=4, k=6)
  t = 0.6
  d_pos = np.linalg.norm(x[:, None] - y_pos[None], axis=-1)
  d_neg = np.linalg.norm(x[:, None] - y_neg[None], axis=-1)
  logit = -np.concatenate([d_pos, d_neg], 1) / t
  a_row = np.exp(logit) / np.exp(logit).sum(1, keepdims=True)
  a_col = np.exp(logit) / np.exp(logit).sum(0, keepdims=True)
  a = np.sqrt(a_row * a_col)
  a_pos, a_neg = a[:, :4], a[:, 4:]
  pairwise = (a_pos[:, :, None] * a_neg[:, None, :])[..., None] * (y_pos[None, :, None, :] - y_neg[None, None, :, :])
  expected = pairwise.sum(axis=(1, 2))
  got = losses.drift_field(x, y_pos, y_neg, kernel="laplace", bandwidth=t, normalization="joint")
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ grouped objectives


@pytest.mark.parametrize("name", KERNELS)
def test_log_kde_loss_equals_mean_potential(name):
  """One bandwidth, raw distances: loss[b] = mean_i log q#(x_i) - log p#(x_i)."""
  gen, pos, neg = group(10)
  loss, _ = losses.log_kde_loss(gen, pos, neg, kernel=name, bandwidths=0.8, normalize_distances=False)
  for b in range(gen.shape[0]):
    refs_q = np.concatenate([gen[b], neg[b]])
    pot = losses.log_kde_potential(gen[b], pos[b], refs_q, kernel=name, bandwidth=0.8, exclude_self=True)
    np.testing.assert_allclose(loss[b], np.mean(pot), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", KERNELS)
def test_log_kde_gradient_is_minus_sharp_field_over_n(name):
  """FHM Eq. 5/18: d loss[b] / d x_i = -V#(x_i) / Cg (q's references stop-gradient)."""
  gen, pos, neg = group(11)
  grad = jax.grad(lambda g: losses.log_kde_loss(g, pos, neg, kernel=name, bandwidths=0.8,
                                                normalize_distances=False)[0].sum())(gen)
  cg = gen.shape[1]
  for b in range(gen.shape[0]):
    v = losses.drift_field(gen[b], pos[b], np.concatenate([gen[b], neg[b]]), kernel=name, bandwidth=0.8,
                           normalization="sharp", exclude_self=True)
    np.testing.assert_allclose(grad[b], -v / cg, rtol=1e-4, atol=1e-6)


def test_gradient_identity_with_frozen_references_by_explicit_potential():
  """Finite differences of log_kde_potential with references held fixed (float64)."""
  gen, pos, neg = group(13, b=1, cg=4, cp=3, cn=2, s=3)
  with jax.enable_x64(True):
    gen64, pos64, neg64 = (jnp.asarray(a[0], jnp.float64) for a in (gen, pos, neg))
    refs_q = jnp.concatenate([gen64, neg64])
    grad = jax.grad(lambda g: losses.log_kde_loss(g[None], pos64[None], neg64[None], kernel="laplace",
                                                  bandwidths=0.7, normalize_distances=False)[0][0])(gen64)
    eps = 1e-6
    for i, j in [(0, 0), (1, 2), (3, 1)]:
      d = jnp.zeros_like(gen64).at[i, j].set(eps)
      pot = lambda x: losses.log_kde_potential(x, pos64, refs_q, kernel="laplace", bandwidth=0.7,
                                               exclude_self=True)
      fd = (pot(gen64 + d)[i] - pot(gen64 - d)[i]) / (2 * eps) / gen64.shape[0]
      np.testing.assert_allclose(grad[i, j], fd, rtol=1e-6, atol=1e-10)


def numpy_corrected_field(x, refs_q, w_q, refs_p, w_p, s):
  """Eq. 3 with a Laplace kernel, float64 loops; refs_q's first len(x) rows are x (self excluded)."""
  out = np.zeros(x.shape, np.float64)
  for i in range(len(x)):
    sides = []
    for refs, w, skip_self in ((refs_p, w_p, False), (refs_q, w_q, True)):
      num, den = np.zeros(x.shape[1]), 0.0
      for j in range(len(refs)):
        if skip_self and j == i:
          continue
        k = w[j] * np.exp(-np.linalg.norm(x[i] - refs[j]) / s)
        num += k * (refs[j] - x[i])
        den += k
      sides.append(num / den)
    out[i] = sides[0] - sides[1]
  return out


def test_corrected_field_against_float64_loop():
  gen, pos, neg = group(14, b=2, cg=5, cp=4, cn=3, s=3)
  w_neg = rng(15).uniform(0.1, 2.0, size=(2, 3)).astype(np.float32)
  w_pos = rng(16).uniform(0.1, 2.0, size=(2, 4)).astype(np.float32)
  s = 0.9
  grad = jax.grad(lambda g: losses.corrected_drift_loss(g, pos, neg, None, w_pos, w_neg, kernel="laplace",
                                                        bandwidths=s, normalize_distances=False)[0].sum())(gen)
  cg, dim = gen.shape[1], gen.shape[2]
  for b in range(2):
    v = numpy_corrected_field(gen[b].astype(np.float64), np.concatenate([gen[b], neg[b]]).astype(np.float64),
                              np.concatenate([np.ones(cg), w_neg[b]]), pos[b].astype(np.float64), w_pos[b], s)
    # loss = mean_i mean_s (x - sg(x + V))^2  =>  grad = -2 V / (Cg S)
    np.testing.assert_allclose(grad[b], -2 * v / (cg * dim), rtol=1e-4, atol=1e-6)


def test_objectives_coincide_only_for_gaussian():
  """FHM Prop. 10: the stop-gradient (corrected) and log-KDE gradients are parallel
  for the Gaussian (ratio 2 s^2 / S) and not for other kernels."""
  gen, pos, neg = group(17, b=1, cg=8, cp=6, cn=0, s=3)
  neg = neg[:, :0]
  s = 1.1

  def grads(name):
    g_kde = jax.grad(lambda g: losses.log_kde_loss(g, pos, neg, kernel=name, bandwidths=s,
                                                   normalize_distances=False)[0].sum())(gen)
    g_cor = jax.grad(lambda g: losses.corrected_drift_loss(g, pos, neg, kernel=name, bandwidths=s,
                                                           normalize_distances=False)[0].sum())(gen)
    return np.asarray(g_kde), np.asarray(g_cor)

  g_kde, g_cor = grads("gaussian")
  np.testing.assert_allclose(g_cor, 2 * s**2 / gen.shape[-1] * g_kde, rtol=1e-4, atol=1e-7)
  for name in ("laplace", "rational_quadratic"):
    g_kde, g_cor = grads(name)
    ratio = np.linalg.norm(g_cor[0], axis=-1) / np.linalg.norm(g_kde[0], axis=-1)
    assert np.std(ratio) / np.mean(ratio) > 0.01, name


@pytest.mark.parametrize("case", [0, 1, 2])
def test_release_drift_loss_reproduces_official_vectors(fixtures_dir, case):
  data = np.load(fixtures_dir / "official_drift_loss_vectors.npz")
  p = f"case{case}_"
  r_list = tuple(float(r) for r in data[p + "R_list"])
  fn = lambda g: losses.release_drift_loss(g, data[p + "pos"], data[p + "neg"], None, None,
                                           data[p + "weight_neg"], R_list=r_list)
  loss, info = jax.jit(fn)(data[p + "gen"])
  grad = jax.grad(lambda g: fn(g)[0].sum())(jnp.asarray(data[p + "gen"]))
  np.testing.assert_allclose(loss, data[p + "loss"], rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(grad, data[p + "grad_gen_of_sum_loss"], rtol=2e-4,
                             atol=2e-5 * np.abs(data[p + "grad_gen_of_sum_loss"]).max())
  np.testing.assert_allclose(info["scale"], data[p + "scale"], rtol=1e-5)


@pytest.mark.parametrize("objective", ["log_kde", "corrected", "mmd"])
def test_cfg_weights_reduce_to_unweighted_at_cfg_one(objective):
  fn = losses.get_objective(objective)
  gen, pos, neg = group(18)
  cg, cn = gen.shape[1], neg.shape[1]
  w_uncond = np.full((gen.shape[0], cn), (1.0 - 1) * (cg - 1) / cn, np.float32)
  kw = dict(kernel="laplace", bandwidths=(0.3, 1.0))
  with_neg, _ = fn(gen, pos, neg, None, None, w_uncond, **kw)
  without, _ = fn(gen, pos, None, **kw)
  np.testing.assert_allclose(with_neg, without, rtol=1e-5, atol=1e-6)
  g1 = jax.grad(lambda g: fn(g, pos, neg, None, None, w_uncond, **kw)[0].sum())(gen)
  g2 = jax.grad(lambda g: fn(g, pos, None, **kw)[0].sum())(gen)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-8)


def test_joint_field_feels_zero_weight_negatives():
  """The joint (Algorithm 2 / release) field multiplies weights in *after* the softmax,
  so unconditional samples of weight zero (cfg = 1) still change it, unlike Eq. 3."""
  gen, pos, neg = group(18)
  zero = np.zeros(neg.shape[:2], np.float32)
  with_neg = losses.joint_drift_loss(gen, pos, neg, None, None, zero)[0]
  without = losses.joint_drift_loss(gen, pos, None)[0]
  assert np.max(np.abs(with_neg - without) / without) > 1e-3


def test_cfg_weights_give_the_guidance_mixture():
  """Weight (alpha-1)(Cg-1)/Cn on unconditional data: q# = q_gen#/alpha + (1-1/alpha) p_uncond#."""
  gen, pos, neg = group(19, b=1, cg=6, cp=5, cn=4)
  alpha, s = 2.5, 0.9
  w_uncond = np.full((1, 4), (alpha - 1) * 5 / 4, np.float32)
  loss, _ = losses.log_kde_loss(gen, pos, neg, None, None, w_uncond, kernel="laplace", bandwidths=s,
                                normalize_distances=False)
  sharp = lambda a, b: np.exp(np.asarray(losses.laplace(s).log_sharp(np.linalg.norm(a - b, axis=-1))))
  x = gen[0].astype(np.float64)
  total = 0.0
  for i in range(6):
    others = np.delete(x, i, axis=0)
    q_gen = sharp(x[i], others).mean()
    p_uncond = sharp(x[i], neg[0]).mean()
    q_mix = q_gen / alpha + (1 - 1 / alpha) * p_uncond
    p = sharp(x[i], pos[0]).mean()
    total += np.log(q_mix) - np.log(p)
  np.testing.assert_allclose(loss[0], total / 6, rtol=1e-5)


def test_distance_normalization_makes_losses_scale_invariant():
  gen, pos, neg = group(20)
  for name in ("log_kde", "corrected", "joint", "release"):
    fn = losses.get_objective(name)
    a = fn(gen, pos, neg)[0]
    b = fn(gen * 37.0, pos * 37.0, neg * 37.0)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_mmd_with_sharp_kernel_has_unnormalized_field_as_gradient():
  """FHM Prop. 7: grad of the MMD witness with k# is -V_none / Cg."""
  gen, pos, neg = group(21, b=1)
  grad = jax.grad(lambda g: losses.mmd_loss(g, pos, neg, kernel="laplace", bandwidths=0.9, sharp=True,
                                            normalize_distances=False)[0].sum())(gen)
  refs_q = np.concatenate([gen[0], neg[0]])
  k = refs_q.shape[0]
  pos_term = np.zeros_like(gen[0], dtype=np.float64)
  neg_term = np.zeros_like(gen[0], dtype=np.float64)
  kern = losses.laplace(0.9)
  for i in range(gen.shape[1]):
    for y in pos[0]:
      pos_term[i] += np.exp(float(kern.log_k(np.linalg.norm(gen[0, i] - y)))) * (y - gen[0, i]) / pos.shape[1]
    for j, y in enumerate(refs_q):
      if j != i:
        neg_term[i] += np.exp(float(kern.log_k(np.linalg.norm(gen[0, i] - y)))) * (y - gen[0, i]) / (k - 1)
  np.testing.assert_allclose(grad[0], -(pos_term - neg_term) / gen.shape[1], rtol=1e-4, atol=1e-7)


def test_gradient_normalization_gives_unit_rms_per_bandwidth():
  gen, pos, neg = group(22)
  kw = dict(kernel="laplace", normalize_distances=True)
  plain = jax.grad(lambda g: losses.log_kde_loss(g, pos, neg, bandwidths=0.5, **kw)[0].sum())(gen)
  unit = jax.grad(lambda g: losses.log_kde_loss(g, pos, neg, bandwidths=0.5, normalize_gradients=True,
                                                **kw)[0].sum())(gen)
  cg, s = gen.shape[1:]
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(unit))), 1.0 / (cg * s), rtol=1e-5)
  cosine = np.vdot(plain, unit) / np.linalg.norm(plain) / np.linalg.norm(unit)
  np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)
  # Linear in the cotangent, and the loss value is unchanged.
  weighted = jax.grad(lambda g: (jnp.array([2.0, -1.0]) * losses.log_kde_loss(
      g, pos, neg, bandwidths=0.5, normalize_gradients=True, **kw)[0]).sum())(gen)
  np.testing.assert_allclose(weighted, unit * np.array([2.0, -1.0])[:, None, None], rtol=1e-5)
  v1 = losses.log_kde_loss(gen, pos, neg, bandwidths=(0.5, 2.0), **kw)[0]
  v2 = losses.log_kde_loss(gen, pos, neg, bandwidths=(0.5, 2.0), normalize_gradients=True, **kw)[0]
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  # Two bandwidths: the sum of the two unit-RMS gradients.
  g_a = jax.grad(lambda g: losses.log_kde_loss(g, pos, neg, bandwidths=0.5, normalize_gradients=True,
                                               **kw)[0].sum())(gen)
  g_b = jax.grad(lambda g: losses.log_kde_loss(g, pos, neg, bandwidths=2.0, normalize_gradients=True,
                                               **kw)[0].sum())(gen)
  g_ab = jax.grad(lambda g: losses.log_kde_loss(g, pos, neg, bandwidths=(0.5, 2.0), normalize_gradients=True,
                                                **kw)[0].sum())(gen)
  np.testing.assert_allclose(g_ab, g_a + g_b, rtol=1e-4, atol=1e-8)


def test_several_bandwidths_add():
  gen, pos, neg = group(23)
  for name in ("log_kde", "mmd"):
    fn = losses.get_objective(name)
    total = fn(gen, pos, neg, bandwidths=(0.1, 0.4))[0]
    parts = fn(gen, pos, neg, bandwidths=0.1)[0] + fn(gen, pos, neg, bandwidths=0.4)[0]
    np.testing.assert_allclose(total, parts, rtol=1e-5)


def test_feature_groups_and_token_groups():
  gen, pos, neg = group(24, b=2, s=5)
  gen2, pos2, neg2 = group(25, b=2, s=3)
  loss_dict, info = losses.log_kde_loss({"a": gen, "b": gen2}, {"a": pos, "b": pos2}, {"a": neg, "b": neg2})
  expected = losses.log_kde_loss(gen, pos, neg)[0] + losses.log_kde_loss(gen2, pos2, neg2)[0]
  np.testing.assert_allclose(loss_dict, expected, rtol=1e-6)
  assert "scale/a" in info and "scale/b" in info
  # [B, C, T, S]: T token groups per row, losses averaged over T; the batch scale is
  # shared across all B*T groups as the release's trainer computes it.
  tokens = np.stack([gen, gen[:, ::-1] * 1.5], axis=2)
  tokens_pos = np.stack([pos, pos * 1.5], axis=2)
  loss4, _ = losses.corrected_drift_loss(tokens, tokens_pos, normalize_distances=False)
  loss_a = losses.corrected_drift_loss(gen, pos, normalize_distances=False)[0]
  loss_b = losses.corrected_drift_loss(gen[:, ::-1] * 1.5, pos * 1.5, normalize_distances=False)[0]
  np.testing.assert_allclose(loss4, (loss_a + loss_b) / 2, rtol=1e-5)
  with pytest.raises(ValueError, match="feature groups"):
    losses.log_kde_loss({"a": gen}, {"b": pos})


@pytest.mark.parametrize("objective", ["log_kde", "corrected", "joint", "release", "mmd"])
def test_stable_for_far_points_and_tiny_bandwidths(objective):
  gen, pos, neg = group(26, spread=1e4)
  fn = losses.get_objective(objective)
  kw = {"R_list": (1e-3, 0.05)} if objective == "release" else {"bandwidths": (1e-3, 0.05)}
  for normalize in (True, False):
    if objective == "release" and not normalize:
      continue
    extra = {} if objective == "release" else {"normalize_distances": normalize}
    for kernel in ("laplace", "gaussian") if objective != "release" else ("laplace",):
      f = lambda g: fn(g, pos, neg, kernel=kernel, **kw, **extra)[0].sum()
      value, grad = jax.value_and_grad(f)(jnp.asarray(gen))
      assert np.isfinite(value), (objective, normalize, kernel)
      assert np.all(np.isfinite(grad)), (objective, normalize, kernel)


def test_jit_vmap_grad_and_dtypes():
  gen, pos, neg = group(27)
  f = jax.jit(lambda g, p, n: losses.log_kde_loss(g, p, n, bandwidths=(0.2, 1.0)))
  loss32, _ = f(gen, pos, neg)
  # vmap over an outer axis equals looping.
  stacked = jax.vmap(lambda g: losses.corrected_drift_loss(g, pos, neg)[0])(np.stack([gen, gen * 2]))
  np.testing.assert_allclose(stacked[0], losses.corrected_drift_loss(gen, pos, neg)[0], rtol=1e-5)
  np.testing.assert_allclose(stacked[1], losses.corrected_drift_loss(gen * 2, pos, neg)[0], rtol=1e-5)
  loss16, _ = f(*(jnp.asarray(a, jnp.bfloat16) for a in (gen, pos, neg)))
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=0.05, atol=0.05)
  g = jax.jit(jax.grad(lambda g: losses.log_kde_loss(g, pos, neg)[0].sum()))(jnp.asarray(gen, jnp.bfloat16))
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_bad_inputs_raise_clear_errors():
  gen, pos, neg = group(28)
  with pytest.raises(ValueError, match="fixed_pos"):
    losses.log_kde_loss(gen, pos[..., :3], neg)
  with pytest.raises(ValueError, match="gen must have shape"):
    losses.log_kde_loss(gen[0], pos, neg)
  with pytest.raises(ValueError, match="non-negative"):
    losses.log_kde_loss(gen, pos, neg, None, None, -np.ones(neg.shape[:2], np.float32))
  with pytest.raises(ValueError, match="sums to zero"):
    losses.corrected_drift_loss(gen, pos, neg, None, np.zeros(pos.shape[:2], np.float32))
  with pytest.raises(ValueError, match="weight_neg must have shape"):
    losses.log_kde_loss(gen, pos, neg, None, None, np.ones((2, 7), np.float32))
  with pytest.raises(ValueError, match="reference besides the sample"):
    losses.log_kde_loss(gen[:, :1], pos)
  with pytest.raises(ValueError, match="unknown objective"):
    losses.get_objective("kl")
  with pytest.raises(ValueError, match="unknown normalization"):
    losses.drift_field(gen[0], pos[0], neg[0], kernel="laplace", bandwidth=1.0, normalization="sharpest")
  # Under jit the values are unknowable at trace time: invalid groups become NaN.
  bad_w = np.ones(neg.shape[:2], np.float32)
  bad_w[1, 0] = -1.0
  loss = jax.jit(lambda w: losses.log_kde_loss(gen, pos, neg, None, None, w)[0])(bad_w)
  assert np.isfinite(loss[0]) and np.isnan(loss[1])


# ------------------------------------------------------------------------ normalization


def test_topk_scale_against_brute_force_and_ema():
  r = rng(29)
  samples = r.normal(size=(3, 9, 4)).astype(np.float32) * np.array([1.0, 2.0, 0.5])[:, None, None]
  k = 5
  expected = []
  for c in range(3):
    d = np.linalg.norm(samples[c][:, None] - samples[c][None], axis=-1)
    np.fill_diagonal(d, np.inf)
    expected.append(np.sort(d, axis=1)[:, :k].mean())
  np.testing.assert_allclose(losses.topk_mean_distance(samples, k), expected, rtol=1e-5)
  state = losses.topk_scale_init(10)
  ids = np.array([4, 0, 7])
  state, s1 = jax.jit(lambda st, x: losses.topk_scale_update(st, x, ids, k=k))(state, samples)
  np.testing.assert_allclose(s1, expected, rtol=1e-5)
  state, s2 = losses.topk_scale_update(state, samples * 2, ids, k=k, beta=0.99)
  np.testing.assert_allclose(s2, 0.99 * np.array(expected) + 0.01 * 2 * np.array(expected), rtol=1e-5)
  assert bool(state.initialized[4]) and not bool(state.initialized[1])
  np.testing.assert_allclose(state.scale[ids], s2)
