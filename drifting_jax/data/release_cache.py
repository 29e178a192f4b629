"""The release's latent cache (one torch `.pt` file per image), read without torch.

The official release (lambertae/drifting, `dataset/latent.py`) encodes ImageNet
once and writes, for every image, `<root>/<split>/<class folder>/<image stem>.pt`
holding `{"moments": [32, 32, 4], "moments_flip": [32, 32, 4]}`: a posterior
sample times 0.18215 of the image and of its mirror image, saved with
`torch.save` (numpy arrays pickled inside torch's zip container). Its loader is a
torchvision `DatasetFolder`: class index = position of the folder name in sorted
order, files in sorted order within a class.

`import_release_cache` converts such a cache into this project's sharded npz cache
(`drifting_jax.data.latents`, flipped), so a user of the release keeps the days of
VAE encoding already spent: `python -m drifting_jax.main --mode=import_latents
--config=... --config.latents.release_cache=<root> --config.latents.out_dir=<dir>`.

`read_torch_file` unpickles with an allow-list (numpy array reconstruction and
torch's tensor rebuild, resolved to numpy); a file that needs anything else is
refused instead of executing its pickle.
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import zipfile
from typing import Any, Iterator, Optional, Union

import ml_dtypes  # a jax dependency
import numpy as np

from drifting_jax import errors
from drifting_jax.data import latents

PathLike = Union[str, os.PathLike]

# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _TorchStorage:
  """A torch storage as a flat numpy array (persistent id of torch's zip format)."""

  def __init__(self, data: np.ndarray):
    self.data = data


def _storage_class(name: str):
  def make():  # never called: only the class name matters in a persistent id
    raise pickle.UnpicklingError(f"torch.{name} cannot be constructed directly")
  make.storage_name = name
  return make


def _bfloat16():
  return ml_dtypes.bfloat16


def _rebuild_tensor(storage: _TorchStorage, offset: int, size, stride, *unused) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 -> a numpy copy of the strided view."""
  data = storage.data
  if not size:
    return data[offset].copy()
  itemsize = data.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(data[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.array(view)


class _AllowListUnpickler(pickle.Unpickler):
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
  }

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix

  def find_class(self, module: str, name: str):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch" and (name in _STORAGE_DTYPES or name == "BFloat16Storage"):
      return _storage_class(name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain torch tensors "
                                 f"are read from release cache files")

  def persistent_load(self, pid):
    # ("storage", storage class, key, location, number of elements)
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_class, key, _, numel = pid
    name = getattr(storage_class, "storage_name", None)
    dtype = _bfloat16() if name == "BFloat16Storage" else _STORAGE_DTYPES.get(name)
    if dtype is None:
      raise pickle.UnpicklingError(f"unsupported torch storage {storage_class!r}")
    raw = self._archive.read(f"{self._prefix}/data/{key}")
    data = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=int(numel))
    return _TorchStorage(data)


def read_torch_file(path: PathLike) -> Any:
  """The object `torch.save` wrote to `path` (zip format, torch >= 1.6), tensors as numpy arrays.

  Raises:
    ValueError: not a torch zip file (e.g. the legacy pre-1.6 format, or a
      truncated file), a big-endian file, or a pickle that needs anything but
      numpy arrays and tensors.
  """
  path = pathlib.Path(path)
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
      if len(pickles) != 1:
        raise ValueError(f"{path} is a zip file without exactly one */data.pkl: not a torch.save file")
      prefix = pickles[0][: -len("/data.pkl")]
      if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder").strip() != b"little":
        raise ValueError(f"{path} was saved big-endian, which this reader does not handle")
      with archive.open(pickles[0]) as f:
        return _AllowListUnpickler(f, archive, prefix).load()
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path} is not a torch zip file ({e}): truncated, or saved in torch's legacy format "
                     f"(_use_new_zipfile_serialization=False); re-save it with torch >= 1.6 defaults") from e
  except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, TypeError) as e:
    raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e


class ReleaseLatentFolder:
  """One split of a release cache: (path, class index) in the release loader's order.

  Attributes:
    root: `<cache root>/<split>`.
    classes: the class folder names, sorted (their positions are the labels).
    files: [(path, label)], classes in order, files sorted within each class.
  """

  def __init__(self, cache_root: PathLike, split: str = "train"):
    self.root = pathlib.Path(cache_root) / split
    if not self.root.is_dir():
      raise errors.MissingFileError(f"{self.root} does not exist: point latents.release_cache at the folder the release's "
                              f"`python -m dataset.latent --target-path=<root>` wrote (it holds train/ and val/)")
    self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
    self.files = []
    for label, name in enumerate(self.classes):
      for folder, _, names in sorted(os.walk(self.root / name, followlinks=True)):
        self.files += [(pathlib.Path(folder) / n, label) for n in sorted(names) if n.lower().endswith(".pt")]
    if not self.files:
      raise errors.MissingFileError(f"no .pt files under {self.root}/<class>/: not a release latent cache")

  def __len__(self) -> int:
    return len(self.files)

  def read(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(moments, moments_flip, label) of file `index`."""
    path, label = self.files[index]
    record = read_torch_file(path)
    if not isinstance(record, dict) or not {"moments", "moments_flip"} <= set(record):
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise ValueError(f"{path} holds {keys}, expected a dict with 'moments' and 'moments_flip'")
    moments, moments_flip = np.asarray(record["moments"]), np.asarray(record["moments_flip"])
    if moments.shape != moments_flip.shape or moments.ndim != 3:
      raise ValueError(f"{path}: moments {moments.shape} and moments_flip {moments_flip.shape} must be one "
                       f"[H, W, C] shape")
    return moments, moments_flip, label

  def batches(self, batch_size: int, *, skip: frozenset = frozenset()) -> Iterator[tuple[int, np.ndarray, np.ndarray,
                                                                                         np.ndarray]]:
    """(shard index, moments [n,H,W,C], moments_flip, labels [n]) per `batch_size` files; `skip`: shards to leave out."""
    for shard, start in enumerate(range(0, len(self.files), batch_size)):
      if shard in skip:
        continue
      rows = [self.read(i) for i in range(start, min(start + batch_size, len(self.files)))]
      yield (shard, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
             np.array([r[2] for r in rows], np.int32))


def import_release_cache(cache_root: PathLike, out_dir: PathLike, *, split: str = "train", shard_size: int = 256,
                         dtype: str = "float32", num_classes: Optional[int] = None) -> dict[str, Any]:
  """Converts the release's `<cache_root>/<split>/<class>/*.pt` into a flipped npz cache; returns its index.

  Resumable: shards already in `out_dir` are skipped (the file order is fixed by
  the sorted names). Labels are the class folders' sorted positions, as the release
  assigns them; `num_classes` defaults to the number of class folders.
  """
  folder = ReleaseLatentFolder(cache_root, split)
  sample_shape = folder.read(0)[0].shape
  num_classes = len(folder.classes) if num_classes is None else int(num_classes)
  if num_classes < len(folder.classes):
    raise ValueError(f"{folder.root} has {len(folder.classes)} class folders, more than num_classes={num_classes}")
  writer = latents.LatentCacheWriter(
      out_dir, sample_shape=sample_shape, dtype=dtype, shard_size=shard_size, flipped=True,
      metadata={"source": "release .pt cache", "release_cache": str(pathlib.Path(cache_root).resolve()),
                "split": split, "num_files": len(folder), "classes_first_last": [folder.classes[0], folder.classes[-1]],
                "scaling_factor": 0.18215, "posterior": "sample"})
  done = frozenset(writer.completed_shards())
  for shard, moments, moments_flip, labels in folder.batches(shard_size, skip=done):
    writer.write_shard(shard, moments, labels, moments_flip)
  return writer.finalize(num_classes=num_classes)
