"""The DiT's attention kernel, chosen per platform (`model.attention_impl`).

`dot_product_attention(q, k, v, impl=...)` computes softmax(q k^T / sqrt(d)) v for
`q, k, v [B, N, H, D]` (no mask, no bias: the DiT attends over all its tokens) with
one of these implementations:

  * "xla": `jax.nn.dot_product_attention(implementation="xla")`: the logits as one
    matmul, a softmax, a second matmul; on every platform. It is today's step,
    bit for bit, and what "auto" resolves to on the CPU.
  * "cudnn": cuDNN's fused (flash) attention, `jax.nn.dot_product_attention(
    implementation="cudnn")`; NVIDIA GPUs only. cuDNN takes bf16 or fp16 inputs
    only: fp32 q, k, v (the generator's `attn_fp32`, or an fp32 model) are cast to
    bf16 for it and its output cast back. cuDNN still forms the logits, the softmax
    and the weighted sum of values in fp32, so what `attn_fp32` keeps is its fp32
    RoPE and fp32 softmax; what it loses is the last 16 bits of q, k and v.
  * "splash": the Pallas TPU splash-attention kernel
    (`jax.experimental.pallas.ops.tpu.splash_attention`); TPUs (or the Pallas
    interpreter, `interpret=True`, on any platform). It keeps the inputs' dtype
    (fp32 under `attn_fp32`), accumulates in fp32 and never writes the [N, N]
    logits to memory. See `splash_attention` for its padding.
  * "whole_sequence": a Pallas TPU kernel for short sequences that holds each
    example's whole q, k and v in VMEM (`whole_sequence_attention`): no logits in
    HBM and, unlike splash, no padding of the token axis; TPUs (or the interpreter).
    It takes heads that tile 128 lanes and sequences up to ~550 tokens (its VMEM per
    grid step grows with the square of the length; `whole_sequence_attention.plan`
    says why not).
  * "auto": resolved before the program is built (`resolve`), from the platform of
    the devices the program is built for: on TPU splash for sequences of at least
    `SPLASH_MIN_TOKENS` tokens, whole_sequence below when it takes the shapes (xla
    otherwise; measured, see `SPLASH_MIN_TOKENS`), cudnn on GPU when the
    attention's inputs are bf16 already (else xla, since cudnn would round fp32
    inputs to bf16), xla elsewhere.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from drifting_jax import errors, partitioning
from drifting_jax.models import whole_sequence_attention

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "whole_sequence")
# The ones a module computes with ("auto" is resolved before it is built).
CONCRETE = ("xla", "cudnn", "splash", "whole_sequence")
# Pallas TPU kernels: opaque to the SPMD partitioner, so run per device (`_per_device`).
_PALLAS = ("splash", "whole_sequence")

# Splash's blocks are multiples of the TPU's 128 lanes; a sequence is padded to a
# multiple of this and its blocks are the largest multiple of it, at most
# _SPLASH_MAX_BLOCK, that divides the padded length.
_SPLASH_LANES = 128
_SPLASH_MAX_BLOCK = 512


# "auto" picks splash on TPU from this many tokens on (whole_sequence below, where it
# takes the shape: up to ~550 tokens; XLA's attention between that and this). Measured by the compile reports
# (docs/scaling.md, "The step's levers"): at the ablation's 272 tokens (padded to 384)
# splash needed 23% more HBM per v6e chip than xla (20.11 against 16.36 GiB) for an
# estimated 3% shorter step; at 1,040 tokens attention alone needed 2.4x less memory
# and 3.5x less estimated time than xla on a v5p chip. Not measured between the two.
SPLASH_MIN_TOKENS = 1024


def resolve(impl: str, devices: Sequence[Any], *, attention_dtype: Any, tokens: Optional[int] = None,
            heads: Optional[int] = None, head_dim: Optional[int] = None) -> str:
  """The concrete implementation `impl` ("auto" or one of `CONCRETE`) means on `devices`.

  `devices` are those the program is built for (`mesh.devices`): in the compile mode
  they are libtpu's or the CUDA plugin's descriptions of devices this host lacks, so
  their `platform` is read, never `jax.devices()`'s. `attention_dtype` is the dtype
  q, k and v reach the kernel in (fp32 under `attn_fp32`); `tokens`, `heads` and
  `head_dim` the attention's shape, when known (whole_sequence needs it: a shape it
  cannot take is refused here, before anything is compiled).
  """
  if impl not in IMPLEMENTATIONS:
    raise errors.UsageError(f"model.attention_impl must be one of {', '.join(IMPLEMENTATIONS)}, got {impl!r}")
  platforms = {d.platform for d in np.asarray(devices).flat}
  platform = platforms.pop() if len(platforms) == 1 else "mixed"
  shape_known = None not in (tokens, heads, head_dim)
  whole_sequence_plan = (whole_sequence_attention.plan(tokens, heads, head_dim, attention_dtype) if shape_known
                         else "the attention's shape is not known")
  if impl == "auto":
    if platform == "tpu":
      if tokens is None or tokens >= SPLASH_MIN_TOKENS:
        return "splash"
      return "xla" if isinstance(whole_sequence_plan, str) else "whole_sequence"
    if platform in ("gpu", "cuda") and jnp.dtype(attention_dtype) in (jnp.bfloat16, jnp.float16):
      return "cudnn"
    return "xla"
  if impl == "cudnn" and platform not in ("gpu", "cuda"):
    raise errors.UsageError(f"model.attention_impl=cudnn needs NVIDIA GPUs; this program is built for {platform} "
                            "devices (use 'auto' or 'xla')")
  if impl in _PALLAS and platform != "tpu":
    raise errors.UsageError(f"model.attention_impl={impl} needs TPUs; this program is built for {platform} devices "
                            "(use 'auto' or 'xla')")
  if impl == "whole_sequence" and shape_known and isinstance(whole_sequence_plan, str):
    raise errors.UsageError(f"model.attention_impl=whole_sequence cannot take {tokens} tokens x {heads} heads of "
                            f"{head_dim} in {jnp.dtype(attention_dtype).name}: {whole_sequence_plan}")
  return impl


def dot_product_attention(q: Array, k: Array, v: Array, *, impl: str, scale: Optional[float] = None) -> Array:
  """softmax(scale q k^T) v per head, `[B, N, H, D] -> [B, N, H, D]` in q's dtype.

  `scale` defaults to 1/sqrt(D). Under `partitioning.activation_rules` on a mesh of
  more than one device, "splash" and "whole_sequence" run per device on its share of the batch
  (`shard_map`; a Pallas kernel is opaque to the SPMD partitioner, which would
  otherwise gather the whole batch to every device).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  if impl == "xla":
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
  if impl == "cudnn":
    dtype = q.dtype
    if dtype not in (jnp.bfloat16, jnp.float16):
      q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn").astype(dtype)
  if impl == "splash":
    return _per_device(functools.partial(splash_attention, scale=scale), q, k, v)
  if impl == "whole_sequence":
    return _per_device(functools.partial(whole_sequence_attention.attention, scale=scale), q, k, v)
  raise errors.UsageError(f"attention implementation must be one of {', '.join(CONCRETE)} when the model is "
                          f"built, got {impl!r} (resolve 'auto' first: attention.resolve)")


def attention_from_projection(qkv: Array, q_weight: Array, k_weight: Array, *, heads: int, epsilon: float,
                              scale: float, out_dtype: Any) -> Array:
  """"whole_sequence" from the DiT's fused projection qkv [B, N, 3 H D], qk-norm and RoPE in
  the kernel (`whole_sequence_attention.attention_from_projection`), per device on a mesh."""
  kernel = functools.partial(whole_sequence_attention.attention_from_projection, heads=heads, epsilon=epsilon,
                             scale=scale, out_dtype=out_dtype)
  return _per_device(kernel, qkv, q_weight, k_weight, batched=(True, False, False))


def _per_device(kernel, *args: Array, batched: Optional[Sequence[bool]] = None) -> Array:
  """`kernel(*args)` on each device's share of the batch (a Pallas call is opaque to the
  partitioner); `batched` says which args have the batch axis first (default: all), the
  others are passed whole to every device."""
  mesh = partitioning.activation_mesh()
  if mesh is None or mesh.size == 1:
    return kernel(*args)
  batched = (True,) * len(args) if batched is None else tuple(batched)
  batch_axes = partitioning.logical_to_mesh(("batch",))[0]
  shards = int(np.prod([mesh.shape[a] for a in np.atleast_1d(batch_axes)]))
  # A batch that does not split over the devices (e.g. the one-row batch of `init`) is
  # computed whole on every device, as the SPMD partitioner would.
  spec = P(batch_axes) if args[0].shape[0] % shards == 0 else P()
  fn = jax.shard_map(kernel, mesh=mesh, in_specs=tuple(spec if b else P() for b in batched), out_specs=spec,
                     check_vma=False)
  return fn(*args)


def splash_block(length: int) -> int:
  """The block size splash uses for a padded length (a multiple of 128)."""
  return max(b for b in range(_SPLASH_LANES, min(length, _SPLASH_MAX_BLOCK) + 1, _SPLASH_LANES) if length % b == 0)


def splash_attention(q: Array, k: Array, v: Array, *, scale: Optional[float] = None,
                     interpret: bool = False) -> Array:
  """softmax(scale q k^T) v with the Pallas splash kernel on one device's `[B, N, H, D]`.

  Padding: the token axis N is padded with zeros to the next multiple of 128 (the
  kernel's blocks are multiples of the TPU's 128 lanes; e.g. 256 patches + 16
  register tokens = 272 -> 384), for q, k and v alike. The padded keys are masked
  out for the real queries by segment ids (real tokens segment 0, padding segment
  1), so every real token attends to exactly the N real keys, as without padding;
  the padded queries attend to the padded keys only (a row of the softmax is never
  empty) and their outputs are dropped. The head dimension D is not padded: the
  kernel takes any D (64 for DiT-B/2) as a whole block. The scale is applied to q
  before the kernel (it has no scale argument).

  `interpret=True` runs the kernel in the Pallas interpreter (any platform: the CPU
  tests compare it with "xla").
  """
  batch, length, heads, head_dim = q.shape
  scale = head_dim ** -0.5 if scale is None else float(scale)
  padded = -(-length // _SPLASH_LANES) * _SPLASH_LANES
  block = splash_block(padded)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((padded, padded))] * heads),
                                  block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  segments = jnp.asarray(np.arange(padded) >= length, jnp.int32)
  segment_ids = splash.SegmentIds(q=segments, kv=segments)

  def to_kernel(x):  # [B, N, H, D] -> [B, H, padded, D]
    return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, padded - length), (0, 0)))

  out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(to_kernel(q * jnp.asarray(scale, q.dtype)), to_kernel(k),
                                                   to_kernel(v), segment_ids)
  return jnp.swapaxes(out[:, :, :length], 1, 2)
