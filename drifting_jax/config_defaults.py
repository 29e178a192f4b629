"""Every config field's default lives in configs/default.py, and only there.

Code reads `config.section.key` and never `config.get(key, default)` for a key that
configs/default.py defines: a second default in code drifts from the first. A
config written before a key existed (an old experiment file that builds its own
ConfigDict, a config stored beside an old run) still loads: `complete` fills each
missing key from configs/default.py, in one place, before a mode or a program
builder reads the config.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import ml_collections

# configs/ sits beside the package in the repository; it is the project's config
# library, not part of the installed package's code.
DEFAULT_CONFIG_FILE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"


@functools.lru_cache(maxsize=1)
def _default_dict() -> dict:
  if not DEFAULT_CONFIG_FILE.is_file():
    raise FileNotFoundError(f"configs/default.py not found at {DEFAULT_CONFIG_FILE}: drifting_jax runs from its "
                            "repository checkout, whose configs/ folder holds every field's default")
  spec = importlib.util.spec_from_file_location("drifting_jax_default_config", DEFAULT_CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().to_dict()


def default_config() -> ml_collections.ConfigDict:
  """A fresh copy of configs/default.py's config."""
  return ml_collections.ConfigDict(_default_dict())


def missing_keys(config: ml_collections.ConfigDict) -> list[str]:
  """Dotted names of the default's fields that `config` lacks (a missing section counts once)."""
  out: list[str] = []

  def walk(default: dict, node, prefix: str) -> None:
    for key, value in default.items():
      if key not in node:
        out.append(prefix + key)
      elif isinstance(value, dict) and isinstance(node[key], ml_collections.ConfigDict):
        walk(value, node[key], f"{prefix}{key}.")

  walk(_default_dict(), config, "")
  return out


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills, in place, every field of configs/default.py that `config` lacks; returns `config`.

  Fields the config has are never touched (a section it redefines keeps its own
  fields, and gains only the missing ones). A locked config stays locked.
  """
  missing = missing_keys(config)
  if not missing:
    return config
  defaults = _default_dict()
  with config.unlocked():
    for name in missing:
      *parents, leaf = name.split(".")
      node, default = config, defaults
      for part in parents:
        node, default = node[part], default[part]
      value = default[leaf]
      node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return config
