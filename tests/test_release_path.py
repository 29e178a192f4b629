"""The release's path as one piece: MAE feature groups, CFG and unconditional negatives.

Each piece has its own tests; these check that they work together as
`configs/mnist_mae.py` wires them (issue #14): every feature group passes gradient
to the generator, the negatives' weights make the negative KDE the guidance mixture
the release's formula promises, and a few trainer steps run end to end on the digits.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange

from configs import mnist_mae
from drifting_jax import losses
from drifting_jax.models import features, generator as generator_lib, mae
from drifting_jax.train import mae_pretrain, train_step, trainer


@pytest.fixture(scope="module")
def smoke():
  config = mnist_mae.get_config("smoke")
  mae_module = mae.build_module(mae_pretrain.model_config(config))
  # Both initialisations jitted: one compiled program each, not op-by-op dispatch (~15 s less).
  mae_params = jax.jit(lambda key: mae.init_params(mae_module, key, (28, 28, 1)))(jax.random.key(0))
  feature_fn = features.mae_features(mae_module, mae_params, include_input=config.feature.include_input,
                                     **config.feature.activation_kwargs.to_dict())
  gen_module = generator_lib.build_module(generator_lib.model_config_from_run(config))
  args, kwargs = generator_lib.example_inputs(generator_lib.model_config_from_run(config), batch_size=2)
  gen_params = jax.jit(lambda rngs, a, kw: gen_module.init(rngs, *a, **kw))(
      {"params": jax.random.key(1), "noise": jax.random.key(2)}, args, kwargs)["params"]
  return config, mae_module, mae_params, feature_fn, gen_module, gen_params


@functools.partial(jax.jit, static_argnums=(1, 2))  # one program, not a compile per leaf shape
def _perturbed(params, scale: float, seed: int):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


@pytest.mark.e2e
@pytest.mark.slow
def test_every_feature_group_passes_gradient_to_the_generator(smoke):
  config, _, _, feature_fn, gen_module, gen_params = smoke
  t = config.train
  classes, cg, cp, cn = 2, t.gen_per_class, t.pos_per_class, t.neg_per_class
  rng = np.random.default_rng(0)
  labels = jnp.asarray([3, 7])
  positives = jnp.asarray(rng.uniform(-1, 1, (classes * cp, 28, 28, 1)), jnp.float32)
  negatives = jnp.asarray(rng.uniform(-1, 1, (classes * cn, 28, 28, 1)), jnp.float32)
  alpha = jnp.asarray([1.5, 3.0])
  weight_neg = jnp.repeat(train_step.unconditional_weight(alpha, cg, cn)[:, None], cn, axis=1)
  split = lambda f, k: {n: rearrange(v, "(b k) t d -> b k t d", k=k) for n, v in f.items()}
  extract = jax.jit(feature_fn.apply)  # compiled once per batch size, not op by op (~20 s less)
  pos_feats = split(extract(feature_fn.params, positives), cp)
  neg_feats = split(extract(feature_fn.params, negatives), cn)
  names = sorted(pos_feats)
  # The release's groups: the raw sample, the input RMS, and stem/stage maps with their statistics.
  assert {"global", "norm_x", "conv1", "layer1", "layer4_mean", "layer2_std_2"} <= set(names)

  def group_losses(params):
    samples = gen_module.apply({"params": params}, jnp.repeat(labels, cg), jnp.repeat(alpha, cg),
                               rngs={"noise": jax.random.key(3)})["samples"]
    gen_feats = split(feature_fn(feature_fn.params, samples), cg)
    return jnp.stack([jnp.mean(losses.log_kde_loss(
        gen_feats[n], pos_feats[n], neg_feats[n], None, None, weight_neg, kernel=config.loss.kernel,
        bandwidths=tuple(config.loss.bandwidths), normalize_distances=True, normalize_gradients=True)[0])
        for n in names])

  @jax.jit
  def gradient_norms(params):
    """|d loss_g / d params| for every group g: one backward pass per group."""
    values, vjp = jax.vjp(group_losses, params)
    grads = jax.vmap(vjp)(jnp.eye(len(names)))[0]
    squares = [jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads)]
    return values, jnp.sqrt(sum(squares))

  # At initialization the DiT's zero-initialised output layer makes every sample exactly
  # 0, where the MAE's ReLUs and the input RMS have zero derivative: only the raw
  # sample ("global", which the release always adds) moves the generator off that point.
  _, norms = gradient_norms(gen_params)
  assert [n for n, v in zip(names, np.asarray(norms)) if v > 0] == ["global"]

  values, norms = gradient_norms(_perturbed(gen_params, 0.05, seed=4))
  assert np.all(np.isfinite(np.asarray(values))) and np.all(np.isfinite(np.asarray(norms)))
  # Groups that do not depend on the input carry nothing: the std over a 1x1 map.
  x1, x2 = (jnp.asarray(rng.uniform(-1, 1, (2, 28, 28, 1)), jnp.float32) for _ in range(2))
  f1, f2 = extract(feature_fn.params, x1), extract(feature_fn.params, x2)
  constant = sorted(n for n in names if np.array_equal(np.asarray(f1[n]), np.asarray(f2[n])))
  assert constant == ["layer4_std"]  # layer4 is 1x1 here: 28 / 4 (input patches) / 2 / 2 / 2
  dead = [n for n, v in zip(names, np.asarray(norms)) if n not in constant and not v > 1e-8]
  assert not dead, f"no gradient reaches the generator through {dead}"


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 4.0])
def test_negative_weights_make_the_guidance_mixture(alpha):
  """With weights (alpha - 1)(Cg - 1)/Cn, the generated samples are 1/alpha of q's mass (self excluded)."""
  cg, cn = 32, 16
  w = float(train_step.unconditional_weight(jnp.float32(alpha), cg, cn))
  generated_mass, negative_mass = cg - 1, cn * w
  assert generated_mass / (generated_mass + negative_mass) == pytest.approx(1.0 / alpha, rel=1e-6)
  # The loss sees the same: at alpha = 1 the negatives weigh nothing and change nothing.
  rng = np.random.default_rng(0)
  gen, pos, neg = (jnp.asarray(rng.normal(size=(1, n, 6)), jnp.float32) for n in (cg, 24, cn))
  loss = jax.jit(lambda *a: losses.log_kde_loss(*a, kernel="laplace", bandwidths=(0.2,))[0])  # one program, not op by op
  with_neg = loss(gen, pos, neg, None, None, jnp.full((1, cn), w))
  without = loss(gen, pos)
  if alpha == 1.0:
    np.testing.assert_allclose(np.asarray(with_neg), np.asarray(without), rtol=1e-6)
  else:
    assert not np.allclose(np.asarray(with_neg), np.asarray(without))


@pytest.mark.e2e
@pytest.mark.slow
def test_trainer_runs_the_release_path_on_digits(smoke, tmp_path):
  config, mae_module, mae_params, *_ = smoke
  artifact = tmp_path / "mae"
  mae_pretrain.write_artifact(artifact, mae_module, mae_params, 0, config)
  config.feature.mae_path = str(artifact)
  config.train.total_steps = 3
  config.checkpoint.every_steps = 3
  state = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.step) == 3
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  steps = [m for m in logged if "loss" in m]
  assert steps and all(np.isfinite(m["loss"]) for m in steps)
  # CFG is on: alpha is drawn in [cfg_min, cfg_max] (not all 1).
  assert all(1.0 <= m["cfg_mean"] <= 4.0 for m in steps) and any(m["cfg_mean"] > 1.0 for m in steps)
  # Every feature group contributes a loss term, the raw sample included.
  groups = {k.split("/", 1)[1] for k in steps[-1] if "/" in k}
  assert {"global", "norm_x", "conv1", "layer4"} <= groups
