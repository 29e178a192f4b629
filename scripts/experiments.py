r"""Objective comparison on MNIST-5k (FHM Table 2 / Figure 4 at CPU scale): `make experiments`.

    python -m scripts.experiments [--root runs/experiments] [--steps 600] [--seeds 0,1]
                                  [--widths 0.05,0.15,0.5] [--only log_kde_laplace,...] [--docs docs]
                                  [--model-overrides hidden_size=64,cond_dim=64,depth=2,num_heads=2,patch_size=4]

Every run trains the `mnist_tiny` model with identical hyperparameters except the
objective and the kernel width, then evaluates its EMA generator with the project's
MNIST classifier (trained once on the held-out digits): Frechet distance in the
classifier's feature space, classifier accuracy on conditional samples, precision,
recall and F1. Runs are resumable: a run with a `result.json` is skipped, a run
with a checkpoint resumes from it. The aggregate (mean and seed spread) goes to
`<docs>/experiments.json`, `<docs>/experiments.md` and
`<docs>/figures/objective_width_sweep.png`.

All objectives use the release's batch-mean distance scaling, so a width is a
fraction of the mean feature distance (the release objective computes that scale
itself and cannot use the top-k EMA scale).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

# name -> (loss.objective, loss.kernel, extra loss fields)
OBJECTIVES = {
    "log_kde_gauss": ("log_kde", "gaussian", {}),
    "log_kde_laplace": ("log_kde", "laplace", {}),
    "log_kde_rq": ("log_kde", "rational_quadratic", {}),
    "naive_laplace": ("corrected", "laplace", {}),
    "drifting_laplace": ("release", "laplace", {}),
    "drifting_gauss": ("release", "gaussian", {}),
    "mmd_laplace": ("mmd", "laplace", {}),
    # Annealing needs an absolute scale (top-k EMA), so its reference is the same
    # objective with top-k EMA normalization and a constant width.
    "log_kde_laplace_topk": ("log_kde", "laplace", {"feature_normalization": "topk_ema"}),
    "log_kde_laplace_annealed": ("log_kde", "laplace", {"feature_normalization": "topk_ema",
                                                        "bandwidth_anneal_rate": 1.0}),
}
METRICS = ("frechet_distance", "accuracy", "precision", "recall", "f1")


DEFAULT_MODEL_OVERRIDES = "hidden_size=64,cond_dim=64,depth=2,num_heads=2,patch_size=4"


def parse_overrides(text: str) -> dict:
  """'k=v,k=v' -> {k: int/float/str}: per-key overrides of the `tiny` DiT's model_config."""
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


def run_config(name: str, width: float, seed: int, steps: int, model_overrides: dict | None = None):
  from configs import mnist_tiny
  objective, kernel, extra = OBJECTIVES[name]
  c = mnist_tiny.get_config()
  if model_overrides:
    c.model.overrides = dict(model_overrides)
  c.seed = seed
  c.loss.objective = objective
  c.loss.kernel = kernel
  c.loss.bandwidths = (float(width),)
  c.loss.feature_normalization = "batch_mean"
  for k, v in extra.items():
    c.loss[k] = v
  c.train.total_steps = steps
  c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 5)
  c.checkpoint.every_steps = steps
  c.checkpoint.async_save = False
  c.log.sample_grid_every = steps  # one grid of EMA samples at the end, to look at
  c.log.every_steps = min(c.log.every_steps, max(1, steps // 10))
  c.eval.cfg_scales = (1.0,)
  c.eval.samples_per_class = 100
  return c


def run_one(root: pathlib.Path, name: str, width: float, seed: int, steps: int,
            classifier_path: pathlib.Path, model_overrides: dict | None = None) -> dict:
  from drifting_jax.eval import jobs
  from drifting_jax.train import trainer
  workdir = root / f"{name}_w{width:g}_s{seed}"
  result_path = workdir / "result.json"
  if result_path.exists():
    return json.loads(result_path.read_text())
  config = run_config(name, width, seed, steps, model_overrides)
  config.eval.classifier_path = str(classifier_path)
  start = time.perf_counter()
  try:
    trainer.train_and_evaluate(config, str(workdir))
    status = "ok"
  except trainer.NonFiniteLossError as e:
    status = f"diverged: {e}"
  seconds = time.perf_counter() - start
  metrics = {}
  if status == "ok":
    metrics = jobs.evaluate(config, str(workdir))["cfg"]["1"]
  result = {"objective": name, "width": width, "seed": seed, "steps": steps, "status": status,
            "model_overrides": model_overrides or {}, "train_seconds": seconds,
            "total_seconds": time.perf_counter() - start, **{k: metrics.get(k) for k in METRICS}}
  workdir.mkdir(parents=True, exist_ok=True)
  result_path.write_text(json.dumps(result, indent=2))
  return result


def ensure_classifier(root: pathlib.Path) -> pathlib.Path:
  from configs import mnist_tiny
  from drifting_jax.eval import classifier
  path = root / "classifier"
  if not (path / "metadata.json").exists():
    config = mnist_tiny.get_config()
    config.eval.classifier_path = str(path)
    classifier.train_classifier_job(config, str(root))
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


def write_markdown(table: dict, path: pathlib.Path, command: str) -> None:
  def fmt(stat):
    if not stat or stat["mean"] is None:
      return "-"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["n"] > 1 else f"{stat['mean']:.3f}"

  lines = [f"Produced by `{command}`.", "",
           "Best width per objective (lowest Frechet distance; mean ± std over seeds):", "",
           "| objective | best width | FD (classifier features) ↓ | accuracy ↑ | precision ↑ | recall ↑ | F1 ↑ |",
           "|---|---|---|---|---|---|---|"]
  ranked = sorted(table.items(), key=lambda kv: (_best_width(kv[1])[1].get("frechet_distance", {}).get("mean")
                                                   or np.inf))
  for name, widths in ranked:
    width, e = _best_width(widths)
    lines.append(f"| {name} | {width} | " + " | ".join(fmt(e.get(m)) for m in METRICS) + " |")
  lines += ["", "All widths (FD / accuracy):", "",
            "| objective | " + " | ".join(f"w={w}" for w in sorted(next(iter(table.values())), key=float)) + " |",
            "|---|" + "---|" * len(next(iter(table.values())))]
  for name, widths in table.items():
    cells = []
    for w in sorted(widths, key=float):
      e = widths[w]
      cells.append("diverged" if e["frechet_distance"]["mean"] is None else
                   f"{fmt(e['frechet_distance'])} / {fmt(e['accuracy'])}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  path.write_text("\n".join(lines) + "\n")


def plot(table: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, widths in table.items():
    ws = sorted(widths, key=float)
    for ax, metric in zip(axes, ("frechet_distance", "accuracy")):
      xs = [float(w) for w in ws if widths[w][metric]["mean"] is not None]
      ys = [widths[w][metric]["mean"] for w in ws if widths[w][metric]["mean"] is not None]
      es = [widths[w][metric]["std"] for w in ws if widths[w][metric]["mean"] is not None]
      if xs:
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
  for ax, title in zip(axes, ("Frechet distance (classifier features) ↓", "classifier accuracy ↑")):
    ax.set_xscale("log")
    ax.set_xlabel("kernel width (fraction of mean distance)")
    ax.set_title(title)
  axes[0].set_yscale("log")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/experiments")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--widths", default="0.05,0.15,0.5")
  parser.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(OBJECTIVES))
  parser.add_argument("--docs", default="docs")
  parser.add_argument("--aggregate-only", action="store_true",
                      help="train nothing: aggregate the runs of the grid that have a result.json")
  parser.add_argument("--model-overrides", default=DEFAULT_MODEL_OVERRIDES,
                      help="k=v,... overrides of the `tiny` DiT (\"\" = the full mnist_tiny model)")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  names = [n for n in args.only.split(",") if n] or list(OBJECTIVES)
  unknown = sorted(set(names) - set(OBJECTIVES))
  if unknown:
    parser.error(f"unknown objectives {unknown}; known: {list(OBJECTIVES)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  widths = [float(w) for w in args.widths.split(",")]
  model_overrides = parse_overrides(args.model_overrides)
  classifier_path = None if args.aggregate_only else ensure_classifier(root)
  results = []
  for seed in seeds:
    for name in names:
      for width in widths:
        if args.aggregate_only:
          path = root / f"{name}_w{width:g}_s{seed}" / "result.json"
          if not path.exists():
            continue
          result = json.loads(path.read_text())
        else:
          result = run_one(root, name, width, seed, args.steps, classifier_path, model_overrides)
        print(json.dumps({k: result[k] for k in ("objective", "width", "seed", "status", "frechet_distance",
                                                 "accuracy")}), flush=True)
        results.append(result)
  table = aggregate(results)
  docs = pathlib.Path(args.docs)
  docs.mkdir(parents=True, exist_ok=True)
  (docs / "experiments.json").write_text(json.dumps(table, indent=2))
  command = "python -m scripts.experiments " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
  write_markdown(table, docs / "experiments.md", command.strip())
  plot(table, docs / "figures" / "objective_width_sweep.png")
  return table


if __name__ == "__main__":
  main()
