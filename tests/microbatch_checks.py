"""Helpers shared by the microbatching tests (tests/test_microbatches.py: kept features and the
count; tests/test_microbatch_recompute.py: recomputed features): a toy MNIST step of 4 classes
with guidance, computed whole and in chunks, and the comparison of two such steps.

`assert_same_step`: the loss, the gradient (Adam's first moment after one step is
(1 - b1) g), the top-k scales and the parameters after one update, to float32 rounding
(the chunked sums add the same terms in another order).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import mnist_tiny
from drifting_jax import partitioning
from drifting_jax.train import program as program_lib

CLASSES = 4


def config(objective="log_kde", normalization="batch_mean", microbatches=1, features="auto", **loss):
  c = mnist_tiny.get_config("smoke")
  c.train.classes_per_step = CLASSES
  c.train.gen_per_class, c.train.pos_per_class, c.train.neg_per_class = 4, 6, 3
  c.train.cfg_max = 3.0  # guidance: unconditional negatives weighted per class
  c.loss.objective, c.loss.feature_normalization = objective, normalization
  c.loss.topk_k = 3
  c.loss.bandwidths = (0.1, 0.3)
  c.loss.kernel = "laplace"
  if normalization == "batch_mean":  # the tiny config anneals its widths, which needs a fixed scale
    c.loss.bandwidth_anneal_rate = 0.0
  for k, v in loss.items():
    c.loss[k] = v
  c.train.microbatches = microbatches
  c.train.microbatch_features = features
  return c


def host_batch(config):
  rng = np.random.default_rng(0)
  t = config.train
  return {"labels": np.array([1, 3, 4, 8], np.int32),
          "positives": rng.uniform(-1, 1, (CLASSES, t.pos_per_class, 28, 28, 1)).astype(np.float32),
          "negatives": rng.uniform(-1, 1, (CLASSES, t.neg_per_class, 28, 28, 1)).astype(np.float32)}


def one_step(config, mesh):
  program = program_lib.build_train_program(config, mesh)
  state = program.init()
  placed = {k: partitioning.host_to_global(v, mesh) for k, v in host_batch(config).items()}
  new_state, metrics = program.jitted(state, program.place_feature_params(), placed)
  first_moment = [s for s in jax.tree.leaves(new_state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                  if hasattr(s, "mu")][0].mu
  return jax.device_get((metrics["loss"], first_moment, new_state.params, new_state.feature_scale))


def assert_same_step(reference, chunked):
  loss_1, mu_1, params_1, scale_1 = reference
  loss_m, mu_m, params_m, scale_m = chunked
  np.testing.assert_allclose(loss_m, loss_1, rtol=2e-5)
  g_1, g_m = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (mu_1, mu_m))
  # Gradients: the same to rounding, relative to their largest entry (sums in another order).
  np.testing.assert_allclose(g_m, g_1, rtol=1e-4, atol=1e-5 * np.max(np.abs(g_1)))
  # The update: Adam's first step is ~lr * sign(g), ill-conditioned where g is ~0; compare the rest.
  p_1, p_m = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (params_1, params_m))
  big = np.abs(g_1) > 1e-3 * np.max(np.abs(g_1))
  np.testing.assert_allclose(p_m[big], p_1[big], rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), scale_m, scale_1)


def single_device_mesh():
  return partitioning.make_mesh(devices=jax.devices()[:1])


EVERY_OBJECTIVE = ("corrected", "release", "joint", "mmd", "sinkhorn")


def assert_four_chunks_equal_the_whole_step(objective: str, normalization: str, features: str) -> None:
  """`objective` (with the options the release uses for it) in 4 chunks, computed as `features`
  says, equals the unchunked step."""
  if objective == "release" and normalization != "batch_mean":
    pytest.skip("the release objective computes its own batch-mean scale (a config error otherwise)")
  extra = {"normalize_gradients": True} if objective in ("corrected", "joint", "release") else {}
  if objective == "sinkhorn":
    extra = {"sinkhorn_epsilon": 0.1, "sinkhorn_max_iterations": 50}
  mesh = single_device_mesh()
  reference = one_step(config(objective, normalization, 1, **extra), mesh)
  assert_same_step(reference, one_step(config(objective, normalization, 4, features, **extra), mesh))


def assert_two_chunks_on_a_mesh_equal_the_whole_step(features: str) -> None:
  """Data 2 x fsdp 4 (8 CPU devices): each chunk's classes split over the data shards, the
  samples over fsdp; the release's setting in 2 chunks equals the unchunked step."""
  mesh = partitioning.make_mesh(data=2, fsdp=4)
  reference = one_step(config("log_kde", "batch_mean", 1, normalize_gradients=True), mesh)
  assert_same_step(reference, one_step(config("log_kde", "batch_mean", 2, features, normalize_gradients=True), mesh))
