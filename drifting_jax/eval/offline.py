"""Offline metrics of class-conditional samples in the project classifier's feature space.

For MNIST-like data the evaluation features come from the project's own classifier
(`drifting_jax.eval.classifier`), and the reference is real held-out data with its
labels. `evaluate_samples` reports (keys of the returned dict):

  * `accuracy`, `accuracy_per_class`: how often the classifier predicts the label a
    sample was conditioned on; `real_accuracy` is the same on the real images (the
    ceiling a perfect generator would reach).
  * `precision`, `recall`, `f1` (Kynkaanniemi et al. 2019, k-NN balls with k = `k`):
    precision = fraction of samples inside the k-NN ball of some real image (fidelity),
    recall = fraction of real images inside the ball of some sample (diversity).
  * `precision_per_class`, `recall_per_class`: the same between the samples
    conditioned on class c and the real images of class c. A class whose samples
    collapse to a few modes recalls little of its real distribution even when every
    sample is a good digit.
  * `coverage_per_class` (and its mean `coverage`; Naeem et al. 2020): fraction of
    the real images of class c whose k-NN ball among the real images of class c
    holds a sample conditioned on c. Recall is fooled by scattered samples (their
    k-NN balls are large, so a few outliers "recall" everything; e.g. samples with
    shuffled labels keep a high per-class recall); coverage draws its balls around
    real images only, so it is not.
  * `neighbour_agreement_per_class` (and overall `neighbour_agreement`): fraction of
    the real images of class c whose nearest sample was conditioned on c. Low when
    the class's real modes are nearest to other classes' samples.
  * `frechet_distance` between Gaussians fitted to all sample and all real features;
    `frechet_distance_per_class` and their mean `frechet_distance_class_mean`.

With the training images given (`train_images`), three checks a reader of the
samples wants, in pixel space (model range [-1, 1], L2):

  * `spread_per_class` / `spread_ratio`: the within-class mean pairwise distance of
    the samples over that of the real images of the class (1: as varied as real
    digits; a collapsed class is near 0); `spread_ratio` is the mean over classes.
  * `nearest_train_distance` / `heldout_nearest_train_distance` and their ratio
    `novelty_ratio`: the mean distance of each sample, and of each held-out real
    image, to its nearest training image. Held-out digits are new digits, so a ratio
    near 1 or above says the samples are no closer to the training set than new
    data are; copies of training digits would drive it towards 0.
    `copied_fraction` is the share of samples nearer to a training image than the
    closest held-out image is to one (the 0th percentile of held-out distances).
  * `real_frechet_distance`: the Frechet distance between the training and the
    held-out real images in the classifier's features, the floor a generator of
    training-like digits would reach against the held-out set.

With the training labels as well (`train_labels`), how clean the samples are, which
the classifier's features barely see (it reads a speckled digit as well as a clean one):

  * `stray_ink` / `real_stray_ink` and their ratio `stray_ink_ratio` (see
    `stray_ink`): the share of a class's background pixels (pixels almost never
    inked in that class's training digits) that are inked in a sample, and the same
    for held-out real digits. Speckle around a digit raises it; a ratio near 1 says
    the samples are as clean as real digits.

Per-class values are lists indexed by class id, `None` where a class has too few
samples or real images for the statistic (k + 1 for the k-NN ones, 2 for the
Frechet distance). The k-NN and Frechet computations are those of
`drifting_jax.eval.metrics`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Any, Optional, Union

import numpy as np

from drifting_jax.models import classifier as classifier_lib
from drifting_jax.eval import metrics as metrics_lib

PathLike = Union[str, os.PathLike]

# Rows of real features compared with all samples at once by the nearest-neighbour search.
_NEIGHBOUR_BLOCK = 512


def _f1(precision: float, recall: float) -> float:
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _mean(values: list[Optional[float]]) -> Optional[float]:
  present = [v for v in values if v is not None]
  return float(np.mean(present)) if present else None


def nearest_neighbours(queries: Any, candidates: Any) -> tuple[np.ndarray, np.ndarray]:
  """`(index, squared distance)` of each query row's nearest candidate row, each (Nq,).

  Float64, `_NEIGHBOUR_BLOCK` query rows at a time; both sets are shifted by the
  candidates' mean first, which keeps `|q|^2 + |c|^2 - 2 q.c` accurate.
  """
  candidates = np.asarray(candidates, np.float64)
  centre = candidates.mean(axis=0)
  candidates = candidates - centre
  queries = np.asarray(queries, np.float64) - centre
  candidate_norms = np.sum(np.square(candidates), axis=1)
  index = np.empty(len(queries), np.int64)
  squared = np.empty(len(queries), np.float64)
  for start in range(0, len(queries), _NEIGHBOUR_BLOCK):
    block = queries[start:start + _NEIGHBOUR_BLOCK]
    rows = slice(start, start + len(block))
    # |q|^2 is constant along a row, so it is added only after the argmin.
    partial = candidate_norms[None, :] - 2.0 * block @ candidates.T
    index[rows] = np.argmin(partial, axis=1)
    squared[rows] = np.maximum(partial[np.arange(len(block)), index[rows]] + np.sum(np.square(block), axis=1), 0.0)
  return index, squared


def coverage(real_features: Any, fake_features: Any, k: int = metrics_lib.DEFAULT_NEIGHBOURHOOD) -> float:
  """Coverage (Naeem et al. 2020): fraction of real rows whose k-NN ball holds a fake row.

  Balls are those of the real rows among themselves (radius: distance to the k-th
  nearest other real row), open as in the reference implementation.
  """
  real_radii = metrics_lib.nearest_neighbour_radii(real_features, k)
  _, squared = nearest_neighbours(real_features, fake_features)
  return float(np.mean(squared < real_radii))


def evaluate_features(
    features: Any,
    logits: Any,
    labels: Any,
    *,
    real_features: Any,
    real_labels: Any,
    num_classes: int,
    k: int = metrics_lib.DEFAULT_NEIGHBOURHOOD,
    real_logits: Optional[Any] = None,
) -> dict[str, Any]:
  """The metrics of `evaluate_samples`, from features and logits computed elsewhere.

  Args:
    features, logits: (N, D) features and (N, K) logits of the samples.
    labels: (N,) class each sample was conditioned on.
    real_features, real_labels: (M, D) features and (M,) labels of the real images.
    num_classes: number of classes; per-class lists have this length.
    k: neighbourhood size of precision, recall and coverage.
    real_logits: (M, K) logits of the real images; gives `real_accuracy`.
  """
  features = np.asarray(features, np.float64)
  real_features = np.asarray(real_features, np.float64)
  logits = np.asarray(logits)
  labels = np.asarray(labels).astype(np.int64)
  real_labels = np.asarray(real_labels).astype(np.int64)
  if features.ndim != 2 or real_features.ndim != 2 or features.shape[1] != real_features.shape[1]:
    raise ValueError(f"features must be (N, D) and real_features (M, D) with the same D, got {features.shape} "
                     f"and {real_features.shape}")
  if labels.shape != (len(features),) or logits.shape != (len(features), logits.shape[-1]):
    raise ValueError(f"need one label and one logits row per sample: {len(features)} samples, labels "
                     f"{labels.shape}, logits {logits.shape}")
  if real_labels.shape != (len(real_features),):
    raise ValueError(f"need one label per real image: {len(real_features)} images, labels {real_labels.shape}")
  for name, values in (("labels", labels), ("real_labels", real_labels)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{values.min()}, {values.max()}]")

  correct = np.argmax(logits, axis=1) == labels
  precision, recall = metrics_lib.precision_recall(real_features, features, k)
  nearest_label = labels[nearest_neighbours(real_features, features)[0]]
  agrees = nearest_label == real_labels

  per_class: dict[str, list[Optional[float]]] = {
      name: [] for name in ("accuracy", "precision", "recall", "coverage", "neighbour_agreement",
                            "frechet_distance")}
  for c in range(num_classes):
    mine, real_mine = labels == c, real_labels == c
    fake_c, real_c = features[mine], real_features[real_mine]
    per_class["accuracy"].append(float(correct[mine].mean()) if mine.any() else None)
    per_class["neighbour_agreement"].append(float(agrees[real_mine].mean()) if real_mine.any() else None)
    if len(fake_c) > k and len(real_c) > k:
      class_precision, class_recall = metrics_lib.precision_recall(real_c, fake_c, k)
      class_coverage = coverage(real_c, fake_c, k)
    else:
      class_precision = class_recall = class_coverage = None
    per_class["precision"].append(class_precision)
    per_class["recall"].append(class_recall)
    per_class["coverage"].append(class_coverage)
    enough = len(fake_c) >= 2 and len(real_c) >= 2
    per_class["frechet_distance"].append(metrics_lib.fid_from_features(fake_c, real_c) if enough else None)

  results: dict[str, Any] = {
      "num_samples": int(len(features)),
      "num_real": int(len(real_features)),
      "k": int(k),
      "accuracy": float(correct.mean()),
      "precision": precision,
      "recall": recall,
      "f1": _f1(precision, recall),
      "coverage": _mean(per_class["coverage"]),
      "neighbour_agreement": float(agrees.mean()),
      "frechet_distance": metrics_lib.fid_from_features(features, real_features),
      "frechet_distance_class_mean": _mean(per_class["frechet_distance"]),
  }
  if real_logits is not None:
    results["real_accuracy"] = float(np.mean(np.argmax(np.asarray(real_logits), axis=1) == real_labels))
  results.update({f"{name}_per_class": values for name, values in per_class.items()})
  return results


def mean_pairwise_distance(x: np.ndarray) -> Optional[float]:
  """Mean L2 distance over all unordered pairs of rows of x ([N, ...], N >= 2)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  if len(x) < 2:
    return None
  x = x - x.mean(axis=0)
  norms = np.sum(x * x, axis=1)
  squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * x @ x.T, 0.0)
  upper = np.triu_indices(len(x), k=1)
  return float(np.mean(np.sqrt(squared[upper])))


def diversity_and_novelty(images_model_range: Any, labels: Any, *, real_images: Any, real_labels: Any,
                          train_images: Any, num_classes: int) -> dict[str, Any]:
  """Within-class spread against real images, and distances to the training set (pixel space)."""
  fake = np.asarray(images_model_range, np.float64).reshape(len(images_model_range), -1)
  real = np.asarray(real_images, np.float64).reshape(len(real_images), -1)
  train = np.asarray(train_images, np.float64).reshape(len(train_images), -1)
  labels, real_labels = np.asarray(labels), np.asarray(real_labels)
  spread, spread_real, ratios = [], [], []
  for c in range(num_classes):
    s_fake, s_real = mean_pairwise_distance(fake[labels == c]), mean_pairwise_distance(real[real_labels == c])
    spread.append(s_fake)
    spread_real.append(s_real)
    ratios.append(None if s_fake is None or not s_real else s_fake / s_real)
  fake_nearest = np.sqrt(nearest_neighbours(fake, train)[1])
  real_nearest = np.sqrt(nearest_neighbours(real, train)[1])
  return {
      "spread_ratio": _mean(ratios),
      "spread_ratio_per_class": ratios,
      "spread_per_class": spread,
      "real_spread_per_class": spread_real,
      "nearest_train_distance": float(fake_nearest.mean()),
      "heldout_nearest_train_distance": float(real_nearest.mean()),
      "novelty_ratio": float(fake_nearest.mean() / max(real_nearest.mean(), 1e-12)),
      "copied_fraction": float(np.mean(fake_nearest < real_nearest.min())),
  }


# A pixel is inked above a quarter of full intensity (-0.5 in model range [-1, 1]).
# It belongs to a class's background where at most 1% of that class's training
# digits ink it above half intensity (0 in model range).
STRAY_INK_LEVEL = -0.5
BACKGROUND_SUPPORT = 0.01


def stray_ink(images_model_range: Any, labels: Any, *, train_images: Any, train_labels: Any,
              num_classes: int) -> float:
  """Share of background pixels inked, over all `images` (class c judged on class c's background).

  The background of class c: the pixels that more than `BACKGROUND_SUPPORT` of the
  training digits of c do not ink above half intensity (model range > 0); a pixel of
  an image is inked above `STRAY_INK_LEVEL`. Returns (inked background pixels) /
  (background pixels), summed over all images; real held-out digits give the
  reference value (about 0.002 on MNIST-5k).
  """
  images = np.asarray(images_model_range, np.float32).reshape(len(images_model_range), -1)
  train = np.asarray(train_images, np.float32).reshape(len(train_images), -1)
  labels, train_labels = np.asarray(labels), np.asarray(train_labels)
  if images.shape[1] != train.shape[1]:
    raise ValueError(f"images have {images.shape[1]} values each, training images {train.shape[1]}")
  inked = background = 0
  for c in range(num_classes):
    mine, theirs = images[labels == c], train[train_labels == c]
    if not len(mine):
      continue
    if not len(theirs):
      raise ValueError(f"class {c} has samples but no training images to define its background")
    mask = (theirs > 0.0).mean(axis=0) <= BACKGROUND_SUPPORT
    inked += int(((mine > STRAY_INK_LEVEL) & mask).sum())
    background += int(mask.sum()) * len(mine)
  return inked / background if background else float("nan")


def evaluate_samples(
    images_model_range: Any,
    labels: Any,
    *,
    classifier_module: Any,
    classifier_params: Any,
    real_images: Any,
    real_labels: Any,
    num_classes: int,
    k: int = metrics_lib.DEFAULT_NEIGHBOURHOOD,
    train_images: Optional[Any] = None,
    train_labels: Optional[Any] = None,
) -> dict[str, Any]:
  """Offline metrics of class-conditional samples against labelled real images.

  Args:
    images_model_range: (N, S, S, C) samples in [-1, 1].
    labels: (N,) class each sample was conditioned on.
    classifier_module, classifier_params: the evaluation classifier (e.g. from
      `artifacts.load(path, kind="classifier")`).
    real_images, real_labels: (M, S, S, C) real images in [-1, 1] and their classes.
    num_classes: number of classes.
    k: neighbourhood size of precision, recall and coverage.
    train_images: (T, S, S, C) the generator's training images in [-1, 1]; adds
      the spread, novelty and `real_frechet_distance` entries.
    train_labels: (T,) their classes; with `train_images`, adds the stray-ink entries.

  Returns the dict described in the module docstring (JSON-ready: floats, ints,
  lists and `None`).
  """
  features, logits = classifier_lib.features_and_logits(classifier_module, classifier_params, images_model_range)
  real_features, real_logits = classifier_lib.features_and_logits(classifier_module, classifier_params, real_images)
  results = evaluate_features(features, logits, labels, real_features=real_features, real_labels=real_labels,
                              num_classes=num_classes, k=k, real_logits=real_logits)
  if train_images is not None:
    results.update(diversity_and_novelty(images_model_range, labels, real_images=real_images,
                                         real_labels=real_labels, train_images=train_images,
                                         num_classes=num_classes))
    train_features, _ = classifier_lib.features_and_logits(classifier_module, classifier_params, train_images)
    results["real_frechet_distance"] = metrics_lib.fid_from_features(np.asarray(train_features, np.float64),
                                                                     np.asarray(real_features, np.float64))
    if train_labels is not None:
      ink = dict(train_images=train_images, train_labels=train_labels, num_classes=num_classes)
      results["stray_ink"] = stray_ink(images_model_range, labels, **ink)
      results["real_stray_ink"] = stray_ink(real_images, real_labels, **ink)
      results["stray_ink_ratio"] = results["stray_ink"] / max(results["real_stray_ink"], 1e-12)
  present = [a for a in results["accuracy_per_class"] if a is not None]
  results["accuracy_min_class"] = min(present) if present else None
  return results


def _jsonable(value: Any) -> Any:
  """Plain JSON values; NaN and infinities (not valid JSON) become None."""
  if isinstance(value, dict):
    return {str(key): _jsonable(v) for key, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value


def write_report(path: PathLike, metrics: dict[str, Any]) -> pathlib.Path:
  """Write `metrics` as indented JSON at `path` (atomically) and return the path."""
  path = pathlib.Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(_jsonable(metrics), indent=2, allow_nan=False) + "\n"
  with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                   delete=False, encoding="utf-8") as f:
    f.write(text)
  os.replace(f.name, path)
  return path
