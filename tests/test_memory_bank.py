"""The vectorised memory bank against a sequential ring buffer (the release's semantics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drifting_jax.train import memory_bank as mb


class LoopBank:
  """Independent expectation: the release's per-sample loop, written out plainly."""

  def __init__(self, num_classes, slots, shape):
    self.buffer = np.zeros((num_classes, slots, *shape), np.float32)
    self.ptr = np.zeros(num_classes, int)
    self.count = np.zeros(num_classes, int)
    self.slots = slots

  def push(self, samples, labels):
    for x, c in zip(samples, labels):
      self.buffer[c, self.ptr[c]] = x
      self.ptr[c] = (self.ptr[c] + 1) % self.slots
      self.count[c] = min(self.count[c] + 1, self.slots)


def _random_pushes(rng, num_classes, shape, rounds=12):
  for _ in range(rounds):
    n = int(rng.integers(0, 40))
    # Skewed labels so some batches hold more than `slots` samples of one class.
    labels = rng.choice(num_classes, size=n, p=np.r_[0.5, np.full(num_classes - 1, 0.5 / (num_classes - 1))])
    yield rng.normal(size=(n, *shape)).astype(np.float32), labels


def test_push_matches_sequential_loop():
  rng = np.random.default_rng(0)
  bank, loop = mb.MemoryBank(5, 7, (3, 2)), LoopBank(5, 7, (3, 2))
  for samples, labels in _random_pushes(rng, 5, (3, 2)):
    bank.push(samples, labels)
    loop.push(samples, labels)
    np.testing.assert_array_equal(bank.buffer, loop.buffer)
    np.testing.assert_array_equal(bank.ptr, loop.ptr)
    np.testing.assert_array_equal(bank.count, loop.count)


def test_device_push_matches_host_push():
  rng = np.random.default_rng(1)
  bank = mb.MemoryBank(4, 6, (2,))
  dev = mb.device_bank_init(4, 6, (2,))
  push = jax.jit(mb.device_bank_push)
  for samples, labels in _random_pushes(rng, 4, (2,)):
    bank.push(samples, labels)
    dev = push(dev, jnp.asarray(samples), jnp.asarray(labels, jnp.int32))
  np.testing.assert_array_equal(np.asarray(dev.buffer), bank.buffer)
  np.testing.assert_array_equal(np.asarray(dev.ptr), bank.ptr)
  np.testing.assert_array_equal(np.asarray(dev.count), bank.count)


def test_sampling_without_replacement_when_full_and_with_replacement_otherwise():
  bank = mb.MemoryBank(3, 8, (1,), seed=0)
  # Class 0 holds 8 distinct values, class 1 holds 3, class 2 holds 1.
  for c, n in ((0, 8), (1, 3), (2, 1)):
    bank.push(np.arange(n, dtype=np.float32)[:, None] + 100 * c, np.full(n, c))
  index = bank.sample_indices(np.array([0, 0, 1, 2]), 5)
  assert all(len(set(row)) == 5 for row in index[:2])          # distinct within a full class
  assert index[2].max() < 3 and index[3].max() == 0             # only filled slots
  drawn = bank.sample(np.array([0, 1, 2]), 5)[..., 0]
  assert set(drawn[0]) <= set(range(8)) and set(drawn[1]) <= {100, 101, 102} and set(drawn[2]) == {200}
  with pytest.raises(ValueError, match="no sample of classes"):
    mb.MemoryBank(3, 8, (1,)).sample(np.array([1]), 2)


def test_samples_are_uniform_over_filled_slots():
  bank = mb.MemoryBank(1, 10, (), seed=3)
  bank.push(np.arange(6, dtype=np.float32), np.zeros(6, int))       # 6 of 10 slots filled
  counts = np.bincount(bank.sample_indices(np.zeros(4000, int), 3).ravel(), minlength=10)
  assert counts[6:].sum() == 0
  expected = 4000 * 3 / 6
  assert np.all(np.abs(counts[:6] - expected) < 5 * np.sqrt(expected))  # ~5 sigma


def test_device_sampling_respects_counts_and_distinctness():
  dev = mb.device_bank_init(2, 5, (1,))
  dev = mb.device_bank_push(dev, jnp.arange(7, dtype=jnp.float32)[:, None], jnp.array([0] * 5 + [1] * 2))
  out = jax.jit(mb.device_bank_sample, static_argnums=3)(dev, jax.random.key(0), jnp.array([0, 1, 0]), 4)
  out = np.asarray(out)[..., 0]
  assert sorted(set(out[0])) == sorted(out[0]) and set(out[0]) <= {0, 1, 2, 3, 4}
  assert set(out[1]) <= {5, 6}


def test_state_round_trip_continues_identically():
  rng = np.random.default_rng(2)
  bank = mb.MemoryBank(4, 5, (2,), seed=7)
  for samples, labels in _random_pushes(rng, 4, (2,), rounds=4):
    bank.push(samples, labels)
  bank.push(rng.normal(size=(20, 2)), np.arange(20) % 4)
  state = {k: v.copy() for k, v in bank.state_dict().items()}
  expected = bank.sample(np.arange(4), 3)
  restored = mb.MemoryBank(4, 5, (2,), seed=999)
  restored.load_state_dict(state)
  np.testing.assert_array_equal(restored.sample(np.arange(4), 3), expected)
  with pytest.raises(ValueError, match="shape"):
    mb.MemoryBank(4, 6, (2,)).load_state_dict(state)


def test_bad_input_is_rejected():
  bank = mb.MemoryBank(3, 4, (2,))
  with pytest.raises(ValueError, match="shape"):
    bank.push(np.zeros((2, 3)), np.array([0, 1]))
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    bank.push(np.zeros((1, 2)), np.array([3]))
  with pytest.raises(ValueError, match="integer"):
    bank.push(np.zeros((1, 2)), np.array([0.5]))


def test_bfloat16_bank_halves_memory():
  assert mb.MemoryBank(10, 8, (4, 4, 4), dtype=jnp.bfloat16).nbytes * 2 == mb.MemoryBank(10, 8, (4, 4, 4)).nbytes
