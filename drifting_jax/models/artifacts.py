"""Model artifacts in the official drifting release's on-disk format.

An artifact is a folder with two files:

  * `ema_params.msgpack`: `flax.serialization.msgpack_serialize` of the `params`
    collection (a nested dict of arrays, no `{"params": ...}` wrapper);
  * `metadata.json`: `{"kind": "gen" | "mae" | "classifier", "model_config": {...}, ...}`;
    the model is rebuilt as `build_module(model_config)` of the kind's model module.

The release writes these into `<workdir>/params_ema/`; a workdir is accepted too.
`hf://NAME` names an artifact of the release's Hugging Face repository
(`Goodeat/drifting`, files under `models/<kind>/jax/NAME/`; release kinds only). It is
fetched with `huggingface_hub.snapshot_download` into a local cache that mirrors the
repository layout: `<cache>/models/<kind>/jax/NAME/`. The cache is the `cache_dir`
argument, else `$DRIFTING_JAX_CACHE`, else `~/.cache/drifting_jax`. A cached artifact
is used as is, without contacting the Hub (released artifacts do not change).

Every kind of model is handled alike through `KINDS`: each maps to a module exposing
`build_module(model_config)` and `example_inputs(model_config, batch_size)`. Besides
the release's kinds (`gen`, `mae`), `classifier` is the project's own evaluation
classifier for grayscale data (`drifting_jax.models.classifier`). Every kind's module
lives beside this one in `drifting_jax.models`: artifacts never reach above the models.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import types
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from drifting_jax import errors, paths

PARAMS_FILE = "ema_params.msgpack"
METADATA_FILE = "metadata.json"
ARTIFACT_FILES = (PARAMS_FILE, METADATA_FILE)

HF_REPO_ID = "Goodeat/drifting"
HF_SCHEME = "hf://"
CACHE_ENV_VAR = "DRIFTING_JAX_CACHE"
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/drifting_jax")

# Artifact kind -> module that builds it. Imported lazily, so one kind's module can
# be missing or broken without affecting the others.
KINDS: dict[str, str] = {
    "gen": "drifting_jax.models.generator",
    "mae": "drifting_jax.models.mae",
    "classifier": "drifting_jax.models.classifier",
}
# Kinds the release publishes on the Hub: an `hf://` name without a kind is looked
# up under these only (the classifier is trained by the project, never downloaded).
RELEASE_KINDS = ("gen", "mae")

# Every rng stream a model may draw from while initialising; unused ones are ignored.
_INIT_RNG_NAMES = ("params", "dropout", "noise", "masking")

PathLike = Union[str, os.PathLike]


class ArtifactError(errors.UsageError):
  """An artifact is missing, unreadable, of the wrong kind or does not match its model."""


def _check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ArtifactError(f"unknown artifact kind {kind!r}; known kinds: {sorted(KINDS)}")
  return kind


def model_module(kind: str) -> types.ModuleType:
  """The Python module that builds models of `kind` (imported on first use)."""
  return importlib.import_module(KINDS[_check_kind(kind)])


def build_module(kind: str, model_config: Mapping[str, Any]) -> nn.Module:
  """The flax module of `kind` described by `model_config`."""
  return model_module(kind).build_module(model_config)


def abstract_params(kind: str, model_config: Mapping[str, Any]) -> Any:
  """`jax.ShapeDtypeStruct` tree of the model's `params`; nothing is allocated."""
  models = model_module(kind)
  module = models.build_module(model_config)

  def init():
    args, kwargs = models.example_inputs(model_config, 1)
    rngs = dict(zip(_INIT_RNG_NAMES, jax.random.split(jax.random.key(0), len(_INIT_RNG_NAMES))))
    return module.init(rngs, *args, **kwargs)["params"]

  return jax.eval_shape(init)


# ----------------------------------------------------------------------------- locating


def default_cache_dir() -> pathlib.Path:
  """`$DRIFTING_JAX_CACHE` if set, else `~/.cache/drifting_jax`."""
  return pathlib.Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


def hf_path_in_repo(kind: str, name: str) -> str:
  """Folder of artifact `name` of `kind` inside the release's Hugging Face repository."""
  return f"models/{_check_kind(kind)}/jax/{name}"


def _hub_offline() -> bool:
  from huggingface_hub import constants  # the Hub client only where hf:// names are used

  env = os.environ.get("HF_HUB_OFFLINE", "")
  return constants.is_offline_mode() or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _is_complete(folder: pathlib.Path) -> bool:
  return all((folder / f).is_file() for f in ARTIFACT_FILES)


def _fetch_instructions(name: str, kinds: list[str], cache_dir: pathlib.Path) -> str:
  lines = []
  for kind in kinds:
    remote = hf_path_in_repo(kind, name)
    lines.append(f"  {', '.join(f'{remote}/{f}' for f in ARTIFACT_FILES)}\n"
                 f"    -> {cache_dir / remote}/")
  return (f"download these files from the Hugging Face repository {HF_REPO_ID} into the local "
          f"directories shown:\n" + "\n".join(lines))


def resolve_hf(name: str, *, kind: Optional[str] = None, cache_dir: Optional[PathLike] = None) -> pathlib.Path:
  """Local folder of the release artifact `hf://name`, downloading it if not cached.

  Without `kind`, the artifact is looked up under both release kinds (`gen`, `mae`);
  it must exist under exactly one. Offline (`HF_HUB_OFFLINE=1`) only the cache is used.
  """
  name = name.strip().strip("/")
  if not name or "/" in name or name in (".", ".."):
    raise ArtifactError(f"invalid artifact URI {HF_SCHEME + name!r}; expected {HF_SCHEME}<name>, e.g. "
                        f"{HF_SCHEME}latent_L_sota")
  cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  kinds = [_check_kind(kind)] if kind is not None else sorted(RELEASE_KINDS)

  def found() -> list[pathlib.Path]:
    return [cache / hf_path_in_repo(k, name) for k in kinds if _is_complete(cache / hf_path_in_repo(k, name))]

  folders = found()
  if not folders:
    if _hub_offline():
      raise ArtifactError(
          f"artifact {HF_SCHEME}{name} is not in the cache {cache} and the Hugging Face Hub is offline "
          f"(HF_HUB_OFFLINE is set); " + _fetch_instructions(name, kinds, cache))
    from huggingface_hub import snapshot_download  # the Hub client only where hf:// names are used

    try:
      snapshot_download(
          repo_id=HF_REPO_ID, repo_type="model", local_dir=str(cache),
          allow_patterns=[f"{hf_path_in_repo(k, name)}/*" for k in kinds])
    except Exception as e:  # network, auth and hub errors all mean the same to the caller
      raise ArtifactError(
          f"could not download artifact {HF_SCHEME}{name} from {HF_REPO_ID} ({type(e).__name__}: {e}); "
          + _fetch_instructions(name, kinds, cache)) from e
    folders = found()
    if not folders:
      raise ArtifactError(
          f"the Hugging Face repository {HF_REPO_ID} has no complete artifact {name!r} under "
          f"{' or '.join(hf_path_in_repo(k, name) for k in kinds)} (need {', '.join(ARTIFACT_FILES)})")
  if len(folders) > 1:
    raise ArtifactError(f"{HF_SCHEME}{name} exists as several kinds ({', '.join(map(str, folders))}); "
                        f"pass kind= to choose one of {kinds}")
  return folders[0]


def resolve(path_or_uri: PathLike, *, kind: Optional[str] = None,
            cache_dir: Optional[PathLike] = None) -> pathlib.Path:
  """Local artifact folder for a path, a release workdir, or an `hf://NAME` URI."""
  text = os.fspath(path_or_uri)
  if text.startswith(HF_SCHEME):
    return resolve_hf(text[len(HF_SCHEME):], kind=kind, cache_dir=cache_dir)
  folder = pathlib.Path(text).expanduser()
  if not folder.is_dir():
    raise ArtifactError(f"artifact folder {folder} does not exist (expected a folder with {', '.join(ARTIFACT_FILES)})")
  if not (folder / PARAMS_FILE).exists() and (folder / "params_ema" / PARAMS_FILE).exists():
    folder = folder / "params_ema"  # a release workdir
  return folder


# ----------------------------------------------------------------------------- reading


def read_metadata(folder: pathlib.Path) -> dict[str, Any]:
  """Parsed `metadata.json` of an artifact folder."""
  path = folder / METADATA_FILE
  if not path.is_file():
    raise ArtifactError(f"artifact {folder} has no {METADATA_FILE} (expected {', '.join(ARTIFACT_FILES)})")
  try:
    metadata = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ArtifactError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(metadata, dict):
    raise ArtifactError(f"{path} must hold a JSON object, got {type(metadata).__name__}")
  return metadata


def read_params(folder: pathlib.Path) -> dict[str, Any]:
  """The raw params dict (numpy arrays) stored in an artifact folder."""
  path = folder / PARAMS_FILE
  if not path.is_file():
    raise ArtifactError(f"artifact {folder} has no {PARAMS_FILE} (expected {', '.join(ARTIFACT_FILES)})")
  data = path.read_bytes()
  try:
    params = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types for bad bytes
    raise ArtifactError(f"{path} is truncated or corrupt ({len(data)} bytes; {type(e).__name__}: {e})") from e
  if not isinstance(params, dict) or not params:
    raise ArtifactError(f"{path} does not hold a params dict (got {type(params).__name__})")
  # The release's own loader accepts a params collection wrapped as {"params": ...}.
  if set(params) == {"params"} and isinstance(params["params"], dict):
    params = params["params"]
  return params


def _leaf_description(leaf: Any) -> str:
  return f"{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}"


def _describe_stored(value: Any) -> str:
  return _leaf_description(value) if hasattr(value, "dtype") else f"{type(value).__name__} {value!r:.40}"


def param_mismatches(params: Any, expected: Any) -> list[str]:
  """Every difference in path, shape and dtype between `params` and `expected`."""
  got = traverse_util.flatten_dict(params, sep="/")
  want = traverse_util.flatten_dict(expected, sep="/")
  problems = [f"missing {path}: expected {_leaf_description(want[path])}" for path in sorted(set(want) - set(got))]
  problems += [f"unexpected {path}: {_describe_stored(got[path])}" for path in sorted(set(got) - set(want))]
  for path in sorted(set(got) & set(want)):
    leaf = got[path]
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
      problems.append(f"wrong type {path}: expected an array {_leaf_description(want[path])}, "
                      f"got {_describe_stored(leaf)}")
    elif tuple(leaf.shape) != tuple(want[path].shape) or np.dtype(leaf.dtype) != np.dtype(want[path].dtype):
      problems.append(f"wrong shape/dtype {path}: expected {_leaf_description(want[path])}, "
                      f"got {_leaf_description(leaf)}")
  return problems


def _check_params(params: Any, kind: str, model_config: Mapping[str, Any], where: str) -> None:
  problems = param_mismatches(params, abstract_params(kind, model_config))
  if problems:
    count = f"{len(problems)} mismatch" + ("es" if len(problems) > 1 else "")
    raise ArtifactError(
        f"params {where} do not match the {kind!r} model built from its model_config ({count}):\n  "
        + "\n  ".join(problems))


def load(
    path_or_uri: PathLike,
    *,
    kind: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    dtype: Optional[Any] = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
  """Load an artifact as `(module, params, metadata)`.

  Args:
    path_or_uri: an artifact folder, a release workdir (its `params_ema/` is used),
      or `hf://NAME`.
    kind: expected kind ("gen", "mae" or "classifier"); an artifact of another kind
      is an error. Needed only when the metadata does not say.
    cache_dir: local cache for `hf://` artifacts (default: see `default_cache_dir`).
    dtype: if given, floating-point params are cast to it after validation.

  Every leaf is checked against `abstract_params(kind, model_config)`; all missing,
  unexpected and mis-shaped leaves are reported together in one `ArtifactError`.
  """
  if kind is not None:
    _check_kind(kind)
  folder = resolve(path_or_uri, kind=kind, cache_dir=cache_dir)
  metadata = read_metadata(folder)
  stored_kind = metadata.get("kind")
  if stored_kind is None and kind is None:
    raise ArtifactError(f"{folder / METADATA_FILE} does not say which kind of model it holds; pass kind= "
                        f"(one of {sorted(KINDS)})")
  if stored_kind is not None and stored_kind not in KINDS:
    raise ArtifactError(f"{folder / METADATA_FILE} has unknown kind {stored_kind!r}; known kinds: {sorted(KINDS)}")
  if kind is not None and stored_kind is not None and stored_kind != kind:
    raise ArtifactError(f"artifact {folder} holds a {stored_kind!r} model, but a {kind!r} model was requested")
  kind = kind or stored_kind
  model_config = metadata.get("model_config")
  if not isinstance(model_config, dict) or not model_config:
    raise ArtifactError(f"{folder / METADATA_FILE} has no model_config; the model cannot be rebuilt")

  try:
    module = build_module(kind, model_config)
  except ImportError as e:
    raise ArtifactError(f"cannot build {kind!r} models: {KINDS[kind]} does not import ({e})") from e
  except (TypeError, ValueError) as e:
    raise ArtifactError(f"invalid model_config in {folder / METADATA_FILE}: {e}") from e
  params = read_params(folder)
  _check_params(params, kind, model_config, f"in artifact {folder}")
  params = jax.tree.map(jnp.asarray, params)
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  return module, params, metadata


# ----------------------------------------------------------------------------- writing


def model_config_of(kind: str, module: nn.Module) -> dict[str, Any]:
  """The `model_config` that rebuilds `module`: its dataclass fields, as JSON values.

  Fields a kind's model module lists in `RUNTIME_ONLY_KEYS` (e.g. rematerialisation)
  are left out.
  """
  skip = {"parent", "name", *getattr(model_module(kind), "RUNTIME_ONLY_KEYS", ())}
  config = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in skip}
  config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
  try:
    json.dumps(config)
  except TypeError as e:
    raise ArtifactError(f"the {kind!r} module's config is not JSON-serialisable: {e}") from e
  return config


def save(
    path: PathLike,
    module: nn.Module,
    params: Any,
    kind: str,
    *,
    extra_metadata: Optional[Mapping[str, Any]] = None,
) -> pathlib.Path:
  """Write `params` of `module` as an artifact folder at `path` and return it.

  The params are checked against the module first (same check as `load`). Each file
  is written atomically; `metadata.json` is written last, so a folder with a
  metadata file always has a complete params file next to it. `extra_metadata`
  (e.g. step, ema_decay) is stored alongside the release's standard keys.
  """
  _check_kind(kind)
  model_config = model_config_of(kind, module)
  # A bucket URL (a pod run's workdir) stays one; a local path is expanded.
  folder = paths.as_path(path) if paths.is_url(path) else pathlib.Path(path).expanduser()
  _check_params(params, kind, model_config, f"given to save({folder})")
  metadata = {"format": "flax.msgpack", "kind": kind, "backend": "jax", **dict(extra_metadata or {}),
              "model_config": model_config}
  try:
    metadata_bytes = (json.dumps(metadata, indent=2) + "\n").encode("utf-8")
  except TypeError as e:
    raise ArtifactError(f"extra_metadata is not JSON-serialisable: {e}") from e
  folder.mkdir(parents=True, exist_ok=True)
  host_params = jax.tree.map(np.asarray, jax.device_get(params))
  paths.write_atomically(folder / PARAMS_FILE, serialization.msgpack_serialize(host_params))
  paths.write_atomically(folder / METADATA_FILE, metadata_bytes)
  return folder
