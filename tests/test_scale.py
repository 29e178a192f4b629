"""The compile mode's pieces that need no compiler: slice names, the report's arithmetic, FLOP counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from drifting_jax import errors
from drifting_jax.scale import analysis, flops, targets


@pytest.mark.parametrize("name,topology,chips,hosts,bounds", [
    ("v6e-64", "v6e:8x8", 64, 16, (2, 2, 1)),      # the release's ablation slice
    ("v6e-128", "v6e:8x16", 128, 32, (2, 2, 1)),   # its SOTA slice
    ("v6e-8", "v6e:2x4", 8, 1, (2, 4, 1)),         # one host drives 8 v6e chips
    ("v5p-64", "v5p:2x4x4", 32, 8, (2, 2, 1)),     # v5p names count TensorCores, 2 per chip
    ("v5e-256", "v5e:16x16", 256, 64, (2, 2, 1)),
    ("v4-32", "v4:2x2x4", 16, 4, (2, 2, 1)),
])
def test_slice_names_map_to_topologies(name, topology, chips, hosts, bounds):
  t = targets.parse(name)
  assert (t.topology_name, t.chips, t.hosts, t.chips_per_host_bounds) == (topology, chips, hosts, bounds)


def test_chip_facts_are_the_published_ones():
  v6e, v5p = targets.parse("v6e-64").chip, targets.parse("v5p-64").chip
  assert v6e.hbm_bytes == 32 * 2**30 and v6e.peak_bf16_flops == 918e12
  assert v5p.hbm_bytes == 95 * 2**30 and v5p.peak_bf16_flops == 459e12
  # v4's two TensorCores are two devices in libtpu's description: half the chip each.
  v4 = targets.parse("v4-8")
  assert v4.num_devices == 8 and v4.chip.device_hbm_bytes == 16 * 2**30


@pytest.mark.parametrize("bad", ["v6e-63", "v7-64", "tpu", "v5p-7", "v6e-512"])
def test_unknown_slices_are_usage_errors(bad):
  with pytest.raises(errors.UsageError, match="slice"):
    targets.parse(bad)


HLO = """
  %all-gather-start.1 = (bf16[128,768]{1,0}, bf16[1024,768]{1,0}) all-gather-start(bf16[128,768]{1,0} %p), dimensions={0}
  %all-gather-done.1 = bf16[1024,768]{1,0} all-gather-done((bf16[128,768]{1,0}, bf16[1024,768]{1,0}) %all-gather-start.1)
  %reduce-scatter.2 = f32[96,768]{1,0} reduce-scatter(f32[768,768]{1,0} %g), dimensions={0}
  %all-reduce.3 = (f32[10]{0}, f32[4,4]{1,0}) all-reduce(f32[10]{0} %a, f32[4,4]{1,0} %b), to_apply=%sum
  %all-reduce-start.4 = f32[256]{0} all-reduce-start(f32[256]{0} %c), to_apply=%sum
  %custom-call.5 = f32[8]{0} custom-call(f32[8]{0} %x), custom_call_target="ConcatBitcast"
  %custom-call.6 = f32[8]{0} custom-call(f32[8]{0} %y), custom_call_target="ConcatBitcast"
"""


def test_collectives_are_counted_with_their_result_bytes():
  c = analysis.collectives(HLO)
  assert c["all-gather"] == {"count": 1, "bytes": 1024 * 768 * 2}  # the -done line is not a second op
  assert c["reduce-scatter"] == {"count": 1, "bytes": 96 * 768 * 4}
  assert c["all-reduce"] == {"count": 2, "bytes": (10 + 16) * 4 + 256 * 4}
  assert c["all-to-all"]["count"] == 0
  assert analysis.custom_call_counts(HLO) == {"ConcatBitcast": 2}


# libtpu's v5e programs: one all-gather split into a chain of async collective fusions
# (the same channel and chain on each copy, each with the whole result's shape), and two
# different all-reduces that share a channel id in its all-reduce-scatter computations.
CHAINED_HLO = """
  %all-gather.611 = bf16[3,3,256,256]{3,2,1,0} all-gather(%p0), channel_id=135, dimensions={2}, frontend_attributes={chain_id="24"}, metadata={op_name="feature_params['encoder']['conv2']['kernel']"}
  %all-gather.613 = bf16[3,3,256,256]{3,2,1,0} all-gather(%p1), channel_id=135, dimensions={2}, frontend_attributes={chain_id="24"}, metadata={op_name="feature_params['encoder']['conv2']['kernel']"}
  %all-gather.625 = bf16[3,3,256,256]{3,2,1,0} all-gather(%p2), channel_id=135, dimensions={2}, frontend_attributes={chain_id="24"}, metadata={op_name="feature_params['encoder']['conv2']['kernel']"}
  %all-gather.700 = bf16[3,3,256,256]{3,2,1,0} all-gather(%p3), channel_id=135, dimensions={2}, frontend_attributes={chain_id="31"}, metadata={op_name="feature_params['encoder']['conv2']['kernel']"}
  %all-reduce.141 = (f32[128,256]{0,1}, f32[128,768]{0,1}) all-reduce(%a, %b), channel_id=1, to_apply=%sum
  %all-reduce.142 = f32[128,128]{1,0} all-reduce(%c), channel_id=1, to_apply=%sum, metadata={op_name="jit(train_step)/jvp()/reduce_sum"}
"""


def test_a_collective_split_into_a_chain_of_fusions_counts_once():
  c = analysis.collectives(CHAINED_HLO)
  kernel = 3 * 3 * 256 * 256 * 2
  assert c["all-gather"] == {"count": 2, "bytes": 2 * kernel}  # chains 24 and 31
  assert c["all-reduce"] == {"count": 2, "bytes": (128 * 256 + 128 * 768 + 128 * 128) * 4}
  sources = analysis.collective_sources(CHAINED_HLO)
  assert sources[0] == {"op": "all-gather", "source": "feature_params['encoder']['conv2']['kernel']",
                        "count": 2, "bytes": 2 * kernel}
  assert {"op": "all-reduce", "source": "jvp()/reduce_sum", "count": 1, "bytes": 128 * 128 * 4} in sources


# As XLA 0.10.2's printer writes them: a combined async all-gather (operands and results
# each a tuple), and an all-reduce of 7 gradients, with the printer's `/*index=5*/`
# before the sixth element of its shape and of its operands.
COMBINED_HLO = """
  %ags = ((f32[8]{0}, f32[16]{0}, bf16[4]{0}), (f32[64]{0}, f32[128]{0}, bf16[32]{0})) all-gather-start(%a, %b, %c), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %agd = (f32[64]{0}, f32[128]{0}, bf16[32]{0}) all-gather-done(%ags)
  ROOT %ar = (f32[1]{0}, f32[2]{0}, f32[3]{0}, f32[4]{0}, f32[5]{0}, /*index=5*/f32[6]{0}, f32[7]{0}) all-reduce(%p0, %p1, %p2, %p3, %p4, /*index=5*/%p5, %p6), channel_id=2, replica_groups={{0,1}}, use_global_device_ids=true, to_apply=%sum
"""


def test_combined_collectives_count_every_result():
  c = analysis.collectives(COMBINED_HLO)
  assert c["all-gather"] == {"count": 1, "bytes": (64 + 128) * 4 + 32 * 2}  # the results' tuple, not an operand
  assert c["all-reduce"] == {"count": 1, "bytes": (1 + 2 + 3 + 4 + 5 + 6 + 7) * 4}


# libtpu 0.0.52's lines for a v5e:2x2: tiled layouts and mesh-style replica groups.
LIBTPU_HLO = """
  %psum.7 = f32[2,1024]{1,0:T(2,128)} all-reduce(%param.2), channel_id=1, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%region_0.0, metadata={op_name="jit(f)/shard_map/psum" stack_frame_id=4}, backend_config={"flag_configs":[],"barrier_config":{"barrier_type":"CUSTOM","id":"1"}}
  %all-to-all = bf16[64,4,128]{2,0,1:T(8,128)(2,1)S(1)} all-to-all(%copy_bitcast_fusion.1), channel_id=7, replica_groups=mesh['axis_0'=4] {'axis_0'}, dimensions={1}, frontend_attributes={is_spmd_generated="true"}, metadata={op_name="jit(f)/transpose(jvp())/mul" stack_frame_id=3}
"""


def test_collectives_read_libtpu_layouts_and_mesh_groups():
  c = analysis.collectives(LIBTPU_HLO)
  assert c["all-reduce"] == {"count": 1, "bytes": 2 * 1024 * 4}
  assert c["all-to-all"] == {"count": 1, "bytes": 64 * 4 * 128 * 2}
  sources = {s["op"]: s["source"] for s in analysis.collective_sources(LIBTPU_HLO)}
  assert sources == {"all-reduce": "shard_map/psum", "all-to-all": "transpose(jvp())/mul"}


def test_analysis_keeps_its_names_and_reads_through_xla_internals():
  """The report's constants are the ones xla_internals registers; analysis itself imports nothing private."""
  from drifting_jax.scale import xla_internals
  assert analysis.COLLECTIVES == xla_internals.COLLECTIVES
  assert analysis.NEGATIVE_COST_CALLS == ("ConcatBitcast", "ZeroCrop") and analysis.CONCAT_BITCAST == "ConcatBitcast"
  assert not hasattr(analysis, "_jaxlib")


def test_step_time_never_reports_a_negative_estimate():
  target = targets.parse("v6e-64")
  flops_per_device = 16.4e12
  compute = flops_per_device / target.chip.peak_bf16_flops
  cost = {"flops": flops_per_device, "bytes accessed": 303e9}
  memory = 303e9 / target.chip.hbm_bytes_per_s
  # A plausible compiler estimate above the FLOPs bound is taken as is.
  ok = analysis.step_time_estimate({**cost, "optimal_seconds": 0.12}, target, {})
  assert ok["seconds"] == 0.12 and ok["source"] == "compiler optimal_seconds"
  # Our v6e-64 step: -508.83 s with 509 ConcatBitcasts (and other custom calls, which do not count).
  neg = analysis.step_time_estimate({**cost, "optimal_seconds": -508.834}, target,
                                    {"ConcatBitcast": 509, "AllocateBuffer": 12, "AssumeGatherIndicesInBound": 33})
  assert neg["seconds"] == pytest.approx(0.166) and "ConcatBitcast" in neg["source"]
  assert neg["roofline_memory_seconds"] == pytest.approx(memory) and neg["concat_bitcast_calls"] == 509
  # Negative with no ConcatBitcast to explain it: the roofline stands in.
  bad = analysis.step_time_estimate({**cost, "optimal_seconds": -3.0}, target, {"AllocateBuffer": 3})
  assert bad["seconds"] == pytest.approx(max(compute, memory)) and bad["source"].startswith("roofline")
  # Below the FLOPs bound is impossible: the roofline stands in.
  fast = analysis.step_time_estimate({**cost, "optimal_seconds": compute / 2}, target, {})
  assert fast["seconds"] == pytest.approx(max(compute, memory))


def test_fit_verdict_names_chip_need_and_capacity():
  target = targets.parse("v5e-16")
  parts = {"arguments": 6 * 2**30, "outputs": 1 * 2**30, "aliased": 1 * 2**30, "temporaries": 14 * 2**30, "code": 0}
  line = analysis.fit_verdict(20 * 2**30, target.chip.device_hbm_bytes, target, parts)
  assert line.startswith("does not fit") and "v5e" in line and "20.00 GiB" in line and "16 GiB" in line
  assert "4.00 GiB over" in line and "temporaries 14.00 GiB" in line and "\n" not in line


def test_flop_count_matches_closed_forms():
  conv = nn.Conv(32, (3, 3), padding=1)
  x = jnp.ones((4, 16, 16, 8))
  p = conv.init(jax.random.PRNGKey(0), x)
  fwd = flops.program_flops(lambda p, x: conv.apply(p, x), p, x)
  # Taps on the zero padding are not work: per dimension 3 x 16 - 2 real (output, tap) pairs, not 3 x 16.
  assert fwd == 2 * 4 * 32 * 8 * (3 * 16 - 2) ** 2
  # Gradients w.r.t. both input and kernel: two more convolutions over the same (output, tap) pairs.
  grad = flops.program_flops(jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) ** 2), argnums=(0, 1)), p, x)
  assert grad == 3 * fwd
  dense = nn.Dense(64)
  y = jnp.ones((10, 7, 32))
  pd = dense.init(jax.random.PRNGKey(0), y)
  assert flops.program_flops(lambda p, y: dense.apply(p, y), pd, y) == 2 * 70 * 32 * 64
  # Batched matmul (attention scores) and a scan, counted length times.
  q = jnp.ones((2, 4, 16, 8))
  assert flops.program_flops(lambda q: jnp.einsum("bhqd,bhkd->bhqk", q, q), q) == 2 * 2 * 4 * 16 * 16 * 8
  m = jnp.ones((8, 8))
  scanned = flops.program_flops(lambda m: jax.lax.scan(lambda c, _: (c @ m, None), m, None, length=5)[0], m)
  assert scanned == 5 * 2 * 8 * 8 * 8


@pytest.mark.parametrize("side,stride", [(2, 1), (4, 1), (7, 2), (8, 2)])
def test_conv_flop_count_agrees_with_the_compilers(side, stride):
  """XLA's cost analysis counts a convolution's real taps; so does ours, forward and backward
  (a strided convolution's input gradient is a convolution over a dilated input)."""
  conv = nn.Conv(24, (3, 3), strides=stride, padding="SAME", use_bias=False)
  x = jnp.ones((2, side, side, 16))
  p = conv.init(jax.random.PRNGKey(0), x)
  fns = {"forward": lambda p, x: conv.apply(p, x),
         # value_and_grad: with grad alone XLA drops the unused forward convolution.
         "backward": jax.value_and_grad(lambda p, x: jnp.sum(conv.apply(p, x)), argnums=(0, 1))}
  for name, fn in fns.items():
    ours = flops.program_flops(fn, p, x)
    cost = jax.jit(fn).lower(p, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # The compiler adds the elementwise work (the sum's ones, the grad's broadcast): a few percent.
    assert ours <= cost["flops"] <= 1.05 * ours, (name, ours, cost["flops"])


def test_a_machine_without_tpus_never_starts_libtpu():
  """With libtpu installed, importing the package keeps JAX off the TPU backend when no
  chip is present: no libtpu warnings in a CPU job's output, no libtpu lock taken."""
  import os
  import subprocess
  import sys

  from drifting_jax import platforms
  if platforms._has_tpu_chips():
    pytest.skip("this machine has TPU chips")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  # Without the package's choice libtpu would start (and warn) even while another
  # process holds its lock: let it, so the test sees the difference on any machine.
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  code = "import drifting_jax, jax; print(jax.default_backend(), len(jax.devices()))"
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split()[0] in ("cpu", "gpu")
  assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr[-2000:]


def test_scaling_report_counts_every_host_of_a_per_host_program():
  """The per-host sampling program runs on every host at once: the slice's rate is the hosts' sum."""
  from scripts import scaling_report
  target = targets.parse("v6e-16")
  cost = {"flops": 1e12, "bytes accessed": 1e10, "optimal_seconds": 0.05}
  program = {"cost_analysis": cost, "custom_calls": {}, "batch": {"samples_per_step": 32}, "devices_per_program": 4,
             "projection": {"label": "compiler's estimate", "step_seconds": 1.0, "generated_images_per_second": 1.0}}
  report = scaling_report.refresh({"target": target.to_dict(), "programs": {"sample": program}})
  seconds = analysis.step_time_estimate(cost, target, {})["seconds"]
  assert report["programs"]["sample"]["projection"]["generated_images_per_second"] == pytest.approx(4 * 32 / seconds)


def test_scaling_report_projects_nothing_from_a_chunked_step():
  """A microbatched step's loop bodies are costed once: its stored projection (an "MFU" of
  166% in the h100x1 report) is blanked, its time marked as undercounted."""
  from scripts import scaling_report
  target = targets.parse("h100x8")
  program = {"cost_analysis": {"flops": 1e12, "bytes accessed": 1e10}, "custom_calls": {}, "microbatches": 2,
             "batch": {"generated_per_step": 4096}, "memory": {"total_bytes": 2**30, "capacity_bytes": 80 * 2**30,
                                                                "fits": True},
             "projection": {"label": "roofline estimate", "step_seconds": 0.1, "generated_images_per_second": 40960.0,
                            "total_steps": 30000, "run_hours": 0.8, "mfu": 1.66}}
  report = scaling_report.refresh({"target": target.to_dict(), "mesh": {"data": 4, "fsdp": 2},
                                   "programs": {"train": program}})
  projection = report["programs"]["train"]["projection"]
  assert all(projection[k] is None for k in ("step_seconds", "generated_images_per_second", "run_hours", "mfu"))
  assert projection["total_steps"] == 30000
  row = scaling_report.rows({"chunked": report})[-1]
  assert "(chunks undercounted)" in row and "166%" not in row and "%" not in row.split("|")[-3]


def test_instruction_lines_with_tiled_layouts_parse():
  """libtpu prints layouts with parentheses (`{0:T(128)S(1)}`); such lines, tuples of them
  included, are instructions too (they were skipped: a v5p smoke step gave 1,232
  instructions of its 23,344 lines, now 18,336)."""
  from drifting_jax.scale import xla_internals
  text = ("  %broadcast_add_fusion.8 = u32[16]{0:T(128)S(1)} fusion(%multiply.630), kind=kLoop, "
          "calls=%fused_computation.1897\n"
          "  %t = (bf16[16,256]{1,0:T(8,128)(2,1)}, f32[8]{0:T(256)}) tuple(%a, %b)\n"
          "  ROOT %r = f32[8]{0} add(%x, %y)")
  found = [(name, shape, op) for name, shape, op, _ in xla_internals.definitions(text)]
  assert found == [("broadcast_add_fusion.8", "u32[16]{0:T(128)S(1)}", "fusion"),
                   ("t", "(bf16[16,256]{1,0:T(8,128)(2,1)}, f32[8]{0:T(256)})", "tuple"),
                   ("r", "f32[8]{0}", "add")]
