"""The release's per-image .pt latent cache, read without torch, against files written by real torch.

Fixtures: tests/fixtures/release_latent_cache{,_numpy2}/ (made by
tests/fixtures/make_release_latent_cache.py with torch 2.14 and numpy 1.26 / 2.4;
expected values in expected.npz, from the generator, not from our reader).
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from drifting_jax.data import latents, release_cache

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ROOTS = [FIXTURES / "release_latent_cache", FIXTURES / "release_latent_cache_numpy2"]


def _expected(root):
  with np.load(root / "expected.npz") as data:
    return {k: data[k] for k in data.files if k != "numpy_major"}


@pytest.mark.parametrize("root", ROOTS, ids=["numpy1", "numpy2"])
def test_read_torch_file_matches_what_torch_saved(root):
  expected = _expected(root)
  files = sorted({k.rsplit("|", 1)[0] for k in expected})
  assert len(files) == 4
  for rel in files:
    record = release_cache.read_torch_file(root / rel.replace("|", "/"))
    assert sorted(record) == ["moments", "moments_flip"]
    for key in record:
      want = expected[f"{rel}|{key}"]
      assert record[key].dtype == want.dtype and record[key].shape == (2, 2, 4)
      np.testing.assert_array_equal(record[key], want)


def test_numpy2_pickles_name_numpy_core():
  # The two fixture sets really differ in the pickled module path, which the reader must accept both of.
  import zipfile
  pkls = []
  for root in ROOTS:
    with zipfile.ZipFile(root / "train/n01000000/img_a.pt") as z:
      pkls.append(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
  assert b"numpy.core.multiarray" in pkls[0] and b"numpy._core.multiarray" in pkls[1]


def test_legacy_truncated_and_foreign_files_are_refused(tmp_path):
  with pytest.raises(ValueError, match="legacy format"):
    release_cache.read_torch_file(ROOTS[0] / "legacy/n01000000/old.pt")
  data = (ROOTS[0] / "train/n01000000/img_a.pt").read_bytes()
  (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated"):
    release_cache.read_torch_file(tmp_path / "cut.pt")
  # A pickle that would run arbitrary code is not executed.
  import pickle
  import zipfile

  class Evil:
    def __reduce__(self):
      return (shutil.rmtree, (str(tmp_path / "victim"),))
  (tmp_path / "victim").mkdir()
  with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"moments": Evil()}, protocol=2))
  with pytest.raises(ValueError, match="refusing to load shutil.rmtree"):
    release_cache.read_torch_file(tmp_path / "evil.pt")
  assert (tmp_path / "victim").is_dir()


def test_folder_order_and_labels_follow_the_release_loader():
  folder = release_cache.ReleaseLatentFolder(ROOTS[0], "train")
  assert folder.classes == ["n01000000", "n02000000"]
  assert [(p.name, label) for p, label in folder.files] == [("img_a.pt", 0), ("img_b.pt", 0), ("img_c.pt", 1)]
  with pytest.raises(FileNotFoundError, match="--target-path"):
    release_cache.ReleaseLatentFolder(ROOTS[0], "test")


@pytest.mark.parametrize("root", ROOTS, ids=["numpy1", "numpy2"])
def test_import_release_cache_into_a_flipped_npz_cache(tmp_path, root):
  expected = _expected(root)
  index = release_cache.import_release_cache(root, tmp_path / "cache", split="train", shard_size=2, num_classes=10)
  assert index["flipped"] and index["num_examples"] == 3 and index["num_classes"] == 10
  assert [s["count"] for s in index["shards"]] == [2, 1]
  reader = latents.LatentCacheReader(tmp_path / "cache")
  plain, labels = reader.load_host_shard(0, 1)
  mirrored, _ = reader.load_host_shard(0, 1, view="latents_flip")
  np.testing.assert_array_equal(labels, [0, 0, 1])
  order = ["train|n01000000|img_a.pt", "train|n01000000|img_b.pt", "train|n02000000|img_c.pt"]
  np.testing.assert_array_equal(plain, np.stack([expected[f"{k}|moments"] for k in order]).astype(np.float32))
  np.testing.assert_array_equal(mirrored, np.stack([expected[f"{k}|moments_flip"] for k in order]).astype(np.float32))

  # Re-running skips what exists; fewer class slots than class folders is an error.
  before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("shard_*.npz")}
  release_cache.import_release_cache(root, tmp_path / "cache", split="train", shard_size=2, num_classes=10)
  assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("shard_*.npz")} == before
  with pytest.raises(ValueError, match="more than num_classes=1"):
    release_cache.import_release_cache(root, tmp_path / "other", split="train", num_classes=1)


def test_import_latents_mode_then_train_data(tmp_path):
  from configs import default
  from drifting_jax import modes
  from drifting_jax.train import data as train_data

  config = default.get_config()
  with pytest.raises(ValueError, match="release_cache"):
    modes.run("import_latents", config, str(tmp_path))
  config.latents.release_cache = str(ROOTS[0])
  config.latents.split = "val"
  out_dir = modes.run("import_latents", config, str(tmp_path))
  assert out_dir == tmp_path / "latents"
  assert json.loads((out_dir / "index.json").read_text())["num_examples"] == 1
  config.data.data_dir = str(out_dir)
  config.data.image_size, config.data.channels = 2, 4
  data = train_data.load_training_data(config)
  want = _expected(ROOTS[0])
  drawn, labels = data.push_batch(0, 64)
  assert (labels == 0).all()
  is_plain = (drawn == want["val|n01000000|img_e.pt|moments"]).all(axis=(1, 2, 3))
  is_mirror = (drawn == want["val|n01000000|img_e.pt|moments_flip"]).all(axis=(1, 2, 3))
  assert (is_plain ^ is_mirror).all() and 0 < is_mirror.sum() < 64
