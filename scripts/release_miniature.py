r"""The release's pixel-space recipe in miniature on MNIST-5k, end to end: `make miniature`.

    python -m scripts.release_miniature [--root runs/miniature] [--docs docs] [--seed 0]

Stages, in order; each is skipped when its output exists and resumes from its last
checkpoint when it was stopped (rerun the same command):

1. the held-out digit classifier the metrics use       <root>/classifier
2. MAE pretraining (`configs/mnist_mae.py`, mode train_mae)  <root>/mae, <root>/mae_pretrain
3. the generator in the MAE's feature space: the raw sample plus the multi-scale
   activation groups, CFG alpha ~ alpha^-3 on [1, 4], unconditional negatives from
   the negative bank, log-KDE Laplace# at R = (0.02, 0.05, 0.2) with per-width
   gradient normalisation                                 <root>/mae_generator
4. the previous demo's pixel recipe (`configs/mnist_tiny.py`: Gauss# annealed to 0.2,
   no CFG; reported as "demo recipe", the name it had when this ran)
   for the same training wall time as stage 3: its step count is stage 3's, scaled
   by the two recipes' steady steps/s, from 60-step probe runs of both back to back
   (kept in <root>/pixels_calibration.json)               <root>/pixels
5. the recipe of stage 3 on raw pixels only (`configs/mnist_mae.py:pixels`: same
   objective, CFG, negatives and steps; no MAE), which isolates what the features
   buy                                                    <root>/pixels_same_recipe
6. evaluation: stages 3 and 5 over the CFG sweep (alpha = 1, 1.5, 2, 3, 4), stage 4 at
   alpha = 1, with the held-out classifier (accuracy, worst class, Frechet distance,
   precision, recall, F1, within-class spread). Writes `<docs>/miniature.{json,md}`,
   `<docs>/figures/miniature_cfg.png` (metrics against alpha, pixels as a line) and
   `<docs>/figures/miniature_samples.png` (a grid per alpha and the pixel grid).

Wall times of every stage go to `<root>/times.json` and the report.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from typing import Any

import numpy as np

from configs import mnist_mae
from scripts import experiments

METRICS = ("accuracy", "accuracy_min_class", "frechet_distance", "precision", "recall", "f1", "spread_ratio")
LABELS = {"accuracy": "accuracy ↑", "accuracy_min_class": "worst class ↑", "frechet_distance": "FD ↓",
          "precision": "precision ↑", "recall": "recall ↑", "f1": "F1 ↑", "spread_ratio": "spread ↑"}


class Times:
  """Stage wall times, kept in <root>/times.json across resumed invocations."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.values = json.loads(path.read_text()) if path.exists() else {}

  def add(self, stage: str, seconds: float) -> None:
    self.values[stage] = self.values.get(stage, 0.0) + seconds
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(self.values, indent=2))


def steady_steps_per_second(workdir: pathlib.Path) -> float:
  """Median logged steps/s after the first window (which holds the compilation).

  The median, since a window that holds a checkpoint, a sample grid or a resume
  logs a rate that says nothing about the step itself.
  """
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  rates = [l["steps_per_sec"] for l in lines if "steps_per_sec" in l]
  rates = rates[1:] or rates
  if not rates:
    raise RuntimeError(f"{workdir / 'metrics.jsonl'} logs no steps_per_sec")
  return float(np.median(rates))


def _untruncated(config):
  # The comparison is between trained distributions: noise temperature 1 (the demo
  # config's samples use 0.5, a choice made after this comparison was measured).
  config.sample.temperature = 1.0
  config.eval.temperatures = ()
  return config


def mae_config(root: pathlib.Path, seed: int):
  config = _untruncated(mnist_mae.get_config())
  config.seed = seed
  config.feature.mae_path = str(root / "mae")
  config.eval.classifier_path = str(root / "classifier")
  config.checkpoint.async_save = False
  return config


def same_recipe_pixel_config(root: pathlib.Path, seed: int):
  config = _untruncated(mnist_mae.get_config("pixels"))
  config.seed = seed
  config.eval.classifier_path = str(root / "classifier")
  config.checkpoint.async_save = False
  return config


def pixel_config(root: pathlib.Path, seed: int, steps: int | None):
  config = experiments.run_config("log_kde_gauss", 0.2, seed, steps, recipe="demo")
  config.log.sample_grid_every = 0
  config.eval.classifier_path = str(root / "classifier")
  return config


def _finished(workdir: pathlib.Path, steps: int) -> bool:
  """Whether the run has its final checkpoint (orbax names a step's folder by the step)."""
  return (workdir / "checkpoints" / str(steps)).is_dir()


def train_generator(config, workdir: pathlib.Path, times: Times, stage: str) -> None:
  from drifting_jax.train import trainer
  if _finished(workdir, int(config.train.total_steps)):
    return
  start = time.perf_counter()
  state = trainer.train_and_evaluate(config, str(workdir))
  times.add(stage, time.perf_counter() - start)
  if int(state.step) < int(config.train.total_steps):  # stopped (SIGTERM): the next call resumes
    raise SystemExit(f"{workdir} stopped at step {int(state.step)}; rerun to resume it")


def _probe_steps_per_second(config, steps: int = 60) -> float:
  from drifting_jax.train import trainer
  probe = config.copy_and_resolve_references()
  probe.train.total_steps = steps
  probe.optim.warmup_steps = min(probe.optim.warmup_steps, steps // 5)
  probe.log.every_steps = 10
  probe.log.sample_grid_every = 0
  probe.checkpoint.every_steps = steps
  with tempfile.TemporaryDirectory() as tmp:
    trainer.train_and_evaluate(probe, tmp)
    return steady_steps_per_second(pathlib.Path(tmp))


def pixel_steps_for_equal_time(root: pathlib.Path, mae_config_: Any, mae_steps: int, seed: int) -> dict:
  """The pixel recipe's step count that trains as long as the MAE generator's run (kept in a file).

  Both recipes are probed for 60 steps back to back, so that they are timed under
  the same load (the two-core machine's speed varies with what else runs).
  """
  path = root / "pixels_calibration.json"
  if path.exists():
    return json.loads(path.read_text())
  mae_rate = _probe_steps_per_second(mae_config_)
  pixel_rate = _probe_steps_per_second(pixel_config(root, seed, None))
  out = {"mae_steps_per_sec": mae_rate, "pixel_steps_per_sec": pixel_rate,
         "pixel_steps": int(round(mae_steps * pixel_rate / mae_rate))}
  path.write_text(json.dumps(out, indent=2))
  return out


def evaluate(config, workdir: pathlib.Path, times: Times, stage: str) -> dict:
  from drifting_jax.eval import evaluation
  result_path = workdir / "sweep.json"
  if result_path.exists():
    return json.loads(result_path.read_text())
  start = time.perf_counter()
  result = evaluation.evaluate(config, str(workdir))
  times.add(stage, time.perf_counter() - start)
  result_path.write_text(json.dumps(result, indent=2, default=float))
  return result


def trend(values: list[float]) -> float:
  """Spearman rank correlation of `values` with their order (alpha ascending): +1 rising, -1 falling, 0 flat."""
  import scipy.stats
  if len(values) < 2 or np.ptp(values) == 0:
    return 0.0
  return float(scipy.stats.spearmanr(np.arange(len(values)), values).statistic)


def write_report(root: pathlib.Path, docs: pathlib.Path, sweep: dict, pixels: dict, times: dict,
                 calibration: dict, mae_steps: int, command: str) -> dict:
  alphas = sorted(sweep["cfg"], key=float)
  rows = {a: sweep["cfg"][a] for a in alphas}
  pixel_row = pixels["cfg"]["1"]
  trends = {m: trend([rows[a][m] for a in alphas]) for m in ("accuracy", "precision", "recall")}
  report = {"alphas": [float(a) for a in alphas], "mae": rows, "pixels": pixel_row, "times": times,
            "calibration": calibration, "trends": trends}
  docs.mkdir(parents=True, exist_ok=True)
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  lines = [f"Produced by `{command}`.", "",
           "| run | alpha | " + " | ".join(LABELS[m] for m in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
  for a in alphas:
    lines.append(f"| MAE features + CFG ({mae_steps} steps) | {a} | "
                 + " | ".join(fmt(rows[a].get(m)) for m in METRICS) + " |")
  lines.append(f"| pixels, demo recipe ({calibration['pixel_steps']} steps) | 1 | "
               + " | ".join(fmt(pixel_row.get(m)) for m in METRICS) + " |")
  same = root / "pixels_same_recipe" / "sweep.json"
  if same.exists():  # configs/mnist_mae.py:pixels: this recipe with raw-pixel features only
    same_sweep = json.loads(same.read_text())
    report["pixels_same_recipe"] = same_sweep["cfg"]
    for a in sorted(same_sweep["cfg"], key=float):
      lines.append(f"| raw pixels, this recipe ({mae_steps} steps) | {a} | "
                   + " | ".join(fmt(same_sweep["cfg"][a].get(m)) for m in METRICS) + " |")
  lines += ["", "Trend with alpha (Spearman rank correlation, +1 = rises with every step of alpha): "
            + ", ".join(f"{m} {v:+.2f}" for m, v in trends.items()) + ".", "",
            "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
            + f"; total {sum(times.values()) / 60:.1f} min.",
            f"Equal training time: steady {calibration['mae_steps_per_sec']:.3f} steps/s (MAE features) against "
            f"{calibration['pixel_steps_per_sec']:.3f} (pixels), so the pixel run trains "
            f"{calibration['pixel_steps']} steps against {mae_steps}."]
  (docs / "miniature.md").write_text("\n".join(lines) + "\n")
  (docs / "miniature.json").write_text(json.dumps(report, indent=2, default=float))
  plot(report, docs / "figures" / "miniature_cfg.png")
  montage(root, alphas, sweep, pixels, docs / "figures" / "miniature_samples.png")
  return report


def plot(report: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  shown = ("accuracy", "frechet_distance", "precision", "recall")
  fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4))
  alphas = report["alphas"]
  for ax, m in zip(axes, shown):
    ax.plot(alphas, [report["mae"][f"{a:g}"][m] for a in alphas], "o-", label="MAE features + CFG")
    if "pixels_same_recipe" in report:
      ax.plot(alphas, [report["pixels_same_recipe"][f"{a:g}"][m] for a in alphas], "s-", color="C2",
              label="raw pixels, same recipe + CFG")
    ax.axhline(report["pixels"][m], color="C1", ls="--", label="pixels (demo recipe, alpha 1)")
    ax.set_xlabel("CFG scale alpha")
    ax.set_title(LABELS[m], fontsize=10)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def montage(root: pathlib.Path, alphas: list[str], sweep: dict, pixels: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [(root / "mae_generator" / "eval" / f"step_{sweep['step']}_cfg{a}.png", f"MAE + CFG, alpha {a}",
             sweep["cfg"][a]) for a in alphas]
  panels.append((root / "pixels" / "eval" / f"step_{pixels['step']}_cfg1.png", "pixels (demo recipe)",
                 pixels["cfg"]["1"]))
  panels = [p for p in panels if p[0].exists()]
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 5.0 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (grid, title, metrics) in zip(axes.flat, panels):
    experiments.show_grid(ax, grid)
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.2f}, FD {metrics['frechet_distance']:.0f}", fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/miniature")
  parser.add_argument("--docs", default="docs")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  from drifting_jax.train import mae_pretrain
  root = pathlib.Path(args.root).absolute()
  times = Times(root / "times.json")
  experiments.ensure_classifier(root)

  config = mae_config(root, args.seed)
  if not (root / "mae" / "metadata.json").exists() or not _finished(
      root / "mae_pretrain", int(config.mae.total_steps)):
    start = time.perf_counter()
    mae_pretrain.train_mae(config, str(root))
    times.add("mae_pretrain", time.perf_counter() - start)
  mae_workdir = root / "mae_generator"
  train_generator(config, mae_workdir, times, "mae_generator_train")

  steps = int(config.train.total_steps)
  calibration = pixel_steps_for_equal_time(root, config, steps, args.seed)
  pixels = pixel_config(root, args.seed, calibration["pixel_steps"])
  train_generator(pixels, root / "pixels", times, "pixels_train")

  same = same_recipe_pixel_config(root, args.seed)
  train_generator(same, root / "pixels_same_recipe", times, "pixels_same_recipe_train")

  sweep = evaluate(config, mae_workdir, times, "mae_generator_eval")
  pixel_result = evaluate(pixels, root / "pixels", times, "pixels_eval")
  evaluate(same, root / "pixels_same_recipe", times, "pixels_same_recipe_eval")
  command = "python -m scripts.release_miniature " + " ".join(argv if argv is not None else
                                                                  __import__("sys").argv[1:])
  return write_report(root, pathlib.Path(args.docs), sweep, pixel_result, times.values, calibration, steps,
                      command.strip())


if __name__ == "__main__":
  main()
