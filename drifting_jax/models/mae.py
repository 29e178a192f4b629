"""Latent-MAE feature encoder of the drifting model, compatible with the official release.

The drifting loss is computed in the feature space of a ResNet that was pretrained as
a masked autoencoder (MAE) on the training data itself (SD-VAE latents for ImageNet):

  * encoder: a 3x3 stem conv + GroupNorm + ReLU (`conv1`), then four stages of basic
    residual blocks (`layer1..4`; stage i > 0 halves the resolution and has
    base_channels * 2**i channels), each stage followed by a GroupNorm;
  * decoder: a UNet that upsamples (bilinear) from the last stage back to the stem's
    resolution, concatenating the encoder's maps as skips, and predicts the input;
  * head: a linear classifier on the mean-pooled last stage.

Pretraining (`pretraining_loss`) hides random patch_size x patch_size squares of the
input and regresses them (mean squared error over the hidden cells only), optionally
mixed with the classification loss (`lambda_cls`, used by the release only at the
end of its 640-channel runs).

The drifting loss uses the *encoder* only, through `activations`: every stage's map
(and optionally every k-th residual block's), each as all its spatial tokens plus
global and per-patch mean/std summaries, and the input's RMS (`norm_x`).

Compatibility: `MAEResNet(**model_config)` takes the release's `model_config` (its
`metadata.json`) and builds exactly its parameter tree, so the release's
`ema_params.msgpack` loads unchanged and reproduces its activations. Submodule names
are fixed by that format.

Precision: parameters are fp32. With `use_bf16`, convolutions and activations run in
bf16 (GroupNorm statistics in fp32), as in the release; `activations` returns every
group as fp32 and the pretraining loss is evaluated in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Sequence

import einops
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from drifting_jax import errors
from drifting_jax.models import layers as layers_lib

Array = jax.Array
Dtype = Any

# Spatial side of the example input (in cells of the patched input) used to initialise.
_EXAMPLE_SIDE = 32
# The decoder normalises concatenated skips with this many groups (fixed in the release).
_CONCAT_NORM_GROUPS = 32
_STD_EPS = 1e-6


def num_groups(channels: int, max_groups: int = 32) -> int:
  """Largest group count <= max_groups that divides `channels` (GroupNorm layout)."""
  groups = min(max_groups, channels)
  while groups > 1 and channels % groups:
    groups -= 1
  return max(groups, 1)


def _group_norm(channels: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups(channels), dtype=dtype, name=name)


class ResidualBlock(nn.Module):
  """Two 3x3 convs (GroupNorm, ReLU) plus a skip; the skip is a strided 1x1 conv +
  GroupNorm when the block changes resolution or width."""

  filters: int
  stride: int = 1
  dropout_prob: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    conv = functools.partial(nn.Conv, self.filters, kernel_size=(3, 3), padding=1, use_bias=False,
                             dtype=self.dtype)
    y = conv(strides=self.stride, name="conv1")(x)
    y = nn.relu(_group_norm(self.filters, self.dtype, "gn1")(y))
    if self.dropout_prob > 0:
      y = nn.Dropout(self.dropout_prob)(y, deterministic=not train)
    y = conv(strides=1, name="conv2")(y)
    y = _group_norm(self.filters, self.dtype, "gn2")(y)
    skip = x
    if self.stride != 1 or x.shape[-1] != self.filters:
      skip = nn.Conv(self.filters, kernel_size=(1, 1), strides=self.stride, use_bias=False, dtype=self.dtype,
                     name="proj_conv")(x)
      skip = _group_norm(self.filters, self.dtype, "proj_gn")(skip)
    return nn.relu(skip + y)


class ResNetStage(nn.Module):
  """`num_blocks` residual blocks (`layers_{j}`); only the first one is strided.

  `remat_policy` (`layers.REMAT_POLICIES`) rematerialises each block in the backward
  pass; names and parameters are unchanged.
  """

  filters: int
  num_blocks: int
  stride: int
  dropout_prob: float = 0.0
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> list[Array]:
    """Returns the output of every block, the last one being the stage's output."""
    block_cls = layers_lib.remat(ResidualBlock, self.remat_policy)
    outputs = []
    for j in range(self.num_blocks):
      x = block_cls(self.filters, stride=self.stride if j == 0 else 1, dropout_prob=self.dropout_prob,
                        dtype=self.dtype, name=f"layers_{j}")(x, train=train)
      outputs.append(x)
    return outputs


class ResNetEncoder(nn.Module):
  """Stem + four residual stages with a GroupNorm after each stage.

  Returns `(maps, blocks)`: `maps` = {"conv1", "layer1", ..., "layer4"} (the stem's
  and every stage's normalised output, `[B, H_i, W_i, C_i]`) and `blocks` =
  {"layer{i}": [output of each block, before the stage's norm]}.
  """

  base_channels: int
  layers: tuple[int, ...]
  dropout_prob: float = 0.0
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> tuple[dict[str, Array], dict[str, list[Array]]]:
    x = nn.Conv(self.base_channels, kernel_size=(3, 3), padding=1, use_bias=False, dtype=self.dtype,
                name="conv1")(x)
    x = nn.relu(_group_norm(self.base_channels, self.dtype, "gn1")(x))
    maps, blocks = {"conv1": x}, {}
    for i, num_blocks in enumerate(self.layers):
      filters = self.base_channels * 2**i
      outputs = ResNetStage(filters, num_blocks, stride=1 if i == 0 else 2, dropout_prob=self.dropout_prob,
                            remat_policy=self.remat_policy, dtype=self.dtype, name=f"stages_{i}")(x, train=train)
      name = f"layer{i + 1}"
      blocks[name] = outputs
      x = _group_norm(filters, self.dtype, f"{name}_norm")(outputs[-1])
      maps[name] = x
    return maps, blocks


class ConvNormReLU(nn.Module):
  """Bias-free conv, GroupNorm, ReLU."""

  channels: int
  kernel: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.channels, kernel_size=(self.kernel, self.kernel), padding=self.kernel // 2, use_bias=False,
                dtype=self.dtype, name="conv")(x)
    return nn.relu(_group_norm(self.channels, self.dtype, "gn")(x))


class UpBlock(nn.Module):
  """Bilinear upsampling to the skip's resolution, concatenation, two ConvNormReLUs."""

  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skip: Array) -> Array:
    x = jax.image.resize(x, (x.shape[0], skip.shape[1], skip.shape[2], x.shape[3]), method="bilinear")
    x = jnp.concatenate([x, skip], axis=-1)
    x = nn.GroupNorm(num_groups=_CONCAT_NORM_GROUPS, dtype=self.dtype, name="concat_norm_fn")(x)
    x = ConvNormReLU(self.channels, dtype=self.dtype, name="proj")(x)
    return ConvNormReLU(self.channels, dtype=self.dtype, name="refine")(x)


class UNetDecoder(nn.Module):
  """Bridge on the last stage, then up-blocks through layer3, layer2, layer1 and the stem."""

  base_channels: int
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Mapping[str, Array]) -> Array:
    c = self.base_channels
    x = ConvNormReLU(8 * c, dtype=self.dtype, name="bridge")(maps["layer4"])
    x = UpBlock(4 * c, dtype=self.dtype, name="up43")(x, maps["layer3"])
    x = UpBlock(2 * c, dtype=self.dtype, name="up32")(x, maps["layer2"])
    x = UpBlock(c, dtype=self.dtype, name="up21")(x, maps["layer1"])
    x = UpBlock(c, dtype=self.dtype, name="up10")(x, maps["conv1"])
    return nn.Conv(self.out_channels, kernel_size=(1, 1), dtype=self.dtype, name="head")(x)


def patchify(x: Array, size: int) -> Array:
  """`[B, H, W, C] -> [B, H/size, W/size, size*size*C]` (space-to-depth; identity for 1)."""
  if size == 1:
    return x
  return einops.rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=size, q=size)


class MAEResNet(nn.Module):
  """The release's `MAEResNetJAX`: ResNet encoder, UNet decoder and a class head.

  The fields are the release's `model_config` keys. `input_patch_size` > 1 turns
  p x p pixel patches into channels before the stem (the release's pixel-space
  MAE); `patch_size` is the side of the masked squares, in cells of that patched
  input.

  `remat_policy` is not the release's: how the encoder's residual blocks are
  rematerialised in a backward pass (`layers.REMAT_POLICIES`; runtime-only, left out
  of stored artifacts). `features.mae_features(remat_policy=...)` sets it
  (`feature.remat_policy`) for the backward pass from the generated samples'
  features to the samples.

  Call with images `x [B, H, W, in_channels]` and optionally a `mask [B, H', W', 1]`
  over the patched input (1 = hidden; see `draw_mask`): hidden cells are zeroed
  before encoding. Returns `{"reconstruction": [B, H', W', in_channels *
  input_patch_size**2], "logits": [B, num_classes]}` in the compute dtype.
  """

  num_classes: int = 1000
  in_channels: int = 3
  base_channels: int = 64
  patch_size: int = 4
  dropout_prob: float = 0.0
  layers: tuple[int, ...] = (2, 2, 2, 2)
  use_bf16: bool = False
  input_patch_size: int = 1
  remat_policy: str = "none"

  def __post_init__(self):
    _check_config(self)
    super().__post_init__()

  @property
  def dtype(self) -> Dtype:
    """Compute dtype of activations (parameters stay fp32)."""
    return jnp.bfloat16 if self.use_bf16 else jnp.float32

  @property
  def patched_channels(self) -> int:
    return self.in_channels * self.input_patch_size**2

  def setup(self):
    self.encoder = ResNetEncoder(self.base_channels, tuple(self.layers), dropout_prob=self.dropout_prob,
                                 remat_policy=self.remat_policy, dtype=self.dtype)
    self.decoder = UNetDecoder(self.base_channels, self.patched_channels, dtype=self.dtype)
    self.fc = nn.Dense(self.num_classes, dtype=self.dtype)

  def prepare(self, x: Array) -> Array:
    """Checked input in the compute dtype, pixel patches folded into channels."""
    return patchify(_check_images(x, self).astype(self.dtype), self.input_patch_size)

  def encode(self, x: Array, *, train: bool = False) -> tuple[dict[str, Array], dict[str, list[Array]]]:
    """Encoder maps and block outputs of raw images (see `ResNetEncoder`)."""
    return self.encoder(self.prepare(x), train=train)

  def __call__(self, x: Array, mask: Optional[Array] = None, *, train: bool = False) -> dict[str, Array]:
    x = self.prepare(x)
    if mask is not None:
      if mask.shape != x.shape[:3] + (1,):
        raise ValueError(f"mask must have shape {x.shape[:3] + (1,)} (the patched input's grid), got {mask.shape}")
      x = x * (1.0 - mask.astype(self.dtype))
    maps, _ = self.encoder(x, train=train)
    logits = self.fc(jnp.mean(maps["layer4"], axis=(1, 2)))
    return {"reconstruction": self.decoder(maps), "logits": logits}


# -----------------------------------------------------------------------------
# Input checks. Shapes are static, so they are checked even under jit; class ids
# only when they are concrete (outside jit).
# -----------------------------------------------------------------------------


def _check_config(module: MAEResNet) -> None:
  problems = []
  for field in ("num_classes", "in_channels", "base_channels", "patch_size", "input_patch_size"):
    if int(getattr(module, field)) < 1:
      problems.append(f"{field} must be >= 1, got {getattr(module, field)}")
  if len(module.layers) != 4 or any(int(n) < 1 for n in module.layers):
    problems.append(f"layers must be four block counts >= 1 (one per stage), got {module.layers}")
  if module.base_channels % 32:
    # The decoder concatenates skips into 12, 6, 3 and 2 x base_channels channels
    # and is normalised with 32 groups.
    problems.append(f"base_channels={module.base_channels} must be a multiple of 32 (the decoder's "
                    f"GroupNorm over concatenated skips uses {_CONCAT_NORM_GROUPS} groups)")
  if not 0.0 <= module.dropout_prob < 1.0:
    problems.append(f"dropout_prob must be in [0, 1), got {module.dropout_prob}")
  if module.remat_policy not in layers_lib.REMAT_POLICIES:
    problems.append(f"remat_policy must be one of {', '.join(layers_lib.REMAT_POLICIES)}, got {module.remat_policy!r}")
  if problems:
    raise errors.UsageError("invalid MAEResNet config: " + "; ".join(problems))


def _check_images(x: Any, module: MAEResNet) -> Array:
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"MAE inputs must be [batch, height, width, channels], got shape {x.shape}")
  if x.shape[-1] != module.in_channels:
    raise ValueError(f"MAE inputs must have in_channels={module.in_channels} channels, got shape {x.shape}")
  p = module.input_patch_size
  if x.shape[1] % p or x.shape[2] % p:
    raise ValueError(f"MAE input height and width must be multiples of input_patch_size={p}, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"MAE inputs must be floating point, got dtype {x.dtype}")
  return x


def _check_labels(labels: Any, batch_size: int, num_classes: int) -> Array:
  labels = jnp.asarray(labels)
  if labels.shape != (batch_size,):
    raise ValueError(f"labels must have shape [batch]=({batch_size},), got {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
  if not isinstance(labels, jax.core.Tracer) and labels.size:
    values = np.asarray(labels)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
      raise ValueError(f"class ids must lie in [0, {num_classes}) (num_classes={num_classes}), got "
                       f"out-of-range ids {sorted(set(bad.tolist()))[:10]}")
  return labels


# -----------------------------------------------------------------------------
# Construction.
# -----------------------------------------------------------------------------

CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(MAEResNet) if f.name not in ("parent", "name"))
# Fields that choose how the network is computed, not what it is; artifact writers
# leave them out of the stored model_config (the release's loader does not know them).
RUNTIME_ONLY_KEYS = ("remat_policy",)

# Named sizes; the release's runs all use patch_size 2 and blocks (3, 4, 6, 3).
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # The release's latent MAE of the ImageNet ablations (hf://mae_latent_256, 431M params).
    "latent-256": dict(num_classes=1000, in_channels=4, base_channels=256, patch_size=2, dropout_prob=0.0,
                       layers=(3, 4, 6, 3), use_bf16=True, input_patch_size=1),
    # Its state-of-the-art latent and pixel MAEs (640 channels; pixels as 8x8 patches).
    "latent-640": dict(num_classes=1000, in_channels=4, base_channels=640, patch_size=2, dropout_prob=0.0,
                       layers=(3, 4, 6, 3), use_bf16=True, input_patch_size=1),
    "pixel-640": dict(num_classes=1000, in_channels=3, base_channels=640, patch_size=2, dropout_prob=0.0,
                      layers=(3, 4, 6, 3), use_bf16=True, input_patch_size=8),
    # CPU-sized latent MAE for tests and smoke runs (fp32: bf16 is slow on CPU).
    "tiny": dict(num_classes=1000, in_channels=4, base_channels=32, patch_size=2, dropout_prob=0.0,
                 layers=(1, 1, 1, 1), use_bf16=False, input_patch_size=1),
}


def model_config_for(name: str, **overrides: Any) -> dict[str, Any]:
  """The `model_config` of a named size, with `overrides` applied on top."""
  if name not in NAMED_CONFIGS:
    raise errors.UsageError(f"unknown MAE config {name!r}; known names: {sorted(NAMED_CONFIGS)}")
  unknown = sorted(set(overrides) - set(CONFIG_KEYS))
  if unknown:
    raise errors.UsageError(f"unknown MAE config keys {unknown}; valid keys: {sorted(CONFIG_KEYS)}")
  return {**NAMED_CONFIGS[name], **overrides}


def build_module(model_config: Mapping[str, Any]) -> MAEResNet:
  """`MAEResNet` from a `model_config` dict (e.g. an artifact's metadata).

  A missing `num_classes` means 1000, as in the release's loader.
  """
  unknown = sorted(set(model_config) - set(CONFIG_KEYS))
  if unknown:
    raise errors.UsageError(f"unknown MAE config keys {unknown}; valid keys: {sorted(CONFIG_KEYS)}")
  config = dict(model_config)
  if "layers" in config:
    # JSON gives a list; module fields must be hashable (modules are static jit args).
    config["layers"] = tuple(int(n) for n in config["layers"])
  return MAEResNet(**config)


def example_inputs(model_config: Mapping[str, Any], batch_size: int = 1) -> tuple[tuple, dict]:
  """Positional and keyword arguments for `module.init` (only a 'params' rng needed)."""
  module = build_module(model_config)
  side = _EXAMPLE_SIDE * module.input_patch_size
  return (jnp.zeros((batch_size, side, side, module.in_channels), jnp.float32),), {"train": False}


def init_params(module: MAEResNet, rng: Array, image_shape: Sequence[int] = ()) -> Any:
  """Freshly initialised params (the tree does not depend on `image_shape`)."""
  side = _EXAMPLE_SIDE * module.input_patch_size
  shape = tuple(image_shape) or (side, side, module.in_channels)
  # One compiled program: op by op, every initializer of every leaf is its own compile.
  return jax.jit(lambda key: module.init({"params": key}, jnp.zeros((1, *shape), jnp.float32))["params"])(rng)


# -----------------------------------------------------------------------------
# Feature extraction for the drifting loss.
# -----------------------------------------------------------------------------


def _std(x: Array, axis, keepdims: bool = False) -> Array:
  """sqrt(var + 1e-6) in fp32 (the eps keeps gradients finite on constant regions)."""
  x = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x - jnp.mean(x, axis=axis, keepdims=True)), axis=axis, keepdims=keepdims)
  return jnp.sqrt(jnp.maximum(var, 0.0) + _STD_EPS)


def _map_features(name: str, feat: Array, patch_mean_size: Sequence[int], patch_std_size: Sequence[int],
                  use_mean: bool, use_std: bool) -> dict[str, Array]:
  """Groups of one feature map `[B, H, W, C]`: tokens, global and per-patch mean/std."""
  _, h, w, _ = feat.shape
  out = {name: einops.rearrange(feat, "b h w c -> b (h w) c")}
  if use_mean:
    out[f"{name}_mean"] = jnp.mean(feat, axis=(1, 2))[:, None, :]
  if use_std:
    out[f"{name}_std"] = _std(feat, axis=(1, 2))[:, None, :]
  # Sizes that do not tile the map are skipped (e.g. 4x4 patches of a 2x2 map).
  patches = lambda s: einops.rearrange(feat, "b (h p) (w q) c -> b (h w) (p q) c", p=s, q=s)
  for size in patch_mean_size:
    if h % size == 0 and w % size == 0:
      out[f"{name}_mean_{size}"] = jnp.mean(patches(size), axis=2)
  for size in patch_std_size:
    if h % size == 0 and w % size == 0:
      out[f"{name}_std_{size}"] = _std(patches(size), axis=2)
  return out


def _block_step(every_k_block: Any) -> int:
  """Every how many blocks a block's output is a feature; 0 for none."""
  if every_k_block is None:
    return 0
  value = float(every_k_block)
  if math.isinf(value) or math.isnan(value) or value < 1:
    return 0
  return int(value)


def _activations(module: MAEResNet, x: Array, patch_mean_size, patch_std_size, use_std, use_mean,
                 every_k_block) -> dict[str, Array]:
  x = module.prepare(x)
  maps, blocks = module.encoder(x, train=False)
  # Insertion order is the release's: norm_x, stage maps, then block outputs.
  out = {"norm_x": jnp.sqrt(jnp.mean(jnp.square(x), axis=(1, 2)) + 1e-6)[:, None, :]}
  summaries = functools.partial(_map_features, patch_mean_size=patch_mean_size, patch_std_size=patch_std_size,
                                use_mean=use_mean, use_std=use_std)
  for name, feat in maps.items():
    out.update(summaries(name, feat))
  k = _block_step(every_k_block)
  if k:
    for stage, outputs in blocks.items():
      for j, feat in enumerate(outputs, start=1):
        if j % k == 0:
          out.update(summaries(f"{stage}_blk{j}", feat))
  return {name: value.astype(jnp.float32) for name, value in out.items()}


def activations(
    module: MAEResNet,
    params: Any,
    x: Array,
    *,
    patch_mean_size: Optional[Sequence[int]] = (2, 4),
    patch_std_size: Optional[Sequence[int]] = (2, 4),
    use_std: bool = True,
    use_mean: bool = True,
    every_k_block: Any = 2,
) -> dict[str, Array]:
  """The release's multi-scale encoder features `{name: [B, T, D]}` (fp32) of `x [B, H, W, C]`.

  For the stem (`conv1`), each stage (`layer1..4`, after its GroupNorm) and, when
  `every_k_block` >= 1, each k-th block of every stage (`layer{i}_blk{j}`, 1-based
  j, before the stage norm) the groups are: `name` (all H*W tokens), `name_mean`
  and `name_std` (one token: spatial mean / std), `name_mean_{s}` and
  `name_std_{s}` (one token per non-overlapping s x s patch, for each s in
  `patch_mean_size` / `patch_std_size` that divides the map). `norm_x` is the
  per-channel RMS of the (patched) input, `[B, 1, C]`. Std is sqrt(var + 1e-6).
  `every_k_block` None, < 1 or inf means no block outputs.

  Jit-able (the keyword options are Python values and fixed per trace). The input
  is run through the encoder unmasked and in eval mode.
  """
  return module.apply({"params": params}, x, tuple(patch_mean_size or ()), tuple(patch_std_size or ()),
                      bool(use_std), bool(use_mean), every_k_block, method=_activations)


# -----------------------------------------------------------------------------
# Masked-autoencoder pretraining.
# -----------------------------------------------------------------------------


def draw_mask(rng: Array, batch_size: int, grid: tuple[int, int], patch_size: int, mask_ratio_min: float,
              mask_ratio_max: float, dtype: Dtype = jnp.float32) -> Array:
  """Random square-patch mask `[B, H, W, 1]` (1 = hidden) over a grid of H x W cells.

  Each sample draws its ratio r uniformly from [mask_ratio_min, mask_ratio_max], then
  hides each patch_size x patch_size square independently with probability r (so
  the hidden fraction is r on average, not exactly). Same draws as the release
  (`rng` split into the ratio key and the patch key; uniforms in `dtype`).
  """
  h, w = grid
  if h % patch_size or w % patch_size:
    raise ValueError(f"the masked input's grid {h}x{w} must be a multiple of patch_size={patch_size}")
  if not 0.0 <= mask_ratio_min <= mask_ratio_max <= 1.0:
    raise ValueError(f"need 0 <= mask_ratio_min <= mask_ratio_max <= 1, got {mask_ratio_min}, {mask_ratio_max}")
  ratio_rng, patch_rng = jax.random.split(rng)
  ratio = jax.random.uniform(ratio_rng, (batch_size,), dtype) * (mask_ratio_max - mask_ratio_min) + mask_ratio_min
  noise = jax.random.uniform(patch_rng, (batch_size, h // patch_size, w // patch_size), dtype)
  mask = (noise < ratio[:, None, None]).astype(dtype)
  mask = jnp.repeat(jnp.repeat(mask, patch_size, axis=1), patch_size, axis=2)
  return mask[..., None]


def masked_loss(outputs: Mapping[str, Array], target: Array, mask: Array, labels: Array,
                lambda_cls: Any = 0.0) -> tuple[Array, dict[str, Array]]:
  """MAE objective `(mean loss, metrics)` from the model's outputs, in fp32.

  Per sample: lambda_cls * cross-entropy of the class head + (1 - lambda_cls) *
  squared error of the reconstruction over the hidden cells of `target` (the
  patched input), summed over channels and averaged over hidden cells: the
  release's scale, which matters for the lambda_cls mix and for gradient clipping.
  Metrics are batch means: loss, recon_loss, cls_loss, accuracy, mask_ratio.
  """
  mask = mask.astype(jnp.float32)
  error = jnp.square(outputs["reconstruction"].astype(jnp.float32) - target.astype(jnp.float32))
  recon_loss = jnp.sum(error * mask, axis=(1, 2, 3)) / (jnp.sum(mask, axis=(1, 2, 3)) + 1e-8)
  logits = outputs["logits"].astype(jnp.float32)
  cls_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  per_sample = lambda_cls * cls_loss + (1.0 - lambda_cls) * recon_loss
  metrics = {
      "loss": jnp.mean(per_sample),
      "recon_loss": jnp.mean(recon_loss),
      "cls_loss": jnp.mean(cls_loss),
      "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)),
      "mask_ratio": jnp.mean(mask),
  }
  return metrics["loss"], metrics


def pretraining_loss(
    module: MAEResNet,
    params: Any,
    x: Array,
    labels: Array,
    rng: Array,
    *,
    mask_ratio_min: float = 0.5,
    mask_ratio_max: float = 0.5,
    lambda_cls: Any = 0.0,
    train: bool = True,
) -> tuple[Array, dict[str, Array]]:
  """MAE objective `(mean loss, metrics)` of a batch `x [B, H, W, C]`, `labels [B]`.

  Draws a mask (`draw_mask`), hides those cells from the encoder and scores the
  model with `masked_loss`. `rng` is split into (dropout, masking) keys as in the
  release. The release's configs use mask ratio 0.5 and lambda_cls 0 (or a late
  ramp to 0.1).
  """
  x = _check_images(x, module)
  labels = _check_labels(labels, x.shape[0], module.num_classes)
  target = module.apply({"params": params}, x, method=MAEResNet.prepare)
  dropout_rng, mask_rng = jax.random.split(rng)
  mask = draw_mask(mask_rng, x.shape[0], target.shape[1:3], module.patch_size, mask_ratio_min, mask_ratio_max,
                   module.dtype)
  outputs = module.apply({"params": params}, x, mask, train=train, rngs={"dropout": dropout_rng})
  return masked_loss(outputs, target, mask, labels, lambda_cls)


class TrainState(flax.struct.PyTreeNode):
  step: Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: Array


def init_train_state(module: MAEResNet, tx: optax.GradientTransformation, seed: int,
                     image_shape: Sequence[int] = ()) -> TrainState:
  """Step 0: fresh params, EMA equal to them (the release's start), fresh optimizer.

  The params are drawn with an "rbg" key: unrolled threefry hashes for each of
  the ~150 leaves make the init program compile several times slower, and initial
  values need no bit-reproducibility across backends. The step keys stay threefry.
  """
  params = init_params(module, jax.random.key(seed, impl="rbg"), image_shape)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
                    rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))


def make_train_step(module: MAEResNet, tx: optax.GradientTransformation, *, ema_decay: float,
                    mask_ratio_min: float = 0.5, mask_ratio_max: float = 0.5,
                    schedule: Optional[optax.Schedule] = None):
  """`train_step(state, batch, lambda_cls) -> (state, metrics)`, un-jitted.

  `batch` = {"images": [B, H, W, C], "labels": [B]}; `lambda_cls` is a (traced)
  scalar, so ramping it does not recompile. Gradient clipping, if any, belongs to
  `tx`. The EMA follows the updated params with a constant decay, as in the release.
  """
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")

  def train_step(state: TrainState, batch: Mapping[str, Array], lambda_cls: Any = 0.0):
    rng = jax.random.fold_in(state.rng, state.step)
    loss_fn = functools.partial(pretraining_loss, module, x=batch["images"], labels=batch["labels"], rng=rng,
                                mask_ratio_min=mask_ratio_min, mask_ratio_max=mask_ratio_max,
                                lambda_cls=lambda_cls, train=True)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lambda_cls": jnp.asarray(lambda_cls, jnp.float32)}
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
    return new_state, metrics

  return train_step
