"""The SD-VAE latent cache: sharded npz files written by `--mode=build_latents`.

Layout of a cache folder:

  spec.json             what the writer was built with (sample shape, dtype, shard
                        size, metadata); a re-run with other settings is refused
  shard_000000.npz ...  shard i: `latents` [n, *sample_shape] (dtype of the cache)
                        and `labels` [n] int32, n <= shard_size; in a `flipped`
                        cache also `latents_flip` [n, *sample_shape], the latent of
                        each image's mirror image (the release's augmentation: a
                        draw takes either view with probability 1/2); plain numpy
                        npz (uncompressed), readable without this package
  index.json            written last by `finalize`: the shards and their counts,
                        sample_shape, dtype, num_classes, metadata. Its presence
                        means the cache is complete.

Shards are written to a temporary file and renamed into place (`os.replace`), so
a killed job never leaves a half shard and a re-run skips the shards that exist.
Several hosts may write disjoint shards of one cache on a shared file system;
one host then calls `finalize`, which checks that shards 0..K-1 are all there.

`LatentCacheReader.load_host_shard(p, P)` gives host p the shards p, p+P, ...
held in memory (`view="latents_flip"` their mirror-image latents).
`drifting_jax.data.release_cache` converts the release's per-image `.pt` cache
into this format. `write_synthetic_latents` makes a tiny class-conditional cache
(class means plus noise) for tests and CPU smoke runs of the latent pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import tempfile
import zipfile
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from drifting_jax import errors

PathLike = Union[str, os.PathLike]

FORMAT = "npz"
VERSION = 1
INDEX_FILE = "index.json"
SPEC_FILE = "spec.json"
_SHARD_RE = re.compile(r"^shard_(\d{6,})\.npz$")
# npz keeps these exactly; bfloat16 (ml_dtypes) would come back as raw bytes.
_DTYPES = ("float16", "float32", "float64")


def shard_name(index: int) -> str:
  return f"shard_{index:06d}.npz"


def _atomic_write_bytes(path: pathlib.Path, write) -> None:
  """Calls write(file) on a temporary file beside `path`, then renames it to `path`."""
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _atomic_write_json(path: pathlib.Path, obj: Any) -> None:
  _atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def _jsonable(obj: Any) -> Any:
  """Metadata as plain JSON types (numpy scalars, tuples and ConfigDict values)."""
  return json.loads(json.dumps(obj, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def _check_dtype(dtype: Any) -> str:
  name = np.dtype(dtype).name
  if name not in _DTYPES:
    raise ValueError(f"latent cache dtype must be one of {_DTYPES}, got {dtype!r}")
  return name


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an array in an npz without reading its data."""
  with zf.open(member) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
  return tuple(shape), dtype


# ----------------------------------------------------------------------------- writer


class LatentCacheWriter:
  """Writes latent shards into `out_dir`, resumable, and finally its index.

  Args:
    out_dir: the cache folder (created).
    sample_shape: shape of one latent, e.g. (32, 32, 4).
    dtype: storage dtype: "float16", "float32" or "float64".
    shard_size: most latents per shard (the build job's batch size).
    metadata: JSON-able description kept in the index (source data set, VAE ...).
      It is part of the writer's spec: resuming with different metadata is refused.
    flipped: every shard also holds `latents_flip`, the latents of the mirror
      images (in the spec and index only when true, so older caches read as before).

  Raises:
    ValueError: `out_dir` holds shards written with a different spec (shape,
      dtype, shard size or metadata), which a resumed run must not mix in.
  """

  def __init__(self, out_dir: PathLike, *, sample_shape: Sequence[int], dtype: Any = "float32",
               shard_size: int, metadata: Optional[Mapping[str, Any]] = None, flipped: bool = False):
    self.out_dir = pathlib.Path(out_dir)
    self.sample_shape = tuple(int(s) for s in sample_shape)
    self.dtype = _check_dtype(dtype)
    self.shard_size = int(shard_size)
    if self.shard_size < 1 or any(s < 1 for s in self.sample_shape):
      raise ValueError(f"need shard_size >= 1 and a positive sample_shape, got {shard_size} and {sample_shape}")
    self.metadata = _jsonable(dict(metadata or {}))
    self.flipped = bool(flipped)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"format": FORMAT, "version": VERSION, "sample_shape": list(self.sample_shape), "dtype": self.dtype,
            "shard_size": self.shard_size, "metadata": self.metadata}
    if self.flipped:
      spec["flipped"] = True
    spec_path = self.out_dir / SPEC_FILE
    if spec_path.exists():
      old = json.loads(spec_path.read_text())
      if old != spec:
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        raise ValueError(f"{self.out_dir} holds a latent cache written with other settings (differing: {diff}; "
                         f"there: {[old.get(k) for k in diff]}, now: {[spec.get(k) for k in diff]}). Resume with "
                         f"the same settings, or write to another folder (--config.latents.out_dir) or delete it.")
    else:
      # Every host of a multi-host build writes the same content: the race is harmless.
      _atomic_write_json(spec_path, spec)

  def shard_path(self, shard_index: int) -> pathlib.Path:
    return self.out_dir / shard_name(shard_index)

  def completed_shards(self) -> set[int]:
    """Indices of the shards already in place (written completely: see the module docstring)."""
    return {int(m.group(1)) for p in self.out_dir.iterdir() if (m := _SHARD_RE.match(p.name))}

  def write_shard(self, shard_index: int, latents: np.ndarray, labels: np.ndarray,
                  latents_flip: Optional[np.ndarray] = None) -> pathlib.Path:
    """Atomically writes shard `shard_index`: latents [n, *sample_shape], labels [n] (and latents_flip [n, ...])."""
    latents, labels = np.asarray(latents), np.asarray(labels)
    if self.flipped != (latents_flip is not None):
      raise ValueError(f"shard {shard_index}: this cache is {'' if self.flipped else 'not '}flipped, so "
                       f"latents_flip must {'' if self.flipped else 'not '}be given")
    if latents_flip is not None and np.shape(latents_flip) != latents.shape:
      raise ValueError(f"shard {shard_index}: latents_flip {np.shape(latents_flip)} differs from latents "
                       f"{latents.shape}")
    if shard_index < 0:
      raise ValueError(f"shard_index must be >= 0, got {shard_index}")
    if latents.shape[1:] != self.sample_shape or latents.shape[0] > self.shard_size:
      raise ValueError(f"shard {shard_index}: expected latents [n <= {self.shard_size}, *{self.sample_shape}], "
                       f"got {latents.shape}")
    if labels.shape != latents.shape[:1]:
      raise ValueError(f"shard {shard_index}: expected labels [{latents.shape[0]}], got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"shard {shard_index}: labels must be integers, got {labels.dtype}")
    arrays = {"latents": latents.astype(self.dtype, copy=False), "labels": labels.astype(np.int32)}
    if latents_flip is not None:
      arrays["latents_flip"] = np.asarray(latents_flip).astype(self.dtype, copy=False)
    path = self.shard_path(shard_index)
    _atomic_write_bytes(path, lambda f: np.savez(f, **arrays))
    return path

  def finalize(self, num_classes: int) -> dict[str, Any]:
    """Checks all shards and writes index.json; returns the index.

    Raises:
      ValueError: no shards, a gap in the shard indices (a host did not finish),
        a shard of another shape or dtype, or labels outside [0, num_classes).
    """
    found = sorted(self.completed_shards())
    if not found:
      raise ValueError(f"no shards in {self.out_dir}: nothing to finalize")
    missing = sorted(set(range(found[-1] + 1)) - set(found))
    if missing:
      raise ValueError(f"{self.out_dir} lacks shards {missing[:20]}{' ...' if len(missing) > 20 else ''} of "
                       f"0..{found[-1]}: a host did not finish; re-run --mode=build_latents to write them")
    shards = []
    for i in found:
      path = self.shard_path(i)
      shape, labels = _read_shard_meta(path, self.flipped)
      if shape[1:] != self.sample_shape:
        raise ValueError(f"{path} holds latents of shape {shape}, expected [n, *{self.sample_shape}]")
      if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path} has labels in [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
      shards.append({"index": i, "file": path.name, "count": int(shape[0])})
    index = {"format": FORMAT, "version": VERSION, "shards": shards,
             "num_examples": sum(s["count"] for s in shards), "sample_shape": list(self.sample_shape),
             "dtype": self.dtype, "shard_size": self.shard_size, "num_classes": int(num_classes),
             "metadata": self.metadata}
    if self.flipped:
      index["flipped"] = True
    _atomic_write_json(self.out_dir / INDEX_FILE, index)
    return index


def _read_shard_meta(path: pathlib.Path, flipped: bool = False) -> tuple[tuple[int, ...], np.ndarray]:
  """(latents shape, labels) of a shard, reading the latents' header only."""
  try:
    with zipfile.ZipFile(path) as zf:
      shape, _ = _npy_header(zf, "latents.npy")
      if flipped and _npy_header(zf, "latents_flip.npy")[0] != shape:
        raise ValueError(f"latents_flip.npy has another shape than latents.npy {shape}")
      with zf.open("labels.npy") as f:
        labels = np.lib.format.read_array(f)
  except FileNotFoundError:
    raise
  except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as e:
    raise ValueError(_corrupt_message(path, e)) from e
  if labels.shape != shape[:1]:
    raise ValueError(f"{path}: {labels.shape} labels for {shape[0]} latents")
  return shape, labels


def _corrupt_message(path: pathlib.Path, e: BaseException) -> str:
  return (f"latent shard {path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and re-run "
          f"--mode=build_latents with the same settings to rewrite it")


# ----------------------------------------------------------------------------- reader


class LatentCacheReader:
  """A finalized latent cache (see the module docstring).

  Attributes:
    directory: the cache folder.
    index: the parsed index.json.
    num_classes, sample_shape, dtype, num_examples, metadata: from the index.
    flipped: the shards also hold the mirror images' latents (`view="latents_flip"`).

  Raises:
    FileNotFoundError: no folder, or no index.json (the build did not finish).
    ValueError: an index this reader does not understand.
  """

  def __init__(self, directory: PathLike):
    if not directory:
      raise errors.MissingFileError("no latent cache given: set --config.data.data_dir to the folder written by "
                              "--mode=build_latents (config.latents.out_dir, default <workdir>/latents)")
    self.directory = pathlib.Path(directory)
    index_path = self.directory / INDEX_FILE
    if not self.directory.is_dir():
      raise errors.MissingFileError(f"latent cache {self.directory} does not exist: build it with "
                              f"`python -m drifting_jax.main --mode=build_latents --config=<config> "
                              f"--config.latents.out_dir={self.directory}` (or point --config.data.data_dir at "
                              f"an existing cache)")
    if not index_path.is_file():
      raise errors.MissingFileError(f"{index_path} is missing: the latent cache in {self.directory} is unfinished. "
                              f"Run (or re-run, it resumes) --mode=build_latents with "
                              f"--config.latents.out_dir={self.directory}")
    try:
      index = json.loads(index_path.read_text())
      self.sample_shape = tuple(int(s) for s in index["sample_shape"])
      self.num_classes = int(index["num_classes"])
      self.dtype = _check_dtype(index["dtype"])
      self.shards = [(int(s["index"]), str(s["file"]), int(s["count"])) for s in index["shards"]]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{index_path} is not a latent cache index ({type(e).__name__}: {e})") from e
    if index.get("format") != FORMAT:
      raise ValueError(f"{index_path} has format {index.get('format')!r}, this reader reads {FORMAT!r}")
    self.index = index
    self.metadata = index.get("metadata", {})
    self.flipped = bool(index.get("flipped", False))
    self.num_examples = sum(count for _, _, count in self.shards)

  def host_shards(self, process_index: int, process_count: int) -> list[tuple[int, str, int]]:
    """(index, file, count) of host p's shards: p, p + P, p + 2P, ... of the index's list."""
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return self.shards[process_index::process_count]

  def _check_view(self, view: str) -> None:
    if view not in ("latents", "latents_flip"):
      raise ValueError(f"view must be 'latents' or 'latents_flip', got {view!r}")
    if view == "latents_flip" and not self.flipped:
      raise ValueError(f"latent cache {self.directory} has no mirror-image latents (it was not built flipped)")

  def load_shard(self, file: str, count: int, view: str = "latents") -> tuple[np.ndarray, np.ndarray]:
    """One shard's (latents, labels int32), checked against the index; `view="latents_flip"`: the mirrored."""
    self._check_view(view)
    path = self.directory / file
    if not path.is_file():
      raise errors.MissingFileError(f"latent shard {path} listed in {self.directory / INDEX_FILE} is missing; re-run "
                              f"--mode=build_latents with the same settings to rewrite it")
    try:
      with np.load(path, allow_pickle=False) as data:
        latents, labels = data[view], data["labels"]
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as e:
      raise ValueError(_corrupt_message(path, e)) from e
    if latents.shape != (count, *self.sample_shape) or labels.shape != (count,):
      raise ValueError(f"latent shard {path} holds latents {latents.shape} and labels {labels.shape}; the index "
                       f"says ({count}, *{self.sample_shape}) and ({count},): the cache is inconsistent, rebuild it")
    if latents.dtype != np.dtype(self.dtype):
      raise ValueError(f"latent shard {path} has dtype {latents.dtype}, the index says {self.dtype}")
    return latents, labels.astype(np.int32, copy=False)

  def load_host_shard(self, process_index: int, process_count: int,
                      view: str = "latents") -> tuple[np.ndarray, np.ndarray]:
    """Host p's latents [N, *sample_shape] (cache dtype) and labels int32 [N] (shards p, p+P, ...).

    `view="latents_flip"` reads the mirror images' latents of a flipped cache instead
    (same order and labels).

    Raises:
      ValueError: fewer shards than hosts (host p would have nothing), or a
        corrupt shard or one that disagrees with the index.
      FileNotFoundError: a shard of the index is missing.
    """
    self._check_view(view)
    mine = self.host_shards(process_index, process_count)
    if not mine or not sum(count for _, _, count in mine):
      raise ValueError(f"latent cache {self.directory} has {len(self.shards)} shards, too few for "
                       f"{process_count} hosts: host {process_index} gets no data. Rebuild it with a smaller "
                       f"--config.latents.batch_size (latents per shard)")
    total = sum(count for _, _, count in mine)
    latents = np.empty((total, *self.sample_shape), self.dtype)
    labels = np.empty((total,), np.int32)
    start = 0
    for _, file, count in mine:  # filled in place: no second copy of the host's share
      latents[start: start + count], labels[start: start + count] = self.load_shard(file, count, view)
      start += count
    return latents, labels


# ----------------------------------------------------------------------------- synthetic


def write_synthetic_latents(out_dir: PathLike, *, num_classes: int, per_class: int,
                            sample_shape: Sequence[int] = (32, 32, 4), seed: int = 0,
                            shard_size: int = 256, noise: float = 0.5) -> pathlib.Path:
  """A small class-conditional latent cache: class c is mean_c + noise * N(0, I).

  The class means are standard normal draws, so classes are separable yet overlap
  a little, like a real latent data set in miniature. Examples are shuffled over
  classes before sharding, so every shard mixes classes. Deterministic in `seed`;
  re-running into the same folder keeps what is there. Returns `out_dir`.
  """
  rng = np.random.default_rng(seed)
  sample_shape = tuple(int(s) for s in sample_shape)
  means = rng.standard_normal((num_classes, *sample_shape)).astype(np.float32)
  labels = rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int32), per_class))
  writer = LatentCacheWriter(
      out_dir, sample_shape=sample_shape, dtype="float32", shard_size=shard_size,
      metadata={"source": "synthetic", "seed": int(seed), "per_class": int(per_class), "noise": float(noise)})
  done = writer.completed_shards()
  for shard, start in enumerate(range(0, len(labels), shard_size)):
    # Noise drawn per shard from its own stream, so skipping a shard changes nothing else.
    shard_labels = labels[start: start + shard_size]
    if shard in done:
      continue
    shard_rng = np.random.default_rng([seed, shard])
    latents = means[shard_labels] + noise * shard_rng.standard_normal((len(shard_labels), *sample_shape),
                                                                      np.float32)
    writer.write_shard(shard, latents, shard_labels)
  writer.finalize(num_classes)
  return pathlib.Path(out_dir)


def ensure_synthetic_latents(directory: Optional[PathLike], *, num_classes: int, per_class: int,
                             sample_shape: Sequence[int], seed: int = 0) -> pathlib.Path:
  """A finalized synthetic cache in `directory` (made if absent), or in a temp folder named by its settings."""
  if not directory:
    key = hashlib.sha256(json.dumps([num_classes, per_class, list(sample_shape), seed]).encode()).hexdigest()[:12]
    directory = pathlib.Path(tempfile.gettempdir()) / f"drifting_jax_synthetic_latents_{key}"
  directory = pathlib.Path(directory)
  if not (directory / INDEX_FILE).is_file():
    write_synthetic_latents(directory, num_classes=num_classes, per_class=per_class, sample_shape=sample_shape,
                            seed=seed)
  return directory
