"""The FID InceptionV3 (random weights: the real ones cannot be downloaded here) and its weights file."""

from __future__ import annotations

import hashlib
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import tiny_artifacts
from drifting_jax.models import inception

pytestmark = pytest.mark.slow  # make test-fast skips this module: every test builds and compiles InceptionV3

BATCH = 2  # every network call below uses this batch, so each input size compiles once


@pytest.fixture(scope="module")
def variables():
  # Gain sqrt(2): ReLU halves the second moment, and the network is ~50 layers deep.
  return tiny_artifacts.random_params(inception.abstract_variables(), seed=0, kernel_gain=np.sqrt(2.0))


@pytest.fixture(scope="module")
def extractor(variables):
  return inception.InceptionFeatureExtractor(variables)


def _pixels(n, size, seed=0):
  """Float pixels in [0, 255] (integers, as decoded images are)."""
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


def _standard_pickle_layout(variables) -> dict:
  """The JAX FID ports' file: one nested dict per block, `params` and `batch_stats` merged.

  Extra entries that real exports carry and the network does not use are added: a
  zero bias per convolution and an auxiliary classifier.
  """
  raw: dict = {}
  for (_, *key), value in traverse_util.flatten_dict(variables).items():
    node = raw
    for name in key[:-1]:
      node = node.setdefault(name, {})
    node[key[-1]] = np.asarray(value)
  for path, value in list(traverse_util.flatten_dict(raw).items()):
    if path[-2:] == ("conv", "kernel"):
      raw_node = raw
      for name in path[:-1]:
        raw_node = raw_node[name]
      raw_node["bias"] = np.zeros(value.shape[-1], np.float32)
  raw["AuxLogits"] = {"fc": {"kernel": np.zeros((768, 1008), np.float32)}}
  return raw


def _trees_equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- network


def test_outputs_at_299(extractor, variables):
  out = extractor(_pixels(BATCH, 299))
  assert isinstance(out, inception.InceptionOutputs)
  assert out.pool_features.shape == (BATCH, 2048) and out.logits.shape == (BATCH, 1008)
  assert out.logits_unbiased.shape == (BATCH, 1008)
  for value in out:
    assert value.dtype == jnp.float32 and np.isfinite(np.asarray(value)).all()
  assert np.std(np.asarray(out.pool_features)) > 1e-3  # random weights, but not a dead network
  # pool_3 is post-ReLU and averaged: non-negative. The two logits differ by the fc bias.
  assert np.asarray(out.pool_features).min() >= 0
  np.testing.assert_allclose(np.asarray(out.logits) - np.asarray(out.logits_unbiased),
                             np.broadcast_to(variables["params"]["fc"]["bias"], (BATCH, 1008)), atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.logits_unbiased),
                             np.asarray(out.pool_features) @ variables["params"]["fc"]["kernel"],
                             rtol=1e-4, atol=1e-4)


def test_other_sizes_are_resized_to_299_first(extractor):
  small = _pixels(BATCH, 32, seed=1)
  resized = np.asarray(inception.resize_bilinear_legacy(small))
  assert resized.shape == (BATCH, 299, 299, 3)
  direct = extractor(small)
  via_299 = extractor(resized)  # a 299 input is not resized again
  for a, b in zip(direct, via_299):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_preprocessing_is_tf1_legacy_bilinear_and_maps_to_minus_one_one():
  # Input 2 -> output 4 samples coordinates 0, 0.5, 1, 1.5 (clamped to the last pixel).
  row = np.array([10.0, 30.0], np.float32).reshape(1, 1, 2, 1)
  np.testing.assert_allclose(np.asarray(inception.resize_bilinear_legacy(np.repeat(row, 2, axis=1), 4))[0, 0, :, 0],
                             [10.0, 20.0, 30.0, 30.0])
  tf = pytest.importorskip("tensorflow")
  for size in (32, 300):  # upsampling and (non-antialiased) downsampling
    images = _pixels(1, size, seed=size)
    expected = tf.compat.v1.image.resize_bilinear(images, (299, 299), align_corners=False, half_pixel_centers=False)
    # TF computes source coordinates in float32, this code in float64: ~1e-2 of a
    # grey level apart at most.
    np.testing.assert_allclose(np.asarray(inception.resize_bilinear_legacy(images)), expected.numpy(),
                               rtol=0, atol=2e-2)
  pixels = _pixels(1, 299)
  np.testing.assert_array_equal(np.asarray(inception.preprocess(pixels.astype(np.uint8))), (pixels - 128) / 128)
  with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
    inception.preprocess(np.zeros((1, 299, 299), np.uint8))


def test_to_uint8_truncates_like_the_release():
  values = np.array([-1.0, 0.0, 1.0, 2.0, -3.0, np.nan, np.inf, -np.inf, 0.999])
  np.testing.assert_array_equal(inception.to_uint8(values), [0, 127, 255, 255, 0, 0, 255, 0, 254])
  np.testing.assert_array_equal(inception.to_uint8(np.array([0.0, 0.5, 1.0]), value_range=(0.0, 1.0)), [0, 127, 255])
  with pytest.raises(ValueError, match="high > low"):
    inception.to_uint8(values, value_range=(1.0, 1.0))


def test_block_pools_ignore_padding_and_last_block_takes_a_max():
  ones = jnp.ones((1, 5, 5, 2))
  # Counting padded zeros would give 4/9 in the corners and 6/9 on the edges.
  np.testing.assert_allclose(np.asarray(inception._avg_pool_3x3(ones)), 1.0)
  x = jnp.arange(25.0).reshape(1, 5, 5, 1)
  np.testing.assert_allclose(np.asarray(inception._avg_pool_3x3(x))[0, 0, 0, 0], np.mean([0, 1, 5, 6]))
  # Max pools pad with -inf: a zero padding would win over these negative values.
  np.testing.assert_allclose(np.asarray(inception._max_pool_3x3(-x - 1))[0, 0, 0, 0], -1.0)
  assert inception.InceptionE(max_pool=True).max_pool and not inception.InceptionE().max_pool


def test_input_checks(extractor, variables):
  with pytest.raises(ValueError, match="at least 75x75"):
    inception.InceptionV3().apply(variables, jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
    extractor(np.zeros((1, 299, 299, 1), np.float32))
  with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
    extractor.features_in_chunks(np.zeros((3, 299, 299), np.float32), chunk_size=2)


def test_features_in_chunks_equal_unchunked(extractor):
  images = _pixels(3, 299, seed=2)
  chunked = extractor.features_in_chunks(images, chunk_size=BATCH)  # chunks of 2 and 1 (+1 padding row)
  assert isinstance(chunked, inception.InceptionOutputs)
  first = extractor(images[:2])
  last = extractor(np.concatenate([images[2:], images[:1]]))  # the network is per image
  for name, value in chunked._asdict().items():
    assert isinstance(value, np.ndarray) and value.shape[0] == 3, name
    expected = np.concatenate([np.asarray(getattr(first, name)), np.asarray(getattr(last, name))[:1]])
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_chunks_must_split_over_the_mesh(variables):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  replicated = inception.InceptionFeatureExtractor(variables, mesh=mesh)
  leaf = jax.tree.leaves(replicated.variables)[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(jax.devices())
  with pytest.raises(ValueError, match="multiple of the mesh size 8"):
    replicated.features_in_chunks(_pixels(3, 299), chunk_size=BATCH)


# ----------------------------------------------------------------------------- the weights pickle


def test_standard_weights_pickle_loads_into_params_and_batch_stats(tmp_path, variables, monkeypatch):
  path = tmp_path / inception.WEIGHTS_FILENAME
  with open(path, "wb") as f:
    pickle.dump(_standard_pickle_layout(variables), f)
  loaded = inception.load_inception_variables(path)
  assert set(loaded) == {"params", "batch_stats"}
  assert set(loaded["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]) == {"mean", "var"}
  assert set(loaded["params"]["Mixed_7c"]["branch_pool"]["bn"]) == {"scale", "bias"}
  assert _trees_equal(loaded, variables)  # unused entries (conv biases, AuxLogits) are dropped
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(loaded))

  # The default location is $DRIFTING_JAX_INCEPTION; an md5 can be enforced.
  monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(path))
  assert inception.default_weights_path() == path
  md5 = hashlib.md5(path.read_bytes()).hexdigest()
  extractor = inception.InceptionFeatureExtractor.load(expected_md5=md5)
  assert _trees_equal(jax.device_get(extractor.variables), variables)
  with pytest.raises(ValueError, match=f"has md5 {md5}, expected {inception.WEIGHTS_MD5}"):
    inception.load_inception_variables(path, expected_md5=inception.WEIGHTS_MD5)

  # save_inception_weights writes the same layout (without the unused extras).
  saved = inception.save_inception_weights(variables, tmp_path / "saved" / "weights.pickle")
  with open(saved, "rb") as f:
    raw = pickle.load(f)
  assert set(raw) == set(variables["params"])
  assert set(raw["Conv2d_1a_3x3"]) == {"conv", "bn"} and set(raw["fc"]) == {"kernel", "bias"}
  assert set(raw["Conv2d_1a_3x3"]["bn"]) == {"scale", "bias", "mean", "var"}
  assert raw["Conv2d_1a_3x3"]["conv"]["kernel"].shape == (3, 3, 3, 32)  # HWIO
  assert _trees_equal(inception.load_inception_variables(saved), variables)


def test_missing_weights_name_the_file_to_download(tmp_path, monkeypatch):
  monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert inception.default_weights_path() == tmp_path / ".cache/drifting_jax/inception" / inception.WEIGHTS_FILENAME
  with pytest.raises(FileNotFoundError) as error:
    inception.InceptionFeatureExtractor.load()
  message = str(error.value)
  assert str(inception.default_weights_path()) in message
  assert inception.WEIGHTS_URL in message and inception.WEIGHTS_MD5 in message
  assert inception.WEIGHTS_FILENAME in message and inception.WEIGHTS_ENV_VAR in message


def test_bad_weights_files_are_explained(tmp_path, variables):
  path = tmp_path / "weights.pickle"
  raw = _standard_pickle_layout(variables)
  del raw["Mixed_7c"]["branch_pool"]["bn"]["var"]
  raw["fc"]["kernel"] = raw["fc"]["kernel"][:, :1000]
  path.write_bytes(pickle.dumps(raw))
  with pytest.raises(ValueError, match=r"(?s)2 problems.*missing Mixed_7c/branch_pool/bn/var.*"
                                       r"wrong shape/dtype fc/kernel: expected float\[2048, 1008\], "
                                       r"got float32\[2048, 1000\]"):
    inception.load_inception_variables(path)

  path.write_bytes(pickle.dumps([1, 2]))
  with pytest.raises(ValueError, match="does not hold a dict"):
    inception.load_inception_variables(path)
  path.write_bytes(pickle.dumps({"fc": os.getcwd}))  # a pickle that would call code
  with pytest.raises(ValueError, match="refusing to load global posix.getcwd"):
    inception.load_inception_variables(path)
  path.write_bytes(b"\x80\x04garbage")
  with pytest.raises(ValueError, match="not a readable InceptionV3 weights pickle"):
    inception.load_inception_variables(path)
