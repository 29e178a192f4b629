"""What the training loop needs of the data: a deterministic, per-host stream.

`TrainingData` holds this host's share of the training set in memory (model range:
pixels in [-1, 1], latents as cached) and answers two questions, both pure
functions of (seed, step, process index), so a resumed run sees the same stream:

* `push_batch(step, n)`: the n samples pushed into the memory banks at `step`;
* `step_classes(step, n)`: the n distinct classes trained on at `step`;
* `class_draw(step, classes, k)`: k distinct samples of each given class, drawn
  afresh (FHM's "specialized sampler", their Table 3: no memory bank).

Where a step's positives and negatives come from is a *positive source*
(`make_source`), chosen by `train.positive_sampler`:

* `"bank"` (`BankSource`, the release): every step pushes `push_per_step` fresh
  samples into a per-class memory bank of positives and a single-row bank of
  unconditional negatives, then draws from them; the banks' state is part of the
  checkpoint.
* `"fresh"` (`FreshSource`, FHM's MNIST setting): every step draws `pos_per_class`
  distinct training samples of each of its classes (and `neg_per_class`
  unconditional samples) straight from the data set; nothing to checkpoint.

Two layouts over hosts:

* replicated (in-memory data sets such as MNIST): every host holds all the data
  and draws the *global* stream (the seed does not involve the process index);
  each host pushes the whole global batch into its banks and trains on its slice
  of the global classes. A run on P processes then computes exactly what one
  process computes, which is what the multi-process tests check.
* sharded (latent caches, ImageNet scale): each host holds its own shard and draws
  its own stream (the release's behaviour); banks differ between hosts.

A checkpoint resumes on another number of processes (`BankSource.load_state_dict`):
in the replicated layout the run continues exactly (same stream, same banks); in
the sharded layout the saved banks' samples are dealt to the new processes, whose
streams are those of a run on the new process count from then on.

A latent cache built with mirror images (`flipped`) gives each drawn sample the
latent of the image or of its mirror image with probability 1/2 each, as the
release's loader does. Latents stay in the cache's dtype in host memory (float16
halves it) and are cast to float32 when drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Protocol

import jax
import ml_collections
import numpy as np

from drifting_jax import errors
from drifting_jax.data import sources
from drifting_jax.train.memory_bank import BankDealer, MemoryBank

POSITIVE_SAMPLERS = ("bank", "fresh")

# Random streams of a step (the `stream` argument of TrainingData._rng).
_PUSH_STREAM, _CLASS_STREAM, _FRESH_POSITIVE_STREAM, _FRESH_NEGATIVE_STREAM = 0, 1, 2, 3
# Streams of the banks' draws in the replicated layout (kept from earlier releases
# of this file, so resumed runs and stored checkpoints draw as before).
_BANK_POSITIVE_STREAM, _BANK_NEGATIVE_STREAM = 11, 12


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
    # Indices of each class's samples, for the fresh (bank-free) sampler.
    order = np.argsort(self.labels, kind="stable")
    bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
    self._by_class = [order[bounds[c]:bounds[c + 1]] for c in range(self.num_classes)]

  def class_sizes(self) -> np.ndarray:
    """Number of samples of each class held by this host."""
    return np.array([len(i) for i in self._by_class], np.int64)

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return tuple(self.samples.shape[1:])

  def _rng(self, step: int, stream: int, salt: int = 0) -> np.random.Generator:
    host = 0 if self.replicated else self.process_index + 1
    return np.random.default_rng([self.seed, int(step), host, stream, salt])

  def push_batch(self, step: int, n: int, salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(samples float32 [n, H, W, C], labels [n]): n draws with replacement, a pure function of the step."""
    rng = self._rng(step, _PUSH_STREAM, salt)
    idx = rng.integers(0, self.labels.shape[0], size=n)
    return self._gather(idx, rng), self.labels[idx]

  def step_classes(self, step: int, n: int) -> np.ndarray:
    return np.sort(self._rng(step, _CLASS_STREAM).choice(self.num_classes, size=n, replace=False)).astype(np.int32)

  def class_draw(self, step: int, classes: np.ndarray, k: int) -> np.ndarray:
    """[len(classes), k, H, W, C] float32: k distinct samples of each class, a pure function of the step."""
    rng = self._rng(step, _FRESH_POSITIVE_STREAM)
    rows = []
    for c in np.asarray(classes):
      pool = self._by_class[int(c)]
      if len(pool) < k:
        raise ValueError(f"class {int(c)} has {len(pool)} samples on this host, fewer than the {k} distinct "
                         f"positives the fresh sampler draws: lower train.pos_per_class or use "
                         f"train.positive_sampler='bank'")
      rows.append(pool[rng.choice(len(pool), size=k, replace=False)])
    idx = np.stack(rows) if rows else np.zeros((0, k), np.int64)
    return self._gather(idx.reshape(-1), rng).reshape(*idx.shape, *self.sample_shape)

  def unconditional_draw(self, step: int, n: int) -> np.ndarray:
    """[n, H, W, C] float32: n distinct samples of any class (unconditional negatives)."""
    rng = self._rng(step, _FRESH_NEGATIVE_STREAM)
    idx = rng.choice(self.labels.shape[0], size=n, replace=n > self.labels.shape[0])
    return self._gather(idx, rng)

  def _gather(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Samples at `idx` as float32; with mirror views, each one is the mirror image's with p = 1/2."""
    samples = self.samples[idx]
    if self.flipped is not None:
      mirror = rng.random(len(idx)) < 0.5
      samples[mirror] = self.flipped[idx[mirror]]
    return samples.astype(np.float32, copy=False)


def load_training_data(config: ml_collections.ConfigDict) -> TrainingData:
  """This host's training data for `config.data`, from the data-source table (`drifting_jax.data.sources`)."""
  host = sources.load_train(config, jax.process_index(), jax.process_count())
  return TrainingData(host.samples, host.labels, int(config.data.num_classes), int(config.seed),
                      jax.process_index(), host.replicated, host.flipped)


# --------------------------------------------------------------------------- positive sources


class PositiveSource(Protocol):
  """Where a step's positives and unconditional negatives come from."""

  def draw(self, step: int) -> dict[str, np.ndarray]:
    """This host's {"labels" [m], "positives" [m, Cp, ...], "negatives" [m, Cn, ...]} for `step`."""

  def state_dict(self) -> dict[str, np.ndarray]:
    """What a checkpoint must hold to continue the same stream ({} if nothing)."""

  def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
    ...


def _host_classes(data: TrainingData, step: int, classes_per_step: int) -> tuple[np.ndarray, slice]:
  """(classes drawn at `step`, this host's slice of them).

  Replicated data: the global classes (identical on every host), of which this
  host trains its slice, so the run does not depend on the number of processes.
  Sharded data: a host-local draw of this host's share.
  """
  per_host = classes_per_step // jax.process_count()
  if data.replicated:
    first = jax.process_index() * per_host
    return data.step_classes(step, classes_per_step), slice(first, first + per_host)
  return data.step_classes(step, per_host), slice(None)


class BankSource:
  """The release's memory banks: push fresh data every step, draw positives and negatives from the banks.

  Two banks of the same samples: per class (the positives) and one row for all
  classes (the unconditional negatives). Their checkpoint state is keyed "pos/..."
  and "neg/..." in the host state files.
  """

  def __init__(self, data: TrainingData, train_config):
    self.data, self.t = data, train_config
    dtype = np.dtype(jax.numpy.dtype(train_config.bank_dtype))
    host = jax.process_index()
    self.positive_bank = MemoryBank(data.num_classes, train_config.positive_bank_size, data.sample_shape,
                                    dtype=dtype, seed=[data.seed, host, 1])
    self.negative_bank = MemoryBank(1, max(1, train_config.negative_bank_size), data.sample_shape, dtype=dtype,
                                    seed=[data.seed, host, 2])
    self._banks = {"pos": self.positive_bank, "neg": self.negative_bank}  # checkpoint key prefix -> bank
    self._filled = False

  def _push(self, samples: np.ndarray, labels: np.ndarray) -> None:
    self.positive_bank.push(samples, labels)
    self.negative_bank.push(samples, np.zeros_like(labels))  # one row: every class is a negative

  def _fill(self, step: int) -> None:
    """At (re)start, pushes data until every class holds pos_per_class samples (bounded).

    A fresh bank would otherwise hand out the same few samples, with replacement,
    during the first steps; the release pushed a fixed multiple of push_per_step.
    """
    t = self.t
    want_pos, want_neg = min(t.pos_per_class, t.positive_bank_size), min(t.neg_per_class, t.negative_bank_size)
    for extra in range(1, 1000):
      if self.positive_bank.count.min() >= want_pos and self.negative_bank.count.min() >= want_neg:
        break
      self._push(*self.data.push_batch(step, t.push_per_step, salt=extra))
    self._filled = True

  def draw(self, step: int) -> dict[str, np.ndarray]:
    t, data = self.t, self.data
    self._push(*data.push_batch(step, t.push_per_step))
    if not self._filled:
      self._fill(step)
    classes, mine = _host_classes(data, step, t.classes_per_step)

    def draw_from(bank: MemoryBank, rows: np.ndarray, k: int, stream: int) -> np.ndarray:
      if data.replicated:  # the global draw, keyed by step: identical on every host
        return bank.sample(rows, k, rng=np.random.default_rng([data.seed, step, stream]))[mine]
      return bank.sample(rows, k)

    positives = draw_from(self.positive_bank, classes, t.pos_per_class, _BANK_POSITIVE_STREAM)
    if t.neg_per_class:
      negatives = draw_from(self.negative_bank, np.zeros_like(classes), t.neg_per_class, _BANK_NEGATIVE_STREAM)
    else:
      negatives = np.zeros((len(positives), 0, *data.sample_shape), np.float32)
    return {"labels": classes[mine].astype(np.int32), "positives": positives.astype(np.float32, copy=False),
            "negatives": negatives.astype(np.float32, copy=False)}

  def state_dict(self) -> dict[str, np.ndarray]:
    return {f"{prefix}/{key}": value for prefix, bank in self._banks.items()
            for key, value in bank.state_dict().items()}

  def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
    """Loads the banks of a checkpoint, also one saved by another number of processes.

    `state` is this process's saved state (a plain dict, or a `checkpointing.HostState`
    of the same process count): loaded as saved. A `HostState` saved by P processes
    and read by Q != P rebuilds the banks from the saved files:

    * replicated layout: every saved process holds the same banks (each pushed the
      global batch), so each process loads its own saved file where it had one,
      else process 0's; a process new to the run keeps its freshly seeded
      generator (which this layout never draws from: its draws are keyed by the
      step). The banks, and so the run, continue exactly;
    * sharded layout: every saved process holds its own banks; their samples are
      dealt to the Q processes (`BankDealer`), and a process keeps its saved
      generator if it had one, else its fresh one.
    """
    saved = getattr(state, "saved_process_count", None)
    if saved is None or saved == jax.process_count():
      for prefix, bank in self._banks.items():
        bank.load_state_dict(self._bank_part(state, prefix))
      return
    index = jax.process_index()
    if self.data.replicated:
      source = state.read(index if index < saved else 0)
      for prefix, bank in self._banks.items():
        part = self._bank_part(source, prefix)
        if index >= saved:
          part["rng_state"] = bank.state_dict()["rng_state"]
        bank.load_state_dict(part)
      return
    dealers = {prefix: BankDealer(bank, saved_processes=saved, index=index, processes=jax.process_count())
               for prefix, bank in self._banks.items()}
    generators = {prefix: bank.state_dict()["rng_state"] for prefix, bank in self._banks.items()}
    for process in range(saved):  # one saved file in memory at a time
      saved_state = state.read(process)
      for prefix, dealer in dealers.items():
        part = self._bank_part(saved_state, prefix)
        dealer.add(process, part)
        if process == index and "rng_state" in part:
          generators[prefix] = part["rng_state"]
      del saved_state
    for prefix, bank in self._banks.items():
      bank.load_state_dict({**dealers[prefix].state_dict(), "rng_state": generators[prefix]})

  @staticmethod
  def _bank_part(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + "/")}


class FreshSource:
  """FHM's specialized sampler: each step draws distinct data samples of each class, no memory bank."""

  def __init__(self, data: TrainingData, train_config):
    self.data, self.t = data, train_config
    too_small = [c for c, n in enumerate(data.class_sizes()) if n < train_config.pos_per_class]
    if too_small:
      raise errors.UsageError(f"train.positive_sampler='fresh' draws {train_config.pos_per_class} distinct positives "
                       f"per class, but classes {too_small} hold fewer samples on this host "
                       f"({data.class_sizes()[too_small].tolist()}); lower train.pos_per_class")

  def draw(self, step: int) -> dict[str, np.ndarray]:
    t, data = self.t, self.data
    classes, mine = _host_classes(data, step, t.classes_per_step)
    positives = data.class_draw(step, classes, t.pos_per_class)[mine]
    rows = len(positives)
    if t.neg_per_class:
      negatives = data.unconditional_draw(step, len(classes) * t.neg_per_class)
      negatives = negatives.reshape(len(classes), t.neg_per_class, *data.sample_shape)[mine]
    else:
      negatives = np.zeros((rows, 0, *data.sample_shape), np.float32)
    return {"labels": classes[mine].astype(np.int32), "positives": positives, "negatives": negatives}

  def state_dict(self) -> dict[str, np.ndarray]:
    return {}

  def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
    del state  # every draw is a pure function of (seed, step)


def make_source(config: ml_collections.ConfigDict, data: TrainingData) -> PositiveSource:
  """The positive source `config.train.positive_sampler` names ("bank" or "fresh")."""
  sampler = config.train.positive_sampler
  if sampler == "bank":
    return BankSource(data, config.train)
  if sampler == "fresh":
    return FreshSource(data, config.train)
  raise errors.UsageError(f"train.positive_sampler must be one of {POSITIVE_SAMPLERS}, got {sampler!r}")
