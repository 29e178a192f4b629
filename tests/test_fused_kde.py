"""`loss.kde_impl="pallas"`: the log-KDE and MMD objectives by the Pallas kernels of `losses/fused_kde.py`.

Independent expectation: the same objective by XLA (`implementation="xla"`, the path the
release-compatibility and closed-form tests check). The kernels run in the Pallas
interpreter here ("pallas_interpret", the same kernel bodies); they must give the
same loss, gradient, info and batch sums to float32 rounding (the q side's two blocks
and the per-token sums add the same terms in another order): 2e-5 relative, gradients
also 1e-6 of their largest entry. Slow tests compile them for a v6e chip through libtpu.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, mnist_tiny
from drifting_jax import losses, partitioning
from drifting_jax.losses import fused_kde, registry
from drifting_jax.train import program as program_lib

B, CG, CP, CN = 2, 5, 6, 3


def _inputs(tokens=None, features=128, seed=0, negatives=CN):
  rng = np.random.default_rng(seed)
  tail = (features,) if tokens is None else (tokens, features)
  gen = rng.normal(size=(B, CG, *tail)).astype(np.float32)
  pos = (rng.normal(size=(B, CP, *tail)) + 0.4).astype(np.float32)
  neg = rng.normal(size=(B, negatives, *tail)).astype(np.float32) * 1.3 if negatives else None
  w_neg = rng.uniform(0.2, 2.0, (B, negatives)).astype(np.float32) if negatives else None
  return gen, pos, neg, w_neg


def _run(fn, impl, gen, pos, neg, w_neg, **options):
  def total(g):
    loss, info = fn(g, pos, neg, weight_neg=w_neg, implementation=impl, **options)
    return jnp.sum(loss * jnp.arange(1.0, B + 1.0)), (loss, info)  # unequal cotangents per class
  (_, (loss, info)), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(gen)
  return np.asarray(loss), info, np.asarray(grad)


def _assert_same(fn, gen, pos, neg, w_neg, **options):
  loss_x, info_x, grad_x = _run(fn, "xla", gen, pos, neg, w_neg, **options)
  loss_p, info_p, grad_p = _run(fn, "pallas_interpret", gen, pos, neg, w_neg, **options)
  assert np.all(np.isfinite(loss_x))
  np.testing.assert_allclose(loss_p, loss_x, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(grad_p, grad_x, rtol=2e-5, atol=1e-6 * np.abs(grad_x).max())
  assert set(info_p) == set(info_x)
  for k in info_x:
    np.testing.assert_allclose(info_p[k], info_x[k], rtol=2e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("tokens", [None, 4, 16], ids=["one-token", "4-tokens", "16-tokens-2-blocks"])
@pytest.mark.parametrize("normalize_gradients", [False, True])
@pytest.mark.parametrize("fn", [losses.log_kde_loss, losses.mmd_loss], ids=["log_kde", "mmd"])
def test_kernels_equal_xla(fn, normalize_gradients, tokens):
  gen, pos, neg, w_neg = _inputs(tokens, features=20 if tokens is None else 128)
  _assert_same(fn, gen, pos, neg, w_neg, bandwidths=(0.1, 0.5), normalize_gradients=normalize_gradients)


@pytest.mark.parametrize("case", ["scalar-scale", "per-class-scale", "raw-distances", "no-negatives",
                                  "a-zero-weight", "sharp-mmd-gaussian"])
def test_kernels_equal_xla_across_options(case):
  gen, pos, neg, w_neg = _inputs(8, seed=1)
  fn, options = losses.log_kde_loss, dict(bandwidths=(0.2,), normalize_gradients=True)
  if case == "scalar-scale":
    options["distance_scale"] = np.float32(7.5)
  elif case == "per-class-scale":
    options["distance_scale"] = np.array([6.0, 9.0], np.float32)
  elif case == "raw-distances":
    options.update(normalize_distances=False, bandwidths=(8.0, 20.0))
  elif case == "no-negatives":
    neg = w_neg = None
  elif case == "a-zero-weight":
    w_neg[0, 1] = 0.0
  else:
    fn, options = losses.mmd_loss, dict(kernel="gaussian", sharp=True, bandwidths=(0.3, 1.0))
  _assert_same(fn, gen, pos, neg, w_neg, **options)


def test_batch_sums_and_given_statistics_equal_xlas():
  """The chunked-batch protocol (`losses.statistics`) through the kernels: the same sums, and
  with the whole batch's statistics given, the same loss and gradient."""
  gen, pos, neg, w_neg = _inputs(8, seed=2)
  options = dict(bandwidths=(0.1, 0.5), normalize_gradients=True)
  sums = {impl: losses.log_kde_loss(gen, pos, neg, weight_neg=w_neg, implementation=impl, return_batch_sums=True,
                                    **options)[2] for impl in ("xla", "pallas_interpret")}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5), sums["pallas_interpret"], sums["xla"])
  given = losses.BatchStatistics(jnp.float32(11.0), jnp.array([3e-4, 2e-3], jnp.float32))
  _assert_same(losses.log_kde_loss, gen, pos, neg, w_neg, statistics=given, **options)


def test_invalid_weights_poison_their_class_and_unsupported_calls_use_xla():
  gen, pos, neg, w_neg = _inputs(8, seed=3)
  bad = w_neg.copy()
  bad[1, 0] = -1.0
  loss = jax.jit(lambda w: losses.log_kde_loss(gen, pos, neg, weight_neg=w, implementation="pallas_interpret")[0])(bad)
  assert np.isfinite(loss[0]) and np.isnan(loss[1])
  # Weights on the generated samples: not the kernels' call; XLA computes it, bit for bit.
  w_gen = np.linspace(0.5, 1.5, B * CG, dtype=np.float32).reshape(B, CG)
  a, b = (losses.log_kde_loss(gen, pos, neg, w_gen, None, w_neg, implementation=impl)[0]
          for impl in ("xla", "pallas_interpret"))
  np.testing.assert_array_equal(a, b)
  assert "128-lane" in fused_kde.supports(np.zeros((1, 4, 8, 100)), np.zeros((1, 4, 8, 100)), None, None, None,
                                          None, None)
  with pytest.raises(ValueError, match="implementation must be one of"):
    losses.log_kde_loss(gen, pos, neg, weight_neg=w_neg, implementation="cuda")


def test_the_config_chooses_by_platform():
  config = default.get_config().loss
  assert registry.kde_implementation("auto", "tpu") == "pallas"
  assert registry.kde_implementation("auto", "gpu") == registry.kde_implementation("auto", None) == "xla"
  with pytest.raises(ValueError, match="needs TPUs"):
    registry.kde_implementation("pallas", "cpu")
  assert losses.objective_from_config(config, "tpu").options["implementation"] == "pallas"
  assert losses.objective_from_config(config, "cpu").options["implementation"] == "xla"
  config.objective = "corrected"
  assert "implementation" not in losses.objective_from_config(config, "tpu").options
  config.kde_impl = "triton"
  with pytest.raises(ValueError, match="loss.kde_impl must be one of"):
    losses.objective_from_config(config, "tpu")


def _train_step_loss_and_grads(kde_impl, mesh, classes=2):
  config = mnist_tiny.get_config("smoke")
  config.train.classes_per_step = classes
  config.loss.kde_impl = kde_impl
  program = program_lib.build_train_program(config, mesh)
  state = program.init()
  rng = np.random.default_rng(0)
  t = config.train
  batch = {"labels": np.arange(classes, dtype=np.int32),
           "positives": rng.uniform(-1, 1, (classes, t.pos_per_class, 28, 28, 1)).astype(np.float32),
           "negatives": rng.uniform(-1, 1, (classes, t.neg_per_class, 28, 28, 1)).astype(np.float32)}
  batch = {k: partitioning.host_to_global(v, mesh) for k, v in batch.items()}
  new_state, metrics = program.jitted(state, program.place_feature_params(), batch)
  return jax.device_get((metrics["loss"], metrics["grad_norm"], new_state.params))


@pytest.mark.slow
@pytest.mark.e2e  # whole training steps, twice each: make test-e2e
@pytest.mark.parametrize("layout", ["one-device", "data-2-fsdp-4"])
def test_a_training_step_with_the_kernels_equals_xlas(layout):
  """The trainer's step on the tiny MNIST config (pixel features, one token of 784) with
  loss.kde_impl=pallas_interpret: loss, gradient norm and updated parameters as with XLA;
  on 8 CPU devices the kernels run per device on their class (shard_map)."""
  if layout == "one-device":
    mesh, classes = partitioning.make_mesh(devices=jax.devices()[:1]), 2
  else:
    mesh, classes = partitioning.make_mesh(data=2, fsdp=4), 8
  (loss_x, norm_x, params_x), (loss_p, norm_p, params_p) = (_train_step_loss_and_grads(i, mesh, classes)
                                                            for i in ("xla", "pallas_interpret"))
  np.testing.assert_allclose(loss_p, loss_x, rtol=2e-5)
  np.testing.assert_allclose(norm_p, norm_x, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_p, params_x)


@pytest.mark.slow
@pytest.mark.e2e  # compiled through libtpu: make test-e2e
def test_compiled_for_a_tpu_the_kernels_move_a_third_of_xlas_bytes():
  """One class of the ablation's largest feature group kind (1,024 tokens of 256, 64
  generated, 64 positives, 16 negatives; batch-mean scale, 3 bandwidths, gradient RMS),
  fwd+bwd on one v6e chip: three Mosaic calls (scale, values with the squared sums,
  gradient), no [.., 64, 80]-sized entry array, and libtpu's bytes under 0.4x XLA's
  (0.27x when written: 0.79 against 2.95 GB; compiler's estimates)."""
  pytest.importorskip("libtpu", reason="TPU targets need libtpu (requirements.txt)")
  from drifting_jax.scale import targets, xla_internals

  targets.compile_environment()
  sharding = jax.sharding.SingleDeviceSharding(targets.parse("v6e-8").devices()[0])
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)

  def compiled(impl):
    def step(gen, pos, neg, w_neg):
      loss = lambda g: jnp.mean(losses.log_kde_loss(g, pos, neg, weight_neg=w_neg, bandwidths=(0.02, 0.05, 0.2),
                                                    normalize_gradients=True, implementation=impl)[0])
      return jax.value_and_grad(loss)(gen)
    return jax.jit(step).lower(spec(1, 64, 1024, 256), spec(1, 64, 1024, 256), spec(1, 16, 1024, 256),
                               spec(1, 16)).compile()

  fused, plain = compiled("pallas"), compiled("xla")
  text = fused.as_text()
  assert len(re.findall(r'custom_call_target="tpu_custom_call"', text)) == 3
  assert not re.search(r"f32\[1024,64,(64|80|16)\]", text)
  fused_bytes, plain_bytes = (xla_internals.cost_numbers(c)["bytes accessed"] for c in (fused, plain))
  assert fused_bytes < 0.4 * plain_bytes, (fused_bytes, plain_bytes)
