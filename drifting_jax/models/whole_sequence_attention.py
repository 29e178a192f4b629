"""Attention for short sequences with each example's whole sequence in VMEM (Pallas TPU).

The DiT's sequences are short: 256 patch tokens + 16 register tokens = 272 for the
latent ablation. XLA's attention writes each block's fp32 logits and softmax
[B, H, N, N] to HBM and reads them back (forward and backward): 40% of the v6e-64
ablation step's HBM bytes and half of its estimated cycles (docs/scaling.md, "Where the
bytes go"). The splash kernel avoids that but its blocks are multiples of 128 tokens,
so 272 tokens are padded to 384 (2x the work, and the padded copies are kept for the
backward). At this length one example's whole q, k and v fit in VMEM, so this kernel
does what flash attention does without its tiling of the token axis:

  forward   (one grid step = one example x one slab of 128-lane columns of q, k, v):
            s = scale q k^T, p = softmax(s) along the keys, o = p v; only o is written.
  backward  recomputes s and p from q and k (cheaper than storing the logsumexp: the
            whole row is in VMEM), then dv = p^T do, dp = do v^T,
            ds = p * (dp - rowsum(p * dp)), dq = scale ds k, dk = scale ds^T q.

HBM traffic is then q, k, v and o forward, q, k, v, do, dq, dk, dv backward: about a
tenth of XLA's at 272 tokens, and no padding of the token axis (a block's token axis is the
whole axis, which Pallas allows at any length: 260 and 272 compile for v6e).

Layout. q, k, v arrive as `[B, N, H, D]` and are viewed as `[B, N, H*D]` (a free
reshape), so no transpose is written to HBM; a grid step takes a slab of 128 lanes
(or of D lanes when D is a multiple of 128). A head of D < 128 (DiT-B's 64) shares its
slab with 128/D - 1 others: its logits are computed as (q masked to its lanes) k^T,
exact, because the other heads' lanes contribute products with zero; its output is
selected back into its lanes. The MXU contracts 128 lanes instead of 64 for the
logits (the v6e MXU is 256 deep, so a 64-deep contraction would not fill it either).

Numerics: logits, softmax and the weighted sum accumulate in fp32 whatever the input
dtype (fp32 under the release's `attn_fp32`); matmul operands keep the input dtype,
and Mosaic's default contraction precision for fp32 operands, like XLA's DEFAULT on
TPU, is what the TPU computes. In the Pallas interpreter (CPU tests) it agrees with
`jax.nn.dot_product_attention` to fp32 rounding.

The compiler cannot see inside a Mosaic kernel, so each call declares its cost
(`pl.CostEstimate`: its heads' matmul FLOPs, its exponentials, its HBM bytes); libtpu's step-time estimate uses that, and the compile reports say so.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array

LANES = 128
# What one grid step may hold in VMEM (its double-buffered blocks and the [N, N]
# temporaries), kept under the 16 MiB that Mosaic allows a kernel by default on
# v5e/v6e without raising its VMEM limit.
VMEM_BUDGET_BYTES = 12 * 2**20
# a @ b^T
_CONTRACT_LAST = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a call is cut: slabs of `width` lanes, each holding `heads_per_slab` heads."""
  tokens: int
  head_dim: int
  width: int
  heads_per_slab: int
  slabs: int

  def vmem_bytes(self, itemsize: int, arrays: int) -> int:
    """One grid step's VMEM: `arrays` blocks double-buffered, and ~6 fp32 [N, N'] temporaries."""
    padded = -(-self.tokens // LANES) * LANES
    return 2 * arrays * self.tokens * self.width * itemsize + 6 * self.tokens * padded * 4


def plan(tokens: int, heads: int, head_dim: int, dtype) -> Plan | str:
  """The kernel's cut of `[*, tokens, heads, head_dim]` inputs, or why it cannot take them."""
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype).name} (fp32, bf16 or fp16 only)"
  itemsize = jnp.dtype(dtype).itemsize
  if head_dim % LANES == 0:
    width, per = head_dim, 1
  elif LANES % head_dim == 0 and heads % (LANES // head_dim) == 0:
    width, per = LANES, LANES // head_dim
  else:
    return (f"heads of {head_dim} ({heads} of them) do not tile the TPU's {LANES} lanes (need a head size that is "
            f"a multiple of {LANES}, or divides it with a head count that is a multiple of {LANES} / head size)")
  cut = Plan(tokens=tokens, head_dim=head_dim, width=width, heads_per_slab=per, slabs=heads * head_dim // width)
  need = cut.vmem_bytes(itemsize, arrays=7)  # the backward's q, k, v, do, dq, dk, dv
  if need > VMEM_BUDGET_BYTES:
    return (f"{tokens} tokens need ~{need / 2**20:.1f} MiB of VMEM per grid step, over the kernel's "
            f"{VMEM_BUDGET_BYTES / 2**20:.0f} MiB (use splash for long sequences)")
  return cut


def _head_lanes(cut: Plan, head: int) -> Array:
  lane = lax.broadcasted_iota(jnp.int32, (1, cut.width), 1)
  return (lane >= head * cut.head_dim) & (lane < (head + 1) * cut.head_dim)


def _softmax_rows(q: Array, k: Array, scale: float) -> Array:
  """softmax(scale q k^T) along the keys, in fp32."""
  logits = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * scale
  weights = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def _masked(x: Array, lanes: Optional[Array]) -> Array:
  return x if lanes is None else jnp.where(lanes, x, jnp.zeros_like(x))


def _attend(q: Array, k: Array, v: Array, cut: Plan, scale: float) -> Array:
  """One slab's attention output [N, width] in fp32: each head's softmax(scale q k^T) v in its lanes."""
  out = None
  for head in range(cut.heads_per_slab):
    lanes = _head_lanes(cut, head) if cut.heads_per_slab > 1 else None
    probs = _softmax_rows(_masked(q, lanes), k, scale)
    o_head = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = o_head if lanes is None else jnp.where(lanes, o_head, 0.0 if out is None else out)
  return out


def _attend_backward(q: Array, k: Array, v: Array, do: Array, cut: Plan, scale: float) -> tuple[Array, Array, Array]:
  """One slab's (dq, dk, dv) in fp32, the softmax recomputed from q and k."""
  dq = dk = dv = None
  for head in range(cut.heads_per_slab):
    lanes = _head_lanes(cut, head) if cut.heads_per_slab > 1 else None
    q_head, do_head = _masked(q, lanes), _masked(do, lanes)
    probs = _softmax_rows(q_head, k, scale)
    # do_head is zero outside the head's lanes, so these are the head's dv and dp.
    dv_head = jnp.dot(probs.T.astype(do.dtype), do_head, preferred_element_type=jnp.float32)
    dprobs = lax.dot_general(do_head, v, _CONTRACT_LAST, preferred_element_type=jnp.float32)
    dlogits = probs * (dprobs - jnp.sum(probs * dprobs, axis=1, keepdims=True)) * scale
    dq_head = jnp.dot(dlogits.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk_head = jnp.dot(dlogits.T.astype(q.dtype), q_head, preferred_element_type=jnp.float32)
    if lanes is None:
      dq, dk, dv = dq_head, dk_head, dv_head
    else:
      dq = jnp.where(lanes, dq_head, 0.0 if dq is None else dq)
      dk = jnp.where(lanes, dk_head, 0.0 if dk is None else dk)
      dv = dv_head if dv is None else dv + dv_head
  return dq, dk, dv


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *, cut: Plan, scale: float):
  o_ref[0] = _attend(q_ref[0], k_ref[0], v_ref[0], cut, scale).astype(o_ref.dtype)  # blocks [1, N, width]


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, cut: Plan, scale: float):
  dq, dk, dv = _attend_backward(q_ref[0], k_ref[0], v_ref[0], do_ref[0], cut, scale)
  dq_ref[0] = dq.astype(dq_ref.dtype)
  dk_ref[0] = dk.astype(dk_ref.dtype)
  dv_ref[0] = dv.astype(dv_ref.dtype)


def _cost(cut: Plan, batch: int, itemsize: int, *, matmuls: int, arrays: int) -> pl.CostEstimate:
  """What one call does: `matmuls` [N, N] x [N, D] products per head, one exponential per logit, `arrays` in HBM.

  FLOPs are those of each head's own D lanes, as an analytical count has them (the
  products over the other heads' masked lanes are zeros and not counted)."""
  tokens, heads = cut.tokens, cut.slabs * cut.heads_per_slab
  return pl.CostEstimate(flops=int(2 * batch * heads * matmuls * tokens * tokens * cut.head_dim),
                         transcendentals=int(batch * heads * tokens * tokens),
                         bytes_accessed=int(arrays * batch * tokens * cut.slabs * cut.width * itemsize))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention_flat(q: Array, k: Array, v: Array, cut: Plan, scale: float, interpret: bool) -> Array:
  cost = _cost(cut, q.shape[0], q.dtype.itemsize, matmuls=2, arrays=4)
  kernel = functools.partial(_forward_kernel, cut=cut, scale=scale)
  return _call(kernel, cut, (q, k, v), 1, cost, interpret)[0]


def _call(kernel, cut: Plan, arrays, outputs, cost, interpret):
  """pallas_call over (example, slab), every array [B, N, H D] cut into [1, N, width] blocks."""
  batch, tokens, _ = arrays[0].shape
  spec = pl.BlockSpec((1, tokens, cut.width), lambda example, slab: (example, 0, slab))
  return pl.pallas_call(
      kernel, grid=(batch, cut.slabs), in_specs=[spec] * len(arrays), out_specs=[spec] * outputs,
      out_shape=[jax.ShapeDtypeStruct(arrays[0].shape, arrays[0].dtype) for _ in range(outputs)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      cost_estimate=cost, interpret=interpret)(*arrays)


def _attention_flat_fwd(q, k, v, cut, scale, interpret):
  return _attention_flat(q, k, v, cut, scale, interpret), (q, k, v)


def _attention_flat_bwd(cut, scale, interpret, residuals, d_out):
  q, k, v = residuals
  # Recomputes the logits (1 matmul), then dv, dp, dq, dk (4): 5 products, 1 exponential per logit.
  cost = _cost(cut, q.shape[0], q.dtype.itemsize, matmuls=5, arrays=7)
  kernel = functools.partial(_backward_kernel, cut=cut, scale=scale)
  dq, dk, dv = _call(kernel, cut, (q, k, v, d_out.astype(q.dtype)), 3, cost, interpret)
  return dq, dk, dv


_attention_flat.defvjp(_attention_flat_fwd, _attention_flat_bwd)


def attention(q: Array, k: Array, v: Array, *, scale: Optional[float] = None, interpret: bool = False) -> Array:
  """softmax(scale q k^T) v per head for `q, k, v [B, N, H, D]` on one device, in q's dtype.

  Raises ValueError when the kernel cannot take the shapes (`plan` says why).
  `interpret=True` runs it in the Pallas interpreter (any platform).
  """
  if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share shape and dtype, got {q.shape}/{q.dtype}, {k.shape}/{k.dtype}, "
                     f"{v.shape}/{v.dtype}")
  batch, tokens, heads, head_dim = q.shape
  cut = plan(tokens, heads, head_dim, q.dtype)
  if isinstance(cut, str):
    raise ValueError(f"whole-sequence attention cannot take q of shape {q.shape}: {cut}")
  scale = head_dim ** -0.5 if scale is None else float(scale)
  flat = lambda x: x.reshape(batch, tokens, heads * head_dim)
  out = _attention_flat(flat(q), flat(k), flat(v), cut, scale, interpret)
  return out.reshape(q.shape)


# --------------------------------------------------------------------------- from the projection
#
# The DiT's attention as the release computes it (qk-norm by RMSNorm, RoPE, fp32
# attention) starts from one fused projection qkv [B, N, 3 H D] in the compute dtype.
# Done in XLA, the split into q, k, v, the norms, RoPE and the casts to fp32 each write
# [B, N, H, D] tensors to HBM and read them back, forward and backward, and XLA keeps
# them in a layout with the token axis minor (a head of 64 would fill half of a TPU
# tile), so the kernel's row-major q, k, v cost a relayout copy each: after the kernel
# above, 85% of the ablation's attention bytes were this preamble (docs/scaling.md).
# `attention_from_projection` does the preamble in the kernel: it reads the projection
# slabs directly and writes the output in the compute dtype (the output projection
# casts it there anyway); its backward writes the projection's gradient slabs.


@dataclasses.dataclass(frozen=True)
class Preamble:
  """q, k as the DiT computes them from the projection, per head of `head_dim` lanes:

      y = (x * rsqrt(mean(x^2) + epsilon)) * weight, rounded to the compute dtype
          (layers.RMSNorm returns its input's dtype), then
      rope(y) = y cos + rotate_half(y) sin  in fp32 (layers.apply_rope, fp32 tables).
  """
  epsilon: float


def rope_tables(tokens: int, head_dim: int, width: int) -> tuple[Array, Array]:
  """cos, sin [tokens, width] in fp32: `layers.apply_rope`'s tables, tiled over the heads of a slab."""
  half = head_dim // 2
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(half) / half)).astype(jnp.float32)
  angles = jnp.outer(jnp.arange(tokens, dtype=jnp.float32), inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  tile = lambda t: jnp.tile(t, (1, width // head_dim))
  return tile(jnp.cos(angles)), tile(jnp.sin(angles))


def _lane_iota(cut: Plan) -> Array:
  return lax.broadcasted_iota(jnp.int32, (1, cut.width), 1)


def _rotate_half(x: Array, cut: Plan) -> Array:
  """Per head: (x1, x2) -> (-x2, x1) over the head's two halves, by lane rotations.

  Which of the two rotations brings lane i - half to lane i is read from a rotated
  lane index rather than assumed, so the result does not depend on the rotation's
  direction convention."""
  half, width = cut.head_dim // 2, cut.width
  lane = _lane_iota(cut)
  by_half = pltpu.roll(x, half, 1)
  by_rest = pltpu.roll(x, width - half, 1) if width != 2 * half else by_half
  moved = pltpu.roll(lane, half, 1)
  # True where by_half holds x[i - half] (numpy's roll convention).
  numpy_convention = moved == jnp.where(lane >= half, lane - half, lane - half + width)
  from_below = jnp.where(numpy_convention, by_half, by_rest)   # x[i - half]
  from_above = jnp.where(numpy_convention, by_rest, by_half)   # x[i + half]
  first_half = None
  for head in range(cut.heads_per_slab):
    lanes = (lane >= head * cut.head_dim) & (lane < head * cut.head_dim + half)
    first_half = lanes if first_half is None else first_half | lanes
  return jnp.where(first_half, -from_above, from_below)


def _head_mean(x: Array, cut: Plan) -> Array:
  """Each lane's mean of `x` over its head's lanes, [N, width]."""
  if cut.heads_per_slab == 1:
    return jnp.mean(x, axis=1, keepdims=True) * jnp.ones_like(x)
  out = jnp.zeros_like(x)
  for head in range(cut.heads_per_slab):
    lanes = _head_lanes(cut, head)
    out = jnp.where(lanes, jnp.sum(jnp.where(lanes, x, 0.0), axis=1, keepdims=True) / cut.head_dim, out)
  return out


def _norm_and_rope(x: Array, weight: Array, cos: Array, sin: Array, cut: Plan, pre: Preamble, dtype):
  """(rope(y), y, r) for one slab x [N, width] of q or k in `dtype`: y the rounded norm, r its rsqrt."""
  x = x.astype(jnp.float32)
  r = lax.rsqrt(_head_mean(x * x, cut) + pre.epsilon)
  y = ((x * r) * weight).astype(dtype).astype(jnp.float32)
  return y * cos + _rotate_half(y, cut) * sin, x, r


def _norm_and_rope_backward(d_rope: Array, x: Array, r: Array, weight: Array, cos: Array, sin: Array, cut: Plan,
                            dtype) -> tuple[Array, Array]:
  """(dx, dweight summed over the slab's tokens [1, width]) from the gradient of rope(y).

  rotate_half's transpose is minus itself. The cast of y to `dtype` passes its
  gradient through the same cast, as JAX's transpose of a convert does."""
  dy = (d_rope * cos - _rotate_half(d_rope * sin, cut)).astype(dtype).astype(jnp.float32)
  dweight = jnp.sum(dy * x * r, axis=0, keepdims=True)
  dx = r * weight * dy - x * r * r * r * _head_mean(dy * weight * x, cut)
  return dx, dweight


def _projection_forward_kernel(q_ref, k_ref, v_ref, wq_ref, wk_ref, cos_ref, sin_ref, o_ref, *, cut: Plan,
                               pre: Preamble, scale: float):
  dtype, cos, sin = q_ref.dtype, cos_ref[...], sin_ref[...]
  q, _, _ = _norm_and_rope(q_ref[0], wq_ref[...], cos, sin, cut, pre, dtype)
  k, _, _ = _norm_and_rope(k_ref[0], wk_ref[...], cos, sin, cut, pre, dtype)
  o_ref[0] = _attend(q, k, v_ref[0].astype(jnp.float32), cut, scale).astype(o_ref.dtype)


def _projection_backward_kernel(q_ref, k_ref, v_ref, wq_ref, wk_ref, cos_ref, sin_ref, do_ref,
                                dq_ref, dk_ref, dv_ref, dwq_ref, dwk_ref, *, cut: Plan, pre: Preamble, scale: float):
  dtype, cos, sin = q_ref.dtype, cos_ref[...], sin_ref[...]
  wq, wk = wq_ref[...], wk_ref[...]
  q, xq, rq = _norm_and_rope(q_ref[0], wq, cos, sin, cut, pre, dtype)
  k, xk, rk = _norm_and_rope(k_ref[0], wk, cos, sin, cut, pre, dtype)
  dq, dk, dv = _attend_backward(q, k, v_ref[0].astype(jnp.float32), do_ref[0].astype(jnp.float32), cut, scale)
  dxq, dwq = _norm_and_rope_backward(dq, xq, rq, wq, cos, sin, cut, dtype)
  dxk, dwk = _norm_and_rope_backward(dk, xk, rk, wk, cos, sin, cut, dtype)
  dq_ref[0] = dxq.astype(dq_ref.dtype)
  dk_ref[0] = dxk.astype(dk_ref.dtype)
  dv_ref[0] = dv.astype(dv_ref.dtype)
  dwq_ref[0] = dwq
  dwk_ref[0] = dwk


def _shared_inputs(q_weight: Array, k_weight: Array, cut: Plan) -> tuple[Array, ...]:
  """What every slab reads alike, one slab wide: the norm weights [1, width] (a head's [D]
  repeated over the slab's heads) and RoPE's cos, sin [N, width]."""
  weight = lambda w: jnp.tile(w.astype(jnp.float32), cut.heads_per_slab)[None]
  return (weight(q_weight), weight(k_weight), *rope_tables(cut.tokens, cut.head_dim, cut.width))


def _projection_call(kernel, cut: Plan, qkv: Array, shared: tuple[Array, ...], per_example: tuple[Array, ...],
                     outputs: list[jax.ShapeDtypeStruct], cost: pl.CostEstimate, interpret: bool):
  """pallas_call over (example, slab): qkv's q, k and v slabs, then the `shared` arrays
  (`_shared_inputs`: the same block at every grid step, so fetched once), then
  `per_example` [B, N, H D] slabs; outputs [B, rows, H D] by slab likewise."""
  batch, tokens, _ = qkv.shape
  slabs, width = cut.slabs, cut.width
  part = lambda which: pl.BlockSpec((1, tokens, width), lambda b, j: (b, 0, which * slabs + j))
  example_slab = lambda rows: pl.BlockSpec((1, rows, width), lambda b, j: (b, 0, j))
  whole = lambda a: pl.BlockSpec(a.shape, lambda b, j: (0, 0))
  in_specs = [part(0), part(1), part(2)] + [whole(a) for a in shared] + [example_slab(tokens) for _ in per_example]
  out_specs = [example_slab(o.shape[1]) for o in outputs]
  return pl.pallas_call(
      kernel, grid=(batch, slabs), in_specs=in_specs, out_specs=out_specs, out_shape=outputs,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      cost_estimate=cost, interpret=interpret)(qkv, qkv, qkv, *shared, *per_example)


def _projection_cost(cut: Plan, qkv: Array, out_itemsize: int, *, backward: bool) -> pl.CostEstimate:
  batch = qkv.shape[0]
  # Forward: reads q, k, v, writes the output; backward: reads q, k, v and the output's
  # gradient, writes dq, dk, dv. The output (or its gradient) is in the output's dtype.
  base = (_cost(cut, batch, qkv.dtype.itemsize, matmuls=5, arrays=6) if backward
          else _cost(cut, batch, qkv.dtype.itemsize, matmuls=2, arrays=3))
  extra = batch * cut.tokens * cut.slabs * cut.width * out_itemsize
  tables = 2 * cut.tokens * cut.width * 4
  return pl.CostEstimate(flops=base.flops, transcendentals=base.transcendentals,
                         bytes_accessed=int(base.bytes_accessed + extra + tables))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _from_projection(qkv: Array, q_weight: Array, k_weight: Array, cut: Plan, pre: Preamble, scale: float,
                     out_dtype: Any, interpret: bool) -> Array:
  return _from_projection_fwd(qkv, q_weight, k_weight, cut, pre, scale, out_dtype, interpret)[0]


def _from_projection_fwd(qkv, q_weight, k_weight, cut, pre, scale, out_dtype, interpret):
  batch, tokens, _ = qkv.shape
  columns = cut.slabs * cut.width
  kernel = functools.partial(_projection_forward_kernel, cut=cut, pre=pre, scale=scale)
  out = _projection_call(
      kernel, cut, qkv, _shared_inputs(q_weight, k_weight, cut), (),
      [jax.ShapeDtypeStruct((batch, tokens, columns), out_dtype)],
      _projection_cost(cut, qkv, jnp.dtype(out_dtype).itemsize, backward=False), interpret)[0]
  return out, (qkv, q_weight, k_weight)


def _from_projection_bwd(cut, pre, scale, out_dtype, interpret, residuals, d_out):
  qkv, q_weight, k_weight = residuals
  batch, tokens, _ = qkv.shape
  columns = cut.slabs * cut.width
  kernel = functools.partial(_projection_backward_kernel, cut=cut, pre=pre, scale=scale)
  part = jax.ShapeDtypeStruct((batch, tokens, columns), qkv.dtype)
  partial_weight = jax.ShapeDtypeStruct((batch, 1, columns), jnp.float32)
  dq, dk, dv, dwq, dwk = _projection_call(
      kernel, cut, qkv, _shared_inputs(q_weight, k_weight, cut), (d_out.astype(out_dtype),),
      [part, part, part, partial_weight, partial_weight],
      _projection_cost(cut, qkv, jnp.dtype(out_dtype).itemsize, backward=True), interpret)
  # The weights' gradients: summed over examples (the kernel summed tokens) and over heads.
  head_sum = lambda d, w: jnp.sum(d.reshape(-1, cut.head_dim), axis=0).astype(w.dtype)
  return (jnp.concatenate([dq, dk, dv], axis=-1), head_sum(dwq, q_weight), head_sum(dwk, k_weight))


_from_projection.defvjp(_from_projection_fwd, _from_projection_bwd)


def attention_from_projection(qkv: Array, q_weight: Array, k_weight: Array, *, heads: int, epsilon: float,
                              scale: Optional[float] = None, out_dtype: Any = None,
                              interpret: bool = False) -> Array:
  """The DiT's attention from its fused projection, on one device: `[B, N, 3 H D] -> [B, N, H D]`.

  q, k, v are qkv's thirds (each split into `heads` heads, as `einops` "(three h d)");
  q and k go through `Preamble` (RMSNorm with the learned per-head-dim `q_weight` /
  `k_weight`, rounded to qkv's dtype, then RoPE in fp32), v is cast to fp32, and the
  attention is computed in fp32 as `attention` does; the output is in `out_dtype`
  (default qkv's). Equal to `generator.Attention`'s XLA path with use_qknorm,
  use_rmsnorm, use_rope and attn_fp32 (tests). Raises ValueError for shapes `plan` refuses.
  """
  batch, tokens, columns = qkv.shape
  if columns % (3 * heads):
    raise ValueError(f"qkv's last axis ({columns}) must be 3 x heads ({heads}) x head size")
  head_dim = columns // (3 * heads)
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head size, got {head_dim}")
  cut = plan(tokens, heads, head_dim, jnp.float32)  # the slabs are held in fp32 inside the kernel
  if isinstance(cut, str):
    raise ValueError(f"whole-sequence attention cannot take qkv of shape {qkv.shape} ({heads} heads): {cut}")
  if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
    raise ValueError(f"q_weight and k_weight must be [{head_dim}], got {q_weight.shape} and {k_weight.shape}")
  scale = head_dim ** -0.5 if scale is None else float(scale)
  out_dtype = jnp.dtype(qkv.dtype if out_dtype is None else out_dtype)
  return _from_projection(qkv, q_weight, k_weight, cut, Preamble(float(epsilon)), scale, out_dtype, interpret)
