"""Tables of docs/scaling.md from the compile reports in docs/compile/.

    python -m scripts.scaling_report [--reports docs/compile] [--out docs/compile/tables.md]

Each `ours_<name>.json` is a `compile_report.json` of `--mode=compile`
(launch/compile_check.sh). Everything in them is the TPU compiler's estimate or a
roofline, never a measurement, and the tables say so.

"Largest classes per step" is extrapolated from one compile, not compiled: the
per-chip arguments and code (parameters, optimizer state, frozen features, program)
do not depend on the batch; the temporaries are taken proportional to the classes
per step (activations of generated, positive and negative samples dominate them).
Classes per step must divide among the slice's hosts.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from drifting_jax.scale import analysis, targets

GIB = 2**30


def largest_classes(program: dict, hosts: int) -> int | None:
  mem = program["memory"]
  classes = program["batch"]["classes_per_step"]
  fixed = mem["arguments_bytes"] + mem["outputs_bytes"] - mem["aliased_bytes"] + mem["code_bytes"]
  per_class = mem["temporaries_bytes"] / classes
  if per_class <= 0:
    return None
  room = mem["capacity_bytes"] - fixed
  if room <= 0:
    return 0
  return int(room / per_class) // hosts * hosts  # classes divide among the hosts


def refresh(report: dict) -> dict:
  """Re-derives each program's time estimate from its stored cost analysis with the current
  rule (`analysis.step_time_estimate`), and the projections from it."""
  target = targets.parse(report["target"]["name"])
  for p in report["programs"].values():
    p["time"] = analysis.step_time_estimate(p["cost_analysis"], target, p.get("custom_calls", {}))
    proj, s = p.get("projection"), p["time"]["seconds"]
    if proj and p.get("microbatches", 1) > 1:  # a chunked step's time is undercounted: no projection
      p["projection"] = {k: (None if k in ("step_seconds", "generated_images_per_second", "images_per_second",
                                           "run_hours", "mfu") else v) for k, v in proj.items()}
      continue
    if not proj:
      continue
    images = (p["batch"].get("generated_per_step") or p["batch"].get("samples_per_step")
              or p["batch"].get("batch_size"))
    if "devices_per_program" in p:  # per-host sampling runs on every host at once; global, once (x 1)
      images *= report["target"]["devices"] // p["devices_per_program"]
    key = "images_per_second" if "images_per_second" in proj else "generated_images_per_second"
    proj.update(step_seconds=s, **{key: images / s})
    if "total_steps" in proj:
      proj["run_hours"] = s * proj["total_steps"] / 3600.0
    analytical = p.get("flops", {}).get("analytical_per_device")
    if analytical:
      proj["mfu"] = analytical / (target.chip.device_peak_flops * s)
    share = p.get("loss_share")
    if share and "time_trivial_objective" in share:
      trivial = analysis.step_time_estimate({"optimal_seconds": share["time_trivial_objective"]["optimal_seconds_raw"],
                                             "flops": p["cost_analysis"].get("flops", 0.0)}, target,
                                            {analysis.CONCAT_BITCAST: share["time_trivial_objective"].get(
                                                "concat_bitcast_calls", 0)})
      share["share"] = (s - trivial["seconds"]) / s
    elif share:
      share["share"] = None  # older reports: the trivial step's custom calls were not kept
  return report


def rows(reports: dict[str, dict]) -> list[str]:
  out = ["| run | slice | mesh | program | per-chip memory (GiB) | verdict | compiler TFLOP/chip | analytical "
         "TFLOP/chip | est. step (ms) | source | est. images/s | est. run (h) | est. MFU | loss share |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in sorted(reports.items()):
    target = r["target"]
    mesh = "x".join(str(v) for v in r["mesh"].values())
    for program, p in r["programs"].items():
      mem, time_, proj = p["memory"], p["time"], p.get("projection", {})
      flops = p.get("flops", {})
      rate = proj.get("generated_images_per_second") or proj.get("images_per_second")
      share_info = p.get("loss_share", {})
      share = share_info.get("share")
      flops_share = share_info.get("flops_share")
      source = ("roofline" if time_["source"].startswith("roofline") else
                "compiler + ConcatBitcast correction" if "ConcatBitcast" in time_["source"] else "compiler")
      out.append(
          f"| {name} | {target['name']} | {mesh} | {program} | {mem['total_bytes'] / GIB:.2f} / "
          f"{mem['capacity_bytes'] / GIB:.0f} | {'fits' if mem['fits'] else 'does not fit'} | "
          f"{flops.get('compiler_per_device', 0) / 1e12:.2f} | {flops.get('analytical_per_device', 0) / 1e12:.2f} | "
          f"{time_['seconds'] * 1e3:.1f}{' (chunks undercounted)' if p.get('microbatches', 1) > 1 else ''} | "
          f"{source} | {'' if rate is None else format(rate, ',.0f')} | "
          f"{'' if proj.get('run_hours') is None else format(proj['run_hours'], '.1f')} | "
          f"{'' if proj.get('mfu') is None else format(100 * proj['mfu'], '.0f') + '%'} | "
          f"{'' if share is None else f'time {100 * share:.0f}%'}"
          f"{'' if flops_share is None else f' FLOPs {100 * flops_share:.1f}%'} |")
  return out


def memory_rows(reports: dict[str, dict]) -> list[str]:
  out = ["| run | program | arguments | outputs (aliased) | temporaries | code | total | largest classes/step "
         "(extrapolated) |", "|---|---|---|---|---|---|---|---|"]
  for name, r in sorted(reports.items()):
    for program, p in r["programs"].items():
      m = p["memory"]
      largest = (largest_classes(p, r["target"]["hosts"])
                 if program == "train" else None)
      out.append(f"| {name} | {program} | {m['arguments_bytes'] / GIB:.2f} | {m['outputs_bytes'] / GIB:.2f} "
                 f"({m['aliased_bytes'] / GIB:.2f}) | {m['temporaries_bytes'] / GIB:.2f} | {m['code_bytes'] / GIB:.3f} | "
                 f"{m['total_bytes'] / GIB:.2f} | {'' if largest is None else largest} |")
  return out


def collective_rows(reports: dict[str, dict]) -> list[str]:
  out = ["| run | program | all-gather | reduce-scatter | all-reduce | all-to-all | collective-permute |",
         "|---|---|---|---|---|---|---|"]
  for name, r in sorted(reports.items()):
    for program, p in r["programs"].items():
      c = p["collectives"]
      cells = [f"{c[k]['count']} / {c[k]['bytes'] / GIB:.2f} GiB" for k in
               ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")]
      out.append(f"| {name} | {program} | " + " | ".join(cells) + " |")
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reports", default="docs/compile")
  parser.add_argument("--out", default="docs/compile/tables.md")
  args = parser.parse_args(argv)
  reports = {p.stem[len("ours_"):]: refresh(json.loads(p.read_text()))
             for p in sorted(pathlib.Path(args.reports).glob("ours_*.json"))}
  text = "\n".join(["All numbers are the TPU compiler's (libtpu) estimates or a roofline, per chip; none is measured.",
                    "", *rows(reports), "", *memory_rows(reports), "", *collective_rows(reports), ""])
  pathlib.Path(args.out).write_text(text)
  print(text)


if __name__ == "__main__":
  main()
