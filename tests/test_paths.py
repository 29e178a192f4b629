"""Workdirs in a bucket (gs://): URLs stay URLs through every file the run writes.

A pod's hosts share their workdir through object storage. These tests redirect
etils.epath's gs:// backend to a local folder (`epath.testing.mock_epath`), so the
code's own reads and writes go through the same URL paths a pod run uses, with no
network. (Orbax's array data go through tensorstore, which has its own gs:// driver;
that part is orbax's and is not exercised here.)
"""

import json
import os
import pathlib

import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from drifting_jax import checkpointing, paths, writers
from drifting_jax.data import images

BUCKET = "gs://test-bucket"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://test-bucket/... is served from tmp_path/bucket/...; returns that local root.

  With TensorFlow installed epath sends gs:// to TF's GCS file system whatever the
  mock says; telling it TF is absent makes the mocked backend the one used (and keeps
  every request off the network: the fixture fails on any path outside the bucket).
  """
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  root = tmp_path / "bucket"
  root.mkdir()
  seen = []

  def local(path):
    text = os.fspath(path)
    if not text.startswith(BUCKET):  # local files (e.g. jax's compilation cache) pass through
      assert "://" not in text, f"unexpected URL {text!r}: only {BUCKET} may be touched"
      return text
    seen.append(text)
    return str(root) + text[len(BUCKET):]

  def redirect(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def redirect_two(original, src, dst, *args, **kwargs):
    return original(local(src), local(dst), *args, **kwargs)

  def back(path):
    text = os.fspath(path)
    return BUCKET + text[len(str(root)):] if text.startswith(str(root)) else text

  def redirect_glob(original, pattern):
    return [back(p) for p in original(local(pattern))]

  def redirect_walk(original, top, **kwargs):
    for d, dirs, files in original(local(top), **kwargs):
      yield back(d), dirs, files

  with epath_testing.mock_epath(open=redirect, exists=redirect, isdir=redirect, listdir=redirect,
                                makedirs=redirect, mkdir=redirect, remove=redirect, rmtree=redirect,
                                stat=redirect, glob=redirect_glob, walk=redirect_walk,
                                rename=redirect_two, replace=redirect_two, copy=redirect_two):
    yield root, seen


def test_urls_stay_urls_and_local_paths_become_absolute(monkeypatch, tmp_path):
  assert os.fspath(paths.as_path("gs://b/run/x")) == "gs://b/run/x"
  assert paths.is_url("gs://b/run") and not paths.is_url("runs/x")
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.as_path("runs/x")) == str(tmp_path / "runs" / "x")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert os.fspath(paths.as_path("~/r")) == str(tmp_path / "r")
  # What pathlib would have made of the URL: a local folder named "gs:".
  assert str(pathlib.Path("gs://b/run").absolute()).endswith("gs:/b/run")


def test_npz_and_png_round_trip_through_the_bucket(bucket):
  root, seen = bucket
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
  paths.save_npz(f"{BUCKET}/run/x.npz", arrays)
  back = paths.load_npz(f"{BUCKET}/run/x.npz")
  assert set(back) == {"a", "b"} and all(np.array_equal(back[k], arrays[k]) for k in arrays)
  with np.load(root / "run" / "x.npz") as data:  # the object landed where the URL says
    np.testing.assert_array_equal(data["a"], arrays["a"])
  images.save_png(f"{BUCKET}/run/samples/grid.png", np.full((4, 6, 1), 200, np.uint8))
  assert (root / "run" / "samples" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert seen and all(s.startswith(BUCKET) for s in seen)


def test_metrics_jsonl_appends_across_a_resume(bucket):
  root, _ = bucket
  first = writers.JsonlWriter(f"{BUCKET}/run/metrics.jsonl")
  first.write_scalars(1, {"loss": 0.5})
  first.write_scalars(2, {"loss": 0.25})
  resumed = writers.JsonlWriter(f"{BUCKET}/run/metrics.jsonl")  # a restarted run opens the same file
  resumed.write_scalars(3, {"loss": 0.125})
  lines = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}]


def test_host_state_of_a_checkpoint_is_written_and_read_in_the_bucket(bucket):
  root, _ = bucket
  ckpt = checkpointing.Checkpointer.__new__(checkpointing.Checkpointer)  # the host-state half only:
  ckpt.workdir = paths.as_path(f"{BUCKET}/run")                            # orbax's arrays go through
  ckpt.host_directory = ckpt.workdir / "host_state"                        # tensorstore, not epath
  bank = {"bank/pos": np.arange(12, dtype=np.float32).reshape(3, 4), "cursor": np.int64(7)}
  ckpt._write_host_state(40, bank)
  assert (root / "run" / "host_state" / "40" / "process_0.npz").exists()
  assert os.fspath(ckpt._host_file(40)) == f"{BUCKET}/run/host_state/40/process_0.npz"
  assert ckpt._saved_process_count(40) == 1
  back = ckpt._read_host_file(40, 0)
  assert set(back) == set(bank) and np.array_equal(back["bank/pos"], bank["bank/pos"])
  (root / "run" / "host_state" / "40" / "process_0.npz").write_bytes(b"not an npz")
  with pytest.raises(checkpointing.CheckpointError, match="corrupt"):
    ckpt._read_host_file(40, 0)


def test_an_artifact_is_saved_into_the_bucket(bucket):
  root, _ = bucket
  from drifting_jax.models import artifacts, generator as generator_lib
  import jax
  model_config = generator_lib.model_config_for("tiny")
  module = generator_lib.build_module(model_config)
  abstract = artifacts.abstract_params("gen", model_config)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
  folder = artifacts.save(f"{BUCKET}/run/params_ema", module, params, kind="gen")
  assert os.fspath(folder) == f"{BUCKET}/run/params_ema"
  # What landed where the URL says is a valid artifact, bit for bit.
  _, loaded, metadata = artifacts.load(root / "run" / "params_ema", kind="gen")
  assert metadata["kind"] == "gen"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(b), a)


def test_a_checkpointer_on_a_bucket_url_keeps_it(bucket):
  root, _ = bucket
  try:
    from google.cloud import storage  # noqa: F401
  except ImportError:  # orbax's gs:// support needs it: a clear error, naming the package
    with pytest.raises(checkpointing.CheckpointError, match="pip install google-cloud-storage"):
      checkpointing.Checkpointer(f"{BUCKET}/run", async_save=False)
    return
  ckpt = checkpointing.Checkpointer(f"{BUCKET}/run", async_save=False)
  assert os.fspath(ckpt.directory) == f"{BUCKET}/run/checkpoints"
  assert os.fspath(ckpt.host_directory) == f"{BUCKET}/run/host_state"
  assert (root / "run" / "checkpoints").is_dir() and ckpt.latest_step() is None
