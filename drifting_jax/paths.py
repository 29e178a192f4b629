"""Run folders on a local disk or in a bucket (gs://, s3://), as one path type.

A pod's hosts share their workdir through object storage: every process must read
the checkpoints and the per-host state the others wrote (`checkpointing`), so a
launch script passes `--workdir=gs://bucket/run`. `pathlib` would quietly turn that
into the local folder `./gs:/bucket/run` on each host; `etils.epath` (orbax's own path
type) keeps URLs as URLs and reads and writes them through TensorFlow's file systems,
and is `pathlib.Path` for local folders.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
from etils import epath


def is_url(path: str | os.PathLike) -> bool:
  """True for object-storage URLs such as gs://bucket/run (not for local paths)."""
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: URLs unchanged, local paths user-expanded and absolute."""
  text = os.fspath(path)
  if is_url(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
  """Readers see the old file or the whole new one, never a part.

  Locally: a temporary file in the same folder, fsync-ed, then renamed over `path`.
  In a bucket an object is replaced whole when its upload completes, so it is written
  directly (a rename there would be a copy).
  """
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_url(path):
    path.write_bytes(data)
    return
  with tempfile.NamedTemporaryFile(dir=os.fspath(path.parent), prefix=f".{path.name}.", suffix=".tmp",
                                   delete=False) as f:
    tmp = f.name
    try:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    except BaseException:
      f.close()
      os.unlink(tmp)
      raise
  os.replace(tmp, os.fspath(path))


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
  """`np.savez` of `arrays` to `path` (local or URL), atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_atomically(path, buffer.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an .npz file (local or URL); no pickles."""
  with np.load(io.BytesIO(as_path(path).read_bytes()), allow_pickle=False) as data:
    return {k: data[k] for k in data.files}
