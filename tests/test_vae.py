"""The SD-VAE wrapper on a tiny random diffusers VAE: scaling, chunking, jit, meshes, weight formats."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from safetensors.numpy import save_file

import tiny_artifacts
from drifting_jax.models import vae as vae_lib

pytestmark = pytest.mark.slow  # make test-fast skips this module: every test builds and compiles the SD-VAE

SCALE = 0.18215


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(folder with config.json + Flax msgpack, module, params) of a random tiny VAE."""
  folder = tmp_path_factory.mktemp("tiny_vae")
  module, params = tiny_artifacts.save_tiny_vae(folder)
  return folder, module, params


@pytest.fixture(scope="module")
def vae(tiny):
  return vae_lib.SDVAE.load(tiny[0])


def _images(n, size=32, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _latents(n, seed=0):
  return np.random.default_rng(seed).normal(0, 1, (n, 4, 4, 4)).astype(np.float32)


def _trees_equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _diffusers_reference(module):
  """Jitted encode (posterior mean or sample) and decode of diffusers' own module, NHWC."""

  @jax.jit
  def encode(params, images, rng=None):
    images = jnp.transpose(images, (0, 3, 1, 2))  # the Flax VAE takes NCHW images
    posterior = module.apply({"params": params}, images, method=module.encode).latent_dist
    return posterior.mean if rng is None else posterior.sample(rng)

  @jax.jit
  def decode(params, latents):
    return jnp.transpose(module.apply({"params": params}, latents, method=module.decode).sample, (0, 2, 3, 1))

  return encode, decode


# ----------------------------------------------------------------------------- encode / decode


def test_loads_the_saved_flax_vae(tiny, vae):
  folder, module, params = tiny
  assert _trees_equal(jax.device_get(vae.params), params)
  assert vae.module.config.block_out_channels == module.config.block_out_channels
  assert (vae.latent_channels, vae.downsampling_factor, vae.scaling_factor) == (4, 8, SCALE)


def test_encode_decode_are_diffusers_scaled_by_0_18215(tiny, vae):
  _, module, params = tiny
  reference_encode, reference_decode = _diffusers_reference(module)
  images = _images(2)
  latents = vae.encode(images)
  assert latents.shape == (2, 4, 4, 4) and latents.dtype == jnp.float32
  mean = np.asarray(reference_encode(params, images))
  assert np.abs(mean).mean() > 1e-2  # a non-degenerate random network
  np.testing.assert_allclose(np.asarray(latents), SCALE * mean, rtol=1e-5, atol=1e-6)

  decoded = vae.decode(latents)
  assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(decoded), reference_decode(params, mean), rtol=1e-4, atol=1e-5)
  # The scale sits on the latent side only: decode(encode(x)) is diffusers' x -> mean -> image.
  z = _latents(2)
  np.testing.assert_allclose(np.asarray(vae.decode(z)), reference_decode(params, z / SCALE),
                             rtol=1e-4, atol=1e-5)

  # With an rng: a posterior sample, scaled the same way, reproducible.
  rng = jax.random.PRNGKey(5)
  sample = np.asarray(vae.encode(images, rng))
  np.testing.assert_allclose(sample, SCALE * np.asarray(reference_encode(params, images, rng)), rtol=1e-5, atol=1e-6)
  assert not np.allclose(sample, latents, atol=1e-4)
  np.testing.assert_array_equal(sample, np.asarray(vae.encode(images, rng)))


def test_shapes_are_checked(vae):
  with pytest.raises(ValueError, match=r"NHWC images \(batch, height, width, 3\)"):
    vae.encode(np.zeros((2, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match="multiples of 8"):
    vae.encode(np.zeros((1, 36, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"NHWC latents \(batch, height, width, 4\)"):
    vae.decode(np.zeros((1, 4, 4, 3), np.float32))


def test_jit_compiles_once_and_composes(vae):
  images = _images(3, seed=1)
  eager = np.asarray(vae.decode(vae.encode(images)))
  roundtrip = jax.jit(lambda x: vae.decode(vae.encode(x)))
  np.testing.assert_allclose(np.asarray(roundtrip(images)), eager, rtol=1e-4, atol=1e-5)
  fresh = vae_lib.SDVAE(vae.module, vae.params)
  fresh.encode(images)
  fresh.encode(_images(3, seed=2))
  assert fresh._encode_mean._cache_size() == 1  # a new batch of the same shape reuses the executable


def test_chunked_equals_unchunked(vae):
  images, latents = _images(5, seed=3), _latents(5, seed=3)
  encoded = vae.encode_in_chunks(images, chunk_size=2)  # chunks 2, 2, 1 (+1 padding row)
  assert isinstance(encoded, np.ndarray) and encoded.shape == (5, 4, 4, 4)
  np.testing.assert_allclose(encoded, np.asarray(vae.encode(images)), rtol=1e-5, atol=1e-6)
  decoded = vae.decode_in_chunks(latents, chunk_size=2)
  np.testing.assert_allclose(decoded, np.asarray(vae.decode(latents)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(vae.decode_in_chunks(latents, chunk_size=8), decoded, rtol=1e-4, atol=1e-5)
  # Sampled chunk i draws with fold_in(rng, i).
  rng = jax.random.PRNGKey(1)
  sampled = vae.encode_in_chunks(images, chunk_size=2, rng=rng)
  np.testing.assert_allclose(sampled[2:4], np.asarray(vae.encode(images[2:4], jax.random.fold_in(rng, 1))),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
    vae.decode_in_chunks(latents, chunk_size=0)
  with pytest.raises(ValueError, match="nothing to process"):
    vae.decode_in_chunks(latents[:0], chunk_size=2)


def test_params_replicated_over_an_8_device_mesh_give_the_same_output(tiny, vae):
  assert len(jax.devices()) == 8
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  replicated = vae_lib.SDVAE.load(tiny[0], mesh=mesh)
  for leaf in jax.tree.leaves(replicated.params):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  images, latents = _images(10, seed=4), _latents(10, seed=4)
  encoded = replicated.encode_in_chunks(images, chunk_size=8)  # one chunk per device row split
  np.testing.assert_allclose(encoded, vae.encode_in_chunks(images, chunk_size=8), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(replicated.decode_in_chunks(latents, chunk_size=8),
                             vae.decode_in_chunks(latents, chunk_size=8), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(replicated.decode(latents[:3])), np.asarray(vae.decode(latents[:3])),
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="multiple of the mesh size 8"):
    replicated.decode_in_chunks(latents, chunk_size=4)


# ----------------------------------------------------------------------------- PyTorch weights


@pytest.mark.parametrize("attention,as_conv", [("current", False), ("legacy", False), ("legacy", True),
                                               ("current", True)])
def test_pytorch_safetensors_convert_to_the_same_vae(tmp_path, tiny, vae, attention, as_conv):
  folder, _, params = tiny
  state_dict = tiny_artifacts.flax_to_pytorch_state_dict(params, attention=attention, attention_as_conv=as_conv)
  # The PyTorch layout really is different: OIHW convolutions, `weight` names.
  assert state_dict["encoder.conv_in.weight"].shape == (8, 3, 3, 3)
  assert ("encoder.mid_block.attentions.0.to_q.weight" in state_dict) == (attention == "current")
  shutil.copy(folder / vae_lib.CONFIG_FILE, tmp_path)
  save_file(state_dict, str(tmp_path / vae_lib.PYTORCH_WEIGHTS_FILE))

  for source in (tmp_path, tmp_path / vae_lib.PYTORCH_WEIGHTS_FILE):  # folder, or the file itself
    converted = vae_lib.SDVAE.load(source)
    assert _trees_equal(jax.device_get(converted.params), params)
  if (attention, as_conv) == ("current", False):  # equal params give equal outputs; checked once
    images, latents = _images(2, seed=6), _latents(2, seed=6)
    np.testing.assert_array_equal(np.asarray(converted.encode(images)), np.asarray(vae.encode(images)))
    np.testing.assert_array_equal(np.asarray(converted.decode(latents)), np.asarray(vae.decode(latents)))


def test_bad_pytorch_weights_are_explained(tmp_path, tiny):
  folder, _, params = tiny
  state_dict = tiny_artifacts.flax_to_pytorch_state_dict(params)
  shutil.copy(folder / vae_lib.CONFIG_FILE, tmp_path)
  weights = tmp_path / vae_lib.PYTORCH_WEIGHTS_FILE

  wrong = dict(state_dict, **{"encoder.mid_block.attentions.0.to_q.weight": np.zeros((8, 6), np.float32)})
  del wrong["decoder.conv_out.bias"]
  save_file(wrong, str(weights))
  with pytest.raises(ValueError, match=r"(?s)do not match.*missing decoder/conv_out/bias.*"
                                       r"wrong shape/dtype encoder/mid_block/attentions_0/query/kernel"):
    vae_lib.SDVAE.load(tmp_path)

  # Without a config.json the SD-VAE architecture is assumed, which these weights are not.
  alone = tmp_path / "alone"
  alone.mkdir()
  save_file(state_dict, str(alone / vae_lib.PYTORCH_WEIGHTS_FILE))
  with pytest.raises(ValueError, match=r"do not match the architecture of its config \(\d+ problems\)"):
    vae_lib.SDVAE.load(alone / vae_lib.PYTORCH_WEIGHTS_FILE)

  weights.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    vae_lib.SDVAE.load(tmp_path)


# ----------------------------------------------------------------------------- sources and errors


def test_offline_hf_source_without_cache_says_what_to_download(tmp_path):
  cache = tmp_path / "hf_cache"
  with pytest.raises(FileNotFoundError) as error:
    vae_lib.SDVAE.load("hf://pcuenq/sd-vae-ft-mse-flax", cache_dir=cache)
  message = str(error.value)
  assert "huggingface-cli download pcuenq/sd-vae-ft-mse-flax config.json diffusion_flax_model.msgpack" in message
  assert str(cache) in message and "SDVAE.load(DIR)" in message
  assert "stabilityai/sd-vae-ft-mse" in message and vae_lib.PYTORCH_WEIGHTS_FILE in message
  with pytest.raises(ValueError, match=r"expected hf://<owner>/<repo>"):
    vae_lib.SDVAE.load("hf://sd-vae")


def test_local_sources_that_cannot_work_are_explained(tmp_path, tiny):
  folder = tiny[0]
  with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*huggingface-cli download"):
    vae_lib.SDVAE.load(tmp_path / "missing")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="has neither diffusion_flax_model.msgpack .* nor "
                                              "diffusion_pytorch_model.safetensors"):
    vae_lib.SDVAE.load(empty)

  truncated = tmp_path / "truncated"
  shutil.copytree(folder, truncated)
  data = (folder / vae_lib.FLAX_WEIGHTS_FILE).read_bytes()
  (truncated / vae_lib.FLAX_WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    vae_lib.SDVAE.load(truncated)

  (truncated / vae_lib.FLAX_WEIGHTS_FILE).write_bytes(data)
  (truncated / vae_lib.CONFIG_FILE).write_text("{not json")
  with pytest.raises(ValueError, match="not a readable diffusers VAE config"):
    vae_lib.SDVAE.load(truncated)

  # A config that disagrees with the weights (wider blocks) is caught leaf by leaf.
  config = json.loads((folder / vae_lib.CONFIG_FILE).read_text())
  config["block_out_channels"] = [16, 16, 16, 16]
  (truncated / vae_lib.CONFIG_FILE).write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"do not match the architecture of its config"):
    vae_lib.SDVAE.load(truncated)

  with pytest.raises(ValueError, match="unsupported VAE weights file"):
    vae_lib.SDVAE.load(folder / vae_lib.CONFIG_FILE)


def test_bfloat16_computation_keeps_float32_params_and_outputs(tiny, vae):
  low = vae_lib.SDVAE.load(tiny[0], dtype=jnp.bfloat16)
  assert low.module.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(low.params))
  images = _images(2, seed=7)
  reference = np.asarray(vae.encode(images))
  latents = np.asarray(low.encode(images))
  assert latents.dtype == np.float32
  assert np.linalg.norm(latents - reference) < 0.1 * np.linalg.norm(reference)
