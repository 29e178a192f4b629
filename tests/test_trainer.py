"""End-to-end checks of the trainer on the embedded MNIST-5k with a tiny config."""

import json
import pathlib

import jax
import numpy as np
import pytest

from configs import mnist_tiny
from drifting_jax import checkpointing, partitioning
from drifting_jax.train import program as program_lib, trainer
from drifting_jax.train import run as run_lib

pytestmark = pytest.mark.slow  # training runs, resume and NaN stop


def tiny_config(**train_overrides):
  c = mnist_tiny.get_config("smoke")
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def _step_on_mesh(config, mesh):
  program = program_lib.build_train_program(config, mesh)
  state, feature_params = program.init(), program.place_feature_params()
  rng = np.random.default_rng(0)
  batch = {"labels": np.array([3, 7], np.int32),
           "positives": rng.uniform(-1, 1, size=(2, 8, 28, 28, 1)).astype(np.float32),
           "negatives": np.zeros((2, 0, 28, 28, 1), np.float32)}
  batch = {k: partitioning.host_to_global(v, mesh) for k, v in batch.items()}
  for _ in range(2):
    state, metrics = program.jitted(state, feature_params, batch)
  return jax.device_get(state.params), float(metrics["loss"])


def test_one_device_equals_eight_device_mesh():
  config = tiny_config()
  params_1, loss_1 = _step_on_mesh(config, partitioning.make_mesh(devices=jax.devices()[:1]))
  params_8, loss_8 = _step_on_mesh(config, partitioning.make_mesh(data=4, fsdp=2))
  assert np.isfinite(loss_1)
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), params_8, params_1)


def _final_params(workdir):
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step()
  path = pathlib.Path(workdir) / "params_ema"
  _, params, _ = trainer.artifacts.load(path, kind="gen")
  return step, params


@pytest.mark.parametrize("sampler", ["bank", "fresh"])
def test_resume_after_preemption_is_bit_exact(tmp_path, monkeypatch, sampler):
  config = tiny_config(positive_sampler=sampler)
  trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  straight_step, straight = _final_params(tmp_path / "straight")
  assert straight_step == 6

  # Preempted at step 4 (SIGTERM stand-in), then resumed to the end.
  original = checkpointing.PreemptionGuard.should_stop
  monkeypatch.setattr(checkpointing.PreemptionGuard, "should_stop", lambda self, step: step == 4)
  trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert checkpointing.Checkpointer(tmp_path / "resumed").latest_step() == 4
  monkeypatch.setattr(checkpointing.PreemptionGuard, "should_stop", original)
  trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  resumed_step, resumed = _final_params(tmp_path / "resumed")
  assert resumed_step == 6
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)

  lines = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
  lines = [l for l in lines if "loss" in l]  # clu's progress reports add their own lines
  assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(l["loss"]) and 0 <= l["host_fraction"] for l in lines)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_config(positive_sampler="bank")
  original = trainer.train_data.TrainingData.push_batch

  def poisoned(self, step, n, salt=0):
    samples, labels = original(self, step, n, salt)
    return (samples * np.nan if step >= 4 else samples), labels

  monkeypatch.setattr(trainer.train_data.TrainingData, "push_batch", poisoned)
  config.train.positive_bank_size = 4  # the poisoned pushes reach every slot quickly
  with pytest.raises(run_lib.NonFiniteLossError, match=r"at step \d+.*last good checkpoint \(step 3\)"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert checkpointing.Checkpointer(tmp_path).all_steps() == [3]


def test_bad_config_fails_before_work(tmp_path):
  config = tiny_config()
  config.train.classes_per_step = 11
  with pytest.raises(ValueError, match="classes_per_step"):
    trainer.train_and_evaluate(config, str(tmp_path))
  config = tiny_config()
  config.loss.objective = "kl"
  with pytest.raises(ValueError, match="unknown objective"):
    trainer.train_and_evaluate(config, str(tmp_path))
  config = tiny_config()
  config.train.cfg_max = 3.0
  with pytest.raises(ValueError, match="neg_per_class"):
    trainer.train_and_evaluate(config, str(tmp_path))
  config = tiny_config(positive_sampler="memory")
  with pytest.raises(ValueError, match="positive_sampler must be one of"):
    trainer.train_and_evaluate(config, str(tmp_path))
  config = tiny_config(positive_sampler="fresh", pos_per_class=1000)  # ~400 digits a class
  with pytest.raises(ValueError, match="fewer samples on this host"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
