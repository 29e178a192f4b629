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
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

import jax
import numpy as np
from absl import logging

try:  # private: XLA's HLO cost analysis of a module another backend optimized (`gpu_cost`)
  from jax._src.lib import _jax as _jaxlib
except ImportError:  # pragma: no cover  (moved in a later jax: GPU FLOPs from library calls only)
  _jaxlib = None

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


def device_word(target: targets_lib.Target) -> str:
  """What one device of the target is called in a verdict: chip, TensorCore (v4) or GPU."""
  if target.chip.platform == "cuda":
    return "GPU"
  return "chip" if target.chip.devices_per_chip == 1 else "TensorCore"


def fit_verdict(total: int, capacity: int, target: targets_lib.Target, parts: dict[str, int]) -> str:
  """One line: fits with what headroom, or does not fit by how much, naming the largest contributors."""
  device = device_word(target)
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


_CHANNEL = re.compile(r"channel_id=(\d+)")
_CHAIN = re.compile(r'chain_id="(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _collective_ops(hlo_text: str):
  """(op, result bytes, op_name) of each collective of the program, once.

  libtpu (seen on v5e, not on v6e or v5p) splits one collective into a chain of async
  collective fusions, each holding a copy of the collective with the whole result's
  shape and the same `channel_id` and `chain_id`: a v5e-256 step's 175 such lines were
  37 all-gathers. Chained lines are keyed by (channel, chain); every other line is its
  own collective (a channel id alone is not unique: libtpu reuses it across its
  all-reduce-scatter computations).
  """
  seen = set()
  for index, line in enumerate(hlo_text.splitlines()):
    match = _OP_LINE.search(line)
    if not match:
      continue
    op, shape = match.group("op"), match.group("shape")
    if match.group("start") and op in ("all-gather", "collective-permute") and shape.startswith("("):
      # (operand, result, [contexts]): count the result only.
      shapes = _SHAPE.findall(shape)
      dtype, dims = shapes[1] if len(shapes) > 1 else shapes[0]
      nbytes = int(_DTYPE_BYTES[dtype] * math.prod(int(x) for x in dims.split(",") if x))
    else:
      nbytes = _shape_bytes(shape)
    channel, chain = _CHANNEL.search(line), _CHAIN.search(line)
    key = (op, "chain", channel.group(1), chain.group(1)) if channel and chain else ("line", index)
    if key in seen:
      continue
    seen.add(key)
    name = _OP_NAME.search(line)
    yield op, nbytes, (name.group(1) if name else "")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the compiled program's collectives, per device.

  Bytes are each op's result shape (for a -start op, the tuple's last element is the
  result; the operands that come first are not counted twice). A collective that
  libtpu split into a chain of fusions counts once (`_collective_ops`).
  """
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for op, nbytes, _ in _collective_ops(hlo_text):
    out[op]["count"] += 1
    out[op]["bytes"] += nbytes
  return out


def collective_sources(hlo_text: str, top: int = 15) -> list[dict[str, Any]]:
  """The `top` (collective, JAX operation) pairs by bytes: where a program's collectives
  come from. The source is the op_name jax records (the function's path and the
  primitive; for a parameter's gathers, its path in the argument tree)."""
  groups: dict[tuple[str, str], list[int]] = {}
  for op, nbytes, name in _collective_ops(hlo_text):
    source = re.sub(r"jit\([^)]*\)/", "", name) or "(no op_name)"
    group = groups.setdefault((op, source), [0, 0])
    group[0] += 1
    group[1] += nbytes
  ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
  return [{"op": op, "source": source, "count": n, "bytes": b} for (op, source), (n, b) in ranked]


# --------------------------------------------------------------------------- GPU cost

# cuBLAS GEMMs (__cublas$gemm, __cublas$lt$matmul[$f8]) and cuDNN convolutions.
_CONV_ROLES = {  # custom call -> which of (result, operand 0, operand 1) is the conv's input, kernel, output
    "__cudnn$convForward": ("op0", "op1", "result"),
    "__cudnn$convBiasActivationForward": ("op0", "op1", "result"),
    "__cudnn$convBackwardInput": ("result", "op1", "op0"),
    "__cudnn$convBackwardFilter": ("op0", "result", "op1"),
}
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\([^=]*?\)|[^\s(]+)\s+"
                         r"(?P<op>[a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_CONTRACTING = re.compile(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]')
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")


def _arrays(shape_text: str) -> list[tuple[str, list[int]]]:
  return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _ARRAY.findall(shape_text)]


def _array_bytes(dtype: str, dims: list[int]) -> float:
  return _DTYPE_BYTES.get(dtype, 4) * math.prod(dims)


def _operand_text(line: str, op: str) -> str:
  """The text between `op(` and its closing parenthesis."""
  start = line.index(op + "(") + len(op) + 1
  depth = 1
  for i in range(start, len(line)):
    depth += {"(": 1, ")": -1}.get(line[i], 0)
    if depth == 0:
      return line[start:i]
  return line[start:]


def _result_arrays(shape_text: str) -> list[tuple[str, list[int]]]:
  """A library call's results without its scratch buffer (a trailing 1-D s8/u8 tuple element)."""
  arrays = _arrays(shape_text)
  if shape_text.startswith("(") and len(arrays) > 1 and arrays[-1][0] in ("s8", "u8") and len(arrays[-1][1]) == 1:
    arrays = arrays[:-1]
  return arrays


def library_calls(hlo_text: str) -> dict[str, Any]:
  """FLOPs and bytes of the cuBLAS/cuDNN calls of a GPU-optimized HLO module, from their shapes.

  GEMM: 2 x (result elements) x (product of the lhs contracting dimensions). Convolution
  (forward, or either backward pass of one): 2 x (forward output elements) x (kernel
  window) x (kernel input features per group). Bytes: operands and results, less the
  calls' scratch buffers. Other custom calls are listed as not counted.
  """
  shapes: dict[str, str] = {}
  calls = []
  for line in hlo_text.splitlines():
    match = _DEFINITION.match(line)
    if not match:
      continue
    shapes[match.group("name")] = match.group("shape")
    if match.group("op") == "custom-call":
      calls.append((line, match.group("shape")))
  by_target: dict[str, dict[str, float]] = {}
  uncounted: dict[str, int] = collections.Counter()
  for line, shape in calls:
    found = _CUSTOM_CALL.search(line)
    name = found.group(1) if found else "?"
    operands = []
    for token in _operand_text(line, "custom-call").split(","):
      ref = re.search(r"%?([\w.\-]+)\s*$", token.strip())
      inline = _arrays(token)
      operands.append(inline[0] if inline else (_arrays(shapes.get(ref.group(1), ""))[:1] or [("f32", [])])[0]
                      if ref else ("f32", []))
    results = _result_arrays(shape)
    if not results:
      uncounted[name] += 1
      continue
    if name.startswith("__cublas"):
      contracting = _CONTRACTING.search(line)
      lhs = operands[0][1] if operands else []
      k = math.prod(lhs[int(d.strip().strip('"'))] for d in contracting.group(1).split(",") if d.strip()) \
          if contracting and lhs else 0
      flops = 2.0 * math.prod(results[0][1]) * k
    elif name in _CONV_ROLES and _DIM_LABELS.search(line) and len(operands) >= 2:
      roles = {"result": results[0][1], "op0": operands[0][1], "op1": operands[1][1]}
      _, kernel_role, out_role = _CONV_ROLES[name]
      kernel, out = roles[kernel_role], roles[out_role]
      kernel_labels = _DIM_LABELS.search(line).group(2)
      window = math.prod(kernel[i] for i, c in enumerate(kernel_labels) if c.isdigit())
      flops = 2.0 * math.prod(out) * window * kernel[kernel_labels.index("i")]
    else:
      uncounted[name] += 1
      continue
    nbytes = sum(_array_bytes(*a) for a in operands) + sum(_array_bytes(*a) for a in results)
    entry = by_target.setdefault(name, {"count": 0, "flops": 0.0, "bytes": 0.0})
    entry["count"] += 1
    entry["flops"] += flops
    entry["bytes"] += nbytes
  return {"by_target": by_target, "flops": float(sum(v["flops"] for v in by_target.values())),
          "bytes": float(sum(v["bytes"] for v in by_target.values())), "not_counted": dict(uncounted)}


def _hlo_cost_analysis_on_cpu(compiled) -> dict[str, float]:
  """XLA's generic HLO cost analysis of the compiled (GPU-optimized) module, run by the CPU client.

  jax 0.10.2 has no public way to run it on a module another backend optimized: this
  uses jaxlib's `hlo_module_cost_analysis` (private; an empty dict if it moves)."""
  try:
    module = compiled.runtime_executable().hlo_modules()[0]
    cost = _jaxlib.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  except Exception as e:  # noqa: BLE001
    logging.warning("compile: no HLO cost analysis of the GPU program (%s); FLOPs from library calls only", e)
    return {}
  return {k: float(v) for k, v in cost.items() if isinstance(v, (int, float, np.floating))}


def gpu_cost(compiled, hlo_text: str) -> dict[str, float]:
  """FLOPs and bytes of a GPU program: the HLO cost analysis plus the library calls it cannot see."""
  raw = _hlo_cost_analysis_on_cpu(compiled)
  calls = library_calls(hlo_text)
  unknown = sum(custom_call_counts(hlo_text).values())  # each costed -1 FLOP and -1 byte: undo that
  correction = unknown if raw else 0
  # Totals only: not the per-operand "bytes accessed0{}"..., "utilization..." entries.
  out = {k: v for k, v in raw.items() if "{" not in k and not k.startswith("utilization") and k != "optimal_seconds"}
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


def analyze(compiled, target: targets_lib.Target) -> dict[str, Any]:
  """Memory, cost, estimated time and collectives of one compiled program (per device)."""
  hlo = compiled.as_text() or ""
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
  if gpu:
    out["cost_analysis_source"] = ("XLA's HLO cost analysis of the GPU-optimized module (run by the CPU client), "
                                   "plus the cuBLAS/cuDNN calls' FLOPs and bytes from their shapes")
    out["library_calls"] = library_calls(hlo)
  return out
