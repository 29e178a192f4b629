"""The modes of `drifting_jax.main`: one table from a mode's name to the function that runs it.

Every mode takes the run's config and workdir, so each job around a training run
(evaluation beside it, a watcher, the classifier or MAE it needs, the latent cache
it reads) is started with the same two arguments as the run itself:

    train             drifting_jax.train.trainer.train_and_evaluate
    sample            drifting_jax.eval.sampling.sample_to_files
    evaluate, watch   drifting_jax.eval.evaluation
    build_latents,
    import_latents    drifting_jax.data.latent_jobs
    train_mae         drifting_jax.train.mae_pretrain.train_mae
    train_classifier  drifting_jax.eval.classifier_job.train_classifier_job
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import ml_collections

from drifting_jax.data import latent_jobs
from drifting_jax.eval import classifier_job, evaluation, sampling
from drifting_jax.train import mae_pretrain, trainer

Mode = Callable[[ml_collections.ConfigDict, str], Any]


def _sample(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  path = sampling.sample_to_files(config, workdir)
  if jax.process_index() == 0:
    print(f"samples written to {path}")
  return path


MODES: dict[str, Mode] = {
    "train": trainer.train_and_evaluate,
    "sample": _sample,
    "evaluate": evaluation.evaluate,
    "watch": evaluation.watch,
    "train_classifier": classifier_job.train_classifier_job,
    "train_mae": mae_pretrain.train_mae,
    "build_latents": latent_jobs.build_latents,
    "import_latents": latent_jobs.import_latents,
}


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs `mode` on the run (config, workdir); returns what the mode's function returns."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
  return MODES[mode](config, workdir)
