"""What a compiled program says about itself: per-device memory, FLOPs, time estimates, collectives.

Everything here reads a `jax.stages.Compiled` (the TPU compiler's output for a slice
described by libtpu) and the chip facts of `targets`. Nothing is measured: the
memory numbers are the compiler's buffer assignment, the times its cost model's and
a roofline's; the report labels them so.

`optimal_seconds` needs care. In programs with `ConcatBitcast` custom calls libtpu
returns a negative value (the release's v6e-64 step: -511.86 s with 512 such calls;
ours: -508.83 s with 509, and its sampling step -15.94 s with 16), as if each were
costed -1 s: adding 1 s per call gives 0.17 s and 0.056 s, next to the roofline's
memory terms (0.18 s, 0.056 s). `step_time_estimate` never reports the raw value
alone: a positive value is taken when not below the FLOPs bound; a negative one is
corrected by +1 s per ConcatBitcast when that lands above the bound (labelled); else
the roofline stands in. The raw value, the correction and both roofline terms are
always in the report.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

import numpy as np

from drifting_jax.scale import targets as targets_lib

GIB = 2**30

# HLO collective ops (async ones appear as -start/-done pairs; the -start carries the shape).
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b(" + "|".join(map(re.escape, _DTYPE_BYTES)) + r")\[([0-9,]*)\]")
_OP_LINE = re.compile(r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<op>" + "|".join(COLLECTIVES) +
                      r")(?P<start>-start)?\(")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
CONCAT_BITCAST = "ConcatBitcast"
# Custom calls libtpu costs at -1 s each in optimal_seconds (ConcatBitcast: ours and the
# release's v6e steps; ZeroCrop: the release's small step, -8.996 s with 9 of them).
NEGATIVE_COST_CALLS = (CONCAT_BITCAST, "ZeroCrop")


def memory(compiled, target: targets_lib.Target) -> dict[str, Any]:
  """Per-device bytes by kind, their total against the device's HBM, and a verdict."""
  m = compiled.memory_analysis()
  parts = {
      "arguments": int(m.argument_size_in_bytes),
      "outputs": int(m.output_size_in_bytes),
      "aliased": int(m.alias_size_in_bytes),
      "temporaries": int(m.temp_size_in_bytes),
      "code": int(m.generated_code_size_in_bytes),
  }
  # Donated arguments share their buffers with the outputs they alias.
  total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]
  capacity = int(target.chip.device_hbm_bytes)
  out = {**{f"{k}_bytes": v for k, v in parts.items()}, "total_bytes": int(total), "capacity_bytes": capacity,
         "fits": bool(total <= capacity)}
  out["verdict"] = fit_verdict(total, capacity, target, parts)
  return out


def fit_verdict(total: int, capacity: int, target: targets_lib.Target, parts: dict[str, int]) -> str:
  """One line: fits with what headroom, or does not fit by how much, naming the largest contributors."""
  device = "chip" if target.chip.devices_per_chip == 1 else "TensorCore"
  if total <= capacity:
    return (f"fits: {total / GIB:.2f} GiB of {capacity / GIB:.0f} GiB per {target.chip.generation} {device} "
            f"({(capacity - total) / GIB:.2f} GiB free)")
  shown = {k: v for k, v in parts.items() if k != "aliased"}
  largest = sorted(shown.items(), key=lambda kv: -kv[1])[:2]
  return (f"does not fit: needs {total / GIB:.2f} GiB per {target.chip.generation} {device}, which has "
          f"{capacity / GIB:.0f} GiB ({(total - capacity) / GIB:.2f} GiB over; largest: "
          + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in largest) + ")")


def _cost_dict(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return {k: float(v) for k, v in (cost or {}).items() if isinstance(v, (int, float, np.floating))}


def custom_call_counts(hlo_text: str) -> dict[str, int]:
  return dict(collections.Counter(_CUSTOM_CALL.findall(hlo_text)))


def _shape_bytes(shape_text: str) -> int:
  total = 0.0
  for dtype, dims in _SHAPE.findall(shape_text):
    total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the compiled program's collectives, per device.

  Bytes are each op's result shape (for a -start op, the tuple's last element is the
  result; the operands that come first are not counted twice).
  """
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for line in hlo_text.splitlines():
    match = _OP_LINE.search(line)
    if not match:
      continue
    shape = match.group("shape")
    if match.group("start") and match.group("op") in ("all-gather", "collective-permute") and shape.startswith("("):
      # (operand, result, [contexts]): count the result only.
      shapes = _SHAPE.findall(shape)
      dtype, dims = shapes[1] if len(shapes) > 1 else shapes[0]
      nbytes = int(_DTYPE_BYTES[dtype] * math.prod(int(x) for x in dims.split(",") if x))
    else:
      nbytes = _shape_bytes(shape)
    out[match.group("op")]["count"] += 1
    out[match.group("op")]["bytes"] += nbytes
  return out


def step_time_estimate(cost: dict[str, float], target: targets_lib.Target, custom_calls: dict[str, int]) -> dict:
  """The compiler's estimated step time, checked against a roofline (see module doc).

  The compute term FLOPs / peak is a hard lower bound. The memory term (bytes
  accessed / HBM bandwidth) is not: XLA's "bytes accessed" sums every operation's
  operands and results, including traffic that stays on chip, so it is reported
  beside the estimate, not used to reject it.
  """
  flops = cost.get("flops", 0.0)
  bytes_accessed = cost.get("bytes accessed", 0.0)
  compute_s = flops / target.chip.device_peak_flops
  memory_s = bytes_accessed / target.chip.device_hbm_bytes_per_s
  roofline = max(compute_s, memory_s)
  raw = cost.get("optimal_seconds")
  n_concat = int(sum(custom_calls.get(name, 0) for name in NEGATIVE_COST_CALLS))
  out = {"optimal_seconds_raw": raw, "concat_bitcast_calls": n_concat, "roofline_seconds": roofline,
         "roofline_compute_seconds": compute_s, "roofline_memory_seconds": memory_s,
         "bound": "compute" if compute_s >= memory_s else "memory"}
  if raw is not None and math.isfinite(raw) and raw > 0 and raw >= 0.999 * compute_s:
    out.update(seconds=raw, source="compiler optimal_seconds")
  elif raw is not None and math.isfinite(raw) and raw < 0 and n_concat and raw + n_concat >= 0.999 * compute_s:
    out.update(seconds=raw + n_concat, source=(
        f"compiler optimal_seconds {raw:.4g} s + 1 s for each of its {n_concat} {'/'.join(NEGATIVE_COST_CALLS)} custom calls "
        "(libtpu appears to cost each at -1 s; see docs/scaling.md)"))
  else:
    why = "missing" if raw is None else ("negative" if raw < 0 else "below the FLOPs bound")
    out.update(seconds=roofline, source=f"roofline (compiler optimal_seconds {why}: {raw})")
  return out


def analyze(compiled, target: targets_lib.Target) -> dict[str, Any]:
  """Memory, cost, estimated time and collectives of one compiled program (per device)."""
  hlo = compiled.as_text() or ""
  cost = _cost_dict(compiled)
  customs = custom_call_counts(hlo)
  return {
      "memory": memory(compiled, target),
      "flops_per_device": cost.get("flops", 0.0),
      "bytes_accessed_per_device": cost.get("bytes accessed", 0.0),
      "time": step_time_estimate(cost, target, customs),
      "collectives": collectives(hlo),
      "custom_calls": customs,
      "cost_analysis": {k: v for k, v in cost.items() if not k.startswith("utilization")},
  }
