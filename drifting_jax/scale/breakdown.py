"""Where a compiled program's FLOPs and bytes go, by component of the training step.

The compiler's cost analysis gives one total of FLOPs and one of bytes accessed. The
breakdown splits them over the program's instructions and groups those by what they
come from:

- Each instruction that runs (a fusion is one, with everything fused into it; loop
  bodies' instructions once, as the cost analysis counts them) is costed by XLA's own
  HLO cost analysis, cut out into a module of its own
  (`xla_internals.instruction_costs`). The cost analysis of a module is a sum over its
  instructions, so the parts add up to the module's total: nothing is estimated here.
  Custom calls, which that analysis cannot see, are costed from their shapes:
  cuBLAS/cuDNN calls as the GPU report counts them (`library_call_flops`, passed in
  for GPU programs), any other call's bytes as its operands and results, no FLOPs.
- Each instruction is charged to a component by its `op_name` metadata
  (`COMPONENT_RULES`): the flax module paths (`DiTGenerator`, `Attention` inside it)
  and the train step's named scopes (`data_features`, `generated_features`,
  `feature_assembly`, `batch_statistics`, `objective`, `optimizer`, `ema`), with autodiff's `jvp(...)`
  (forward) and `transpose(jvp(...))` (backward) around them; collectives by opcode.

On TPU, libtpu reports its own "bytes accessed", from its own cost model, which does
not expose per-instruction numbers; it counts more than XLA's analysis of the same
module (2.06x on the v5p-8 smoke step: a 4 MiB column sum costs 21 MB there, an
operand and a result in XLA's count), so the components are given in XLA's bytes,
beside libtpu's total, and in libtpu's per-kernel estimated cycles (`estimated_cycles`
in each kernel's backend_config), the time view of the same kernels. FLOPs agree
between the two (libtpu's total equals XLA's on every program seen).

The largest buffers listed are the largest results an instruction writes outside
fusions, not a liveness analysis: what the memory analysis's temporaries are made of,
not when each is live.
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import pathlib
import re
import sys
from typing import Any, Callable, Optional

from drifting_jax.scale import flops as flops_lib, xla_internals

# (component, pattern searched in the op_name without its jit(...)/ prefixes); first match wins.
COMPONENT_RULES: tuple[tuple[str, str], ...] = (
    ("random numbers (noise, CFG scales)", r"draw_noise|_threefry|_uniform|random_bits|random_split"),
    ("generator backward: attention", r"transpose\(jvp\(DiTGenerator\)\).*Attention"),
    ("generator backward: rest", r"transpose\(jvp\(DiTGenerator\)\)"),
    ("generator forward: attention", r"DiTGenerator.*Attention"),
    ("generator forward: rest", r"DiTGenerator"),
    ("feature assembly", r"feature_assembly"),
    ("MAE backward to its input", r"transpose\(jvp\(generated_features\)\)"),
    ("MAE forward, generated samples", r"generated_features"),
    ("MAE forward, data samples", r"data_features"),
    # train.microbatch_features="recompute": the objective's whole-batch sums, chunk by chunk.
    ("loss statistics passes", r"batch_statistics"),
    ("loss backward", r"transpose\(jvp\(objective\)\)"),
    ("loss forward", r"objective"),
    ("optimizer", r"(^|/)optimizer(/|$)"),
    ("EMA", r"(^|/)ema(/|$)"),
)
COLLECTIVES = "collectives"
OTHER = "other (no component in its op_name)"
HEAVIEST = 20
COVERAGE_TOLERANCE = 0.05  # the parts must come within 5% of the module's total


def component_of(op_name: str, opcode: str) -> str:
  """The component an instruction is charged to (see `COMPONENT_RULES`)."""
  if opcode.startswith(xla_internals.COLLECTIVES):
    return COLLECTIVES
  source = xla_internals.op_name_source(op_name)
  for component, pattern in COMPONENT_RULES:
    if re.search(pattern, source):
      return component
  return OTHER


def library_call_flops(line: str, shape: str, shapes: dict[str, str]) -> float | None:
  """FLOPs of one cuBLAS GEMM or cuDNN convolution call from its shapes (None for another call).

  GEMM: 2 x (result elements) x (product of the lhs contracting dimensions). Convolution
  (forward, or either backward pass of one): 2 x (forward output elements) x (kernel
  window) x (kernel input features per group), counting only the (output position,
  kernel tap) pairs that read a real input element, not the padding (`flops.window_taps`:
  as the analytical count and XLA's own cost analysis count; cuDNN multiplies the
  padding's zeros too, which on a 4x4 map is 31% of a 3x3 window's work).
  """
  name = xla_internals.custom_call_target(line)
  operands = xla_internals.operand_arrays(line, "custom-call", shapes)
  results = xla_internals.result_arrays(shape)
  if not results:
    return None
  labels = xla_internals.conv_dim_labels(line)
  if name.startswith("__cublas"):
    contracting = xla_internals.gemm_contracting_dimensions(line)
    lhs = operands[0][1] if operands else []
    k = math.prod(lhs[d] for d in contracting) if contracting is not None and lhs else 0
    return 2.0 * math.prod(results[0][1]) * k
  if name in xla_internals.CUDNN_CONV_ROLES and labels and len(operands) >= 2:
    roles = {"result": results[0][1], "op0": operands[0][1], "op1": operands[1][1]}
    input_role, kernel_role, out_role = xla_internals.CUDNN_CONV_ROLES[name]
    kernel, out, lhs = roles[kernel_role], roles[out_role], roles[input_role]
    input_labels, kernel_labels, out_labels = labels
    spatial = sorted(c for c in kernel_labels if c.isdigit())
    window = xla_internals.conv_window(line)
    if window is None or len(window["size"]) != len(spatial):
      taps = math.prod(out[out_labels.index(d)] for d in spatial) * math.prod(kernel[kernel_labels.index(d)]
                                                                             for d in spatial)
    else:
      taps = math.prod(
          flops_lib.window_taps(out[out_labels.index(d)], kernel[kernel_labels.index(d)], lhs[input_labels.index(d)],
                                window["stride"][i], window["pad"][i][0], window["lhs_dilate"][i],
                                window["rhs_dilate"][i])
          for i, d in enumerate(spatial))
    per_position = out[out_labels.index("b")] * out[out_labels.index("f")]
    return 2.0 * per_position * taps * kernel[kernel_labels.index("i")]
  return None


def custom_call_bytes(line: str, shape: str, shapes: dict[str, str]) -> float:
  """Bytes of a custom call from its shapes: its operands and its results (less a library
  call's trailing scratch buffer), what XLA's cost analysis cannot see."""
  operands = xla_internals.operand_arrays(line, "custom-call", shapes)
  return float(sum(xla_internals.array_bytes(*a) for a in operands)
               + sum(xla_internals.array_bytes(*a) for a in xla_internals.result_arrays(shape)))


def _custom_call_cost(cost: xla_internals.InstructionCost,
                      library_call_flops: Optional[Callable]) -> tuple[float, float]:
  """(FLOPs, bytes) of a custom call: the library's count when it knows the call, else a
  Pallas kernel's declared FLOPs (which libtpu counts too), else none; its operands' and
  results' bytes."""
  shapes = dict(zip(cost.operands, cost.operand_shapes))
  flops = library_call_flops(cost.line, cost.shape, shapes) if library_call_flops else None
  if flops is None:
    flops = xla_internals.mosaic_declared_flops(cost.line)
  return float(flops or 0.0), custom_call_bytes(cost.line, cost.shape, shapes)


def instructions(hlo_text: str, library_call_flops: Optional[Callable] = None) -> tuple[list[dict], list[str]]:
  """Every instruction that runs: name, opcode, component, source, FLOPs, bytes, estimated
  cycles, result bytes; and the instructions XLA's parser refused (one line each)."""
  costs, failures = xla_internals.instruction_costs(hlo_text)
  out = []
  readers: dict[str, list[str]] = collections.defaultdict(list)
  for c in costs:
    for operand in c.operands:
      readers[operand].append(c.name)
  for c in costs:
    flops, nbytes = c.flops, c.bytes_accessed
    if c.opcode == "custom-call":
      flops, nbytes = _custom_call_cost(c, library_call_flops)
    out.append({"name": c.name, "opcode": c.opcode, "component": component_of(c.op_name, c.opcode),
                "source": xla_internals.op_name_source(c.op_name), "flops": float(flops), "bytes": float(nbytes),
                "estimated_cycles": c.estimated_cycles,
                "result_bytes": xla_internals.shape_bytes(c.shape) if c.opcode not in ("tuple", "bitcast") else 0,
                "readers": readers.get(c.name, []), "operands": c.operands})
  _charge_unnamed(out)
  return out, failures


def _charge_unnamed(found: list[dict]) -> None:
  """Instructions without an op_name (libtpu's copies between memory spaces, which
  prefetch a kernel's operands; layout copies) go to the component of the instruction
  that reads their result, else of the one that wrote their operand (followed through
  chains of such copies); what neither names stays OTHER."""
  by_name = {i["name"]: i for i in found}
  changed = True
  while changed:
    changed = False
    for i in found:
      if i["component"] != OTHER:
        continue
      for neighbour in i["readers"] + list(i["operands"]):
        component = by_name[neighbour]["component"] if neighbour in by_name else OTHER
        if component != OTHER:
          i["component"], i["charged_via"] = component, neighbour
          changed = True
          break


def breakdown(hlo_text: str, compiler_totals: dict[str, float], module_totals: Optional[dict[str, float]] = None,
              library_call_flops: Optional[Callable] = None, heaviest: int = HEAVIEST) -> dict[str, Any]:
  """FLOPs, bytes and estimated cycles per component, their sum against the totals, the
  `heaviest` instructions by bytes and the largest buffers, each with its source.

  `compiler_totals`: the report's "flops" and "bytes accessed" (libtpu's on TPU; XLA's
  analysis plus library calls on GPU). `module_totals`: XLA's cost analysis of the
  whole module (the sum the parts must reproduce); None when it could not be run.
  """
  found, failures = instructions(hlo_text, library_call_flops)
  parts: dict[str, dict[str, Any]] = collections.defaultdict(
      lambda: {"flops": 0.0, "bytes": 0.0, "estimated_cycles": 0, "instructions": 0, "largest_buffer_bytes": 0})
  for i in found:
    part = parts[i["component"]]
    part["flops"] += i["flops"]
    part["bytes"] += i["bytes"]
    part["estimated_cycles"] += i["estimated_cycles"] or 0
    part["instructions"] += 1
    part["largest_buffer_bytes"] = max(part["largest_buffer_bytes"], i["result_bytes"])
  summed = {"flops": sum(p["flops"] for p in parts.values()), "bytes": sum(p["bytes"] for p in parts.values()),
            "estimated_cycles": sum(p["estimated_cycles"] for p in parts.values())}
  for part in parts.values():
    for key in ("flops", "bytes", "estimated_cycles"):
      part[f"{key}_share"] = part[key] / summed[key] if summed[key] else None
  compiler = {"flops": float(compiler_totals.get("flops", 0.0)),
              "bytes": float(compiler_totals.get("bytes accessed", 0.0))}
  out: dict[str, Any] = {
      "components": dict(sorted(parts.items(), key=lambda kv: -kv[1]["bytes"])),
      "sum": summed,
      "compiler": compiler,
      "sum_over_compiler": {k: (summed[k] / v if v else None) for k, v in compiler.items()},
      "not_costed": failures,
      "heaviest": [{k: i.get(k) for k in ("name", "opcode", "component", "source", "charged_via", "bytes", "flops",
                                          "estimated_cycles")}
                   for i in sorted(found, key=lambda i: -i["bytes"])[:heaviest]],
      "largest_buffers": [{k: i[k] for k in ("name", "opcode", "component", "source", "result_bytes")}
                          for i in sorted(found, key=lambda i: -i["result_bytes"])[:heaviest]],
  }
  if module_totals is not None:
    # The custom calls' -1s are XLA's "unknown"; the parts carry them costed from shapes instead.
    calls = [i for i in found if i["opcode"] == "custom-call"]
    module = {"flops": float(module_totals.get("flops", 0.0)) + len(calls) + sum(i["flops"] for i in calls),
              "bytes": float(module_totals.get("bytes accessed", 0.0)) + len(calls) + sum(i["bytes"] for i in calls)}
    out["module"] = module
    out["sum_over_module"] = {k: (summed[k] / v if v else None) for k, v in module.items()}
    out["within_tolerance"] = all(v is not None and abs(v - 1.0) <= COVERAGE_TOLERANCE
                                  for v in out["sum_over_module"].values())
  return out


def of_hlo(hlo_text: str, compiler_totals: dict[str, float], library_call_flops: Optional[Callable] = None,
           heaviest: int = HEAVIEST) -> dict[str, Any]:
  """`breakdown` of an optimized module's text, its total from XLA's analysis of the whole module."""
  try:
    module_totals = xla_internals.module_cost_analysis(hlo_text)
  except Exception:  # noqa: BLE001  (the parts alone, said so by the missing "module")
    module_totals = None
  return breakdown(hlo_text, compiler_totals, module_totals, library_call_flops, heaviest)


def lines(b: dict[str, Any], heaviest: int = HEAVIEST) -> list[str]:
  """The printed breakdown: one line per component, the heaviest instructions, the totals' agreement."""
  tpu = b["sum"]["estimated_cycles"] > 0
  out = [f"  breakdown per component (XLA's cost analysis per instruction{'; libtpu cycles' if tpu else ''}):"]
  for name, p in b["components"].items():
    out.append(f"    {name:38s} {p['bytes'] / 1e9:9.3f} GB {100 * (p['bytes_share'] or 0):5.1f}%  "
               f"{p['flops'] / 1e12:8.4f} TFLOP {100 * (p['flops_share'] or 0):5.1f}%"
               + (f"  cycles {100 * (p['estimated_cycles_share'] or 0):5.1f}%" if tpu else "")
               + f"  largest buffer {p['largest_buffer_bytes'] / 2**20:,.1f} MiB")
  if "sum_over_module" in b:
    over = b["sum_over_module"]
    out.append(f"    parts / XLA's total of the module: bytes {over['bytes']:.4f}, FLOPs {over['flops']:.4f}"
               + ("" if b["within_tolerance"] else f" (OFF by more than {100 * COVERAGE_TOLERANCE:.0f}%)"))
  compiler = b["sum_over_compiler"]
  if compiler["bytes"] is not None:
    out.append(f"    parts / the report's totals: bytes {compiler['bytes']:.4f}, FLOPs {compiler['flops'] or 0:.4f}"
               + (" (libtpu counts bytes by its own model: the time view is its cycles)" if tpu else ""))
  if b["not_costed"]:
    out.append(f"    {len(b['not_costed'])} instructions not costed (XLA's parser refused them): "
               f"{b['not_costed'][0]}")
  out.append(f"  heaviest {min(heaviest, len(b['heaviest']))} instructions by bytes:")
  for i in b["heaviest"][:heaviest]:
    out.append(f"    {i['bytes'] / 1e9:8.3f} GB {i['flops'] / 1e9:9.1f} GFLOP {i['opcode']:12s} [{i['component']}] "
               f"{i['source'][:100] or 'no op_name, charged via ' + str(i.get('charged_via'))}")
  return out


def main(argv: Optional[list[str]] = None) -> int:
  """`python -m drifting_jax.scale.breakdown WORKDIR|REPORT.json [PROGRAM]`: the breakdown of a
  compile report's program (default train) from the optimized HLO the compile mode saved
  beside it, printed and written beside the report as <report>.<PROGRAM>.breakdown.json; no compile."""
  args = sys.argv[1:] if argv is None else argv
  if not args or args[0].startswith("-"):
    print(main.__doc__, file=sys.stderr)
    return 2
  path, program = pathlib.Path(args[0]), (args[1] if len(args) > 1 else "train")
  report_path = path if path.is_file() else path / "compile_report.json"  # a stored report (docs/compile/) or a workdir
  workdir = report_path.parent
  report = json.loads(report_path.read_text())
  entry = report["programs"].get(program)
  if entry is None or not entry.get("optimized_hlo"):
    print(f"{report_path} has no saved optimized HLO for {program!r} (compile it again with this "
          "version of the compile mode)", file=sys.stderr)
    return 2
  with gzip.open(workdir / entry["optimized_hlo"], "rt") as f:
    hlo = f.read()
  library = library_call_flops if "library_calls" in entry else None  # a GPU program's cuBLAS/cuDNN calls
  totals = {"flops": entry["flops_per_device"], "bytes accessed": entry["bytes_accessed_per_device"]}
  b = of_hlo(hlo, totals, library)
  (workdir / f"{report_path.stem}.{program}.breakdown.json").write_text(json.dumps(b, indent=2, default=float))
  print("\n".join(lines(b)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
