"""Analytical FLOP counts: the matmuls and convolutions of a traced program, before any compiler.

`program_flops(fn, *args)` walks the jaxpr of `fn` (nested calls, custom derivative
rules, remat, scans times their length, shard_map bodies times their shards) and adds
2 x multiply-adds of every `dot_general` and `conv_general_dilated`; a Pallas kernel
counts the FLOPs it declares (else its body's once per grid step). Elementwise work, reductions and
transcendentals are left out: in a transformer or a ResNet they are a few percent,
which is what the report's comparison with the compiler's count should show. Two
independent counts that agree make either one's error visible.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax import core as jax_core

from drifting_jax.train import train_step as train_step_lib

try:  # jax >= 0.4.30 keeps the jaxpr types in jax.extend
  from jax.extend import core as extend_core
  _ClosedJaxpr = extend_core.ClosedJaxpr
  _Jaxpr = extend_core.Jaxpr
except (ImportError, AttributeError):  # pragma: no cover
  _ClosedJaxpr = jax_core.ClosedJaxpr
  _Jaxpr = jax_core.Jaxpr


def _dot_general_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  contract = math.prod(lhs[d] for d in lhs_contract)
  batch = math.prod(lhs[d] for d in lhs_batch)
  lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lhs_contract and d not in lhs_batch)
  rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rhs_contract and d not in rhs_batch)
  return 2.0 * batch * lhs_free * rhs_free * contract


def window_taps(out_size: int, kernel_size: int, in_size: int, stride: int, pad_low: int, lhs_dilation: int,
                 rhs_dilation: int) -> int:
  """Pairs (output position, kernel tap) of one spatial dimension that read a real input
  element: not the padding, not a hole of a dilated (transposed) input."""
  o = np.arange(out_size)[:, None]
  k = np.arange(kernel_size)[None, :]
  i = o * stride + k * rhs_dilation - pad_low  # position in the dilated, unpadded input
  real = (i >= 0) & (i <= (in_size - 1) * lhs_dilation) & (i % lhs_dilation == 0)
  return int(np.count_nonzero(real))


def _conv_flops(eqn) -> float:
  """2 x the multiply-adds that touch real input: a 3x3 "SAME" convolution on a 4x4 map
  does (10/12)^2 = 69% of the full window's work, on 2x2 44%. XLA's cost analysis counts
  the same way (tests/test_scale.py), so small maps do not open a gap between the counts."""
  lhs = eqn.invars[0].aval.shape
  kernel = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  # specs: (batch or out feature dim, feature dim, spatial dims...)
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  ndim = len(rhs_spec) - 2
  strides = eqn.params.get("window_strides") or (1,) * ndim
  padding = eqn.params.get("padding") or ((0, 0),) * ndim
  lhs_dilation = eqn.params.get("lhs_dilation") or (1,) * ndim
  rhs_dilation = eqn.params.get("rhs_dilation") or (1,) * ndim
  taps = math.prod(
      window_taps(out[out_spec[2 + d]], kernel[rhs_spec[2 + d]], lhs[lhs_spec[2 + d]], strides[d], padding[d][0],
                   lhs_dilation[d], rhs_dilation[d]) for d in range(ndim))
  in_features = kernel[rhs_spec[1]]  # per feature group
  out_elements_per_position = out[out_spec[0]] * out[out_spec[1]]
  batch_groups = eqn.params.get("batch_group_count", 1)
  # Each output element is a dot over (its real window taps x input features per group).
  return 2.0 * out_elements_per_position * taps * in_features / max(1, batch_groups)


def _sub_jaxprs(eqn):
  for name, value in eqn.params.items():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, _ClosedJaxpr):
        yield name, v.jaxpr
      elif isinstance(v, _Jaxpr):
        yield name, v


def _as_jaxpr(value):
  return value.jaxpr if isinstance(value, _ClosedJaxpr) else value


def _pallas_call_flops(eqn) -> float:
  """A Pallas kernel's FLOPs: those it declares (`cost_estimate`, as our kernels do: the
  heads' own matmuls, `whole_sequence_attention._cost`), else its body's matmuls once
  per grid step."""
  cost = eqn.params.get("cost_estimate")
  if cost is not None and getattr(cost, "flops", None) is not None:
    return float(cost.flops)
  grid = getattr(eqn.params.get("grid_mapping"), "grid", ()) or ()
  steps = math.prod(int(g) for g in grid) if all(isinstance(g, int) for g in grid) else 1
  return steps * jaxpr_flops(_as_jaxpr(eqn.params["jaxpr"]))


def jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    prim = eqn.primitive.name
    if prim == "dot_general":
      total += _dot_general_flops(eqn)
    elif prim == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif prim == "cond":
      total += max((jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
    elif prim == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif prim == "pallas_call":
      total += _pallas_call_flops(eqn)
    elif prim == "shard_map":
      # The body is written for one shard and runs on every one of them.
      mesh = eqn.params["mesh"]
      manual = eqn.params.get("manual_axes") or tuple(mesh.axis_names)
      total += math.prod(mesh.shape[a] for a in manual) * jaxpr_flops(_as_jaxpr(eqn.params["jaxpr"]))
    else:
      for name, sub in _sub_jaxprs(eqn):
        # custom_vjp/jvp rules carry their derivative jaxprs too: count only the primal call.
        if name in ("fwd_jaxpr_thunk", "bwd", "jvp_jaxpr_fun", "jvp_jaxpr_thunk"):
          continue
        total += jaxpr_flops(sub)
  return total


def program_flops(fn: Callable[..., Any], *args, **kwargs) -> float:
  """Matmul and convolution FLOPs of `fn(*args, **kwargs)` (abstract args are fine)."""
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return jaxpr_flops(closed.jaxpr)


# --------------------------------------------------------------------------- the programs' analytical counts


def _shapes(tree: Any) -> Any:
  """Abstract leaves without shardings: the analytical count traces on one device."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def train_step_pieces(program) -> dict[str, Any]:
  """Global matmul/conv FLOPs of one training step by piece, and of the whole traced step.

  `program` is a `train.program.TrainProgram`. Each piece is its own traced program
  (its backward as JAX builds it: no weight gradients through the frozen features,
  none to the generator's noise input); the optimizer, EMA and clipping are
  elementwise (no matmuls).
  """
  config = program.config
  t = config.train
  sample_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  n_gen = t.classes_per_step * t.gen_per_class
  n_data = t.classes_per_step * (t.pos_per_class + t.neg_per_class)
  params = _shapes(program.abstract_state.params)
  fparams = _shapes(program.abstract_feature_params)
  labels = jax.ShapeDtypeStruct((n_gen,), np.int32)
  scales = jax.ShapeDtypeStruct((n_gen,), np.float32)
  rng = jax.random.PRNGKey(0)
  module, feature_apply = program.generator, program.features.apply

  def generate(p, l, c):
    return module.apply({"params": p}, l, c, rngs={"noise": rng})["samples"].astype(np.float32)

  def features_sum(x, fp):
    return sum(jax.numpy.sum(v) for v in feature_apply(fp, x).values())

  gen_fwd_bwd = program_flops(jax.grad(lambda p, l, c: jax.numpy.sum(generate(p, l, c))), params, labels, scales)
  gen_samples = jax.ShapeDtypeStruct((n_gen, *sample_shape), np.float32)
  data_samples = jax.ShapeDtypeStruct((n_data, *sample_shape), np.float32)
  features_generated = program_flops(jax.grad(features_sum), gen_samples, fparams)
  features_data = program_flops(feature_apply, fparams, data_samples)
  feature_shapes = jax.eval_shape(feature_apply, fparams, jax.ShapeDtypeStruct((1, *sample_shape), np.float32))
  objective = train_step_lib.objective_from_config(config.loss)
  b = t.classes_per_step

  def loss_of(gen):
    total = 0.0
    for name, shape in feature_shapes.items():
      _, tokens, dim = shape.shape
      pos = jax.numpy.zeros((b, t.pos_per_class, tokens, dim))
      neg = jax.numpy.zeros((b, t.neg_per_class, tokens, dim)) if t.neg_per_class else None
      w = jax.numpy.ones((b, t.neg_per_class)) if t.neg_per_class else None
      total = total + jax.numpy.mean(objective(gen[name], pos, neg, weight_neg=w, distance_scale=None)[0])
    return total

  gen_features = {name: jax.ShapeDtypeStruct((b, t.gen_per_class, *s.shape[1:]), np.float32)
                  for name, s in feature_shapes.items()}
  pieces = {
      "generator_fwd_bwd": gen_fwd_bwd,
      # On generated samples: forward, and the backward to the input (the MAE's params are frozen).
      "features_generated_fwd_bwd": features_generated,
      "features_data_fwd": features_data,
      "loss_fwd_bwd": program_flops(jax.value_and_grad(loss_of), gen_features),
  }
  whole = program_flops(program.step, *program.args())
  return {"pieces": pieces, "sum_of_pieces": float(sum(pieces.values())), "traced_step": whole}


def train_section(program, devices: int, compiler_flops: float) -> dict[str, Any]:
  """The report's FLOP section of the training step: the compiler's count beside the analytical one."""
  counts = train_step_pieces(program)
  analytical = counts["traced_step"] / devices
  return {
      "compiler_per_device": compiler_flops,
      "analytical_per_device": analytical,
      "analytical_pieces_global": counts["pieces"],
      "analytical_sum_of_pieces_global": counts["sum_of_pieces"],
      "analytical_traced_step_global": counts["traced_step"],
      "compiler_over_analytical": compiler_flops / analytical if analytical else None,
      "note": ("analytical = matmul and convolution FLOPs of the traced step (2 per multiply-add; "
               "a convolution's taps on padding not counted, as XLA does not), divided over the devices; "
               "the compiler also counts elementwise work"),
  }


def whole_program_section(fn, args, devices: int, compiler_flops: float) -> dict[str, Any]:
  """The FLOP section of a program counted whole (the MAE pretraining step, the sampling step)."""
  analytical = program_flops(fn, *[_shapes(a) for a in args]) / devices
  return {"compiler_per_device": compiler_flops, "analytical_per_device": analytical,
          "compiler_over_analytical": compiler_flops / analytical if analytical else None}
