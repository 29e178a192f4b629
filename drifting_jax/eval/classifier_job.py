r"""The `train_classifier` mode: the evaluation classifier of a run, with its reference statistics.

`python -m drifting_jax.main --mode=train_classifier --config=... --workdir=W`
(`train_classifier_job`) trains the digit classifier (`drifting_jax.models.classifier`)
on the held-out part of the config's grayscale data, writes the artifact to
`W/classifier` (or `config.eval.classifier_path`), and next to its two files the
reference statistics of the held-out data in its feature space
(`reference_stats.npz`: `mu`, `sigma`) and the reference features themselves
(`reference_features.npz`: `features`, `labels`). An optional `config.classifier`
section overrides the training settings (`steps`, `batch_size`, `learning_rate`,
`seed`, `augment`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from typing import Any

import jax
import numpy as np

from drifting_jax import errors
from drifting_jax.data import images as image_utils, sources
from drifting_jax.eval import metrics as metrics_lib
from drifting_jax.models import artifacts
from drifting_jax.models.classifier import (DEFAULT_BATCH_SIZE, DEFAULT_LEARNING_RATE, DEFAULT_STEPS,
                                            features_and_logits, train_classifier)

REFERENCE_STATS_FILE = "reference_stats.npz"
REFERENCE_FEATURES_FILE = "reference_features.npz"


def _job_data(config) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """((held-out images, labels), (generator's training images, labels)), uint8 on the training canvas.

  The classifier learns from the held-out part, which the generator never sees, and
  is validated on the generator's training data, which the classifier never sees.
  """
  if not sources.has_real_images(config) or int(config.data.channels) != 1:
    raise errors.UsageError(f"the evaluation classifier is for grayscale pixel data "
                            f"({', '.join(n for n, s in sources.SOURCES.items() if s.load_real)}), "
                            f"got data.name={config.data.name!r}")
  return sources.real_images(config, "heldout"), sources.real_images(config, "train")


def _job_settings(config) -> dict[str, Any]:
  section = config.get("classifier") or {}
  settings = {"steps": DEFAULT_STEPS, "batch_size": DEFAULT_BATCH_SIZE, "learning_rate": DEFAULT_LEARNING_RATE,
              "seed": int(config.seed), "augment": True}
  unknown = sorted(set(section) - set(settings))
  if unknown:
    raise ValueError(f"unknown config.classifier keys {unknown}; valid keys: {sorted(settings)}")
  settings.update({k: section[k] for k in section})
  return settings


def _save_npz_atomically(path: pathlib.Path, **arrays: np.ndarray) -> None:
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".npz", delete=False) as f:
    np.savez(f, **arrays)
  os.replace(f.name, path)


def classifier_dir(config, workdir: str) -> pathlib.Path:
  """Where the classifier artifact of a run lives: eval.classifier_path, else workdir/classifier."""
  return pathlib.Path(config.eval.classifier_path or pathlib.Path(workdir) / "classifier").expanduser()


def train_classifier_job(config, workdir: str) -> dict[str, Any]:
  """`--mode=train_classifier`: train, validate, save the artifact and reference statistics.

  Returns a summary: the artifact folder, the reference files, training metrics,
  `validation_accuracy` (on the generator's training data) and
  `reference_frechet_distance` (Frechet distance between the generator's training
  data and the held-out reference in this feature space: what a generator that
  reproduced its training set exactly would score).
  """
  settings = _job_settings(config)
  (heldout_images, heldout_labels), (train_images, train_labels) = _job_data(config)
  num_classes = int(config.data.num_classes)
  logging.info("training the evaluation classifier on %d held-out images (%s)", len(heldout_images), settings)
  module, params, train_metrics = train_classifier(
      heldout_images, heldout_labels, num_classes=num_classes, steps=int(settings["steps"]),
      batch_size=int(settings["batch_size"]), seed=int(settings["seed"]), augment=bool(settings["augment"]),
      learning_rate=float(settings["learning_rate"]))

  reference_features, _ = features_and_logits(module, params, image_utils.uint8_to_model(heldout_images))
  train_features, train_logits = features_and_logits(module, params, image_utils.uint8_to_model(train_images))
  validation_accuracy = float(np.mean(np.argmax(train_logits, axis=1) == train_labels))
  mu, sigma = metrics_lib.compute_statistics(reference_features)
  reference_fd = metrics_lib.frechet_distance(*metrics_lib.compute_statistics(train_features), mu, sigma)
  summary = {
      "data": str(config.data.name),
      "num_train": int(len(heldout_images)),
      "num_validation": int(len(train_images)),
      "validation_accuracy": validation_accuracy,
      "reference_frechet_distance": reference_fd,
      **settings,
      **train_metrics,
  }
  folder = classifier_dir(config, workdir)
  if jax.process_index() == 0:
    artifacts.save(folder, module, params, kind="classifier", extra_metadata=summary)
    metrics_lib.save_reference_statistics(folder / REFERENCE_STATS_FILE, mu, sigma)
    _save_npz_atomically(folder / REFERENCE_FEATURES_FILE, features=reference_features, labels=heldout_labels)
    print(json.dumps({"classifier": str(folder), **summary}, indent=2))
  logging.info("classifier: %.2f%% accuracy on %d unseen images; saved to %s", 100 * validation_accuracy,
               len(train_images), folder)
  return {"path": str(folder), "reference_stats": str(folder / REFERENCE_STATS_FILE),
          "reference_features": str(folder / REFERENCE_FEATURES_FILE), **summary}
