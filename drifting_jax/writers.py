"""The metric writers of a run: clu's default writer (TensorBoard) and metrics.jsonl.

Training and evaluation of a run write into the same writers, so a run's scalars
(`train/...` from the loop, `eval/...` from the evaluate and watch modes) end up in
one TensorBoard folder and one metrics.jsonl.
"""

from __future__ import annotations

import json
import os

import jax
from clu import metric_writers

from drifting_jax import paths


class JsonlWriter(metric_writers.MetricWriter):
  """Appends {"step": s, name: value, ...} lines to metrics.jsonl (process 0 only).

  A bucket cannot append to an object: there the file is kept in memory (read once,
  when a resumed run opens it) and written whole at each write, which at one line
  per logging step is a few kilobytes.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = paths.as_path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._remote_text = None
    if paths.is_url(self.path):
      self._remote_text = self.path.read_text() if self.path.exists() else ""

  def write_scalars(self, step, scalars):
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n"
    if self._remote_text is not None:
      self._remote_text += line
      self.path.write_text(self._remote_text)
      return
    with self.path.open("a") as f:
      f.write(line)

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
      JsonlWriter(paths.as_path(workdir) / "metrics.jsonl"),
  ])
