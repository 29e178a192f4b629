"""The log-KDE and MMD objectives of one feature group in Pallas TPU kernels (`implementation="pallas"`).

`kde_objectives` computes a feature group's KDEs with XLA: distances, kernel entries and
coefficients are [G, Cg, M] arrays that XLA writes to HBM and reads back between its
fusions, and the [B, C, T, S] inputs are transposed to [B*T, C, S] groups first. At the
release's ablation shapes that is ~30 GB of HBM traffic per class and step on a v6e chip;
at its largest groups 13x what reading the inputs once and writing the gradient take
(docs/scaling.md). Here each group's whole computation happens in VMEM, in up to three
passes over the inputs, each one `pallas_call` over (class, block of tokens):

  scale     (normalize_distances, no scale given)  sum_ij d_ij w_j per token, for the
            batch-mean distance scale (statistics.BatchSums);
  values    each bandwidth's value per token and, with normalize_gradients, its
            squared gradient sum, for the bandwidth's batch RMS (`objective`'s forward);
  gradient  sum_h c_t m_h grad_h per token, c_t its cotangent and m_h = 1 / (RMS_h Cg S)
            with normalize_gradients, else 1, written once in the inputs' own layout
            (`objective`'s backward).

A pass reads the group's generated samples, negatives and positives once, so the traffic
is (passes) x inputs + one gradient, and no [G, Cg, M] array reaches HBM. The inputs are
read in their own [B, C, T, S] layout, blocks of 8 tokens (T's (8, 128) tiles on TPU): a
token's [C, S] slab is a strided load from VMEM, so nothing is transposed in HBM (a
reshape to [B, C, T*S] would not be free either: it changes the tiling). One-token
groups are read as [B, C, S].

The arithmetic is `kde_objectives._kde_values_and_gradients` for one group, with the
q side kept as two blocks (the other generated samples, the negatives) instead of their
concatenation: the same terms, summed in another order. Supported: the trainer's call,
generated samples and positives of weight 1, negatives weighted per class (CFG), a
scale that is a scalar or one per class, S a multiple of 128 lanes (or one token). Other
calls use the XLA implementation (`supports`).

A Mosaic call cannot be partitioned by XLA's SPMD partitioner, so on a mesh the caller
says how the classes are split (`batch_sharding` = (mesh, its axes of the class axis))
and each pass runs per device on its classes (`jax.shard_map`); every pass is
independent across classes, and the batch-wide sums are taken outside.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from drifting_jax.losses import _common

Array = jax.Array

LANES = 128
SUBLANES = 8
# VMEM a call asks Mosaic for (its blocks double-buffered and a token's temporaries): the
# largest ablation group (16 tokens x 2048) needs ~30 MiB, over Mosaic's default scoped
# limit; libtpu accepts 60 MiB compiling for v6e (the whole v6e-64 step).
VMEM_LIMIT_BYTES = 60 * 2**20
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a @ b^T
# Lanes of the per-class parameter row: [scale, m_0 .. m_{H-1}, 0 ...].
_PARAM_LANES = LANES


@dataclasses.dataclass(frozen=True)
class Shape:
  """A feature group's call: B classes of Cg generated, Cn negative, Cp positive samples, T tokens of S."""
  classes: int
  generated: int
  negatives: int
  positives: int
  tokens: int
  features: int

  @property
  def tokens_per_block(self) -> int:
    """8 tokens (one sublane tile) where T is a multiple of 8, else all T."""
    return SUBLANES if self.tokens % SUBLANES == 0 else self.tokens

  def vmem_bytes(self) -> int:
    """One grid step's blocks, double-buffered (tiles padded to 8 x 128), and ~8 [Cg, S] temporaries."""
    lanes = -(-self.features // LANES) * LANES
    rows = SUBLANES if self.tokens > 1 else 1
    block = lambda c: c * rows * lanes * 4 if self.tokens > 1 else -(-c // SUBLANES) * SUBLANES * lanes * 4
    blocks = block(self.generated) * 2 + block(max(self.negatives, 1)) + block(self.positives)
    return 2 * blocks + 8 * self.generated * lanes * 4


def supports(gen: Array, fixed_pos: Array, fixed_neg, weight_gen, weight_pos, weight_neg, distance_scale) -> str | None:
  """None when the kernels take this call, else why not (then the XLA implementation runs)."""
  if weight_gen is not None or weight_pos is not None:
    return "weights on the generated samples or the positives"
  if jnp.ndim(gen) not in (3, 4):
    return "not a [B, C, S] or [B, C, T, S] feature group"
  s = gen.shape[-1]
  tokens = gen.shape[2] if gen.ndim == 4 else 1
  if tokens > 1 and s % LANES:
    return f"{tokens} tokens of {s} features: a token's features must fill whole 128-lane tiles"
  cn = 0 if fixed_neg is None else fixed_neg.shape[1]
  need = Shape(gen.shape[0], gen.shape[1], cn, fixed_pos.shape[1], tokens, s).vmem_bytes()
  if need > VMEM_LIMIT_BYTES:
    return f"a grid step would need {need / 2**20:.0f} MiB of VMEM"
  if gen.shape[1] < 2 and (fixed_neg is None or fixed_neg.shape[1] == 0):
    return "fewer than two generated samples and no negatives"
  if distance_scale is not None and jnp.ndim(distance_scale) > 1:
    return "a distance scale of rank > 1"
  return None


# --------------------------------------------------------------------------- one group, in VMEM


def _total(a: Array) -> Array:
  """The sum of a 2-D array as [1, 1] (lanes, then sublanes)."""
  return jnp.sum(jnp.sum(a, axis=1, keepdims=True), axis=0, keepdims=True)


def _row_of_squares(y: Array) -> Array:
  """|y_j|^2 as a row [1, N] (a matmul with ones: a sublane-to-lane move without a transpose)."""
  ones = jnp.ones((1, y.shape[1]), jnp.float32)
  return lax.dot_general(ones, y * y, _CONTRACT_LAST, preferred_element_type=jnp.float32)


def _distances(x: Array, x_sq: Array, y: Array) -> Array:
  """|x_i - y_j| [Cg, N], as `_common.pairwise_distances` computes it."""
  sq = x_sq + _row_of_squares(y) - 2.0 * lax.dot_general(x, y, _CONTRACT_LAST, preferred_element_type=jnp.float32)
  return jnp.sqrt(jnp.maximum(sq, _common.SQUARED_DISTANCE_EPS))


class _GroupDistances:
  """One group's distances, the q side in two blocks: the generated samples (self at sqrt(eps)) and the negatives."""

  def __init__(self, x: Array, neg: Array | None, pos: Array):
    x_sq = jnp.sum(x * x, axis=1, keepdims=True)
    cg = x.shape[0]
    self.is_self = lax.broadcasted_iota(jnp.int32, (cg, cg), 0) == lax.broadcasted_iota(jnp.int32, (cg, cg), 1)
    self.gen = jnp.where(self.is_self, math.sqrt(_common.SQUARED_DISTANCE_EPS), _distances(x, x_sq, x))
    self.neg = None if neg is None else _distances(x, x_sq, neg)
    self.pos = _distances(x, x_sq, pos)


def _weighted_distance_sum(d: _GroupDistances, w_neg: Array) -> Array:
  """sum_ij d_ij w_j over the scale's blocks: q (self included, weight 1) and p (weight 1); [1, 1]."""
  total = _total(d.gen) + _total(d.pos)
  if d.neg is not None:
    total = total + _total(d.neg * w_neg)
  return total


def _side_terms(pair, blocks, shift):
  """For one KDE side: its shifted kernel sum [Cg, 1] and gradient-kernel entries per block."""
  kernel_sum, grads = 0.0, []
  for r, log_w in blocks:
    value, grad = pair.entries(r, log_w, shift)
    kernel_sum = kernel_sum + jnp.sum(value, axis=1, keepdims=True)
    grads.append(grad)
  return kernel_sum, grads


def _group(x, neg, pos, w_neg, scale, multipliers, pairs, *, take_log: bool, want_values: bool,
           want_field: bool, want_gradient: bool):
  """One group's values [H] (as [1, 1] each), squared-gradient sums [H] and gradient [Cg, S]."""
  cg = x.shape[0]
  has_neg = neg is not None
  d = _GroupDistances(x, neg, pos)
  inv_scale = 1.0 / scale
  r_gen = d.gen * inv_scale
  r_neg = d.neg * inv_scale if has_neg else None
  r_pos = d.pos * inv_scale
  log_w_neg = _common.safe_log(w_neg) if has_neg else None  # [1, Cn]
  # q's weights: 1 for the other generated samples (the sample itself excluded), w_neg.
  log_w_gen = jnp.where(d.is_self, -jnp.inf, 0.0)
  max_log_w_q = jnp.zeros((1, 1), jnp.float32)
  total_w_q = jnp.full((1, 1), float(cg - 1), jnp.float32)
  r_min_q = jnp.min(jnp.where(d.is_self, jnp.inf, r_gen), axis=1, keepdims=True)
  if has_neg:
    max_log_w_q = jnp.maximum(max_log_w_q, jnp.max(log_w_neg, axis=1, keepdims=True))
    total_w_q = total_w_q + jnp.sum(w_neg, axis=1, keepdims=True)
    r_min_q = jnp.minimum(r_min_q, jnp.min(jnp.where(w_neg > 0, r_neg, jnp.inf), axis=1, keepdims=True))
  r_min_p = jnp.min(r_pos, axis=1, keepdims=True)
  log_norm_q = _common.safe_log(total_w_q)
  log_norm_p = math.log(pos.shape[0])
  gen_prob = 1.0 / cg
  q_blocks = [(r_gen, log_w_gen)] + ([(r_neg, log_w_neg)] if has_neg else [])
  values, field, gradient = [], [], None
  for h, pair in enumerate(pairs):
    shift_q = pair.log_base(r_min_q) + max_log_w_q
    shift_p = pair.log_base(r_min_p)
    sum_q, grads_q = _side_terms(pair, q_blocks, shift_q)
    sum_p, grads_p = _side_terms(pair, [(r_pos, 0.0)], shift_p)
    log_q = shift_q + jnp.log(sum_q) - log_norm_q
    log_p = shift_p + jnp.log(sum_p) - log_norm_p
    if take_log:
      per_sample = log_q - log_p
      row_q, row_p = -gen_prob / sum_q, gen_prob / sum_p
    else:
      q_hat, p_hat = jnp.exp(log_q), jnp.exp(log_p)
      per_sample = q_hat - p_hat
      row_q, row_p = -gen_prob * q_hat / sum_q, gen_prob * p_hat / sum_p
    if want_values:
      values.append(jnp.sum(gen_prob * per_sample, axis=0, keepdims=True))
    if not (want_field or want_gradient):
      continue
    c_blocks = [g * row_q for g in grads_q] + [g * row_p for g in grads_p]
    points = [x] + ([neg] if has_neg else []) + [pos]
    rows = sum(jnp.sum(c, axis=1, keepdims=True) for c in c_blocks)
    products = sum(jnp.dot(c, y, preferred_element_type=jnp.float32) for c, y in zip(c_blocks, points))
    grad_h = (rows * x - products) * (inv_scale * inv_scale)
    if want_field:
      field.append(_total(grad_h * grad_h))
    if want_gradient:
      term = grad_h * multipliers[h]
      gradient = term if gradient is None else gradient + term
  return values, field, gradient


# --------------------------------------------------------------------------- the passes


def _token(ref, t: int) -> Array:
  """Token t's [C, S] slab of a [1, C, Tb, S] block (a sublane-strided load), or the [1, C, S] block."""
  return ref[0, :, t, :] if len(ref.shape) == 4 else ref[0]


def _kernel(params_ref, w_neg_ref, cotangent_ref, gen_ref, neg_ref, pos_ref, out_ref, *, shape: Shape, pairs,
            take_log: bool, mode: str):
  """One grid step: class b, tokens [k Tb, (k + 1) Tb).

  mode "scale": sum_ij d_ij w_j per token; "values": each bandwidth's value per token
  (rows [0, H)) and, for "values+field", its squared gradient sum (rows [H, 2H));
  "gradient": sum_h cotangent_t m_h grad_h, in the generated samples' layout.
  """
  tb, heads = shape.tokens_per_block, len(pairs)
  params = params_ref[0]  # [1, LANES]: the scale, then each bandwidth's multiplier m_h
  scale = params[:, 0:1]
  w_neg = w_neg_ref[0] if shape.negatives else None  # [1, Cn]
  for t in range(tb):
    x = _token(gen_ref, t)
    neg = _token(neg_ref, t) if shape.negatives else None
    pos = _token(pos_ref, t)
    if mode == "scale":
      out_ref[0, 0, :, t:t + 1] = _weighted_distance_sum(_GroupDistances(x, neg, pos), w_neg)
      continue
    multipliers = None
    if mode == "gradient":
      cotangent = cotangent_ref[0, 0, :, t:t + 1]  # [1, 1]
      multipliers = [cotangent * params[:, 1 + h:2 + h] for h in range(heads)]
    values, field, gradient = _group(x, neg, pos, w_neg, scale, multipliers, pairs, take_log=take_log,
                                     want_values=mode != "gradient", want_field=mode == "values+field",
                                     want_gradient=mode == "gradient")
    if mode == "gradient":
      if len(out_ref.shape) == 4:
        out_ref[0, :, t, :] = gradient
      else:
        out_ref[0] = gradient
      continue
    for h, v in enumerate(values + field):
      out_ref[0, 0, h:h + 1, t:t + 1] = v


def _cost(shape: Shape, heads: int, mode: str) -> pl.CostEstimate:
  g = shape.classes * shape.tokens
  refs = shape.generated + shape.negatives + shape.positives
  distance_flops = 2 * g * shape.generated * shape.features * refs
  gradient_flops = 2 * g * heads * shape.generated * shape.features * refs if mode != "values" else 0
  entries = g * shape.generated * refs
  inputs = 4 * g * shape.features * refs
  written = 4 * g * shape.generated * shape.features if mode == "gradient" else 4 * g * 2 * heads
  return pl.CostEstimate(flops=int(distance_flops + (0 if mode == "scale" else gradient_flops)),
                         transcendentals=int(entries * (1 + heads)), bytes_accessed=int(inputs + written))


def _pass(mode: str, shape: Shape, pairs, take_log: bool, params: Array, w_neg: Array, cotangent: Array,
          gen: Array, neg: Array, pos: Array, interpret: bool, batch_sharding=None) -> Array:
  """One pass, per device where `batch_sharding` = (mesh, axes) splits the classes."""
  args = (params, w_neg, cotangent, gen, neg, pos)

  def local(*args):
    local_shape = dataclasses.replace(shape, classes=args[3].shape[0])
    return _local_pass(mode, local_shape, pairs, take_log, *args, interpret=interpret)

  if batch_sharding is None or batch_sharding[0].size == 1:
    return local(*args)
  mesh, axes = batch_sharding
  shards = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
  # Classes that do not split over the devices are computed whole on every device, as
  # the SPMD partitioner would.
  spec = P(axes) if shape.classes % shards == 0 else P()
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


def _local_pass(mode: str, shape: Shape, pairs, take_log: bool, params: Array, w_neg: Array, cotangent: Array,
                gen: Array, neg: Array, pos: Array, *, interpret: bool) -> Array:
  """One pallas_call over (class, token block); inputs [B, C, T, S] (or [B, C, S]); per-token
  outputs [B, T/Tb, rows, Tb], or the gradient."""
  tb = shape.tokens_per_block
  blocks = shape.tokens // tb
  heads = len(pairs)

  def sample_block(count):
    if shape.tokens == 1:
      return pl.BlockSpec((1, count, shape.features), lambda b, k: (b, 0, 0))
    return pl.BlockSpec((1, count, tb, shape.features), lambda b, k: (b, 0, k, 0))

  per_token = lambda rows: pl.BlockSpec((1, 1, rows, tb), lambda b, k: (b, k, 0, 0))
  in_specs = [pl.BlockSpec((1, 1, _PARAM_LANES), lambda b, k: (b, 0, 0)),
              pl.BlockSpec((1, 1, max(shape.negatives, 1)), lambda b, k: (b, 0, 0)), per_token(1),
              sample_block(shape.generated), sample_block(max(shape.negatives, 1)), sample_block(shape.positives)]
  if mode == "gradient":
    out_shape, out_spec = jax.ShapeDtypeStruct(gen.shape, jnp.float32), sample_block(shape.generated)
  else:
    rows = {"scale": 1, "values": heads, "values+field": 2 * heads}[mode]
    out_shape = jax.ShapeDtypeStruct((shape.classes, blocks, rows, tb), jnp.float32)
    out_spec = per_token(rows)
  kernel = functools.partial(_kernel, shape=shape, pairs=pairs, take_log=take_log, mode=mode)
  return pl.pallas_call(
      kernel, grid=(shape.classes, blocks), in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
      cost_estimate=_cost(shape, heads, mode), interpret=interpret,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                           vmem_limit_bytes=VMEM_LIMIT_BYTES))(
                                               params, w_neg, cotangent, gen, neg, pos)


def _per_token(out: Array, shape: Shape) -> Array:
  """[B, T/Tb, rows, Tb] -> [rows, B, T]."""
  rows = out.shape[2]
  return jnp.transpose(out, (2, 0, 1, 3)).reshape(rows, shape.classes, shape.tokens)


def _as_blocks(per_token: Array, shape: Shape) -> Array:
  """[B, T] -> [B, T/Tb, 1, Tb], the kernels' per-token layout."""
  tb = shape.tokens_per_block
  return per_token.reshape(shape.classes, shape.tokens // tb, 1, tb)


class FusedInputs:
  """A call's inputs in the kernels' layout: [B, C, T, S] float32 ([B, C, S] for one token),
  negatives' weights [B, 1, Cn]."""

  def __init__(self, gen, fixed_pos, fixed_neg, weight_neg):
    tail = gen.shape[2:]
    b, cg = gen.shape[:2]
    tokens, s = (tail[0], tail[1]) if len(tail) == 2 else (1, tail[0])
    layout = (tokens, s) if tokens > 1 else (s,)
    as_kernel = lambda a: jnp.asarray(a, jnp.float32).reshape(b, a.shape[1], *layout)
    cn = 0 if fixed_neg is None else fixed_neg.shape[1]
    self.shape = Shape(b, cg, cn, fixed_pos.shape[1], tokens, s)
    self.gen = as_kernel(gen)
    self.pos = as_kernel(fixed_pos)
    # A class without negatives still gets one (zero) block: Pallas needs a non-empty array.
    self.neg = as_kernel(fixed_neg) if cn else jnp.zeros((b, 1, *layout), jnp.float32)
    self.w_neg = (jnp.asarray(weight_neg, jnp.float32).reshape(b, 1, cn) if cn and weight_neg is not None
                  else jnp.ones((b, 1, max(cn, 1)), jnp.float32))

  def run(self, mode: str, pairs, take_log: bool, params: Array, cotangent: Array | None, interpret: bool,
          batch_sharding=None):
    shape = self.shape
    if cotangent is None:
      cotangent = jnp.zeros((shape.classes, shape.tokens), jnp.float32)
    return _pass(mode, shape, tuple(pairs), take_log, params, self.w_neg, _as_blocks(cotangent, shape), self.gen,
                 self.neg, self.pos, interpret, batch_sharding)


def _params(scale: Array, multipliers: Sequence[Array] | None, classes: int) -> Array:
  """The per-class parameter rows [B, 1, LANES]: the scale, then each bandwidth's gradient multiplier."""
  row = jnp.zeros((classes, _PARAM_LANES), jnp.float32).at[:, 0].set(jnp.broadcast_to(scale, (classes,)))
  for h, m in enumerate(multipliers or ()):
    row = row.at[:, 1 + h].set(m)
  return row[:, None, :]


def weighted_distance_sums(inputs: FusedInputs, *, interpret: bool = False, batch_sharding=None) -> Array:
  """sum_ij d_ij w_j of every group [B, T] (the scale pass)."""
  out = inputs.run("scale", (), True, _params(jnp.ones(()), None, inputs.shape.classes), None, interpret,
                   batch_sharding)
  return _per_token(out, inputs.shape)[0]


@dataclasses.dataclass(frozen=True)
class Call:
  """What a feature group's objective asks of the kernels (static).

  normalize_gradients: each bandwidth's gradient divided by its RMS over the batch
    (and by Cg S), as `kde_objectives` does; the values pass then also sums the squares.
  batch_sharding: (mesh, axes of the class axis) to run the passes per device, or None.
  """
  pairs: tuple
  take_log: bool
  normalize_gradients: bool
  interpret: bool
  batch_sharding: tuple | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def objective(call: Call, gen: Array, operands) -> tuple[Array, Array, Array]:
  """(sum_h values [B, T], values [H, B, T], squared gradient sums [H, B, T] or zeros) as a function of gen.

  `operands` = (fixed_pos, fixed_neg or None, weight_neg or None, scale ([] or [B]),
  field_mean_square ([H], the whole batch's where these groups are a chunk of it, or
  None: these groups' own, from the squared sums). Differentiated through the gradient
  pass, which scales each token's gradient sum_h m_h grad_h by its cotangent in the
  kernel, so no [B, Cg, T, S] product is formed outside it. Only the first output is
  differentiated (the others are for logging and batch statistics); the operands get
  a zero cotangent.
  """
  return _objective_fwd(call, gen, operands)[0]


def _objective_fwd(call: Call, gen, operands):
  fixed_pos, fixed_neg, weight_neg, scale, _ = operands
  inputs = FusedInputs(gen, fixed_pos, fixed_neg, weight_neg)
  heads = len(call.pairs)
  mode = "values+field" if call.normalize_gradients else "values"
  out = _per_token(inputs.run(mode, call.pairs, call.take_log, _params(scale, None, inputs.shape.classes), None,
                              call.interpret, call.batch_sharding), inputs.shape)
  values = out[:heads]
  field = out[heads:] if call.normalize_gradients else jnp.zeros_like(values)
  return (jnp.sum(values, axis=0), values, field), (gen, operands, field)


def _objective_bwd(call: Call, residuals, cotangents):
  gen, operands, field = residuals
  fixed_pos, fixed_neg, weight_neg, scale, field_mean_square = operands
  inputs = FusedInputs(gen, fixed_pos, fixed_neg, weight_neg)
  shape = inputs.shape
  multipliers = jnp.ones((len(call.pairs),), jnp.float32)
  if call.normalize_gradients:
    if field_mean_square is None:
      field_mean_square = jnp.sum(field, axis=(1, 2)) / float(gen.size)
    multipliers = 1.0 / (shape.generated * shape.features * jnp.maximum(jnp.sqrt(field_mean_square), 1e-30))
  gradient = inputs.run("gradient", call.pairs, call.take_log,
                        _params(scale, [multipliers[h] for h in range(len(call.pairs))], shape.classes),
                        cotangents[0], call.interpret, call.batch_sharding)
  return gradient.reshape(gen.shape).astype(gen.dtype), jax.tree.map(jnp.zeros_like, operands)


objective.defvjp(_objective_fwd, _objective_bwd)
