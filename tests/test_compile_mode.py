"""`--mode=compile` on small programs: the real TPU compiler, through libtpu, with no TPU.

Each case compiles configs/imagenet_latent_ablation.py:compile_smoke (the training
step of the release's program shape at toy sizes) for a slice and reads the report.
Full-size compiles (minutes, ~13 GB) stay out of the suite: docs/scaling.md.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="the compile mode needs libtpu (requirements.txt)")
pytestmark = pytest.mark.slow  # each case is a TPU compile of tens of seconds

from configs import imagenet_latent_ablation  # noqa: E402
from drifting_jax.scale import compile_mode, targets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(**overrides):
  c = imagenet_latent_ablation.get_config("compile_smoke")
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    c[section][key] = value
  return c


@pytest.fixture(scope="module")
def single_host(tmp_path_factory):
  """v5p-8 (one host, 4 chips), data 2 x fsdp 2."""
  workdir = tmp_path_factory.mktemp("v5p8")
  return compile_mode.compile_mode(_smoke(compile__programs=("train", "sample")), str(workdir)), workdir


def test_report_has_every_field(single_host):
  report, workdir = single_host
  assert json.loads((workdir / "compile_report.json").read_text())["target"]["name"] == "v5p-8"
  assert report["mesh"] == {"data": 2, "fsdp": 2}
  train = report["programs"]["train"]
  mem = train["memory"]
  for key in ("arguments_bytes", "outputs_bytes", "temporaries_bytes", "code_bytes", "total_bytes", "capacity_bytes"):
    assert mem[key] >= 0
  assert mem["fits"] and mem["verdict"].startswith("fits") and mem["capacity_bytes"] == 95 * 2**30
  assert train["time"]["seconds"] > 0 and train["time"]["roofline_seconds"] > 0
  assert train["projection"]["label"].startswith("compiler's estimate")
  assert set(train["collectives"]) == {"all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                                       "collective-permute"}
  # fsdp 2: parameters are gathered for the forward pass, gradients reduced.
  assert train["collectives"]["all-gather"]["count"] > 0


def test_the_sampling_step_is_compiled_on_the_same_mesh(single_host):
  sample = single_host[0]["programs"]["sample"]
  assert sample["memory"]["fits"] and sample["batch"] == {"samples_per_step": 64}
  assert 0.85 <= sample["flops"]["compiler_over_analytical"] <= 1.3
  assert sample["projection"]["generated_images_per_second"] > 0


def test_the_mae_pretraining_step_compiles(tmp_path):
  from configs import imagenet_mae_latent_256
  config = imagenet_mae_latent_256.get_config("smoke")
  config.compile.target = "v5p-8"
  mae = compile_mode.compile_mode(config, str(tmp_path))["programs"]["mae"]
  assert mae["memory"]["fits"] and mae["batch"] == {"batch_size": 8}
  assert 0.85 <= mae["flops"]["compiler_over_analytical"] <= 1.3
  assert mae["projection"]["total_steps"] == config.mae.total_steps


def test_compiler_flops_agree_with_the_analytical_count(single_host):
  flops = single_host[0]["programs"]["train"]["flops"]
  # The analytical count is matmuls and convolutions only; the compiler adds the
  # elementwise work (norms, the loss's exp/log, Adam) and skips padded zeros of convs.
  assert 0.85 <= flops["compiler_over_analytical"] <= 1.3, flops
  pieces = flops["analytical_pieces_global"]
  # The pieces (generator fwd+bwd, feature passes, loss) account for the traced step's matmuls.
  assert flops["analytical_sum_of_pieces_global"] == pytest.approx(flops["analytical_traced_step_global"], rel=0.02)
  assert all(v > 0 for v in pieces.values())


def test_memory_per_chip_falls_when_fsdp_doubles(tmp_path, single_host):
  """fsdp 2 -> 4 on the same 4 chips halves the sharded state's share of each chip."""
  r2 = single_host[0]["programs"]["train"]["memory"]
  r4 = compile_mode.compile_mode(_smoke(mesh__fsdp=4), str(tmp_path))["programs"]["train"]["memory"]
  assert r4["arguments_bytes"] < 0.75 * r2["arguments_bytes"]
  assert r4["total_bytes"] < r2["total_bytes"]


def test_four_host_v6e_slice_compiles(tmp_path):
  """v6e-16: 4 hosts x 4 chips, the release's hardware (its step once crashed this compiler)."""
  target = targets.parse("v6e-16")
  assert target.hosts == 4
  report = compile_mode.compile_mode(_smoke(compile__target="v6e-16", mesh__fsdp=4,
                                            train__classes_per_step=16), str(tmp_path))
  assert report["target"]["hosts"] == 4 and report["mesh"] == {"data": 4, "fsdp": 4}
  assert report["programs"]["train"]["memory"]["fits"]


def test_a_config_that_cannot_fit_gets_a_one_line_verdict(tmp_path):
  """Hundreds of thousands of samples per v5e chip (16 GiB): the compiler refuses the
  program for lack of HBM, and the verdict names the chip, the need and the capacity.

  The sampling step, not the training step: the refusal and its verdict are the same
  machinery for every program (`compile_mode._compile`), and the sampling step is
  refused in seconds where the training step takes a minute and a half of libtpu."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "drifting_jax.main", "--mode=compile",
       "--config=configs/imagenet_latent_ablation.py:compile_smoke", f"--workdir={tmp_path}",
       "--config.compile.target=v5e-4", "--config.mesh.fsdp=1", "--config.compile.programs=('sample',)",
       "--config.eval.batch_size=200000"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  line = errors[0]
  assert "does not fit" in line and "v5e" in line and "16 GiB" in line and "Traceback" not in proc.stderr
  assert line.startswith("error: the sampling step does not fit: needs ") and "GiB over" in line, line
