"""Sample-quality metrics on Inception features: FID, Inception Score, precision/recall.

All of them take features computed elsewhere (see `drifting_jax.models.inception`):

  * FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the
    2048-d `pool_3` features, `compute_statistics` + `frechet_distance`, in float64.
  * Inception Score (Salimans et al. 2016): `exp(E_x KL(p(y|x) || p(y)))` from the
    classifier logits, averaged over splits. The standard logits are the FID graph's
    `logits_unbiased`.
  * Precision and recall (Kynkaanniemi et al. 2019): the fraction of generated
    samples inside the k-NN balls of the real ones, and vice versa, with k = 3.
    Distances are computed block by block on the default JAX device, so 50k x 50k
    comparisons never hold more than one block of distances.

Reference statistics are `.npz` files with `mu` (D,) and `sigma` (D, D), the format
the release (and ADM's reference batches) use; `ref_mu` / `ref_sigma` are accepted
too.
"""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile
import zipfile
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

from drifting_jax import errors

PathLike = Union[str, os.PathLike]

# Matches the release's precision/recall and pytorch-fid's numerical fallback.
DEFAULT_NEIGHBOURHOOD = 3
SQRTM_OFFSET = 1e-6
# Largest imaginary part tolerated on the diagonal of sqrtm(sigma1 sigma2).
MAX_IMAGINARY_COMPONENT = 1e-3


# ----------------------------------------------------------------------------- FID


def _as_features(features: Any, name: str = "features") -> np.ndarray:
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"{name} must be a (num_samples, dim) matrix, got shape {features.shape}")
  if not np.isfinite(features).all():
    raise ValueError(f"{name} contain NaN or infinite values")
  return features


def compute_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
  features = _as_features(features)
  if len(features) < 2:
    raise ValueError(f"need at least 2 samples to estimate a covariance, got {len(features)}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *, eps: float = SQRTM_OFFSET) -> float:
  """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  `||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`, in float64 with
  `scipy.linalg.sqrtm`. When the product is too close to singular for a finite
  square root, `eps * I` is added to both covariances (pytorch-fid's fallback).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(f"means must be vectors of the same length, got shapes {mu1.shape} and {mu2.shape}")
  dim = mu1.shape[0]
  for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
    if sigma.shape != (dim, dim):
      raise ValueError(f"{name} must be a ({dim}, {dim}) covariance to match the means, got shape {sigma.shape}")
  for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
    if not np.isfinite(value).all():
      raise ValueError(f"{name} contains NaN or infinite values")

  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(dim) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    # Round-off gives tiny imaginary parts; large ones mean the inputs are not
    # covariances (not symmetric positive semi-definite).
    imaginary = np.max(np.abs(np.diagonal(covmean).imag))
    if imaginary > MAX_IMAGINARY_COMPONENT:
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of {imaginary:.3g}; are both "
                       f"matrices symmetric positive semi-definite covariances?")
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: Any, features2: Any) -> float:
  """FID between two feature sets (each at least 2 samples of the same dimension)."""
  return frechet_distance(*compute_statistics(features1), *compute_statistics(features2))


# ----------------------------------------------------------------------------- reference statistics


def save_reference_statistics(path: PathLike, mu: Any, sigma: Any) -> pathlib.Path:
  """Write `mu` / `sigma` as an `.npz` in the release's format (atomically, float64)."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _check_statistics(mu, sigma, "statistics to save")
  path = pathlib.Path(path).expanduser()
  if path.suffix != ".npz":
    raise ValueError(f"reference statistics are .npz files, got {path}")
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".npz", delete=False) as f:
    np.savez(f, mu=mu, sigma=sigma)
  os.replace(f.name, path)
  return path


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{where}: expected mu of shape (D,) and sigma of shape (D, D), got {mu.shape} and {sigma.shape}")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f"{where}: mu or sigma contains NaN or infinite values")


def load_reference_statistics(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
  """`(mu, sigma)` from a reference-statistics `.npz` (`mu`/`sigma` or `ref_mu`/`ref_sigma`).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a readable `.npz`, keys missing, or shapes/values invalid.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise errors.MissingFileError(
        f"reference statistics {path} not found. Expected an .npz with 'mu' (D,) and 'sigma' (D, D) of "
        f"Inception pool_3 features of the reference set (e.g. ADM's ImageNet 256 reference batch stats, or "
        f"compute them with compute_statistics() and save_reference_statistics()).")
  try:
    with np.load(path, allow_pickle=False) as data:
      keys = set(data.files)
      for mu_key, sigma_key in (("mu", "sigma"), ("ref_mu", "ref_sigma")):
        if {mu_key, sigma_key} <= keys:
          mu, sigma = np.asarray(data[mu_key], np.float64), np.asarray(data[sigma_key], np.float64)
          break
      else:
        raise ValueError(f"reference statistics {path} have no 'mu'/'sigma' (or 'ref_mu'/'ref_sigma') arrays; "
                         f"found {sorted(keys)}")
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"reference statistics {path} are not a readable .npz file ({type(e).__name__}: {e})") from e
  except ValueError as e:
    if "reference statistics" in str(e):
      raise
    raise ValueError(f"reference statistics {path} are not a readable .npz file ({e})") from e
  _check_statistics(mu, sigma, f"reference statistics {path}")
  return mu, sigma


# ----------------------------------------------------------------------------- Inception Score


def inception_score(logits: Any, splits: int = 10, *, shuffle_seed: Optional[int] = 2020) -> tuple[float, float]:
  """Inception Score `(mean, std)` over `splits` equal parts of the samples.

  Args:
    logits: (N, C) classifier logits (for the standard IS: the FID Inception's
      `logits_unbiased`).
    splits: number of parts; `N // splits` samples each, the remainder is dropped.
    shuffle_seed: samples are permuted with `np.random.RandomState(seed)` before
      splitting, as the release does (seed 2020); `None` keeps their order.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be (num_samples, num_classes), got shape {logits.shape}")
  if not np.isfinite(logits).all():
    raise ValueError("logits contain NaN or infinite values")
  if splits < 1 or len(logits) < splits:
    raise ValueError(f"need 1 <= splits <= num_samples, got splits={splits} for {len(logits)} samples")
  if shuffle_seed is not None:
    logits = logits[np.random.RandomState(shuffle_seed).permutation(len(logits))]
  log_probs = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  split_size = len(logits) // splits
  scores = []
  for part in np.split(log_probs[:split_size * splits], splits):
    probs = np.exp(part)
    log_marginal = np.log(probs.mean(axis=0))
    # KL(p(y|x) || p(y)); terms with p(y|x) = 0 contribute nothing (and p(y) > 0
    # wherever p(y|x) > 0, so no -inf enters).
    kl = np.where(probs > 0, probs * (part - log_marginal), 0.0).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision / recall


@functools.partial(jax.jit, static_argnames=("precision",))
def pairwise_squared_distances(a: jax.Array, b: jax.Array, precision: Any = jax.lax.Precision.HIGHEST) -> jax.Array:
  """(Na, Nb) squared Euclidean distances, via `|a|^2 + |b|^2 - 2 a.b` clipped at 0."""
  a_norms = jnp.sum(jnp.square(a), axis=1)[:, None]
  b_norms = jnp.sum(jnp.square(b), axis=1)[None, :]
  return jnp.maximum(a_norms + b_norms - 2.0 * jnp.dot(a, b.T, precision=precision), 0.0)


@functools.partial(jax.jit, static_argnames=("count",))
def _merge_smallest(best: jax.Array, rows: jax.Array, cols: jax.Array, col_valid: jax.Array,
                    count: int) -> jax.Array:
  """The `count` smallest distances per row among `best` and this column block."""
  distances = jnp.where(col_valid[None, :], pairwise_squared_distances(rows, cols), jnp.inf)
  merged = jnp.concatenate([best, distances], axis=1)
  return -jax.lax.top_k(-merged, count)[0]


@jax.jit
def _coverage(a: jax.Array, radii_a: jax.Array, b: jax.Array, radii_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Which rows of `a` lie in some ball around `b`, and which rows of `b` in some ball around `a`."""
  distances = pairwise_squared_distances(a, b)
  a_in_b = jnp.any(distances <= radii_b[None, :], axis=1)
  b_in_a = jnp.any(distances <= radii_a[:, None], axis=0)
  return a_in_b, b_in_a


def _blocks(num_rows: int, batch_size: int):
  """(start, stop) of consecutive blocks of at most `batch_size` rows."""
  return [(start, min(start + batch_size, num_rows)) for start in range(0, num_rows, batch_size)]


def _padded(block: np.ndarray, size: int, fill: float = 0.0) -> np.ndarray:
  if len(block) == size:
    return block
  padding = np.full((size - len(block),) + block.shape[1:], fill, block.dtype)
  return np.concatenate([block, padding])


def _check_batch_size(batch_size: int) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """k-th nearest-neighbour squared distances of float32 `features`, block by block."""
  num_rows = len(features)
  size = min(batch_size, num_rows)
  radii = np.empty(num_rows, np.float64)
  for row_start, row_stop in _blocks(num_rows, size):
    rows = jnp.asarray(_padded(features[row_start:row_stop], size))
    best = jnp.full((size, k + 1), jnp.inf, jnp.float32)
    for col_start, col_stop in _blocks(num_rows, size):
      cols = _padded(features[col_start:col_stop], size)
      valid = np.arange(size) < col_stop - col_start
      best = _merge_smallest(best, rows, jnp.asarray(cols), jnp.asarray(valid), count=k + 1)
    radii[row_start:row_stop] = np.asarray(best[:row_stop - row_start, k])
  return radii


def _check_neighbourhood(k: int, num_rows: int, name: str) -> None:
  if not isinstance(k, (int, np.integer)) or not 1 <= k < num_rows:
    raise ValueError(f"k must be an integer in [1, len({name}) - 1] = [1, {num_rows - 1}], got {k!r}")


def nearest_neighbour_radii(features: Any, k: int = DEFAULT_NEIGHBOURHOOD, *, batch_size: int = 5000) -> np.ndarray:
  """Squared distance from each row to its k-th nearest other row, shape (N,).

  Distances are computed on the default JAX device in float32, in (batch_size x
  batch_size) blocks, keeping only the k + 1 smallest per row (the first is the row
  itself, at distance 0). Rows are centred first: distances do not change under a
  shift, and small norms keep `|a|^2 + |b|^2 - 2 a.b` accurate.
  """
  features = _as_features(features)
  _check_batch_size(batch_size)
  _check_neighbourhood(k, len(features), "features")
  return _radii((features - features.mean(axis=0)).astype(np.float32), k, batch_size)


def precision_recall(real_features: Any, fake_features: Any, k: int = DEFAULT_NEIGHBOURHOOD, *,
                     batch_size: int = 5000) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) of `fake` against `real`.

  precision: fraction of fake samples within the k-NN ball of some real sample;
  recall: fraction of real samples within the k-NN ball of some fake sample. Balls
  are closed (a point on the boundary counts as inside), as in the reference code.
  """
  real = _as_features(real_features, "real_features")
  fake = _as_features(fake_features, "fake_features")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
  _check_batch_size(batch_size)
  _check_neighbourhood(k, len(real), "real_features")
  _check_neighbourhood(k, len(fake), "fake_features")
  # One shift for both sets (see nearest_neighbour_radii), so that radii and
  # cross distances come from the same float32 numbers.
  centre = real.mean(axis=0)
  real, fake = (real - centre).astype(np.float32), (fake - centre).astype(np.float32)
  real_radii = _radii(real, k, batch_size)
  fake_radii = _radii(fake, k, batch_size)
  real_size, fake_size = min(batch_size, len(real)), min(batch_size, len(fake))
  real_covered = np.zeros(len(real), bool)
  fake_covered = np.zeros(len(fake), bool)
  for r0, r1 in _blocks(len(real), real_size):
    # Padded rows get radius -1: no distance is that small, so they cover nothing.
    real_block = jnp.asarray(_padded(real[r0:r1], real_size))
    real_block_radii = jnp.asarray(_padded(real_radii[r0:r1].astype(np.float32), real_size, fill=-1.0))
    for f0, f1 in _blocks(len(fake), fake_size):
      fake_block = jnp.asarray(_padded(fake[f0:f1], fake_size))
      fake_block_radii = jnp.asarray(_padded(fake_radii[f0:f1].astype(np.float32), fake_size, fill=-1.0))
      real_in_fake, fake_in_real = _coverage(real_block, real_block_radii, fake_block, fake_block_radii)
      real_covered[r0:r1] |= np.asarray(real_in_fake[:r1 - r0])
      fake_covered[f0:f1] |= np.asarray(fake_in_real[:f1 - f0])
  return float(fake_covered.mean()), float(real_covered.mean())
