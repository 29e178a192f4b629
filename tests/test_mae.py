"""Latent MAE: release compatibility (tree, activations), precision, pretraining, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import imagenet_mae_latent_256
from drifting_jax.models import artifacts, mae
from drifting_jax import checkpointing
from drifting_jax.train import data as train_data, mae_pretrain

pytestmark = pytest.mark.slow  # MAE pretraining runs


def _flat_shapes(tree):
  return {k: list(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.fixture(scope="module")
def reference_256(fixtures_dir):
  return json.loads((fixtures_dir / "official_model_trees.json").read_text())["mae_latent_ablation_256"]


@pytest.fixture(scope="module")
def official_tiny(fixtures_dir):
  folder = fixtures_dir / "official_tiny" / "mae"
  module, params, metadata = artifacts.load(folder, kind="mae")
  kwargs = json.loads((folder / "activation_kwargs.json").read_text())
  io = dict(np.load(folder / "io.npz"))
  return module, params, kwargs, io


def _jit_activations(module, **kwargs):
  return jax.jit(lambda params, x: mae.activations(module, params, x, **kwargs))


@pytest.fixture(scope="module")
def tiny_fp32_activations(official_tiny):
  module, params, kwargs, io = official_tiny
  return _jit_activations(module, **kwargs)(params, io["x"])


# ----------------------------------------------------------------------------- release compatibility


def test_param_tree_matches_release_mae_256(reference_256):
  """The 431M-parameter MAE is checked from shapes alone (nothing allocated)."""
  abstract = artifacts.abstract_params("mae", reference_256["model_config"])
  assert _flat_shapes(abstract) == reference_256["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  assert sum(int(np.prod(shape)) for shape in reference_256["params"].values()) > 400_000_000
  # No batch statistics or other collections, as in the release.
  module = mae.build_module(reference_256["model_config"])
  args, kwargs = mae.example_inputs(reference_256["model_config"], 1)
  variables = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, *args, **kwargs))
  assert sorted(variables) == ["params"] and reference_256["non_param_collections"] == []
  # The named size and the pretraining config are exactly the release's MAE-256.
  assert mae.model_config_for("latent-256") == {**reference_256["model_config"], "layers": (3, 4, 6, 3)}
  config = imagenet_mae_latent_256.get_config()
  assert mae_pretrain.model_config(config) == mae.model_config_for("latent-256")


def test_activation_names_and_shapes_match_release_256(reference_256):
  abstract = artifacts.abstract_params("mae", reference_256["model_config"])
  module = mae.build_module(reference_256["model_config"])
  kwargs = dict(patch_mean_size=[2, 4], patch_std_size=[2, 4], use_mean=True, use_std=True, every_k_block=2)
  out = jax.eval_shape(lambda p: mae.activations(module, p, jnp.zeros((2, 32, 32, 4)), **kwargs), abstract)
  assert {k: list(v.shape) for k, v in out.items()} == reference_256["activations_for_2x32x32x4"]
  assert {v.dtype for v in out.values()} == {jnp.dtype(jnp.float32)}


def test_reproduces_release_activations(official_tiny, tiny_fp32_activations):
  module, _, _, io = official_tiny
  assert isinstance(module, mae.MAEResNet) and not module.use_bf16
  out = tiny_fp32_activations
  expected = {k[len("act__"):]: v for k, v in io.items() if k.startswith("act__")}
  assert sorted(out) == sorted(expected)
  worst = 0.0
  for name, want in expected.items():
    got = np.asarray(out[name])
    assert got.shape == want.shape and got.dtype == np.float32, name
    # Relative to the map a summary is taken of (layer1_mean is ~0: the per-channel
    # mean of a map GroupNorm'd per channel is its zero bias).
    base = name.split("_mean")[0].split("_std")[0]
    scale = max(np.abs(want).max(), np.abs(expected[base]).max())
    assert scale > 0.1, name  # a vacuous reference would pass anything
    error = np.abs(got - want).max() / scale
    worst = max(worst, error)
    assert error < 1e-5, (name, error)
  print(f"worst relative error vs the release: {worst:.2e}")


def test_activation_options(official_tiny):
  """Block features are optional; patch sizes that do not tile a map are skipped."""
  module, params, _, io = official_tiny
  x = io["x"][:1]
  shapes = lambda **kw: {k: v.shape for k, v in jax.eval_shape(
      lambda p: mae.activations(module, p, x, **kw), params).items()}
  for no_blocks in (None, float("inf"), 0):
    assert not any("_blk" in k for k in shapes(every_k_block=no_blocks))
  plain = shapes(patch_mean_size=None, patch_std_size=[], use_mean=False, use_std=False, every_k_block=None)
  assert sorted(plain) == ["conv1", "layer1", "layer2", "layer3", "layer4", "norm_x"]
  # 16x16 input: layer4 is 2x2, so it has 2x2 but no 4x4 patch statistics.
  full = shapes(patch_mean_size=[2, 4], patch_std_size=[4], every_k_block=1)
  assert full["layer4_mean_2"] == (1, 1, 256) and "layer4_mean_4" not in full and "layer4_std_2" not in full
  assert full["conv1_std_4"] == (1, 16, 32) and full["layer1_blk1"] == (1, 256, 32)


def test_bf16_activations_close_to_fp32(official_tiny, tiny_fp32_activations):
  module, params, kwargs, io = official_tiny
  fp32 = tiny_fp32_activations
  bf16 = _jit_activations(module.clone(use_bf16=True), **kwargs)(params, io["x"])
  largest = 0.0
  for name, ref in fp32.items():
    assert bf16[name].dtype == jnp.float32
    diff = np.asarray(bf16[name]) - np.asarray(ref)
    # Summaries are compared at the scale of the map they summarise (a GroupNorm'd
    # map's per-channel mean is ~0 in fp32 and only bf16 round-off in bf16).
    base = name.split("_mean")[0].split("_std")[0]
    scale = max(np.sqrt(np.mean(np.square(ref))), np.sqrt(np.mean(np.square(fp32[base]))))
    relative = np.sqrt(np.mean(np.square(diff))) / scale
    assert relative < 3e-2, (name, relative)
    largest = max(largest, np.abs(diff).max())
  assert largest > 1e-4  # bf16 was really used


# ----------------------------------------------------------------------------- pretraining


def test_masking_hides_squares_at_the_drawn_ratio():
  draw = jax.jit(mae.draw_mask, static_argnums=(1, 2, 3, 4, 5))
  mask = np.asarray(draw(jax.random.key(0), 64, (16, 16), 2, 0.25, 0.75))
  assert mask.shape == (64, 16, 16, 1) and set(np.unique(mask)) == {0.0, 1.0}
  squares = mask[..., 0].reshape(64, 8, 2, 8, 2)
  assert (squares == squares[:, :, :1, :, :1]).all()  # whole 2x2 squares
  per_sample = mask.mean(axis=(1, 2, 3))
  assert 0.1 < per_sample.min() and per_sample.max() < 0.9 and per_sample.std() > 0.05
  fixed = np.asarray(draw(jax.random.key(1), 256, (16, 16), 4, 0.5, 0.5))
  assert abs(fixed.mean() - 0.5) < 0.03


def test_hidden_cells_do_not_reach_the_encoder(official_tiny):
  """Changing hidden cells leaves the reconstruction unchanged; visible cells do not."""
  module, params, _, io = official_tiny
  x = jnp.asarray(io["x"])
  mask = mae.draw_mask(jax.random.key(3), x.shape[0], x.shape[1:3], module.patch_size, 0.5, 0.5)
  delta = 5.0 * jax.random.normal(jax.random.key(4), x.shape)
  forward = jax.jit(lambda x: module.apply({"params": params}, x, mask)["reconstruction"])
  base = forward(x)
  assert base.shape == x.shape
  np.testing.assert_array_equal(np.asarray(forward(x + delta * mask)), np.asarray(base))
  assert np.abs(np.asarray(forward(x + delta * (1 - mask))) - np.asarray(base)).max() > 1e-2


  # The loss scores hidden cells only (squared error summed over channels, averaged
  # over hidden cells) and mixes in the class head's cross-entropy by lambda_cls.
  outputs = {"reconstruction": base, "logits": jnp.asarray([[0.0, 1.0] + [0.0] * 8] * 3)}
  labels = np.array([1, 0, 9])
  _, recon_only = mae.masked_loss(outputs, x + delta * (1 - mask), mask, labels, 0.0)
  hidden = np.asarray(mask)[..., 0] > 0
  error = np.square(np.asarray(base) - io["x"]).sum(-1)
  expected = np.mean([error[i][hidden[i]].mean() for i in range(3)])
  np.testing.assert_allclose(recon_only["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(recon_only["recon_loss"], expected, rtol=1e-5)
  cross_entropy = np.log(9 + np.e) - np.array([1.0, 0.0, 0.0])
  _, mixed = mae.masked_loss(outputs, x, mask, labels, 0.25)
  np.testing.assert_allclose(mixed["cls_loss"], cross_entropy.mean(), rtol=1e-5)
  np.testing.assert_allclose(mixed["loss"], 0.25 * cross_entropy.mean() + 0.75 * expected, rtol=1e-5)
  assert float(mixed["accuracy"]) == pytest.approx(1 / 3)
  assert float(mixed["mask_ratio"]) == pytest.approx(hidden.mean())


def _synthetic_latents(n=16, side=16, num_classes=10, seed=0):
  """Smooth, class-dependent 4-channel fields plus a little noise (learnable quickly)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
  labels = np.arange(n) % num_classes
  phase = rng.uniform(0, np.pi, size=(n, 1, 1))
  samples = np.stack([np.sin(3 * xx + phase), np.cos(2 * yy - phase), xx * yy * (1 + labels[:, None, None] / 5),
                      np.sin(xx + yy + 2 * phase)], axis=-1)
  samples = samples + 0.05 * rng.normal(size=samples.shape)
  return train_data.TrainingData(samples.astype(np.float32), labels.astype(np.int32), num_classes, seed=0)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One short pretraining job on synthetic latents (shared: compiling it dominates)."""
  config = imagenet_mae_latent_256.get_config("smoke")
  config.mae.total_steps = 10
  config.mae.save_every = 10
  config.mae.learning_rate = 2e-3
  workdir = tmp_path_factory.mktemp("mae_run")
  patch = pytest.MonkeyPatch()
  patch.setattr(train_data, "load_training_data", lambda c: _synthetic_latents())
  try:
    path = mae_pretrain.train_mae(config, str(workdir))
  finally:
    patch.undo()
  return config, workdir, path


@pytest.mark.e2e
def test_pretraining_loss_decreases(smoke_run):
  _, workdir, _ = smoke_run
  lines = [json.loads(l) for l in (workdir / "mae_pretrain" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == list(range(1, 11))
  losses = np.array([l["loss"] for l in lines])
  assert np.isfinite(losses).all()
  assert losses[-3:].mean() < 0.7 * losses[0], losses
  assert all(0.3 < l["mask_ratio"] < 0.7 and l["lambda_cls"] == 0.0 for l in lines)
  # fp32 schedule values: warmup from 1e-6 over one step, then the peak.
  assert lines[0]["learning_rate"] == pytest.approx(1e-6, rel=1e-4)
  assert lines[-1]["learning_rate"] == pytest.approx(2e-3, rel=1e-4)


@pytest.mark.e2e
def test_train_mae_writes_a_loadable_artifact(smoke_run):
  config, workdir, path = smoke_run
  assert path == workdir / "mae"
  module, params, metadata = artifacts.load(path, kind="mae")
  assert module == mae.build_module(mae_pretrain.model_config(config))
  assert metadata["kind"] == "mae" and metadata["step"] == 10 and metadata["ema_decay"] == 0.5
  assert metadata["model_config"]["in_channels"] == 4 and metadata["model_config"]["num_classes"] == 10
  assert checkpointing.Checkpointer(workdir / "mae_pretrain", async_save=False).latest_step() == 10
  # What a generator config's feature.mae_path gets (features computed from this artifact).
  shapes = jax.eval_shape(lambda p: mae.activations(module, p, jnp.zeros((2, 16, 16, 4))), params)
  assert shapes["layer2"].shape == (2, 64, 64) and "layer3_blk1" not in shapes


def test_batches_are_deterministic_epochs():
  data = _synthetic_latents(n=12)
  stream = mae_pretrain.BatchStream(data, 8, seed=3, hflip=False)
  first = [stream(s)["labels"] for s in range(3)]  # 24 draws = two epochs of 12
  again = mae_pretrain.BatchStream(data, 8, seed=3, hflip=False)
  np.testing.assert_array_equal(again(2)["labels"], first[2])
  ids = lambda s: [np.flatnonzero((data.samples == img).all(axis=(1, 2, 3)))[0] for img in stream(s)["images"]]
  epoch0 = ids(0) + ids(1)[:4]
  assert sorted(epoch0) == list(range(12))
  flipped = mae_pretrain.BatchStream(data, 8, seed=3, hflip=True)(0)["images"]
  plain = stream(0)["images"]
  was_flipped = [(f == p[:, ::-1]).all() and not (f == p).all() for f, p in zip(flipped, plain)]
  assert 0 < sum(was_flipped) < 8 and all(w or (f == p).all() for w, f, p in zip(was_flipped, flipped, plain))

  # A flipped cache: the mirror image's own latent is drawn, not the mirrored array.
  import dataclasses
  mirror_latents = data.samples + 100.0
  with_views = dataclasses.replace(data, flipped=mirror_latents)
  from_cache = mae_pretrain.BatchStream(with_views, 8, seed=3, hflip=True)(0)["images"]
  took_mirror = (from_cache > 50).all(axis=(1, 2, 3))
  np.testing.assert_array_equal(took_mirror, was_flipped)  # the same coin flips
  np.testing.assert_array_equal(from_cache[took_mirror], plain[took_mirror] + 100.0)
  np.testing.assert_array_equal(from_cache[~took_mirror], plain[~took_mirror])


def test_schedule_and_classification_ramp():
  m = imagenet_mae_latent_256.get_config().mae
  schedule = mae_pretrain.learning_rate_schedule(m)
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-3)
  assert float(schedule(4000)) == pytest.approx(4e-3) and float(schedule(29_999)) == pytest.approx(4e-3)
  assert mae_pretrain.lambda_cls_at(29_999, m) == 0.0
  m.finetune_last_steps, m.total_steps = 3000, 200_000  # the release's 640-channel runs
  assert mae_pretrain.lambda_cls_at(196_999, m) == 0.0
  assert mae_pretrain.lambda_cls_at(197_500, m) == pytest.approx(0.05)
  assert mae_pretrain.lambda_cls_at(199_999, m) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_are_explained(official_tiny):
  module, params, _, io = official_tiny
  x = io["x"]
  with pytest.raises(ValueError, match=r"in_channels=4 channels, got shape \(3, 16, 16, 3\)"):
    mae.activations(module, params, x[..., :3])
  with pytest.raises(ValueError, match=r"\[batch, height, width, channels\], got shape \(16, 16, 4\)"):
    mae.activations(module, params, x[0])
  with pytest.raises(ValueError, match="multiples of input_patch_size=2"):
    mae.activations(module.clone(input_patch_size=2), params, x[:, :15, :14])
  with pytest.raises(ValueError, match="grid 14x14 must be a multiple of patch_size=4"):
    mae.pretraining_loss(module.clone(patch_size=4), params, x[:, :14, :14], np.zeros(3, np.int32),
                         jax.random.key(0))
  with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\).*\[10, 12\]"):
    mae.pretraining_loss(module, params, x, np.array([3, 10, 12]), jax.random.key(0))
  with pytest.raises(ValueError, match=r"labels must have shape \[batch\]=\(3,\)"):
    mae.pretraining_loss(module, params, x, np.zeros(2, np.int32), jax.random.key(0))
  with pytest.raises(ValueError, match="mask must have shape"):
    module.apply({"params": params}, x, np.zeros((3, 8, 8, 1)))


def test_bad_configs_are_explained(tmp_path):
  with pytest.raises(ValueError, match="base_channels=48 must be a multiple of 32"):
    mae.build_module(mae.model_config_for("tiny", base_channels=48))
  with pytest.raises(ValueError, match="layers must be four block counts"):
    mae.build_module(mae.model_config_for("tiny", layers=(1, 1, 1)))
  with pytest.raises(ValueError, match=r"unknown MAE config keys \['depth'\]"):
    mae.build_module({"depth": 3})
  with pytest.raises(ValueError, match="unknown MAE config 'huge'"):
    mae.model_config_for("huge")
  config = imagenet_mae_latent_256.get_config("smoke")
  config.mae.batch_size = 12
  with pytest.raises(ValueError, match="mae.batch_size=12 must be a multiple of the device count"):
    mae_pretrain.train_mae(config, str(tmp_path))
  with pytest.raises(ValueError, match="unknown imagenet_mae_latent_256 variant"):
    imagenet_mae_latent_256.get_config("huge")
