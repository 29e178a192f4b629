"""The compile report's breakdown (scale/breakdown.py): parts that add up, counted right, charged right.

Independent expectations: programs whose FLOPs and bytes are counted by hand; XLA's
cost analysis of the whole module, which the per-instruction parts must reproduce; a
libtpu-optimized module stored from a compile for v5p (tiled layouts, memory spaces,
the cost model's per-kernel cycles) with libtpu's own totals recorded beside it.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import pytest

from configs import imagenet_latent_ablation
from drifting_jax import config_defaults, partitioning
from drifting_jax.scale import breakdown, xla_internals
from drifting_jax.train import program as program_lib

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
# jnp.tanh(a @ b).sum(axis=0) in the named scope "objective", a bf16[256,128], b bf16[128,512], compiled for one v5p
# chip by libtpu 0.0.52: jax.jit(f).lower(<ShapeDtypeStructs on targets.parse("v5p-8").devices()[0]>)
# .compile().as_text().
LIBTPU_MODULE = FIXTURES / "libtpu_v5p_tanh_matmul.hlo"
LIBTPU_TOTALS = {"flops": 33_947_136.0, "bytes accessed": 726_048.0}  # libtpu's cost analysis of that program


def _breakdown_of(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return breakdown.of_hlo(compiled.as_text(), xla_internals.cost_numbers(compiled))


def test_programs_counted_by_hand():
  f32 = jnp.float32
  # A matmul: 2 FLOPs per multiply-add; it reads both operands and writes its result.
  b = _breakdown_of(lambda a, w: a @ w, jnp.ones((64, 32), f32), jnp.ones((32, 16), f32))
  assert b["sum"]["flops"] == 2 * 64 * 32 * 16
  assert b["sum"]["bytes"] == (64 * 32 + 32 * 16 + 64 * 16) * 4
  # x * 2 + y summed, fused into one kernel: it reads x and y and writes one scalar;
  # 2 FLOPs per element and 65,535 additions to reduce 65,536 elements.
  b = _breakdown_of(lambda x, y: (x * 2 + y).sum(), jnp.ones((256, 256), f32), jnp.ones((256, 256), f32))
  assert b["sum"]["bytes"] == 2 * 256 * 256 * 4 + 4
  assert b["sum"]["flops"] == 2 * 256 * 256 + 256 * 256 - 1
  assert b["within_tolerance"] and b["sum_over_module"] == {"flops": 1.0, "bytes": 1.0}


def test_a_libtpu_module_parses_and_adds_up():
  text = LIBTPU_MODULE.read_text()
  b = breakdown.breakdown(text, LIBTPU_TOTALS, xla_internals.module_cost_analysis(text))
  assert not b["not_costed"]
  assert b["sum_over_module"] == pytest.approx({"flops": 1.0, "bytes": 1.0}, abs=1e-9)
  # FLOPs: the matmul's 2 x 256 x 128 x 512, and libtpu's total is XLA's.
  assert b["sum"]["flops"] >= 2 * 256 * 128 * 512
  assert b["sum"]["flops"] == LIBTPU_TOTALS["flops"]
  # Bytes: libtpu counts by its own model, more than the operands and results XLA counts.
  assert b["sum_over_compiler"]["bytes"] < 1.0
  # The one kernel with libtpu's cost-model estimate carries it.
  cycles = [i for i in b["heaviest"] if i["estimated_cycles"]]
  assert len(cycles) == 1 and cycles[0]["opcode"] == "fusion" and b["sum"]["estimated_cycles"] == cycles[0][
      "estimated_cycles"] > 0
  # The prefetch copy (no op_name of its own) goes to the kernel that reads it.
  copies = [i for i in b["heaviest"] if i["opcode"].startswith("copy")]
  assert copies and all(i["charged_via"] and i["component"] == "loss forward" for i in copies)
  assert set(b["components"]) == {"loss forward"}


def test_an_async_pair_of_the_generic_form_is_costed_as_the_whole_module_costs_it():
  """libtpu's `slice-start`/`slice-done` (2,351 of them in the ablation's v6e step): the
  `-done` parses only after its `-start`, so it is costed as the pair less the start."""
  text = """HloModule async_slice

ENTRY %e (p: f32[8,128]) -> f32[4,128] {
  %p = f32[8,128]{1,0} parameter(0)
  %slice-start = ((f32[8,128]{1,0}), f32[4,128]{1,0}, s32[]) slice-start(%p), slice={[0:4], [0:128]}
  ROOT %slice-done = f32[4,128]{1,0} slice-done(%slice-start), metadata={op_name="jit(f)/objective/slice"}
}
"""
  costs, failures = xla_internals.instruction_costs(text)
  assert not failures and [c.opcode for c in costs] == ["slice-start", "slice-done"]
  whole = xla_internals.module_cost_analysis(text)["bytes accessed"]
  assert sum(c.bytes_accessed for c in costs) == whole and all(c.bytes_accessed > 0 for c in costs)


def test_an_instruction_over_several_lines_is_one_instruction():
  """A Pallas/Mosaic kernel's custom call (splash attention on TPU) prints its
  kernel_metadata with newlines inside an attribute: the lines after the first belong to it."""
  text = """HloModule multi_line

ENTRY %e (p: f32[8,128]) -> f32[8,128] {
  %p = f32[8,128]{1,0} parameter(0)
  %kernel = f32[8,128]{1,0} custom-call(%p), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 384}"
}}, metadata={op_name="jit(f)/objective/splash"}
  ROOT %add = f32[8,128]{1,0} add(%kernel, %kernel), metadata={op_name="jit(f)/objective/add"}
}
"""
  costs, failures = xla_internals.instruction_costs(text)
  assert not failures and [c.opcode for c in costs] == ["custom-call", "add"]
  assert costs[0].op_name == "jit(f)/objective/splash" and costs[1].operands == ("kernel", "kernel")
  b = breakdown.breakdown(text, {}, xla_internals.module_cost_analysis(text))
  # The custom call, unknown to XLA's analysis, costed from its shapes: reads and writes 4 KiB.
  assert b["components"]["loss forward"]["bytes"] == 2 * 8 * 128 * 4 + 3 * 8 * 128 * 4
  assert b["within_tolerance"]


def test_an_instruction_named_after_its_operand():
  """The GPU compiler's `%input_reduce_fusion.1701 = ... fusion(%input_reduce_fusion)`:
  the operand list is replaced where it is, not where its text first occurs."""
  text = """HloModule named_after_operand

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_reduce (param_0: f32[64]) -> f32[] {
  %param_0 = f32[64]{0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %reduce = f32[] reduce(%param_0, %zero), dimensions={0}, to_apply=%add
}

ENTRY %e (p: f32[64]) -> f32[] {
  %p = f32[64]{0} parameter(0)
  %input_reduce_fusion = f32[64]{0} exponential(%p)
  ROOT %input_reduce_fusion.1701 = f32[] fusion(%input_reduce_fusion), kind=kInput, calls=%fused_reduce
}
"""
  costs, failures = xla_internals.instruction_costs(text)
  assert not failures and [c.opcode for c in costs] == ["exponential", "fusion"]
  assert costs[1].bytes_accessed == 64 * 4 + 4
  assert sum(c.bytes_accessed for c in costs) == xla_internals.module_cost_analysis(text)["bytes accessed"]


def test_components_follow_op_names():
  cases = {
      ("jit(train_step)/transpose(jvp(DiTGenerator))/LightningDiT_0/blocks_0/Attention_0/dot_general", "fusion"):
          "generator backward: attention",
      ("jit(train_step)/jvp(DiTGenerator)/LightningDiT_0/blocks_3/SwiGLUFFN_0/mul", "fusion"):
          "generator forward: rest",
      ("jit(train_step)/jvp(DiTGenerator)/DiTGenerator.draw_noise/jit(_normal)/erf_inv", "fusion"):
          "random numbers (noise, CFG scales)",
      ("jit(train_step)/transpose(jvp(generated_features))/encoder/stages_0/conv", "convolution"):
          "MAE backward to its input",
      ("jit(train_step)/data_features/encoder/layer1_norm/reduce_sum", "fusion"): "MAE forward, data samples",
      ("jit(train_step)/jvp(objective)/exp", "fusion"): "loss forward",
      ("jit(train_step)/batch_statistics/while/body/sqrt", "fusion"): "loss statistics passes",
      ("jit(train_step)/batch_statistics/while/body/DiTGenerator/LightningDiT_0/mul", "fusion"):
          "generator forward: rest",
      ("jit(train_step)/transpose(jvp(objective))/mul", "fusion"): "loss backward",
      ("jit(train_step)/optimizer/sqrt", "fusion"): "optimizer",
      ("jit(train_step)/ema/add", "fusion"): "EMA",
      ("jit(train_step)/jvp(objective)/psum", "all-reduce-start"): breakdown.COLLECTIVES,
      ("", "copy-start"): breakdown.OTHER,
  }
  for (op_name, opcode), component in cases.items():
    assert breakdown.component_of(op_name, opcode) == component, op_name


def test_an_instruction_the_parser_refuses_is_listed_and_the_rest_counted(monkeypatch):
  text = LIBTPU_MODULE.read_text()
  parse = xla_internals._parse_hlo_module

  def refuse_the_copy(module_text):
    if "copy-start(" in module_text and "ENTRY %instruction" in module_text:
      raise ValueError("unknown attribute")
    return parse(module_text)

  monkeypatch.setattr(xla_internals, "_parse_hlo_module", refuse_the_copy)
  b = breakdown.breakdown(text, LIBTPU_TOTALS, None)
  assert len(b["not_costed"]) == 1 and "copy-start" in b["not_costed"][0]
  assert b["sum"]["flops"] == LIBTPU_TOTALS["flops"]  # the copy costs no FLOPs; the kernels are all there
  assert any("not costed" in line for line in breakdown.lines(b))


@pytest.mark.slow  # compiles the ablation's training step at toy size on one CPU device (~25 s)
def test_the_training_step_breaks_down_into_its_components():
  c = imagenet_latent_ablation.get_config("compile_smoke")
  c.feature.mae_path = str(FIXTURES / "official_tiny" / "mae")
  c.data.name, c.data.num_classes = "synthetic_latents", 10
  c.train.classes_per_step, c.mesh.data, c.mesh.fsdp = 2, 1, 1
  c = config_defaults.complete(c)
  mesh = partitioning.make_mesh(1, 1, devices=jax.devices()[:1])
  compiled = program_lib.build_train_program(c, mesh, abstract_features=True).compile()
  b = breakdown.of_hlo(compiled.as_text(), xla_internals.cost_numbers(compiled))
  assert b["within_tolerance"] and not b["not_costed"]
  # Not exact: the parts differ from the whole module's count by 2.6 bytes per million
  # here (where, not established); the report's bar is 5%.
  assert b["sum_over_module"] == pytest.approx({"flops": 1.0, "bytes": 1.0}, rel=1e-4)
  expected = {"generator forward: attention", "generator forward: rest", "generator backward: attention",
              "generator backward: rest", "MAE forward, generated samples", "MAE forward, data samples",
              "MAE backward to its input", "feature assembly", "loss forward", "optimizer", "EMA"}
  parts = b["components"]
  assert expected <= set(parts), sorted(parts)
  assert all(parts[name]["bytes"] > 0 for name in expected)
  # Matmuls and convolutions are where FLOPs are: generator and MAE hold nearly all of them.
  model = sum(p["flops"] for name, p in parts.items() if name.startswith(("generator", "MAE")))
  assert model / b["sum"]["flops"] > 0.9
  assert parts.get(breakdown.OTHER, {"bytes": 0})["bytes"] / b["sum"]["bytes"] < 0.05
  assert len(b["heaviest"]) == breakdown.HEAVIEST and all(i["source"] or i["charged_via"] for i in b["heaviest"])
