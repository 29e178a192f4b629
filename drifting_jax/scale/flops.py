"""Analytical FLOP counts: the matmuls and convolutions of a traced program, before any compiler.

`program_flops(fn, *args)` walks the jaxpr of `fn` (nested calls, custom derivative
rules, remat, scans times their length) and adds 2 x multiply-adds of every
`dot_general` and `conv_general_dilated`. Elementwise work, reductions and
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


def _window_taps(out_size: int, kernel_size: int, in_size: int, stride: int, pad_low: int, lhs_dilation: int,
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
      _window_taps(out[out_spec[2 + d]], kernel[rhs_spec[2 + d]], lhs[lhs_spec[2 + d]], strides[d], padding[d][0],
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
