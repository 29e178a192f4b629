"""The device check's report: the summary and targets, device_check.json and device_check.md.

Built from whatever checks finished, so a timeout or a crash still leaves a report.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any

from drifting_jax.bench.device_check.common import _jsonable, _write_json_atomically

TARGET_MFU = 0.40
TARGET_LOSS_SHARE = 0.10


def _summary(report: dict) -> dict:
  """The headline numbers and the issue's targets, from whatever checks finished."""
  checks = report["checks"]
  summary: dict[str, Any] = {}
  mnist = checks.get("mnist", {}).get("result", {})
  if mnist:
    summary["mnist"] = {k: mnist.get(k) for k in (
        "config", "steps_trained", "schedule_steps", "step_ms_median", "step_ms_mean", "projected_minutes_12k",
        "accuracy", "frechet_distance", "precision", "recall")}
  rows = {}
  res = checks.get("ablation_step", {}).get("result", {})
  if res:
    rows["ablation_step"] = {k: res.get(k) for k in (
        "remat", "classes", "step_s", "steps_per_s", "tflop_per_step_xla", "achieved_tflops", "mfu",
        "peak_memory_gib", "loss_share_alone", "loss_share_trivial")}
  if rows:
    summary["ablation"] = rows
  levers = checks.get("ablation_levers", {}).get("result", {})
  if levers.get("variants"):
    summary["levers"] = {"classes": levers.get("classes"), "skipped": levers.get("skipped"),
                         "variants": {name: {k: v.get(k) for k in ("step_s", "step_over_defaults",
                                                                     "compiled_memory_gib", "computed_as", "error")}
                                      for name, v in levers["variants"].items()}}
  release = checks.get("ablation_release_batch", {}).get("result", {})
  if release:
    summary["release_batch"] = {k: release.get(k) for k in (
        "classes", "microbatches", "microbatch_features", "step_s", "generated_samples_per_s", "auto_pick", "tried")}
  losses = checks.get("losses", {}).get("result", {})
  if losses.get("shapes"):
    summary["losses"] = [{"shape": r["label"], **{f"{k}_over_matmul": v for k, v in r["ratio_to_matmul"].items()
                                                  if k != "matmul"}, "matmul_ms": r["seconds"]["matmul"] * 1e3}
                         for r in losses["shapes"]]
  targets = []
  for name, row in rows.items():
    mfu = row.get("mfu")
    targets.append({"target": f"MFU >= {TARGET_MFU:.0%} ({name}, XLA-counted FLOPs)", "measured": mfu,
                    "met": None if mfu is None else bool(mfu >= TARGET_MFU)})
    for key in ("loss_share_alone", "loss_share_trivial"):
      share = row.get(key)
      if share is not None:
        targets.append({"target": f"loss share of the step < {TARGET_LOSS_SHARE:.0%} ({name}, {key[11:]})",
                        "measured": share, "met": bool(share < TARGET_LOSS_SHARE)})
  if targets:
    summary["targets"] = targets
  return summary


def _fmt(x: Any, spec: str = ".3g", scale: float = 1.0, suffix: str = "") -> str:
  if x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
    return "n/a"
  x = x * scale
  return f"{int(round(x)) if spec.endswith('d') else x:{spec}}{suffix}"


def _markdown(report: dict) -> str:
  m = report.get("machine", {})
  env = report.get("environment") or {}
  lines = [f"# Device check ({report['mode']})", "",
           f"Started {report['started']}, {'finished ' + report['finished'] if report.get('finished') else 'running'}. "
           f"Device: {m.get('device_kind', 'n/a')} ({m.get('backend', 'n/a')}, {m.get('num_devices', 'n/a')} "
           f"device(s)); jax {m.get('jax', 'n/a')}, jaxlib {m.get('jaxlib', 'n/a')}, flax {m.get('flax', 'n/a')}; "
           f"dense bf16 peak {_fmt(m.get('peak_bf16_tflops'), 'g')} TFLOP/s.", ""]
  if env:
    lines += [f"Environment: {env.get('mode', 'n/a')}. {env.get('note', '')}".rstrip(), ""]
  lines += ["| check | status | seconds | budget | CPU s | host load (1 min) |", "|---|---|---|---|---|---|"]
  for name, c in report["checks"].items():
    status = c["status"].replace("|", "/").splitlines()[0][:160]
    load = c.get("load_average_1min") or [None, None]
    budget = _fmt(c.get("budget_s"), ".0f") + (" CPU s" if c.get("budget_kind") == "cpu" else " s")
    lines.append(f"| {name} | {status} | {_fmt(c.get('seconds'), '.0f')} | {budget} | "
                 f"{_fmt(c.get('cpu_s'), '.0f')} | {_fmt(load[0], '.1f')} to {_fmt(load[-1], '.1f')} |")
  checks = report["checks"]

  mn = checks.get("mnist", {}).get("result", {})
  if mn:
    lines += ["", "## Paper-scale MNIST", "",
              f"`{mn.get('config', 'n/a')}` on {mn.get('data', 'n/a')}.",
              f"Trained {_fmt(mn.get('steps_trained'), ',d')} of the {_fmt(mn.get('schedule_steps'), ',d')}-step "
              f"schedule in {_fmt(mn.get('train_wall_s'), '.0f')} s ({mn.get('stop_reason', 'n/a')}); "
              f"step time {_fmt(mn.get('step_ms_median'), '.1f')} ms median, {_fmt(mn.get('step_ms_mean'), '.1f')} ms "
              f"mean with logging, checkpoints and sample grids; start-up and compilation about "
              f"{_fmt(mn.get('startup_s'), '.0f')} s. **Projected full 12,000-step run: "
              f"{_fmt(mn.get('projected_minutes_12k'), '.1f')} minutes.**",
              f"Learning rate at the stop: {_fmt(mn.get('learning_rate_at_stop'), '.3g')}."
              + (f" **Note: {mn['untrained']}.**" if mn.get("untrained") else ""),
              f"Evaluation ({_fmt(mn.get('num_samples'), 'd')} samples against the held-out digits, in the "
              f"project classifier's features; classifier accuracy on unseen digits "
              f"{_fmt(mn.get('classifier_validation_accuracy'), '.3f')}): accuracy {_fmt(mn.get('accuracy'), '.3f')}, "
              f"Frechet distance {_fmt(mn.get('frechet_distance'), '.1f')}, precision {_fmt(mn.get('precision'), '.3f')}, "
              f"recall {_fmt(mn.get('recall'), '.3f')}, coverage {_fmt(mn.get('coverage'), '.3f')}."]
    if mn.get("sample_grid"):
      lines += ["", f"![samples]({mn['sample_grid']})"]

  rows = report.get("summary", {}).get("ablation", {})
  if rows:
    lines += ["", "## ImageNet ablation step (DiT-B/2 + latent-MAE-256, log-KDE)", "",
              "| variant | classes x (gen, pos, neg) | step s | steps/s | TFLOP/step (XLA) | TFLOP/s | MFU | "
              "peak memory GiB | loss share: alone / trivial-loss step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
      res = checks[name]["result"]
      shape = f"{_fmt(r.get('classes'), 'd')} x ({res.get('gen_per_class')}, {res.get('pos_per_class')}, " \
              f"{res.get('neg_per_class')})"
      mfu = _fmt(r.get("mfu"), ".1%")
      lines.append(f"| {name} | {shape} | {_fmt(r.get('step_s'), '.3f')} | {_fmt(r.get('steps_per_s'), '.2f')} | "
                   f"{_fmt(r.get('tflop_per_step_xla'), '.3g')} | {_fmt(r.get('achieved_tflops'), '.3g')} | {mfu} | "
                   f"{_fmt(r.get('peak_memory_gib'), '.1f')} | {_fmt(r.get('loss_share_alone'), '.1%')} / "
                   f"{_fmt(r.get('loss_share_trivial'), '.1%')} |")
    notes = [checks[n]["result"].get("note") for n in rows if checks[n]["result"].get("note")]
    lines += [""] + [f"* {n}" for n in notes]

  levers = report.get("summary", {}).get("levers")
  if levers:
    lines += ["", f"## The step's levers beside its defaults ({_fmt(levers.get('classes'), 'd')} classes, one process)",
              "", "| variant | computed as | step s | step / defaults | compiled memory GiB |", "|---|---|---|---|---|"]
    for name, v in levers["variants"].items():
      how = ", ".join(f"{k} {val}" for k, val in (v.get("computed_as") or {}).items())
      lines.append(f"| {name} | {how} | {_fmt(v.get('step_s'), '.3f')} | {_fmt(v.get('step_over_defaults'), '.3f')} | "
                   f"{_fmt(v.get('compiled_memory_gib'), '.1f')}" + (f" ({v['error']})" if v.get("error") else "")
                   + " |")
    lines += [""] + [f"* {name}: not timed, {why}" for name, why in (levers.get("skipped") or {}).items()]

  release = checks.get("ablation_release_batch", {}).get("result", {})
  if release:
    lines += ["", "## The release's batch on this device (train.microbatches=auto)", "",
              f"{release.get('auto_pick', 'n/a')}. Step {_fmt(release.get('step_s'), '.3f')} s, "
              f"{_fmt(release.get('generated_samples_per_s'), '.0f')} generated samples/s. Compiled: "
              + "; ".join(f"{t['microbatches']} chunks {_fmt(t.get('compiled_memory_gib'), '.1f')} GiB "
                          f"({'fits' if t.get('fits') else 'does not fit'})" for t in release.get("tried", []))
              + "."] + [f"* {n}" for n in release.get("notes", [])]

  losses = checks.get("losses", {}).get("result", {}).get("shapes")
  if losses:
    names = [k for k in losses[0]["ratio_to_matmul"] if k != "matmul"]
    lines += ["", "## Loss library (fwd+bwd as a multiple of one distance matmul)", "",
              "| shape | matmul ms | " + " | ".join(names) + " | release / log_kde |",
              "|---|---|" + "---|" * len(names) + "---|"]
    for r in losses:
      ratios = " | ".join(_fmt(r["ratio_to_matmul"].get(n), ".2f") for n in names)
      lines.append(f"| {r['label']} | {_fmt(r['seconds']['matmul'], '.3f', 1e3)} | {ratios} | "
                   f"{_fmt(r.get('release_over_log_kde'), '.2f')} |")

  targets = report.get("summary", {}).get("targets")
  if targets:
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in targets:
      met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
      lines.append(f"| {t['target']} | {_fmt(t['measured'], '.1%')} | {met} |")
  failed = {n: c for n, c in checks.items() if c["status"] != "ok"}
  if failed:
    lines += ["", "## Problems", ""]
    for n, c in failed.items():
      tail = (c.get("traceback") or "\n".join(c.get("output_tail", [])))[-1500:]
      lines += [f"`{n}`: {c['status']}", "", "```", tail, "```", ""]
  return "\n".join(lines) + "\n"


def _write_report(out: pathlib.Path, report: dict) -> None:
  report["summary"] = _summary(report)
  _write_json_atomically(out / "device_check.json", report)
  tmp = out / ".device_check.md.tmp"
  tmp.write_text(_markdown(_jsonable(report)))
  os.replace(tmp, out / "device_check.md")
