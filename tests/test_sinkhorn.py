"""Tests of losses.sinkhorn_loss (the debiased Sinkhorn divergence on ott-jax) against
independent expectations: zero on identical clouds, the energy distance at large
epsilon, the exact assignment cost at small epsilon, finite differences in float64."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import jax
import jax.numpy as jnp

from drifting_jax import losses

pytestmark = pytest.mark.slow  # Sinkhorn solves to convergence


def clouds(seed=0, b=2, cg=6, cp=5, cn=3, s=4):
  r = np.random.default_rng(seed)
  gen = r.normal(size=(b, cg, s))
  pos = r.normal(size=(b, cp, s)) + 0.7
  neg = r.normal(size=(b, cn, s)) - 0.5
  return gen.astype(np.float32), pos.astype(np.float32), neg.astype(np.float32)


def pdist(x, y):
  return np.linalg.norm(x[:, None, :] - y[None, :, :], axis=-1)


def test_registered_and_zero_only_for_equal_measures():
  assert losses.get_objective("sinkhorn") is losses.sinkhorn_loss
  gen, pos, _ = clouds(0)
  same, info = losses.sinkhorn_loss(gen, gen)
  assert same.shape == (2,) and np.all(np.abs(same) < 2e-4)
  assert set(info) == {"scale", "divergence", "sinkhorn_iterations", "sinkhorn_converged"}
  differ, _ = losses.sinkhorn_loss(gen, pos)
  assert np.all(differ > 0.1)
  # Same support, different weights: still a different measure.
  w = np.tile(np.linspace(0.2, 2.0, gen.shape[1], dtype=np.float32), (2, 1))
  reweighted, _ = losses.sinkhorn_loss(gen, gen, None, w)
  assert np.all(reweighted > 1e-3)
  # Permuting the samples does not change a measure.
  permuted, _ = losses.sinkhorn_loss(gen, gen[:, ::-1], None, w, w[:, ::-1])
  assert np.all(np.abs(permuted) < 2e-4)


def half_energy_distance(x, y, a, b):
  """(2 E|X - Y| - E|X - X'| - E|Y - Y'|) / 2 and its gradient in x, in float64."""
  value = a @ pdist(x, y) @ b - 0.5 * a @ pdist(x, x) @ a - 0.5 * b @ pdist(y, y) @ b

  def unit(u, v):
    diff = u[:, None, :] - v[None, :, :]
    norm = np.linalg.norm(diff, axis=-1, keepdims=True)
    return np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)

  # d/dx_i: a_i (sum_j b_j u(x_i - y_j) - sum_k a_k u(x_i - x_k)); x enters E|X - X'| twice.
  grad = a[:, None] * (np.einsum("ijs,j->is", unit(x, y), b) - np.einsum("iks,k->is", unit(x, x), a))
  return value, grad


def test_large_epsilon_tends_to_half_the_energy_distance():
  gen, pos, _ = clouds(1, b=1, cg=6, cp=8)
  r = np.random.default_rng(2)
  w_gen, w_pos = r.uniform(0.3, 2.0, size=(1, 6)), r.uniform(0.3, 2.0, size=(1, 8))
  a, b = w_gen[0] / w_gen.sum(), w_pos[0] / w_pos.sum()
  expected, expected_grad = half_energy_distance(gen[0].astype(np.float64), pos[0].astype(np.float64), a, b)
  errors = {}
  with jax.enable_x64(True):
    for eps in (1e2, 1e3):
      f = lambda g: losses.sinkhorn_loss(g, pos.astype(np.float64), None, w_gen, w_pos, epsilon=eps,
                                         normalize_distances=False, threshold=1e-10)[0][0]
      value, grad = jax.value_and_grad(f)(jnp.asarray(gen, jnp.float64))
      errors[eps] = float(value) - expected
  # S_eps = MMD_{-C} + O(1/eps), from above.
  assert 0 < errors[1e3] < 2e-3 * expected
  np.testing.assert_allclose(errors[1e2] / errors[1e3], 10.0, rtol=0.05)
  np.testing.assert_allclose(grad[0], expected_grad, atol=2e-3 * np.abs(expected_grad).max())


@pytest.mark.parametrize("cost,eps", [("euclidean", 3e-3), ("sqeuclidean", 1e-2)])
def test_small_epsilon_tends_to_the_exact_assignment_cost(cost, eps):
  gen, pos, _ = clouds(3, b=2, cg=7, cp=7, s=3)
  expected = []
  for x, y in zip(gen.astype(np.float64), pos.astype(np.float64)):
    c = pdist(x, y) ** (1 if cost == "euclidean" else 2)
    rows, cols = linear_sum_assignment(c)
    expected.append(c[rows, cols].mean())  # uniform weights 1/7: the exact OT cost
  expected = np.array(expected)
  with jax.enable_x64(True):
    value, _ = losses.sinkhorn_loss(gen.astype(np.float64), pos.astype(np.float64), epsilon=eps, cost=cost,
                                    normalize_distances=False, threshold=1e-6, max_iterations=20000)
  np.testing.assert_allclose(value, expected, rtol=1e-4)


@pytest.mark.parametrize("cost", ["euclidean", "sqeuclidean"])
def test_gradient_matches_finite_differences(cost):
  """Float64, with CFG negatives, weights and a [B] distance scale (the scale is a
  constant here, so finite differences see the same function as the gradient)."""
  gen, pos, neg = clouds(4, b=2, cg=4, cp=5, cn=3, s=3)
  r = np.random.default_rng(5)
  w_gen, w_pos, w_neg = (r.uniform(0.3, 2.0, size=(2, n)) for n in (4, 5, 3))
  with jax.enable_x64(True):
    f = lambda g: jnp.sum(jnp.array([1.0, -0.7]) * losses.sinkhorn_loss(
        g, pos.astype(np.float64), neg.astype(np.float64), w_gen, w_pos, w_neg, epsilon=0.3, cost=cost,
        distance_scale=np.array([1.3, 0.8]), threshold=1e-12, max_iterations=5000)[0])
    value_and_grad = jax.value_and_grad(f)  # one compiled function for the values too
    x = jnp.asarray(gen, jnp.float64)
    grad = np.asarray(value_and_grad(x)[1])
    h = 1e-5
    numeric = np.zeros_like(grad)
    for idx in np.ndindex(*x.shape):
      step = jnp.zeros_like(x).at[idx].set(h)
      numeric[idx] = (float(value_and_grad(x + step)[0]) - float(value_and_grad(x - step)[0])) / (2 * h)
  assert grad.dtype == np.float64
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_negatives_form_the_guidance_mixture():
  gen, pos, neg = clouds(7)
  b, cg = gen.shape[:2]
  cn = neg.shape[1]
  # cfg = 1: unconditional weight 0, the loss and its gradient are the unguided ones,
  # and no gradient reaches the data (positives and negatives).
  zero = np.zeros((b, cn), np.float32)
  f_zero = lambda g, p, n: losses.sinkhorn_loss(g, p, n, None, None, zero)[0].sum()
  value_zero, (g_gen, g_pos, g_neg) = jax.value_and_grad(f_zero, argnums=(0, 1, 2))(gen, pos, neg)
  value_none, g_none = jax.value_and_grad(lambda g: losses.sinkhorn_loss(g, pos)[0].sum())(gen)
  np.testing.assert_allclose(value_zero, value_none, rtol=1e-5)
  np.testing.assert_allclose(g_gen, g_none, rtol=1e-5, atol=1e-7)
  assert np.abs(g_gen).max() > 1e-3 and not np.any(g_pos) and not np.any(g_neg)
  # cfg = alpha: S_eps(q_mix, p) divided by the generated share of q_mix's mass.
  alpha = 2.5
  w_neg = np.full((b, cn), (alpha - 1) * (cg - 1) / cn, np.float32)
  guided, info = losses.sinkhorn_loss(gen, pos, neg, None, None, w_neg, distance_scale=1.0)
  w_mix = np.concatenate([np.ones((b, cg), np.float32), w_neg], axis=1)
  mixture, _ = losses.sinkhorn_loss(np.concatenate([gen, neg], 1), pos, None, w_mix, distance_scale=1.0)
  share = cg / (cg + cn * w_neg[0, 0])
  np.testing.assert_allclose(guided, mixture / share, rtol=1e-5)
  np.testing.assert_allclose(info["divergence"], np.mean(mixture), rtol=1e-5)
  # The guided fixed point: data = the mixture of the generated samples and the
  # negatives (q = alpha p - (alpha - 1) p_uncond), so nothing moves (float64: exact
  # zeros of the distances of coincident points).
  with jax.enable_x64(True):
    data = np.concatenate([gen, neg], axis=1).astype(np.float64)
    f = lambda g: losses.sinkhorn_loss(g, data, neg.astype(np.float64), None, w_mix, w_neg, threshold=1e-10,
                                       max_iterations=5000)[0].sum()
    value, grad = jax.value_and_grad(f)(jnp.asarray(gen, jnp.float64))
  assert abs(float(value)) < 1e-6 and np.abs(grad).max() < 1e-3 * np.abs(g_gen).max()


def test_grouped_layouts_agree_with_per_group_calls():
  gen, pos, neg = clouds(8, b=3)
  w_neg = np.full(neg.shape[:2], 0.5, np.float32)
  kw = dict(distance_scale=2.0)
  batched, _ = losses.sinkhorn_loss(gen, pos, neg, None, None, w_neg, **kw)
  single = [losses.sinkhorn_loss(gen[i:i + 1], pos[i:i + 1], neg[i:i + 1], None, None, w_neg[i:i + 1], **kw)[0]
            for i in range(3)]
  np.testing.assert_allclose(batched, np.concatenate(single), rtol=1e-5)
  # A [B] distance scale is one scalar scale per row.
  scales = np.array([0.5, 1.0, 3.0], np.float32)
  per_row, _ = losses.sinkhorn_loss(gen, pos, distance_scale=scales)
  for i in range(3):
    np.testing.assert_allclose(per_row[i], losses.sinkhorn_loss(gen, pos, distance_scale=scales[i])[0][i],
                               rtol=1e-5)
  # [B, C, T, S]: the mean over the T token groups of each row.
  other_gen, other_pos = gen[:, ::-1] * 1.5, pos * 1.5
  tokens, _ = losses.sinkhorn_loss(np.stack([gen, other_gen], 2), np.stack([pos, other_pos], 2), **kw)
  np.testing.assert_allclose(tokens, (losses.sinkhorn_loss(gen, pos, **kw)[0]
                                      + losses.sinkhorn_loss(other_gen, other_pos, **kw)[0]) / 2, rtol=1e-5)
  # Feature-group dicts: the groups' losses add; info keys get the group's name.
  gen2, pos2, neg2 = clouds(9, b=3, s=2)
  total, info = losses.sinkhorn_loss({"a": gen, "b": gen2}, {"a": pos, "b": pos2}, {"a": neg, "b": neg2},
                                     None, None, w_neg, **kw)
  second = losses.sinkhorn_loss(gen2, pos2, neg2, None, None, w_neg, **kw)[0]
  np.testing.assert_allclose(total, batched + second, rtol=1e-5)
  assert {"scale/a", "divergence/b", "sinkhorn_iterations/a"} <= set(info)


def test_jit_vmap_dtypes_and_relative_epsilon():
  gen, pos, neg = clouds(10)
  f = lambda g: losses.sinkhorn_loss(g, pos, neg, None, None, np.ones(neg.shape[:2], np.float32))[0]
  eager = f(gen)  # (an outer jit: test_bad_inputs_raise_clear_errors and the trainer)
  stacked = jax.vmap(f)(np.stack([gen, gen * 2]))
  np.testing.assert_allclose(stacked[0], eager, rtol=1e-5)
  np.testing.assert_allclose(stacked[1], f(gen * 2), rtol=1e-5)
  low = losses.sinkhorn_loss(jnp.asarray(gen, jnp.bfloat16), jnp.asarray(pos, jnp.bfloat16))[0]
  assert low.dtype == jnp.float32
  # With the batch-mean scale, epsilon and the loss are relative: scale-invariant.
  np.testing.assert_allclose(losses.sinkhorn_loss(gen * 37, pos * 37, neg * 37)[0],
                             losses.sinkhorn_loss(gen, pos, neg)[0], rtol=1e-4)


def test_convergence_is_reported():
  gen, pos, _ = clouds(11)
  _, info = losses.sinkhorn_loss(gen, pos, epsilon=1e-3, max_iterations=20)
  assert float(info["sinkhorn_converged"]) < 1.0 and float(info["sinkhorn_iterations"]) == 20


def test_bad_inputs_raise_clear_errors():
  gen, pos, neg = clouds(12)
  for bad in (0.0, -0.1, float("nan"), float("inf"), "big", None):
    with pytest.raises(ValueError, match="epsilon"):
      losses.sinkhorn_loss(gen, pos, epsilon=bad)
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda e: losses.sinkhorn_loss(gen, pos, epsilon=e)[0])(0.1)
  with pytest.raises(ValueError, match="unknown Sinkhorn cost"):
    losses.sinkhorn_loss(gen, pos, cost="cityblock")
  with pytest.raises(ValueError, match="max_iterations"):
    losses.sinkhorn_loss(gen, pos, max_iterations=2.5)
  with pytest.raises(ValueError, match="threshold"):
    losses.sinkhorn_loss(gen, pos, threshold=0.0)
  with pytest.raises(ValueError, match="fixed_pos"):
    losses.sinkhorn_loss(gen, pos[..., :3])
  with pytest.raises(ValueError, match="fixed_neg"):
    losses.sinkhorn_loss(gen, pos, neg[:1])
  with pytest.raises(ValueError, match="gen must have shape"):
    losses.sinkhorn_loss(gen[0], pos)
  with pytest.raises(ValueError, match="distance_scale"):
    losses.sinkhorn_loss(gen, pos, distance_scale=np.ones(5, np.float32))
  with pytest.raises(ValueError, match="non-negative"):
    losses.sinkhorn_loss(gen, pos, neg, None, None, -np.ones(neg.shape[:2], np.float32))
  with pytest.raises(ValueError, match="sums to zero"):
    losses.sinkhorn_loss(gen, pos, None, None, np.zeros(pos.shape[:2], np.float32))
  # Traced invalid weights: that group's loss is NaN (the trainer's NaN guard stops).
  bad_w = np.ones(neg.shape[:2], np.float32)
  bad_w[1, 0] = -1.0
  loss = jax.jit(lambda w: losses.sinkhorn_loss(gen, pos, neg, None, None, w)[0])(bad_w)
  assert np.isfinite(loss[0]) and np.isnan(loss[1])


def test_objective_from_config():
  from configs import default
  from drifting_jax.train import train_step

  config = default.get_config().loss
  config.objective = "sinkhorn"
  config.kernel = "not a kernel"  # unused by this objective
  objective = train_step.objective_from_config(config)
  gen, pos, neg = clouds(13)
  w_neg = np.ones(neg.shape[:2], np.float32)
  for scale in (None, 1.5):
    np.testing.assert_allclose(objective(gen, pos, neg, weight_neg=w_neg, distance_scale=scale)[0],
                               losses.sinkhorn_loss(gen, pos, neg, None, None, w_neg, epsilon=0.1,
                                                    distance_scale=scale)[0], rtol=1e-6)
  config.sinkhorn_cost = "manhattan"
  with pytest.raises(ValueError, match="unknown Sinkhorn cost"):
    train_step.objective_from_config(config)
  config.sinkhorn_cost = "euclidean"
  config.normalize_gradients = True
  with pytest.raises(ValueError, match="normalize_gradients"):
    train_step.objective_from_config(config)
