"""What the training loop needs of the data: a deterministic, per-host stream.

`TrainingData` holds this host's share of the training set in memory (model range:
pixels in [-1, 1], latents as cached) and answers two questions, both pure
functions of (seed, step, process index), so a resumed run sees the same stream:

* `push_batch(step, n)`: the n samples pushed into the memory banks at `step`;
* `step_classes(step, n)`: the n distinct classes trained on at `step` (the
  paper's class-balanced "specialized sampler": N classes per step, a fixed number
  of positives per class, drawn from the banks).

Two layouts over hosts:

* replicated (in-memory data sets such as MNIST): every host holds all the data
  and draws the *global* stream (the seed does not involve the process index);
  each host pushes the whole global batch into its banks and trains on its slice
  of the global classes. A run on P processes then computes exactly what one
  process computes, which is what the multi-process tests check.
* sharded (latent caches, ImageNet scale): each host holds its own shard and draws
  its own stream (the release's behaviour); banks differ between hosts.

A latent cache built with mirror images (`flipped`) gives each drawn sample the
latent of the image or of its mirror image with probability 1/2 each, as the
release's loader does. Latents stay in the cache's dtype in host memory (float16
halves it) and are cast to float32 when drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import ml_collections
import numpy as np

from drifting_jax.train import images as image_utils


@dataclasses.dataclass
class TrainingData:
  samples: np.ndarray      # [N, H, W, C] float32 (or a smaller float dtype)
  labels: np.ndarray       # [N] int32
  num_classes: int
  seed: int
  process_index: int = 0
  replicated: bool = True  # every host holds all data and draws the global stream
  flipped: Optional[np.ndarray] = None  # [N, H, W, C]: the mirror images' latents, drawn half the time

  def __post_init__(self):
    if self.samples.shape[0] != self.labels.shape[0] or self.samples.shape[0] == 0:
      raise ValueError(f"need as many labels as samples (> 0), got {self.samples.shape[0]} and "
                       f"{self.labels.shape[0]}")
    if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
      raise ValueError(f"labels must be in [0, {self.num_classes}), got [{self.labels.min()}, {self.labels.max()}]")
    if self.flipped is not None and self.flipped.shape != self.samples.shape:
      raise ValueError(f"flipped views {self.flipped.shape} must match the samples {self.samples.shape}")

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return tuple(self.samples.shape[1:])

  def _rng(self, step: int, stream: int, salt: int = 0) -> np.random.Generator:
    host = 0 if self.replicated else self.process_index + 1
    return np.random.default_rng([self.seed, int(step), host, stream, salt])

  def push_batch(self, step: int, n: int, salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(samples float32 [n, H, W, C], labels [n]): n draws with replacement, a pure function of the step."""
    rng = self._rng(step, 0, salt)
    idx = rng.integers(0, self.labels.shape[0], size=n)
    samples = self.samples[idx]
    if self.flipped is not None:
      mirror = rng.random(n) < 0.5
      samples[mirror] = self.flipped[idx[mirror]]
    return samples.astype(np.float32, copy=False), self.labels[idx]

  def step_classes(self, step: int, n: int) -> np.ndarray:
    return np.sort(self._rng(step, 1).choice(self.num_classes, size=n, replace=False)).astype(np.int32)


def pad_images(images: np.ndarray, pad_to: int, black: float = -1.0) -> np.ndarray:
  """Centers [N, H, W, C] images on a black pad_to x pad_to canvas (0: unchanged).

  Black is -1 in model range (the default) and 0 for uint8 images.
  """
  if not pad_to:
    return images
  h = images.shape[1]
  if pad_to < h:
    raise ValueError(f"data.pad_to={pad_to} is smaller than the images ({h})")
  lo = (pad_to - h) // 2
  return np.pad(images, ((0, 0), (lo, pad_to - h - lo), (lo, pad_to - h - lo), (0, 0)), constant_values=black)


def load_training_data(config: ml_collections.ConfigDict) -> TrainingData:
  """This host's training data for `config.data` (see configs/default.py)."""
  name = config.data.name
  process_index, process_count = jax.process_index(), jax.process_count()
  flipped = None
  if name == "mnist5k":
    from drifting_jax.data.mnist5k import load_mnist5k
    raw, labels = load_mnist5k("train")
    samples = image_utils.uint8_to_model(raw)
    replicated = True
  elif name in ("mnist", "fashion_mnist"):
    from drifting_jax.data import pipelines
    raw, labels = pipelines.load_in_memory(name, split="train", data_dir=config.data.data_dir or None)
    samples = image_utils.uint8_to_model(raw)
    replicated = True
  elif name in ("latents", "synthetic_latents"):
    from drifting_jax.data import latents
    data_dir = config.data.data_dir
    if name == "synthetic_latents":
      # Made on the spot (deterministic in the seed; every host makes the same) when
      # data_dir is empty or holds no finished cache, so smoke runs need no files.
      data_dir = latents.ensure_synthetic_latents(
          data_dir or None, num_classes=int(config.data.num_classes),
          per_class=int(config.data.get("synthetic_per_class", 64)),
          sample_shape=(config.data.image_size, config.data.image_size, config.data.channels),
          seed=int(config.seed))
    reader = latents.LatentCacheReader(data_dir)
    samples, labels = reader.load_host_shard(process_index, process_count)
    if reader.flipped and config.data.get("latent_flip", True):
      flipped, _ = reader.load_host_shard(process_index, process_count, view="latents_flip")
    replicated = False
  else:
    raise ValueError(f"unknown data.name {name!r}; expected mnist5k, mnist, fashion_mnist, latents or "
                     f"synthetic_latents")
  samples = pad_images(samples, int(config.data.pad_to))
  if flipped is not None:
    flipped = pad_images(flipped, int(config.data.pad_to))
  expected = (config.data.image_size, config.data.image_size, config.data.channels)
  if samples.shape[1:] != expected:
    raise ValueError(f"data {name!r} has samples of shape {samples.shape[1:]}, config expects {expected} "
                     f"(data.image_size, data.channels, data.pad_to)")
  return TrainingData(samples, np.asarray(labels, np.int32), int(config.data.num_classes), int(config.seed),
                      process_index, replicated, flipped)
