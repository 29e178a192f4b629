"""Every config file builds a valid run, and bad command-line overrides fail before any work."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from drifting_jax.models import generator as generator_lib
from drifting_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINING_CONFIGS = ["mnist_tiny", "mnist_dit_s2", "fashion_mnist_dit_s2", "imagenet_latent_ablation"]


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_training_configs_validate(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  trainer.validate_config(config)
  model_config = trainer.generator_config(config)
  assert model_config["input_size"] == config.data.image_size


def test_paper_and_release_settings():
  mnist = importlib.import_module("configs.mnist_dit_s2").get_config()
  # FHM Table 3: AdamW (0.95, 0.999), lr 2e-4, wd 1e-4, 300 no-op + 300 warm-up, clip 2, 5 x 96.
  assert (mnist.optim.b1, mnist.optim.b2, mnist.optim.learning_rate, mnist.optim.weight_decay) == (
      0.95, 0.999, 2e-4, 1e-4)
  assert (mnist.optim.noop_steps, mnist.optim.warmup_steps, mnist.train.max_grad_norm) == (300, 300, 2.0)
  assert (mnist.train.classes_per_step, mnist.train.gen_per_class, mnist.train.pos_per_class) == (5, 96, 96)
  assert mnist.train.total_steps == 12_000 and len(mnist.loss.bandwidths) == 1
  assert importlib.import_module("configs.fashion_mnist_dit_s2").get_config().train.total_steps == 16_000
  latent = importlib.import_module("configs.imagenet_latent_ablation").get_config()
  # The release's configs/gen/latent_ablation.yaml.
  assert (latent.train.classes_per_step, latent.train.gen_per_class, latent.train.pos_per_class,
          latent.train.neg_per_class) == (64, 64, 64, 16)
  assert (latent.train.positive_bank_size, latent.train.negative_bank_size) == (128, 1000)
  assert (latent.train.cfg_min, latent.train.cfg_max, latent.train.neg_cfg_pw) == (1.0, 4.0, 3.0)
  assert latent.optim.warmup_steps == 5000 and latent.train.ema_decay == 0.999
  release_model = generator_lib.model_config_for("DiT-B/2")
  assert (release_model["n_cls_tokens"], release_model["noise_coords"], release_model["noise_classes"]) == (16, 32, 64)


def _main(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "drifting_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, message", [
    ("--config.train.bogus_key=3", "bogus_key"),
    ("--config.train.total_steps=many", "total_steps"),
    ("--config.loss.objective=kl", "unknown objective"),
])
def test_bad_overrides_fail_before_any_work(tmp_path, override, message):
  workdir = tmp_path / "run"
  result = _main("--config=configs/mnist_tiny.py:smoke", f"--workdir={workdir}", override)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (workdir / "checkpoints").exists()
