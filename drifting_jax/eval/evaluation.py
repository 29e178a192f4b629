"""Evaluation of a generator: the `evaluate` and `watch` modes.

Every mode reads the same config as the training run it serves, so an eval job
beside a training job needs only the training run's config file and workdir.

Evaluation of a generator, per CFG scale in `config.eval.cfg_scales` (at noise
temperature `sample.temperature`) and per noise temperature in `eval.temperatures`
(at `sample.cfg_scale`):

  samples (each host its share of the labels)
    -> [latent data sets (`data.sources`): SD-VAE decode in chunks]
    -> the feature spaces the evaluators of `eval.evaluators` read (e.g. the FID
       InceptionV3), and the uint8 pixels where an evaluator reads those (the
       project's digit classifier), gathered to every host
    -> process 0: each evaluator's metrics (`eval.evaluators`)
    -> eval/step_<N>.json, eval/step_<N>_cfg<s>[_t<T>].png, and `eval/...` scalars in the
       run's clu writers (TensorBoard + metrics.jsonl).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from drifting_jax import checkpointing, paths, writers
from drifting_jax.data import images
from drifting_jax.eval import evaluators, sampling


def _host_labels(config) -> tuple[np.ndarray, np.ndarray]:
  """(all labels, this host's labels): samples_per_class of every class, split over hosts."""
  labels = np.repeat(np.arange(config.data.num_classes, dtype=np.int32), int(config.eval.samples_per_class))
  return labels, np.array_split(labels, jax.process_count())[jax.process_index()]


def _gather_rows(local: np.ndarray, counts: list[int]) -> np.ndarray:
  """Concatenation over processes of per-host arrays with known, possibly unequal, row counts."""
  if jax.process_count() == 1:
    return local
  width = max(counts)
  padded = np.zeros((width, *local.shape[1:]), local.dtype)
  padded[: len(local)] = local
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, width, ...]
  return np.concatenate([gathered[p, :n] for p, n in enumerate(counts)])


def evaluate_generator(config, workdir: str, module, params, step: Optional[int], *,
                       suite: Optional[evaluators.Suite] = None) -> dict[str, Any]:
  """Metrics of one generator; process 0 writes eval/step_<N>.json.

  Two one-knob sweeps around the sampling setting: every CFG scale of
  `eval.cfg_scales` at noise temperature `sample.temperature` (`results["cfg"]`),
  and every temperature of `eval.temperatures` at `sample.cfg_scale`
  (`results["temperature"]`). Every setting draws the same noise (`sample.seed`).
  """
  suite = suite or evaluators.Suite(config, workdir)
  all_labels, host_labels = _host_labels(config)
  counts = [len(x) for x in np.array_split(all_labels, jax.process_count())]
  first_index = sum(counts[:jax.process_index()])
  # Each host samples its own labels on its own devices (alone, or in one program over
  # every host's chips: eval.sampling_layout); the batch size is the list's, not the
  # host's share, so that every sample's noise is the same on any process count.
  params = sampling.layout_params(params, config.eval.sampling_layout)
  batch_size = min(int(config.eval.batch_size), max(1, len(all_labels)))
  eval_dir = paths.as_path(workdir) / "eval"
  tag = f"step_{step}" if step is not None else "source"
  sample_temperature = float(config.sample.temperature)
  sample_cfg = float(config.sample.cfg_scale)
  results: dict[str, Any] = {"step": step, "samples_per_class": int(config.eval.samples_per_class),
                             "sample_cfg_scale": sample_cfg, "sample_temperature": sample_temperature,
                             "cfg": {}, "temperature": {}}

  def metrics_at(cfg: float, temperature: float, grid_name: str) -> dict[str, Any]:
    start = time.perf_counter()
    samples = sampling.generate(module, params, host_labels, cfg, seed=int(config.sample.seed),
                                batch_size=batch_size, temperature=temperature, first_index=first_index)
    pixels = suite.to_pixels(samples)
    features = {space: {k: _gather_rows(v, counts) for k, v in feats.items()}
                for space, feats in suite.features(pixels).items()}
    # uint8, as the samples are saved and shown; gathered where an evaluator reads them.
    pixels_uint8 = images.model_to_uint8(pixels)
    gathered_uint8 = _gather_rows(pixels_uint8, counts) if suite.needs_pixels else None
    metrics: dict[str, Any] = {}
    if jax.process_index() == 0:
      metrics = suite.metrics(pixels=None if gathered_uint8 is None else images.uint8_to_model(gathered_uint8),
                              labels=all_labels, features=features)
      metrics["seconds"] = time.perf_counter() - start
      eval_dir.mkdir(parents=True, exist_ok=True)
      shown, shown_labels = ((gathered_uint8, all_labels) if gathered_uint8 is not None
                             else (pixels_uint8, host_labels))
      _save_grid(eval_dir / grid_name, shown, shown_labels, config.data.num_classes)
    return metrics

  # The temperature is in a grid's name only where it is not 1 (older runs' names stay valid).
  t_suffix = "" if sample_temperature == 1.0 else f"_t{sample_temperature:g}"
  for cfg in config.eval.cfg_scales:
    results["cfg"][f"{cfg:g}"] = metrics_at(float(cfg), sample_temperature, f"{tag}_cfg{cfg:g}{t_suffix}.png")
  cfg_key = f"{sample_cfg:g}"
  for temperature in config.eval.temperatures:
    if float(temperature) == sample_temperature and cfg_key in results["cfg"]:
      # The sampling setting itself, already measured by the CFG sweep (same noise).
      results["temperature"][f"{temperature:g}"] = results["cfg"][cfg_key]
      continue
    results["temperature"][f"{temperature:g}"] = metrics_at(
        sample_cfg, float(temperature), f"{tag}_cfg{sample_cfg:g}_t{temperature:g}.png")
  if jax.process_index() == 0:
    (eval_dir / f"{tag}.json").write_text(json.dumps(_jsonable(results), indent=2))
  return results


def _save_grid(path: pathlib.Path, pixels: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 10):
  """Up to 16 classes, one row each, of `per_row` samples (fewer if every class has fewer)."""
  classes = np.unique(labels)[: min(num_classes, 16)]
  if not len(classes) or pixels.shape[-1] not in (1, 3):
    return
  per_row = min(per_row, max(int(np.sum(labels == c)) for c in classes))
  rows = [pixels[labels == c][:per_row] for c in classes]
  rows = [r for r in rows if len(r) == per_row]
  images.save_png(path, images.grid(np.concatenate(rows), rows=len(rows)))


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x


def _log_scalars(workdir: str, step: int, results: dict[str, Any]) -> None:
  scalars = {}
  sweeps = [(f"cfg{cfg}", m) for cfg, m in results["cfg"].items()]
  sweeps += [(f"temperature{t}", m) for t, m in results.get("temperature", {}).items()]
  for prefix, metrics in sweeps:
    for name, value in metrics.items():
      if isinstance(value, (int, float)) and np.isfinite(value):
        scalars[f"eval/{prefix}/{name}"] = float(value)
  writer = writers.make_writer(workdir)
  writer.write_scalars(step, scalars)
  writer.flush()


def evaluate(config, workdir: str) -> dict[str, Any]:
  """Evaluates eval.source, or the checkpoint eval.step, or the latest checkpoint."""
  module, params, step = sampling.load_generator(config, workdir)
  results = evaluate_generator(config, workdir, module, params, step)
  if jax.process_index() == 0:
    if step is not None:
      _log_scalars(workdir, step, results)
    print(json.dumps(_jsonable(results), indent=2))
  return results


def watch(config, workdir: str) -> list[int]:
  """Evaluates every new checkpoint of a training workdir once; restartable.

  Evaluated steps are recorded in eval/evaluated.json (written after each
  evaluation), so a restarted watcher continues where it stopped. Stops after the
  final step (train.total_steps) or when no new checkpoint appears for
  eval.watch_timeout_s seconds.
  """
  record = paths.as_path(workdir) / "eval" / "evaluated.json"
  done = set(json.loads(record.read_text())) if record.exists() else set()
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  suite = None
  last_new = time.monotonic()
  evaluated = []
  while True:
    ckpt.reload()
    pending = [s for s in ckpt.all_steps() if s not in done]
    for step in pending:
      suite = suite or evaluators.Suite(config, workdir)
      try:
        module, params, _ = sampling.load_generator(config, workdir, step=step)
      except checkpointing.CheckpointError:
        # The training job prunes old checkpoints (checkpoint.keep_last): one listed
        # a moment ago may be gone by the time it is read. Anything else is an error.
        ckpt.reload()
        if step in ckpt.all_steps():
          raise
        logging.warning("checkpoint %d was deleted before it could be evaluated; skipped", step)
        continue
      results = evaluate_generator(config, workdir, module, params, step, suite=suite)
      done.add(step)
      evaluated.append(step)
      if jax.process_index() == 0:
        _log_scalars(workdir, step, results)
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(done)))
        tmp.replace(record)
      last_new = time.monotonic()
    if int(config.train.total_steps) in done:
      return evaluated
    if time.monotonic() - last_new > float(config.eval.watch_timeout_s):
      logging.info("no new checkpoint for %.0f s: watcher stops", config.eval.watch_timeout_s)
      return evaluated
    time.sleep(float(config.eval.watch_poll_s))
