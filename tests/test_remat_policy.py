"""`model.remat_policy` and `feature.remat_policy`: rematerialisation changes memory, not the numbers.

A rematerialised block recomputes in the backward pass the same operations on the
same values, so the loss and the gradients equal the un-rematerialised ones up to
float32 rounding (XLA may fuse the recomputed ops differently): observed here, the
losses equal bit for bit and the gradients differ by at most ~5e-7 of their largest
entry; the tolerance is 1e-5 of it. The parameter tree is unchanged (nn.remat wraps
the class, not the names); the generator's compiled backward pass keeps fewer bytes.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import imagenet_latent_ablation, mnist_demo
from drifting_jax import config_defaults, errors, partitioning
from drifting_jax.models import features, generator as G, layers, mae
from drifting_jax.train import program as program_lib

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
POLICIES = [p for p in layers.REMAT_POLICIES if p != "none"]


def _assert_close_grads(got, want):
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale), got, want)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


# ----------------------------------------------------------------------------- the generator


@pytest.fixture(scope="module")
def tiny_generator():
  config = G.model_config_for("tiny", depth=2)
  module = G.build_module(config)
  args, kwargs = G.example_inputs(config, batch_size=1)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), *args, **kwargs)["params"]
  # The zero-initialised adaLN and output layers would make most gradients zero.
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  noise = G.draw_noise(module, jax.random.PRNGKey(2), 16)
  labels, cfg = jnp.arange(16) % 10, jnp.linspace(1.0, 3.0, 16)

  def loss(module, p):
    return jnp.sum(jnp.sin(3.0 * module.apply({"params": p}, labels, cfg, noise=noise)["samples"]))

  return config, module, params, loss


@pytest.mark.parametrize("fields", [{"remat_policy": "full"}, {"remat_policy": "dots"}, {"remat": True},
                                    {"use_remat": True}])
def test_generator_remat_same_loss_gradients_and_tree(tiny_generator, fields):
  config, plain, params, loss = tiny_generator
  remat = G.build_module({**config, **fields})
  args, kwargs = G.example_inputs(config, batch_size=1)
  tree = jax.eval_shape(remat.init, jax.random.PRNGKey(0), *args, **kwargs)["params"]
  assert jax.tree.structure(tree) == jax.tree.structure(params)
  assert jax.tree.map(lambda a: a.shape, tree) == jax.tree.map(lambda a: a.shape, params)
  value = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(m, p)))(params)
  (loss_plain, grad_plain), (loss_remat, grad_remat) = value(plain), value(remat)
  np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
  _assert_close_grads(grad_remat, grad_plain)


def test_generator_remat_keeps_fewer_bytes(tiny_generator):
  """The policies do what they say in the compiled backward pass: full < dots < none."""
  config, _, params, loss = tiny_generator
  temp = {p: _temp_bytes(jax.grad(lambda q, m=G.build_module({**config, "remat_policy": p}): loss(m, q)), params)
          for p in layers.REMAT_POLICIES}
  assert temp["full"] < temp["dots"] < temp["none"], temp


def test_remat_switch_and_policy_are_one_setting():
  assert G.effective_remat_policy(False, "none") == "none"
  assert G.effective_remat_policy(True, "none") == "full"  # the older model.remat=True
  assert G.effective_remat_policy(True, "dots") == "dots"
  assert G.effective_remat_policy(False, "full") == "full"
  with pytest.raises(errors.UsageError, match="model.remat_policy must be one of none, full, dots"):
    layers.check_remat_policy("selective", "model.remat_policy")
  config = mnist_demo.get_config()
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  assert program_lib.build_generator(config, mesh).remat_policy == "none"
  config.model.remat = True
  assert program_lib.build_generator(config, mesh).remat_policy == "full"
  config.model.remat_policy = "dots"
  assert program_lib.build_generator(config, mesh).remat_policy == "dots"
  config.model.remat_policy = "selective"
  with pytest.raises(errors.UsageError, match="model.remat_policy"):
    program_lib.build_generator(config, mesh)


def test_an_old_config_gets_the_new_fields_from_the_defaults():
  config = mnist_demo.get_config()
  for section, key in (("model", "remat_policy"), ("model", "attention_impl"), ("feature", "remat_policy")):
    del config[section][key]
  config_defaults.complete(config)
  assert (config.model.remat_policy, config.model.attention_impl, config.feature.remat_policy) == \
      ("none", "auto", "none")


def test_runtime_fields_stay_out_of_artifacts():
  assert {"remat", "remat_policy", "attention_impl"} <= set(G.RUNTIME_ONLY_KEYS)
  assert mae.RUNTIME_ONLY_KEYS == ("remat_policy",)


# ----------------------------------------------------------------------------- the frozen MAE


@pytest.fixture(scope="module")
def tiny_mae():
  module = mae.build_module(mae.model_config_for("tiny", layers=(2, 1, 2, 1)))
  params = mae.init_params(module, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 16, 16, 4))
  return module, params, x


def _feature_loss(fn):
  return lambda params, x: sum(jnp.sum(jnp.sin(v)) for v in fn(params, x).values())


@pytest.mark.parametrize("policy", POLICIES)
def test_mae_remat_same_features_input_gradient_and_tree(tiny_mae, policy):
  module, params, x = tiny_mae
  plain = features.mae_features(module, params, every_k_block=1)
  remat = features.mae_features(module, params, every_k_block=1, remat_policy=policy)
  tree = jax.eval_shape(lambda: mae.init_params(module.clone(remat_policy=policy), jax.random.PRNGKey(0)))
  assert jax.tree.map(lambda a: a.shape, tree) == jax.tree.map(lambda a: a.shape, params)
  # Without a gradient (the data's features) the program is the same: bit for bit.
  got, want = jax.jit(remat.apply)(params, x), jax.jit(plain.apply)(params, x)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  value = lambda fn: jax.jit(jax.value_and_grad(_feature_loss(fn), argnums=1))(params, x)
  (loss_plain, grad_plain), (loss_remat, grad_remat) = value(plain), value(remat)
  np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
  _assert_close_grads(grad_remat, grad_plain)


def test_mae_remat_is_in_the_backward_program(tiny_mae):
  """Each residual block is rematerialised (`remat2`) in the differentiated program. (The CPU
  compiler's temporaries do not shrink for this ResNet: with "full" they grew by 5-15%
  at 16 x 32x32x4, "dots" equal to "none" within 0.3%: whether the lever pays is the
  TPU and GPU compilers' call, measured with the compile mode.)"""
  module, params, x = tiny_mae
  blocks = sum(module.layers)
  for policy in layers.REMAT_POLICIES:
    fn = features.mae_features(module, params, remat_policy=policy)
    jaxpr = str(jax.make_jaxpr(jax.grad(_feature_loss(fn), argnums=1))(params, x))
    assert jaxpr.count("remat2[") == (0 if policy == "none" else blocks), policy


# ----------------------------------------------------------------------------- the training step


def _one_step(model_policy, feature_policy):
  config = imagenet_latent_ablation.get_config("compile_smoke")
  config.feature.mae_path = str(FIXTURES / "official_tiny" / "mae")
  config.data.num_classes = 10
  config.train.classes_per_step = 2
  # In float32: a bf16 model's recomputed ops round where the compiler's fusions end,
  # which remat moves (observed: gradients 2.6% of their largest entry apart in bf16).
  config.model.overrides = ml_collections.ConfigDict(dict(depth=1, use_bf16=False))
  config.model.remat_policy, config.feature.remat_policy = model_policy, feature_policy
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  program = program_lib.build_train_program(config, mesh)
  rng = np.random.default_rng(0)
  t = config.train
  batch = {"labels": np.array([1, 7], np.int32),
           "positives": rng.normal(size=(2, t.pos_per_class, 32, 32, 4)).astype(np.float32),
           "negatives": rng.normal(size=(2, t.neg_per_class, 32, 32, 4)).astype(np.float32)}
  state = program.init()
  # The zero-initialised output layers would give most parameters no gradient.
  state = state.replace(params=jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                                            state.params))
  new_state, metrics = program.jitted(state, program.place_feature_params(), batch)
  mu = [s for s in jax.tree.leaves(new_state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0].mu
  return jax.device_get((metrics["loss"], mu))


@pytest.mark.slow  # three training steps with the MAE compiled (~2 min): the e2e tier; the modules'
@pytest.mark.e2e   # own remat equalities above run in `make test`
def test_train_step_with_remat_equals_the_step_without():
  """The ablation's program at toy size (tiny latent DiT, the release's tiny MAE):
  Adam's first moment after one step is (1 - b1) g, the gradient."""
  loss_ref, grad_ref = _one_step("none", "none")
  assert np.isfinite(loss_ref)
  for model_policy, feature_policy in (("full", "dots"), ("dots", "full")):
    loss, grad = _one_step(model_policy, feature_policy)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    _assert_close_grads(grad, grad_ref)
