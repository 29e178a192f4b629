"""Tests of the tfds pipelines and the latent cache, offline.

tfds data comes two ways, neither downloading anything:

* `tfds.testing.mock_data`: random examples of the real builders' features; it
  ignores split slicing (every host would see the same examples), so it is used
  for shapes, dtypes and preprocessing only;
* `_prepare`: a real prepared tfds folder for the real builder, written from
  given examples (its `_split_generators` replaced), used where the sharding of a
  split over hosts matters.
"""

from __future__ import annotations

import io
import json
import pathlib
from unittest import mock

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from configs import mnist_tiny  # noqa: E402
from drifting_jax.data import latents, pipelines  # noqa: E402
from drifting_jax.train import data as train_data  # noqa: E402


def _prepare(name: str, data_dir: pathlib.Path, splits: dict) -> None:
  """Prepares tfds data set `name` in data_dir from {split: [example dict, ...]}."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  cls = type(builder)

  def split_generators(self, dl_manager):
    del self, dl_manager
    return {split: iter(list(enumerate(examples))) for split, examples in splits.items()}

  # Looking up the builder's checksums needs importlib_resources, which the
  # pinned environment lacks; no checksums are used here, so skip the lookup.
  cls.url_infos = None
  try:
    with mock.patch.object(cls, "_split_generators", split_generators):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    del cls.url_infos


def _digit(ident: int) -> np.ndarray:
  """A 28x28x1 image whose pixels spell its id (for tracing examples through the pipeline)."""
  image = np.full((28, 28, 1), 1 + ident % 250, np.uint8)
  image[0, 0, 0] = ident  # < 256 in these tests
  return image


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> pathlib.Path:
  """A prepared fake `mnist`: train holds ids 0..10 (label id % 10), test ids 100..104."""
  data_dir = tmp_path_factory.mktemp("tfds")
  _prepare("mnist", data_dir, {
      "train": [{"image": _digit(i), "label": i % 10} for i in range(11)],
      "test": [{"image": _digit(i), "label": i % 10} for i in range(100, 105)],
  })
  return data_dir


def _ids(batches) -> list[int]:
  out = []
  for batch in batches:
    out.extend(int(i) for i in batch["image"][batch["valid"], 2, 2, 0])  # pad_to=32: original (0, 0)
  return out


# ----------------------------------------------------------------------------- in memory


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_in_memory_mocked(name, tmp_path):
  with tfds.testing.mock_data(num_examples=7):
    images, labels = pipelines.load_in_memory(name, split="train", data_dir=str(tmp_path))
  assert images.shape == (7, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (7,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < 10


def test_load_in_memory_reads_every_example(mnist_dir):
  images, labels = pipelines.load_in_memory("mnist", "test", data_dir=str(mnist_dir))
  ids = images[:, 0, 0, 0].astype(int)
  assert sorted(ids) == list(range(100, 105))
  np.testing.assert_array_equal(labels, ids % 10)
  for image, ident in zip(images, ids):
    np.testing.assert_array_equal(image, _digit(ident))


def test_missing_data_names_what_to_build(tmp_path):
  empty = str(tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match=r"tfds build mnist --data_dir=DIR") as err:
    pipelines.load_in_memory("mnist", "train", data_dir=empty)
  assert "--config.data.data_dir" in str(err.value) and empty in str(err.value)
  # image_batches fails on the call, not on the first batch.
  with pytest.raises(FileNotFoundError, match="tfds build fashion_mnist"):
    pipelines.image_batches("fashion_mnist", "train", data_dir=empty, batch_size=4, image_size=28,
                            process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_train.tar.*--manual_dir"):
    pipelines.image_batches("imagenet2012", "train", data_dir=empty, batch_size=4, image_size=256,
                            process_index=0, process_count=1)


# ----------------------------------------------------------------------------- batches


def test_mnist_batches_pad_rgb_and_valid(tmp_path):
  with tfds.testing.mock_data(num_examples=10):
    raw, raw_labels = pipelines.load_in_memory("mnist", "train", data_dir=str(tmp_path))
    batches = list(pipelines.image_batches("mnist", "train", data_dir=str(tmp_path), batch_size=4, image_size=32,
                                           process_index=0, process_count=1, pad_to=32, to_rgb=True))
  assert len(batches) == 3
  for b in batches:
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert b["valid"].shape == (4,) and b["valid"].dtype == bool
  np.testing.assert_array_equal(batches[-1]["valid"], [True, True, False, False])
  assert not batches[-1]["image"][2:].any() and not batches[-1]["label"][2:].any()
  images = np.concatenate([b["image"] for b in batches])[:10]
  labels = np.concatenate([b["label"] for b in batches])[:10]
  # Black 2-pixel border, the digit centered, the gray channel repeated.
  assert not images[:, :2].any() and not images[:, -2:].any()
  assert not images[:, :, :2].any() and not images[:, :, -2:].any()
  for c in range(3):
    np.testing.assert_array_equal(images[:, 2:30, 2:30, c], raw[..., 0])
  np.testing.assert_array_equal(labels, raw_labels)


def test_mnist_batches_without_padding_keep_channels(tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    (batch,) = pipelines.image_batches("fashion_mnist", "test", data_dir=str(tmp_path), batch_size=3,
                                       image_size=28, process_index=0, process_count=1)
  assert batch["image"].shape == (3, 28, 28, 1) and batch["valid"].all()


def test_inconsistent_sizes_fail_on_the_call(tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(ValueError, match="image_size"):
      pipelines.image_batches("mnist", "train", data_dir=str(tmp_path), batch_size=2, image_size=32,
                              process_index=0, process_count=1)
    with pytest.raises(ValueError, match="smaller"):
      pipelines.image_batches("mnist", "train", data_dir=str(tmp_path), batch_size=2, image_size=16,
                              process_index=0, process_count=1, pad_to=16)
    with pytest.raises(ValueError, match="pad_to"):
      pipelines.image_batches("imagenet2012", "train", data_dir=str(tmp_path), batch_size=2, image_size=32,
                              process_index=0, process_count=1, pad_to=32)


@pytest.mark.parametrize("process_count", [1, 2, 3, 4, 13])
def test_hosts_read_disjoint_parts_that_cover_the_split(mnist_dir, process_count):
  parts = []
  for p in range(process_count):
    batches = list(pipelines.image_batches("mnist", "train", data_dir=str(mnist_dir), batch_size=3, image_size=32,
                                           process_index=p, process_count=process_count, pad_to=32))
    for b in batches[:-1]:
      assert b["valid"].all()  # only the last batch is padded
    parts.append(_ids(batches))
  everything = sorted(i for part in parts for i in part)
  assert everything == list(range(11))  # each example exactly once
  sizes = [len(part) for part in parts]
  assert max(sizes) - min(sizes) <= 1  # tfds even splits: [4, 4, 3] for 3 hosts
  # Deterministic: the same host reads the same sequence again.
  again = _ids(pipelines.image_batches("mnist", "train", data_dir=str(mnist_dir), batch_size=3, image_size=32,
                                       process_index=0, process_count=process_count, pad_to=32))
  assert again == parts[0]


def test_center_crop_follows_the_release():
  rng = np.random.default_rng(0)
  # 1024x768 (W x H): one BOX halving to 512x384 (384 < 2 * 256 stops it), BICUBIC to
  # 341x256, center crop at x = (341 - 256) // 2 = 42.
  image = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), np.uint8))
  expected = np.asarray(image.resize((512, 384), Image.Resampling.BOX).resize((341, 256), Image.Resampling.BICUBIC))
  out = pipelines.center_crop_arr(image, 256)
  assert out.shape == (256, 256, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected[:, 42:298])
  # Small images are upsampled (no halving); a flat image stays flat.
  flat = pipelines.center_crop_arr(np.full((20, 50, 3), 77, np.uint8), 32)
  assert flat.shape == (32, 32, 3) and (flat == 77).all()


def test_imagenet_batches_are_center_crops(tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    (batch,) = pipelines.image_batches("imagenet2012", "train", data_dir=str(tmp_path), batch_size=4,
                                       image_size=16, process_index=0, process_count=1, to_rgb=True)
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["valid"], [True, True, True, False])
  assert (batch["label"][:3] >= 0).all() and (batch["label"][:3] < 1000).all()


def test_imagenet_pipeline_decodes_with_pil_and_crops(tmp_path):
  rng = np.random.default_rng(1)
  sizes = [(300, 200), (90, 130), (64, 64)]  # (H, W)
  originals = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]
  _prepare("imagenet2012", tmp_path, {
      "validation": [{"image": x, "label": i, "file_name": f"img_{i}.JPEG"} for i, x in enumerate(originals)]})
  (batch,) = pipelines.image_batches("imagenet2012", "validation", data_dir=str(tmp_path), batch_size=3,
                                     image_size=64, process_index=0, process_count=1)
  # tfds stores JPEGs; the expected crops come from the stored bytes decoded by PIL.
  raw = tfds.builder("imagenet2012", data_dir=str(tmp_path)).as_dataset(
      split="validation", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
  expected = {int(ex["label"]): pipelines.center_crop_arr(Image.open(io.BytesIO(ex["image"])).convert("RGB"), 64)
              for ex in tfds.as_numpy(raw)}
  assert sorted(batch["label"].tolist()) == [0, 1, 2]
  for image, label in zip(batch["image"], batch["label"]):
    np.testing.assert_array_equal(image, expected[int(label)])


# ----------------------------------------------------------------------------- latent cache


def _write_cache(out_dir, counts, sample_shape=(2, 2, 3), num_classes=5, dtype="float32"):
  """A cache whose latent k (over all shards) is filled with k; label k % num_classes."""
  writer = latents.LatentCacheWriter(out_dir, sample_shape=sample_shape, dtype=dtype, shard_size=max(counts),
                                     metadata={"source": "test", "vae": "none"})
  start = 0
  for i, n in enumerate(counts):
    ids = np.arange(start, start + n)
    writer.write_shard(i, np.broadcast_to(ids[:, None, None, None], (n, *sample_shape)).astype(np.float32),
                       ids % num_classes)
    start += n
  return writer, writer.finalize(num_classes)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_latent_round_trip_over_hosts(tmp_path, process_count):
  counts = [5, 5, 5, 5, 5, 5, 3]
  _write_cache(tmp_path, counts)
  reader = latents.LatentCacheReader(tmp_path)
  assert reader.num_classes == 5 and reader.sample_shape == (2, 2, 3) and reader.num_examples == 33
  seen = []
  for p in range(process_count):
    x, y = reader.load_host_shard(p, process_count)
    assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape[1:] == (2, 2, 3)
    ids = x[:, 0, 0, 0].astype(int)
    assert (x == ids[:, None, None, None]).all()
    np.testing.assert_array_equal(y, ids % 5)
    # Host p holds the shards p, p + P, ...
    expected = [k for s in range(p, len(counts), process_count)
                for k in range(sum(counts[:s]), sum(counts[:s + 1]))]
    assert ids.tolist() == expected
    seen.extend(ids.tolist())
  assert sorted(seen) == list(range(33))  # disjoint, and together everything


def test_float16_cache_keeps_its_dtype(tmp_path):
  _write_cache(tmp_path, [4, 2], dtype="float16")
  x, _ = latents.LatentCacheReader(tmp_path).load_host_shard(0, 1)
  assert x.dtype == np.float16 and x.shape == (6, 2, 2, 3)
  with pytest.raises(ValueError, match="dtype"):
    latents.LatentCacheWriter(tmp_path / "bf16", sample_shape=(1,), dtype="int8", shard_size=1)


def test_finalize_writes_the_index(tmp_path):
  _, index = _write_cache(tmp_path, [4, 4, 1], num_classes=7)
  on_disk = json.loads((tmp_path / latents.INDEX_FILE).read_text())
  assert on_disk == index
  assert index["shards"] == [{"index": 0, "file": "shard_000000.npz", "count": 4},
                             {"index": 1, "file": "shard_000001.npz", "count": 4},
                             {"index": 2, "file": "shard_000002.npz", "count": 1}]
  assert index["num_examples"] == 9 and index["num_classes"] == 7
  assert index["sample_shape"] == [2, 2, 3] and index["dtype"] == "float32" and index["format"] == "npz"
  assert index["metadata"] == {"source": "test", "vae": "none"}


def test_finalize_refuses_gaps_and_bad_labels(tmp_path):
  writer = latents.LatentCacheWriter(tmp_path / "gap", sample_shape=(2,), shard_size=2)
  with pytest.raises(ValueError, match="no shards"):
    writer.finalize(3)
  writer.write_shard(0, np.zeros((2, 2)), np.array([0, 1]))
  writer.write_shard(2, np.zeros((2, 2)), np.array([0, 1]))
  with pytest.raises(ValueError, match=r"lacks shards \[1\]"):
    writer.finalize(3)
  writer.write_shard(1, np.zeros((1, 2)), np.array([3]))
  with pytest.raises(ValueError, match="labels"):
    writer.finalize(3)
  with pytest.raises(ValueError, match="expected latents"):
    writer.write_shard(3, np.zeros((3, 2)), np.zeros(3, int))  # more than shard_size
  with pytest.raises(ValueError, match="expected latents"):
    writer.write_shard(3, np.zeros((2, 5)), np.zeros(2, int))


def test_resume_skips_completed_shards(tmp_path):
  def build(fail_at=None):
    """A build loop like latent_jobs.build_latents: 4 shards, skipping the finished ones."""
    writer = latents.LatentCacheWriter(tmp_path, sample_shape=(3,), shard_size=2, metadata={"vae": "a"})
    done, written = writer.completed_shards(), []
    for i in range(4):
      if i in done:
        continue
      if i == fail_at:
        # Killed while writing: savez dies half way, nothing lands under the shard's name.
        with mock.patch.object(np, "savez", side_effect=KeyboardInterrupt):
          with pytest.raises(KeyboardInterrupt):
            writer.write_shard(i, np.full((2, 3), i), np.array([0, 1]))
        return written
      writer.write_shard(i, np.full((2, 3), i), np.array([0, 1]))
      written.append(i)
    writer.finalize(2)
    return written

  assert build(fail_at=2) == [0, 1]
  assert not (tmp_path / latents.INDEX_FILE).exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_000000.npz", "shard_000001.npz", "spec.json"]
  assert build() == [2, 3]
  assert build() == []  # finished: a re-run writes nothing
  x, _ = latents.LatentCacheReader(tmp_path).load_host_shard(0, 1)
  np.testing.assert_array_equal(x[:, 0], [0, 0, 1, 1, 2, 2, 3, 3])
  # Resuming with other settings would mix two caches: refused.
  with pytest.raises(ValueError, match="other settings"):
    latents.LatentCacheWriter(tmp_path, sample_shape=(3,), shard_size=2, metadata={"vae": "b"})


def test_truncated_missing_and_mismatched_shards(tmp_path):
  _write_cache(tmp_path, [4, 4, 4])
  reader = latents.LatentCacheReader(tmp_path)
  shard = tmp_path / "shard_000001.npz"
  data = shard.read_bytes()
  shard.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"shard_000001.npz is truncated or corrupt.*build_latents"):
    reader.load_host_shard(0, 1)
  reader.load_host_shard(0, 2)  # the other host's shards are fine
  with pytest.raises(ValueError, match="truncated or corrupt"):
    reader.load_host_shard(1, 2)
  shard.unlink()
  with pytest.raises(FileNotFoundError, match="shard_000001.npz .* is missing"):
    reader.load_host_shard(1, 2)
  np.savez(shard, latents=np.zeros((3, 2, 2, 3), np.float32), labels=np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="the index says"):
    reader.load_host_shard(1, 2)
  np.savez(shard, latents=np.zeros((4, 2, 2, 2), np.float32), labels=np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="the index says"):
    reader.load_host_shard(1, 2)


def test_reader_errors_say_to_build(tmp_path):
  with pytest.raises(FileNotFoundError, match="--mode=build_latents"):
    latents.LatentCacheReader(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="--mode=build_latents"):
    latents.LatentCacheReader("")
  writer = latents.LatentCacheWriter(tmp_path, sample_shape=(2,), shard_size=2)
  writer.write_shard(0, np.zeros((2, 2)), np.array([0, 1]))
  with pytest.raises(FileNotFoundError, match=r"index.json is missing.*--mode=build_latents"):
    latents.LatentCacheReader(tmp_path)
  writer.finalize(2)
  with pytest.raises(ValueError, match="too few for 2 hosts"):
    latents.LatentCacheReader(tmp_path).load_host_shard(1, 2)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_latents_are_class_conditional_and_deterministic(tmp_path):
  latents.write_synthetic_latents(tmp_path / "a", num_classes=3, per_class=40, sample_shape=(4, 4, 2), seed=1,
                                  shard_size=32)
  latents.write_synthetic_latents(tmp_path / "b", num_classes=3, per_class=40, sample_shape=(4, 4, 2), seed=1,
                                  shard_size=32)
  reader = latents.LatentCacheReader(tmp_path / "a")
  assert reader.num_examples == 120 and len(reader.shards) == 4 and reader.sample_shape == (4, 4, 2)
  x, y = reader.load_host_shard(0, 1)
  x_b, y_b = latents.LatentCacheReader(tmp_path / "b").load_host_shard(0, 1)
  np.testing.assert_array_equal(x, x_b)
  np.testing.assert_array_equal(y, y_b)
  assert np.bincount(y).tolist() == [40, 40, 40]
  means = np.stack([x[y == c].mean(0) for c in range(3)])
  spread = np.sqrt(np.mean([x[y == c].var(0).mean() for c in range(3)]))
  assert abs(spread - 0.5) < 0.05  # the noise level
  # Class means differ by far more than their estimation error.
  for a in range(3):
    for b in range(a):
      assert np.sqrt(np.mean((means[a] - means[b]) ** 2)) > 1.0


def test_training_data_from_latent_caches(tmp_path, monkeypatch):
  config = mnist_tiny.get_config()
  config.data.name = "synthetic_latents"
  config.data.data_dir = ""
  config.data.num_classes = 4
  config.data.image_size = 2
  config.data.channels = 4
  monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
  data = train_data.load_training_data(config)  # made on the spot in the temp dir
  assert data.samples.shape == (4 * 64, 2, 2, 4) and data.samples.dtype == np.float32
  assert not data.replicated and data.num_classes == 4
  (made,) = [p for p in tmp_path.iterdir() if p.name.startswith("drifting_jax_synthetic_latents_")]
  assert (made / latents.INDEX_FILE).is_file()
  # A given data_dir without a cache is filled; "latents" reads an existing cache.
  config.data.data_dir = str(tmp_path / "synthetic")
  train_data.load_training_data(config)
  config.data.name = "latents"
  again = train_data.load_training_data(config)
  np.testing.assert_array_equal(again.samples, data.samples)
  config.data.data_dir = str(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="build_latents"):
    train_data.load_training_data(config)


def test_fresh_sampler_draws_distinct_samples_of_each_class_per_step():
  """FHM's sampler: Npos distinct training samples of each class, a pure function of (seed, step)."""
  import ml_collections
  from drifting_jax.train import data as train_data

  labels = np.repeat(np.arange(4), 10).astype(np.int32)
  samples = (np.arange(40, dtype=np.float32)[:, None, None, None] + np.zeros((40, 2, 2, 1), np.float32))
  data = train_data.TrainingData(samples, labels, num_classes=4, seed=3)
  t = ml_collections.ConfigDict(dict(classes_per_step=2, pos_per_class=10, neg_per_class=6, push_per_step=8,
                                     positive_bank_size=4, negative_bank_size=4, bank_dtype="float32"))
  source = train_data.FreshSource(data, t)
  batch = source.draw(step=5)
  assert batch["positives"].shape == (2, 10, 2, 2, 1) and batch["negatives"].shape == (2, 6, 2, 2, 1)
  for row, c in enumerate(batch["labels"]):
    ids = batch["positives"][row, :, 0, 0, 0].astype(int)
    assert sorted(ids) == list(range(10 * c, 10 * c + 10))  # all 10 of the class, each once
  negatives = batch["negatives"][..., 0, 0, 0].reshape(-1).astype(int)
  assert len(set(negatives)) == 12  # distinct unconditional samples
  again = train_data.FreshSource(data, t).draw(step=5)
  for k in batch:
    np.testing.assert_array_equal(batch[k], again[k])  # resumable: nothing but (seed, step) matters
  assert not np.array_equal(source.draw(step=6)["negatives"], batch["negatives"])
  assert source.state_dict() == {}
  t.pos_per_class = 11
  with pytest.raises(ValueError, match="fewer samples on this host"):
    train_data.FreshSource(data, t)
