"""Launch scripts: syntax, dry-run commands, and a real 2-process run on 127.0.0.1."""

import os
import pathlib
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # multi-process runs through the launchers

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(PYTHON=sys.executable, **extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", str(script)], check=True)


# device_check.sh takes no required arguments (without any it runs the accelerator
# check); tests/test_device_check.py covers its usage and argument errors.
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name not in ("common.sh", "device_check.sh")],
                         ids=lambda p: p.name)
def test_scripts_document_their_variables_and_reject_missing_arguments(script):
  header = script.read_text().split("set -euo pipefail")[0]
  assert "usage" in header.lower() or "  launch/" in header or "sbatch" in header
  result = subprocess.run(["bash", str(script)], env=_env(TPU_NAME="t", ZONE="z"), capture_output=True, text=True)
  assert result.returncode == 2 and "usage" in result.stderr


def _dry_run(script, *args, **env):
  result = subprocess.run(["bash", str(LAUNCH / script), *args], env=_env(DRY_RUN="1", **env),
                          capture_output=True, text=True, check=True)
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def test_local_dry_run_passes_overrides_and_cpu_devices():
  (cmd,) = _dry_run("local.sh", "configs/mnist_tiny.py", "/tmp/w", "--config.seed=3", CPU_DEVICES="4")
  assert cmd[1:] == ["-m", "drifting_jax.main", "--config=configs/mnist_tiny.py", "--workdir=/tmp/w",
                     "--config.seed=3"]


def test_multiprocess_dry_run_starts_one_process_per_rank():
  cmds = _dry_run("multiprocess_cpu.sh", "c.py", "/tmp/w", "--mode=train", NUM_PROCESSES="3", PORT="4444")
  assert len(cmds) == 3
  for rank, cmd in enumerate(cmds):
    assert f"--process_id={rank}" in cmd and "--num_processes=3" in cmd
    assert "--coordinator_address=127.0.0.1:4444" in cmd and cmd[-1] == "--mode=train"


def test_slurm_dry_run_uses_first_node_as_coordinator():
  (cmd,) = _dry_run("slurm_gpu.sbatch", "configs/imagenet_latent_ablation.py", "/data/w", "--config.seed=1",
                    SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8", PROCESS_PER_GPU="1", PORT="5555")
  assert cmd[0] == "srun" and "--ntasks=32" in cmd and "--ntasks-per-node=8" in cmd
  inner = cmd[-1]
  assert "--num_processes=32" in inner and "--process_id=$SLURM_PROCID" in inner
  assert ":5555" in inner and "--config.seed=1" in inner


def test_slurm_script_runs_from_slurmds_spool_copy_with_every_gpu_and_quoted_flags(tmp_path):
  """As sbatch runs it: a copy in another folder (launch/ found from SLURM_SUBMIT_DIR), one
  process per node seeing all of its GPUs (JAX_LOCAL_DEVICE_IDS; jax would otherwise give it
  GPU $SLURM_LOCALID alone), and a tuple override one argument in the inner shell."""
  spool = tmp_path / "spool"
  spool.mkdir()
  (spool / "job.sh").write_text((LAUNCH / "slurm_gpu.sbatch").read_text())
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "argv.txt"
  # srun stand-in: runs the task's command once, as task 0; the "python" records what it got.
  (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                'SLURM_PROCID=0 exec "$@"\n')
  (bin_dir / "fakepython").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$JAX_LOCAL_DEVICE_IDS" "$@" > {record}\n')
  for name in ("srun", "fakepython"):
    (bin_dir / name).chmod(0o755)
  env = {**_env(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4",
                PATH=f"{bin_dir}:{os.environ['PATH']}"), "PYTHON": str(bin_dir / "fakepython")}
  subprocess.run(["bash", str(spool / "job.sh"), "configs/imagenet_latent_ablation.py", "/data/w",
                  "--config.loss.bandwidths=(0.02,0.05)", "--config.train.microbatches=auto"],
                 env=env, cwd=tmp_path, check=True, capture_output=True, text=True)
  devices, *argv = record.read_text().splitlines()
  assert devices == "0,1,2,3"
  assert argv[:2] == ["-m", "drifting_jax.main"] and "--process_id=0" in argv and "--num_processes=2" in argv
  assert argv[-2:] == ["--config.loss.bandwidths=(0.02,0.05)", "--config.train.microbatches=auto"]


def test_tpu_dry_run_copies_installs_and_runs_on_all_workers():
  cmds = _dry_run("tpu_pod.sh", "configs/imagenet_latent_ablation.py", "gs://b/w", TPU_NAME="pod", ZONE="z1")
  text = [" ".join(c) for c in cmds]
  assert any(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "scp" in c for c in cmds)
  assert all("--worker=all" in t for t in text if "tpu-vm" in t)
  assert "jax[tpu]==" in text[-2] and "--tpu_pod" in text[-1] and "--workdir=gs://b/w" in text[-1]


def test_eval_job_dry_run_runs_the_watcher():
  (cmd,) = _dry_run("eval_job.sh", "configs/mnist_tiny.py", "/tmp/w", POLL_S="5")
  assert "--mode=watch" in cmd and "--config.eval.watch_poll_s=5" in cmd


def _params(workdir):
  from drifting_jax.models import artifacts
  _, params, _ = artifacts.load(pathlib.Path(workdir) / "params_ema", kind="gen")
  return params


@pytest.mark.e2e
def test_two_processes_on_loopback_agree_with_one_process(tmp_path):
  """2 processes x 2 CPU devices run 3 steps of mnist_tiny and match 1 process x 4 devices."""
  import jax
  flags = ["--config.train.total_steps=3", "--config.checkpoint.every_steps=3", "--config.log.sample_grid_every=3"]
  config = "configs/mnist_tiny.py:smoke"
  multi = subprocess.run(
      ["bash", str(LAUNCH / "multiprocess_cpu.sh"), config, str(tmp_path / "multi"), *flags],
      env=_env(NUM_PROCESSES="2", DEVICES_PER_PROCESS="2", PORT=str(_free_port())), cwd=ROOT,
      capture_output=True, text=True, timeout=400)
  assert multi.returncode == 0, multi.stderr[-3000:]
  single = subprocess.run(
      ["bash", str(LAUNCH / "local.sh"), config, str(tmp_path / "single"), *flags],
      env=_env(CPU_DEVICES="4"), cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert single.returncode == 0, single.stderr[-3000:]
  for name in ("checkpoints", "params_ema", "metrics.jsonl", "samples/step_3.png"):
    assert (tmp_path / "multi" / name).exists()
  logs = sorted((tmp_path / "multi" / "logs").glob("process_*.log"))
  assert len(logs) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               _params(tmp_path / "multi"), _params(tmp_path / "single"))
