"""scripts/experiments.py: the grid, the run configs, aggregation and the written reports.

No training here (a run takes minutes); the training and evaluation each run calls
are covered by test_trainer.py and test_eval_jobs.py.
"""

import json

import numpy as np
import pytest

from configs import mnist_dit_s2
from scripts import experiments


def _result(name, width, seed, fd, acc, status="ok", steps=5):
  return {"objective": name, "width": width, "seed": seed, "steps": steps, "status": status,
          "model_overrides": {}, "train_seconds": 1.0, "total_seconds": 2.0,
          "frechet_distance": fd if status == "ok" else None, "accuracy": acc if status == "ok" else None,
          "precision": 0.5 if status == "ok" else None, "recall": 0.1 if status == "ok" else None,
          "f1": 1 / 6 if status == "ok" else None}


def test_grid_runs_is_seed_major_and_covers_each_cell_once():
  runs = experiments.grid_runs(["a", "b"], (((0,), (0.3, 1.0)), ((1,), (0.3,)), ((0,), (0.3,)), ((2,), (1.0,), ("b",))))
  assert runs == [("a", 0.3, 0), ("a", 1.0, 0), ("b", 0.3, 0), ("b", 1.0, 0), ("a", 0.3, 1), ("b", 0.3, 1),
                  ("b", 1.0, 2)]


def test_presets_are_the_documented_grids():
  demo, paper = experiments.PRESETS["demo_widths"], experiments.PRESETS["paper_widths"]
  names = list(experiments.OBJECTIVES)
  # FHM's five Table 2 objectives, named as in the paper and the paper configs.
  assert sorted(names) == sorted(experiments.PAPER_TABLE2_MNIST) == sorted(mnist_dit_s2.TABLE2_MNIST)
  demo_runs = experiments.grid_runs(names, demo.grids)
  sweep = [(n, w, 0) for n in ("log_kde_gauss", "log_kde_laplace") for w in (0.05, 0.1, 0.2, 0.3)]
  others = [("drifting_gauss", 0.25, 0), ("naive_laplace", 0.05, 0), ("drifting_laplace", 0.05, 0)]
  assert sorted(demo_runs) == sorted(sweep + others)
  paper_runs = experiments.grid_runs(names, paper.grids)
  assert len(paper_runs) == 3 * (5 * 4 + 1)  # three seeds of 5 objectives x 4 widths, + 0.25 for drifting_gauss
  for name, (_, _, width) in experiments.PAPER_TABLE2_MNIST.items():
    assert {seed for n, w, seed in paper_runs if n == name and w == width} == {0, 1, 2}  # the paper's width
    assert mnist_dit_s2.TABLE2_MNIST[name] == width
  assert set(demo_runs) <= set(paper_runs) and paper.root == demo.root  # seed 0 is shared
  # The paper-width cells, all three seeds, come first: a sweep stopped early has them whole.
  headline = {(n, w, s) for n, (_, _, w) in experiments.PAPER_TABLE2_MNIST.items() for s in (0, 1, 2)}
  assert set(paper_runs[:len(headline)]) == headline
  assert paper.stem != demo.stem
  # The recipe both train: the demo's model and sampler, lr 1e-3, 800 steps, constant widths.
  for preset in (demo, paper):
    assert preset.steps == 800 and dict(preset.settings) == {"optim.learning_rate": 1e-3}
    assert preset.model_overrides == ""
  c = experiments.run_config("log_kde_gauss", 0.2, 0, demo.steps, settings=dict(demo.settings))
  assert (c.optim.learning_rate, c.train.total_steps, c.loss.bandwidth_anneal_rate) == (1e-3, 800, 0.0)


def test_sinkhorn_preset_runs_the_demo_recipe_beside_log_kde_gauss():
  preset = experiments.PRESETS["sinkhorn"]
  runs = experiments.grid_runs(list(experiments.ALL_OBJECTIVES), preset.grids)
  assert sorted(runs) == sorted([("log_kde_gauss", 0.2, s) for s in (0, 1)] +
                                [("sinkhorn", e, s) for e in (0.02, 0.1, 0.5) for s in (0, 1)])
  # The extra objective stays out of grids that do not name it.
  paper = experiments.PRESETS["paper_widths"]
  assert all(n != "sinkhorn" for n, _, _ in experiments.grid_runs(list(experiments.ALL_OBJECTIVES), paper.grids))
  from configs import mnist_tiny
  from drifting_jax.train import train_step
  demo = mnist_tiny.get_config()
  log_kde = experiments.run_config("log_kde_gauss", 0.2, 0, preset.steps, recipe=preset.recipe)
  # The demo itself: same schedule (1.0 annealed to 0.2), learning rate and length.
  for key in ("bandwidth_anneal_rate", "kernel", "objective"):
    assert log_kde.loss[key] == demo.loss[key], key
  assert log_kde.loss.bandwidths == pytest.approx(demo.loss.bandwidths, rel=1e-4)
  assert float(log_kde.loss.bandwidths[0] * np.exp(-log_kde.loss.bandwidth_anneal_rate)) == pytest.approx(0.2)
  assert (log_kde.optim.learning_rate, log_kde.train.total_steps) == (demo.optim.learning_rate, demo.train.total_steps)
  sink = experiments.run_config("sinkhorn", 0.1, 1, preset.steps, recipe=preset.recipe)
  assert (sink.loss.objective, sink.loss.sinkhorn_epsilon, sink.loss.bandwidth_anneal_rate, sink.seed) == (
      "sinkhorn", 0.1, 0.0, 1)
  assert sink.train.total_steps == log_kde.train.total_steps and sink.optim == log_kde.optim
  train_step.objective_from_config(sink.loss)
  assert experiments.run_name("sinkhorn", 0.1, 1) == "sinkhorn_eps0.1_s1"
  with pytest.raises(ValueError, match="unknown recipe"):
    experiments.run_config("sinkhorn", 0.1, 0, None, recipe="fast")


def test_parse_overrides_casts_numbers():
  assert experiments.parse_overrides(" depth=2, mlp_ratio=2.5 ,name=x") == {"depth": 2, "mlp_ratio": 2.5, "name": "x"}
  assert experiments.parse_overrides("") == {}


@pytest.mark.parametrize("name", list(experiments.OBJECTIVES))
def test_run_config_changes_only_objective_width_and_length(name):
  from configs import mnist_tiny
  from drifting_jax.train import train_step

  base = mnist_tiny.get_config()
  c = experiments.run_config(name, 0.3, seed=7, steps=450, model_overrides={"depth": 2})
  objective, kernel, _ = experiments.OBJECTIVES[name]
  assert (c.loss.objective, c.loss.kernel, tuple(c.loss.bandwidths), c.seed) == (objective, kernel, (0.3,), 7)
  assert (objective, kernel) == mnist_dit_s2.OBJECTIVES[name]
  # FHM's distance scale and no field normalization, as in their Table 3.
  assert c.loss.feature_normalization == "topk_ema" and c.loss.normalize_gradients is False
  assert c.loss.bandwidth_anneal_rate == 0.0  # constant widths, whatever the demo anneals
  assert c.train.total_steps == 450 and c.optim.warmup_steps == min(base.optim.warmup_steps, 90)
  assert dict(c.model.overrides) == {"depth": 2}
  # Identical hyperparameters across objectives: the data, optimizer and batch shape are the config's.
  for section in ("optim", "data"):
    for key, value in base[section].items():
      if key != "warmup_steps":
        assert c[section][key] == value, (section, key)
  for key in ("gen_per_class", "classes_per_step", "pos_per_class", "positive_sampler", "ema_decay"):
    assert c.train[key] == base.train[key], key
  train_step.objective_from_config(c.loss)  # a valid loss configuration
  # steps=None keeps the demo's own length and schedule.
  full = experiments.run_config(name, 0.3, seed=0, steps=None)
  assert full.train.total_steps == base.train.total_steps and full.optim.warmup_steps == base.optim.warmup_steps


def test_aggregate_mean_and_population_std_and_divergence():
  results = [_result("a", 0.3, 0, 100.0, 0.2), _result("a", 0.3, 1, 300.0, 0.4),
             _result("a", 1.0, 0, 50.0, 0.1), _result("b", 0.3, 0, None, None, status="diverged: nan")]
  table = experiments.aggregate(results)
  cell = table["a"]["0.3"]
  assert cell["frechet_distance"] == {"mean": 200.0, "std": 100.0, "n": 2}
  assert cell["accuracy"]["mean"] == pytest.approx(0.3) and cell["accuracy"]["std"] == pytest.approx(0.1)
  assert table["a"]["1"]["frechet_distance"] == {"mean": 50.0, "std": 0.0, "n": 1}
  assert table["b"]["0.3"]["diverged"] == 1 and table["b"]["0.3"]["frechet_distance"]["mean"] is None
  assert experiments._best_width(table["a"])[0] == "1"  # lowest mean FD
  assert experiments._best_width(table["b"]) == ("-", {})


def _fake_run_dirs(root, results):
  import matplotlib.image
  for r in results:
    grid = root / experiments.run_name(r["objective"], r["width"], r["seed"]) / "samples" / f"step_{r['steps']}.png"
    grid.parent.mkdir(parents=True)
    matplotlib.image.imsave(grid, np.random.default_rng(0).random((28, 28)), cmap="gray")
    (grid.parent.parent / "result.json").write_text(json.dumps(r))


@pytest.mark.parametrize("widths", [(0.3,), (0.3, 1.0)])
def test_write_outputs_reports_every_run(tmp_path, widths):
  results = [_result(name, w, seed, fd + 10 * seed, 0.5) for name, fd in (("a", 900.0), ("b", 100.0))
             for w in widths for seed in (0, 1)]
  root = tmp_path / "runs"
  _fake_run_dirs(root, results)
  docs = tmp_path / "docs"
  table = experiments.write_outputs(results, root, docs, "stem", "cmd")
  assert json.loads((docs / "stem.json").read_text()) == json.loads(json.dumps(table))
  markdown = (docs / "stem.md").read_text()
  best_rows = [line for line in markdown.splitlines() if line.startswith("| a | ") or line.startswith("| b | ")]
  assert best_rows[0].startswith("| b | 0.3 | 2 | 105.000 ± 5.000")  # ranked by mean FD, b first
  assert sum(line.startswith("| a | 0.3 | 1 | 5 | ok | 910.000") for line in markdown.splitlines()) == 1
  for figure in ("stem_metrics.png", "stem_samples.png"):
    assert (docs / "figures" / figure).stat().st_size > 1000


def test_run_grid_reuses_finished_runs_without_training(tmp_path, monkeypatch):
  results = [_result("a", 0.3, 0, 1.0, 0.5), _result("b", 0.3, 0, 2.0, 0.5)]
  _fake_run_dirs(tmp_path, results)

  def no_classifier(root):
    raise AssertionError("nothing should be trained")
  monkeypatch.setattr(experiments, "ensure_classifier", no_classifier)
  got = experiments.run_grid(tmp_path, [("b", 0.3, 0), ("a", 0.3, 0)], steps=5, model_overrides={}, workers=2)
  assert [r["objective"] for r in got] == ["b", "a"]
  assert experiments.load_results(tmp_path, [("a", 0.3, 0), ("c", 0.3, 0)]) == [results[0]]


def test_worker_init_pins_one_thread(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  experiments._worker_init()
  import os
  flags = os.environ["XLA_FLAGS"].split()
  assert flags[0] == "--xla_force_host_platform_device_count=1"
  assert "--xla_cpu_multi_thread_eigen=false" in flags and "intra_op_parallelism_threads=1" in flags


@pytest.mark.parametrize("argv, message", [
    (["--preset", "paper_widths", "--steps", "5"], "--preset fixes the grid; leave out --steps"),
    (["--only", "log_kde_laplace,bogus"], "unknown objectives ['bogus']"),
    (["--widths", "0.3,wide"], "--widths numbers"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--steps", "0"], "--steps must be positive"),
])
def test_bad_command_lines_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    experiments.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_aggregate_only_without_runs_says_so(tmp_path):
  with pytest.raises(SystemExit, match="no finished runs"):
    experiments.main(["--aggregate-only", "--root", str(tmp_path), "--docs", str(tmp_path / "docs")])
