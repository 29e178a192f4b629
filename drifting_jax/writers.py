"""The metric writers of a run: clu's default writer (TensorBoard) and metrics.jsonl.

Training and evaluation of a run write into the same writers, so a run's scalars
(`train/...` from the loop, `eval/...` from the evaluate and watch modes) end up in
one TensorBoard folder and one metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends {"step": s, name: value, ...} lines to metrics.jsonl (process 0 only)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def write_scalars(self, step, scalars):
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(pathlib.Path(workdir) / "metrics.jsonl"),
  ])
