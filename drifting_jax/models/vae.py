"""The Stable Diffusion VAE (`sd-vae-ft-mse`) as the latent space of latent drifting models.

The release encodes 256x256 ImageNet images with diffusers' `FlaxAutoencoderKL` and
the `pcuenq/sd-vae-ft-mse-flax` weights (a Flax export of `stabilityai/sd-vae-ft-mse`),
and scales latents by 0.18215 so that they have roughly unit variance. `SDVAE` wraps
the same network:

  * images are NHWC in [-1, 1]; latents are NHWC, `(B, H/8, W/8, 4)` for the SD VAE;
  * `encode(images)` returns `posterior.mean * 0.18215`, or a posterior sample (what
    the release caches for training) when given an rng;
  * `decode(latents)` returns the images for `latents / 0.18215`, not clipped;
  * `encode_in_chunks` / `decode_in_chunks` stream a large host array through one
    compiled shape, which keeps 50k-sample evaluation within device memory.

Weights come from one of (see `SDVAE.load`):

  * `hf://<repo>`, default `hf://pcuenq/sd-vae-ft-mse-flax`: fetched with
    `huggingface_hub.snapshot_download` into its cache (offline: the cache only);
  * a folder with `config.json` and `diffusion_flax_model.msgpack` (a Flax diffusers
    model, e.g. a copy of `pcuenq/sd-vae-ft-mse-flax`);
  * a folder with `config.json` and `diffusion_pytorch_model.safetensors` (the
    PyTorch `stabilityai/sd-vae-ft-mse`), or that safetensors file itself. It is
    converted without torch (`convert_pytorch_state_dict`).
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from drifting_jax import errors
from drifting_jax.models.artifacts import param_mismatches

if TYPE_CHECKING:  # diffusers is imported on first use: importing it is slow.
  from diffusers.models.vae_flax import FlaxAutoencoderKL

Array = jax.Array
PathLike = Union[str, os.PathLike]

LATENT_SCALE = 0.18215
HF_SCHEME = "hf://"
FLAX_REPO = "pcuenq/sd-vae-ft-mse-flax"
PYTORCH_REPO = "stabilityai/sd-vae-ft-mse"
DEFAULT_SOURCE = HF_SCHEME + FLAX_REPO

CONFIG_FILE = "config.json"
FLAX_WEIGHTS_FILE = "diffusion_flax_model.msgpack"
PYTORCH_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# Architecture of sd-vae-ft-mse (diffusers `AutoencoderKL` config). Used when a
# weights file comes without its config.json; the weights are still checked
# leaf by leaf against it.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}

log = logging.getLogger(__name__)

# diffusers 0.37 logs a deprecation notice for Flax from the `setup` of every Flax
# submodule, i.e. dozens of times per trace. The pin is deliberate (see
# requirements.txt), so the notice is dropped from the modules the VAE uses.
_DIFFUSERS_FLAX_LOGGERS = ("diffusers.models.vae_flax", "diffusers.models.modeling_flax_utils")


class _DropFlaxDeprecationNotice(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return "Flax classes are deprecated" not in record.getMessage()


_DROP_FLAX_NOTICE = _DropFlaxDeprecationNotice()


def _flax_vae_class() -> type:
  """diffusers' `FlaxAutoencoderKL`, imported on first use with its notice silenced."""
  from diffusers.models.vae_flax import FlaxAutoencoderKL

  for name in _DIFFUSERS_FLAX_LOGGERS:
    logging.getLogger(name).addFilter(_DROP_FLAX_NOTICE)  # no-op when already added
  return FlaxAutoencoderKL


# ----------------------------------------------------------------------------- chunking


def map_in_chunks(fn: Callable[[Array, int], Any], inputs: Any, chunk_size: int, *,
                  mesh: Optional[Mesh] = None) -> Any:
  """Apply `fn(chunk, chunk_index)` to `inputs` in chunks of `chunk_size` rows; numpy result.

  Every chunk has exactly `chunk_size` rows (the last one is zero-padded), so a
  jitted `fn` compiles once; the padded rows are dropped from the result. `fn` may
  return any pytree of arrays with a leading batch axis; the result has the same
  structure with the chunks concatenated on the host. The next chunk is dispatched
  before the previous result is copied back, so transfers overlap with compute.

  With a `mesh`, each chunk is placed split along its batch axis over all the mesh's
  devices (single process), so `chunk_size` must be a multiple of `mesh.size`.
  """
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
  num_rows = np.shape(inputs)[0] if np.ndim(inputs) else 0
  if num_rows == 0:
    raise ValueError(f"nothing to process: inputs have shape {np.shape(inputs)} (need at least one row)")
  sharding = None
  if mesh is not None:
    if chunk_size % mesh.size:
      raise ValueError(f"chunk_size {chunk_size} must be a multiple of the mesh size {mesh.size}, "
                       f"so that each chunk splits evenly over the devices")
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))

  fetched, in_flight = [], None
  for index, start in enumerate(range(0, num_rows, chunk_size)):
    chunk = np.asarray(inputs[start:start + chunk_size])
    if len(chunk) < chunk_size:
      padding = np.zeros((chunk_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, padding])
    chunk = jax.device_put(chunk, sharding) if sharding is not None else jnp.asarray(chunk)
    result = fn(chunk, index)
    if in_flight is not None:
      fetched.append(jax.device_get(in_flight))
    in_flight = result
  fetched.append(jax.device_get(in_flight))
  return jax.tree.map(lambda *parts: np.concatenate(parts)[:num_rows], *fetched)


# ----------------------------------------------------------------------------- weights


def _missing_weights_message(what: str) -> str:
  return (f"{what}. The SD-VAE weights cannot be downloaded here; on a machine with network run\n"
          f"  huggingface-cli download {FLAX_REPO} {CONFIG_FILE} {FLAX_WEIGHTS_FILE} --local-dir DIR\n"
          f"(or fetch {CONFIG_FILE} and {PYTORCH_WEIGHTS_FILE} of the PyTorch model {PYTORCH_REPO}), copy DIR "
          f"here and pass it as the VAE source (SDVAE.load(DIR)). Alternatively fill the Hugging Face cache "
          f"(HF_HOME or cache_dir) with that download and use {DEFAULT_SOURCE}.")


def resolve_source(source: PathLike = DEFAULT_SOURCE, *, cache_dir: Optional[PathLike] = None) -> pathlib.Path:
  """Local folder or weights file for a VAE source; `hf://repo` goes through the HF cache."""
  text = os.fspath(source)
  if text.startswith(HF_SCHEME):
    repo_id = text[len(HF_SCHEME):].strip("/")
    if repo_id.count("/") != 1:
      raise ValueError(f"invalid VAE source {text!r}: expected {HF_SCHEME}<owner>/<repo>, e.g. {DEFAULT_SOURCE}")
    from huggingface_hub import snapshot_download  # optional network dependency, only for hf:// sources

    try:
      folder = snapshot_download(repo_id, cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                                 allow_patterns=[CONFIG_FILE, FLAX_WEIGHTS_FILE, PYTORCH_WEIGHTS_FILE])
    except Exception as e:  # offline, network and hub errors all mean "not available here"
      raise errors.MissingFileError(_missing_weights_message(
          f"could not get {repo_id} from the Hugging Face Hub or its cache "
          f"({cache_dir or 'default cache'}): {type(e).__name__}: {e}")) from e
    return pathlib.Path(folder)
  path = pathlib.Path(text).expanduser()
  if not path.exists():
    raise errors.MissingFileError(_missing_weights_message(f"VAE source {path} does not exist"))
  return path


def build_module(config: Mapping[str, Any] = SD_VAE_CONFIG, *, dtype: Any = jnp.float32) -> "FlaxAutoencoderKL":
  """A `FlaxAutoencoderKL` for a diffusers VAE config (default: the SD VAE's)."""
  return _flax_vae_class().from_config(dict(config), dtype=dtype)


def _module_from_config(folder: pathlib.Path, dtype: Any) -> "FlaxAutoencoderKL":
  if (folder / CONFIG_FILE).is_file():
    try:
      config = _flax_vae_class().load_config(os.fspath(folder))
    except Exception as e:  # diffusers wraps JSON errors in EnvironmentError
      raise ValueError(f"{folder / CONFIG_FILE} is not a readable diffusers VAE config: {e}") from e
  else:
    log.info("no %s next to the VAE weights in %s; assuming the sd-vae-ft-mse architecture", CONFIG_FILE, folder)
    config = SD_VAE_CONFIG
  return build_module(config, dtype=dtype)


def abstract_params(module: "FlaxAutoencoderKL") -> Any:
  """`jax.ShapeDtypeStruct` tree of the VAE's params; nothing is allocated."""
  return jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))


def _check_params(params: Any, module: "FlaxAutoencoderKL", where: pathlib.Path) -> None:
  problems = param_mismatches(params, abstract_params(module))
  if problems:
    raise ValueError(f"VAE weights in {where} do not match the architecture of its config "
                     f"({len(problems)} problems):\n  " + "\n  ".join(problems[:20])
                     + ("\n  ..." if len(problems) > 20 else ""))


# PyTorch names of the attention projections since diffusers 0.15 -> the Flax names
# (which are also the older PyTorch names).
_ATTENTION_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
_FLAX_ATTENTION_NAMES = frozenset(_ATTENTION_RENAMES.values())


def convert_pytorch_state_dict(state_dict: Mapping[str, Any], module: "FlaxAutoencoderKL") -> dict[str, Any]:
  """Flax params for a PyTorch diffusers `AutoencoderKL` state dict of numpy arrays.

  Key renaming and layout changes (conv OIHW -> HWIO, linear transposes, norm
  weight -> scale) are diffusers' own `rename_key_and_reshape_tensor`; only the
  torch-specific `.numpy()` step of its `convert_pytorch_state_dict_to_flax` is
  skipped. Attention projections are accepted under both their current
  (`to_q`, `to_k`, `to_v`, `to_out.0`) and older (`query`, `key`, `value`,
  `proj_attn`) names, as linear weights or 1x1 convolutions. Shapes are not
  checked here (`load_vae` does that against the module).
  """
  from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor  # slow import

  expected = traverse_util.flatten_dict(abstract_params(module))
  converted = {}
  for pt_key, tensor in state_dict.items():
    tensor = np.asarray(tensor)
    if np.issubdtype(tensor.dtype, np.floating):
      tensor = tensor.astype(np.float32)
    key = tuple(rename_key(pt_key).split("."))
    if len(key) > 1 and key[-2] in _ATTENTION_RENAMES:
      # Renamed here rather than by diffusers' rule, which asserts on shapes and
      # would turn a mismatching checkpoint into a bare AssertionError.
      key = key[:-2] + (_ATTENTION_RENAMES[key[-2]], key[-1])
    if len(key) > 1 and key[-2] in _FLAX_ATTENTION_NAMES and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
      # Old checkpoints store the projections as 1x1 convolutions (out, in, 1, 1).
      tensor = tensor[:, :, 0, 0]
    flax_key, value = rename_key_and_reshape_tensor(key, tensor, expected)
    converted[flax_key] = np.asarray(value)
  return traverse_util.unflatten_dict(converted)


def load_vae(source: PathLike = DEFAULT_SOURCE, *, cache_dir: Optional[PathLike] = None,
             dtype: Any = jnp.float32) -> tuple["FlaxAutoencoderKL", dict[str, Any]]:
  """`(module, params)` of a diffusers Flax VAE from any source `SDVAE.load` accepts.

  Params are float32 numpy arrays, checked leaf by leaf against the module built
  from the source's config; `dtype` is the module's computation dtype.
  """
  path = resolve_source(source, cache_dir=cache_dir)
  if path.is_dir():
    folder = path
    if (folder / FLAX_WEIGHTS_FILE).is_file():
      weights = folder / FLAX_WEIGHTS_FILE
    elif (folder / PYTORCH_WEIGHTS_FILE).is_file():
      weights = folder / PYTORCH_WEIGHTS_FILE
    else:
      raise errors.MissingFileError(_missing_weights_message(
          f"{folder} has neither {FLAX_WEIGHTS_FILE} (Flax, {FLAX_REPO}) nor {PYTORCH_WEIGHTS_FILE} "
          f"(PyTorch, {PYTORCH_REPO})"))
  else:
    folder, weights = path.parent, path
  module = _module_from_config(folder, dtype)

  if weights.suffix == ".safetensors":
    # safetensors only for that format of downloaded weights
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
      state_dict = load_file(os.fspath(weights))
    except (SafetensorError, OSError, ValueError) as e:
      raise ValueError(f"{weights} is not a readable safetensors file: {e}") from e
    params = convert_pytorch_state_dict(state_dict, module)
  elif weights.suffix == ".msgpack":
    data = weights.read_bytes()
    try:
      params = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types for bad bytes
      raise ValueError(f"{weights} is truncated or corrupt ({len(data)} bytes; {type(e).__name__}: {e})") from e
    if not isinstance(params, dict):
      raise ValueError(f"{weights} does not hold a params dict (got {type(params).__name__})")
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  else:
    raise ValueError(f"unsupported VAE weights file {weights}: expected a folder, a .msgpack (Flax) or a "
                     f".safetensors (PyTorch) file")
  _check_params(params, module, weights)
  return module, params


# ----------------------------------------------------------------------------- wrapper


class SDVAE:
  """Jitted encode/decode of a diffusers Flax VAE, optionally replicated over a mesh.

  Attributes:
    module: the `FlaxAutoencoderKL`.
    params: its params (replicated over `mesh` when one is given).
    scaling_factor: latents are `posterior * scaling_factor` (0.18215 for SD).
    mesh: where params live; chunked methods split batches over all its devices.
  """

  def __init__(self, module: "FlaxAutoencoderKL", params: Any, *, scaling_factor: float = LATENT_SCALE,
               mesh: Optional[Mesh] = None):
    self.module = module
    self.scaling_factor = float(scaling_factor)
    self.mesh = mesh
    params = jax.tree.map(jnp.asarray, params)
    if mesh is not None:
      params = jax.device_put(params, NamedSharding(mesh, P()))
    self.params = params
    self._encode_mean = jax.jit(lambda p, x: self._encode(p, x, None))
    self._encode_sample = jax.jit(self._encode)
    self._decode = jax.jit(self._decode_impl)

  @classmethod
  def load(cls, source: PathLike = DEFAULT_SOURCE, *, cache_dir: Optional[PathLike] = None,
           dtype: Any = jnp.float32, mesh: Optional[Mesh] = None,
           scaling_factor: float = LATENT_SCALE) -> "SDVAE":
    """Load a VAE (see the module docstring for the accepted sources).

    Args:
      source: `hf://<repo>` (default `hf://pcuenq/sd-vae-ft-mse-flax`), a folder with
        `config.json` and Flax (`diffusion_flax_model.msgpack`) or PyTorch
        (`diffusion_pytorch_model.safetensors`) weights, or a weights file (its
        folder's `config.json` is used if present, else `SD_VAE_CONFIG`).
      cache_dir: Hugging Face cache for `hf://` sources (default: the hub's).
      dtype: computation dtype; params stay float32.
      mesh: if given, params are replicated over it.
      scaling_factor: latent scale (the release's 0.18215).

    Raises:
      FileNotFoundError: the weights are not available (the message says what to
        download and where to put it).
      ValueError: unreadable files or weights that do not match the config.
    """
    module, params = load_vae(source, cache_dir=cache_dir, dtype=dtype)
    return cls(module, params, scaling_factor=scaling_factor, mesh=mesh)

  # -- shapes

  @property
  def latent_channels(self) -> int:
    return int(self.module.config.latent_channels)

  @property
  def downsampling_factor(self) -> int:
    """Image pixels per latent pixel along each side (8 for the SD VAE)."""
    return 2 ** (len(self.module.config.block_out_channels) - 1)

  def _check_images(self, images: Any) -> None:
    shape, factor = np.shape(images), self.downsampling_factor
    channels = self.module.config.in_channels
    if len(shape) != 4 or shape[-1] != channels:
      raise ValueError(f"expected NHWC images (batch, height, width, {channels}) in [-1, 1], got shape {shape}")
    if shape[1] % factor or shape[2] % factor:
      raise ValueError(f"image height and width must be multiples of {factor} for this VAE, got {shape[1]}x{shape[2]}")

  def _check_latents(self, latents: Any) -> None:
    shape = np.shape(latents)
    if len(shape) != 4 or shape[-1] != self.latent_channels:
      raise ValueError(f"expected NHWC latents (batch, height, width, {self.latent_channels}), got shape {shape}")

  # -- jitted bodies

  def _encode(self, params: Any, images: Array, rng: Optional[Array]) -> Array:
    # diffusers' Flax VAE takes NCHW images (and transposes them back internally).
    posterior = self.module.apply({"params": params}, jnp.transpose(images, (0, 3, 1, 2)),
                                  method="encode").latent_dist
    latents = posterior.mean if rng is None else posterior.sample(rng)
    return (latents * self.scaling_factor).astype(jnp.float32)

  def _decode_impl(self, params: Any, latents: Array) -> Array:
    images = self.module.apply({"params": params}, latents / self.scaling_factor, method="decode").sample
    return jnp.transpose(images, (0, 2, 3, 1)).astype(jnp.float32)

  # -- public API

  def encode(self, images: Any, rng: Optional[Array] = None) -> Array:
    """NHWC images in [-1, 1] -> scaled latents (posterior mean, or a sample with `rng`)."""
    self._check_images(images)
    images = jnp.asarray(images, jnp.float32)
    if rng is None:
      return self._encode_mean(self.params, images)
    return self._encode_sample(self.params, images, rng)

  def decode(self, latents: Any) -> Array:
    """Scaled NHWC latents -> NHWC images, nominally in [-1, 1] (not clipped)."""
    self._check_latents(latents)
    return self._decode(self.params, jnp.asarray(latents, jnp.float32))

  def encode_in_chunks(self, images: Any, chunk_size: int, rng: Optional[Array] = None) -> np.ndarray:
    """`encode` over a large host array, `chunk_size` images per call; numpy result.

    With `rng`, chunk `i` samples with `fold_in(rng, i)`, so the draw depends on
    `chunk_size` (but is reproducible for a fixed one).
    """
    self._check_images(images)
    if rng is None:
      fn = lambda chunk, _: self._encode_mean(self.params, chunk.astype(jnp.float32))
    else:
      fn = lambda chunk, i: self._encode_sample(self.params, chunk.astype(jnp.float32), jax.random.fold_in(rng, i))
    return map_in_chunks(fn, images, chunk_size, mesh=self.mesh)

  def decode_in_chunks(self, latents: Any, chunk_size: int) -> np.ndarray:
    """`decode` over a large host array, `chunk_size` latents per call; numpy result."""
    self._check_latents(latents)
    return map_in_chunks(lambda chunk, _: self._decode(self.params, chunk.astype(jnp.float32)), latents, chunk_size,
                         mesh=self.mesh)
