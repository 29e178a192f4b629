"""The sample / evaluate / watch jobs on a 6-step MNIST-5k run with a briefly trained classifier."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import mnist_tiny
from drifting_jax import checkpointing, errors, modes
from drifting_jax.eval import classifier_job, evaluation, evaluators, metrics as metrics_lib, sampling
from drifting_jax.models import artifacts, classifier, features, inception, vae as vae_lib
from drifting_jax.train import optim, program as program_lib, trainer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # a trained run, a classifier and evaluations

NUM_CLASSES = 10


def _config():
  c = mnist_tiny.get_config("smoke")  # 6 steps, checkpoints at 3 and 6, 10 samples per class
  # The generator's output layer starts at zero: without warm-up, with a large rate and
  # a short EMA, six steps move the EMA generator off a blank (all-grey) canvas.
  c.optim.warmup_steps = 0
  c.optim.learning_rate = 1e-2
  c.train.ema_decay = 0.5
  c.classifier = ml_collections.ConfigDict({"steps": 20, "batch_size": 32})
  c.eval.watch_poll_s = 0.01
  c.eval.watch_timeout_s = 60.0
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
  """A trained workdir: checkpoints 3 and 6, params_ema, classifier/ with reference statistics."""
  workdir = tmp_path_factory.mktemp("run")
  config = _config()
  trainer.train_and_evaluate(config, str(workdir))
  classifier_job.train_classifier_job(config, str(workdir))
  return workdir


@pytest.fixture
def workdir(run, tmp_path) -> pathlib.Path:
  """A private copy of the run, so that tests do not see each other's eval/ files."""
  return pathlib.Path(shutil.copytree(run, tmp_path / "run"))


def _results_without_timings(results):
  return {cfg: {k: v for k, v in metrics.items() if k != "seconds"} for cfg, metrics in results["cfg"].items()}


def test_a_checkpoint_is_read_from_the_config_alone(workdir, monkeypatch):
  """Sampling restores only the EMA parameters: no optimizer, train state or feature network is built.

  The smoke config trains with top-k EMA feature scales, whose names only the feature
  network knows; a partial restore of `ema_params` never needs them.
  """
  def refuse(*args, **kwargs):
    raise AssertionError("reading a checkpoint must not build training pieces")

  for module, name in ((optim, "make_optimizer"), (program_lib, "build_train_program"),
                       (program_lib, "state_factory"), (features, "build_feature_network"),
                       (features, "pixel_features"), (features, "mae_features")):
    monkeypatch.setattr(module, name, refuse)
  config = _config()
  assert config.loss.feature_normalization == "topk_ema"
  module, params, step = sampling.load_generator(config, str(workdir))
  _, final_params, _ = artifacts.load(workdir / "params_ema", kind="gen")  # written at the last checkpoint
  assert step == config.train.total_steps
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, final_params)
  _, earlier, step = sampling.load_generator(config, str(workdir), step=3)
  assert step == 3 and not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), earlier, params)))
  assert sampling.generate(module, params, np.arange(2, dtype=np.int32), 1.0, seed=0, batch_size=2).shape[0] == 2


def test_sample_to_files_writes_uint8_digits_and_a_grid(workdir):
  config = _config()
  out = sampling.sample_to_files(config, str(workdir))
  per_class = config.sample.per_class
  with np.load(out / "samples.npz") as data:
    images, labels = data["images"], data["labels"]
  assert images.shape == (per_class * NUM_CLASSES, 28, 28) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.repeat(np.arange(NUM_CLASSES), per_class))
  assert images.std() > 0  # not a blank canvas
  grid = np.asarray(Image.open(out / "samples.png"))
  side = 2 * (NUM_CLASSES * 29 - 1)  # 10 x 10 digits of 28 px, 1-px gaps, shown at 2x
  assert grid.shape == (side, side)
  np.testing.assert_array_equal(grid[:56:2, :56:2], images[0])  # the first digit of class 0

  config.sample.classes = (3, 7)
  config.sample.per_class = 4
  sampling.sample_to_files(config, str(workdir))
  with np.load(out / "samples.npz") as data:
    np.testing.assert_array_equal(data["labels"], [3] * 4 + [7] * 4)


def test_evaluate_latest_a_params_ema_source_and_a_chosen_step(workdir):
  config = _config()
  results = evaluation.evaluate(config, str(workdir))
  assert results["step"] == 6
  report = json.loads((workdir / "eval" / "step_6.json").read_text())
  assert report["step"] == 6 and report["samples_per_class"] == 10 and list(report["cfg"]) == ["1"]
  metrics = report["cfg"]["1"]
  assert (metrics["num_samples"], metrics["num_real"], metrics["k"]) == (100, 1000, 3)
  for name in ("accuracy", "precision", "recall", "coverage", "neighbour_agreement"):
    assert 0.0 <= metrics[name] <= 1.0 and len(metrics[f"{name}_per_class"]) == NUM_CLASSES
  assert metrics["frechet_distance"] > 0 and 0 <= metrics["real_accuracy"] <= 1
  # Stray ink: real held-out digits ink ~0.2% of their class's background.
  assert 0 < metrics["real_stray_ink"] < 0.01 and 0 <= metrics["stray_ink"] <= 1
  assert metrics["stray_ink_ratio"] == pytest.approx(metrics["stray_ink"] / metrics["real_stray_ink"])
  assert (workdir / "eval" / "step_6_cfg1.png").is_file()
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(line.get("step") == 6 and line.get("eval/cfg1/accuracy") == metrics["accuracy"] for line in logged)

  # The reported accuracy is the classifier's on the samples of the checkpoint's EMA generator.
  module, params, step = sampling.load_generator(config, str(workdir))
  labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), 10)
  samples = sampling.generate(module, params, labels, 1.0, seed=config.sample.seed, batch_size=100)
  clf, clf_params, _ = artifacts.load(workdir / "classifier", kind="classifier")
  assert classifier.accuracy(clf, clf_params, samples, labels) == pytest.approx(metrics["accuracy"])

  # eval.source: the run's params_ema folder holds the final EMA params, i.e. checkpoint 6's.
  config.eval.source = str(workdir / "params_ema")
  assert evaluation.evaluate(config, str(workdir))["step"] is None
  from_source = json.loads((workdir / "eval" / "source.json").read_text())
  assert from_source["step"] is None
  assert _results_without_timings(from_source) == _results_without_timings(report)

  # The global sampling layout (a v5e pod's): one program over every device, the same
  # samples up to rounding, so the same metrics.
  config.eval.source = ""
  config.eval.sampling_layout = "global"
  global_metrics = evaluation.evaluate(config, str(workdir))["cfg"]["1"]
  assert global_metrics["accuracy"] == metrics["accuracy"]
  assert global_metrics["frechet_distance"] == pytest.approx(metrics["frechet_distance"], rel=1e-4)
  config.eval.sampling_layout = "auto"

  config.eval.step = 3  # --config.eval.step=3
  assert evaluation.evaluate(config, str(workdir))["step"] == 3
  earlier = json.loads((workdir / "eval" / "step_3.json").read_text())
  assert earlier["step"] == 3 and earlier["cfg"]["1"]["frechet_distance"] != metrics["frechet_distance"]


def test_noise_temperature_sweep_at_the_sample_scale(workdir):
  """eval.temperatures: the same noise, scaled, at sample.cfg_scale; sample.temperature moves the CFG sweep."""
  config = _config()
  config.eval.cfg_scales = (1.0, 2.0)
  config.sample.cfg_scale = 2.0
  config.eval.temperatures = (0.0, 1.0)
  results = evaluation.evaluate(config, str(workdir))
  assert (results["sample_cfg_scale"], results["sample_temperature"]) == (2.0, 1.0)
  assert list(results["temperature"]) == ["0", "1"]
  drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}
  # Temperature 1 at the sample's scale is the CFG sweep's own setting: same noise, same metrics.
  assert drop(results["temperature"]["1"]) == drop(results["cfg"]["2"])
  # Temperature 0: the generator sees no Gaussian noise (style labels only).
  module, params, _ = sampling.load_generator(config, str(workdir))
  labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), 10)
  cold = sampling.generate(module, params, labels, 2.0, seed=config.sample.seed, batch_size=100, temperature=0.0)
  clf, clf_params, _ = artifacts.load(workdir / "classifier", kind="classifier")
  assert classifier.accuracy(clf, clf_params, cold, labels) == pytest.approx(results["temperature"]["0"]["accuracy"])
  assert results["temperature"]["0"]["frechet_distance"] != results["temperature"]["1"]["frechet_distance"]
  assert (workdir / "eval" / "step_6_cfg2_t0.png").is_file() and (workdir / "eval" / "step_6_cfg1.png").is_file()
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(line.get("eval/temperature0/accuracy") == results["temperature"]["0"]["accuracy"] for line in logged)

  # Sampling at temperature 0.5: the CFG sweep runs there, and its grids say so.
  config.sample.temperature = 0.5
  config.eval.temperatures = ()
  warm = evaluation.evaluate(config, str(workdir))
  assert warm["sample_temperature"] == 0.5 and warm["temperature"] == {}
  assert (workdir / "eval" / "step_6_cfg1_t0.5.png").is_file()
  half = sampling.generate(module, params, labels, 1.0, seed=config.sample.seed, batch_size=100, temperature=0.5)
  assert classifier.accuracy(clf, clf_params, half, labels) == pytest.approx(warm["cfg"]["1"]["accuracy"])


def test_a_label_list_split_over_processes_gets_the_samples_of_the_whole_list(workdir):
  """Hosts each sample a share of evaluation's label list (`first_index`: where it
  starts): every sample's noise is that of its place in the whole list, so the metrics do
  not depend on the process count, and no two hosts draw the same noise."""
  config = _config()
  module, params, _ = sampling.load_generator(config, str(workdir))
  labels = (np.arange(23) % 8).astype(np.int32)  # rows i and i + 8 share a label
  whole = sampling.generate(module, params, labels, 1.0, seed=3, batch_size=5)
  parts = np.array_split(labels, 3)  # 8, 8, 7: shares that cross batch boundaries
  starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
  shares = [sampling.generate(module, params, p, 1.0, seed=3, batch_size=5, first_index=int(s))
            for p, s in zip(parts, starts)]
  np.testing.assert_array_equal(np.concatenate(shares), whole)
  # Each share on its own from index 0 would repeat the first rows' noise (the old rule).
  assert not np.allclose(whole[8:16], whole[:8])
  assert sampling.generate(module, params, labels[:0], 1.0, seed=3, batch_size=5).shape == (0, *whole.shape[1:])
  # The global layout (one program over every device, each host's rows on its own
  # devices; here one host of 8): the same samples up to rounding (other per-device
  # shapes: each call's 5 rows padded to 8, one per device), the shares' noise rows
  # taken from the draws of the batches they cross.
  everywhere = sampling.global_params(params)
  assert sampling._batch_sharding(everywhere)[0] == "global"
  global_shares = [sampling.generate(module, everywhere, p, 1.0, seed=3, batch_size=5, first_index=int(s))
                   for p, s in zip(parts, starts)]
  np.testing.assert_allclose(np.concatenate(global_shares), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout, device_kind, processes, expected", [
    ("auto", "TPU v5 lite", 64, "global"),   # libtpu refuses per-host programs on a v5e pod
    ("auto", "TPU v5 lite", 1, "per_host"),
    ("auto", "TPU v6 lite", 16, "per_host"),
    ("auto", "NVIDIA H100 80GB HBM3", 2, "per_host"),
    ("global", "cpu", 1, "global"),
    ("per_host", "TPU v5 lite", 64, "per_host"),
])
def test_the_sampling_layout_auto_is_global_only_on_multi_host_v5e(layout, device_kind, processes, expected):
  assert sampling.resolve_layout(layout, device_kind, processes) == expected


def test_an_unknown_sampling_layout_is_a_usage_error():
  with pytest.raises(errors.UsageError, match="eval.sampling_layout must be one of"):
    sampling.resolve_layout("per_chip", "cpu", 1)


def test_watch_evaluates_each_checkpoint_once_across_restarts(workdir, monkeypatch):
  config = _config()
  assert evaluation.watch(config, str(workdir)) == [3, 6]  # stops at train.total_steps
  record = workdir / "eval" / "evaluated.json"
  assert json.loads(record.read_text()) == [3, 6]
  assert json.loads((workdir / "eval" / "step_3.json").read_text())["step"] == 3
  assert json.loads((workdir / "eval" / "step_6.json").read_text())["step"] == 6

  # From here on evaluations are only recorded (the real one is tested above).
  evaluated = []

  def record_only(config, workdir, module, params, step, **kwargs):
    evaluated.append(step)
    return {"step": step, "cfg": {"1": {"accuracy": 0.5}}}

  monkeypatch.setattr(evaluation, "evaluate_generator", record_only)
  assert evaluation.watch(config, str(workdir)) == [] and evaluated == []  # a restart has nothing new

  record.write_text(json.dumps([3]))  # as if the watcher stopped before step 6 was done
  assert evaluation.watch(config, str(workdir)) == [6] and evaluated == [6]
  assert json.loads(record.read_text()) == [3, 6]

  # A checkpoint that the training job prunes between listing and reading is skipped.
  record.write_text(json.dumps([]))
  real_load = sampling.load_generator

  def load_after_pruning(config, workdir, step=None):
    if step == 3:
      shutil.rmtree(pathlib.Path(workdir) / "checkpoints" / "3")
    return real_load(config, workdir, step=step)

  monkeypatch.setattr(sampling, "load_generator", load_after_pruning)
  evaluated.clear()
  assert evaluation.watch(config, str(workdir)) == [6] and evaluated == [6]

  # A run whose final step never comes: the watcher gives up after watch_timeout_s.
  config.train.total_steps = 9
  config.eval.watch_timeout_s = 0.1
  assert evaluation.watch(config, str(workdir)) == [] and evaluated == [6]


# orbax leaves an asyncio callback behind after the failed restore; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_or_corrupt_checkpoints_are_clear_errors(workdir, tmp_path):
  config = _config()
  empty = tmp_path / "no_run"
  with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint in .*no_run/checkpoints: train first"):
    evaluation.evaluate(config, str(empty))
  assert not empty.exists()  # a mistyped workdir is not created

  config.eval.step = 4
  with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint for step 4 .*available: \[3, 6\]"):
    evaluation.evaluate(config, str(workdir))

  config.eval.step = -1
  for data_file in (workdir / "checkpoints" / "6").rglob("*"):
    if data_file.is_file() and data_file.parent.name == "d":  # the array chunks
      data_file.write_bytes(data_file.read_bytes()[:20])
  with pytest.raises(checkpointing.CheckpointError, match=r"checkpoints/6 could not be restored"):
    evaluation.evaluate(config, str(workdir))

  shutil.rmtree(workdir / "classifier")
  config.eval.step = 3
  with pytest.raises(FileNotFoundError, match="--mode=train_classifier"):
    evaluation.evaluate(config, str(workdir))


def test_rgb_feature_space_scores_with_the_unbiased_inception_logits(monkeypatch):
  """The Inception Score takes the bias-free logits; FID the pool_3 features."""
  outputs = inception.InceptionOutputs(pool_features=np.ones((4, 2048), np.float32),
                                       logits=np.full((4, 1008), 5.0, np.float32),
                                       logits_unbiased=np.full((4, 1008), 2.0, np.float32))
  seen = {}

  class FakeExtractor:

    def features_in_chunks(self, images, chunk_size):
      seen["images"], seen["chunk_size"] = images, chunk_size
      return outputs

  monkeypatch.setattr(inception.InceptionFeatureExtractor, "load", classmethod(lambda cls, path: FakeExtractor()))
  config = mnist_tiny.get_config("smoke")
  config.eval.evaluators = ("inception_score",)
  suite = evaluators.Suite(config, "unused")
  assert not suite.needs_pixels and list(suite.spaces) == ["inception"]
  got = suite.features(np.zeros((4, 28, 28, 3), np.float32))["inception"]  # model range: 0 is grey
  np.testing.assert_array_equal(got["logits"], outputs.logits_unbiased)
  np.testing.assert_array_equal(got["features"], outputs.pool_features)
  assert seen["images"].dtype == np.uint8 and seen["images"].max() == 127
  assert seen["chunk_size"] == config.eval.batch_size


def test_evaluators_are_the_configs_list_with_their_inputs_checked(monkeypatch, tmp_path):
  """The metrics are those eval.evaluators names, whatever the samples' shape; a missing input is a UsageError."""
  rng = np.random.default_rng(0)
  pool, logits = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(40, 12)).astype(np.float32)

  class FakeExtractor:

    def features_in_chunks(self, images, chunk_size):
      n = len(images)
      return inception.InceptionOutputs(pool_features=pool[:n], logits=logits[:n] + 1.0, logits_unbiased=logits[:n])

  monkeypatch.setattr(inception.InceptionFeatureExtractor, "load", classmethod(lambda cls, path: FakeExtractor()))
  config = mnist_tiny.get_config("smoke")  # grayscale digits, scored here in Inception features: the list decides
  config.eval.evaluators = ("inception_score", "fid_inception", "precision_recall")
  with pytest.raises(errors.UsageError, match="eval.reference_stats"):
    evaluators.Suite(config, "unused")
  real = rng.normal(size=(50, 8)) + 0.5
  mu, sigma = metrics_lib.compute_statistics(real)
  np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
  np.savez(tmp_path / "real.npz", features=real.astype(np.float32))
  config.eval.reference_stats = str(tmp_path / "stats.npz")
  with pytest.raises(errors.UsageError, match="eval.reference_features"):
    evaluators.Suite(config, "unused")
  config.eval.reference_features = str(tmp_path / "real.npz")
  suite = evaluators.Suite(config, "unused")
  labels = np.repeat(np.arange(10), 4)
  got = suite.metrics(pixels=None, labels=labels, features=suite.features(np.zeros((40, 28, 28, 1), np.float32)))
  assert got["inception_score"] == metrics_lib.inception_score(logits)[0]
  assert got["fid"] == pytest.approx(metrics_lib.frechet_distance(*metrics_lib.compute_statistics(pool), mu, sigma))
  assert (got["precision"], got["recall"]) == metrics_lib.precision_recall(real.astype(np.float32), pool)
  assert "accuracy" not in got  # no classifier metrics unless listed

  for bad in (("bogus",), ()):
    config.eval.evaluators = bad
    with pytest.raises(errors.UsageError, match="eval.evaluators must name"):
      evaluators.Suite(config, "unused")
  latent = mnist_tiny.get_config("smoke")
  latent.data.name, latent.data.channels = "synthetic_latents", 4
  with pytest.raises(errors.UsageError, match="classifier evaluator needs grayscale data"):
    evaluators.Suite(latent, "unused")


def test_latent_samples_are_decoded_because_the_data_table_says_so(monkeypatch):
  """The SD-VAE decodes a latent data set's samples (data.sources: latent), loaded once per suite."""
  loads = []

  class FakeVAE:

    def decode_in_chunks(self, latents, chunk):
      return np.repeat(latents[..., :1], 3, axis=-1) * 0.5  # [N, h, w, 4] -> "RGB"

  def load(cls, source):
    loads.append(source)
    return FakeVAE()

  monkeypatch.setattr(vae_lib.SDVAE, "load", classmethod(load))
  monkeypatch.setattr(inception.InceptionFeatureExtractor, "load", classmethod(lambda cls, path: object()))
  config = mnist_tiny.get_config("smoke")
  config.data.name, config.data.channels, config.data.image_size = "synthetic_latents", 4, 4
  config.eval.evaluators = ("inception_score",)
  suite = evaluators.Suite(config, "unused")
  latents = np.ones((2, 4, 4, 4), np.float32)
  assert suite.to_pixels(latents).shape == (2, 4, 4, 3) and loads == [config.eval.vae_source]
  digits = mnist_tiny.get_config("smoke")
  digits.eval.evaluators = ("inception_score",)
  same = np.zeros((2, 28, 28, 1), np.float32)
  assert evaluators.Suite(digits, "unused").to_pixels(same) is same and len(loads) == 1


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="unknown mode 'evaluat'"):
    modes.run("evaluat", _config(), "unused")
