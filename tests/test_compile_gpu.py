"""`--mode=compile` for GPU hosts: H100s described by the CUDA plugin, compiled with no GPU.

Without `jax-cuda12-plugin` (requirements.txt leaves it out) a GPU target is a
one-line error naming the package; with it, compile_smoke compiles for one host of
8 H100s (docs/scaling.md, "GPU hosts, compiled without a GPU").
"""

import json
import sys

import pytest

from drifting_jax import errors
from drifting_jax.scale import analysis, targets, xla_internals


def test_gpu_targets_name_hosts_of_eight():
  one, two = targets.parse("h100x8"), targets.parse("h100x16")
  assert (one.topology_name, one.hosts, one.num_devices) == ("1x1x8", 1, 8)
  assert (two.topology_name, two.hosts, two.num_devices) == ("1x2x8", 2, 16)
  assert targets.parse("h100x4").topology_name == "1x1x4"
  chip = one.chip
  assert chip.platform == "cuda" and chip.peak_bf16_flops == 989e12 and chip.hbm_bytes_per_s == 3.35e12
  assert chip.hbm_bytes == 80 * 2**30
  assert targets.compiler_options(one) == {"xla_gpu_enable_triton_gemm": False}
  assert targets.compiler_options(targets.parse("v6e-8")) is None
  with pytest.raises(errors.UsageError, match="h100x8, h100x16"):
    targets.parse("h100x12")


def test_the_target_config_is_written_from_the_published_facts():
  text = targets.gpu_target_config(targets.H100_SXM)
  for line in ("core_count: 132", "memory_bandwidth: 3350000000000", "l2_cache_size: 52428800",
               "device_memory_size: 85899345920", "clock_rate_ghz: 1.98", "shared_memory_per_block_optin: 232448",
               'platform_name: "CUDA"', "major: 9 minor: 0"):
    assert line in text, line


def test_a_gpu_target_without_the_plugin_is_a_one_line_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax_cuda12_plugin", None)  # as if not installed
  with pytest.raises(errors.UsageError) as raised:
    targets.parse("h100x8").devices()
  message = str(raised.value)
  assert "\n" not in message and "h100x8" in message
  assert "pip install jax-cuda12-plugin==" in message


def test_library_calls_are_counted_from_their_shapes():
  # A cuBLAS matmul, the three cuDNN convolution passes and an unknown call (the module
  # xla_internals.self_check also feeds through XLA's own HLO parser and printer).
  hlo = xla_internals.LIBRARY_CALLS_MODULE
  calls = analysis.library_calls(hlo)
  # 3x3 over a 16x16 map padded by 1 on each side: per spatial axis 16 x 3 (position, tap)
  # pairs, of which 2 read the padding (the first position's first tap, the last one's
  # last): 46 real, as the analytical count and XLA's cost analysis have it.
  conv = 2 * 8 * 64 * 32 * 46 * 46
  by = calls["by_target"]
  assert by["__cublas$lt$matmul"]["flops"] == 2 * 64 * 512 * 256
  assert by["__cublas$lt$matmul"]["bytes"] == 2 * (64 * 256 + 256 * 512 + 64 * 512)  # not the workspace
  assert by["__cudnn$convForward"]["flops"] == by["__cudnn$convBackwardInput"]["flops"] == conv
  assert by["__cudnn$convBackwardFilter"]["flops"] == conv
  assert calls["not_counted"] == {"SomethingElse": 1}
  time_ = analysis.step_time_estimate({"flops": 1e12, "bytes accessed": 1e9}, targets.parse("h100x8"), {})
  assert time_["source"].startswith("roofline only") and time_["seconds"] == pytest.approx(1e12 / 989e12)


@pytest.mark.slow
def test_compile_smoke_for_one_host_of_eight_h100s(tmp_path):
  """The training step at toy sizes, data 4 x fsdp 2 over 8 H100s (a minute of the GPU compiler)."""
  pytest.importorskip("jax_cuda12_plugin", reason="GPU targets need jax-cuda12-plugin (not in requirements.txt)")
  from configs import imagenet_latent_ablation
  from drifting_jax.scale import compile_mode

  config = imagenet_latent_ablation.get_config("compile_smoke")
  config.compile.target = "h100x8"
  config.mesh.data, config.mesh.fsdp = 4, 2
  report = compile_mode.compile_mode(config, str(tmp_path))
  assert json.loads((tmp_path / "compile_report.json").read_text())["target"]["name"] == "h100x8"
  assert report["mesh"] == {"data": 4, "fsdp": 2} and report["jax_cuda12_plugin"] != "not installed"
  train = report["programs"]["train"]
  mem = train["memory"]
  assert mem["fits"] and mem["verdict"].startswith("fits") and "per h100 GPU" in mem["verdict"]
  assert mem["capacity_bytes"] == 80 * 2**30 and mem["code_bytes"] == 0 and mem["temporaries_bytes"] > 0
  # FLOPs: the HLO cost analysis (elementwise work) plus the cuBLAS/cuDNN calls (the matmuls).
  assert train["cost_analysis"]["library_call_flops"] > 0.9 * train["flops"]["analytical_per_device"]
  # The GPU compiler runs a strided convolution's input gradient as a forward convolution
  # over a zero-dilated copy of the output gradient: cuDNN multiplies the inserted zeros
  # (real work on the GPU, not in the analytical count of useful products). On the toy
  # step's 2x2-16x16 maps those calls are 0.91 of 7.55 GFLOP per GPU, ~3/4 of it zeros:
  # 1.14 measured, about 1.04 counting only their useful quarter (docs/scaling.md, "Convolutions' FLOPs on GPU").
  assert 0.95 <= train["flops"]["compiler_over_analytical"] <= 1.2, train["flops"]
  assert train["library_calls"]["not_counted"] == {}
  assert train["time"]["source"].startswith("roofline only") and train["time"]["seconds"] > 0
  assert train["projection"]["label"].startswith("roofline estimate")
  assert train["collectives"]["all-gather"]["count"] > 0  # fsdp 2: parameters gathered
