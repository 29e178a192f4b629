"""The accelerator check (launch/device_check.sh, drifting_jax.bench.device_check) at toy sizes on the CPU.

The real check runs only when a GPU is lent; `--cpu-smoke` runs the same code path at
toy sizes so that it cannot rot between loans.
"""

import ast
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from drifting_jax.bench import device_check
from drifting_jax.bench.device_check import common, report as report_lib

pytestmark = pytest.mark.slow  # the accelerator check's CPU smoke and its subprocesses

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "device_check.sh"


def _env(**extra):
  # One CPU device, as the check has one accelerator (conftest asks for eight).
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OUT", "DRY_RUN")}
  env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu", **extra)
  return env


def _finite(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One --cpu-smoke run of the whole check through the shell script."""
  out = tmp_path_factory.mktemp("device_check_out")
  work = tmp_path_factory.mktemp("device_check_work")
  result = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out), "--work-dir", str(work)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=2500)
  report = json.loads((out / "device_check.json").read_text()) if (out / "device_check.json").exists() else None
  return result, out, report


@pytest.mark.e2e
def test_cpu_smoke_runs_every_check_and_reports_finite_numbers(smoke):
  result, out, report = smoke
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
  assert report["mode"] == "cpu-smoke" and report["finished"]
  assert list(report["checks"]) == list(device_check.CHECKS)
  for name, check in report["checks"].items():
    assert check["status"] == "ok", (name, check.get("status"), check.get("traceback"), check.get("output_tail"))
    assert check["budget_kind"] == "cpu" and _finite(check["seconds"]) and _finite(check["cpu_s"])
  assert report["machine"]["platform"] == "cpu" and report["machine"]["jax"]

  mnist = report["checks"]["mnist"]["result"]
  assert mnist["data"].startswith("mnist5k") and mnist["config"].startswith("configs/mnist_dit_s2.py")
  assert mnist["schedule_steps"] == 12_000  # the paper's schedule, cut short by the step budget
  assert 4 <= mnist["steps_trained"] < mnist["schedule_steps"]
  for key in ("train_wall_s", "step_ms_median", "step_ms_mean", "projected_minutes_12k", "accuracy",
              "frechet_distance", "precision", "recall", "classifier_validation_accuracy"):
    assert _finite(mnist[key]), (key, mnist.get(key))
  assert (out / "mnist_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  step = report["checks"]["ablation_step"]["result"]
  assert step["remat"] is False and step["classes"] == 4
  for key in ("step_s", "steps_per_s", "tflop_per_step_xla", "achieved_tflops", "loss", "compile_s"):
    assert _finite(step[key]) and step[key] > 0, (key, step.get(key))
  assert step["mfu"] is None  # no bf16 peak is known for a CPU
  for key in ("loss_alone_s", "loss_share_alone", "trivial_loss_step_s", "loss_share_trivial"):
    assert _finite(step[key]), (key, step.get(key))

  # The levers beside the defaults: on a CPU the old defaults compute as the new ones
  # (attention "auto" is xla there) and the GPU/TPU kernels are not for it.
  levers = report["checks"]["ablation_levers"]["result"]
  assert list(levers["variants"]) == ["defaults", "generator remat dots"]
  assert levers["skipped"]["old defaults"] == "computes as the defaults do on this device"
  assert levers["skipped"]["attention cudnn"].startswith("not for cpu")
  assert levers["skipped"]["loss pallas"].startswith("not for cpu")
  assert levers["skipped"]["loss xla"] == "computes as the defaults do on this device"
  dots = levers["variants"]["generator remat dots"]
  assert dots["computed_as"]["remat_policy"] == "dots" and _finite(dots["step_over_defaults"])
  # Remat recomputes the same function: the same loss on the same batch and weights.
  assert dots["loss"] == pytest.approx(levers["variants"]["defaults"]["loss"], rel=1e-5)

  # The release's batch with train.microbatches=auto (4 classes at toy size; on a CPU auto is 1).
  release = report["checks"]["ablation_release_batch"]["result"]
  assert release["microbatches"] == 1 and release["tried"][0]["fits"] and _finite(release["step_s"])
  assert release["auto_pick"].startswith("train.microbatches=auto: 1")

  shapes = report["checks"]["losses"]["result"]["shapes"]
  assert len(shapes) == 2
  for row in shapes:
    assert set(row["ratio_to_matmul"]) == {"matmul", "log_kde", "corrected", "release"}
    assert all(_finite(v) and v > 0 for v in row["seconds"].values())

  summary = report["summary"]
  assert set(summary) >= {"mnist", "ablation", "levers", "release_batch", "losses", "targets"}
  markdown = (out / "device_check.md").read_text()
  for heading in ("Paper-scale MNIST", "ImageNet ablation step", "The step's levers beside its defaults",
                  "The release's batch on this device", "Loss library",
                  "Targets"):
    assert heading in markdown
  assert (out / "device_check.log").stat().st_size > 0
  # The output folder stays within what the device runner brings back (at most 8 files).
  assert sorted(p.name for p in out.iterdir()) == sorted(device_check.RESULT_FILES + ("device_check.log",))


def test_a_check_over_its_budget_is_recorded_as_timeout_and_the_report_is_still_written(tmp_path):
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "drifting_jax.bench.device_check", "--cpu-smoke", "--out", str(out), "--work-dir",
       str(tmp_path / "work"), "--only", "losses", "--budget", "losses=0.5"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  report = json.loads((out / "device_check.json").read_text())
  assert report["checks"]["losses"]["status"] == "timeout" and report["finished"]
  assert report["checks"]["losses"]["stopped_at"] in ("CPU budget of 0.5 s", "wall-clock limit of 3 s")
  assert "losses | timeout" in (out / "device_check.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--only", "nope"], "unknown check"),
    (["--budget", "mnist"], "NAME=SECONDS"),
    (["--budget", "mnist=-3"], "must be > 0"),
    (["--budget", "mnist=soon"], "not a number"),
    (["--ablation-classes", "-1"], ">= 1"),
    (["--only", "losses", "--skip", "losses"], "no check left"),
])
def test_bad_arguments_are_refused_with_a_reason(tmp_path, args, message):
  result = subprocess.run([sys.executable, "-m", "drifting_jax.bench.device_check", "--out", str(tmp_path), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and message in result.stderr
  assert not (tmp_path / "device_check.json").exists()


def test_the_parent_side_imports_neither_jax_nor_the_checks():
  """The parent process (the package, runner, report, common) never starts a JAX runtime:
  the checks' modules, which import JAX at their top, are imported only in the children."""
  checks = sorted({module for module, _ in device_check.CHECK_FUNCTIONS.values()})
  heavy = ["jax", "jaxlib", "numpy", "clu", "ml_collections", "configs", "drifting_jax.train",
           "drifting_jax.bench.device_check.child_common", *checks]
  code = ("import sys, drifting_jax.bench.device_check, drifting_jax.bench.device_check.runner, "
          "drifting_jax.bench.device_check.report, drifting_jax.bench.device_check.common\n"
          f"loaded = [m for m in {heavy!r} if m in sys.modules]\n"
          "assert not loaded, loaded\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr[-3000:]


def test_every_check_names_a_function_of_its_module():
  """CHECK_FUNCTIONS holds names (the parent must not import the checks): each names a real function."""
  assert device_check.CHECKS == tuple(device_check.CHECK_FUNCTIONS)
  assert not hasattr(device_check, "check_mnist")  # the checks are imported from their modules
  for name, (module, function) in device_check.CHECK_FUNCTIONS.items():
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, (name, module, function)


def test_shell_script_rejects_unknown_arguments_and_dry_runs_the_pinned_install():
  bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown argument: --bogus" in bad.stderr
  assert "bash launch/device_check.sh [--out DIR]" in bad.stderr  # the usage text
  pin = next(l.split("==")[1].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
             if l.startswith("jax=="))
  dry = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", "/tmp/o", "--budget", "mnist=100"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, check=True)
  cmds = [shlex.split(line) for line in dry.stdout.splitlines() if line.strip()]
  assert cmds[0][1:] == ["-m", "venv", ".venv-device"]
  assert f"jax[cuda12]=={pin}" in cmds[1] and "requirements.txt" in cmds[1]
  assert cmds[-1][:2] == ["timeout", "--kill-after=20"]
  assert cmds[-1][3:] == [".venv-device/bin/python", "-m", "drifting_jax.bench.device_check", "--out", "/tmp/o",
                          "--budget", "mnist=100"]
  smoke = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--dry-run"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, check=True)
  (cmd,) = [shlex.split(line) for line in smoke.stdout.splitlines() if line.strip()]
  assert cmd[3] == sys.executable and cmd[-1] == "--cpu-smoke"


def test_summary_and_markdown_from_a_partial_report():
  """The report renders whatever finished: targets from the ablation numbers, n/a for the rest."""
  report = {
      "mode": "device", "started": "t0", "finished": None, "environment": {"mode": "offline", "note": ""},
      "machine": {"device_kind": "NVIDIA H100 80GB HBM3", "peak_bf16_tflops": 989.0},
      "checks": {
          "mnist": {"status": "timeout", "seconds": 160.0, "budget_s": 160, "result": {"steps_trained": 500},
                    "output_tail": ["step 500"]},
          "ablation_step": {"status": "ok", "seconds": 100.0, "budget_s": 140, "result": {
              "remat": False, "classes": 8, "gen_per_class": 64, "pos_per_class": 64, "neg_per_class": 16,
              "step_s": 0.5, "steps_per_s": 2.0, "tflop_per_step_xla": 250.0, "achieved_tflops": 500.0,
              "mfu": 500 / 989, "peak_memory_gib": 60.0, "loss_share_alone": 0.04, "loss_share_trivial": 0.12}},
          "ablation_levers": {"status": "ok", "seconds": 140.0, "budget_s": 150, "result": {
              "classes": 4, "skipped": {"attention splash": "not for gpu devices"},
              "variants": {
                  "defaults": {"step_s": 0.30, "compiled_memory_gib": 60.0,
                               "computed_as": {"attention_impl": "xla", "remat_policy": "none"}},
                  "attention cudnn": {"step_s": 0.24, "step_over_defaults": 0.8, "compiled_memory_gib": 40.0,
                                      "computed_as": {"attention_impl": "cudnn", "remat_policy": "none"}},
                  "generator remat full": {"error": "does not fit in device memory at these classes"}}}},
      }}
  summary = report_lib._summary(report)
  report["summary"] = summary
  assert summary["levers"]["variants"]["attention cudnn"]["step_over_defaults"] == 0.8
  met = {t["target"]: t["met"] for t in summary["targets"]}
  assert met["MFU >= 40% (ablation_step, XLA-counted FLOPs)"] is True
  assert met["loss share of the step < 10% (ablation_step, alone)"] is True
  assert met["loss share of the step < 10% (ablation_step, trivial)"] is False
  text = report_lib._markdown(report)
  assert "| mnist | timeout | 160 | 160 s | n/a | n/a to n/a |" in text and "n/a" in text and "step 500" in text
  assert "| attention cudnn | attention_impl cudnn, remat_policy none | 0.240 | 0.800 | 40.0 |" in text
  assert "does not fit in device memory" in text and "* attention splash: not timed, not for gpu devices" in text
  assert common._peak_for("NVIDIA H100 PCIe") == 756.0 and common._peak_for("NVIDIA H200") == 989.0
  assert common._peak_for("cpu") is None
