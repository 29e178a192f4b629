"""One-step DiT generator of the drifting model, compatible with the official release.

The generator maps (class label, CFG scale, noise) to a sample in a single forward
pass. Its conditioning vector is the sum of

  * a learned class embedding (`Embed_0`, `num_classes` rows),
  * `noise_coords` learned "style" embeddings, each indexed by its own random label
    drawn uniformly from `noise_classes` values (`noise_embeds_{i}`; the discrete
    part of the generator's noise),
  * 0.02 x RMSNorm(MLP(sinusoidal features of the CFG scale)).

The backbone is a DiT (`LightningDiT_0`): a linear patch embedding plus a learned
position table initialised to 2-D sin-cos, `n_cls_tokens` register tokens that carry
a projection of the conditioning vector, adaLN-zero blocks (optional qk-norm, RoPE
over the flat token index, SwiGLU, RMSNorm), and an adaLN final layer that maps
patch tokens back to pixels. Shapes are channel-last throughout: `[B, H, W, C]`.

Compatibility: `DiTGenerator(**model_config)` accepts the release's `model_config`
dictionaries (as stored in its `metadata.json`) and builds exactly its parameter
tree, so the release's `ema_params.msgpack` files load unchanged and reproduce its
samples. Submodule names below are therefore fixed by that format.

Class ids: `num_classes` is the number of rows of the class-embedding table and
labels must lie in `[0, num_classes)`. The release's default is 1001 for ImageNet,
i.e. the 1000 classes plus one spare row (id 1000) reserved for an unconditional
label; its training feeds only the real ids 0..999 (guidance enters through the
CFG-scale embedding, and unconditional negatives are real images, not a null
label). The same convention is used here for MNIST: 10 digits + 1 spare id = 11.

Precision: parameters are always fp32. With `use_bf16` the activations and matmuls
run in bf16, except the adaLN modulation MLPs (fp32), norm statistics (fp32) and,
with `attn_fp32`, RoPE and the attention softmax (fp32). The generated samples are
returned in the compute dtype; `sample()` casts them to fp32.

How it is computed, not what (runtime-only fields, left out of stored artifacts):
`attention_impl` picks the attention kernel (`drifting_jax.models.attention`:
"xla", "cudnn" or "splash"; "auto" is resolved from the target devices before the
module is built) and `remat_policy` how the blocks are rematerialised in the
backward pass (`layers.REMAT_POLICIES`: "none", "full", "dots"). Neither changes
the parameter tree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Union

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drifting_jax import errors, partitioning
from drifting_jax.models import attention as attention_lib
from drifting_jax.models import layers
from drifting_jax.models.layers import RMSNorm, TorchLinear, apply_rope, modulate, sincos_2d

Array = jax.Array
Dtype = Any
NoiseDict = dict[str, Array]

# Scale of the CFG-scale embedding in the conditioning sum (the release's value).
_CFG_EMBED_WEIGHT = 0.02
_EMBED_INIT = nn.initializers.normal(stddev=0.02)


def _norm_layer(use_rmsnorm: bool, name: str, layernorm_affine: bool) -> nn.Module:
  """RMSNorm (always with a learned scale) or LayerNorm (affine or parameter-free).

  `name` is only given to layers that own parameters; the release's trees have no
  entry for parameter-free LayerNorms, so their names are irrelevant.
  """
  if use_rmsnorm:
    return RMSNorm(epsilon=1e-6, name=name)
  return nn.LayerNorm(epsilon=1e-6, use_scale=layernorm_affine, use_bias=layernorm_affine,
                      name=name if layernorm_affine else None)


class Attention(nn.Module):
  """Multi-head self-attention with optional qk-norm and RoPE."""

  hidden_size: int
  num_heads: int
  use_qknorm: bool = False
  use_rmsnorm: bool = False
  use_rope: bool = False
  attn_fp32: bool = True
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    head_dim = self.hidden_size // self.num_heads
    qkv = TorchLinear(3 * self.hidden_size, dtype=self.dtype, name="TorchLinear_0")(x)
    if self.attention_impl == "whole_sequence" and self._preamble_in_kernel():
      # The same computation with the split, qk-norm, RoPE and casts inside the kernel
      # (whole_sequence_attention.attention_from_projection); same parameters.
      weights = [RMSNorm(epsilon=1e-6, name=name)(qkv, weight_of=head_dim) for name in ("q_norm", "k_norm")]
      out = attention_lib.attention_from_projection(qkv, *weights, heads=self.num_heads, epsilon=1e-6,
                                                    scale=head_dim ** -0.5, out_dtype=self.dtype)
      return TorchLinear(self.hidden_size, dtype=self.dtype, name="TorchLinear_1")(out)
    # The fused projection is laid out as [q | k | v], each split into heads.
    q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=self.num_heads)
    if self.use_qknorm:
      q = _norm_layer(self.use_rmsnorm, "q_norm", layernorm_affine=True)(q)
      k = _norm_layer(self.use_rmsnorm, "k_norm", layernorm_affine=True)(k)
    attn_dtype = jnp.float32 if self.attn_fp32 else self.dtype
    if self.use_rope:
      q, k = apply_rope(q, k, dtype=attn_dtype)
    out = attention_lib.dot_product_attention(
        q.astype(attn_dtype), k.astype(attn_dtype), v.astype(attn_dtype), impl=self.attention_impl,
        scale=head_dim ** -0.5)
    out = einops.rearrange(out, "b n h d -> b n (h d)")
    return TorchLinear(self.hidden_size, dtype=self.dtype, name="TorchLinear_1")(out)

  def _preamble_in_kernel(self) -> bool:
    """Whether whole_sequence takes the projection itself: the release's preamble (RMSNorm
    qk-norm, RoPE, fp32 attention) is the one it implements; others use its q, k, v form."""
    return self.use_qknorm and self.use_rmsnorm and self.use_rope and self.attn_fp32


class SwiGLUFFN(nn.Module):
  """SwiGLU feed-forward: out(silu(W1 x) * W3 x)."""

  hidden_size: int
  intermediate_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gate = TorchLinear(self.intermediate_size, dtype=self.dtype, name="TorchLinear_0")(x)
    value = TorchLinear(self.intermediate_size, dtype=self.dtype, name="TorchLinear_1")(x)
    return TorchLinear(self.hidden_size, dtype=self.dtype, name="TorchLinear_2")(nn.silu(gate) * value)


class StandardMLP(nn.Module):
  """Two-layer GELU (exact erf form) feed-forward."""

  hidden_size: int
  intermediate_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = TorchLinear(self.intermediate_size, dtype=self.dtype, name="TorchLinear_0")(x)
    return TorchLinear(self.hidden_size, dtype=self.dtype, name="TorchLinear_1")(nn.gelu(h, approximate=False))


def _adaln_projection(features: int, name: str) -> TorchLinear:
  """Zero-initialised fp32 projection of the conditioning to modulation vectors.

  Zero init makes every block start as the identity (adaLN-zero); fp32 because small
  shifts and gates lose too much in bf16.
  """
  return TorchLinear(features, kernel_init=nn.initializers.zeros, dtype=jnp.float32, name=name)


class DiTBlock(nn.Module):
  """adaLN-zero transformer block: gated attention then gated feed-forward."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  use_qknorm: bool = False
  use_swiglu: bool = False
  use_rmsnorm: bool = False
  use_rope: bool = False
  attn_fp32: bool = True
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    modulation = _adaln_projection(6 * self.hidden_size, "TorchLinear_0")(
        nn.silu(cond.astype(jnp.float32))).astype(self.dtype)
    shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)

    attention = Attention(
        self.hidden_size, self.num_heads, use_qknorm=self.use_qknorm, use_rmsnorm=self.use_rmsnorm,
        use_rope=self.use_rope, attn_fp32=self.attn_fp32, attention_impl=self.attention_impl, dtype=self.dtype,
        name="Attention_0")
    h = modulate(_norm_layer(self.use_rmsnorm, "RMSNorm_0", layernorm_affine=False)(x), shift_attn, scale_attn)
    x = x + gate_attn[:, None, :] * attention(h.astype(self.dtype))

    mlp_width = int(self.hidden_size * self.mlp_ratio)
    if self.use_swiglu:
      # Two thirds of the width keeps the parameter count of a GELU MLP; rounded up
      # to a multiple of 32 for friendlier matmul shapes.
      swiglu_width = -(-int(2 / 3 * mlp_width) // 32) * 32
      mlp = SwiGLUFFN(self.hidden_size, swiglu_width, dtype=self.dtype, name="SwiGLUFFN_0")
    else:
      mlp = StandardMLP(self.hidden_size, mlp_width, dtype=self.dtype, name="StandardMLP_0")
    h = modulate(_norm_layer(self.use_rmsnorm, "RMSNorm_1", layernorm_affine=False)(x), shift_mlp, scale_mlp)
    return x + gate_mlp[:, None, :] * mlp(h.astype(self.dtype))


class FinalLayer(nn.Module):
  """adaLN-modulated norm followed by a zero-initialised projection to patch pixels."""

  hidden_size: int
  patch_features: int
  use_rmsnorm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    modulation = _adaln_projection(2 * self.hidden_size, "TorchLinear_0")(
        nn.silu(cond.astype(jnp.float32))).astype(self.dtype)
    shift, scale = jnp.split(modulation, 2, axis=-1)
    x = modulate(_norm_layer(self.use_rmsnorm, "RMSNorm_0", layernorm_affine=False)(x), shift, scale)
    return TorchLinear(self.patch_features, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                       name="TorchLinear_1")(x)


class DiTBackbone(nn.Module):
  """Patchify -> [register tokens; patch tokens] -> DiT blocks -> unpatchify."""

  input_size: int
  patch_size: int
  out_channels: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  n_cls_tokens: int = 0
  use_qknorm: bool = False
  use_swiglu: bool = False
  use_rope: bool = False
  use_rmsnorm: bool = False
  attn_fp32: bool = True
  attention_impl: str = "xla"
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    grid = self.input_size // self.patch_size
    tokens = einops.rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
    tokens = TorchLinear(self.hidden_size, dtype=self.dtype, name="TorchLinear_0")(tokens)
    pos_embed = self.param(
        "pos_embed",
        lambda _, shape: jnp.asarray(sincos_2d(self.hidden_size, grid), jnp.float32).reshape(shape),
        (1, grid * grid, self.hidden_size))
    tokens = (tokens + pos_embed).astype(self.dtype)

    if self.n_cls_tokens > 0:
      # Register tokens: one projection of the conditioning, repeated, plus a learned
      # per-token offset. They are prepended and dropped again before the output.
      projected = TorchLinear(self.hidden_size, dtype=self.dtype, name="TorchLinear_1")(cond.astype(self.dtype))
      cls_embed = self.param("cls_embed", _EMBED_INIT, (1, self.n_cls_tokens, self.hidden_size), jnp.float32)
      registers = projected[:, None, :] + cls_embed
      tokens = jnp.concatenate([registers, tokens], axis=1).astype(self.dtype)

    # Each block is rematerialised by its policy (nn.remat wraps the class, so names
    # and the parameter tree are unchanged).
    block_cls = layers.remat(DiTBlock, self.remat_policy)
    # Activations stay split over the batch between blocks (a no-op outside
    # partitioning.activation_rules): left to itself, the SPMD partitioner follows the
    # fsdp-split weights into the activations and pays for it in all-gathers and
    # all-to-alls inside every block (docs/scaling.md).
    tokens = partitioning.constrain_activation(tokens, ("batch", None, None))
    for i in range(self.depth):
      tokens = block_cls(
          hidden_size=self.hidden_size, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
          use_qknorm=self.use_qknorm, use_swiglu=self.use_swiglu, use_rmsnorm=self.use_rmsnorm,
          use_rope=self.use_rope, attn_fp32=self.attn_fp32, attention_impl=self.attention_impl, dtype=self.dtype,
          name=f"blocks_{i}")(tokens, cond)
      tokens = partitioning.constrain_activation(tokens, ("batch", None, None))

    patches = FinalLayer(
        self.hidden_size, self.patch_size * self.patch_size * self.out_channels,
        use_rmsnorm=self.use_rmsnorm, dtype=self.dtype, name="FinalLayer_0")(tokens, cond)
    patches = patches[:, self.n_cls_tokens:]
    return einops.rearrange(patches, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c",
                            h=grid, p1=self.patch_size, p2=self.patch_size)


class CFGScaleEmbedder(nn.Module):
  """Sinusoidal features of a scalar (the CFG scale) followed by a two-layer MLP.

  This is the DiT timestep embedder applied to the guidance scale.
  """

  features: int
  frequency_size: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, scale: Array) -> Array:
    half = self.frequency_size // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = scale[:, None].astype(jnp.float32) * freqs[None, :]
    features = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if self.frequency_size % 2:
      features = jnp.pad(features, ((0, 0), (0, 1)))
    init = nn.initializers.normal(stddev=0.02)
    h = TorchLinear(self.features, kernel_init=init, dtype=self.dtype, name="TorchLinear_0")(features)
    h = TorchLinear(self.features, kernel_init=init, dtype=self.dtype, name="TorchLinear_1")(nn.silu(h))
    return h.astype(self.dtype)


class DiTGenerator(nn.Module):
  """Class- and CFG-conditioned one-step generator (the release's `DitGen`).

  The fields are the release's `model_config` keys. `num_classes` counts the rows of
  the class table, spare unconditional id included (see the module docstring).
  `use_remat` is the release's spelling of `remat`; either one turns on activation
  rematerialisation of the blocks ("full", unless `remat_policy` names another
  policy; see `effective_remat_policy`), which leaves parameters and outputs
  unchanged. `attention_impl` is one of `attention.CONCRETE`.

  Call with `labels [B]` (int) and `cfg_scale` (scalar or `[B]`). Without `noise`,
  the noise is drawn from the 'noise' rng stream (see `draw_noise`). Returns
  `{"samples": [B, S, S, out_channels], "noise": {"x", "noise_labels"}}`.
  """

  cond_dim: int
  num_classes: int = 1001
  noise_classes: int = 0
  noise_coords: int = 1
  input_size: int = 32
  in_channels: int = 3
  n_cls_tokens: int = 0
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  out_channels: int = 3
  use_qknorm: bool = False
  use_swiglu: bool = False
  use_rope: bool = False
  use_rmsnorm: bool = False
  use_bf16: bool = False
  attn_fp32: bool = True
  use_remat: bool = False
  remat: bool = False
  remat_policy: str = "none"
  attention_impl: str = "xla"

  def __post_init__(self):
    _check_config(self)
    super().__post_init__()

  @property
  def dtype(self) -> Dtype:
    """Compute dtype of activations (parameters stay fp32)."""
    return jnp.bfloat16 if self.use_bf16 else jnp.float32

  @property
  def noise_label_shape(self) -> tuple[int]:
    """Per-sample shape of the discrete noise; one dummy coordinate when unused."""
    return (max(1, self.noise_coords),)

  def draw_noise(self, batch_size: int, temperature: float = 1.0) -> NoiseDict:
    """Draw `{"x": [B, S, S, in_channels], "noise_labels": [B, max(1, noise_coords)]}`.

    One key is taken from the 'noise' stream and split in two: the first half gives
    the Gaussian `x` (times `temperature`, in the compute dtype), the second the
    style labels, uniform in `[0, max(1, noise_classes))`. This is the release's order.
    """
    key_x, key_labels = jax.random.split(self.make_rng("noise"))
    x = jax.random.normal(key_x, (batch_size, self.input_size, self.input_size, self.in_channels))
    noise_labels = jax.random.randint(
        key_labels, (batch_size,) + self.noise_label_shape, 0, max(1, self.noise_classes))
    return {"x": (x * temperature).astype(self.dtype), "noise_labels": noise_labels}

  def setup(self):
    # Names are fixed by the release's checkpoints; the list gets noise_embeds_{i}.
    self.class_embed = nn.Embed(self.num_classes, self.cond_dim, embedding_init=_EMBED_INIT,
                                dtype=self.dtype, name="Embed_0")
    if self.noise_classes > 0:
      self.noise_embeds = [
          nn.Embed(self.noise_classes, self.cond_dim, embedding_init=_EMBED_INIT, dtype=self.dtype)
          for _ in range(self.noise_coords)]
    self.cfg_embedder = CFGScaleEmbedder(self.cond_dim, dtype=self.dtype, name="TimestepEmbedder_0")
    self.cfg_norm = RMSNorm(epsilon=1e-6, name="RMSNorm_0")
    self.backbone = DiTBackbone(
        input_size=self.input_size, patch_size=self.patch_size, out_channels=self.out_channels,
        hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
        n_cls_tokens=self.n_cls_tokens, use_qknorm=self.use_qknorm, use_swiglu=self.use_swiglu,
        use_rope=self.use_rope, use_rmsnorm=self.use_rmsnorm, attn_fp32=self.attn_fp32,
        attention_impl=self.attention_impl,
        remat_policy=effective_remat_policy(self.remat or self.use_remat, self.remat_policy),
        dtype=self.dtype, name="LightningDiT_0")

  def condition(self, labels: Array, cfg_scale: Array, noise_labels: Array) -> Array:
    """Conditioning vector `[B, cond_dim]` from labels, CFG scales `[B]` and style labels."""
    cond = self.class_embed(labels)
    if self.noise_classes > 0:
      for i, embed in enumerate(self.noise_embeds):
        cond = cond + embed(noise_labels[:, i])
    cfg_embedding = self.cfg_norm(self.cfg_embedder(cfg_scale))
    return (cond + _CFG_EMBED_WEIGHT * cfg_embedding).astype(self.dtype)

  def __call__(
      self,
      labels: Array,
      cfg_scale: Union[float, Array] = 1.0,
      *,
      noise: Optional[Mapping[str, Array]] = None,
      temperature: float = 1.0,
  ) -> dict[str, Any]:
    labels = check_labels(labels, self.num_classes)
    batch_size = labels.shape[0]
    cfg_scale = _broadcast_cfg_scale(cfg_scale, batch_size)
    if noise is None:
      noise = self.draw_noise(batch_size, temperature)
    else:
      noise = _check_noise(noise, self, batch_size)
    cond = self.condition(labels, cfg_scale, noise["noise_labels"])
    samples = self.backbone(noise["x"].astype(self.dtype), cond)
    return {"samples": samples, "noise": dict(noise)}


# -----------------------------------------------------------------------------
# Input checks. Shapes are static, so they are checked even under jit; label values
# only when they are concrete (outside jit). Under jit an out-of-range label makes
# nn.Embed's gather return NaN rows, so such a sample comes out all-NaN.
# -----------------------------------------------------------------------------


def _check_config(module: DiTGenerator) -> None:
  problems = []
  if module.input_size % module.patch_size:
    problems.append(f"input_size={module.input_size} is not a multiple of patch_size={module.patch_size}")
  if module.hidden_size % module.num_heads:
    problems.append(f"hidden_size={module.hidden_size} is not a multiple of num_heads={module.num_heads}")
  elif (module.use_rope and (module.hidden_size // module.num_heads) % 2):
    problems.append(f"RoPE needs an even head dimension, got {module.hidden_size // module.num_heads}")
  if module.hidden_size % 4:
    problems.append(f"hidden_size={module.hidden_size} must be divisible by 4 (2-D sin-cos positions)")
  for field in ("num_classes", "cond_dim", "depth", "num_heads", "input_size", "patch_size",
                "in_channels", "out_channels", "hidden_size"):
    if int(getattr(module, field)) < 1:
      problems.append(f"{field} must be >= 1, got {getattr(module, field)}")
  for field in ("noise_classes", "noise_coords", "n_cls_tokens"):
    if int(getattr(module, field)) < 0:
      problems.append(f"{field} must be >= 0, got {getattr(module, field)}")
  if module.remat_policy not in layers.REMAT_POLICIES:
    problems.append(f"remat_policy must be one of {', '.join(layers.REMAT_POLICIES)}, got {module.remat_policy!r}")
  if module.attention_impl not in attention_lib.CONCRETE:
    problems.append(f"attention_impl must be one of {', '.join(attention_lib.CONCRETE)} (resolve 'auto' with "
                    f"attention.resolve first), got {module.attention_impl!r}")
  if problems:
    raise errors.UsageError("invalid DiTGenerator config: " + "; ".join(problems))


def effective_remat_policy(remat: bool, remat_policy: str) -> str:
  """The blocks' remat policy from the old switch and the policy's name: `remat_policy`
  when it names one other than "none", else "full" if `remat` (the release's
  `use_remat`, the older `model.remat`) is on, else "none"."""
  layers.check_remat_policy(remat_policy)
  if remat_policy == "none" and remat:
    return "full"
  return remat_policy


def attention_dtype(module: "DiTGenerator") -> Any:
  """The dtype q, k and v reach `module`'s attention kernel in (fp32 under `attn_fp32`)."""
  return jnp.float32 if module.attn_fp32 else module.dtype


def _is_concrete(x: Any) -> bool:
  """A value this process can read: not a tracer, and not an array spread over other hosts."""
  return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_labels(labels: Any, num_classes: int) -> Array:
  """`labels` as an array, its shape, dtype and (where readable here) range checked."""
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a 1-D array of class ids [batch], got shape {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if _is_concrete(labels) and labels.size:
    values = np.asarray(labels)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
      raise ValueError(
          f"class ids must lie in [0, {num_classes}) (num_classes={num_classes}, which includes the "
          f"unconditional id {num_classes - 1}), got out-of-range ids {sorted(set(bad.tolist()))[:10]}")
  return labels


def _broadcast_cfg_scale(cfg_scale: Any, batch_size: int) -> Array:
  cfg_scale = jnp.asarray(cfg_scale, jnp.float32)
  if cfg_scale.ndim == 0:
    return jnp.full((batch_size,), cfg_scale)
  if cfg_scale.shape != (batch_size,):
    raise ValueError(
        f"cfg_scale must be a scalar or have shape [batch]=({batch_size},), got shape {cfg_scale.shape}")
  return cfg_scale


def _check_noise(noise: Mapping[str, Any], module: DiTGenerator, batch_size: int) -> NoiseDict:
  if set(noise) != {"x", "noise_labels"}:
    raise ValueError(f"noise must be a dict with keys 'x' and 'noise_labels', got keys {sorted(noise)}")
  x, noise_labels = jnp.asarray(noise["x"]), jnp.asarray(noise["noise_labels"])
  x_shape = (batch_size, module.input_size, module.input_size, module.in_channels)
  if x.shape != x_shape:
    raise ValueError(f"noise['x'] must have shape {x_shape}, got {x.shape}")
  labels_shape = (batch_size,) + module.noise_label_shape
  if noise_labels.shape != labels_shape:
    raise ValueError(f"noise['noise_labels'] must have shape {labels_shape}, got {noise_labels.shape}")
  if not jnp.issubdtype(noise_labels.dtype, jnp.integer):
    raise ValueError(f"noise['noise_labels'] must be integers, got dtype {noise_labels.dtype}")
  if _is_concrete(noise_labels) and module.noise_classes > 0 and noise_labels.size:
    values = np.asarray(noise_labels)
    if values.min() < 0 or values.max() >= module.noise_classes:
      raise ValueError(f"noise['noise_labels'] must lie in [0, {module.noise_classes}), got values in "
                       f"[{values.min()}, {values.max()}]")
  return {"x": x, "noise_labels": noise_labels}


# -----------------------------------------------------------------------------
# Named configurations, construction and sampling.
# -----------------------------------------------------------------------------

def _latent_dit(hidden_size: int, depth: int, num_heads: int) -> dict[str, Any]:
  """Release-like DiT on 32x32x4 SD-VAE latents (its ImageNet ablation settings)."""
  return dict(
      cond_dim=hidden_size, num_classes=1001, noise_classes=64, noise_coords=32,
      input_size=32, in_channels=4, out_channels=4, patch_size=2, n_cls_tokens=16,
      hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=4.0,
      use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True,
      use_bf16=True, attn_fp32=True)


_MNIST_COMMON = dict(
    num_classes=11, input_size=28, in_channels=1, out_channels=1, mlp_ratio=4.0,
    use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, attn_fp32=True)

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "DiT-S/2": _latent_dit(384, 12, 6),
    "DiT-B/2": _latent_dit(768, 12, 12),
    "DiT-L/2": _latent_dit(1024, 24, 16),
    # The log-KDE paper's MNIST generator: DiT-S/2 with 8 register tokens and 32
    # style coordinates.
    "mnist-DiT-S/2": dict(
        _MNIST_COMMON, cond_dim=384, hidden_size=384, depth=12, num_heads=6, patch_size=2,
        n_cls_tokens=8, noise_classes=64, noise_coords=32, use_bf16=True),
    # CPU-sized MNIST generator for demos and tests (fp32: bf16 is slow on CPU).
    # Patch 4 gives 49 patch tokens, which keeps a 500-sample step to seconds.
    "tiny": dict(
        _MNIST_COMMON, cond_dim=128, hidden_size=128, depth=4, num_heads=4, patch_size=4,
        n_cls_tokens=4, noise_classes=16, noise_coords=8, use_bf16=False),
    # The same size on 32x32x4 latents in bf16, as the latent DiTs run: the compile
    # tests compile the release's program shape with it in seconds.
    "tiny-latent": dict(
        _latent_dit(128, 4, 4), noise_classes=16, noise_coords=8, n_cls_tokens=4),
}

CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(DiTGenerator) if f.name not in ("parent", "name"))
# Fields that choose how the model is computed, not what it is; artifact writers
# leave them out of the stored model_config (the release's loader does not know them).
RUNTIME_ONLY_KEYS = ("remat", "remat_policy", "attention_impl")


def model_config_for(name: str, **overrides: Any) -> dict[str, Any]:
  """The `model_config` of a named size, with `overrides` applied on top."""
  if name not in NAMED_CONFIGS:
    raise ValueError(f"unknown generator config {name!r}; known names: {sorted(NAMED_CONFIGS)}")
  unknown = sorted(set(overrides) - set(CONFIG_KEYS))
  if unknown:
    raise ValueError(f"unknown generator config keys {unknown}; valid keys: {sorted(CONFIG_KEYS)}")
  return {**NAMED_CONFIGS[name], **overrides}


def model_config_from_run(config: Any) -> dict[str, Any]:
  """The generator's `model_config` for a run config (`model.name` + `model.overrides`), checked against `data`.

  Everything needed to rebuild the module of a run's checkpoints: training and
  sampling both start here, so a checkpoint is readable from the config alone.
  """
  overrides = dict(config.model.overrides.to_dict()) if config.model.overrides else {}
  model_config = model_config_for(config.model.name, **overrides)
  expected = (config.data.image_size, config.data.channels)
  if (model_config["input_size"], model_config["out_channels"]) != expected:
    raise ValueError(f"generator {config.model.name} makes {model_config['input_size']}x"
                     f"{model_config['input_size']}x{model_config['out_channels']} samples, but the data are "
                     f"{expected[0]}x{expected[0]}x{expected[1]}: fix model.overrides or data.image_size/channels")
  if model_config["num_classes"] < config.data.num_classes:
    raise ValueError(f"generator has {model_config['num_classes']} class rows for {config.data.num_classes} classes")
  return model_config


def module_for_run(config: Any, devices: Any) -> DiTGenerator:
  """The run's generator as its training step computes it on `devices` (the mesh's).

  `model_config_from_run(config)`, and how it is computed: the blocks' remat policy
  (`model.remat_policy`; the older `model.remat=True` means "full") and the attention
  kernel (`model.attention_impl`, "auto" resolved from the platform of `devices`,
  which in the compile mode are descriptions of a TPU slice or GPU host this machine
  lacks: never `jax.devices()`'s).
  """
  policy = effective_remat_policy(bool(config.model.remat),
                                  layers.check_remat_policy(config.model.remat_policy, "model.remat_policy"))
  module = build_module({**model_config_from_run(config), "remat_policy": policy})
  tokens = (module.input_size // module.patch_size) ** 2 + module.n_cls_tokens
  impl = attention_lib.resolve(config.model.attention_impl, devices, attention_dtype=attention_dtype(module),
                               tokens=tokens, heads=module.num_heads, head_dim=module.hidden_size // module.num_heads)
  return module.clone(attention_impl=impl)


def build_module(model_config: Mapping[str, Any]) -> DiTGenerator:
  """`DiTGenerator` from a `model_config` dict (e.g. an artifact's metadata)."""
  unknown = sorted(set(model_config) - set(CONFIG_KEYS))
  if unknown:
    raise ValueError(f"unknown generator config keys {unknown}; valid keys: {sorted(CONFIG_KEYS)}")
  if "cond_dim" not in model_config:
    raise ValueError("generator model_config is missing the required key 'cond_dim'")
  return DiTGenerator(**dict(model_config))


def example_inputs(model_config: Mapping[str, Any], batch_size: int = 1) -> tuple[tuple, dict]:
  """Positional and keyword arguments for `module.init` (only a 'params' rng needed).

  The noise is passed explicitly, so initialisation draws nothing from 'noise'.
  """
  module = build_module(model_config)
  noise = {
      "x": jnp.zeros((batch_size, module.input_size, module.input_size, module.in_channels), module.dtype),
      "noise_labels": jnp.zeros((batch_size,) + module.noise_label_shape, jnp.int32),
  }
  return (jnp.zeros((batch_size,), jnp.int32),), {"cfg_scale": jnp.ones((batch_size,), jnp.float32),
                                                   "noise": noise}


def draw_noise(module: DiTGenerator, rng: Array, batch_size: int, temperature: float = 1.0) -> NoiseDict:
  """The noise `module` draws internally when applied with `rngs={"noise": rng}`."""
  return module.apply({}, batch_size, temperature, method=DiTGenerator.draw_noise, rngs={"noise": rng})


@functools.partial(jax.jit, static_argnums=0)
def sample_program(module: DiTGenerator, params: Any, labels: Array, cfg_scale: Array, noise: NoiseDict) -> Array:
  """The sampling program evaluation runs (`sample`), with the noise as an input;
  `eval.sampling.build_sample_program` lowers this same function for the compile mode."""
  out = module.apply({"params": params}, labels, cfg_scale, noise=noise)
  return out["samples"].astype(jnp.float32)


def sample(
    module: DiTGenerator,
    params: Any,
    labels: Any,
    cfg_scale: Union[float, Any] = 1.0,
    *,
    rng: Optional[Array] = None,
    noise: Optional[Mapping[str, Any]] = None,
    temperature: float = 1.0,
) -> Array:
  """Generate fp32 samples `[B, S, S, out_channels]` (jit-compiled per module).

  Exactly one of `rng` (noise drawn as `draw_noise(module, rng, B, temperature)`
  would) or `noise` (a dict as returned by `draw_noise`) must be given. Labels and
  noise labels are range-checked here, before compilation.

  `temperature` scales the Gaussian part of the drawn noise (the style labels are
  unchanged): 1 samples the distribution the generator was trained on; below 1 is
  the truncation trick, which trades recall for cleaner samples (docs/results.md).
  """
  if (rng is None) == (noise is None):
    raise ValueError("sample() needs exactly one of rng= (to draw noise) or noise= (fixed noise)")
  if noise is not None and temperature != 1.0:
    raise ValueError("temperature= scales drawn noise; with noise= given, scale its 'x' yourself")
  if not (np.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
  labels = check_labels(labels, module.num_classes)
  cfg_scale = _broadcast_cfg_scale(cfg_scale, labels.shape[0])
  if noise is None:
    noise = draw_noise(module, rng, labels.shape[0], temperature)
  noise = _check_noise(noise, module, labels.shape[0])
  return sample_program(module, params, labels, cfg_scale, noise)
