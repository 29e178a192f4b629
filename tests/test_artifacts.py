"""Artifacts: the release's folder format, hf:// resolution (offline), validation errors."""

import fnmatch
import importlib
import json
import pathlib
import shutil
import sys
import types

import flax.linen as nn
import huggingface_hub
import huggingface_hub.constants  # a submodule its lazy __getattr__ does not list: imported, not looked up
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from drifting_jax.models import artifacts
from drifting_jax.models import generator as G


def _mae_importable():
  try:
    importlib.import_module("drifting_jax.models.mae")
  except Exception as e:  # a half-written module may fail with anything
    return False, f"drifting_jax.models.mae does not import yet ({type(e).__name__}: {e})"
  return True, ""


MAE_OK, MAE_REASON = _mae_importable()
needs_mae = pytest.mark.skipif(not MAE_OK, reason=MAE_REASON or "mae available")


@pytest.fixture
def gen_dir(fixtures_dir):
  return fixtures_dir / "official_tiny" / "generator"


@pytest.fixture
def gen_copy(gen_dir, tmp_path):
  """A writable copy of the tiny generator artifact."""
  return pathlib.Path(shutil.copytree(gen_dir, tmp_path / "gen_copy"))


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to reach the Hub fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: snapshot_download{args}{kwargs}")
  monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for path in fa:
    assert np.asarray(fa[path]).dtype == np.asarray(fb[path]).dtype, path
    np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=path)


# ----------------------------------------------------------------------------- loading the release's files


def test_load_release_generator(gen_dir):
  module, params, metadata = artifacts.load(gen_dir, kind="gen")
  assert isinstance(module, G.DiTGenerator)
  assert metadata["kind"] == "gen" and metadata["model_config"]["hidden_size"] == 64
  raw = serialization.msgpack_restore((gen_dir / "ema_params.msgpack").read_bytes())
  _assert_trees_equal(params, raw)
  io = np.load(gen_dir / "io.npz")
  samples = G.sample(module, params, io["labels"], io["cfg_scale"],
                     noise={"x": io["noise_x"], "noise_labels": io["noise_labels"]})
  np.testing.assert_allclose(np.asarray(samples), io["samples"], atol=1e-5, rtol=0)
  # The kind comes from metadata.json when not given.
  assert isinstance(artifacts.load(gen_dir)[0], G.DiTGenerator)


@needs_mae
def test_load_release_mae(fixtures_dir):
  folder = fixtures_dir / "official_tiny" / "mae"
  module, params, metadata = artifacts.load(folder, kind="mae")
  assert metadata["kind"] == "mae"
  _assert_trees_equal(params, serialization.msgpack_restore((folder / "ema_params.msgpack").read_bytes()))
  assert type(module).__module__ == "drifting_jax.models.mae"


@needs_mae
def test_abstract_params_of_release_mae_256(fixtures_dir):
  """The 431M-parameter MAE is checked from shapes alone (nothing allocated)."""
  reference = json.loads((fixtures_dir / "official_model_trees.json").read_text())["mae_latent_ablation_256"]
  abstract = artifacts.abstract_params("mae", reference["model_config"])
  assert {k: list(v.shape) for k, v in _flat(abstract).items()} == reference["params"]
  assert sum(int(np.prod(v.shape)) for v in _flat(abstract).values()) > 400_000_000


def test_abstract_params_of_release_generator(fixtures_dir):
  reference = json.loads((fixtures_dir / "official_model_trees.json").read_text())["generator_latent_ablation"]
  abstract = artifacts.abstract_params("gen", reference["model_config"])
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in _flat(abstract).values())
  assert {k: list(v.shape) for k, v in _flat(abstract).items()} == reference["params"]


# ----------------------------------------------------------------------------- saving


@pytest.mark.slow
def test_save_load_round_trip_is_bit_exact(tmp_path):
  config = G.model_config_for("tiny", depth=1, remat=True)
  module = G.build_module(config)
  args, kwargs = G.example_inputs(config, 1)

  @jax.jit  # one program, not one compile per op and leaf shape
  def make_params(key):
    params = module.init({"params": key}, *args, **kwargs)["params"]
    # Make every leaf non-trivial (fresh adaLN layers are all zeros).
    return jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(p.size), p.shape), params)

  params = make_params(jax.random.key(7))

  folder = artifacts.save(tmp_path / "run" / "artifact", module, params, "gen", extra_metadata={"step": 12})
  assert sorted(p.name for p in folder.iterdir()) == ["ema_params.msgpack", "metadata.json"]  # no temp files
  metadata = json.loads((folder / "metadata.json").read_text())
  assert metadata["kind"] == "gen" and metadata["step"] == 12 and metadata["format"] == "flax.msgpack"
  # Runtime-only options are not part of the stored model.
  assert "remat" not in metadata["model_config"]
  assert metadata["model_config"] == {k: v for k, v in config.items() if k != "remat"} | {"use_remat": False}
  # The release's reader is plain flax msgpack: the file holds the bare params dict.
  _assert_trees_equal(serialization.msgpack_restore((folder / "ema_params.msgpack").read_bytes()), params)

  loaded_module, loaded, _ = artifacts.load(folder, kind="gen")
  assert loaded_module == module.clone(remat=False)
  _assert_trees_equal(loaded, params)

  _, as_bf16, _ = artifacts.load(folder, dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(as_bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_save_overwrites_and_rejects_bad_params(gen_dir, tmp_path):
  module, params, _ = artifacts.load(gen_dir)
  folder = artifacts.save(tmp_path / "a", module, params, "gen")
  shifted = jax.tree.map(lambda p: p + 1.0, params)
  artifacts.save(folder, module, shifted, "gen")
  _assert_trees_equal(artifacts.load(folder)[1], shifted)

  bad = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  with pytest.raises(artifacts.ArtifactError, match="wrong shape/dtype .*expected float32.*got bfloat16"):
    artifacts.save(tmp_path / "b", module, bad, "gen")
  assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- hf:// resolution


def _populate_cache(cache, kind, name, source):
  target = cache / "models" / kind / "jax" / name
  shutil.copytree(source, target)
  return target


def test_hf_uri_from_prepopulated_cache(gen_dir, tmp_path, monkeypatch, no_network):
  cache = tmp_path / "cache"
  _populate_cache(cache, "gen", "tiny_gen", gen_dir)
  module, params, metadata = artifacts.load("hf://tiny_gen", kind="gen", cache_dir=cache)
  assert isinstance(module, G.DiTGenerator) and metadata["kind"] == "gen"
  # Kind found by looking under both kinds; cache found through the environment.
  monkeypatch.setenv(artifacts.CACHE_ENV_VAR, str(cache))
  assert artifacts.resolve("hf://tiny_gen") == cache / "models" / "gen" / "jax" / "tiny_gen"
  _assert_trees_equal(artifacts.load("hf://tiny_gen")[1], params)


def test_hf_uri_missing_offline_names_repo_files_and_directory(tmp_path, no_network):
  cache = tmp_path / "empty_cache"
  with pytest.raises(artifacts.ArtifactError) as info:
    artifacts.load("hf://latent_L_sota", kind="gen", cache_dir=cache)
  message = str(info.value)
  assert "Goodeat/drifting" in message
  assert "models/gen/jax/latent_L_sota/ema_params.msgpack" in message
  assert "models/gen/jax/latent_L_sota/metadata.json" in message
  assert str(cache / "models" / "gen" / "jax" / "latent_L_sota") in message
  assert "offline" in message


def test_hf_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.delenv(artifacts.CACHE_ENV_VAR, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert artifacts.default_cache_dir() == tmp_path / ".cache" / "drifting_jax"
  monkeypatch.setenv(artifacts.CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
  assert artifacts.default_cache_dir() == tmp_path / "elsewhere"


def _allow_online(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_hf_download_through_snapshot_download(gen_dir, tmp_path, monkeypatch):
  """Online path against a fake Hub: the right repo and patterns are asked for."""
  _allow_online(monkeypatch)
  remote = tmp_path / "remote_repo"
  _populate_cache(remote, "gen", "tiny_gen", gen_dir)
  calls = []

  def fake_snapshot_download(*, repo_id, repo_type, local_dir, allow_patterns):
    calls.append((repo_id, repo_type, allow_patterns))
    for path in remote.rglob("*"):
      relative = path.relative_to(remote).as_posix()
      if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
        (pathlib.Path(local_dir) / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, pathlib.Path(local_dir) / relative)
    return local_dir

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  cache = tmp_path / "cache"
  module, _, _ = artifacts.load("hf://tiny_gen", cache_dir=cache)
  assert isinstance(module, G.DiTGenerator)
  assert calls == [("Goodeat/drifting", "model", ["models/gen/jax/tiny_gen/*", "models/mae/jax/tiny_gen/*"])]
  # Second load is served from the cache.
  artifacts.load("hf://tiny_gen", kind="gen", cache_dir=cache)
  assert len(calls) == 1
  with pytest.raises(artifacts.ArtifactError, match="has no complete artifact 'nope'"):
    artifacts.load("hf://nope", kind="gen", cache_dir=cache)


def test_hf_download_failure_is_explained(tmp_path, monkeypatch):
  _allow_online(monkeypatch)

  def unreachable(**kwargs):
    raise ConnectionError("Name or service not known")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
  with pytest.raises(artifacts.ArtifactError, match=r"could not download.*Goodeat/drifting.*ConnectionError") as info:
    artifacts.load("hf://latent_ablation", kind="mae", cache_dir=tmp_path)
  assert str(tmp_path / "models" / "mae" / "jax" / "latent_ablation") in str(info.value)


def test_invalid_hf_uri():
  with pytest.raises(artifacts.ArtifactError, match="invalid artifact URI"):
    artifacts.load("hf://")
  with pytest.raises(artifacts.ArtifactError, match="invalid artifact URI"):
    artifacts.load("hf://a/../b")


# ----------------------------------------------------------------------------- validation errors


def test_mismatch_report_lists_every_problem(gen_copy):
  raw = serialization.msgpack_restore((gen_copy / "ema_params.msgpack").read_bytes())
  del raw["noise_embeds_3"]                                                    # missing
  raw["RMSNorm_0"]["bias"] = np.zeros((64,), np.float32)                       # unexpected
  raw["Embed_0"]["embedding"] = np.zeros((12, 64), np.float32)                 # wrong shape
  raw["LightningDiT_0"]["cls_embed"] = raw["LightningDiT_0"]["cls_embed"].astype(np.float16)  # wrong dtype
  (gen_copy / "ema_params.msgpack").write_bytes(serialization.msgpack_serialize(raw))
  with pytest.raises(artifacts.ArtifactError) as info:
    artifacts.load(gen_copy)
  message = str(info.value)
  assert "(4 mismatches)" in message and str(gen_copy) in message
  assert "missing noise_embeds_3/embedding: expected float32[8, 64]" in message
  assert "unexpected RMSNorm_0/bias: float32[64]" in message
  assert "wrong shape/dtype Embed_0/embedding: expected float32[11, 64], got float32[12, 64]" in message
  assert "wrong shape/dtype LightningDiT_0/cls_embed: expected float32[1, 4, 64], got float16[1, 4, 64]" in message


def test_params_wrapped_in_params_key_are_accepted(gen_copy):
  raw = serialization.msgpack_restore((gen_copy / "ema_params.msgpack").read_bytes())
  (gen_copy / "ema_params.msgpack").write_bytes(serialization.msgpack_serialize({"params": raw}))
  _assert_trees_equal(artifacts.load(gen_copy)[1], raw)


def test_truncated_msgpack(gen_copy):
  path = gen_copy / "ema_params.msgpack"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(artifacts.ArtifactError, match=r"ema_params.msgpack is truncated or corrupt") as info:
    artifacts.load(gen_copy)
  assert str(path) in str(info.value)
  path.write_bytes(b"\x00\x01garbage")
  with pytest.raises(artifacts.ArtifactError, match="truncated or corrupt|does not hold a params dict"):
    artifacts.load(gen_copy)


def test_wrong_and_unknown_kind(gen_dir, gen_copy):
  with pytest.raises(artifacts.ArtifactError, match=r"holds a 'gen' model, but a 'mae' model was requested") as info:
    artifacts.load(gen_dir, kind="mae")
  assert str(gen_dir) in str(info.value)
  with pytest.raises(artifacts.ArtifactError,
                     match=r"unknown artifact kind 'vae'; known kinds: \['classifier', 'gen', 'mae'\]"):
    artifacts.load(gen_dir, kind="vae")
  with pytest.raises(artifacts.ArtifactError, match="unknown artifact kind"):
    artifacts.abstract_params("generator", {})
  metadata = json.loads((gen_copy / "metadata.json").read_text())
  (gen_copy / "metadata.json").write_text(json.dumps({**metadata, "kind": "vae"}))
  with pytest.raises(artifacts.ArtifactError, match=r"metadata.json has unknown kind 'vae'"):
    artifacts.load(gen_copy)
  del metadata["kind"]
  (gen_copy / "metadata.json").write_text(json.dumps(metadata))
  with pytest.raises(artifacts.ArtifactError, match="pass kind="):
    artifacts.load(gen_copy)
  assert isinstance(artifacts.load(gen_copy, kind="gen")[0], G.DiTGenerator)


def test_missing_files_and_bad_metadata(gen_copy, tmp_path):
  with pytest.raises(artifacts.ArtifactError, match="does not exist") as info:
    artifacts.load(tmp_path / "nowhere")
  assert str(tmp_path / "nowhere") in str(info.value)
  (gen_copy / "ema_params.msgpack").rename(tmp_path / "moved.msgpack")
  with pytest.raises(artifacts.ArtifactError, match=r"has no ema_params.msgpack"):
    artifacts.load(gen_copy)
  (tmp_path / "moved.msgpack").rename(gen_copy / "ema_params.msgpack")
  (gen_copy / "metadata.json").write_text("{not json")
  with pytest.raises(artifacts.ArtifactError, match=r"metadata.json is not valid JSON"):
    artifacts.load(gen_copy)
  (gen_copy / "metadata.json").write_text(json.dumps({"kind": "gen"}))
  with pytest.raises(artifacts.ArtifactError, match="has no model_config"):
    artifacts.load(gen_copy)
  (gen_copy / "metadata.json").write_text(json.dumps({"kind": "gen", "model_config": {"cond_dim": 64, "widht": 3}}))
  with pytest.raises(artifacts.ArtifactError, match=r"invalid model_config.*unknown generator config keys \['widht'\]"):
    artifacts.load(gen_copy)
  (gen_copy / "metadata.json").unlink()
  with pytest.raises(artifacts.ArtifactError, match="has no metadata.json"):
    artifacts.load(gen_copy)


def test_release_workdir_layout(gen_dir, tmp_path):
  """The release writes artifacts to <workdir>/params_ema/; a workdir loads directly."""
  shutil.copytree(gen_dir, tmp_path / "workdir" / "params_ema")
  module, _, _ = artifacts.load(tmp_path / "workdir", kind="gen")
  assert isinstance(module, G.DiTGenerator)


def test_any_registered_kind_round_trips(tmp_path, monkeypatch):
  """The registry treats every kind alike: a stand-in model module is enough."""
  class TwoLayer(nn.Module):
    width: int
    depth_sizes: tuple = (3, 2)

    @nn.compact
    def __call__(self, x, *, train=False):
      for size in self.depth_sizes:
        x = nn.Dense(size)(x)
      return nn.Dense(self.width)(x)

  toy = types.ModuleType("toy_models")
  toy.build_module = lambda config: TwoLayer(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
  toy.example_inputs = lambda config, batch_size=1: ((jnp.zeros((batch_size, 5)),), {"train": False})
  monkeypatch.setitem(sys.modules, "toy_models", toy)
  monkeypatch.setitem(artifacts.KINDS, "toy", "toy_models")

  module = TwoLayer(width=4)
  params = module.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
  folder = artifacts.save(tmp_path / "toy", module, params, "toy")
  assert json.loads((folder / "metadata.json").read_text())["model_config"] == {"width": 4, "depth_sizes": [3, 2]}
  loaded_module, loaded, _ = artifacts.load(folder, kind="toy")
  assert loaded_module == module
  _assert_trees_equal(loaded, params)
  with pytest.raises(artifacts.ArtifactError, match="holds a 'toy' model, but a 'gen' model was requested"):
    artifacts.load(folder, kind="gen")
  with pytest.raises(artifacts.ArtifactError, match=r"(?s)given to save.*\(1 mismatch\).*missing Dense_2/kernel: expected float32\[2, 4\]"):
    artifacts.save(tmp_path / "bad", module, {k: v for k, v in params.items() if k != "Dense_2"} | {
        "Dense_2": {"bias": params["Dense_2"]["bias"]}}, "toy")
