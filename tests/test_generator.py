"""DiT generator: release compatibility (tree, numerics, noise), precision, sharding, remat, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from drifting_jax.models import generator as G
from drifting_jax.models import layers


def _flat_shapes(tree):
  return {k: list(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _abstract_params(model_config, batch_size=2):
  module = G.build_module(model_config)
  args, kwargs = G.example_inputs(model_config, batch_size)
  return jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, *args, **kwargs))["params"]


@pytest.fixture(scope="module")
def official_tiny(fixtures_dir):
  folder = fixtures_dir / "official_tiny" / "generator"
  config = json.loads((folder / "metadata.json").read_text())["model_config"]
  params = serialization.msgpack_restore((folder / "ema_params.msgpack").read_bytes())
  io = dict(np.load(folder / "io.npz"))
  return config, params, io


def _fixed_noise(io):
  return {"x": io["noise_x"], "noise_labels": io["noise_labels"]}


# ----------------------------------------------------------------------------- release compatibility


def test_param_tree_matches_release_latent_ablation(fixtures_dir):
  reference = json.loads((fixtures_dir / "official_model_trees.json").read_text())["generator_latent_ablation"]
  abstract = _abstract_params(reference["model_config"])
  assert _flat_shapes(abstract) == reference["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  # The named DiT-B/2 size is exactly the release's ablation generator.
  assert G.model_config_for("DiT-B/2") == reference["model_config"]
  out = jax.eval_shape(
      lambda p: G.build_module(reference["model_config"]).apply(
          {"params": p}, jnp.zeros((2,), jnp.int32), 1.0, rngs={"noise": jax.random.key(0)}), abstract)
  assert list(out["samples"].shape) == reference["output_shape_for_batch_2"]


def test_reproduces_release_samples(official_tiny):
  config, params, io = official_tiny
  module = G.build_module(config)
  samples = G.sample(module, params, io["labels"], io["cfg_scale"], noise=_fixed_noise(io))
  assert samples.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(samples), io["samples"], atol=1e-5, rtol=0)
  # Guard against a vacuous pass: the reference output is far from zero.
  assert np.abs(io["samples"]).max() > 0.5


def test_noise_draw_matches_release(official_tiny):
  config, params, io = official_tiny
  module = G.build_module(config)
  key = jnp.asarray(io["noise_rng_key"], jnp.uint32)
  noise = G.draw_noise(module, key, batch_size=4)
  np.testing.assert_array_equal(np.asarray(noise["x"]), io["noise_x"])
  np.testing.assert_array_equal(np.asarray(noise["noise_labels"]), io["noise_labels"])
  # The module's own draw (rng only) gives the same noise, hence the same samples.
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(io["labels"]), jnp.asarray(io["cfg_scale"]),
                              rngs={"noise": key})
  np.testing.assert_array_equal(np.asarray(out["noise"]["x"]), io["noise_x"])
  np.testing.assert_allclose(np.asarray(out["samples"]), io["samples"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(G.sample(module, params, io["labels"], io["cfg_scale"], rng=key)),
                             io["samples"], atol=1e-5, rtol=0)


def test_noise_temperature_scales_only_the_gaussian_noise(official_tiny):
  """temperature t: the release's draw with its Gaussian `x` times t and the same style labels."""
  config, params, io = official_tiny
  module = G.build_module(config)
  key = jnp.asarray(io["noise_rng_key"], jnp.uint32)
  for t in (0.0, 0.5):
    scaled = {"x": io["noise_x"] * t, "noise_labels": io["noise_labels"]}
    expected = np.asarray(G.sample(module, params, io["labels"], io["cfg_scale"], noise=scaled))
    np.testing.assert_allclose(np.asarray(G.sample(module, params, io["labels"], io["cfg_scale"], rng=key,
                                                   temperature=t)), expected, atol=1e-6, rtol=0)
    # Not vacuous: the noise reaches the output, so the scale changes the samples.
    assert np.abs(expected - io["samples"]).max() > 1e-3


def test_conditioning_changes_output(official_tiny):
  """Each conditioning input (label, cfg scale, style labels) reaches the output."""
  config, params, io = official_tiny
  module = G.build_module(config)
  base = np.asarray(G.sample(module, params, io["labels"], io["cfg_scale"], noise=_fixed_noise(io)))
  other_labels = (io["labels"] + 1) % config["num_classes"]
  for labels, cfg, noise in [
      (other_labels, io["cfg_scale"], _fixed_noise(io)),
      (io["labels"], io["cfg_scale"] + 0.5, _fixed_noise(io)),
      (io["labels"], io["cfg_scale"], {"x": io["noise_x"], "noise_labels": (io["noise_labels"] + 1) % 8}),
  ]:
    changed = np.asarray(G.sample(module, params, labels, cfg, noise=noise))
    per_sample = np.abs(changed - base).max(axis=(1, 2, 3))
    # fp32 round-off is ~1e-6 here; the CFG path is weak by design (weight 0.02).
    assert (per_sample > 1e-4).all(), per_sample


def test_fresh_init_outputs_zero():
  """adaLN-zero: the final projection starts at zero, so a fresh generator outputs 0."""
  config = G.model_config_for("tiny", depth=1)
  module = G.build_module(config)
  args, kwargs = G.example_inputs(config, 3)
  params = jax.jit(module.init)({"params": jax.random.key(1)}, *args, **kwargs)["params"]
  out = jax.jit(module.apply)({"params": params}, jnp.array([0, 5, 10]), 2.0, rngs={"noise": jax.random.key(2)})["samples"]
  assert out.shape == (3, 28, 28, 1)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name, image_shape, hidden, depth", [
    ("DiT-S/2", (32, 32, 4), 384, 12),
    ("DiT-B/2", (32, 32, 4), 768, 12),
    ("DiT-L/2", (32, 32, 4), 1024, 24),
    ("mnist-DiT-S/2", (28, 28, 1), 384, 12),
    ("tiny", (28, 28, 1), 128, 4),
])
def test_named_configs_build(name, image_shape, hidden, depth):
  config = G.model_config_for(name)
  abstract = _abstract_params(config)
  shapes = _flat_shapes(abstract)
  assert sum(f"LightningDiT_0/blocks_{i}/RMSNorm_0/weight" in shapes for i in range(depth + 1)) == depth
  patch = config["patch_size"]
  num_patches = (image_shape[0] // patch) ** 2
  assert shapes["LightningDiT_0/pos_embed"] == [1, num_patches, hidden]
  assert shapes["LightningDiT_0/TorchLinear_0/Dense_0/kernel"] == [patch * patch * image_shape[2], hidden]
  module = G.build_module(config)
  out = jax.eval_shape(lambda p: module.apply({"params": p}, jnp.zeros((2,), jnp.int32), 1.0,
                                              rngs={"noise": jax.random.key(0)}), abstract)
  assert out["samples"].shape == (2,) + image_shape


def test_plain_dit_variant_tree():
  """LayerNorm / GELU-MLP / no-RoPE / no-style branches: the layout the release uses for them."""
  config = G.model_config_for("tiny", depth=1, use_rmsnorm=False, use_swiglu=False, use_rope=False,
                              noise_classes=0, n_cls_tokens=0)
  shapes = _flat_shapes(_abstract_params(config))
  block = "LightningDiT_0/blocks_0/"
  assert shapes[block + "Attention_0/q_norm/scale"] == [32] and shapes[block + "Attention_0/k_norm/bias"] == [32]
  assert shapes[block + "StandardMLP_0/TorchLinear_0/Dense_0/kernel"] == [128, 512]
  assert shapes[block + "StandardMLP_0/TorchLinear_1/Dense_0/kernel"] == [512, 128]
  assert not [k for k in shapes if "noise_embeds" in k or "cls_embed" in k or k.startswith(block + "RMSNorm")]
  module = G.build_module(config)
  out = jax.jit(module.apply)({"params": jax.tree.map(jnp.ones_like, _abstract_params(config))},
                              jnp.array([1, 2]), 1.0, rngs={"noise": jax.random.key(0)})
  assert out["samples"].shape == (2, 28, 28, 1) and np.isfinite(np.asarray(out["samples"])).all()
  assert out["noise"]["noise_labels"].shape == (2, 8) and not np.asarray(out["noise"]["noise_labels"]).any()


def test_condition_method(official_tiny):
  """The conditioning is usable on its own; the style labels enter it additively."""
  config, params, io = official_tiny
  module = G.build_module(config)
  labels, cfg = jnp.asarray(io["labels"]), jnp.asarray(io["cfg_scale"])
  style = jnp.asarray(io["noise_labels"])
  cond = module.apply({"params": params}, labels, cfg, style, method=G.DiTGenerator.condition)
  shifted = module.apply({"params": params}, labels, cfg, style.at[:, 0].set((style[:, 0] + 1) % 8),
                         method=G.DiTGenerator.condition)
  table = params["noise_embeds_0"]["embedding"]
  np.testing.assert_allclose(shifted - cond, table[(style[:, 0] + 1) % 8] - table[style[:, 0]], atol=1e-6)
  assert cond.shape == (4, config["cond_dim"])


def test_mnist_config_matches_paper_settings():
  config = G.model_config_for("mnist-DiT-S/2")
  assert (config["num_classes"], config["n_cls_tokens"], config["noise_coords"]) == (11, 8, 32)
  assert (config["hidden_size"], config["depth"], config["patch_size"]) == (384, 12, 2)
  assert G.model_config_for("tiny", depth=2)["depth"] == 2


def test_config_errors():
  with pytest.raises(ValueError, match=r"known names: \[.*'DiT-B/2'.*'tiny'"):
    G.model_config_for("DiT-XXL/2")
  with pytest.raises(ValueError, match="unknown generator config keys \\['depht'\\]"):
    G.model_config_for("tiny", depht=3)
  with pytest.raises(ValueError, match="unknown generator config keys"):
    G.build_module({"cond_dim": 8, "bogus": 1})
  with pytest.raises(ValueError, match="not a multiple of num_heads"):
    G.build_module(G.model_config_for("tiny", num_heads=3))
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    G.build_module(G.model_config_for("tiny", patch_size=5))


# ----------------------------------------------------------------------------- precision, sharding, remat


@pytest.mark.slow
def test_bf16_forward_close_to_fp32(official_tiny):
  config, params, io = official_tiny
  fp32 = G.build_module({**config, "use_bf16": False})
  bf16 = G.build_module({**config, "use_bf16": True})
  args = (jnp.asarray(io["labels"]), jnp.asarray(io["cfg_scale"]))
  out32 = fp32.apply({"params": params}, *args, noise=_fixed_noise(io))["samples"]
  out16 = bf16.apply({"params": params}, *args, noise=_fixed_noise(io))["samples"]
  assert out32.dtype == jnp.float32 and out16.dtype == jnp.bfloat16
  diff = np.abs(np.asarray(out16, np.float32) - np.asarray(out32))
  scale = np.abs(np.asarray(out32)).max()
  # bf16 has an 8-bit mantissa (~4e-3 relative); two blocks accumulate a few ulps.
  assert diff.max() < 3e-2 * scale, diff.max() / scale
  assert diff.max() > 0  # it really ran in bf16


@pytest.mark.slow
def test_sharded_forward_equals_single_device(official_tiny):
  config, params, io = official_tiny
  module = G.build_module(config)
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.array(devices), ("data",))
  batch = 16
  labels = jnp.arange(batch, dtype=jnp.int32) % config["num_classes"]
  cfg = jnp.linspace(1.0, 4.0, batch)
  noise = G.draw_noise(module, jax.random.key(3), batch)
  forward = jax.jit(lambda p, l, c, n: module.apply({"params": p}, l, c, noise=n)["samples"])
  expected = forward(params, labels, cfg, noise)

  replicated = NamedSharding(mesh, P())
  by_batch = NamedSharding(mesh, P("data"))
  sharded_params = jax.device_put(params, replicated)
  sharded_inputs = jax.device_put((labels, cfg, noise), by_batch)
  got = forward(sharded_params, *sharded_inputs)
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6, rtol=0)

  # Drawing the noise inside the jitted call from a key gives the same noise on a mesh.
  draw_and_run = jax.jit(lambda p, l, c, k: module.apply({"params": p}, l, c, rngs={"noise": k}))
  single = draw_and_run(params, labels, cfg, jax.random.key(3))
  multi = draw_and_run(sharded_params, sharded_inputs[0], sharded_inputs[1], jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(multi["noise"]["x"]), np.asarray(noise["x"]))
  np.testing.assert_allclose(np.asarray(multi["samples"]), np.asarray(single["samples"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("flag", ["remat", "use_remat"])
@pytest.mark.slow
def test_remat_same_params_outputs_and_gradients(official_tiny, flag):
  config, params, io = official_tiny
  plain, remat = G.build_module(config), G.build_module({**config, flag: True})
  assert _flat_shapes(_abstract_params({**config, flag: True})) == _flat_shapes(params)
  labels, cfg = jnp.asarray(io["labels"]), jnp.asarray(io["cfg_scale"])

  def loss(module, p):
    samples = module.apply({"params": p}, labels, cfg, noise=_fixed_noise(io))["samples"]
    return jnp.sum(samples * jnp.sin(samples))

  loss_plain, grad_plain = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  loss_remat, grad_remat = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
  np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
  for (path, g_plain), g_remat in zip(traverse_util.flatten_dict(grad_plain, sep="/").items(),
                                      traverse_util.flatten_dict(grad_remat, sep="/").values()):
    np.testing.assert_allclose(g_remat, g_plain, atol=1e-6, rtol=1e-5, err_msg=path)
  assert np.abs(grad_plain["LightningDiT_0"]["blocks_0"]["Attention_0"]["TorchLinear_0"]["Dense_0"]["kernel"]
                ).max() > 0


def test_gradient_matches_finite_difference(official_tiny):
  """d(loss)/d(cfg-norm weight) from autodiff agrees with a central difference (fp32)."""
  config, params, io = official_tiny
  module = G.build_module(config)
  labels, cfg = jnp.asarray(io["labels"]), jnp.asarray(io["cfg_scale"])
  direction = jax.random.normal(jax.random.key(4), params["RMSNorm_0"]["weight"].shape)

  def loss(t):
    p = {**params, "RMSNorm_0": {"weight": params["RMSNorm_0"]["weight"] + t * direction}}
    samples = module.apply({"params": p}, labels, cfg, noise=_fixed_noise(io))["samples"]
    return jnp.sum(samples ** 2)

  auto = jax.jit(jax.grad(loss))(0.0)
  eps = 1e-2
  numeric = float(jnp.diff(jax.jit(jax.vmap(loss))(jnp.array([-eps, eps])))[0]) / (2 * eps)
  np.testing.assert_allclose(auto, numeric, rtol=2e-3)
  assert abs(float(auto)) > 1e-4


# ----------------------------------------------------------------------------- input errors


def test_input_errors(official_tiny):
  config, params, io = official_tiny
  module = G.build_module(config)
  noise = _fixed_noise(io)
  with pytest.raises(ValueError, match=r"1-D array of class ids.*\(4, 1\)"):
    G.sample(module, params, io["labels"][:, None], 1.0, noise=noise)
  with pytest.raises(ValueError, match="must be integers"):
    G.sample(module, params, io["labels"].astype(np.float32), 1.0, noise=noise)
  with pytest.raises(ValueError, match=r"class ids must lie in \[0, 11\).*\[-1, 11\]"):
    G.sample(module, params, np.array([0, 11, -1, 3]), 1.0, noise=noise)
  with pytest.raises(ValueError, match=r"cfg_scale must be a scalar or have shape \[batch\]=\(4,\)"):
    G.sample(module, params, io["labels"], np.ones(3), noise=noise)
  with pytest.raises(ValueError, match="exactly one of rng= .* or noise="):
    G.sample(module, params, io["labels"], 1.0)
  with pytest.raises(ValueError, match="exactly one of rng="):
    G.sample(module, params, io["labels"], 1.0, rng=jax.random.key(0), noise=noise)
  with pytest.raises(ValueError, match=r"noise\['x'\] must have shape \(4, 8, 8, 4\)"):
    G.sample(module, params, io["labels"], 1.0, noise={**noise, "x": io["noise_x"][:, :4]})
  with pytest.raises(ValueError, match=r"noise\['noise_labels'\] must lie in \[0, 8\)"):
    G.sample(module, params, io["labels"], 1.0, noise={**noise, "noise_labels": noise["noise_labels"] + 8})
  with pytest.raises(ValueError, match="keys 'x' and 'noise_labels'"):
    G.sample(module, params, io["labels"], 1.0, noise={"x": io["noise_x"]})
  with pytest.raises(ValueError, match="temperature= scales drawn noise"):
    G.sample(module, params, io["labels"], 1.0, noise=noise, temperature=0.5)
  for bad in (-0.5, float("nan")):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
      G.sample(module, params, io["labels"], 1.0, rng=jax.random.key(0), temperature=bad)
  # Direct module.apply checks too (shape errors are static, so they hold under jit).
  with pytest.raises(ValueError, match="cfg_scale must be a scalar"):
    jax.jit(lambda l: module.apply({"params": params}, l, jnp.ones((2,)), noise=noise))(jnp.asarray(io["labels"]))


def test_out_of_range_label_under_jit_gives_nan(official_tiny):
  """Documented behaviour: under jit values cannot be checked; the bad sample is NaN."""
  config, params, io = official_tiny
  module = G.build_module(config)
  forward = jax.jit(lambda l: module.apply({"params": params}, l, 1.0, noise=_fixed_noise(io))["samples"])
  out = np.asarray(forward(jnp.array([0, 1, 11, 2])))
  assert np.isnan(out[2]).all()
  assert np.isfinite(out[[0, 1, 3]]).all()


# ----------------------------------------------------------------------------- layers


def test_sincos_2d_closed_form():
  dim, grid = 8, 3
  table = layers.sincos_2d(dim, grid)
  assert table.shape == (grid * grid, dim)
  quarter = dim // 4
  freqs = 10000.0 ** (-np.arange(quarter) / quarter)
  for row in range(grid):
    for col in range(grid):
      expect = np.concatenate([np.sin(col * freqs), np.cos(col * freqs), np.sin(row * freqs), np.cos(row * freqs)])
      np.testing.assert_allclose(table[row * grid + col], expect, atol=1e-12)


def test_rope_preserves_norm_and_depends_on_offset_only():
  q, k = jax.random.normal(jax.random.key(5), (2, 1, 1, 1, 8))
  # Place the same q at every position and the same k at every position.
  tokens = 6
  q_seq, k_seq = jnp.tile(q, (1, tokens, 1, 1)), jnp.tile(k, (1, tokens, 1, 1))
  q_rot, k_rot = layers.apply_rope(q_seq, k_seq)
  np.testing.assert_allclose(jnp.linalg.norm(q_rot, axis=-1), jnp.linalg.norm(q_seq, axis=-1), rtol=1e-6)
  scores = np.asarray(jnp.einsum("bnhd,bmhd->nm", q_rot, k_rot))
  for offset in range(-2, 3):
    diagonal = np.diagonal(scores, offset)
    np.testing.assert_allclose(diagonal, diagonal[0], atol=1e-5)
  assert abs(scores[0, 0] - scores[0, 1]) > 1e-4
  # Position 0 is not rotated.
  np.testing.assert_allclose(q_rot[:, 0], q_seq[:, 0], atol=1e-7)


def test_rmsnorm_closed_form():
  x = jax.random.normal(jax.random.key(6), (3, 5)) * 4.0
  norm = layers.RMSNorm()
  variables = norm.init(jax.random.key(0), x)
  weight = jnp.arange(1.0, 6.0)
  y = norm.apply({"params": {"weight": weight}}, x)
  expect = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, axis=-1, keepdims=True) + 1e-6) * np.arange(1, 6)
  np.testing.assert_allclose(y, expect, rtol=1e-5)
  assert variables["params"]["weight"].shape == (5,)
