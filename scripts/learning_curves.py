r"""Learning curves at FHM's Table 2 widths (issue: is the Table 2 disagreement a matter of length?).

    python -m scripts.learning_curves [--root runs/curves] [--stage a|b|batch|all] [--workers 1]
    python -m scripts.learning_curves --aggregate-only      # tables and figure from what has landed
    make curves                                             # --prepare, then two shards side by side

The comparison (`scripts/experiments.py`, preset `paper_widths`) trains every
objective for 800 steps. Here the same recipe (`experiments.run_config` with
`COMPARISON_SETTINGS`: the demo's DiT, fresh sampler and batch at lr 1e-3, a
constant kernel width) trains 4x longer, `CURVE_STEPS` = 3,200 steps, with its
cosine learning-rate schedule and warmup stretched to the run's length (they are
functions of `train.total_steps`), and every run is evaluated at `EVAL_STEPS` =
400, 800, 1,600 and 3,200 steps from checkpoints kept at those steps. The
comparison's own 800-step runs are the short-schedule reference (a run of 3,200
steps is at a higher learning rate at its step 800 than a run that ends there).

Stages, in the order that answers the open question first:

* `a`: log-KDE Gauss# at 0.2 and Drifting-Gauss at 0.25 (FHM's widths), seeds 0 and 1;
* `b`: log-KDE Laplace# 0.1, Naive-Laplace 0.05 and Drifting-Laplace 0.05, seed 0;
* `batch`: the two Gaussian objectives at FHM's Table 3 batch (N_pos = N_gen = 96
  per class, 5 classes; the comparison uses 32 generated and 64 positives), seed 0,
  so batch size and length are separated.

Runs are resumable one by one: a run with `curve.json` is done; a run with a
checkpoint resumes training from it; each evaluation lands in `eval/step_N.json`
and is not repeated. Every run records its wall time, CPU threads and the machine's
load average at start and end (runs that shared the machine are marked). Output:
`docs/learning_curves.{json,md}` and `docs/figures/learning_curves.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import numpy as np

from scripts import experiments

CURVE_STEPS = 3200
EVAL_STEPS = (400, 800, 1600, 3200)
PAPER_BATCH = (("train.gen_per_class", 96), ("train.pos_per_class", 96), ("train.classes_per_step", 5))
CURVE_METRICS = ("frechet_distance", "f1", "precision", "recall", "accuracy", "accuracy_min_class",
                 "spread_ratio", "stray_ink_ratio", "novelty_ratio")

# (objective, width, seed, batch): batch "comparison" (the grid's) or "paper" (FHM Table 3).
STAGES = {
    "a": [(name, width, seed, "comparison") for seed in (0, 1)
          for name, width in (("log_kde_gauss", 0.2), ("drifting_gauss", 0.25))],
    "b": [("log_kde_laplace", 0.1, 0, "comparison"), ("naive_laplace", 0.05, 0, "comparison"),
          ("drifting_laplace", 0.05, 0, "comparison")],
    "batch": [("log_kde_gauss", 0.2, 0, "paper"), ("drifting_gauss", 0.25, 0, "paper")],
}
STAGE_ORDER = ("a", "b", "batch")
# FHM's Table 2 ordering on MNIST (FID, lower first), for the figure.
PAPER_ORDER = sorted(experiments.PAPER_TABLE2_MNIST, key=lambda n: experiments.PAPER_TABLE2_MNIST[n][0])


def curve_name(name: str, width: float, seed: int, batch: str) -> str:
  return experiments.run_name(name, width, seed) + ("_paperbatch" if batch == "paper" else "")


def curve_config(name: str, width: float, seed: int, batch: str):
  settings = dict(experiments.COMPARISON_SETTINGS)
  if batch == "paper":
    settings.update(PAPER_BATCH)
  c = experiments.run_config(name, width, seed, CURVE_STEPS, settings=settings)
  c.checkpoint.every_steps = EVAL_STEPS[0]
  c.checkpoint.keep_every = EVAL_STEPS[0]  # orbax keeps every multiple of 400: all of EVAL_STEPS
  c.log.sample_grid_every = CURVE_STEPS
  c.eval.temperatures = ()
  return c


def _threads() -> str:
  flags = os.environ.get("XLA_FLAGS", "")
  return "1" if "intra_op_parallelism_threads=1" in flags else str(os.cpu_count())


def run_curve(root: pathlib.Path, name: str, width: float, seed: int, batch: str,
              classifier_path: pathlib.Path) -> dict:
  from drifting_jax.eval import evaluation, sampling
  from drifting_jax.train import run as run_lib, trainer
  workdir = root / curve_name(name, width, seed, batch)
  done_path = workdir / "curve.json"
  if done_path.exists():
    return json.loads(done_path.read_text())
  config = curve_config(name, width, seed, batch)
  config.eval.classifier_path = str(classifier_path)
  timing_path = workdir / "timing.json"
  timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"segments": []}
  from drifting_jax import checkpointing
  saved = checkpointing.Checkpointer(workdir, async_save=False).latest_step() if (workdir / "checkpoints").exists() else None
  segment = {"load_start": os.getloadavg()[0], "threads": _threads(), "start": time.time(),
             "start_step": int(saved or 0)}
  status = "ok"
  start = time.perf_counter()
  try:
    state = trainer.train_and_evaluate(config, str(workdir))
  except run_lib.NonFiniteLossError as e:
    status = f"diverged: {e}"
  segment.update(train_seconds=time.perf_counter() - start, load_end=os.getloadavg()[0])
  if status == "ok":
    segment["end_step"] = int(state.step)
  timing["segments"].append(segment)
  workdir.mkdir(parents=True, exist_ok=True)
  timing_path.write_text(json.dumps(timing, indent=2))
  if status == "ok" and int(state.step) < CURVE_STEPS:  # stopped (SIGTERM): its segment is kept, so is its time
    raise SystemExit(f"{workdir.name} stopped at step {int(state.step)}; rerun to resume it")
  curve = {}
  eval_seconds = 0.0
  if status == "ok":
    for step in EVAL_STEPS:
      path = workdir / "eval" / f"step_{step}.json"
      if path.exists():
        metrics = json.loads(path.read_text())["cfg"]["1"]
      else:
        t0 = time.perf_counter()
        module, params, _ = sampling.load_generator(config, str(workdir), step=step)
        metrics = evaluation.evaluate_generator(config, str(workdir), module, params, step)["cfg"]["1"]
        eval_seconds += time.perf_counter() - t0
      curve[str(step)] = {m: metrics.get(m) for m in CURVE_METRICS}
  result = {"objective": name, "width": width, "seed": seed, "batch": batch, "steps": CURVE_STEPS,
            "status": status, "curve": curve, "eval_seconds": eval_seconds,
            "train_seconds": sum(s["train_seconds"] for s in timing["segments"]),
            "segments": timing["segments"],
            "batch_sizes": {"classes": int(config.train.classes_per_step), "gen": int(config.train.gen_per_class),
                            "pos": int(config.train.pos_per_class)}}
  done_path.write_text(json.dumps(result, indent=2))
  return result


def evaluate_partial(root: pathlib.Path, classifier_path: pathlib.Path) -> dict[str, dict]:
  """Evaluates the checkpoints at EVAL_STEPS that unfinished runs have already saved.

  The files land where `run_curve` looks for them (eval/step_N.json), so a run that
  finishes later reuses them; partial results answer something before the runs end.
  """
  from drifting_jax import checkpointing
  from drifting_jax.eval import evaluation, sampling
  out = {}
  for stage in STAGE_ORDER:
    for cell in STAGES[stage]:
      workdir = root / curve_name(*cell)
      if (workdir / "curve.json").exists() or not (workdir / "checkpoints").exists():
        continue
      config = curve_config(*cell)
      config.eval.classifier_path = str(classifier_path)
      saved = set(checkpointing.Checkpointer(workdir, async_save=False).all_steps())
      for step in EVAL_STEPS:
        path = workdir / "eval" / f"step_{step}.json"
        if step not in saved:
          continue
        if not path.exists():
          module, params, _ = sampling.load_generator(config, str(workdir), step=step)
          evaluation.evaluate_generator(config, str(workdir), module, params, step)
        metrics = json.loads(path.read_text())["cfg"]["1"]
        out.setdefault(workdir.name, {})[str(step)] = {m: metrics.get(m) for m in CURVE_METRICS}
  return out


def _short_reference(comparison_root: pathlib.Path, name: str, width: float) -> dict:
  """The grid's 800-step runs of this cell (all seeds), the short-schedule reference."""
  out = {}
  for seed in (0, 1, 2):
    path = comparison_root / experiments.run_name(name, width, seed) / "result.json"
    if path.exists():
      r = json.loads(path.read_text())
      out[str(seed)] = {m: r.get(m) for m in CURVE_METRICS}
  return out


def _reference_from_docs(docs: pathlib.Path) -> dict:
  """800-step reference from docs/paper_widths.json when the comparison's runs are not on disk."""
  path = docs / "paper_widths.json"
  if not path.exists():
    return {}
  table = json.loads(path.read_text())
  out = {}
  for name, widths in table.items():
    for w, entry in widths.items():
      out[(name, float(w))] = {str(r["seed"]): {m: r.get(m) for m in CURVE_METRICS} for r in entry["runs"]}
  return out


def collect(root: pathlib.Path) -> list[dict]:
  results = []
  for stage in STAGE_ORDER:
    for cell in STAGES[stage]:
      path = root / curve_name(*cell) / "curve.json"
      if path.exists():
        results.append({**json.loads(path.read_text()), "stage": stage})
  return results


def _label(r: dict) -> str:
  return f"{r['objective']} {r['width']:g}" + (" (FHM batch)" if r["batch"] == "paper" else "")


def write_markdown(results: list[dict], reference: dict, path: pathlib.Path, command: str) -> None:
  lines = [f"Produced by `{command}`.", "",
           f"Comparison recipe trained {CURVE_STEPS} steps (cosine schedule and warmup stretched to the run), "
           "evaluated at every step of " + ", ".join(map(str, EVAL_STEPS)) + " (100 samples per class, CFG 1, "
           "temperature 1). `800*` is the grid's 800-step run of the same cell (its own schedule ends there), "
           "mean over its seeds. Finished runs:", ""]
  header = ["objective", "width", "seed", "batch", "step", "FD ↓", "F1 ↑", "precision ↑", "recall ↑", "accuracy ↑",
            "worst class ↑", "spread ↑", "stray ink ×real ↓"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  cols = ("frechet_distance", "f1", "precision", "recall", "accuracy", "accuracy_min_class", "spread_ratio",
          "stray_ink_ratio")

  def fmt(v, m):
    if v is None:
      return "-"
    return f"{v:.1f}" if m == "frechet_distance" else f"{v:.3f}"

  for r in results:
    ref = reference.get((r["objective"], float(r["width"])), {})
    if ref and r["batch"] == "comparison":
      mean = {m: float(np.mean([x[m] for x in ref.values() if x.get(m) is not None]))
              if any(x.get(m) is not None for x in ref.values()) else None for m in cols}
      lines.append(f"| {r['objective']} | {r['width']:g} | {','.join(sorted(ref))} | comparison | 800* | "
                   + " | ".join(fmt(mean[m], m) for m in cols) + " |")
    for step, metrics in r["curve"].items():
      lines.append(f"| {r['objective']} | {r['width']:g} | {r['seed']} | {r['batch']} | {step} | "
                   + " | ".join(fmt(metrics.get(m), m) for m in cols) + " |")
  lines += ["", "Run cost (training wall time of the whole run; `threads` the CPU threads it had; load is the "
            "1-minute load average at start/end of each training segment: above ~1 per thread means the run "
            "shared the machine):", "",
            "| run | batch (classes × gen / pos) | train s (timed steps) | s / step | eval s | threads | load start/end |",
            "|---|---|---|---|---|---|---|"]
  for r in results:
    b = r["batch_sizes"]
    loads = "; ".join(f"{s['load_start']:.1f}/{s['load_end']:.1f}" for s in r["segments"])
    threads = ",".join(sorted({s["threads"] for s in r["segments"]}))
    # Segments a session's end killed were never recorded: s / step is over the timed
    # segments' own steps (segments without step records: the run's whole length).
    timed = [(s["train_seconds"], s["end_step"] - s["start_step"]) for s in r["segments"] if "end_step" in s]
    if not timed:
      timed = [(r["train_seconds"], r["steps"])]
    seconds, steps = sum(t for t, _ in timed), sum(n for _, n in timed)
    lines.append(f"| {_label(r)} s{r['seed']} | {b['classes']} × {b['gen']} / {b['pos']} | "
                 f"{seconds:.0f} ({steps} steps) | {seconds / max(steps, 1):.3f} | {r['eval_seconds']:.0f} | "
                 f"{threads} | {loads} |")
  path.write_text("\n".join(lines) + "\n")


_PLOTTED = (("frechet_distance", "FD (classifier features) ↓"), ("f1", "F1 ↑"), ("precision", "precision ↑"),
            ("recall", "recall ↑"), ("accuracy", "accuracy ↑"), ("spread_ratio", "spread / real ↑"),
            ("stray_ink_ratio", "stray ink / real ↓"))


def _value(v) -> float:
  return np.nan if v is None else float(v)


def plot(results: list[dict], reference: dict, path: pathlib.Path) -> None:
  """Each metric against steps, one line per objective (mean over seeds, seeds as dots), FHM's ranking in the legend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups: dict = {}
  for r in results:
    groups.setdefault((r["objective"], r["width"], r["batch"]), []).append(r)
  rank = {n: i + 1 for i, n in enumerate(PAPER_ORDER)}
  fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
  colors = {n: f"C{i}" for i, n in enumerate(PAPER_ORDER)}
  for ax, (metric, title) in zip(axes.flat, _PLOTTED):
    for (name, width, batch), runs in sorted(groups.items(), key=lambda kv: (rank.get(kv[0][0], 9), kv[0][2])):
      steps = [int(s) for s in EVAL_STEPS]
      per_seed = np.array([[_value(r["curve"].get(str(s), {}).get(metric)) for s in steps] for r in runs], float)
      style = "-" if batch == "comparison" else "--"
      label = f"FHM #{rank.get(name, '?')} {name} {width:g}" + (" FHM batch" if batch == "paper" else "") \
          + f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
      # The mean over the seeds that reached each step (NaN, without numpy's warning, where none has).
      reached = np.sum(~np.isnan(per_seed), 0)
      mean = np.where(reached > 0, np.nansum(per_seed, 0) / np.maximum(reached, 1), np.nan)
      ax.plot(steps, mean, style, marker="o", color=colors.get(name), label=label)
      if len(runs) > 1:
        for row in per_seed:
          ax.plot(steps, row, ".", color=colors.get(name), alpha=0.5)
      ref = reference.get((name, float(width)), {})
      values = [x[metric] for x in ref.values() if x.get(metric) is not None]
      if values and batch == "comparison":
        ax.plot([800], [np.mean(values)], "x", ms=9, mew=2, color=colors.get(name))
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(EVAL_STEPS), [str(s) for s in EVAL_STEPS])
    ax.set_xlabel("training step")
    plotted = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), float) if np.isfinite(y)]
    # Log scale: a run that never trains sits orders of magnitude above the others.
    if metric in ("frechet_distance", "stray_ink_ratio") and plotted and min(plotted) > 0:
      ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
  legend_ax = axes.flat[-1]
  legend_ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  legend_ax.legend(handles, labels, fontsize=8, loc="center",
                   title="FHM Table 2 rank (MNIST FID); x = the grid's 800-step runs", title_fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def sample_montage(results: list[dict], root: pathlib.Path, path: pathlib.Path, steps=(800, CURVE_STEPS)) -> None:
  """Each finished run's evaluation grid (CFG 1, 10 per class) at `steps`: one row per run, one column per step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in results if r["status"] == "ok"]
  if not rows:
    return
  fig, axes = plt.subplots(len(rows), len(steps), figsize=(4.6 * len(steps), 4.9 * len(rows)), squeeze=False)
  for row, r in zip(axes, rows):
    for ax, step in zip(row, steps):
      ax.axis("off")
      grid = root / curve_name(r["objective"], r["width"], r["seed"], r["batch"]) / "eval" / f"step_{step}_cfg1.png"
      if grid.exists():
        experiments.show_grid(ax, grid)
        fd = r["curve"].get(str(step), {}).get("frechet_distance")
        ax.set_title(f"{_label(r)} seed {r['seed']}, step {step}" + (f"\nFD {fd:.0f}" if fd is not None else ""),
                     fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_outputs(root: pathlib.Path, docs: pathlib.Path, comparison_root: pathlib.Path, command: str) -> list:
  results = collect(root)
  if not results:
    print(f"no finished curve (curve.json) under {root} yet")
    return results
  reference = _reference_from_docs(docs)
  for stage in STAGE_ORDER:
    for name, width, _, _ in STAGES[stage]:
      found = _short_reference(comparison_root, name, width)
      if found:
        reference[(name, float(width))] = found
  (docs / "learning_curves.json").write_text(json.dumps(results, indent=2))
  write_markdown(results, reference, docs / "learning_curves.md", command)
  plot(results, reference, docs / "figures" / "learning_curves.png")
  sample_montage(results, root, docs / "figures" / "learning_curves_samples.png")
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/curves")
  parser.add_argument("--comparison-root", default="runs/comparison",
                      help="the grid's runs (800-step reference); docs/paper_widths.json otherwise")
  parser.add_argument("--stage", default="all", choices=(*STAGE_ORDER, "all"))
  parser.add_argument("--docs", default="docs")
  parser.add_argument("--aggregate-only", action="store_true")
  parser.add_argument("--partial", action="store_true",
                      help="evaluate the EVAL_STEPS checkpoints that unfinished runs have saved, print them")
  parser.add_argument("--prepare", action="store_true",
                      help="only train the evaluation classifier (before starting shards side by side)")
  parser.add_argument("--only", default="",
                      help="comma-separated run names (e.g. log_kde_gauss_w0.2_s0_paperbatch): train these, "
                           "in this order, instead of the stages' order")
  parser.add_argument("--shard", default="0/1",
                      help="i/n: train every n-th run starting at the i-th (n processes side by side)")
  args = parser.parse_args(argv)
  try:
    shard, num_shards = (int(x) for x in args.shard.split("/"))
    assert 0 <= shard < num_shards
  except (ValueError, AssertionError):
    parser.error(f"--shard takes i/n with 0 <= i < n, got {args.shard!r}")
  root, docs = pathlib.Path(args.root), pathlib.Path(args.docs)
  command = "python -m scripts.learning_curves " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
  if args.prepare:
    experiments.ensure_classifier(root)
    return []
  if args.partial:
    partial = evaluate_partial(root, experiments.ensure_classifier(root))
    print(json.dumps(partial, indent=2))
    return partial
  if not args.aggregate_only:
    stages = STAGE_ORDER if args.stage == "all" else (args.stage,)
    classifier_path = experiments.ensure_classifier(root)
    cells = [cell for stage in stages for cell in STAGES[stage]]
    if args.only:
      by_name = {curve_name(*cell): cell for stage in STAGE_ORDER for cell in STAGES[stage]}
      unknown = [n for n in args.only.split(",") if n not in by_name]
      if unknown:
        parser.error(f"--only: unknown run(s) {unknown}; known: {sorted(by_name)}")
      cells = [by_name[n] for n in args.only.split(",")]
    for cell in cells[shard::num_shards]:
      r = run_curve(root, *cell, classifier_path)
      print(json.dumps({"run": curve_name(*cell), "status": r["status"],
                        "fd": {s: m["frechet_distance"] for s, m in r["curve"].items()}}), flush=True)
      write_outputs(root, docs, pathlib.Path(args.comparison_root), command.strip())
  return write_outputs(root, docs, pathlib.Path(args.comparison_root), command.strip())


if __name__ == "__main__":
  main()
