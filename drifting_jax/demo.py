r"""`make demo`: train the embedded default, sample from it, and measure the samples.

    python -m drifting_jax.demo [--workdir=runs/demo] [--config.train.total_steps=...]

1. trains `configs/mnist_tiny.py` (a small DiT on the bundled MNIST-5k, log-KDE
   with the Laplace sharp kernel) on the CPU; a rerun resumes or skips;
2. writes `samples.npz` (uint8 `images[N, 28, 28]`, int `labels[N]`, 100 per
   class) and `samples.png` to the workdir;
3. trains the evaluation classifier on the held-out digits (once) and reports its
   accuracy on the samples, per class, and the Frechet distance in its feature
   space to held-out digits (`eval/step_<N>.json`).
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Where the run, samples and evaluation go.")
config_flags.DEFINE_config_file("config", "configs/mnist_tiny.py", "Demo configuration.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  from drifting_jax.eval import classifier, jobs, sampling
  from drifting_jax.train import trainer

  config = FLAGS.config
  workdir = pathlib.Path(FLAGS.workdir)
  logging.info("%d device(s): %s", jax.device_count(), jax.devices()[0].platform)

  start = time.perf_counter()
  trainer.train_and_evaluate(config, str(workdir))
  train_minutes = (time.perf_counter() - start) / 60

  folder = sampling.sample_to_files(config, str(workdir))

  if not (workdir / "classifier" / "metadata.json").exists():
    classifier.train_classifier_job(config, str(workdir))
  with config.unlocked():
    config.eval.samples_per_class = config.sample.per_class
    config.eval.cfg_scales = (config.sample.cfg_scale,)
  results = jobs.evaluate(config, str(workdir))
  metrics = next(iter(results["cfg"].values()))

  print(f"\ntrained {config.train.total_steps} steps in {train_minutes:.1f} min")
  print(f"samples: {folder / 'samples.npz'} (images[N,28,28] uint8, labels[N])")
  print(f"grid:    {folder / 'samples.png'}")
  print(f"metrics: {workdir / 'eval' / ('step_%s.json' % results['step'])}")
  summary = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
