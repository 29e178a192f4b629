"""The feature-function interface: pixel features, patch statistics, the frozen-MAE wrapper."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drifting_jax.models import features


def test_pixel_features_are_the_flat_sample():
  x = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
  fn = features.pixel_features()
  assert fn.params == {}
  out = fn(fn.params, jnp.asarray(x))
  assert list(out) == ["pixels"] and out["pixels"].shape == (3, 1, 32)
  np.testing.assert_array_equal(np.asarray(out["pixels"]), x.reshape(3, 1, 32))
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    fn(fn.params, jnp.zeros((3, 16)))


def test_patch_statistics_groups():
  x = np.random.default_rng(1).normal(size=(2, 4, 6, 3)).astype(np.float32)
  out = features.pixel_features(patch_stats_sizes=(2,))({}, jnp.asarray(x))
  assert sorted(out) == ["patch_mean_2", "patch_std_2", "pixels"]
  assert out["patch_mean_2"].shape == out["patch_std_2"].shape == (2, 6, 3)  # (4/2) x (6/2) patches
  # Patch t = (row block, column block) in row-major order.
  patch = x[:, 2:4, 2:4, :].reshape(2, 4, 3)  # row block 1, column block 1 -> t = 1 * 3 + 1
  np.testing.assert_allclose(np.asarray(out["patch_mean_2"])[:, 4], patch.mean(axis=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["patch_std_2"])[:, 4], np.sqrt(patch.var(axis=1) + 1e-6),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="divisible"):
    features.patch_statistics(jnp.asarray(x), 4)


def test_mae_features_freeze_the_encoder(monkeypatch):
  """The wrapper passes its kwargs through and lets no gradient reach the MAE params."""
  calls = []

  def activations(module, params, x, **kwargs):
    calls.append((module, kwargs))
    return {"block": (params["w"] * x).reshape(x.shape[0], 1, -1)}

  fake = types.SimpleNamespace(activations=activations)
  monkeypatch.setattr(features, "mae", fake)  # the module features imports at its top
  fn = features.mae_features("the module", {"w": jnp.float32(2.0)}, every_k_block=2)
  x = jnp.ones((2, 2, 2, 1))
  out = fn(fn.params, x)
  assert calls[-1] == ("the module", {"every_k_block": 2})
  np.testing.assert_array_equal(np.asarray(out["block"]), 2.0 * np.ones((2, 1, 4)))
  # The release's "global" group: the raw sample, first, as one token.
  assert list(out) == ["global", "block"]
  np.testing.assert_array_equal(np.asarray(out["global"]), np.ones((2, 1, 4)))
  without_input = features.mae_features("the module", {"w": jnp.float32(1.0)}, include_input=False)
  assert list(without_input(without_input.params, x)) == ["block"]
  loss = lambda params, x: jnp.sum(fn(params, x)["block"] ** 2)
  fn = features.mae_features("the module", {"w": jnp.float32(2.0)}, include_input=False, every_k_block=2)
  param_grad, input_grad = jax.grad(loss, argnums=(0, 1))(fn.params, x)
  assert float(param_grad["w"]) == 0.0
  np.testing.assert_allclose(np.asarray(input_grad), 8.0 * np.ones((2, 2, 2, 1)))  # d/dx (2x)^2 = 8x


def test_bf16_stored_kernels_give_bit_identical_features():
  """The trainer stores a bf16 network's kernels in bf16 (half the HBM): flax casts them
  to bf16 at each use anyway, so the features must not change by a single bit; the
  float32 norm parameters stay float32."""
  from drifting_jax.models import mae

  module = mae.build_module(mae.model_config_for("tiny", use_bf16=True))
  params = mae.init_params(module, jax.random.PRNGKey(0))
  stored = features.frozen_params(params, module.dtype)
  kernels = [p for p in jax.tree.leaves(stored) if p.ndim >= 2]
  assert kernels and all(p.dtype == jnp.bfloat16 for p in kernels)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(stored) if p.ndim < 2)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 4))
  fn = jax.jit(features.mae_features(module, params).__call__)  # compiled: op by op, bf16 on CPU is slow
  reference, from_stored = fn(params, x), fn(stored, x)
  assert reference.keys() == from_stored.keys()
  for name in reference:
    np.testing.assert_array_equal(np.asarray(reference[name]), np.asarray(from_stored[name]), err_msg=name)
  # A float32 network keeps its parameters as they are.
  assert features.frozen_params(params, jnp.float32) is params
