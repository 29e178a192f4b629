"""Per-class ring buffers of data samples: the release's memory bank, vectorised.

The release (`memory_bank.ArrayMemoryBank`) keeps, per class, a ring buffer of the
most recent `slots` data samples; every step it pushes fresh data and draws, for
each trained class, `k` samples: without replacement when the class holds at least
`k`, with replacement otherwise. Positives come from a bank with one buffer per
class, unconditional negatives from a bank with a single buffer (label 0).

Its push and sample are Python loops over samples and classes. Here both are a few
array operations with the same semantics:

* push: the i-th sample of class c in a batch goes to slot (ptr[c] + i) mod slots,
  exactly where the sequential loop puts it; when a batch holds more than `slots`
  samples of one class, only the last `slots` are written (the loop would
  overwrite the earlier ones anyway), so every slot is written at most once.
* sample: one uniform key per (row, slot); invalid slots get +inf; the `k`
  smallest keys are a uniformly random subset without replacement. Rows whose
  class holds fewer than `k` samples draw indices with replacement.

`MemoryBank` is the host (NumPy) bank the trainer uses; its state (buffers,
pointers, counts and random-generator state) round-trips through `state_dict()` so
a resumed run continues with the same bank; `BankDealer` re-distributes the banks
of P processes over Q when a run resumes on another number of processes.
`DeviceBank` with `device_bank_push` / `device_bank_sample` is the same algorithm
as pure functions of a pytree of `jax.Array`s, for use inside `jit` when the bank
lives on the accelerator.

Memory: classes x slots x sample bytes. The release's ImageNet ablation (1000
classes x 128 slots of 32x32x4 float32 latents) is 2.1 GB per host; a bfloat16
bank halves that.
"""

from __future__ import annotations

import json
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _ranks_within_class(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(rank of each sample among earlier samples of its class, per-sample class size)."""
  order = np.argsort(labels, kind="stable")
  sorted_labels = labels[order]
  starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
  sizes = np.diff(np.r_[starts, len(labels)])
  group_start = np.repeat(starts, sizes)
  ranks = np.empty(len(labels), np.int64)
  ranks[order] = np.arange(len(labels)) - group_start
  class_size = np.empty(len(labels), np.int64)
  class_size[order] = np.repeat(sizes, sizes)
  return ranks, class_size


class MemoryBank:
  """Ring buffers `[num_classes, slots, *sample_shape]` on the host."""

  def __init__(self, num_classes: int, slots: int, sample_shape: Sequence[int], *, dtype=np.float32,
               seed: int | Sequence[int] = 0):
    if num_classes < 1 or slots < 1:
      raise ValueError(f"a memory bank needs num_classes >= 1 and slots >= 1, got {num_classes}, {slots}")
    self.num_classes = int(num_classes)
    self.slots = int(slots)
    self.sample_shape = tuple(int(d) for d in sample_shape)
    self.dtype = np.dtype(dtype)
    self.buffer = np.zeros((self.num_classes, self.slots, *self.sample_shape), self.dtype)
    self.ptr = np.zeros(self.num_classes, np.int64)
    self.count = np.zeros(self.num_classes, np.int64)
    self.rng = np.random.default_rng(seed)

  @property
  def nbytes(self) -> int:
    return self.buffer.nbytes

  def _check_labels(self, labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{what} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"{what} must lie in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)

  def push(self, samples: np.ndarray, labels: np.ndarray) -> None:
    """Appends samples to their classes' ring buffers (oldest entries overwritten)."""
    labels = self._check_labels(labels, "labels")
    samples = np.asarray(samples)
    if samples.shape != (len(labels), *self.sample_shape):
      raise ValueError(f"expected samples of shape {(len(labels), *self.sample_shape)}, got {samples.shape}")
    if not len(labels):
      return
    ranks, class_size = _ranks_within_class(labels)
    slot = (self.ptr[labels] + ranks) % self.slots
    keep = ranks >= class_size - self.slots  # earlier ones would be overwritten in this same push
    rows = self._rows()
    if keep.all():  # the common case: no masked copy of the samples
      rows[labels * self.slots + slot] = samples
    else:
      rows[labels[keep] * self.slots + slot[keep]] = samples[keep]
    pushed = np.bincount(labels, minlength=self.num_classes)
    self.ptr = (self.ptr + pushed) % self.slots
    self.count = np.minimum(self.count + pushed, self.slots)

  def sample_indices(self, classes: np.ndarray, k: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Slot indices [len(classes), k]: without replacement where a class holds >= k."""
    classes = self._check_labels(classes, "classes")
    rng = self.rng if rng is None else rng
    valid = self.count[classes]
    if np.any(valid == 0):
      empty = sorted(set(classes[valid == 0].tolist()))
      raise ValueError(f"memory bank holds no sample of classes {empty[:10]}: push data of every trained class "
                       f"before sampling")
    if k == 0:
      return np.zeros((len(classes), 0), np.int64)
    keys = rng.random((len(classes), self.slots))
    keys[np.arange(self.slots)[None, :] >= valid[:, None]] = np.inf
    if k < self.slots:
      without = np.argpartition(keys, k - 1, axis=1)[:, :k]
    else:
      without = np.argsort(keys, axis=1)[:, :k] if k == self.slots else np.zeros((len(classes), k), np.int64)
    with_replacement = np.floor(rng.random((len(classes), k)) * valid[:, None]).astype(np.int64)
    return np.where((valid >= k)[:, None], without, with_replacement)

  def sample(self, classes: np.ndarray, k: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Samples [len(classes), k, *sample_shape] of the given classes."""
    index = self.sample_indices(classes, k, rng)
    flat = np.asarray(classes, np.int64)[:, None] * self.slots + index
    return np.take(self._rows(), flat.ravel(), axis=0).reshape(*flat.shape, *self.sample_shape)

  def _rows(self) -> np.ndarray:
    """The buffer as [num_classes * slots, *sample_shape] (a view): one flat index per
    sample makes NumPy's row gathers and scatters markedly faster than two index arrays."""
    return self.buffer.reshape(self.num_classes * self.slots, *self.sample_shape)

  # -------------------------------------------------------------------- checkpoints

  def state_dict(self) -> dict[str, np.ndarray]:
    rng_state = json.dumps(self.rng.bit_generator.state).encode()
    return {"buffer": self.buffer, "ptr": self.ptr, "count": self.count,
            "rng_state": np.frombuffer(rng_state, np.uint8)}

  def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
    missing = {"buffer", "ptr", "count", "rng_state"} - set(state)
    if missing:
      raise ValueError(f"memory bank state lacks {sorted(missing)}")
    self.buffer = _saved_buffer(state, self).astype(self.dtype, copy=True)
    self.ptr = np.asarray(state["ptr"], np.int64).copy()
    self.count = np.asarray(state["count"], np.int64).copy()
    self.rng.bit_generator.state = json.loads(np.asarray(state["rng_state"], np.uint8).tobytes().decode())


def _saved_buffer(state: dict[str, np.ndarray], bank: MemoryBank) -> np.ndarray:
  """A saved state's buffer, checked against `bank`'s shape.

  np.savez writes ml_dtypes' bfloat16 (`train.bank_dtype="bfloat16"`) as raw 2-byte
  records, which np.load returns as void; they are bfloat16 again here.
  """
  buffer = np.asarray(state["buffer"])
  if buffer.dtype.kind == "V" and buffer.dtype.itemsize == 2:
    buffer = buffer.view(jnp.bfloat16)
  if buffer.shape != bank.buffer.shape:
    raise ValueError(f"memory bank state has buffers of shape {buffer.shape}, this bank "
                     f"{bank.buffer.shape} (did num_classes, slots or the sample shape change?)")
  return buffer


class BankDealer:
  """Deals the samples of the banks that P processes saved to the bank of one of Q processes.

  The re-distribution of per-process banks when a run resumes on another number of
  processes. Number the saved samples of a class by age, newest first, interleaving
  the saved processes: the j-th newest sample of saved process p is sample
  g = j * P + p. New process q receives the samples with g mod Q == q, so no sample
  goes to two processes and, where the new banks have room, none is lost; of its
  share, each class keeps its `slots` newest (smallest g), stored oldest first so
  that the next push overwrites the oldest, as the ring buffer would have.

  With Q = P every process gets its own samples back (only their slots move, so a
  run keeping its process count loads its own file instead). With P a multiple of
  Q, process q gets the union of the banks of saved processes q, q + Q, ...; with Q
  a multiple of P, each saved bank is split by age over Q / P new processes.

  Usage: `add(p, saved_state_p)` for every saved process (in any order, one state
  in memory at a time), then `state_dict()` (buffer, ptr, count; no generator).
  """

  _EMPTY = np.iinfo(np.int64).max

  def __init__(self, bank: MemoryBank, *, saved_processes: int, index: int, processes: int):
    if not (saved_processes >= 1 and 0 <= index < processes):
      raise ValueError(f"need saved_processes >= 1 and 0 <= index < processes, got {saved_processes}, "
                       f"{index}, {processes}")
    self.bank, self.saved_processes, self.index, self.processes = bank, saved_processes, index, processes
    # Per class, the sample numbers g kept so far (ascending, _EMPTY for none) and the samples.
    self._g = np.full((bank.num_classes, bank.slots), self._EMPTY, np.int64)
    self._samples = np.zeros_like(bank.buffer)
    self._added: set[int] = set()

  def add(self, process: int, state: dict[str, np.ndarray]) -> None:
    """Takes this process's share of the bank that saved process `process` wrote."""
    if not 0 <= process < self.saved_processes or process in self._added:
      raise ValueError(f"saved process {process} is not one of {self.saved_processes} not yet added")
    buffer = _saved_buffer(state, self.bank)
    slots = self.bank.slots
    ptr, count = np.asarray(state["ptr"], np.int64), np.asarray(state["count"], np.int64)
    age = (ptr[:, None] - 1 - np.arange(slots)[None, :]) % slots  # 0: the newest sample of its class
    g = age * self.saved_processes + process
    mine = (age < count[:, None]) & (g % self.processes == self.index)
    for c in np.flatnonzero(mine.any(axis=1)):
      merged_g = np.concatenate([self._g[c], g[c][mine[c]]])
      merged = np.concatenate([self._samples[c], buffer[c][mine[c]].astype(self.bank.dtype)])
      keep = np.argsort(merged_g, kind="stable")[:slots]
      self._g[c], self._samples[c] = merged_g[keep], merged[keep]
    self._added.add(process)

  def state_dict(self) -> dict[str, np.ndarray]:
    """The dealt bank: per class its n kept samples in slots 0..n-1, oldest first."""
    if len(self._added) != self.saved_processes:
      missing = sorted(set(range(self.saved_processes)) - self._added)
      raise ValueError(f"the banks of saved processes {missing} were not added")
    count = np.sum(self._g != self._EMPTY, axis=1)
    buffer = np.zeros_like(self._samples)
    for c in np.flatnonzero(count):
      buffer[c, :count[c]] = self._samples[c, :count[c]][::-1]
    return {"buffer": buffer, "ptr": count % self.bank.slots, "count": count}


# ----------------------------------------------------------------------- on device


class DeviceBank(NamedTuple):
  """A memory bank as a pytree of arrays, for use inside jit."""
  buffer: jax.Array  # [num_classes, slots, *sample_shape]
  ptr: jax.Array     # [num_classes] int32
  count: jax.Array   # [num_classes] int32


def device_bank_init(num_classes: int, slots: int, sample_shape: Sequence[int], dtype=jnp.float32) -> DeviceBank:
  return DeviceBank(jnp.zeros((num_classes, slots, *sample_shape), dtype),
                    jnp.zeros((num_classes,), jnp.int32), jnp.zeros((num_classes,), jnp.int32))


def device_bank_push(bank: DeviceBank, samples: jax.Array, labels: jax.Array) -> DeviceBank:
  """`MemoryBank.push` as a pure function (static batch size, no host round trip)."""
  num_classes, slots = bank.buffer.shape[:2]
  labels = labels.astype(jnp.int32)
  n = labels.shape[0]
  order = jnp.argsort(labels, stable=True)
  sorted_labels = labels[order]
  pushed = jnp.bincount(labels, length=num_classes).astype(jnp.int32)
  starts = jnp.cumsum(pushed) - pushed                      # first sorted position of each class
  ranks = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) - starts[sorted_labels])
  keep = ranks >= pushed[labels] - slots
  slot = (bank.ptr[labels] + ranks) % slots
  # Samples that the same push overwrites are sent out of range and dropped.
  rows = jnp.where(keep, labels, num_classes)
  buffer = bank.buffer.at[rows, slot].set(samples.astype(bank.buffer.dtype), mode="drop")
  return DeviceBank(buffer, (bank.ptr + pushed) % slots, jnp.minimum(bank.count + pushed, slots))


def device_bank_sample(bank: DeviceBank, key: jax.Array, classes: jax.Array, k: int) -> jax.Array:
  """`MemoryBank.sample` as a pure function; an empty class yields its (zero) slot 0."""
  slots = bank.buffer.shape[1]
  valid = bank.count[classes]
  key_without, key_with = jax.random.split(key)
  keys = jax.random.uniform(key_without, (classes.shape[0], slots))
  keys = jnp.where(jnp.arange(slots)[None, :] < valid[:, None], keys, jnp.inf)
  without = jax.lax.top_k(-keys, min(k, slots))[1]
  if k > slots:  # only reachable with replacement; pad so both branches have k columns
    without = jnp.pad(without, ((0, 0), (0, k - slots)))
  with_replacement = jnp.floor(jax.random.uniform(key_with, (classes.shape[0], k)) *
                               jnp.maximum(valid, 1)[:, None]).astype(jnp.int32)
  index = jnp.where((valid >= k)[:, None], without, with_replacement)
  return bank.buffer[classes[:, None], index]
