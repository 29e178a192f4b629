"""The modes of `drifting_jax.main`: one table from a mode's name to the function that runs it.

Every mode takes the run's config and workdir, so each job around a training run
(evaluation beside it, a watcher, the classifier or MAE it needs, the latent cache
it reads) is started with the same two arguments as the run itself.

The table names each function by module and attribute, and `run` imports the
module when its mode runs: `main` can list the modes and reject a bad flag or config
override in a second, before JAX and the trainers are loaded, and a mode loads
only what it uses (build_latents no trainer, train no Inception).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import ml_collections

from drifting_jax import config_defaults, errors

# mode -> (module, function(config, workdir)).
MODES: dict[str, tuple[str, str]] = {
    "train": ("drifting_jax.train.trainer", "train_and_evaluate"),
    "sample": ("drifting_jax.eval.sampling", "sample_mode"),
    "evaluate": ("drifting_jax.eval.evaluation", "evaluate"),
    "watch": ("drifting_jax.eval.evaluation", "watch"),
    "train_classifier": ("drifting_jax.eval.classifier_job", "train_classifier_job"),
    "train_mae": ("drifting_jax.train.mae_pretrain", "train_mae"),
    "build_latents": ("drifting_jax.data.latent_jobs", "build_latents"),
    "import_latents": ("drifting_jax.data.latent_jobs", "import_latents"),
    "compile": ("drifting_jax.scale.compile_mode", "compile_mode"),
}


def mode_function(mode: str) -> Callable[[ml_collections.ConfigDict, str], Any]:
  """The function that runs `mode` (its module imported now)."""
  if mode not in MODES:
    raise errors.UsageError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
  module, function = MODES[mode]
  return getattr(importlib.import_module(module), function)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs `mode` on the run (config, workdir); returns what the mode's function returns.

  A config written before a field existed gets it from configs/default.py first
  (`config_defaults.complete`), so no mode reads a field with a default of its own.
  """
  return mode_function(mode)(config_defaults.complete(config), workdir)
