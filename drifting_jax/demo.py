r"""`make demo`: train the embedded default, sample from it, and measure the samples.

    python -m drifting_jax.demo [--workdir=runs/demo] [--config.train.total_steps=...]

1. trains `configs/mnist_demo.py` (a small DiT on the bundled MNIST-5k, log-KDE
   with the Laplace sharp kernel at three widths, CFG with memory-bank negatives:
   the release's generator recipe on raw pixels; docs/results.md says how it was
   chosen) on the CPU; a rerun resumes or skips;
2. writes `samples.npz` (uint8 `images[N, 28, 28]`, int `labels[N]`, 100 per
   class, at guidance `sample.cfg_scale` and noise temperature
   `sample.temperature`) and `samples.png` to the workdir;
3. trains the evaluation classifier on the held-out digits (once) and reports its
   accuracy on the samples, per class, and the Frechet distance in its feature
   space to held-out digits (`eval/step_<N>.json`), beside the bars the demo is
   held to (`BARS`): mean accuracy, worst class, within-class spread against real
   digits, no copying of training digits, and stray ink (speckle) against real
   digits; then the same metrics at every guidance scale of `eval.cfg_scales` and
   every noise temperature of `eval.temperatures` (seconds each), as two tables.
"""

from __future__ import annotations

import json
import pathlib
import time

from drifting_jax import host_memory

host_memory.keep_freed_memory()  # before JAX starts its threads (see host_memory)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from drifting_jax.eval import classifier_job, evaluation, sampling  # noqa: E402
from drifting_jax.train import trainer  # noqa: E402

FLAGS = flags.FLAGS

# What a reader calls clean, diverse, new digits: (metric, bound, ">=" or "<="). Stray
# ink (speckle on the class's background) at most twice that of real held-out digits.
BARS = (("accuracy", 0.90, ">="), ("accuracy_min_class", 0.75, ">="), ("spread_ratio", 0.70, ">="),
        ("novelty_ratio", 0.80, ">="), ("stray_ink_ratio", 2.0, "<="))
flags.DEFINE_string("workdir", "runs/demo", "Where the run, samples and evaluation go.")
config_flags.DEFINE_config_file("config", "configs/mnist_demo.py", "Demo configuration.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  workdir = pathlib.Path(FLAGS.workdir)
  demo_start = time.perf_counter()
  logging.info("%d device(s): %s", jax.device_count(), jax.devices()[0].platform)

  start = time.perf_counter()
  trainer.train_and_evaluate(config, str(workdir))
  train_minutes = (time.perf_counter() - start) / 60

  folder = sampling.sample_to_files(config, str(workdir))

  if not (classifier_job.classifier_dir(config, str(workdir)) / "metadata.json").exists():
    classifier_job.train_classifier_job(config, str(workdir))
  sample_scale = float(config.sample.cfg_scale)
  with config.unlocked():
    config.eval.samples_per_class = config.sample.per_class
    # The sample's own scale first; the rest of the sweep costs seconds on this model.
    config.eval.cfg_scales = tuple(dict.fromkeys((sample_scale, *map(float, config.eval.cfg_scales))))
  results = evaluation.evaluate(config, str(workdir))
  metrics = results["cfg"][f"{sample_scale:g}"]

  total_minutes = (time.perf_counter() - demo_start) / 60
  print(f"\ntrained {config.train.total_steps} steps in {train_minutes:.1f} min; "
        f"train + sample + evaluate {total_minutes:.1f} min")
  print(f"samples: {folder / 'samples.npz'} (images[N,28,28] uint8, labels[N])")
  print(f"grid:    {folder / 'samples.png'}")
  print(f"metrics: {workdir / 'eval' / ('step_%s.json' % results['step'])}")
  summary = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
  print(json.dumps(summary, indent=2))
  print("per-class accuracy:", " ".join(f"{a:.2f}" for a in metrics["accuracy_per_class"]))
  for name, bound, sense in BARS:
    value = metrics.get(name)
    met = value is not None and (value >= bound if sense == ">=" else value <= bound)
    print(f"bar {name} {sense} {bound}: {value:.3f} ({'met' if met else 'MISSED'})" if value is not None
          else f"bar {name}: n/a")
  print(f"recall {metrics['recall']:.3f}; Frechet distance {metrics['frechet_distance']:.1f} "
        f"(training vs held-out real digits: {metrics.get('real_frechet_distance', float('nan')):.1f})")
  sample_temperature = float(config.sample.temperature)
  at = f"cfg {sample_scale:g}, noise temperature {sample_temperature:g}"
  if len(results["cfg"]) > 1:
    _print_sweep(f"guidance sweep at noise temperature {sample_temperature:g} (the bars above are at {at}):",
                 "cfg", results["cfg"])
  if results["temperature"]:
    _print_sweep(f"noise temperature sweep at cfg {sample_scale:g} (the bars above are at {at}):",
                 "temp", results["temperature"])


def _print_sweep(title: str, knob: str, sweep: dict) -> None:
  columns = {"accuracy": "accuracy", "accuracy_min_class": "worst", "frechet_distance": "FD",
             "precision": "precision", "recall": "recall", "spread_ratio": "spread",
             "stray_ink_ratio": "stray ink"}
  print("\n" + title)
  print(f"{knob:<5s} " + " ".join(f"{label:>9s}" for label in columns.values()))
  for value, m in sorted(sweep.items(), key=lambda kv: float(kv[0])):
    print(f"{value:<5s} " + " ".join(f"{m[c]:9.3f}" for c in columns))


if __name__ == "__main__":
  app.run(main)
