"""Small building blocks shared by the models.

The layer layouts here are pinned by the official drifting release's checkpoints:
`TorchLinear` nests a `Dense_0` one scope deeper than a plain `nn.Dense` would, and
`RMSNorm` stores its scale under the name `weight`. Keeping that layout lets the
release's `ema_params.msgpack` files load into these modules unchanged.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drifting_jax import errors

Array = jax.Array
Dtype = Any


class TorchLinear(nn.Module):
  """Affine map stored as `<name>/Dense_0/{kernel,bias}`.

  The input is cast to `dtype` before the matmul, so a bf16 model runs its matmuls
  in bf16 while keeping `param_dtype` (fp32) master weights.
  """

  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = nn.Dense(
        self.features,
        use_bias=self.use_bias,
        kernel_init=self.kernel_init,
        bias_init=self.bias_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="Dense_0",
    )
    return dense(x.astype(self.dtype))


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, with a learned per-feature `weight`.

  The mean square is taken in fp32 even for bf16 inputs (bf16 sums of squares lose
  too much precision); the result is returned in the input's dtype.
  """

  epsilon: float = 1e-6
  use_scale: bool = True

  @nn.compact
  def __call__(self, x: Array, *, weight_of: Optional[int] = None) -> Array:
    """The norm of `x` over its last axis; with `weight_of=F`, only the learned weight of a
    norm over F features (ones without `use_scale`), for a kernel that applies the norm
    itself (whole_sequence_attention) under this module's parameter names."""
    features = x.shape[-1] if weight_of is None else int(weight_of)
    weight = (self.param("weight", nn.initializers.ones, (features,), jnp.float32) if self.use_scale
              else jnp.ones((features,), jnp.float32))
    if weight_of is not None:
      return weight
    mean_square = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(mean_square + self.epsilon)
    if self.use_scale:
      y = y * weight
    return y.astype(x.dtype)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN modulation `x * (1 + scale) + shift` of tokens `x[B, N, D]` by `[B, D]` vectors."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """Sine-cosine features `[len(positions), embed_dim]`: sines first, then cosines.

  Frequencies are 10000^(-i / (embed_dim / 2)) for i < embed_dim / 2, computed in
  float64 (this is an initial value, so there is no reason to round early).
  """
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
  inv_freq = 1.0 / 10000.0 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))
  angles = np.outer(np.asarray(positions, np.float64).reshape(-1), inv_freq)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """2-D sine-cosine position table `[grid_size**2, embed_dim]` for a row-major grid.

  The first half of each row encodes the token's column index, the second half its
  row index (the release's convention; it only matters as an initial value).
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  return np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)


def apply_rope(q: Array, k: Array, dtype: Dtype = jnp.float32) -> tuple[Array, Array]:
  """Rotary position embedding of `q, k [B, N, heads, head_dim]` along the token axis.

  Positions are the flat token indices 0..N-1. The head dimension is split into two
  halves rotated as pairs (x_i, x_{i + head_dim/2}) with angle pos * 10000^(-2i/head_dim);
  the angle table is built in `dtype`.
  """
  num_tokens, head_dim = q.shape[1], q.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
  half = head_dim // 2
  inv_freq = (1.0 / (10000.0 ** (jnp.arange(half) / half))).astype(dtype)
  angles = jnp.outer(jnp.arange(num_tokens, dtype=dtype), inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)

  def rotate(x: Array) -> Array:
    x_first, x_second = x[..., :half], x[..., half:]
    return x * cos + jnp.concatenate([-x_second, x_first], axis=-1) * sin

  return rotate(q), rotate(k)


def _weight_products_saveable(prim, *args, **params) -> bool:
  """Saves the products of activations with weights: dot_generals without batch
  dimensions (every dense layer) and convolutions; not attention's q k^T and p v,
  which are batched over (batch, head) and whose logits are [B, H, N, N]."""
  return (jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)
          or prim.name == "conv_general_dilated")


# How a block is rematerialised in the backward pass (`model.remat_policy`,
# `feature.remat_policy`), name -> the `jax.checkpoint` policy: the residuals the
# policy saves are kept from the forward pass, the rest of the block is recomputed
# from its input.
REMAT_POLICIES: dict[str, Any] = {
    # No rematerialisation: every residual is kept.
    "none": None,
    # Only each block's input is kept; the block's forward runs twice (jax's default
    # policy, as `nn.remat` without one: what `model.remat=True` always did).
    "full": None,
    # The weight matmuls' and convolutions' outputs are kept; the norms,
    # activations, RoPE and attention (its [B, H, N, N] logits) are recomputed.
    "dots": _weight_products_saveable,
}


def check_remat_policy(name: str, field: str = "remat_policy") -> str:
  """`name` if `REMAT_POLICIES` has it; else a one-line UsageError naming the choices."""
  if name not in REMAT_POLICIES:
    raise errors.UsageError(f"{field} must be one of {', '.join(REMAT_POLICIES)}, got {name!r}")
  return name


def remat(module_cls, policy_name: str, **kwargs):
  """`module_cls` rematerialised by the named policy (`module_cls` itself for "none").

  `nn.remat` wraps the class, so submodule names and the parameter tree are unchanged.
  """
  if check_remat_policy(policy_name) == "none":
    return module_cls
  return nn.remat(module_cls, prevent_cse=True, policy=REMAT_POLICIES[policy_name], **kwargs)
