"""Evaluators: the metrics an evaluation computes, listed in `config.eval.evaluators`.

As big_vision's evaluator list: the config names them, each is a small object with
one interface, and nothing is inferred from the samples' shape.

    class Evaluator:
      name: str                 # its key in EVALUATORS and in config.eval.evaluators
      space: str | None         # the feature space it reads (FEATURE_SPACES), or None: the samples' pixels
      def __call__(self, *, pixels, labels, features) -> dict    # process 0, on everything gathered

An evaluator is built once per job from (config, workdir), loading what it needs
(a network, real images, reference statistics); a missing one is a `UsageError`
that names the file and the job that makes it. Evaluators that read the same
feature space share one network and one pass over the samples.

  classifier         the project's digit classifier (MNIST-like data; `--mode=train_classifier` makes it):
                     accuracy (mean, worst class), FD in its features, precision/recall/F1, within-class
                     spread, novelty against the training set, stray ink (`eval.offline`)
  inception_score    Inception Score from the FID InceptionV3's bias-free logits
  fid_inception      FID against `eval.reference_stats` (.npz with mu, sigma)
  precision_recall   precision and recall (Kynkaanniemi et al.) against `eval.reference_features`

Defaults per data set are in the configs: `configs/default.py` (ImageNet latents)
lists the three Inception evaluators, the MNIST configs the classifier.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from drifting_jax import errors
from drifting_jax.data import images, sources
from drifting_jax.eval import classifier_job, metrics as metrics_lib, offline
from drifting_jax.models import artifacts, inception, vae as vae_lib

# --------------------------------------------------------------------------- feature spaces


class InceptionSpace:
  """pool_3 features and bias-free logits of the FID InceptionV3 (`eval.inception_path`)."""

  def __init__(self, config, workdir: str):
    del workdir
    self.batch_size = int(config.eval.batch_size)
    self.extractor = inception.InceptionFeatureExtractor.load(config.eval.inception_path or None)

  def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
    out = self.extractor.features_in_chunks(inception.to_uint8(pixels), self.batch_size)
    # The Inception Score's logits are the graph's bias-free ones (as in the
    # release, the original IS code and torch-fidelity), not `out.logits`.
    return {"features": np.asarray(out.pool_features), "logits": np.asarray(out.logits_unbiased)}


FEATURE_SPACES: dict[str, Callable[[Any, str], Callable[[np.ndarray], dict[str, np.ndarray]]]] = {
    "inception": InceptionSpace,
}

# --------------------------------------------------------------------------- evaluators


class ClassifierEvaluator:
  """The offline MNIST-like metrics in the project classifier's feature space (`eval.offline`)."""
  name, space = "classifier", None

  def __init__(self, config, workdir: str):
    if int(config.data.channels) != 1 or not sources.has_real_images(config):
      raise errors.UsageError(f"the classifier evaluator needs grayscale data with real images, got "
                              f"data.name={config.data.name!r} with {config.data.channels} channels; use the "
                              f"Inception evaluators (eval.evaluators)")
    path = classifier_job.classifier_dir(config, workdir)  # where train_classifier puts it
    if not path.is_dir():
      raise errors.MissingFileError(
          f"no evaluation classifier at {path}: run `python -m drifting_jax.main --mode=train_classifier "
          f"--config=<this config> --workdir={workdir}` first, or set --config.eval.classifier_path")
    self.module, self.params, _ = artifacts.load(path, kind="classifier")
    self.num_classes = int(config.data.num_classes)
    real, real_labels = sources.real_images(config, "heldout")
    train, train_labels = sources.real_images(config, "train")
    self.real = (images.uint8_to_model(real), real_labels)
    self.train = (images.uint8_to_model(train), train_labels)

  def __call__(self, *, pixels: np.ndarray, labels: np.ndarray, features: dict) -> dict[str, Any]:
    del features
    return offline.evaluate_samples(
        pixels, labels, classifier_module=self.module, classifier_params=self.params, real_images=self.real[0],
        real_labels=self.real[1], num_classes=self.num_classes, train_images=self.train[0],
        train_labels=self.train[1])


class InceptionScoreEvaluator:
  name, space = "inception_score", "inception"

  def __init__(self, config, workdir: str):
    del config, workdir

  def __call__(self, *, pixels, labels, features: dict) -> dict[str, Any]:
    del pixels, labels
    score, std = metrics_lib.inception_score(features["inception"]["logits"])
    return {"inception_score": score, "inception_score_std": std}


def _required_path(config, field: str, evaluator: str, what: str) -> str:
  """`config.eval.<field>`, which `evaluator` cannot run without (a UsageError naming the flag if empty)."""
  path = config.eval[field]
  if not path:
    raise errors.UsageError(f"the {evaluator} evaluator needs --config.eval.{field} ({what}); or drop it from "
                            f"eval.evaluators")
  return path


class FIDEvaluator:
  name, space = "fid_inception", "inception"

  def __init__(self, config, workdir: str):
    del workdir
    path = _required_path(config, "reference_stats", self.name, "an .npz with mu and sigma of the real data's "
                          "Inception features, e.g. the release's ImageNet statistics")
    self.mu_ref, self.sigma_ref = metrics_lib.load_reference_statistics(path)

  def __call__(self, *, pixels, labels, features: dict) -> dict[str, Any]:
    del pixels, labels
    mu, sigma = metrics_lib.compute_statistics(features["inception"]["features"])
    return {"fid": metrics_lib.frechet_distance(mu, sigma, self.mu_ref, self.sigma_ref)}


class PrecisionRecallEvaluator:
  name, space = "precision_recall", "inception"

  def __init__(self, config, workdir: str):
    del workdir
    path = _required_path(config, "reference_features", self.name,
                          "an .npz with the real data's Inception `features`")
    try:
      with np.load(path) as data:
        self.real = data["features"]
    except FileNotFoundError as e:
      raise errors.MissingFileError(f"eval.reference_features {path} does not exist") from e

  def __call__(self, *, pixels, labels, features: dict) -> dict[str, Any]:
    del pixels, labels
    precision, recall = metrics_lib.precision_recall(self.real, features["inception"]["features"])
    return {"precision": precision, "recall": recall}


EVALUATORS: dict[str, type] = {e.name: e for e in (ClassifierEvaluator, InceptionScoreEvaluator, FIDEvaluator,
                                                    PrecisionRecallEvaluator)}


def check_names(names) -> tuple[str, ...]:
  """The configured evaluator names, refused (UsageError) if empty or unknown."""
  names = tuple(names)
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown or not names:
    raise errors.UsageError(f"eval.evaluators must name one or more of {sorted(EVALUATORS)}, got {list(names)}")
  return names


class Suite:
  """The evaluators of `config.eval.evaluators` and the feature spaces they read, built once per job.

  Also the decoder of a latent data set's samples (the SD-VAE, `eval.vae_source`), so
  that a watcher loads every network once.
  """

  def __init__(self, config, workdir: str):
    self.evaluators = [EVALUATORS[n](config, workdir) for n in check_names(config.eval.evaluators)]
    self.spaces = {e.space: FEATURE_SPACES[e.space](config, workdir) for e in self.evaluators if e.space}
    self.vae = vae_lib.SDVAE.load(config.eval.vae_source) if sources.get(config).latent else None
    self.decode_chunk = int(config.eval.decode_chunk)
    # Evaluators without a feature space read the samples' pixels, gathered from every host.
    self.needs_pixels = any(e.space is None for e in self.evaluators)

  def to_pixels(self, samples: np.ndarray) -> np.ndarray:
    """Samples -> model-range pixels: latents decoded in chunks, pixels as they are."""
    if self.vae is None:
      return samples
    return np.asarray(self.vae.decode_in_chunks(samples, self.decode_chunk))

  def features(self, pixels: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """{space: {name: [rows, ...]}} of this host's model-range pixels."""
    return {name: space(pixels) for name, space in self.spaces.items()}

  def metrics(self, *, pixels: Optional[np.ndarray], labels: np.ndarray,
              features: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for evaluator in self.evaluators:
      out.update(evaluator(pixels=pixels, labels=labels, features=features))
    return out
