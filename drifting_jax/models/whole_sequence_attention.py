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
from typing import Optional

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


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *, cut: Plan, scale: float):
  q, k, v = q_ref[0], k_ref[0], v_ref[0]  # [N, width]
  out = None
  for head in range(cut.heads_per_slab):
    lanes = _head_lanes(cut, head) if cut.heads_per_slab > 1 else None
    q_head = q if lanes is None else jnp.where(lanes, q, jnp.zeros_like(q))
    probs = _softmax_rows(q_head, k, scale)
    o_head = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = o_head if lanes is None else jnp.where(lanes, o_head, 0.0 if out is None else out)
  o_ref[0] = out.astype(o_ref.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, cut: Plan, scale: float):
  q, k, v, do = q_ref[0], k_ref[0], v_ref[0], do_ref[0]  # [N, width]
  dq = dk = dv = None
  for head in range(cut.heads_per_slab):
    lanes = _head_lanes(cut, head) if cut.heads_per_slab > 1 else None
    q_head = q if lanes is None else jnp.where(lanes, q, jnp.zeros_like(q))
    do_head = do if lanes is None else jnp.where(lanes, do, jnp.zeros_like(do))
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
  return _call(kernel, (q, k, v), 1, cost, interpret)[0]


def _call(kernel, arrays, outputs, cost, interpret):
  batch, tokens, columns = arrays[0].shape
  width = kernel.keywords["cut"].width
  spec = pl.BlockSpec((1, tokens, width), lambda example, slab: (example, 0, slab))
  return pl.pallas_call(
      kernel, grid=(batch, columns // width), in_specs=[spec] * len(arrays), out_specs=[spec] * outputs,
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
  dq, dk, dv = _call(kernel, (q, k, v, d_out.astype(q.dtype)), 3, cost, interpret)
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
