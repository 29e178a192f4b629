"""What a compiled program says about itself: per-device memory, FLOPs, time estimates, collectives.

Everything here reads a `jax.stages.Compiled` (the TPU compiler's output for a slice
described by libtpu, or the GPU compiler's for GPUs described by the CUDA plugin) and
the chip facts of `targets`. Nothing is measured: the memory numbers are the
compiler's buffer assignment, the times its cost model's and a roofline's; the
report labels them so.

GPU programs differ in two ways (`gpu_cost`). The CUDA plugin's compile-only
executable has no cost analysis, so XLA's generic HLO cost analysis is run through
the CPU client on the GPU-optimized module; it knows nothing of the cuBLAS and cuDNN
library calls that do the matmuls and convolutions (it marks each custom call's
FLOPs, bytes and seconds as -1, "unknown"), so their FLOPs and bytes are counted
here from the calls' shapes and added back. And there is no `optimal_seconds`: the
step time of a GPU program is the roofline's, labelled so. The GPU compiler never
refuses a program for lack of memory; the fit verdict is `memory_analysis`'s total
against the GPU's memory, as on TPU.

`optimal_seconds` needs care. In programs with `ConcatBitcast` custom calls libtpu
returns a negative value (the release's v6e-64 step: -511.86 s with 512 such calls;
ours: -508.83 s with 509, and its sampling step -15.94 s with 16), as if each were
costed -1 s: adding 1 s per call gives 0.17 s and 0.056 s, next to the roofline's
memory terms (0.18 s, 0.056 s). `step_time_estimate` never reports the raw value
alone: a positive value is taken when not below the FLOPs bound; a negative one is
corrected by +1 s per ConcatBitcast when that lands above the bound (labelled); else
the roofline stands in. The raw value, the correction and both roofline terms are
always in the report.

Every private or undocumented surface this relies on (jaxlib's cost analysis of
another backend's module, the HLO text formats parsed here, libtpu's cost quirks) is
in `xla_internals`, with the versions it was checked against and a self-check.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Optional

from absl import logging

from drifting_jax.scale import breakdown as breakdown_lib, report_text, targets as targets_lib
from drifting_jax.scale import xla_internals
from drifting_jax.train import program as program_lib

GIB = 2**30

# HLO collective ops (async ones appear as -start/-done pairs; the -start carries the shape).
COLLECTIVES = xla_internals.COLLECTIVES
CONCAT_BITCAST = xla_internals.CONCAT_BITCAST
# Custom calls libtpu costs at -1 s each in optimal_seconds (xla_internals).
NEGATIVE_COST_CALLS = xla_internals.NEGATIVE_COST_CALLS


def memory(compiled, target: targets_lib.Target) -> dict[str, Any]:
  """Per-device bytes by kind, their total against the device's HBM, and a verdict."""
  m = compiled.memory_analysis()
  parts = {part: int(getattr(m, field)) for part, field in xla_internals.MEMORY_FIELDS.items()}
  total = program_lib.memory_total(parts)  # the run's pre-flight adds them the same way
  capacity = int(target.chip.device_hbm_bytes)
  out = {**{f"{k}_bytes": v for k, v in parts.items()}, "total_bytes": int(total), "capacity_bytes": capacity,
         "fits": bool(total <= capacity)}
  out["verdict"] = fit_verdict(total, capacity, target, parts)
  return out


def fit_verdict(total: int, capacity: int, target: targets_lib.Target, parts: dict[str, int]) -> str:
  """One line: fits with what headroom, or does not fit by how much, naming the largest
  contributors; the run's pre-flight prints the same words (`train.program.fit_verdict`)."""
  return program_lib.fit_verdict(total, capacity, report_text.device_name(target), parts)


def _cost_dict(compiled) -> dict[str, float]:
  return xla_internals.cost_numbers(compiled)


def custom_call_counts(hlo_text: str) -> dict[str, int]:
  return dict(collections.Counter(xla_internals.custom_call_targets(hlo_text)))


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the compiled program's collectives, per device.

  Bytes are each op's result shape (for an async all-gather or collective-permute, the
  -start's tuple holds operands, results and contexts: the results only; a tuple of
  them where XLA combined several). A collective that libtpu split into a chain of
  fusions counts once (`xla_internals.collective_ops`).
  """
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for op, nbytes, _ in xla_internals.collective_ops(hlo_text):
    out[op]["count"] += 1
    out[op]["bytes"] += nbytes
  return out


def collective_sources(hlo_text: str, top: int = 15) -> list[dict[str, Any]]:
  """The `top` (collective, JAX operation) pairs by bytes: where a program's collectives
  come from. The source is the op_name jax records (the function's path and the
  primitive; for a parameter's gathers, its path in the argument tree)."""
  groups: dict[tuple[str, str], list[int]] = {}
  for op, nbytes, name in xla_internals.collective_ops(hlo_text):
    source = xla_internals.op_name_source(name) or "(no op_name)"
    group = groups.setdefault((op, source), [0, 0])
    group[0] += 1
    group[1] += nbytes
  ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
  return [{"op": op, "source": source, "count": n, "bytes": b} for (op, source), (n, b) in ranked]


# --------------------------------------------------------------------------- GPU cost

# cuBLAS GEMMs (__cublas$gemm, __cublas$lt$matmul[$f8]) and cuDNN convolutions; their
# names, attributes and operand roles are XLA's (xla_internals.CUDNN_CONV_ROLES).


def library_calls(hlo_text: str) -> dict[str, Any]:
  """FLOPs and bytes of the cuBLAS/cuDNN calls of a GPU-optimized HLO module, from their shapes.

  GEMM: 2 x (result elements) x (product of the lhs contracting dimensions). Convolution
  (forward, or either backward pass of one): 2 x (forward output elements) x (kernel
  window) x (kernel input features per group). Bytes: operands and results, less the
  calls' scratch buffers. Other custom calls are listed as not counted.
  """
  shapes: dict[str, str] = {}
  calls = []
  for name, shape, op, line in xla_internals.definitions(hlo_text):
    shapes[name] = shape
    if op == "custom-call":
      calls.append((line, shape))
  by_target: dict[str, dict[str, float]] = {}
  uncounted: dict[str, int] = collections.Counter()
  for line, shape in calls:
    name = xla_internals.custom_call_target(line)
    flops = breakdown_lib.library_call_flops(line, shape, shapes)
    if flops is None:
      uncounted[name] += 1
      continue
    nbytes = breakdown_lib.custom_call_bytes(line, shape, shapes)
    entry = by_target.setdefault(name, {"count": 0, "flops": 0.0, "bytes": 0.0})
    entry["count"] += 1
    entry["flops"] += flops
    entry["bytes"] += nbytes
  return {"by_target": by_target, "flops": float(sum(v["flops"] for v in by_target.values())),
          "bytes": float(sum(v["bytes"] for v in by_target.values())), "not_counted": dict(uncounted)}


def _hlo_cost_analysis_on_cpu(compiled) -> dict[str, float]:
  """XLA's generic HLO cost analysis of the compiled (GPU-optimized) module, run by the CPU client.

  jax 0.10.2 has no public way to run it on a module another backend optimized: this
  uses jaxlib's private `hlo_module_cost_analysis` (`xla_internals`; an empty dict,
  with a warning, if it moves)."""
  try:
    return xla_internals.cpu_hlo_cost_analysis(compiled)
  except Exception as e:  # noqa: BLE001
    logging.warning("compile: no HLO cost analysis of the GPU program (%s); FLOPs from library calls only", e)
    return {}


def gpu_cost(compiled, hlo_text: str) -> dict[str, float]:
  """FLOPs and bytes of a GPU program: the HLO cost analysis plus the library calls it cannot see."""
  raw = _hlo_cost_analysis_on_cpu(compiled)
  calls = library_calls(hlo_text)
  unknown = sum(custom_call_counts(hlo_text).values())  # each costed -1 FLOP and -1 byte: undo that
  correction = unknown if raw else 0
  # Totals only: not the per-operand "bytes accessed0{}"..., "utilization..." entries.
  out = {k: v for k, v in raw.items()
         if xla_internals.PER_OPERAND_MARK not in k and not k.startswith("utilization") and k != "optimal_seconds"}
  out.update({
      "flops": raw.get("flops", 0.0) + correction + calls["flops"],
      "bytes accessed": raw.get("bytes accessed", 0.0) + correction + calls["bytes"],
      "hlo_cost_analysis_flops": raw.get("flops", 0.0),
      "hlo_cost_analysis_bytes_accessed": raw.get("bytes accessed", 0.0),
      "hlo_cost_analysis_optimal_seconds": raw.get("optimal_seconds"),
      "library_call_flops": calls["flops"],
      "library_call_bytes": calls["bytes"],
  })
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
  elif target.chip.platform == "cuda":
    out.update(seconds=roofline, source="roofline only: the GPU compiler gives no time estimate")
  else:
    why = "missing" if raw is None else ("negative" if raw < 0 else "below the FLOPs bound")
    out.update(seconds=roofline, source=f"roofline (compiler optimal_seconds {why}: {raw})")
  return out


def program_breakdown(hlo: str, cost: dict[str, float], gpu: bool) -> dict[str, Any]:
  """`breakdown.of_hlo`, or why there is none: a report is never lost to its breakdown."""
  try:
    return breakdown_lib.of_hlo(hlo, cost, breakdown_lib.library_call_flops if gpu else None)
  except Exception as e:  # noqa: BLE001
    logging.warning("compile: no per-component breakdown (%s: %s)", type(e).__name__, e)
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def analyze(compiled, target: targets_lib.Target, hlo: Optional[str] = None) -> dict[str, Any]:
  """Memory, cost, estimated time, collectives and breakdown of one compiled program (per
  device); `hlo`: its optimized text when the caller has it already (large at full size)."""
  hlo = (compiled.as_text() or "") if hlo is None else hlo
  gpu = target.chip.platform == "cuda"
  cost = gpu_cost(compiled, hlo) if gpu else _cost_dict(compiled)
  customs = custom_call_counts(hlo)
  out = {
      "memory": memory(compiled, target),
      "flops_per_device": cost.get("flops", 0.0),
      "bytes_accessed_per_device": cost.get("bytes accessed", 0.0),
      "time": step_time_estimate(cost, target, customs),
      "collectives": collectives(hlo),
      "collective_sources": collective_sources(hlo),
      "custom_calls": customs,
      "cost_analysis": {k: v for k, v in cost.items() if not k.startswith("utilization")},
  }
  out["breakdown"] = program_breakdown(hlo, cost, gpu)
  if gpu:
    out["cost_analysis_source"] = ("XLA's HLO cost analysis of the GPU-optimized module (run by the CPU client), "
                                   "plus the cuBLAS/cuDNN calls' FLOPs and bytes from their shapes")
    out["library_calls"] = library_calls(hlo)
  return out
