"""Tiny stand-ins for the pretrained networks the evaluation uses, built in the test run.

Nothing can be downloaded in tests, so the SD-VAE is replaced by a randomly
initialised diffusers `FlaxAutoencoderKL` of the same layout, a few channels wide,
saved the way `SDVAE.load` reads a local folder. `flax_to_pytorch_state_dict`
writes its params back in the PyTorch `AutoencoderKL` naming and layout, which
exercises the safetensors conversion path without torch.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np
from flax import traverse_util

from drifting_jax.models import vae as vae_lib

# The SD VAE's layout (4 blocks: 3 downsamplings, 4 latent channels), a few channels wide.
TINY_VAE_CONFIG = dict(vae_lib.SD_VAE_CONFIG, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
                       norm_num_groups=4, sample_size=32)

# Flax attention projections -> PyTorch names: current diffusers and the pre-0.15 ones.
_ATTENTION_NAMES = {
    "current": {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"},
    "legacy": {"query": "query", "key": "key", "value": "value", "proj_attn": "proj_attn"},
}


def random_params(abstract: Any, seed: int = 0, *, kernel_gain: float = 1.0) -> dict[str, Any]:
  """Random float32 numpy values for a tree of `jax.ShapeDtypeStruct`s.

  Kernels are fan-in scaled normals (times `kernel_gain`; sqrt(2) keeps ReLU
  networks' activations from shrinking layer by layer), norm scales and batch-norm
  variances near 1, biases and means small. Drawn with numpy because compiling
  the diffusers VAE's `init_weights` takes ~20 s of CPU; every leaf differs, so
  mixed-up weights are caught.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, spec in traverse_util.flatten_dict(abstract).items():
    shape = tuple(spec.shape)
    if path[-1] == "kernel":
      value = rng.normal(0.0, kernel_gain / np.sqrt(np.prod(shape[:-1])), shape)
    elif path[-1] in ("scale", "var"):
      value = 1.0 + 0.1 * np.abs(rng.normal(size=shape))
    else:
      value = 0.05 * rng.normal(size=shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def save_tiny_vae(folder: pathlib.Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
  """Writes a random tiny Flax VAE (config.json + msgpack) to `folder`; returns (module, params)."""
  module = vae_lib.build_module(TINY_VAE_CONFIG)
  params = random_params(vae_lib.abstract_params(module), seed)
  module.save_pretrained(str(folder), params=params)
  return module, params


def flax_to_pytorch_state_dict(params: Any, *, attention: str = "current",
                               attention_as_conv: bool = False) -> dict[str, np.ndarray]:
  """The PyTorch `AutoencoderKL` state dict that diffusers' converter maps onto `params`.

  Args:
    params: Flax params of a `FlaxAutoencoderKL`.
    attention: "current" (`to_q`, `to_k`, `to_v`, `to_out.0`) or "legacy" (`query`,
      `key`, `value`, `proj_attn`) names of the attention projections.
    attention_as_conv: store the projections as 1x1 convolutions (out, in, 1, 1), as
      some old checkpoints do.
  """
  names = _ATTENTION_NAMES[attention]
  state_dict = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(value, np.float32)
    *modules, leaf = path
    # Flax list members are `name_<i>`, PyTorch's `name.<i>`.
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    if modules[-1] in names and leaf in ("kernel", "bias"):
      modules[-1] = names[modules[-1]]
      if leaf == "kernel":
        value = value.T
        if attention_as_conv:
          value = value[:, :, None, None]
    elif leaf == "kernel":
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf in ("kernel", "scale"):
      leaf = "weight"
    state_dict[".".join(modules + [leaf])] = np.ascontiguousarray(value)
  return state_dict
