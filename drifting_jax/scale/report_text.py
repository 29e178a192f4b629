"""The compile report's words: the printed table, the fit verdicts, the compiler's out-of-memory messages.

Nothing here compiles or counts: it turns a report (a dict that `compile_mode`
assembles from `analysis` and `flops`) and the compiler's own messages into lines a
person reads. Every time in them is labelled as the compiler's estimate or a
roofline, never as a measurement.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from drifting_jax.scale import breakdown, targets as targets_lib

GIB = 2**30


def estimate_label(target: targets_lib.Target) -> str:
  if target.chip.platform == "cuda":  # the GPU compiler gives no time estimate (scale/analysis.py)
    return "roofline estimate (FLOPs and bytes from the compiled program), not a measurement"
  return "compiler's estimate, not a measurement"


def device_name(target: targets_lib.Target) -> str:
  """One device of the target in a verdict: "v6e chip", "v4 TensorCore", "H100 GPU"."""
  if target.chip.platform == "cuda":
    word = "GPU"
  else:
    word = "chip" if target.chip.devices_per_chip == 1 else "TensorCore"
  return f"{target.chip.generation} {word}"


# The compiler's two ways of saying it: "Used 40.1G of 31.25G hbm" and "memory required
# for HLO temporaries (1.33T) exceeds available HBM (15.75G)".
_HBM_NUMBERS = (re.compile(r"Used\s+([0-9.]+)([KMGT]?)\s+of\s+([0-9.]+)([KMGT]?)\s+hbm", re.IGNORECASE),
                re.compile(r"required for (HLO \w+) \(([0-9.]+)([KMGT]?)\) exceeds available HBM \(([0-9.]+)([KMGT]?)\)",
                           re.IGNORECASE))
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def is_out_of_memory(text: str) -> bool:
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def out_of_memory_verdict(text: str, what: str, target: targets_lib.Target) -> str:
  """One line from the compiler's refusal of a program for lack of HBM."""
  used, required = (pattern.search(text) for pattern in _HBM_NUMBERS)
  capacity = target.chip.device_hbm_bytes
  device = device_name(target)
  if used or required:
    number, unit = (used.group(1), used.group(2)) if used else (required.group(2), required.group(3))
    need = float(number) * _UNITS[unit.upper()]
    what_needs = "" if used else f" for {required.group(1).replace('HLO ', '')} alone"
    return (f"{what} does not fit: needs {need / GIB:,.2f} GiB{what_needs} per {device}, which has "
            f"{capacity / GIB:.0f} GiB ({(need - capacity) / GIB:,.2f} GiB over; the compiler ran out of HBM)")
  first = next((line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line), text.splitlines()[0])
  return f"{what} does not fit in the {capacity / GIB:.0f} GiB of a {device}: {first.strip()[:300]}"


def header_line(target: targets_lib.Target, mesh_shape: dict, devices: int, report: dict[str, Any]) -> str:
  compiler = (f"jax-cuda12-plugin {report.get('jax_cuda12_plugin')}" if target.chip.platform == "cuda"
              else f"libtpu {report.get('libtpu')}")
  return (f"{target.name} ({target.topology_name}, {target.hosts} hosts, {devices} devices, mesh "
          f"{mesh_shape}); jax {report['jax']}, {compiler}")


def program_lines(name: str, r: dict[str, Any]) -> list[str]:
  """The printed block of one compiled program: verdict, memory, FLOPs, time, collectives."""
  mem, time_, proj = r["memory"], r["time"], r.get("projection", {})
  flops = r.get("flops", {})
  ratio: Optional[float] = flops.get("compiler_over_analytical")
  lines = [
      f"{name}: {mem['verdict']}",
      f"  memory per device: arguments {mem['arguments_bytes'] / GIB:.2f} GiB, outputs {mem['outputs_bytes'] / GIB:.2f}"
      f" (aliased {mem['aliased_bytes'] / GIB:.2f}), temporaries {mem['temporaries_bytes'] / GIB:.2f}, code "
      f"{mem['code_bytes'] / GIB:.3f}; total {mem['total_bytes'] / GIB:.2f} of {mem['capacity_bytes'] / GIB:.0f} GiB",
      f"  FLOPs per device: compiler {flops.get('compiler_per_device', 0) / 1e12:.3f} T, analytical "
      f"{flops.get('analytical_per_device', 0) / 1e12:.3f} T" + (f" (ratio {ratio:.3f})" if ratio else ""),
      f"  step time (estimate): {time_['seconds'] * 1e3:.1f} ms [{time_['source']}]; roofline "
      f"{time_['roofline_seconds'] * 1e3:.1f} ms ({time_['bound']}-bound)",
  ]
  if r.get("microbatches", 1) != 1 or r.get("microbatches_choice"):
    features = f", features {r['microbatch_features']}" if r.get("microbatch_features") else ""
    lines.append(f"  microbatches: {r['microbatches']}{features}" + (f" ({r['microbatches_choice']})"
                                                          if r.get("microbatches_choice") else ""))
    if r.get("microbatch_caveat"):
      lines.append(f"  caveat: {r['microbatch_caveat']}")
  if proj.get("run_hours") is not None:
    rate = proj.get("generated_images_per_second") or proj.get("images_per_second")
    lines.append(f"  projected (estimate): {rate:,.0f} images/s, {proj['total_steps']:,} steps in "
                 f"{proj['run_hours']:.1f} h, MFU {100 * (proj['mfu'] or 0):.1f}%")
  if "loss_share" in r:
    share = r["loss_share"]["share"]
    lines.append(f"  loss share (estimate, vs a trivial objective): {100 * share:.1f}% of the step time")
  coll = {k: v for k, v in r["collectives"].items() if v["count"]}
  lines.append("  collectives per step: " + (", ".join(f"{k} {v['count']}x {v['bytes'] / GIB:.3f} GiB"
                                                      for k, v in coll.items()) or "none"))
  for source in r.get("collective_sources", [])[:3]:  # the rest: compile_report.json
    lines.append(f"    {source['op']} {source['count']}x {source['bytes'] / GIB:.3f} GiB from {source['source'][:90]}")
  parts = r.get("breakdown") or {}
  if "error" in parts:
    lines.append(f"  breakdown: none ({parts['error']})")
  elif parts:
    lines += breakdown.lines(parts)
  return lines
