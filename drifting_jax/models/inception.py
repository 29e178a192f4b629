"""The InceptionV3 network of the FID and Inception Score literature, in Flax linen.

This is not torchvision's or Keras' InceptionV3 but the 2015 TensorFlow graph
(`pt_inception-2015-12-05`) that the original FID and IS code evaluated, as ported
by pytorch-fid and the JAX FID ports. It differs from the textbook network in ways
that change the numbers, so they are kept:

  * a 1008-way classifier (the graph's label map has 8 unused entries);
  * 3x3 average pools inside the blocks ignore the zero padding (their divisor is
    the number of real pixels in the window), and the last block (`Mixed_7c`)
    pools with a max instead of an average;
  * batch norm with epsilon 1e-3 and convolutions without biases;
  * inputs are resized to 299x299 with TensorFlow 1's legacy bilinear resize
    (`align_corners=False` without half-pixel centres, see `resize_bilinear_legacy`)
    and mapped from [0, 255] to [-1, 1) by `(x - 128) / 128`.

Outputs (`InceptionOutputs`): the 2048-d `pool_features` (the graph's `pool_3`,
used for FID and precision/recall), `logits` (with the classifier bias) and
`logits_unbiased` (the plain product of `pool_3` and the classifier weights). The
original Inception Score code, the release and torch-fidelity compute IS from the
softmax of `logits_unbiased`.

Weights. The standard weights file of the JAX FID ports is a pickle,
`inception_v3_weights_fid.pickle` (`WEIGHTS_URL`, md5 `WEIGHTS_MD5`): a dict from
the graph's block names (`Conv2d_1a_3x3`, ..., `Mixed_7c`, `fc`) to nested dicts of
numpy arrays. A basic convolution stores `{"conv": {"kernel": HWIO}, "bn": {"scale",
"bias", "mean", "var"}}`; `fc` stores `{"kernel": (2048, 1008), "bias": (1008,)}`;
a mixed block maps branch names (`branch1x1`, `branch5x5_1`, ...) to basic
convolutions. Modules here carry exactly those names, so the file maps one to one
onto the Flax variables (`mean`/`var` go to `batch_stats`, the rest to `params`).
It cannot be downloaded at run time: put it at `$DRIFTING_JAX_INCEPTION` or
`~/.cache/drifting_jax/inception/inception_v3_weights_fid.pickle`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import tempfile
from typing import Any, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from drifting_jax import errors
from drifting_jax.models.vae import map_in_chunks

Array = jax.Array
PathLike = Union[str, os.PathLike]

WEIGHTS_FILENAME = "inception_v3_weights_fid.pickle"
WEIGHTS_URL = "https://dl.dropboxusercontent.com/s/xt6zvlvt22dcwck/inception_v3_weights_fid.pickle"
WEIGHTS_MD5 = "ce58f6044b0bf244c4e3185158b7fece"
WEIGHTS_ENV_VAR = "DRIFTING_JAX_INCEPTION"
DEFAULT_WEIGHTS_PATH = pathlib.Path("~/.cache/drifting_jax/inception") / WEIGHTS_FILENAME

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
# Smallest input the stride-2 stem and reduction blocks leave a non-empty map for.
MIN_INPUT_SIZE = 75

# Leaves that hold running statistics rather than trained parameters.
_BATCH_STATS_LEAVES = ("mean", "var")


# ----------------------------------------------------------------------------- network


class ConvBN(nn.Module):
  """Convolution without bias, inference-mode batch norm (epsilon 1e-3), ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Union[str, Sequence[tuple[int, int]]] = "VALID"
  dtype: Any = jnp.float32
  precision: Optional[jax.lax.Precision] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=self.padding, use_bias=False,
                dtype=self.dtype, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


def _same_padding(kernel_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding that keeps the spatial size for an odd stride-1 kernel."""
  return tuple((k // 2, k // 2) for k in kernel_size)  # type: ignore[return-value]


def _avg_pool_3x3(x: Array) -> Array:
  # The padded zeros are not counted: each output averages only real pixels.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """Base of the mixed blocks: `conv(name, features, kernel, ...)` builds a named ConvBN."""

  dtype: Any = jnp.float32
  precision: Optional[jax.lax.Precision] = None

  def conv(self, name: str, features: int, kernel_size: tuple[int, int], *, strides: tuple[int, int] = (1, 1),
           same: bool = True) -> ConvBN:
    padding = _same_padding(kernel_size) if same else "VALID"
    return ConvBN(features, kernel_size, strides=strides, padding=padding, dtype=self.dtype,
                  precision=self.precision, name=name)


class InceptionA(_Block):
  """35x35 block (`Mixed_5b`..`Mixed_5d`): 1x1, 5x5, double 3x3 and pooled branches."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = self.conv("branch1x1", 64, (1, 1))(x)
    b5 = self.conv("branch5x5_1", 48, (1, 1))(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5))(b5)
    b3 = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
    b3 = self.conv("branch3x3dbl_2", 96, (3, 3))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3))(b3)
    bp = self.conv("branch_pool", self.pool_features, (1, 1))(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """35x35 -> 17x17 reduction (`Mixed_6a`)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = self.conv("branch3x3", 384, (3, 3), strides=(2, 2), same=False)(x)
    bd = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3))(bd)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=(2, 2), same=False)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(_Block):
  """17x17 block with factorised 7x7 convolutions (`Mixed_6b`..`Mixed_6e`)."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, (1, 1))(x)
    b7 = self.conv("branch7x7_1", c7, (1, 1))(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1))(b7)
    bd = self.conv("branch7x7dbl_1", c7, (1, 1))(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7))(bd)
    bp = self.conv("branch_pool", 192, (1, 1))(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """17x17 -> 8x8 reduction (`Mixed_7a`)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = self.conv("branch3x3_1", 192, (1, 1))(x)
    b3 = self.conv("branch3x3_2", 320, (3, 3), strides=(2, 2), same=False)(b3)
    b7 = self.conv("branch7x7x3_1", 192, (1, 1))(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=(2, 2), same=False)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(_Block):
  """8x8 block with split 1x3/3x1 branches (`Mixed_7b`, `Mixed_7c`).

  `max_pool` selects the FID graph's quirk for `Mixed_7c`: its pooled branch takes a
  3x3 max instead of the (padding-excluding) average used everywhere else.
  """

  max_pool: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = self.conv("branch1x1", 320, (1, 1))(x)
    b3 = self.conv("branch3x3_1", 384, (1, 1))(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448, (1, 1))(x)
    bd = self.conv("branch3x3dbl_2", 384, (3, 3))(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1))(bd)], axis=-1)
    pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
    bp = self.conv("branch_pool", 192, (1, 1))(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionOutputs(NamedTuple):
  """What the FID InceptionV3 computes for a batch of images."""

  pool_features: Array  # (B, 2048) `pool_3`: FID, precision/recall
  logits: Array  # (B, 1008) pool_3 @ fc.kernel + fc.bias
  logits_unbiased: Array  # (B, 1008) pool_3 @ fc.kernel: the Inception Score's logits


class InceptionV3(nn.Module):
  """FID InceptionV3 on preprocessed images (see `preprocess`).

  Inference only: batch norm always uses the stored running statistics.

  Attributes:
    dtype: computation dtype (float32 reproduces published numbers; others drift).
    precision: matmul/convolution precision; `None` is the backend default, which on
      TPUs and recent GPUs is lower than float32. Use `jax.lax.Precision.HIGHEST`
      for comparisons across hardware.
  """

  dtype: Any = jnp.float32
  precision: Optional[jax.lax.Precision] = None

  @nn.compact
  def __call__(self, x: Array) -> InceptionOutputs:
    """`x`: (B, H, W, 3) images in [-1, 1], normally 299x299 (see `preprocess`)."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"InceptionV3 expects (batch, height, width, 3) images, got shape {x.shape}")
    if min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"InceptionV3 needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels "
                       f"(normally {INPUT_SIZE}x{INPUT_SIZE}, see preprocess()), got {x.shape[1]}x{x.shape[2]}")
    kw = dict(dtype=self.dtype, precision=self.precision)
    x = x.astype(self.dtype)
    x = ConvBN(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3", **kw)(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3", **kw)(x)
    x = ConvBN(64, (3, 3), padding=((1, 1), (1, 1)), name="Conv2d_2b_3x3", **kw)(x)
    x = _max_pool_3x3_stride2(x)
    x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1", **kw)(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3", **kw)(x)
    x = _max_pool_3x3_stride2(x)
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)
    x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
    x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)
    x = InceptionE(max_pool=False, name="Mixed_7b", **kw)(x)
    x = InceptionE(max_pool=True, name="Mixed_7c", **kw)(x)
    pool_features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    fc = nn.Dense(NUM_CLASSES, dtype=jnp.float32, precision=self.precision, name="fc")
    logits = fc(pool_features)
    # The same product without the bias; reading the kernel after the call keeps a
    # single `fc` parameter set.
    kernel = fc.variables["params"]["kernel"]
    logits_unbiased = jnp.dot(pool_features, kernel, precision=self.precision)
    return InceptionOutputs(pool_features, logits, logits_unbiased)


# ----------------------------------------------------------------------------- preprocessing


def _legacy_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of TF1's ResizeBilinear (no corner alignment, no half-pixel).

  Output pixel `j` samples input coordinate `j * in_size / out_size`, interpolating
  between its floor and the next pixel, clamped at the border.
  """
  source = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lower = np.floor(source).astype(np.int32)
  frac = (source - lower).astype(np.float32)
  upper = np.minimum(lower + 1, in_size - 1)
  return np.minimum(lower, in_size - 1), upper, frac


def resize_bilinear_legacy(images: Array, size: int = INPUT_SIZE) -> Array:
  """Resize (B, H, W, C) images to (B, size, size, C) the way the FID graph does.

  This is TensorFlow 1's `resize_bilinear(align_corners=False)` without half-pixel
  centres, which the torchscript FID Inception reproduces with `grid_sample`. It
  does not anti-alias when shrinking.
  """
  images = jnp.asarray(images, jnp.float32)
  for axis, in_size in ((1, images.shape[1]), (2, images.shape[2])):
    if in_size == size:
      continue
    lower, upper, frac = _legacy_bilinear_taps(in_size, size)
    weight_shape = [1] * images.ndim
    weight_shape[axis] = size
    frac = jnp.asarray(frac).reshape(weight_shape)
    images = (jnp.take(images, lower, axis=axis) * (1.0 - frac) + jnp.take(images, upper, axis=axis) * frac)
  return images


def preprocess(images: Array, size: int = INPUT_SIZE) -> Array:
  """Pixel values in [0, 255] (B, H, W, 3), uint8 or float -> network input in [-1, 1).

  Resizes with `resize_bilinear_legacy`, then maps `x -> (x - 128) / 128`. Images in
  other ranges must be converted first (see `to_uint8`).
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected (batch, height, width, 3) images with values in [0, 255], got shape {images.shape}")
  return (resize_bilinear_legacy(images.astype(jnp.float32), size) - 128.0) / 128.0


def to_uint8(images: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Quantise float images to uint8 the way the release (and ADM) do before scoring.

  Values are mapped linearly from `value_range` to [0, 255], clipped and truncated
  (not rounded). NaNs become the low end of the range, +/-inf the ends.
  """
  low, high = value_range
  if not high > low:
    raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
  images = np.asarray(images, dtype=np.float32)
  images = np.nan_to_num(images, nan=low, posinf=high, neginf=low)
  return np.clip((images - low) / (high - low) * 255.0, 0.0, 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- weights


def default_weights_path() -> pathlib.Path:
  """`$DRIFTING_JAX_INCEPTION` if set, else `~/.cache/drifting_jax/inception/inception_v3_weights_fid.pickle`."""
  return pathlib.Path(os.environ.get(WEIGHTS_ENV_VAR) or DEFAULT_WEIGHTS_PATH).expanduser()


def abstract_variables() -> dict[str, Any]:
  """`jax.ShapeDtypeStruct` tree of the network's `params` and `batch_stats`."""
  model = InceptionV3()
  dummy = jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Unpickler that rebuilds numpy arrays and plain containers, and nothing else.

  Unpickling can run arbitrary code; a weights file has no reason to reference any
  global beyond numpy's array reconstruction helpers.
  """

  _ALLOWED = {
      ("numpy", "ndarray"), ("numpy", "dtype"),
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("collections", "OrderedDict"),
  }

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: an InceptionV3 weights pickle "
                                   f"holds only nested dicts of numpy arrays")
    return super().find_class(module, name)


def _missing_weights_message(path: pathlib.Path) -> str:
  return (f"InceptionV3 FID weights not found at {path}. Download {WEIGHTS_FILENAME} (md5 {WEIGHTS_MD5}) from\n"
          f"  {WEIGHTS_URL}\n"
          f"and save it as {DEFAULT_WEIGHTS_PATH}, or point ${WEIGHTS_ENV_VAR} (or the path argument) at it.")


def _to_variables(raw: Any, path: pathlib.Path) -> dict[str, Any]:
  """Split the file's nested dict into Flax `params` / `batch_stats`, checking every leaf."""
  if not isinstance(raw, dict):
    raise ValueError(f"{path} does not hold a dict of InceptionV3 weights (got {type(raw).__name__})")
  expected = traverse_util.flatten_dict(abstract_variables())
  stored = traverse_util.flatten_dict(raw)
  flat = {}
  problems = []
  for (collection, *key), spec in sorted(expected.items()):
    name = "/".join(key)
    value = stored.get(tuple(key))
    if value is None:
      problems.append(f"missing {name}: expected float{list(spec.shape)}")
      continue
    value = np.asarray(value)
    if value.shape != spec.shape or not np.issubdtype(value.dtype, np.floating):
      problems.append(f"wrong shape/dtype {name}: expected float{list(spec.shape)}, got {value.dtype}{list(value.shape)}")
      continue
    flat[(collection, *key)] = value.astype(np.float32)
  if problems:
    raise ValueError(f"{path} is not a valid InceptionV3 FID weights file ({len(problems)} problems):\n  "
                     + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
  # Entries the network does not use (e.g. the auxiliary classifier or all-zero conv
  # biases some exports carry) are ignored, as the FID ports do.
  return traverse_util.unflatten_dict(flat)


def load_inception_variables(path: Optional[PathLike] = None, *, expected_md5: Optional[str] = None) -> dict[str, Any]:
  """Read the standard FID InceptionV3 weights pickle into Flax variables.

  Args:
    path: the pickle; default `default_weights_path()`.
    expected_md5: if given (e.g. `WEIGHTS_MD5` for the official file), the file's
      md5 must match.

  Returns:
    `{"params": ..., "batch_stats": ...}` of numpy float32 arrays for `InceptionV3`.

  Raises:
    FileNotFoundError: no file at `path` (the message says where to get it).
    ValueError: the file is not such a pickle, fails the md5 check, or any weight is
      missing or mis-shaped (all problems are listed).
  """
  path = pathlib.Path(path).expanduser() if path is not None else default_weights_path()
  if not path.is_file():
    raise errors.MissingFileError(_missing_weights_message(path))
  data = path.read_bytes()
  if expected_md5 is not None:
    digest = hashlib.md5(data).hexdigest()
    if digest != expected_md5.lower():
      raise ValueError(f"{path} has md5 {digest}, expected {expected_md5}; the file is not the expected "
                       f"InceptionV3 weights (re-download it from {WEIGHTS_URL})")
  try:
    raw = _ArraysOnlyUnpickler(io.BytesIO(data)).load()
  except Exception as e:  # truncated data, foreign pickles and non-pickles raise many types
    raise ValueError(f"{path} is not a readable InceptionV3 weights pickle ({type(e).__name__}: {e})") from e
  return _to_variables(raw, path)


def save_inception_weights(variables: Any, path: PathLike) -> pathlib.Path:
  """Write `InceptionV3` variables in the standard weights-pickle format (atomically).

  The inverse of `load_inception_variables`: `params` and `batch_stats` are merged
  back into one nested dict per block, as numpy float32 arrays.
  """
  merged: dict[tuple[str, ...], np.ndarray] = {}
  for (collection, *key), value in traverse_util.flatten_dict(variables).items():
    if collection not in ("params", "batch_stats"):
      raise ValueError(f"unexpected variable collection {collection!r}; expected params and batch_stats")
    merged[tuple(key)] = np.asarray(value, dtype=np.float32)
  path = pathlib.Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
    pickle.dump(traverse_util.unflatten_dict(merged), f, protocol=4)
  os.replace(f.name, path)
  return path


# ----------------------------------------------------------------------------- extractor


class InceptionFeatureExtractor:
  """Jitted FID InceptionV3 on raw pixels, optionally replicated over a device mesh.

  Example:
    extractor = InceptionFeatureExtractor.load()
    out = extractor.features_in_chunks(to_uint8(samples), chunk_size=500)
    mu, sigma = metrics.compute_statistics(out.pool_features)
  """

  def __init__(self, variables: Any, *, mesh: Optional[Mesh] = None, dtype: Any = jnp.float32,
               precision: Optional[jax.lax.Precision] = None):
    self.module = InceptionV3(dtype=dtype, precision=precision)
    self.mesh = mesh
    variables = jax.tree.map(jnp.asarray, variables)
    if mesh is not None:
      variables = jax.device_put(variables, NamedSharding(mesh, P()))
    self.variables = variables
    self._apply = jax.jit(self._forward)

  @classmethod
  def load(cls, path: Optional[PathLike] = None, *, mesh: Optional[Mesh] = None, dtype: Any = jnp.float32,
           precision: Optional[jax.lax.Precision] = None,
           expected_md5: Optional[str] = None) -> "InceptionFeatureExtractor":
    """Extractor with the weights at `path` (see `load_inception_variables`)."""
    return cls(load_inception_variables(path, expected_md5=expected_md5), mesh=mesh, dtype=dtype,
               precision=precision)

  def _forward(self, variables: Any, images: Array) -> InceptionOutputs:
    return self.module.apply(variables, preprocess(images))

  def __call__(self, images: Array) -> InceptionOutputs:
    """(B, H, W, 3) pixels in [0, 255] (uint8 or float) -> `InceptionOutputs` (float32)."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected (batch, height, width, 3) images with values in [0, 255], got shape {images.shape}")
    return self._apply(self.variables, images)

  def features_in_chunks(self, images: Any, chunk_size: int) -> InceptionOutputs:
    """`__call__` over a large host array, `chunk_size` images at a time; numpy outputs.

    The last chunk is padded to `chunk_size` (one compiled shape) and the padding
    dropped. With a mesh, each chunk is split over all its devices, so `chunk_size`
    must be a multiple of the mesh size.
    """
    if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
      raise ValueError(f"expected (batch, height, width, 3) images with values in [0, 255], "
                       f"got shape {np.shape(images)}")
    outputs = map_in_chunks(lambda chunk, _: self(chunk), images, chunk_size, mesh=self.mesh)
    return InceptionOutputs(*outputs)
