"""One builder per program: the run, the compile mode and the accelerator check compile the same step.

Checked here on CPU devices at toy sizes: the training step the run builds (feature
network loaded from an artifact) and the one the compile mode builds (the same
network from its architecture alone) lower to the same program text; the run's
steps use the executable its pre-flight compiled (one compile of the step in a whole
run); a step that cannot fit its devices stops the run before any data is read; a
positive source that yields another batch layout fails with one line; an old config
missing fields still loads; the feature spaces and distance scalings are tables.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from configs import imagenet_latent_ablation, mnist_tiny
from drifting_jax import config_defaults, errors, losses, partitioning
from drifting_jax.eval import sampling
from drifting_jax.models import features
from drifting_jax.scale import compile_mode
from drifting_jax.train import data as train_data, program as program_lib, trainer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def _ablation_with_tiny_mae():
  """The ablation's program shape at toy size, its MAE the release's tiny artifact (a real folder)."""
  c = imagenet_latent_ablation.get_config("compile_smoke")
  c.feature.mae_path = str(FIXTURES / "official_tiny" / "mae")
  c.data.name = "synthetic_latents"
  c.data.num_classes = 10
  c.train.classes_per_step = 4
  return c


@pytest.mark.slow  # lowers two whole training steps with the MAE
def test_run_and_compile_mode_lower_the_same_training_step():
  config = _ablation_with_tiny_mae()
  mesh = partitioning.make_mesh(data=4, fsdp=2)
  run = program_lib.build_train_program(config, mesh)  # what `train` builds: the MAE's weights loaded
  assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(run.features.params))
  compiled_mode = compile_mode.train_program(config, mesh)  # what --mode=compile builds: shapes only
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(compiled_mode.features.params))
  assert compiled_mode.features.source.startswith("metadata of")
  run_text, compile_text = run.lower().as_text(), compiled_mode.lower().as_text()
  assert "train_step" in run_text
  assert run_text == compile_text
  # And a program that differs lowers to other text (the comparison can fail).
  config.feature.param_placement = "replicated"
  assert compile_mode.train_program(config, mesh).lower().as_text() != run_text


def test_sampling_program_is_the_function_evaluation_calls():
  config = _ablation_with_tiny_mae()
  mesh = partitioning.make_mesh(data=4, fsdp=2)
  program = sampling.build_sample_program(config, mesh, hosts=1)
  lowered = program.lower()
  assert "sample_program" in lowered.as_text()
  labels, cfg = program.args[1], program.args[2]
  assert labels.shape == cfg.shape == (config.eval.batch_size,)


def _compile_events(monkeypatch):
  """The names of the programs XLA compiles from now on (jax's own monitoring events)."""
  names: list[str] = []

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      names.append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  return names


@pytest.mark.slow
def test_the_run_compiles_its_step_once(tmp_path, monkeypatch):
  """Pre-flight compiles the step; the run's steps (and a resume) use that executable."""
  jax.config.update("jax_enable_compilation_cache", False)  # count compiles, not cache reads
  try:
    names = _compile_events(monkeypatch)
    config = mnist_tiny.get_config("smoke")
    trainer.train_and_evaluate(config, str(tmp_path))
    assert names.count("jit(train_step)") == 1, names  # the pre-flight executable serves every step
  finally:
    jax.config.update("jax_enable_compilation_cache", True)


def test_a_step_that_does_not_fit_stops_before_any_data(tmp_path, monkeypatch):
  config = mnist_tiny.get_config("smoke")
  monkeypatch.setattr(program_lib, "device_capacity", lambda device: (1 << 20, "test chip"))

  def no_data(*args, **kwargs):
    raise AssertionError("data were loaded before the pre-flight verdict")

  monkeypatch.setattr(train_data, "load_training_data", no_data)
  with pytest.raises(program_lib.DoesNotFit) as e:
    trainer.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert "\n" not in message and message.startswith("the training step does not fit: needs ")
  assert "per test chip, which has 0 GiB" in message
  assert "largest: " in message and "lower train.classes_per_step" in message
  assert isinstance(e.value, errors.UsageError)  # main prints one line and exits 2


def test_fit_verdict_is_the_compile_modes():
  parts = {"arguments": 2 * 2**30, "outputs": 2**30, "aliased": 2**30, "temporaries": 30 * 2**30, "code": 0}
  total = program_lib.memory_total(parts)
  assert total == 32 * 2**30
  assert program_lib.fit_verdict(total, 16 * 2**30, "v5e chip", parts) == (
      "does not fit: needs 32.00 GiB per v5e chip, which has 16 GiB (16.00 GiB over; largest: "
      "temporaries 30.00 GiB, arguments 2.00 GiB)")
  assert program_lib.fit_verdict(total, 40 * 2**30, "H100 GPU", parts).startswith(
      "fits: 32.00 GiB of 40 GiB per H100 GPU (8.00 GiB free)")


def test_batch_spec_and_a_source_that_breaks_it():
  config = mnist_tiny.get_config("smoke")
  spec = program_lib.batch_spec(config)
  t = config.train
  assert spec["labels"].shape == (t.classes_per_step,) and spec["labels"].dtype == np.int32
  assert spec["positives"].shape == (t.classes_per_step, t.pos_per_class, 28, 28, 1)
  assert spec["negatives"].shape == (t.classes_per_step, t.neg_per_class, 28, 28, 1)
  source = train_data.make_source(config, train_data.load_training_data(config))
  batch = source.draw(0)
  program_lib.check_host_batch(batch, config, processes=1)  # the real source keeps the layout
  with pytest.raises(errors.UsageError, match=r"^the positive source yielded positives \(2, 7, 28, 28, 1\) float32; "
                                              r"the train step takes \(2, 8, 28, 28, 1\) float32 per host"):
    program_lib.check_host_batch({**batch, "positives": batch["positives"][:, :7]}, config, processes=1)
  with pytest.raises(errors.UsageError, match="yielded labels .* int64"):
    program_lib.check_host_batch({**batch, "labels": batch["labels"].astype(np.int64)}, config, processes=1)
  with pytest.raises(errors.UsageError, match=r"yielded fields \['labels', 'positives'\]"):
    program_lib.check_host_batch({k: batch[k] for k in ("labels", "positives")}, config, processes=1)


def test_an_old_config_without_newer_fields_still_loads():
  config = mnist_tiny.get_config("smoke")
  with config.unlocked():
    del config.feature["param_placement"]
    del config.train["positive_sampler"]
    del config["compile"]
  assert set(config_defaults.missing_keys(config)) == {"feature.param_placement", "train.positive_sampler",
                                                       "compile"}
  trainer.validate_config(config)  # fills them from configs/default.py
  assert config.feature.param_placement == "fsdp" and config.train.positive_sampler == "bank"
  assert config.compile.mae_model == "latent-256" and not config_defaults.missing_keys(config)
  # A field the config sets is kept, not reset to the default.
  config.train.positive_sampler = "fresh"
  config_defaults.complete(config)
  assert config.train.positive_sampler == "fresh"


def test_feature_spaces_and_distance_scalings_are_tables():
  assert set(features.FEATURE_SPACES) == {"pixels", "mae"}
  config = mnist_tiny.get_config("smoke")
  network = features.build_feature_network(config)
  assert program_lib.feature_names(network, config) == ["pixels"]
  config.feature.kind = "clip"
  with pytest.raises(errors.UsageError, match=r"feature.kind must be one of \['mae', 'pixels'\], got 'clip'"):
    features.build_feature_network(config)

  loss = ml_collections.ConfigDict(dict(feature_normalization="topk_ema", topk_k=5, topk_beta=0.99,
                                        bandwidth_anneal_rate=0.0))
  scaling = losses.distance_scaling_from_config(loss)
  assert scaling.stateful and scaling.min_positives == 6
  state = scaling.init(3)
  positives = jax.random.normal(jax.random.key(0), (2, 8, 5))
  new_state, scale = scaling.update(state, positives, np.array([0, 2]))
  expected = losses.topk_mean_distance(positives, 5)
  np.testing.assert_allclose(scale, expected, rtol=1e-6)
  np.testing.assert_array_equal(new_state.initialized, [True, False, True])
  loss.feature_normalization = "batch_mean"
  assert not losses.distance_scaling_from_config(loss).stateful
  config = mnist_tiny.get_config("smoke")
  config.loss.feature_normalization, config.loss.topk_k, config.train.pos_per_class = "topk_ema", 5, 5
  with pytest.raises(errors.UsageError, match="needs train.pos_per_class >= 6, got 5"):
    trainer.validate_config(config)
