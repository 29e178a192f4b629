"""`--mode=build_latents` end to end on CPU: mocked MNIST, a tiny random VAE, the trainer's reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import tiny_artifacts  # noqa: E402
from configs import mnist_tiny  # noqa: E402
from drifting_jax.data import latents, pipelines  # noqa: E402
from drifting_jax.data import latent_jobs  # noqa: E402
from drifting_jax.models import vae as vae_lib  # noqa: E402
from drifting_jax.train import data as train_data  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # SD-VAE encoding of data sets

NUM_EXAMPLES = 10
BATCH = 4


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
  """A random tiny diffusers Flax VAE (tests/tiny_artifacts.py) saved as SDVAE.load reads it."""
  folder = tmp_path_factory.mktemp("tiny_vae")
  tiny_artifacts.save_tiny_vae(folder)
  return folder


def _config(tfds_dir, vae_dir, posterior="mean"):
  c = mnist_tiny.get_config()
  c.latents.posterior = posterior
  c.data.name = "mnist"
  c.data.data_dir = str(tfds_dir)
  c.latents.dataset = "mnist"
  c.latents.split = "train"
  c.latents.pad_to = 32
  c.latents.image_size = 32
  c.latents.batch_size = BATCH
  c.latents.vae_source = str(vae_dir)
  return c


def test_build_latents_then_train_from_the_cache(tmp_path, tiny_vae_dir, monkeypatch):
  config = _config(tmp_path / "tfds", tiny_vae_dir)
  workdir = tmp_path / "work"
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    images, labels = pipelines.load_in_memory("mnist", "train", data_dir=str(tmp_path / "tfds"))
    out_dir = latent_jobs.build_latents(config, str(workdir))
  assert out_dir == workdir / "latents"

  index = json.loads((out_dir / latents.INDEX_FILE).read_text())
  assert [s["count"] for s in index["shards"]] == [4, 4, 2]  # padding rows are not stored
  assert index["sample_shape"] == [4, 4, 4] and index["num_classes"] == 10
  assert index["metadata"]["source"] == "mnist" and index["metadata"]["image_size"] == 32
  assert index["flipped"] is True and index["metadata"]["posterior"] == "mean"

  # The cached latents are the VAE's encodings of the padded RGB digits, in order,
  # and of the same digits mirrored left to right.
  vae = vae_lib.SDVAE.load(tiny_vae_dir)
  rgb = np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1).astype(np.float32) / 127.5 - 1.0
  expected = np.asarray(vae.encode(rgb))
  reader = latents.LatentCacheReader(out_dir)
  cached, cached_labels = reader.load_host_shard(0, 1)
  np.testing.assert_allclose(cached, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(cached_labels, labels)
  mirrored, mirrored_labels = reader.load_host_shard(0, 1, view="latents_flip")
  np.testing.assert_allclose(mirrored, np.asarray(vae.encode(rgb[:, :, ::-1])), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(mirrored_labels, labels)
  assert np.abs(mirrored - cached).max() > 1e-3  # the digits are not symmetric

  # The trainer reads it as data.name=latents.
  config.data.name = "latents"
  config.data.data_dir = str(out_dir)
  config.data.image_size = 4
  config.data.channels = 4
  data = train_data.load_training_data(config)
  assert data.samples.shape == (NUM_EXAMPLES, 4, 4, 4) and data.samples.dtype == np.float32
  np.testing.assert_array_equal(data.labels, labels)
  # Each draw is the image's latent or its mirror image's, about half each.
  drawn, drawn_labels = data.push_batch(step=0, n=400)
  match_plain = np.isclose(drawn[:, None], cached[None]).all(axis=(2, 3, 4))
  match_mirror = np.isclose(drawn[:, None], mirrored[None]).all(axis=(2, 3, 4))
  assert (match_plain.sum(1) + match_mirror.sum(1) == 1).all()
  source = np.where(match_plain.any(1), match_plain.argmax(1), match_mirror.argmax(1))
  np.testing.assert_array_equal(labels[source], drawn_labels)
  assert 0.4 < match_mirror.any(1).mean() < 0.6
  config.data.latent_flip = False
  assert train_data.load_training_data(config).flipped is None

  # A re-run finds every shard done and writes nothing.
  def fail(*args, **kwargs):
    raise AssertionError("a finished shard was written again")

  monkeypatch.setattr(latents.LatentCacheWriter, "write_shard", fail)
  before = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("shard_*.npz")}
  config.data.name = "mnist"
  config.data.data_dir = str(tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    latent_jobs.build_latents(config, str(workdir))
  assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("shard_*.npz")} == before


def test_two_hosts_build_one_cache(tmp_path, tiny_vae_dir, monkeypatch):
  from test_data import _prepare  # a real prepared tfds folder: hosts read disjoint parts

  n = 10
  digits = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), np.uint8)
  _prepare("mnist", tmp_path / "tfds", {"train": [{"image": digits[i], "label": i % 10} for i in range(n)]})
  config = _config(tmp_path / "tfds", tiny_vae_dir)
  monkeypatch.setattr(latent_jobs.multihost_utils, "sync_global_devices", lambda name: None)
  monkeypatch.setattr(latent_jobs.jax, "process_count", lambda: 2)
  for host in (1, 0):  # process 0 finalizes, after the other host's shards are in
    monkeypatch.setattr(latent_jobs.jax, "process_index", lambda host=host: host)
    out_dir = latent_jobs.build_latents(config, str(tmp_path / "work"))
  index = json.loads((out_dir / latents.INDEX_FILE).read_text())
  # 5 images per host in batches of 4: host 0 writes shards 0 and 2, host 1 shards 1 and 3.
  assert [(s["index"], s["count"]) for s in index["shards"]] == [(0, 4), (1, 4), (2, 1), (3, 1)]
  assert index["metadata"]["process_count"] == 2
  cached, labels = latents.LatentCacheReader(out_dir).load_host_shard(0, 1)
  assert sorted(labels.tolist()) == sorted(i % 10 for i in range(n))
  vae = vae_lib.SDVAE.load(tiny_vae_dir)
  rgb = np.repeat(np.pad(digits, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)
  expected = np.asarray(vae.encode(rgb.astype(np.float32) / 127.5 - 1.0))
  # Every image encoded exactly once (matched by nearest encoding).
  dist = ((cached[:, None] - expected[None]) ** 2).sum(axis=(2, 3, 4))
  assert sorted(dist.argmin(axis=1).tolist()) == list(range(n))
  assert dist.min(axis=1).max() < 1e-6
  # Resuming on another number of hosts would renumber the shards: refused.
  monkeypatch.setattr(latent_jobs.jax, "process_count", lambda: 3)
  with pytest.raises(ValueError, match="other settings"):
    latent_jobs.build_latents(config, str(tmp_path / "work"))


def test_build_latents_samples_the_posterior_reproducibly(tmp_path, tiny_vae_dir):
  """posterior="sample" (the release's cache): one draw of N(mean, std^2) per image, fixed by latents.seed."""
  import jax

  config = _config(tmp_path / "tfds", tiny_vae_dir, posterior="sample")
  config.latents.flip = False

  def build(seed, name):
    config.latents.seed = seed
    config.latents.out_dir = str(tmp_path / name)
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
      out_dir = latent_jobs.build_latents(config, str(tmp_path / "work"))
    return latents.LatentCacheReader(out_dir)

  reader = build(0, "a")
  assert not reader.flipped
  sampled, _ = reader.load_host_shard(0, 1)
  with pytest.raises(ValueError, match="no mirror-image latents"):
    reader.load_host_shard(0, 1, view="latents_flip")
  np.testing.assert_array_equal(build(0, "b").load_host_shard(0, 1)[0], sampled)
  assert np.abs(build(1, "c").load_host_shard(0, 1)[0] - sampled).min() > 0

  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    images, _ = pipelines.load_in_memory("mnist", "train", data_dir=str(tmp_path / "tfds"))
  vae = vae_lib.SDVAE.load(tiny_vae_dir)
  rgb = np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1).astype(np.float32) / 127.5 - 1.0
  posterior = vae.module.apply({"params": vae.params}, jax.numpy.asarray(rgb.transpose(0, 3, 1, 2)),
                               method="encode").latent_dist  # diffusers' Flax VAE takes NCHW
  z = (sampled / vae.scaling_factor - np.asarray(posterior.mean)) / np.asarray(posterior.std)
  assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.15  # 640 standard normal residuals
