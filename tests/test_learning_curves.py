"""scripts/learning_curves.py: the runs' configs, the order of the stages, and the written reports.

No training here; the trainer and the evaluation each run calls are tested elsewhere.
"""

import json

import pytest

from configs import mnist_tiny
from scripts import experiments, learning_curves as lc


def test_the_stages_answer_the_open_question_first_at_fhms_widths():
  a = lc.STAGES["a"]
  assert a[:2] == [("log_kde_gauss", 0.2, 0, "comparison"), ("drifting_gauss", 0.25, 0, "comparison")]
  assert sorted(a) == sorted((n, w, s, "comparison") for s in (0, 1)
                             for n, w in (("log_kde_gauss", 0.2), ("drifting_gauss", 0.25)))
  for name, width, _, _ in lc.STAGES["a"] + lc.STAGES["b"]:
    assert experiments.PAPER_TABLE2_MNIST[name][2] == width  # FHM's Table 2 width of that objective
  assert {n for n, *_ in lc.STAGES["b"]} == {"log_kde_laplace", "naive_laplace", "drifting_laplace"}
  assert all(batch == "paper" for *_, batch in lc.STAGES["batch"])


@pytest.mark.parametrize("batch", ["comparison", "paper"])
def test_a_curve_run_is_the_comparison_recipe_stretched_four_times(batch):
  c = lc.curve_config("log_kde_gauss", 0.2, 1, batch)
  short = experiments.run_config("log_kde_gauss", 0.2, 1, experiments.COMPARISON_STEPS,
                                 settings=dict(experiments.COMPARISON_SETTINGS))
  assert c.train.total_steps == lc.CURVE_STEPS == 4 * experiments.COMPARISON_STEPS
  # The schedule is a function of total_steps (cosine); its warmup is the comparison's.
  assert c.optim.schedule == short.optim.schedule == "cosine"
  assert c.optim.warmup_steps == short.optim.warmup_steps == mnist_tiny.get_config().optim.warmup_steps
  assert c.optim.learning_rate == short.optim.learning_rate == 1e-3
  assert tuple(c.loss.bandwidths) == (0.2,) and c.loss.bandwidth_anneal_rate == 0.0
  # Every evaluation step is a checkpoint that orbax keeps.
  assert all(s % c.checkpoint.every_steps == 0 and s % c.checkpoint.keep_every == 0 for s in lc.EVAL_STEPS)
  if batch == "paper":  # FHM Table 3: N_pos = N_gen = 96 per class, 5 classes
    assert (c.train.gen_per_class, c.train.pos_per_class, c.train.classes_per_step) == (96, 96, 5)
  else:
    assert (c.train.gen_per_class, c.train.pos_per_class) == (short.train.gen_per_class, short.train.pos_per_class)
  assert lc.curve_name("log_kde_gauss", 0.2, 1, batch).endswith("_paperbatch" if batch == "paper" else "_s1")


def _curve(fds):
  return {str(s): {m: None for m in lc.CURVE_METRICS} | {"frechet_distance": fd, "f1": 0.5}
          for s, fd in zip(lc.EVAL_STEPS, fds)}


def test_reports_list_every_finished_run_with_its_cost(tmp_path):
  root, docs = tmp_path / "runs", tmp_path / "docs"
  (docs / "figures").mkdir(parents=True)
  for (name, width, seed, batch), fds in zip(lc.STAGES["a"][:2], ([900, 500, 200, 100], [400, 300, 200, 150])):
    workdir = root / lc.curve_name(name, width, seed, batch)
    workdir.mkdir(parents=True)
    # log-KDE: two recorded segments with their steps plus the time of an unrecorded start
    # (a session's end); Drifting: one segment without step records (older runs).
    segments = ([{"load_start": 1.0, "load_end": 2.5, "threads": "1", "train_seconds": 600.0,
                  "start_step": 2000, "end_step": 2400},
                 {"load_start": 2.5, "load_end": 2.0, "threads": "1", "train_seconds": 2000.0,
                  "start_step": 2400, "end_step": 3200}]
                if name == "log_kde_gauss" else
                [{"load_start": 1.0, "load_end": 2.5, "threads": "1", "train_seconds": 3200.0}])
    (workdir / "curve.json").write_text(json.dumps({
        "objective": name, "width": width, "seed": seed, "batch": batch, "steps": lc.CURVE_STEPS, "status": "ok",
        "curve": _curve(fds), "eval_seconds": 3.0, "train_seconds": sum(x["train_seconds"] for x in segments),
        "segments": segments,
        "batch_sizes": {"classes": 5, "gen": 32, "pos": 64}}))
  results = lc.write_outputs(root, docs, tmp_path / "no_comparison", "cmd")
  assert [r["objective"] for r in results] == ["log_kde_gauss", "drifting_gauss"]
  md = (docs / "learning_curves.md").read_text()
  assert "| log_kde_gauss | 0.2 | 0 | comparison | 3200 | 100.0 |" in md
  assert "| drifting_gauss 0.25 s0 | 5 × 32 / 64 | 3200 (3200 steps) | 1.000 | 3 | 1 | 1.0/2.5 |" in md
  # s / step over the timed steps only: 2,600 s for 1,200 steps, not 2,600 / 3,200.
  assert "| log_kde_gauss 0.2 s0 | 5 × 32 / 64 | 2600 (1200 steps) | 2.167 | 3 | 1 | 1.0/2.5; 2.5/2.0 |" in md
  assert (docs / "figures" / "learning_curves.png").stat().st_size > 0
  assert json.loads((docs / "learning_curves.json").read_text())[1]["curve"]["3200"]["frechet_distance"] == 150


def test_the_topk_scale_shrinks_with_more_positives_per_class():
  """The measurement behind the top-k reading: nearest positives are nearer among more of them."""
  from scripts import topk_scale_by_batch
  result = topk_scale_by_batch.measure(draws=2)
  means = [result["scale_mean"][str(p)] for p in topk_scale_by_batch.POSITIVES_PER_CLASS]
  assert all(a > b for a, b in zip(means, means[1:])), means
  ratio = result["ratio_96_over_64"]
  # k-NN distances in ~10 intrinsic dimensions shrink like P^(-1/10): (64/96)^0.1 = 0.96.
  assert 0.9 < ratio["min"] <= ratio["mean"] <= ratio["max"] < 1.0
  assert len(result["scale_per_class"]["64"]) == 10
