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


def _conv_flops(eqn) -> float:
  out = eqn.outvars[0].aval.shape
  kernel = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  # rhs_spec: (out feature dim, in feature dim, spatial dims...)
  rhs_spec = dn.rhs_spec
  spatial = math.prod(kernel[d] for d in rhs_spec[2:])
  in_features = kernel[rhs_spec[1]]
  batch_groups = eqn.params.get("batch_group_count", 1)
  # Each output element is a dot over (kernel window x input features per group).
  return 2.0 * math.prod(out) * spatial * in_features / max(1, batch_groups) * 1.0


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
