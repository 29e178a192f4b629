r"""The project's own digit classifier: the feature space of the offline metrics.

For grayscale data sets (MNIST, Fashion-MNIST, the bundled MNIST-5k) the FID
Inception is the wrong instrument, so the project trains a small CNN once, on the
data set's held-out part (digits the generator never sees), and evaluates
generators in its feature space (`drifting_jax.eval.offline`).

Model (`DigitClassifier`): two conv(3x3) + ReLU + 2x2 max-pool stages, a dense
`feature_dim` layer and a linear `num_classes` head. The evaluation features are
the dense layer's pre-activations: unlike post-ReLU values they have no dead
coordinates, so their covariance is full rank and the Frechet distance is well
conditioned. No batch norm: the artifact format stores `params` only.

It is an artifact kind like the generator (`artifacts.KINDS["classifier"]`):

    artifacts.save(path, module, params, kind="classifier")
    module, params, metadata = artifacts.load(path, kind="classifier")

`train_classifier` trains it on uint8 images; the `train_classifier` mode
(`drifting_jax.eval.classifier_job`) runs that on a config's data and writes the
artifact with its reference statistics.

Images are in the generator's range [-1, 1], shaped `[N, S, S, C]`.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


# Training defaults: 1000 MNIST digits reach >= 90% accuracy on unseen digits in
# about a minute of 2-core CPU (see tests/test_offline_eval.py for a shorter run).
DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 1e-3
# Random shifts of up to this many pixels: digits are centred by their centre of
# mass, so small translations are the natural variation between writers.
DEFAULT_MAX_SHIFT = 2
# Images per forward pass when computing features.
DEFAULT_EVAL_BATCH_SIZE = 500
# The background value of a model-range image (black).
_BACKGROUND = -1.0


class DigitClassifier(nn.Module):
  """Small CNN for `input_size` x `input_size` x `in_channels` images in [-1, 1].

  `__call__(images)` returns `(features [N, feature_dim], logits [N, num_classes])`.
  """

  num_classes: int = 10
  input_size: int = 28
  in_channels: int = 1
  conv_widths: tuple[int, ...] = (32, 64)
  feature_dim: int = 128

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, Array]:
    x = images.astype(jnp.float32)
    for i, width in enumerate(self.conv_widths):
      x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"conv_{i}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    features = nn.Dense(self.feature_dim, name="features")(x)
    logits = nn.Dense(self.num_classes, name="logits")(nn.relu(features))
    return features, logits


CONFIG_KEYS = ("num_classes", "input_size", "in_channels", "conv_widths", "feature_dim")


def build_module(model_config: Mapping[str, Any]) -> DigitClassifier:
  """`DigitClassifier` from a `model_config` dict (e.g. an artifact's metadata)."""
  unknown = sorted(set(model_config) - set(CONFIG_KEYS))
  if unknown:
    raise ValueError(f"unknown classifier config keys {unknown}; valid keys: {sorted(CONFIG_KEYS)}")
  config = dict(model_config)
  if "conv_widths" in config:  # JSON stores tuples as lists; the module must stay hashable for jit
    config["conv_widths"] = tuple(int(w) for w in config["conv_widths"])
  module = DigitClassifier(**config)
  problems = [f"{field} must be >= 1, got {getattr(module, field)}"
              for field in ("num_classes", "input_size", "in_channels", "feature_dim")
              if int(getattr(module, field)) < 1]
  if not module.conv_widths or min(module.conv_widths) < 1:
    problems.append(f"conv_widths must be non-empty positive widths, got {module.conv_widths}")
  if problems:
    raise ValueError("invalid classifier config: " + "; ".join(problems))
  return module


def example_inputs(model_config: Mapping[str, Any], batch_size: int = 1) -> tuple[tuple, dict]:
  """Positional and keyword arguments for `module.init` (only a 'params' rng needed)."""
  module = build_module(model_config)
  return (jnp.zeros((batch_size, module.input_size, module.input_size, module.in_channels), jnp.float32),), {}


def _check_images(module: DigitClassifier, images: Any) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim == 3 and module.in_channels == 1:
    images = images[..., None]
  expected = (module.input_size, module.input_size, module.in_channels)
  if images.ndim != 4 or images.shape[1:] != expected:
    raise ValueError(f"the classifier takes [N, {expected[0]}, {expected[1]}, {expected[2]}] images in [-1, 1], "
                     f"got shape {images.shape} (padded data? check data.pad_to against the classifier's "
                     f"input_size)")
  return images


def _check_labels(labels: Any, num_images: int, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be {num_images} integer class ids, got {labels.dtype} array of shape {labels.shape}")
  if num_images and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
  return labels.astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(module: DigitClassifier, params: Any, images: Array) -> tuple[Array, Array]:
  return module.apply({"params": params}, images)


def features_and_logits(module: DigitClassifier, params: Any, images_model_range: Any, *,
                        batch_size: int = DEFAULT_EVAL_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """`(features [N, feature_dim], logits [N, num_classes])` as float32 numpy arrays.

  Images go through in batches of `batch_size`; the last batch is padded to the same
  size, so one compilation serves every call with that batch size.
  """
  images = _check_images(module, images_model_range)
  num_images = len(images)
  size = max(1, min(batch_size, num_images))
  features = np.empty((num_images, module.feature_dim), np.float32)
  logits = np.empty((num_images, module.num_classes), np.float32)
  for start in range(0, num_images, size):
    block = images[start:start + size]
    count = len(block)
    if count < size:
      block = np.concatenate([block, np.full((size - count, *block.shape[1:]), _BACKGROUND, np.float32)])
    block_features, block_logits = _forward(module, params, jnp.asarray(block))
    features[start:start + count] = np.asarray(block_features)[:count]
    logits[start:start + count] = np.asarray(block_logits)[:count]
  return features, logits


def accuracy(module: DigitClassifier, params: Any, images_model_range: Any, labels: Any) -> float:
  """Fraction of `images_model_range` whose predicted class is `labels`."""
  _, logits = features_and_logits(module, params, images_model_range)
  labels = _check_labels(labels, len(logits), module.num_classes)
  return float(np.mean(np.argmax(logits, axis=1) == labels))


# ----------------------------------------------------------------------------- training


def _shift(images: Array, rng: Array, max_shift: int) -> Array:
  """Each image moved by its own random offset in [-max_shift, max_shift]^2, black fill."""
  size = images.shape[1]
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                   constant_values=_BACKGROUND)
  offsets = jax.random.randint(rng, (images.shape[0], 2), 0, 2 * max_shift + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (size, size, image.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


@functools.lru_cache(maxsize=16)
def _optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
  """Adam with a cosine-decayed rate; cached, so equal settings reuse the compiled step."""
  return optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05))


@functools.partial(jax.jit, static_argnames=("module", "optimizer", "max_shift"))
def _train_step(module: DigitClassifier, optimizer: optax.GradientTransformation, max_shift: int,
                params: Any, opt_state: Any, images: Array, labels: Array, rng: Array):
  if max_shift:
    images = _shift(images, rng, max_shift)

  def loss_fn(p):
    _, logits = module.apply({"params": p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def train_classifier(
    images_uint8: Any,
    labels: Any,
    *,
    num_classes: int,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    augment: bool = True,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    max_shift: int = DEFAULT_MAX_SHIFT,
    model_config: Optional[Mapping[str, Any]] = None,
) -> tuple[DigitClassifier, Any, dict[str, float]]:
  """Train a `DigitClassifier` on uint8 `[N, S, S, C]` (or `[N, S, S]`) images.

  Adam with a cosine-decayed learning rate, cross-entropy, mini-batches drawn as
  shuffled epochs; with `augment`, every batch is randomly shifted by up to
  `max_shift` pixels. The result is a pure function of the inputs and `seed`.
  `model_config` overrides the module's fields (the input shape comes from the
  images).

  Returns `(module, params, metrics)`, metrics with `steps`, `seconds`,
  `final_loss` (mean over the last tenth of the steps) and `train_accuracy` (on the
  un-augmented training images).
  """
  raw = np.asarray(images_uint8)
  if raw.dtype != np.uint8:
    raise ValueError(f"train_classifier takes uint8 images, got {raw.dtype}")
  if raw.ndim == 3:
    raw = raw[..., None]
  if raw.ndim != 4 or raw.shape[1] != raw.shape[2]:
    raise ValueError(f"images must be [N, S, S, C] (or [N, S, S]), got shape {raw.shape}")
  labels = _check_labels(labels, len(raw), num_classes)
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
  module = build_module({"num_classes": num_classes, "input_size": raw.shape[1], "in_channels": raw.shape[3],
                         **dict(model_config or {})})
  # uint8 -> the generator's range [-1, 1] (as data.images.uint8_to_model; models import no data code)
  images = raw.astype(np.float32) / 127.5 - 1.0
  _check_images(module, images)

  init_rng, shift_rng = jax.random.split(jax.random.key(seed))
  example = example_inputs({"input_size": module.input_size, "in_channels": module.in_channels}, 1)[0]
  optimizer = _optimizer(float(learning_rate), int(steps))
  # One compiled program for the initial params and optimizer state (op by op, each leaf's
  # initializer compiles on its own).
  params, opt_state = jax.jit(lambda key: (lambda p: (p, optimizer.init(p)))(
      module.init(key, *example)["params"]))(init_rng)
  device_images, device_labels = jnp.asarray(images), jnp.asarray(labels)
  batch_size = min(batch_size, len(images))
  order_rng = np.random.default_rng(seed)
  order = np.empty(0, np.int64)
  losses = []
  start = time.perf_counter()
  for step in range(steps):
    if len(order) < batch_size:  # a new epoch; leftovers of the last one go first
      order = np.concatenate([order, order_rng.permutation(len(images))])
    batch, order = jnp.asarray(order[:batch_size]), order[batch_size:]
    params, opt_state, loss = _train_step(
        module, optimizer, max_shift if augment else 0, params, opt_state,
        device_images[batch], device_labels[batch], jax.random.fold_in(shift_rng, step))
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses))
  metrics = {
      "steps": int(steps),
      "seconds": time.perf_counter() - start,
      "final_loss": float(losses[-max(1, steps // 10):].mean()),
      "train_accuracy": accuracy(module, params, images, labels),
  }
  return module, params, metrics
