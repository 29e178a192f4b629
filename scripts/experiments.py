r"""Objective comparison on MNIST-5k (FHM Table 2 / Figure 4 at CPU scale): `make experiments`.

    python -m scripts.experiments --preset paper_widths [--workers 2]   # what docs/results.md reports
    python -m scripts.experiments --preset demo_widths                  # the demo recipe's width sweep
    python -m scripts.experiments --preset sinkhorn --workers 2         # Sinkhorn vs log-KDE Gauss#
    python -m scripts.experiments [--root runs/experiments] [--steps N] [--seeds 0,1]
                                  [--widths 0.05,0.1,0.2,0.3] [--only log_kde_gauss,...] [--docs docs]
                                  [--model-overrides hidden_size=64,...] [--stem experiments] [--workers 1]

"The demo recipe" in this file is `configs/mnist_tiny.py`, which `make demo` trained
until the demo moved to `configs/mnist_demo.py` (the release's recipe on pixels; see
docs/results.md, "Demo"). The comparison keeps mnist_tiny: a single kernel width and
no guidance, the setting FHM's Table 2 varies.

Every run trains the demo recipe (`configs/mnist_tiny.py`: the bundled digits, pixel
features, FHM's per-class top-k EMA distance scale, FHM's fresh positive sampler)
with identical hyperparameters except the objective and the kernel width, then
evaluates its generator with the project's MNIST classifier (trained once per root
on the held-out digits): Frechet distance in the classifier's feature space,
classifier accuracy (mean and worst class), precision, recall and F1 (Kynkaanniemi
et al.), the within-class spread against real digits and the distance to the
training set against held-out digits'. Runs are resumable: a run with a
`result.json` is skipped, a run with a checkpoint resumes from it. The aggregate
(mean and seed spread) goes to `<docs>/<stem>.json` and `<docs>/<stem>.md` (beside
FHM's Table 2), the width curves (as FHM's Figure 4) to
`<docs>/figures/<stem>_metrics.png` and the final sample grids to
`<docs>/figures/<stem>_samples.png`.

The objectives are FHM's five (Table 2), with the paper's names:

  log_kde_gauss, log_kde_laplace   log-KDE with the sharp kernel (FHM Alg. 1)
  naive_laplace                    the corrected drifting field (FHM Eq. 3, Alg. 2)
  drifting_gauss, drifting_laplace Deng et al.'s field as their code computes it (FHM Eq. 21)

all with the top-k EMA scale and no field normalization, as in FHM's Table 3, so a
width means what it means in FHM's Table 2.

Presets (`--preset`) fix the grids that docs/results.md reports:

* `demo_widths`: the two log-KDE kernels at widths 0.05, 0.1, 0.2, 0.3 (how the
  demo's kernel and width were chosen) and FHM's other three objectives at their
  Table 2 width, seed 0;
* `paper_widths`: the five objectives at widths 0.05, 0.1, 0.2, 0.3 (and 0.25,
  Drifting-Gauss's paper width), three seeds each: 63 runs, about 7 hours of two
  cores, sharing its seed-0 runs with `demo_widths`.

Both train the comparison recipe (`COMPARISON_STEPS`, `COMPARISON_SETTINGS`): the
demo's model, sampler and batch at lr 1e-3 for 800 steps, at a constant width.

* `sinkhorn`: the Sinkhorn divergence (`losses.sinkhorn_loss`) at three epsilons
  against log-KDE Gauss#, both on the demo's own recipe (its schedule, learning
  rate and 900 steps), two seeds: 8 runs, about an hour of two cores;
* `all`: all three, in that order.

`--workers N` trains N runs at a time in separate processes, each on one CPU thread
(on 2 cores two single-threaded runs finish sooner than two runs one after the
other on two threads).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import time

import numpy as np

from configs import mnist_dit_s2

# name -> (loss.objective, loss.kernel, extra loss fields): FHM's five objectives.
OBJECTIVES = {name: (objective, kernel, {}) for name, (objective, kernel) in mnist_dit_s2.OBJECTIVES.items()}
# Objectives beyond FHM's Table 2, run only by the presets that name them. For
# "sinkhorn" (losses.sinkhorn_loss) a run's "width" is the entropic regularisation
# epsilon, in the same top-k EMA distance units as the kernels' widths.
EXTRA_OBJECTIVES = {"sinkhorn": ("sinkhorn", "", {})}
ALL_OBJECTIVES = {**OBJECTIVES, **EXTRA_OBJECTIVES}
# Recipes a preset trains: "comparison" holds each width constant (what FHM's Table 2
# and Figure 4 vary); "demo" keeps the demo's width schedule (configs/mnist_tiny.py,
# annealed from 5x down to the run's width, which is where it ends) and learning rate.
RECIPES = ("comparison", "demo")
# FHM Table 2, MNIST column: (FID-50k, F1, best width) per objective.
PAPER_TABLE2_MNIST = {"log_kde_gauss": (6.81, 0.57, 0.20), "drifting_gauss": (20.38, 0.28, 0.25),
                      "log_kde_laplace": (17.48, 0.36, 0.10), "naive_laplace": (10.68, 0.52, 0.05),
                      "drifting_laplace": (48.34, 0.02, 0.05)}
METRICS = ("frechet_distance", "accuracy", "accuracy_min_class", "precision", "recall", "f1", "spread_ratio",
           "novelty_ratio")

# "" = the demo's own DiT (configs/mnist_tiny.py).
DEFAULT_MODEL_OVERRIDES = ""


def parse_overrides(text: str) -> dict:
  """'k=v,k=v' -> {k: int/float/str}: per-key overrides of the demo DiT's model_config."""
  out = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    key, _, value = item.partition("=")
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        pass
    out[key.strip()] = value
  return out


def run_config(name: str, width: float, seed: int, steps: int | None, model_overrides: dict | None = None,
               settings: dict | None = None, recipe: str = "comparison"):
  """The demo recipe with objective `name` at kernel width (or Sinkhorn epsilon) `width`.

  `steps` long (None: the demo's length); `settings` are further config overrides
  ({"optim.learning_rate": 1e-3, ...}) a preset fixes. `recipe` "comparison": a
  constant width; "demo": the demo's annealed schedule, ending at `width`.
  """
  from configs import mnist_tiny
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; known: {RECIPES}")
  objective, kernel, extra = ALL_OBJECTIVES[name]
  c = mnist_tiny.get_config()
  if model_overrides:
    c.model.overrides = dict(model_overrides)
  for key, value in (settings or {}).items():
    section, field = key.split(".")
    c[section][field] = value
  c.seed = seed
  c.loss.objective = objective
  c.loss.feature_normalization = "topk_ema"
  c.loss.normalize_gradients = False
  if objective == "sinkhorn":
    # No kernel and nothing to anneal: epsilon is constant over the run.
    c.loss.sinkhorn_epsilon = float(width)
    c.loss.bandwidth_anneal_rate = 0.0
  else:
    c.loss.kernel = kernel
    if recipe == "demo":  # sigma(t) = width exp(rate (1 - t / T)): the demo's start/end ratio, ending at width
      c.loss.bandwidths = (float(width) * float(np.exp(c.loss.bandwidth_anneal_rate)),)
    else:
      c.loss.bandwidths = (float(width),)
      c.loss.bandwidth_anneal_rate = 0.0  # a constant width: what FHM's Table 2 and Figure 4 vary
  for k, v in extra.items():
    c.loss[k] = v
  if steps is not None and steps != c.train.total_steps:
    c.train.total_steps = steps
    c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 5)
  steps = c.train.total_steps
  c.checkpoint.every_steps = steps
  c.checkpoint.async_save = False
  c.log.sample_grid_every = steps  # one grid of samples at the end, to look at
  c.log.every_steps = min(c.log.every_steps, max(1, steps // 10))
  c.eval.cfg_scales = (1.0,)
  c.eval.samples_per_class = 100
  return c


def run_name(name: str, width: float, seed: int) -> str:
  return f"{name}_{'eps' if ALL_OBJECTIVES.get(name, ('',))[0] == 'sinkhorn' else 'w'}{width:g}_s{seed}"


def run_one(root: pathlib.Path, name: str, width: float, seed: int, steps: int,
            classifier_path: pathlib.Path, model_overrides: dict | None = None, settings: dict | None = None,
            recipe: str = "comparison") -> dict:
  from drifting_jax.eval import evaluation
  from drifting_jax.train import run as run_lib, trainer
  workdir = root / run_name(name, width, seed)
  result_path = workdir / "result.json"
  if result_path.exists():
    return json.loads(result_path.read_text())
  config = run_config(name, width, seed, steps, model_overrides, settings, recipe)
  steps = config.train.total_steps
  config.eval.classifier_path = str(classifier_path)
  start = time.perf_counter()
  try:
    state = trainer.train_and_evaluate(config, str(workdir))
    status = "ok"
  except run_lib.NonFiniteLossError as e:
    status = f"diverged: {e}"
  else:
    if int(state.step) < steps:  # stopped early (SIGTERM): resume it next time, record nothing
      raise SystemExit(f"{workdir.name} stopped at step {int(state.step)} of {steps}; rerun to resume it")
  seconds = time.perf_counter() - start
  metrics = {}
  if status == "ok":
    metrics = evaluation.evaluate(config, str(workdir))["cfg"]["1"]
  result = {"objective": name, "width": width, "seed": seed, "steps": steps, "status": status, "recipe": recipe,
            "model_overrides": model_overrides or {}, "train_seconds": seconds,
            "total_seconds": time.perf_counter() - start, **{k: metrics.get(k) for k in METRICS}}
  workdir.mkdir(parents=True, exist_ok=True)
  result_path.write_text(json.dumps(result, indent=2))
  return result


def ensure_classifier(root: pathlib.Path) -> pathlib.Path:
  from configs import mnist_tiny
  from drifting_jax.eval import classifier_job
  path = root / "classifier"
  if not (path / "metadata.json").exists():
    config = mnist_tiny.get_config()
    config.eval.classifier_path = str(path)
    classifier_job.train_classifier_job(config, str(root))
  return path


def aggregate(results: list[dict]) -> dict:
  table: dict = {}
  for r in results:
    entry = table.setdefault(r["objective"], {}).setdefault(f"{r['width']:g}", {"runs": []})
    entry["runs"].append(r)
  for widths in table.values():
    for entry in widths.values():
      ok = [r for r in entry["runs"] if r["status"] == "ok"]
      entry["diverged"] = len(entry["runs"]) - len(ok)
      for m in METRICS:
        values = np.array([r[m] for r in ok if r.get(m) is not None], float)
        entry[m] = {"mean": float(values.mean()) if len(values) else None,
                    "std": float(values.std()) if len(values) > 1 else 0.0, "n": int(len(values))}
  return table


def _best_width(widths: dict) -> tuple[str, dict]:
  scored = [(w, e) for w, e in widths.items() if e["frechet_distance"]["mean"] is not None]
  if not scored:
    return "-", {}
  return min(scored, key=lambda we: we[1]["frechet_distance"]["mean"])


def _fmt(stat, digits: int = 3) -> str:
  if not stat or stat["mean"] is None:
    return "-"
  return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


METRIC_LABELS = {"frechet_distance": "FD ↓", "accuracy": "accuracy ↑", "accuracy_min_class": "worst class ↑",
                 "precision": "precision ↑", "recall": "recall ↑", "f1": "F1 ↑", "spread_ratio": "spread ↑",
                 "novelty_ratio": "novelty"}


def _paper_rows(table: dict) -> list[str]:
  """Our best width per objective beside FHM's Table 2 (MNIST), and our numbers at the paper's width."""
  rows = ["| objective | FHM σ | FHM FID ↓ | FHM F1 ↑ | our best σ (FD) | our FD at it | our F1 at it | "
          "our FD at FHM σ | our F1 at FHM σ |", "|---|---|---|---|---|---|---|---|---|"]
  for name, (fid, f1, width) in PAPER_TABLE2_MNIST.items():
    if name not in table:
      continue
    best, e = _best_width(table[name])
    at_paper = table[name].get(f"{width:g}", {})
    rows.append(f"| {name} | {width:g} | {fid} | {f1} | {best} | {_fmt(e.get('frechet_distance'), 1)} | "
                f"{_fmt(e.get('f1'))} | {_fmt(at_paper.get('frechet_distance'), 1)} | {_fmt(at_paper.get('f1'))} |")
  return rows


def write_markdown(table: dict, path: pathlib.Path, command: str) -> None:
  widths_all = sorted({w for widths in table.values() for w in widths}, key=float)
  header = " | ".join(METRIC_LABELS[m] for m in METRICS)
  lines = [f"Produced by `{command}`.", "",
           "Best width per objective (lowest mean Frechet distance; mean ± std over seeds, ddof 0). FD, "
           "precision, recall and F1 in the held-out classifier's features; spread = within-class pixel "
           "spread over real digits'; novelty = distance to the nearest training digit over held-out digits':", "",
           f"| objective | best width | seeds | {header} |", "|---|---|---|" + "---|" * len(METRICS)]
  ranked = sorted(table.items(), key=lambda kv: (_best_width(kv[1])[1].get("frechet_distance", {}).get("mean")
                                                   or np.inf))
  for name, widths in ranked:
    width, e = _best_width(widths)
    n = e.get("frechet_distance", {}).get("n", 0)
    lines.append(f"| {name} | {width} | {n} | " + " | ".join(_fmt(e.get(m)) for m in METRICS) + " |")
  if set(table) & set(EXTRA_OBJECTIVES):
    lines += ["", "For " + ", ".join(sorted(set(table) & set(EXTRA_OBJECTIVES))) + " the width column is "
              "the Sinkhorn epsilon (in the same distance units)."]
  if any(r.get("recipe") == "demo" for e in table.values() for w in e.values() for r in w["runs"]):
    lines += ["", "Demo recipe: a kernel's width is where its annealed schedule ends (it starts 5x wider)."]
  if set(table) & set(PAPER_TABLE2_MNIST):
    lines += ["", "Beside FHM's Table 2 (MNIST; their FID-50k in Inception features, ours an FD in the "
              "project classifier's features, so only rankings compare):", "", *_paper_rows(table)]
  for metric in ("frechet_distance", "f1", "accuracy"):
    lines += ["", f"All widths ({METRIC_LABELS[metric]}):", "",
              "| objective | " + " | ".join(f"w={w}" for w in widths_all) + " |",
              "|---|" + "---|" * len(widths_all)]
    for name, widths in table.items():
      cells = []
      for w in widths_all:
        e = widths.get(w)
        if e is None:
          cells.append("-")
        elif e[metric]["mean"] is None:
          cells.append("diverged")
        else:
          cells.append(_fmt(e[metric], 1 if metric == "frechet_distance" else 3))
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "Every run:", "",
            f"| objective | width | seed | steps | status | {header} | wall s |",
            "|---|---|---|---|---|" + "---|" * len(METRICS) + "---|"]
  for name, widths in table.items():
    for w in sorted(widths, key=float):
      for r in sorted(widths[w]["runs"], key=lambda r: r["seed"]):
        values = " | ".join("-" if r.get(m) is None else f"{r[m]:.3f}" for m in METRICS)
        lines.append(f"| {name} | {w} | {r['seed']} | {r['steps']} | {r['status'].split(':')[0]} | {values} | "
                     f"{r.get('total_seconds', 0):.0f} |")
  path.write_text("\n".join(lines) + "\n")


_PLOTTED = (("frechet_distance", "Frechet distance (classifier features) ↓"), ("f1", "F1 ↑"),
            ("accuracy", "classifier accuracy ↑"), ("spread_ratio", "within-class spread / real ↑"))


def plot(table: dict, path: pathlib.Path) -> None:
  """Metrics vs kernel width per objective; with a single width, one bar per objective and a dot per seed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  single_width = all(len(widths) == 1 for widths in table.values())
  fig, axes = plt.subplots(1, len(_PLOTTED), figsize=(4.2 * len(_PLOTTED), 4 if not single_width else 3.6))
  names = list(table)
  for ax, (metric, title) in zip(axes, _PLOTTED):
    if single_width:
      for row, name in enumerate(names):
        (entry,) = table[name].values()
        if entry[metric]["mean"] is None:
          continue
        ax.barh(row, entry[metric]["mean"], xerr=entry[metric]["std"], color="C0", alpha=0.5, capsize=3)
        seeds = [r[metric] for r in entry["runs"] if r.get(metric) is not None]
        ax.plot(seeds, [row] * len(seeds), "k.", ms=6)
      ax.set_yticks(range(len(names)))
      ax.set_yticklabels(names if ax is axes[0] else [""] * len(names), fontsize=8)
      ax.invert_yaxis()
    else:
      for name, widths in table.items():
        ws = [w for w in sorted(widths, key=float) if widths[w][metric]["mean"] is not None]
        if ws:
          ax.errorbar([float(w) for w in ws], [widths[w][metric]["mean"] for w in ws],
                      yerr=[widths[w][metric]["std"] for w in ws], marker="o", capsize=3, label=name)
      ax.set_xscale("log")
      # Label the widths that were run, not log-scale minor ticks (they overprint).
      ticks = sorted({float(w) for widths in table.values() for w in widths})
      ax.set_xticks(ticks, [f"{w:g}" for w in ticks], fontsize=8)
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      ax.set_xlabel(("width or Sinkhorn ε" if set(table) & set(EXTRA_OBJECTIVES) else "kernel width")
                    + " (× mean distance)", fontsize=9)
    ax.set_title(title, fontsize=10)
  if single_width:
    (width,) = next(iter(table.values()))
    fig.suptitle(f"kernel width {width}: mean ± std over seeds (bars), each seed (dots)", fontsize=10)
  else:
    axes[0].set_yscale("log")
    if axes[-1].get_legend_handles_labels()[0]:  # no line when no run has finished yet
      axes[-1].legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def show_grid(ax, grid: pathlib.Path) -> None:
  """A run's sample grid PNG on `ax`, grey values 0-1 as saved."""
  import matplotlib.image

  # Fixed range: a flat grid (a run that never trains) keeps its grey instead of turning black.
  ax.imshow(matplotlib.image.imread(grid), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")


def sample_montage(results: list[dict], root: pathlib.Path, path: pathlib.Path) -> None:
  """The final EMA sample grid of each objective's first finished run (lowest seed, first width) side by side."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  chosen = {}
  for r in sorted(results, key=lambda r: r["seed"]):
    grid = root / run_name(r["objective"], r["width"], r["seed"]) / "samples" / f"step_{r['steps']}.png"
    if r["status"] == "ok" and grid.exists() and r["objective"] not in chosen:
      chosen[r["objective"]] = (r, grid)
  if not chosen:
    return
  cols = min(3, len(chosen))
  rows = -(-len(chosen) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.6 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (name, (r, grid)) in zip(axes.flat, chosen.items()):
    show_grid(ax, grid)
    ax.set_title(f"{name} (w={r['width']:g}, seed {r['seed']})\nFD {r['frechet_distance']:.0f}, "
                 f"accuracy {r['accuracy']:.2f}", fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A documented grid: each `grids` entry (seeds, widths[, objectives]) is every (seed, width) pair for
  those objectives (all of them when the entry has none)."""
  root: str
  stem: str
  steps: int | None  # None: the demo recipe's own length
  model_overrides: str
  grids: tuple[tuple, ...]  # ((seeds, widths) or (seeds, widths, objectives), ...)
  settings: tuple[tuple[str, object], ...] = ()  # further config overrides, (("optim.learning_rate", 1e-3),)
  recipe: str = "comparison"  # see RECIPES


# The pairs FHM's claim is about: each sharp log-KDE loss against the drifting field of its kernel.
PAIRS = ("log_kde_gauss", "drifting_gauss", "log_kde_laplace", "drifting_laplace")
SWEEP_WIDTHS = (0.05, 0.1, 0.2, 0.3)
# The recipe of the comparison: the demo's model, sampler and batch at lr 1e-3 for
# 800 steps, constant widths (the recipe of the moment the demo's width was chosen).
COMPARISON_STEPS = 800
COMPARISON_SETTINGS = (("optim.learning_rate", 1e-3),)
# Sinkhorn's epsilon in units of the top-k EMA distance scale (same-class digits sit
# at scaled distances ~0.7-1.8): near-exact OT, in between, and towards the energy distance.
SINKHORN_EPSILONS = (0.02, 0.1, 0.5)

PRESETS = {
    # The sweep that chose the demo's kernel, and FHM's other three objectives at their width (seed 0).
    "demo_widths": Preset(root="runs/comparison", stem="demo_widths", steps=COMPARISON_STEPS, model_overrides="",
                          grids=(((0,), SWEEP_WIDTHS, ("log_kde_gauss", "log_kde_laplace")),
                                 ((0,), (0.25,), ("drifting_gauss",)),
                                 ((0,), (0.05,), ("naive_laplace", "drifting_laplace"))),
                          settings=COMPARISON_SETTINGS),
    # The full grid: every objective at every width, three seeds (63 runs, about 7 hours
    # of two cores); it shares its runs with demo_widths. The cells at FHM's Table 2
    # widths come first, all three seeds, so a sweep stopped early has the headline
    # comparison whole; the width sweep around them follows, seed-major.
    "paper_widths": Preset(root="runs/comparison", stem="paper_widths", steps=COMPARISON_STEPS,
                           model_overrides="",
                           grids=(*(((0, 1, 2), (width,), (name,))
                                    for name, (_, _, width) in PAPER_TABLE2_MNIST.items()),
                                  ((0, 1, 2), SWEEP_WIDTHS), ((0, 1, 2), (0.25,), ("drifting_gauss",))),
                           settings=COMPARISON_SETTINGS),
    # Sinkhorn (losses.sinkhorn_loss) against the demo's log-KDE Gauss# on the demo's
    # own recipe (lr 2e-3, 900 steps, Gauss# annealed 1.0 -> 0.2): three epsilons, two
    # seeds. Equal steps are equal wall time to within the machine's noise (a step of
    # either objective costs the same to ~5%: the DiT dominates), and every run's
    # wall time is reported beside its metrics.
    "sinkhorn": Preset(root="runs/sinkhorn", stem="sinkhorn", steps=None, model_overrides="",
                       grids=(((0, 1), (0.2,), ("log_kde_gauss",)),
                              ((0, 1), SINKHORN_EPSILONS, ("sinkhorn",))),
                       recipe="demo"),
}


def grid_runs(names: list[str], grids) -> list[tuple[str, float, int]]:
  """(objective, width, seed) for every cell of `names`, seed-major so a stopped sweep has whole seeds.

  A grid entry without its own objectives covers all of `names` but the extra
  objectives (EXTRA_OBJECTIVES), which run only where an entry names them.
  """
  runs = []
  for seeds, widths, *only in grids:
    chosen = [n for n in names if (n in only[0] if only else n not in EXTRA_OBJECTIVES)]
    for seed in seeds:
      for name in chosen:
        for width in widths:
          if (name, width, seed) not in runs:
            runs.append((name, width, seed))
  return runs


def _worker_init() -> None:
  # Runs in a fresh (spawned) process before jax is imported there.
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def run_grid(root: pathlib.Path, runs, steps: int, model_overrides: dict, workers: int,
             settings: dict | None = None, recipe: str = "comparison") -> list[dict]:
  """Trains and evaluates every run that has no result.json; returns all results in `runs` order."""
  def report(result):
    print(json.dumps({k: result[k] for k in ("objective", "width", "seed", "status", "frechet_distance",
                                             "accuracy")}), flush=True)

  pending = [r for r in runs if not (root / run_name(*r) / "result.json").exists()]
  classifier_path = ensure_classifier(root) if pending else root / "classifier"
  results = {}
  if workers > 1 and len(pending) > 1:
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as pool:
      futures = {pool.submit(run_one, root, *r, steps, classifier_path, model_overrides, settings, recipe): r
                 for r in pending}
      for future in concurrent.futures.as_completed(futures):
        results[futures[future]] = future.result()
        report(results[futures[future]])
  for r in runs:
    if r not in results:
      results[r] = run_one(root, *r, steps, classifier_path, model_overrides, settings, recipe)
      if r in pending:
        report(results[r])
  return [results[r] for r in runs]


def load_results(root: pathlib.Path, runs) -> list[dict]:
  paths = [root / run_name(*r) / "result.json" for r in runs]
  return [json.loads(p.read_text()) for p in paths if p.exists()]


def write_outputs(results: list[dict], root: pathlib.Path, docs: pathlib.Path, stem: str, command: str) -> dict:
  if not results:
    raise SystemExit(f"no finished runs (result.json) under {root} for this grid; nothing to aggregate")
  table = aggregate(results)
  docs.mkdir(parents=True, exist_ok=True)
  (docs / f"{stem}.json").write_text(json.dumps(table, indent=2))
  write_markdown(table, docs / f"{stem}.md", command)
  plot(table, docs / "figures" / f"{stem}_metrics.png")
  sample_montage(results, root, docs / "figures" / f"{stem}_samples.png")
  return table


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=(*PRESETS, "all"),
                      help="a documented grid (root, steps, widths, seeds, model, output stem); "
                           "the grid flags below must then be left out")
  parser.add_argument("--root", default=None, help="run directory (default runs/experiments)")
  parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's)")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1)")
  parser.add_argument("--widths", default=None, help="comma-separated kernel widths (default 0.05,0.1,0.2,0.3)")
  parser.add_argument("--model-overrides", default=None,
                      help="k=v,... overrides of the demo's DiT (default: none, the demo's own model)")
  parser.add_argument("--stem", default=None, help="output file stem under --docs (default experiments)")
  parser.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(ALL_OBJECTIVES))
  parser.add_argument("--docs", default="docs")
  parser.add_argument("--workers", type=int, default=1, help="runs trained at a time (one CPU thread each)")
  parser.add_argument("--aggregate-only", action="store_true",
                      help="train nothing: aggregate the runs of the grid that have a result.json")
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(ALL_OBJECTIVES)
  unknown = sorted(set(names) - set(ALL_OBJECTIVES))
  if unknown:
    parser.error(f"unknown objectives {unknown}; known: {list(ALL_OBJECTIVES)}")
  if args.workers < 1:
    parser.error("--workers must be at least 1")
  grid_flags = ("root", "steps", "seeds", "widths", "model_overrides", "stem")
  if args.preset:
    given = [f"--{f.replace('_', '-')}" for f in grid_flags if getattr(args, f) is not None]
    if given:
      parser.error(f"--preset fixes the grid; leave out {', '.join(given)}")
    presets = list(PRESETS.values()) if args.preset == "all" else [PRESETS[args.preset]]
  else:
    try:
      presets = [Preset(
          root=args.root or "runs/experiments", stem=args.stem or "experiments",
          steps=args.steps,
          model_overrides=DEFAULT_MODEL_OVERRIDES if args.model_overrides is None else args.model_overrides,
          grids=((tuple(int(s) for s in (args.seeds or "0,1").split(",")),
                  tuple(float(w) for w in (args.widths or "0.05,0.1,0.2,0.3").split(","))),))]
    except ValueError as e:
      parser.error(f"--seeds takes integers and --widths numbers, comma-separated: {e}")
  if any(p.steps is not None and p.steps < 1 for p in presets):
    parser.error("--steps must be positive")
  command = "python -m scripts.experiments " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
  tables = {}
  for preset in presets:
    root = pathlib.Path(preset.root)
    runs = grid_runs(names, preset.grids)
    if args.aggregate_only:
      results = load_results(root, runs)
    else:
      results = run_grid(root, runs, preset.steps, parse_overrides(preset.model_overrides), args.workers,
                         dict(preset.settings), preset.recipe)
    tables[preset.stem] = write_outputs(results, root, pathlib.Path(args.docs), preset.stem, command.strip())
  return tables


if __name__ == "__main__":
  main()
