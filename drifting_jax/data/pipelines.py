"""Image data sets from tensorflow-datasets: in memory (MNIST-like) or streamed in batches.

Two entry points:

* `load_in_memory(name, split)`: a whole small, fixed-size data set (`mnist`,
  `fashion_mnist`) as uint8 images `[N, H, W, C]` and int32 labels `[N]`;
* `image_batches(dataset, split, ...)`: this host's part of a split as a
  deterministic iterator of fixed-size batches (what `--mode=build_latents`
  encodes), with the last batch padded and flagged by `valid`.

Nothing is downloaded: the data must already be prepared in a tfds data dir
(`tfds build <name> --data_dir=DIR` on a machine with network; ImageNet also needs
its manual download). A data set that is not there raises `FileNotFoundError`
saying what to build and where to put it.

Preprocessing for `image_batches`:

* data sets with images of varying size (ImageNet, `imagenet2012`): the release's
  ADM-style center crop (`center_crop_arr`): JPEG decoded and converted to RGB by
  PIL, halved with a BOX filter while the short side is >= 2 * image_size, resized
  with BICUBIC so the short side is image_size, then center-cropped to a square;
* fixed-size data sets (MNIST-like): optional black padding centered to `pad_to`
  (28 -> 32 for a VAE with 8x downsampling), optional grayscale -> RGB by
  repeating the channel. The result must be image_size on a side.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from drifting_jax import errors

# Images per tf.data batch while reading a whole split into memory.
_READ_CHUNK = 4096

log = logging.getLogger(__name__)


def _tfds():
  # Imported on first use: tensorflow is slow to import and unneeded by most jobs.
  import tensorflow_datasets as tfds
  return tfds


def _tf():
  import tensorflow as tf  # imported on first use, like tensorflow_datasets above: slow to import
  return tf


def _builder(name: str, data_dir: Optional[str]):
  tfds = _tfds()
  return tfds.builder(name, data_dir=data_dir or None)


def _missing_message(name: str, split: Any, data_dir: Optional[str], looked_in: str) -> str:
  where = data_dir or "tfds's default data dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
  if name.startswith("imagenet2012"):
    how = (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into DIR/downloads/manual and run "
           f"`tfds build {name} --data_dir=DIR --manual_dir=DIR/downloads/manual`")
  else:
    how = f"run `tfds build {name} --data_dir=DIR`"
  return (f"tfds data set {name!r} (split {split}) is not prepared in {where} (looked in {looked_in}), and "
          f"nothing is downloaded here. On a machine with network {how}, copy DIR to this machine and pass "
          f"--config.data.data_dir=DIR (or set TFDS_DATA_DIR=DIR).")


def _as_dataset(builder, split: Any, data_dir: Optional[str], decoders: Optional[dict] = None):
  """`(image, label)` dataset of a split, files in order; FileNotFoundError when not prepared."""
  tfds = _tfds()
  try:
    return builder.as_dataset(split=split, as_supervised=True, shuffle_files=False, decoders=decoders,
                              read_config=tfds.ReadConfig(try_autocache=False))
  except AssertionError as e:
    # tfds asserts when the files are missing; the check is done after the call
    # so that tfds.testing.mock_data, which fakes as_dataset only, still works.
    if builder.is_prepared():
      raise
    raise errors.MissingFileError(_missing_message(builder.name, split, data_dir, str(builder.data_dir))) from e


def _image_info(builder) -> tuple[str, tuple[Optional[int], ...]]:
  """(feature name, shape) of the image of the builder's (image, label) pairs."""
  keys = builder.info.supervised_keys
  if not keys or len(keys) != 2 or not isinstance(keys[0], str):
    raise ValueError(f"tfds data set {builder.name!r} has no (image, label) supervised keys (got {keys!r})")
  feature = builder.info.features[keys[0]]
  return keys[0], tuple(feature.shape)


def _num_examples(builder, split: str) -> Optional[int]:
  """Examples in `split` per the prepared metadata; None when unknown (e.g. mocked data)."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError):
    return None


def load_in_memory(name: str, split: str, data_dir: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
  """A whole split of a small fixed-size image data set (mnist, fashion_mnist).

  Args:
    name: tfds name, e.g. "mnist" or "fashion_mnist".
    split: tfds split, e.g. "train", "test" or "train[:5000]".
    data_dir: tfds data dir holding the prepared data set (None: tfds's default).

  Returns:
    (images uint8 [N, H, W, C], labels int32 [N]), in the data set's stored order;
    [N, 28, 28, 1] for MNIST-like sets.

  Raises:
    FileNotFoundError: the data set is not prepared in data_dir.
    ValueError: images of varying size (stream those with `image_batches`).
  """
  builder = _builder(name, data_dir)
  _, shape = _image_info(builder)
  if None in shape:
    raise ValueError(f"load_in_memory is for small fixed-size image sets such as mnist; {name!r} has images of "
                     f"shape {shape}: use image_batches")
  ds = _as_dataset(builder, split, data_dir).batch(_READ_CHUNK)
  images, labels = [], []
  for image, label in _tfds().as_numpy(ds):
    images.append(np.asarray(image, np.uint8))
    labels.append(np.asarray(label, np.int32))
  if not images:
    raise ValueError(f"tfds data set {name!r} split {split!r} is empty")
  return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------- preprocessing


def center_crop_arr(image: Any, image_size: int) -> np.ndarray:
  """The release's (ADM's) center crop: uint8 [image_size, image_size, C] of a PIL image or array.

  Halves with a BOX filter while the short side is at least 2 * image_size (cheap,
  alias-free downsampling), resizes with BICUBIC so the short side is image_size,
  then crops the center. Same code as `center_crop_arr` in the release's
  dataset/latent.py.
  """

  pil_image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def decode_and_center_crop(encoded: bytes, image_size: int) -> np.ndarray:
  """Encoded image bytes -> RGB uint8 [image_size, image_size, 3], as the release prepares ImageNet.

  The release reads ImageNet with torchvision's ImageFolder, i.e. PIL decoding and
  `.convert("RGB")`; decoding here with PIL too (rather than tf.image) keeps the
  pixels identical, as JPEG decoders differ in their IDCT.
  """

  with Image.open(io.BytesIO(encoded)) as img:
    rgb = img.convert("RGB")
  return center_crop_arr(rgb, image_size)


# ----------------------------------------------------------------------------- batches


def host_split(split: str, process_index: int, process_count: int):
  """This host's part of `split`: contiguous, disjoint, together all of it (tfds even splits).

  With 11 examples over 3 hosts the parts hold 4, 4 and 3 examples.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return _tfds().split_for_jax_process(split, process_index=process_index, process_count=process_count)


def image_batches(dataset: str, split: str, *, data_dir: Optional[str], batch_size: int, image_size: int,
                  process_index: int, process_count: int, pad_to: int = 0,
                  to_rgb: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """This host's part of a tfds split, in stored order (no shuffling), in fixed-size batches.

  Host p reads the p-th of `process_count` contiguous, disjoint parts of the split
  (`host_split`); the parts together hold every example once. The sequence is the
  same on every run, which is what lets `build_latents` resume by batch index.

  Args:
    dataset: tfds name: "imagenet2012" (varying image sizes: center crop), or a
      fixed-size set such as "mnist" / "fashion_mnist" (optional pad and RGB).
    split: tfds split, e.g. "train".
    data_dir: tfds data dir (None: tfds's default).
    batch_size: examples per batch.
    image_size: side of the output images; for fixed-size sets it must equal the
      side after padding (e.g. 32 with pad_to=32 for MNIST).
    process_index, process_count: this host and the number of hosts.
    pad_to: fixed-size sets: black padding centered to this side (0: none).
    to_rgb: fixed-size sets: repeat a grayscale channel to 3 channels.

  Returns:
    An iterator of {"image": uint8 [batch_size, image_size, image_size, 3 or C],
    "label": int32 [batch_size], "valid": bool [batch_size]}; only the last batch
    has padding rows (zeros, valid=False). A host whose part is empty gets none.

  Raises (on the call, not on the first batch):
    FileNotFoundError: the data set is not prepared in data_dir.
    ValueError: inconsistent sizes (image_size, pad_to) for the data set.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  tf, tfds = _tf(), _tfds()
  builder = _builder(dataset, data_dir)
  key, shape = _image_info(builder)

  if None in shape:  # varying sizes: decode with PIL and center-crop like the release
    if pad_to:
      raise ValueError(f"pad_to is for fixed-size images; {dataset!r} is center-cropped to image_size instead")
    decoders = {key: tfds.decode.SkipDecoding()}

    def preprocess(encoded, label):
      image = tf.numpy_function(lambda b: decode_and_center_crop(b, image_size), [encoded], tf.uint8,
                                stateful=False)
      image.set_shape((image_size, image_size, 3))
      return image, label
  else:
    h, w, c = shape
    side = pad_to or h
    if pad_to and pad_to < max(h, w):
      raise ValueError(f"pad_to={pad_to} is smaller than the {h}x{w} images of {dataset!r}")
    if h != w or side != image_size:
      raise ValueError(f"{dataset!r} has {h}x{w} images, {side}x{side} after pad_to={pad_to}, but image_size is "
                       f"{image_size}: set image_size to {side} or pad_to to {image_size}")
    decoders = None
    top, left = (side - h) // 2, (side - w) // 2

    def preprocess(image, label):
      if pad_to:  # black (0) borders, the digit centered
        image = tf.pad(image, [[top, side - h - top], [left, side - w - left], [0, 0]])
      if to_rgb and c == 1:
        image = tf.tile(image, [1, 1, 3])
      return image, label

  total = _num_examples(builder, split)
  if total is not None and process_index >= total:
    log.warning("%s[%s] has %d examples, fewer than the %d hosts: host %d has none", dataset, split, total,
                process_count, process_index)
    return iter(())
  ds = _as_dataset(builder, host_split(split, process_index, process_count), data_dir, decoders=decoders)
  options = tf.data.Options()
  options.deterministic = True  # parallel map, same order on every run
  ds = ds.with_options(options).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return _padded_batches(tfds.as_numpy(ds.batch(batch_size).prefetch(2)), batch_size)


def _padded_batches(batches, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  for images, labels in batches:
    n = len(labels)
    valid = np.zeros((batch_size,), bool)
    valid[:n] = True
    if n < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros((batch_size - n,), labels.dtype)])
    yield {"image": np.asarray(images, np.uint8), "label": np.asarray(labels, np.int32), "valid": valid}
