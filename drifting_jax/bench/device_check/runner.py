"""The device check's parent process and command line: budgets, one child process per check.

The parent (`run_all`) starts each check as `python -m drifting_jax.bench.device_check
--child NAME` in its own process group, bounded by its budget (wall-clock seconds on
the accelerator; CPU seconds at --cpu-smoke), reads the record the child keeps in
the work dir (rewritten after every phase, so a timeout keeps what was done) and
rewrites the report after every check. The child (`run_child`) runs one check and
exits through `os._exit`.

This module never imports JAX, nor the checks' modules (which import JAX at their
top): the child resolves its check from `CHECK_FUNCTIONS`, a table of module and
function names, with `importlib`, so only the children import them.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import importlib
import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Optional

from drifting_jax.bench.device_check.common import (DEFAULT_MNIST_VARIANT, FIRST_CLASSES, RELEASE_CLASSES,
                                                    _clu_without_tensorflow, _jsonable, _now, _Record)
from drifting_jax.bench.device_check.report import _markdown, _write_report

# Each check's function, (module, name), called as fn(record, args) in the check's
# child process. Names, not imports: the parent must not import the checks' modules,
# which import JAX (as drifting_jax/modes.py does for the modes).
CHECK_FUNCTIONS: dict[str, tuple[str, str]] = {
    "mnist": ("drifting_jax.bench.device_check.mnist", "check_mnist"),
    "ablation_step": ("drifting_jax.bench.device_check.ablation", "check_ablation_step"),
    "ablation_levers": ("drifting_jax.bench.device_check.ablation", "check_ablation_levers"),
    "losses": ("drifting_jax.bench.device_check.loss_library", "check_losses"),
    "ablation_release_batch": ("drifting_jax.bench.device_check.ablation", "check_ablation_release_batch"),
}
CHECKS = tuple(CHECK_FUNCTIONS)  # in the order they run
# Wall-clock seconds per check on the accelerator, start-up and compilation included:
# 10 minutes in all (the lent machine comes for about 15 minutes, its start included).
# The first H200 run: MNIST cannot leave FHM's 300 no-op warm-up steps in its budget
# (its step rate is the result), the ablation step compiles in 100-120 s, the loss
# library's timings took 29 s.
DEVICE_BUDGETS_S = {"mnist": 90, "ablation_step": 150, "ablation_levers": 150, "losses": 40,
                    "ablation_release_batch": 180}
# At --cpu-smoke the budgets are CPU seconds of each check (about 80 in all were used
# on 2 cores, compilation cache cold), and wall time is limited to SMOKE_WALL_FACTOR
# times that, so a crowded host slows the smoke run down without failing it.
SMOKE_BUDGETS_S = {"mnist": 90, "ablation_step": 120, "ablation_levers": 120, "losses": 60,
                   "ablation_release_batch": 90}
SMOKE_WALL_FACTOR = 6
# What a run writes in --out (launch/device_check.sh adds device_check.log).
RESULT_FILES = ("device_check.json", "device_check.md", "mnist_samples.png")


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


def _read_child_record(path: pathlib.Path) -> Optional[dict]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


_ACTIVE_CHILDREN: set = set()
# The children run from here so that `configs` (a folder at the root, not in the package) imports.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]


def _die_with_parent() -> None:
  """In the child, before exec: SIGKILL when the parent dies (Linux), so a check never
  outlives a parent that `timeout` killed and keeps holding the accelerator."""
  try:
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
  # The package's own name (not spelled out: the parent runs its children, it does not import them).
  cmd = [sys.executable, "-m", __package__, "--child", name, "--out", str(out),
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
                          cwd=str(_REPO_ROOT))
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


def _check_function(name: str):
  """The function of check `name`, its module imported now (in the child: it imports JAX)."""
  module, function = CHECK_FUNCTIONS[name]
  return getattr(importlib.import_module(module), function)


def run_child(args) -> int:
  rec = _Record(pathlib.Path(args.work_dir) / f"{args.child}.json", float(args.child_budget))
  rec.save()
  if args.cpu_smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before the check's module imports JAX
  try:
    # The checks' modules import the trainer, and so clu.metric_writers, at their top.
    _clu_without_tensorflow()
    check = _check_function(args.child)
    check(rec, args)
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
