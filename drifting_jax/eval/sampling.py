"""Generator loading for evaluation, and the `sample` mode (samples.npz + PNG grid).

A generator comes from an artifact (`eval.source`) or from a training checkpoint,
of which only the EMA parameters are restored (a partial restore whose target is
built from the generator model alone: no optimizer, train state or feature network).
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np

from drifting_jax import checkpointing, partitioning, paths
from drifting_jax.data import images
from drifting_jax.models import artifacts, generator as generator_lib


def load_generator(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(module, EMA params, step or None) to evaluate.

  Source, in order: `config.eval.source` (an artifact folder or hf://NAME); the
  checkpoint at `step` (or config.eval.step >= 0); the latest checkpoint of the
  workdir. A missing or corrupt checkpoint is a clear error.
  """
  source = config.eval.source
  if source:
    module, params, _ = artifacts.load(source, kind="gen")
    return module, params, None
  step = config.eval.step if step is None and config.eval.step >= 0 else step
  directory = paths.as_path(workdir) / "checkpoints"
  # Checked first: opening a Checkpointer creates the folder, and a mistyped
  # workdir should not be left behind as an empty run.
  ckpt = checkpointing.Checkpointer(workdir, async_save=False) if directory.is_dir() else None
  if ckpt is None or ckpt.latest_step() is None:
    raise checkpointing.CheckpointError(
        f"no checkpoint in {directory}: train first, or set --config.eval.source to a params_ema "
        f"folder or hf://NAME")
  # Only the EMA parameters are read: their structure comes from the generator alone,
  # so neither the optimizer, the training state nor the feature network is built.
  model_config = generator_lib.model_config_from_run(config)
  module = generator_lib.build_module(model_config)
  mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp)
  abstract = {"ema_params": artifacts.abstract_params("gen", model_config)}
  # The same path names as in the train state, so each parameter gets its training sharding.
  shardings = partitioning.tree_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  restored_step, restored = ckpt.restore_subtree(abstract, step)
  return module, restored["ema_params"], restored_step


def generate(module, params, labels: np.ndarray, cfg_scale: float, seed: int, batch_size: int = 500,
             temperature: float = 1.0) -> np.ndarray:
  """fp32 samples for `labels`, in batches of one compiled shape (last batch padded).

  The noise depends on (seed, batch index) only, so samples at different
  `temperature`s (the Gaussian noise's scale) are the same draws, scaled.
  """
  out = []
  key = jax.random.PRNGKey(seed)
  for i, start in enumerate(range(0, len(labels), batch_size)):
    chunk = labels[start:start + batch_size]
    padded = np.pad(chunk, (0, batch_size - len(chunk)))
    samples = generator_lib.sample(module, params, padded, cfg_scale, rng=jax.random.fold_in(key, i),
                                   temperature=temperature)
    out.append(np.asarray(samples)[: len(chunk)])
  return np.concatenate(out)


def sample_to_files(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """Writes samples.npz (images or latents, labels) and a PNG grid; returns the folder."""
  module, params, step = load_generator(config, workdir)
  classes = np.asarray(config.sample.classes or range(config.data.num_classes), np.int32)
  labels = np.repeat(classes, config.sample.per_class)
  samples = generate(module, params, labels, float(config.sample.cfg_scale), int(config.sample.seed),
                     batch_size=min(int(config.eval.batch_size), len(labels)),
                     temperature=float(config.sample.temperature))
  out = paths.as_path(workdir)
  if jax.process_index() == 0:
    if samples.shape[-1] in (1, 3):
      pixels = images.model_to_uint8(samples)
      paths.save_npz(out / "samples.npz", {"images": pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
                                           "labels": labels})
      per_row = min(config.sample.per_class, 20)
      shown = np.concatenate([pixels[labels == c][:per_row] for c in classes])
      images.save_png(out / "samples.png", images.grid(shown, rows=len(classes)))
    else:
      paths.save_npz(out / "samples.npz", {"latents": samples, "labels": labels})
  return out


def sample_mode(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """The `sample` mode: `sample_to_files`, and where the files went (process 0)."""
  path = sample_to_files(config, workdir)
  if jax.process_index() == 0:
    print(f"samples written to {path}")
  return path
