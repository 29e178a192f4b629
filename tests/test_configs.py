"""Every config file builds a valid run, and bad command-line overrides fail before any work."""

import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest

from drifting_jax import modes
from drifting_jax.models import generator as generator_lib
from drifting_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINING_CONFIGS = ["mnist_tiny", "mnist_demo", "mnist_dit_s2", "fashion_mnist_dit_s2", "imagenet_latent_ablation"]


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_training_configs_validate(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  trainer.validate_config(config)
  model_config = generator_lib.model_config_from_run(config)
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


# FHM Table 2: (loss.objective, loss.kernel, best width on MNIST, best width on Fashion-MNIST).
PAPER_TABLE2 = {
    "log_kde_gauss": ("log_kde", "gaussian", 0.20, 0.25),
    "drifting_gauss": ("joint", "gaussian", 0.25, 0.25),
    "log_kde_laplace": ("log_kde", "laplace", 0.10, 0.10),
    "naive_laplace": ("corrected", "laplace", 0.05, 0.10),
    "drifting_laplace": ("joint", "laplace", 0.05, 0.05),
}


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("variant", sorted(PAPER_TABLE2))
def test_paper_configs_are_table3_to_the_letter(dataset, variant):
  module = importlib.import_module(f"configs.{dataset}_dit_s2")
  c = module.get_config(variant)
  objective, kernel, width_mnist, width_fashion = PAPER_TABLE2[variant]
  # Architecture: DiT-S/2, 28x28x1, patch 2, width 384, MLP 1536, depth 12, 8 registers, 32 style tokens.
  model = generator_lib.model_config_from_run(c)
  assert (model["input_size"], model["in_channels"], model["patch_size"]) == (28, 1, 2)
  assert (model["hidden_size"], model["hidden_size"] * model["mlp_ratio"], model["depth"]) == (384, 1536, 12)
  assert (model["n_cls_tokens"], model["noise_coords"]) == (8, 32)
  # Optimizer: AdamW (0.95, 0.999), lr 2e-4, wd 1e-4, cosine, 300 no-op, 300 ramp-up, clip 2.0.
  o = c.optim
  assert (o.b1, o.b2, o.learning_rate, o.weight_decay, o.schedule) == (0.95, 0.999, 2e-4, 1e-4, "cosine")
  assert (o.noop_steps, o.warmup_steps, c.train.max_grad_norm) == (300, 300, 2.0)
  assert c.train.total_steps == (12_000 if dataset == "mnist" else 16_000)
  assert c.train.ema_decay == 0.0  # no EMA
  # Loss: pixel space, single width, top-k EMA (k 5, beta 0.99), no field normalization, no CFG.
  assert c.feature.kind == "pixels" and tuple(c.feature.patch_stats_sizes) == ()
  assert (c.loss.feature_normalization, c.loss.topk_k, c.loss.topk_beta) == ("topk_ema", 5, 0.99)
  assert c.loss.normalize_gradients is False and c.loss.bandwidth_anneal_rate == 0.0
  assert (c.train.cfg_min, c.train.cfg_max, c.train.neg_per_class) == (1.0, 1.0, 0)
  # Batch: Nc 5, Npos = Ngen = 96 (B = 480), no memory bank.
  assert (c.train.classes_per_step, c.train.pos_per_class, c.train.gen_per_class) == (5, 96, 96)
  assert c.train.classes_per_step * c.train.gen_per_class == 480
  assert c.train.positive_sampler == "fresh"
  # Table 2: the objective and its best width on this data set.
  assert (c.loss.objective, c.loss.kernel) == (objective, kernel)
  assert tuple(c.loss.bandwidths) == ((width_mnist if dataset == "mnist" else width_fashion),)
  assert c.data.name == dataset
  trainer.validate_config(c)


def test_paper_config_default_variant_and_unknown_variant():
  module = importlib.import_module("configs.mnist_dit_s2")
  assert module.get_config().to_dict() == module.get_config("log_kde_gauss").to_dict()
  with pytest.raises(ValueError, match="unknown mnist_dit_s2 variant 'gauss'"):
    module.get_config("gauss")


MISTAKES = [
    (["--config.train.bogus_key=3"], "no such config field"),
    (["--config.train.total_steps=many"], "total_steps"),
    (["--config=configs/mnist_tiny.py:large"], "unknown mnist_tiny variant 'large'"),
    (["--config.loss.objective=kl"], "bad loss config: unknown objective 'kl'"),
    (["--config.loss.kernel=cauchy"], "bad loss config: unknown kernel 'cauchy'"),
    (["--config.data.name=cifar10"], "unknown data.name 'cifar10'"),
    (["--config.train.classes_per_step=0"], "train.classes_per_step must be >= 1"),
    (["--mode=sample"], "no checkpoint in"),
    (["--mode=compile", "--config.compile.target=v9-64"], "unknown TPU slice 'v9-64'"),
]

# One interpreter imports what main imports once, then runs each command line in a
# forked child that imports main itself (ml_collections reads the config overrides
# from sys.argv when main defines its flags); stderr and the exit status are
# collected: the command lines of a user, without paying for nine interpreter starts.
_FORKING_DRIVER = """
import importlib, json, os, sys
from absl import app
import jax, ml_collections.config_flags, drifting_jax.modes, drifting_jax.errors
results = []
for argv in json.loads(sys.argv[1]):
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(read); os.dup2(write, 2)
    sys.argv = ["main", *argv]
    entry = importlib.import_module("drifting_jax.main")
    try:
      app.run(entry.main, flags_parser=entry.parse_flags)
    except SystemExit as e:
      os._exit(e.code if isinstance(e.code, int) else 1)
    os._exit(0)
  os.close(write)
  with os.fdopen(read) as f:
    err = f.read()
  results.append({"status": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), "stderr": err})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def mistakes_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("mistakes")
  cases = []
  for i, (args, _) in enumerate(MISTAKES):
    config = [] if any(a.startswith("--config=") for a in args) else ["--config=configs/mnist_tiny.py:smoke"]
    cases.append([*config, *args, f"--workdir={root / f'run{i}'}"])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _FORKING_DRIVER, json.dumps(cases)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.slow  # one interpreter for all cases, still ~20 s
@pytest.mark.parametrize("case", range(len(MISTAKES)), ids=[m for _, m in MISTAKES])
def test_a_users_mistake_is_one_line_and_status_2(mistakes_run, case):
  """Bad flags, config values, names and missing files: `error: ...` from main, no traceback, no work done."""
  root, results = mistakes_run
  result, message = results[case], MISTAKES[case][1]
  assert result["status"] == 2, result["stderr"]
  assert "Traceback" not in result["stderr"]
  last = result["stderr"].strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result["stderr"]
  assert not (root / f"run{case}" / "checkpoints").exists()


def test_every_mode_names_a_function_of_config_and_workdir():
  for mode in modes.MODES:
    function = modes.mode_function(mode)
    assert list(inspect.signature(function).parameters)[:2] == ["config", "workdir"], mode


def test_mnist_mae_is_the_release_recipe_in_miniature():
  """configs/mnist_mae.py: the release's loss, CFG and negative settings (configs/gen/latent_ablation.yaml)."""
  from configs import mnist_mae
  c = mnist_mae.get_config()
  assert (c.loss.objective, c.loss.kernel, tuple(c.loss.bandwidths)) == ("log_kde", "laplace", (0.02, 0.05, 0.2))
  assert c.loss.feature_normalization == "batch_mean" and c.loss.normalize_gradients is True
  assert (c.train.cfg_min, c.train.cfg_max, c.train.neg_cfg_pw, c.train.no_cfg_frac) == (1.0, 4.0, 3.0, 0.0)
  assert c.train.positive_sampler == "bank" and c.train.neg_per_class == 16 and c.train.negative_bank_size == 1000
  assert c.feature.kind == "mae" and c.feature.include_input is True
  assert dict(c.feature.activation_kwargs) == dict(patch_mean_size=(2, 4), patch_std_size=(2, 4), use_std=True,
                                                   use_mean=True, every_k_block=2)
  assert tuple(c.eval.cfg_scales) == (1.0, 1.5, 2.0, 3.0, 4.0)
  assert (c.mae.mask_ratio_min, c.mae.mask_ratio_max, c.mae.finetune_cls, c.mae.hflip) == (0.5, 0.5, 0.1, False)
  pixels = mnist_mae.get_config("pixels")
  assert pixels.feature.kind == "pixels" and pixels.loss == c.loss and pixels.train == c.train
  # `:pixels` is the demo's recipe, exactly (the MAE section aside, which it does not use).
  demo = importlib.import_module("configs.mnist_demo").get_config().to_dict()
  pixels = pixels.to_dict()
  pixels.pop("mae")
  assert {k: v for k, v in pixels["feature"].items() if k != "mae_path"} == \
      {k: v for k, v in demo["feature"].items() if k != "mae_path"}
  assert {k: v for k, v in pixels.items() if k != "feature"} == {k: v for k, v in demo.items() if k != "feature"}
  with pytest.raises(ValueError, match="unknown mnist_mae variant"):
    mnist_mae.get_config("large")


def test_mnist_demo_is_the_measured_recipe():
  """configs/mnist_demo.py: what docs/results.md measured for `make demo` (3 seeds), value by value."""
  from configs import mnist_demo, mnist_tiny
  c = mnist_demo.get_config()
  assert (c.loss.objective, c.loss.kernel, tuple(c.loss.bandwidths)) == ("log_kde", "laplace", (0.02, 0.05, 0.2))
  assert (c.loss.feature_normalization, c.loss.normalize_gradients, c.loss.bandwidth_anneal_rate) == \
      ("batch_mean", True, 0.0)
  assert (c.train.cfg_min, c.train.cfg_max, c.train.neg_cfg_pw, c.train.no_cfg_frac) == (1.0, 4.0, 3.0, 0.0)
  assert (c.train.positive_sampler, c.train.positive_bank_size, c.train.neg_per_class,
          c.train.negative_bank_size) == ("bank", 128, 16, 1000)
  assert (c.train.total_steps, c.train.classes_per_step, c.train.gen_per_class, c.train.pos_per_class) == \
      (900, 5, 32, 64)
  assert (c.feature.kind, c.sample.cfg_scale, c.sample.temperature, c.sample.per_class) == ("pixels", 3.0, 0.5, 100)
  assert tuple(c.eval.cfg_scales) == (1.0, 1.5, 2.0, 3.0, 4.0) and tuple(c.eval.temperatures) == (0.5, 0.75, 1.0)
  # The model and optimizer are mnist_tiny's, which the objective comparison keeps training.
  tiny = mnist_tiny.get_config()
  assert c.model == tiny.model and c.optim == tiny.optim and c.train.ema_decay == tiny.train.ema_decay == 0.99
  assert (tiny.loss.kernel, tiny.train.positive_sampler, tiny.train.cfg_max) == ("gaussian", "fresh", 1.0)
  smoke = mnist_demo.get_config("smoke")
  assert smoke.train.total_steps < 20 and smoke.train.neg_per_class > 0
  with pytest.raises(ValueError, match="unknown mnist_demo variant"):
    mnist_demo.get_config("large")


def test_the_demo_trains_the_demo_config():
  from drifting_jax import demo
  assert demo.FLAGS["config"].config_filename == "configs/mnist_demo.py"
