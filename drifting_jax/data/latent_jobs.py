"""The latent cache's two modes: `build_latents` (SD-VAE encoding) and `import_latents` (the release's cache).

Both write the sharded npz cache that `data.name=latents` trains from
(`drifting_jax.data.latents`), into `latents.out_dir` (default `<workdir>/latents`).
"""

from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from drifting_jax.data import images, latents as latents_lib, pipelines, release_cache
from drifting_jax.models import vae as vae_lib


def _latent_cache_dir(config, workdir: str) -> pathlib.Path:
  """Where build_latents and import_latents write: latents.out_dir, default <workdir>/latents."""
  return pathlib.Path(config.latents.out_dir or pathlib.Path(workdir) / "latents")


def build_latents(config, workdir: str) -> pathlib.Path:
  """Encodes a tfds image data set through the SD-VAE into a sharded latent cache.

  As the release does, each image is stored as one posterior sample times 0.18215
  (`latents.posterior="sample"`; "mean" stores the posterior mean) and, with
  `latents.flip`, so is its mirror image, which training then draws half of the
  time. The draws are a pure function of (latents.seed, shard), so a resumed build
  writes what an uninterrupted one would.

  Each host encodes its share of the images; shard `i` of host `p` is global shard
  `i * process_count + p`, written atomically, so a re-run skips finished shards.
  Output: config.latents.out_dir (default workdir/latents), read by data.name=latents.
  """
  lc = config.latents
  if lc.posterior not in ("sample", "mean"):
    raise ValueError(f"latents.posterior must be 'sample' or 'mean', got {lc.posterior!r}")
  out_dir = _latent_cache_dir(config, workdir)
  vae = vae_lib.SDVAE.load(lc.vae_source)
  factor = vae.downsampling_factor
  size = int(lc.image_size)
  pi, pc = jax.process_index(), jax.process_count()
  # process_count is part of the writer's spec: shard numbers depend on it, so a
  # resume on another number of hosts must be refused, not mixed in.
  writer = latents_lib.LatentCacheWriter(
      out_dir, sample_shape=(size // factor, size // factor, vae.latent_channels), dtype=lc.dtype,
      shard_size=int(lc.batch_size),
      metadata={"source": lc.dataset, "split": lc.split, "image_size": size, "vae": lc.vae_source,
                "scaling_factor": vae.scaling_factor, "pad_to": int(lc.pad_to), "process_count": pc,
                "posterior": lc.posterior, "seed": int(lc.seed)},
      flipped=bool(lc.flip))
  done = writer.completed_shards()
  batches = pipelines.image_batches(lc.dataset, lc.split, data_dir=config.data.data_dir or None,
                                    batch_size=int(lc.batch_size), image_size=size, process_index=pi,
                                    process_count=pc, pad_to=int(lc.pad_to), to_rgb=True)
  written = 0
  for i, batch in enumerate(batches):
    shard = i * pc + pi
    if shard in done:
      continue
    valid = np.asarray(batch["valid"], bool)
    pixels = images.uint8_to_model(batch["image"])
    # One key per shard and view: the same draws however the build is split or resumed.
    keys = jax.random.split(jax.random.fold_in(jax.random.key(int(lc.seed)), shard))
    encode = lambda x, key: np.asarray(vae.encode_in_chunks(
        x, int(lc.batch_size), rng=key if lc.posterior == "sample" else None))[valid]
    flipped = encode(pixels[:, :, ::-1], keys[1]) if lc.flip else None
    writer.write_shard(shard, encode(pixels, keys[0]), np.asarray(batch["label"], np.int32)[valid], flipped)
    written += 1
    if written % 10 == 0:
      logging.info("host %d: %d shards written", pi, written)
  multihost_utils.sync_global_devices("build_latents_done")
  if pi == 0:
    writer.finalize(num_classes=int(config.data.num_classes))
    print(f"latent cache written to {out_dir}")
  return out_dir


def import_latents(config, workdir: str) -> pathlib.Path:
  """Converts the release's per-image .pt latent cache (latents.release_cache) into our npz cache.

  Runs on process 0 only (it is file conversion); the others wait. Output:
  config.latents.out_dir (default workdir/latents), flipped, read by data.name=latents.
  """
  lc = config.latents
  if not lc.release_cache:
    raise ValueError("--mode=import_latents needs --config.latents.release_cache=<the release's cache root, "
                     "holding train/<class>/*.pt>")
  out_dir = _latent_cache_dir(config, workdir)
  if jax.process_index() == 0:
    index = release_cache.import_release_cache(lc.release_cache, out_dir, split=lc.split,
                                               shard_size=int(lc.batch_size), dtype=lc.dtype,
                                               num_classes=int(config.data.num_classes))
    print(f"imported {index['num_examples']} latents of {lc.release_cache}/{lc.split} into {out_dir}")
  multihost_utils.sync_global_devices("import_latents_done")
  return out_dir
